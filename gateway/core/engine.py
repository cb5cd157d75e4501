"""``RiskEngine``: positions, exposure, reservations, emergency modes, limits.

The engine is synchronous and pure. It takes checked requests and the time
(``now_ms``, milliseconds since the epoch, an argument of every entry point
that needs one: it has no clock), changes its state in one step, and queues
what it produced: journal records (``drain_records``, see
``gateway.core.records``) and events for the fan-out (``drain_events``, see
``gateway.core.events``). It never awaits, so a check and the reservation
that follows it cannot interleave with another request: concurrent
validations cannot pass a limit together.

Every request becomes a journal record, applied by the same code path that
recovery uses (``gateway.core.state``), so recovered state equals live state.

Emergency and limits changes are *staged* (``stage``) and published only
once their record is durable (``publish``), in the order of their records;
``gateway.core.modes`` decides when validations enforce a staged mode change.
An engine whose owner persists nothing publishes at once (the default; a
store calls ``defer_publication``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from types import MappingProxyType
from typing import Any

from gateway.core.book import AccountBook
from gateway.core.context import exact, own_context
from gateway.core.controls import Controls
from gateway.core.events import Decision, Event
from gateway.core.history import History
from gateway.core.limits import LimitChange, Limits
from gateway.core.modes import ModeState
from gateway.core.records import (
    EmergencyRecord,
    LimitsRecord,
    Record,
    RecordNotApplied,
    StagedRecord,
)
from gateway.core.reservations import Reservation, random_reservation_id
from gateway.core.rules import DEFAULT_RULES, Rule
from gateway.core.sharing import Sharing
from gateway.core.state import RiskState, load_state_snapshot, state_snapshot
from gateway.core.trading import Trading
from gateway.core.views import (
    AlertView,
    EmergencyView,
    ExposureView,
    LimitsView,
    PositionResult,
    PositionsResult,
    PriceResult,
    StateView,
    account_view,
    exposure_view,
    filter_emergency,
    limits_view,
)
from protocol.codes import AlertCode, AlertLevel, Mode
from protocol.messages import (
    EmergencySet,
    OrderValidate,
    PositionSnapshot,
    PositionUpdate,
    PriceUpdate,
)
from protocol.values import ZERO
from protocol.values import format_decimal as fmt


class RiskEngine:
    """The risk core. See the module docstring for the contract.

    ``limits`` are version 1; ``now_ms`` is when the engine starts (the
    ``since`` of the initial normal mode). ``rules`` are extra checks run
    after the built-in ones, each in its own copy of the decimal context.
    ``reservation_ids`` makes a new reservation id (default: random).
    ``max_symbols_per_account`` and ``max_reservations_per_account`` bound what
    one account may hold (None: no bound); a request past them is refused
    with ``BAD_REQUEST`` naming the cap, and changes nothing.
    """

    def __init__(
        self,
        *,
        limits: Limits,
        now_ms: int,
        rules: Sequence[Rule] = (),
        reservation_ids: Callable[[], str] | None = None,
        max_symbols_per_account: int | None = None,
        max_reservations_per_account: int | None = None,
    ) -> None:
        # One state for the engine's life (reset in place), shared by both handlers.
        self._state = state = RiskState(limits, now_ms)
        self._controls = Controls(state)
        self._trading = Trading(
            state,
            DEFAULT_RULES + tuple(own_context(r) for r in rules),
            reservation_ids or random_reservation_id,
            max_symbols_per_account,
            max_reservations_per_account,
        )
        self.sharing = Sharing(state, self._controls, self._trading)

    def reset_state(self, limits: Limits, now_ms: int) -> None:
        """As constructed at ``now_ms`` with ``limits`` (recovery starting over)."""
        self._state.reset(limits, now_ms)

    # ------------------------------------------------------------ reads

    @property
    def limits(self) -> Limits:
        """The limits in force. Read-only: they change through ``prepare_limits``
        (journaled and versioned), recovery, or ``use_limits``."""
        return self._state.in_force.limits

    @property
    def limits_version(self) -> int:
        return self._state.in_force.version

    @property
    def gateway_mode(self) -> ModeState:
        """The published gateway-wide mode, with its reason, actor and time."""
        return self._state.modes.gateway

    @property
    def emergency_version(self) -> int:
        return self._state.modes.version

    @property
    def accounts(self) -> Mapping[str, AccountBook]:
        """Every account's book (a read-only view)."""
        return MappingProxyType(self._state.book.accounts)

    @property
    def reservations(self) -> Mapping[str, Reservation]:
        """The live reservations by id (a read-only view)."""
        return MappingProxyType(self._state.reservations.live)

    @property
    def reference_prices(self) -> Mapping[str, Decimal]:
        return MappingProxyType(self._state.book.reference_prices)

    @property
    def gross_exposure(self) -> Decimal:
        """This engine's gross exposure, reservations included."""
        return self._state.book.gross_exposure

    @property
    def global_exposure(self) -> Decimal:
        """``gross_exposure`` plus what engines sharing the limit published."""
        return self._state.book.global_gross

    @property
    def history(self) -> History:
        """The last alerts and decisions (read them; the engine adds to them)."""
        return self._state.history

    def use_limits(self, limits: Limits) -> None:
        """Validate against ``limits``, unrecorded and unversioned (what-if)."""
        self._state.in_force.use(limits)

    def limits_view(self) -> LimitsView:
        return limits_view(self._state.in_force.version, self._state.in_force.limits)

    def emergency_view(self, readable: Callable[[str], bool] | None = None) -> EmergencyView:
        """The EMERGENCY object; with ``readable``, only the accounts it allows."""
        view = self._state.emergency_view()
        return view if readable is None else filter_emergency(view, readable)

    def mode_of(self, account: str | None) -> Mode:
        """The published mode of the gateway (``None``) or of one account."""
        return self._state.modes.mode_of(account)

    def enforced_mode(self, account: str | None) -> Mode:
        """The mode validations enforce (``gateway.core.modes``: maybe staged)."""
        modes = self._state.modes
        if account is None:
            return modes.enforced_gateway
        return modes.enforced_accounts.get(account, Mode.NORMAL)

    def is_emergency_mode_active(self) -> bool:
        """True while the gateway-wide mode validations enforce is not ``normal``."""
        return self._state.modes.enforced_gateway is not Mode.NORMAL

    @exact
    def state_view(
        self, accounts: Iterable[str] | None = None, readable: Callable[[str], bool] | None = None
    ) -> StateView:
        """The STATE object; ``accounts`` limits it (a trader sees only its own),
        ``readable`` the accounts of its EMERGENCY document (``emergency_view``)."""
        state = self._state
        books = state.book.accounts
        names = sorted(books) if accounts is None else sorted(accounts)
        return {
            "emergency": self.emergency_view(readable),
            "accounts": {
                name: account_view(book)
                for name in names
                if (book := books.get(name)) is not None and book.known
            },
            "gross_exposure": fmt(state.book.gross_exposure),
            "limits_version": state.in_force.version,
        }

    @exact
    def exposure_of(self, account: str) -> ExposureView:
        """One ``exposure`` channel entry."""
        state = self._state
        book = state.book.accounts.get(account)
        gross = ZERO if book is None else book.gross
        return exposure_view(account, gross, state.book.global_gross, state.in_force.texts)

    @exact
    def recompute_exposure(self) -> tuple[Decimal, dict[str, Decimal]]:
        """Gross exposure from scratch (gateway, per account): a check on the cache."""
        return self._state.book.recompute()

    # ----------------------------------------------------------- outputs

    def drain_records(self) -> list[Record]:
        """Journal records produced since the last call, in order (each exactly once)."""
        state = self._state
        records, state.records = state.records, []
        return records

    def has_records(self) -> bool:
        """Whether records wait for ``drain_records``."""
        return bool(self._state.records)

    def drain_events(self) -> list[Event]:
        """Fan-out events produced since the last call, in order (each exactly once)."""
        state = self._state
        events, state.events = state.events, []
        return events

    def raise_alert(
        self,
        level: AlertLevel,
        code: AlertCode,
        message: str,
        *,
        now_ms: int,
        account: str | None = None,
        for_traders: bool = True,
    ) -> None:
        """Queue an alert raised outside the engine (by the server or the store).
        ``account``: the account it is about (traders of other accounts never
        see it); ``for_traders`` False: about a connection, for staff only."""
        self._state.alert(level, code, message, now_ms, account, for_traders=for_traders)

    def note_alert(self, alert: AlertView, now_ms: int, *, for_traders: bool) -> None:
        """Keep and journal an alert already published (the fan-out's own)."""
        self._state.note_alert(alert, now_ms, for_traders)

    # ------------------------------------------------- emergency and limits

    def prepare_emergency(
        self, request: EmergencySet, actor: str, now_ms: int
    ) -> EmergencyRecord | None:
        """The journal record for a mode change, or ``None`` when it changes
        nothing (the scope's intended mode is ``request.mode`` already).
        Nothing is applied: ``stage`` it next."""
        return self._controls.prepare_emergency(request, actor, now_ms)

    def set_emergency(self, request: EmergencySet, actor: str, now_ms: int) -> EmergencyView:
        """Prepare and ``stage`` a mode change; returns EMERGENCY (which shows
        the change only once it is published)."""
        record = self._controls.prepare_emergency(request, actor, now_ms)
        if record is not None:
            self.stage(record)
        return self.emergency_view()

    @exact
    def force_halt(self, reason: str, now_ms: int, *, durable: bool = True) -> None:
        """The gateway halts itself (recovery damage, persistence failure), also
        when halted already, so that the reason says why it must stay so.
        ``durable``: staged like any change. Without (the journal has failed,
        nothing can be written), applied at once and held in memory only."""
        self._controls.force_halt(reason, now_ms, durable=durable)

    def record_initial_state(self, now_ms: int) -> None:
        """A fresh state directory: journal the initial mode (normal since
        ``now_ms``, version 0) so that every restart shows the same ``since``."""
        self._controls.record_initial_state(now_ms)

    @exact
    def prepare_limits(
        self, version: int, changes: Mapping[str, Any], actor: str, now_ms: int
    ) -> LimitsRecord | None:
        """The journal record for ``limits.set`` (``None`` if nothing changes).

        Raises ``ProtocolError(CONFLICT)`` when ``version`` is not current and
        ``ProtocolError(BAD_REQUEST)`` naming the key when a value is wrong.
        """
        return self._controls.prepare_limits(version, changes, actor, now_ms)

    @exact
    def prepare_file_limits(
        self, limits: Limits, actor: str, now_ms: int
    ) -> tuple[LimitsRecord | None, list[LimitChange]]:
        """The journal record for the config file's ``[limits]`` (start,
        SIGHUP), ``None`` when the file is as last applied, and for the log
        ``(key, old, new)`` per key whose value changes. Only the keys the file
        changed since it was last applied change."""
        return self._controls.prepare_file_limits(limits, actor, now_ms)

    @exact
    def adopt_file_limits(self, limits: Limits, now_ms: int) -> None:
        """First start on a fresh state directory: the config file's limits are
        version 1, recorded without an alert (nothing changed)."""
        self._controls.adopt_file_limits(limits, now_ms)

    def defer_publication(self, enabled: bool = True) -> None:
        """From now on, ``stage`` leaves a change to ``publish`` (a store owns
        this engine), or with ``enabled`` False publishes it at once (no store,
        or its journal failed: nothing can be made durable any more)."""
        self._state.deferred = enabled

    @exact
    def stage(self, record: StagedRecord) -> None:
        """Queue an emergency or limits record for the journal, to be
        published once durable (``publish``, in staging order); a mode change
        the modes table enforces at once is enforced now. Published at once
        unless ``defer_publication`` was called."""
        self._state.stage(record)

    def is_staged(self, record: object) -> bool:
        """Whether ``record`` (this very object) waits to be published."""
        return self._state.staging.contains(record)

    @exact
    def publish(self, record: Mapping[str, Any]) -> None:
        """The staged ``record`` is durable: apply it, with its events and
        alerts. Records are published in the order they were staged
        (``ValueError`` otherwise)."""
        state = self._state
        state.staging.pop_first(record)
        self.apply_committed(record)
        state.modes.enforce(state.staging.emergencies())

    def discard_staged(self) -> int:
        """Forget the staged records (the journal failed: they will never be
        durable). Returns how many there were."""
        state = self._state
        count = state.staging.clear()
        state.modes.enforce(state.staging.emergencies())
        return count

    # ---------------------------------------------------------------- trading

    @exact
    def validate(
        self,
        order: OrderValidate,
        now_ms: int,
        *,
        connection: int | None = None,
        cancel_on_disconnect: bool = False,
    ) -> Decision:
        """``order.validate``: the decision; check and reservation are one step.

        ``connection`` owns the reservation (``release_connection``). Raises
        ``ProtocolError``: ``CONFLICT`` for another order under a live
        ``client_order_id``, ``BAD_REQUEST`` past a cap; nothing changes then.
        A repeat of a live reservation's order answers its decision again.
        """
        return self._trading.validate(order, now_ms, connection, cancel_on_disconnect)

    @exact
    def update_position(self, u: PositionUpdate, now_ms: int) -> PositionResult:
        """``position.update``: set the absolute position. Never rejected for risk.

        Raises ``ProtocolError(BAD_REQUEST)`` when ``release`` does not name a
        live reservation of the same account and symbol (one wording for
        every case, so it tells nothing about other accounts), or naming the
        cap when the account would hold too many symbols; nothing changes then.
        """
        return self._trading.update_position(u, now_ms)

    @exact
    def snapshot_positions(self, s: PositionSnapshot, now_ms: int) -> PositionsResult:
        """``position.snapshot``: replace every position of the account, clear
        stale. Raises ``ProtocolError(BAD_REQUEST)`` naming the cap when the
        account would hold too many symbols (those named and those its live
        reservations hold); nothing changes then."""
        return self._trading.snapshot_positions(s, now_ms)

    @exact
    def update_price(self, u: PriceUpdate, now_ms: int) -> PriceResult:
        """``price.update``: the reference price of a symbol, used by the price collar."""
        return self._trading.update_price(u, now_ms)

    @exact
    def release_reservation(self, reservation_id: str, why: str, now_ms: int) -> Reservation | None:
        """Free a live reservation (``why``: the record's reason, e.g.
        ``released``); ``None`` if it does not exist (or already expired)."""
        return self._trading.release_reservation(reservation_id, why, now_ms)

    @exact
    def set_cancel_on_disconnect(self, connection: int, enabled: bool, now_ms: int) -> int:
        """``session.hello``'s ``cancel_on_disconnect`` for a live connection: it
        applies to every reservation the connection made, before the hello too
        (journaled, so recovery releases them as well). Returns how many
        reservations changed."""
        return self._trading.set_cancel_on_disconnect(connection, enabled, now_ms)

    @exact
    def release_connection(self, connection: int, now_ms: int) -> int:
        """Release every reservation a closed connection made with
        cancel_on_disconnect; returns how many."""
        return self._trading.release_connection(connection, now_ms)

    @exact
    def release_orphaned_reservations(self, now_ms: int) -> int:
        """After a restart, reservations made with cancel_on_disconnect have lost
        their connection: release them, as a disconnect would have."""
        return self._trading.release_orphaned(now_ms)

    @exact
    def expire_reservations(self, now_ms: int) -> None:
        """Release every reservation whose time is up (O(1) when none is)."""
        self._trading.expire_due(now_ms)

    # ------------------------------------------------------ records, snapshot

    @exact
    def apply_record(self, rec: Mapping[str, Any]) -> None:
        """Apply one journal record (live changes and recovery share this path).
        Raises ``ValueError`` for a record type the engine never writes."""
        self._state.apply(rec)

    @exact
    def apply_committed(self, rec: Mapping[str, Any]) -> None:
        """Apply a record the caller already made durable: events and alerts
        are produced, no journal record is queued again."""
        state = self._state
        state.committed = True
        try:
            state.apply(rec)
        finally:
            state.committed = False

    @exact
    def replay(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Apply recovered records without events or new records; returns how
        many. Raises ``RecordNotApplied`` when one cannot be applied (one this
        engine did not write); the state is then undefined: ``reset_state``."""
        try:
            return self._state.replay(records)
        except Exception as exc:
            raise RecordNotApplied(exc) from exc

    @exact
    def snapshot(self) -> dict[str, Any]:
        """The whole durable state as one document (``state_snapshot``)."""
        return state_snapshot(self._state)

    @exact
    def load_snapshot(self, snap: Mapping[str, Any]) -> None:
        """Replace the whole state with a ``snapshot()`` document.

        Raises ``RecordNotApplied`` when it cannot be loaded (a snapshot this
        engine did not write); the state is then undefined (``reset_state``).
        """
        try:
            load_state_snapshot(self._state, snap)
        except Exception as exc:
            raise RecordNotApplied(exc) from exc
