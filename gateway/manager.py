"""``EmergencyManager``: positions, exposure, reservations, emergency modes, limits.

The manager is sync and pure. It takes checked requests and a timestamp
(milliseconds since the epoch, an input so tests can pin it), changes its
state in one step, and queues what it produced: journal records
(``drain_records``) and events for the fan-out (``drain_events``). It never
awaits, so a check and the reservation that follows it cannot interleave with
another request: this is what makes concurrent validations unable to pass a
limit together.

Every state change is a journal record, and the same ``apply_record`` code
path that recovery uses applies it live, so recovered state equals live state.

Exposure follows PROTOCOL.md section 6: for each account and symbol, with
position ``p``, mark price ``m`` and live reserved buy/sell quantities ``B``
and ``S``, the worst case ``w = max(|p + B|, |p - S|)`` and the symbol's gross
exposure ``w * m``. Totals per account and for the gateway are kept
incrementally, so a validation costs the same with ten positions or a
hundred thousand.

For people embedding the manager as a library, the original API lives on:
``validate_new_position``, ``update_state``, ``is_emergency_mode_active`` and
``recover_state`` (see ``gateway.embedded``).
"""

from __future__ import annotations

import dataclasses
import decimal
import functools
import heapq
import secrets
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, ParamSpec, TypeVar

from gateway.config import Limits
from gateway.persistence.errors import RecordNotApplied
from gateway.rules import DEFAULT_RULES, OrderCheck, Rule, RuleResult
from protocol.codes import AlertCode, AlertLevel, ErrorCode, Mode
from protocol.errors import ProtocolError, bad_request
from protocol.messages import (
    EmergencySet,
    OrderValidate,
    PositionSnapshot,
    PositionUpdate,
    PriceUpdate,
)
from protocol.values import RISK_CONTEXT, ZERO, format_time_ms
from protocol.values import format_decimal as fmt

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _exact(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run a public entry point in the exact decimal context, whatever the
    caller's own context is (a library host may keep Python's default 28 digits).

    What ``decimal.localcontext(RISK_CONTEXT)`` does (a fresh copy, restored
    afterwards), without the context manager's cost: this wraps every
    validation. Internal calls between entry points use the undecorated
    methods (``_apply_record``, ``_expire_due``) instead of nesting it. In a
    process that installed the risk context (``install_risk_context``, the
    gateway server) there is nothing to swap.
    """

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        caller = _getcontext()
        if caller is _installed:
            return method(*args, **kwargs)
        _setcontext(_copy_risk_context())
        try:
            return method(*args, **kwargs)
        finally:
            _setcontext(caller)

    return wrapper


_getcontext = decimal.getcontext
_setcontext = decimal.setcontext
_copy_risk_context = RISK_CONTEXT.copy
# The context install_risk_context() made current, if any.
_installed: decimal.Context | None = None


def install_risk_context() -> decimal.Context:
    """Make a copy of the exact risk context this thread's decimal context.

    For a process whose decimal arithmetic is all risk math (the gateway
    server calls it before its event loop starts, so every task inherits it):
    the manager's entry points then skip their per-call context swap (about
    0.8 us each). A library host that keeps its own context need not call it;
    the entry points swap as before. Nothing may change the installed
    context's settings afterwards.
    """
    global _installed
    context = _copy_risk_context()
    _setcontext(context)
    _installed = context
    return context


def _own_context(rule: Rule) -> Rule:
    """A desk's check, run in a fresh copy of the risk context: whatever it does
    to the decimal context ends with the call, even where the context is
    installed and shared (``install_risk_context``)."""

    @functools.wraps(rule)
    def check(order: OrderCheck) -> RuleResult:
        caller = _getcontext()
        _setcontext(_copy_risk_context())
        try:
            return rule(order)
        finally:
            _setcontext(caller)

    return check


GATEWAY_ACTOR = "gateway"
_MODE_RANK = {Mode.NORMAL: 0, Mode.REDUCING: 1, Mode.HALTED: 2}
_WARNING_FRACTION = Decimal("0.8")


_d = Decimal  # a journal decimal string to a Decimal (exact: no context involved)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModeState:
    """One emergency mode setting: gateway-wide or for one account."""

    mode: Mode
    reason: str
    actor: str
    since_ms: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value,
            "reason": self.reason,
            "actor": self.actor,
            "since": format_time_ms(self.since_ms),
        }


@dataclass(slots=True)
class SymbolBook:
    """One account's position in one symbol, with its live reservations."""

    qty: Decimal = ZERO  # p, signed
    mark: Decimal | None = None  # m: mark price from position updates
    reserved_buy: Decimal = ZERO  # B
    reserved_sell: Decimal = ZERO  # S
    exposure: Decimal = ZERO  # w * m, kept in step with the fields above
    position_exposure: Decimal = ZERO  # |p| * m
    reported: bool = False  # a position update or snapshot named this symbol
    reprice_due: bool = False  # replay changed qty/mark; exposure not yet brought in step

    def worst(self) -> Decimal:
        long_side = abs(self.qty + self.reserved_buy)
        short_side = abs(self.qty - self.reserved_sell)
        return long_side if long_side >= short_side else short_side


@dataclass(slots=True)
class AccountBook:
    positions: dict[str, SymbolBook] = field(default_factory=dict)
    gross: Decimal = ZERO  # sum of SymbolBook.exposure
    reserved: Decimal = ZERO  # sum of exposure - position_exposure
    seq: int | None = None
    stale: bool = False
    recent_orders: deque[int] = field(default_factory=deque)
    reservations: int = 0  # live reservations
    warned: bool = False  # EXPOSURE_WARNING raised and not yet cleared
    breached: bool = False  # EXPOSURE_BREACH raised and not yet cleared
    # Named by a position or a reservation. A book opened only by validations
    # (for its rate window) is not shown in STATE.
    known: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Reservation:
    id: str
    account: str
    symbol: str
    side: str
    qty: Decimal
    price: Decimal
    expires_ms: int
    client_order_id: str | None
    cancel_on_disconnect: bool
    connection: int | None  # live connection that owns it (not persisted)
    decision: dict[str, Any]  # the accept decision, returned again on an idempotent retry


# Events for the fan-out. They carry wire-ready data.
@dataclass(frozen=True, slots=True)
class EmergencyChanged:
    """The whole EMERGENCY document after a change (``view``), and who changed
    what: ``account`` is the scope changed (None: gateway-wide)."""

    view: dict[str, Any]
    account: str | None = None
    actor: str = ""


@dataclass(frozen=True, slots=True)
class AlertRaised:
    """An alert; ``alert.get("account")`` names the account it is about.
    ``for_traders`` False: about a connection, never shown to a trader."""

    alert: dict[str, Any]
    for_traders: bool = True


@dataclass(frozen=True, slots=True)
class ExposureChanged:
    account: str


@dataclass(frozen=True, slots=True)
class DecisionMade:
    data: dict[str, Any]


Event = EmergencyChanged | AlertRaised | ExposureChanged | DecisionMade


class EmergencyManager:
    """The risk core. See the module docstring for the contract.

    ``config`` is the original embedding API's dict (``max_exposure``,
    ``emergency_state_file``, any ``[limits]`` key, ``fsync``); the server
    passes ``limits`` instead. ``rules`` are extra checks run after the built-in
    ones. ``clock`` returns milliseconds since the epoch. ``reservation_ids``
    makes a new reservation id (default: random, see ``_random_reservation_id``).
    ``max_symbols_per_account`` and ``max_reservations_per_account`` bound what
    one account may hold (None: no bound); a request past them is refused
    with ``BAD_REQUEST`` naming the cap, and changes nothing.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        *,
        limits: Limits | None = None,
        rules: Sequence[Rule] = (),
        risk_manager: Any = None,
        clock: Callable[[], int] | None = None,
        reservation_ids: Callable[[], str] | None = None,
        max_symbols_per_account: int | None = None,
        max_reservations_per_account: int | None = None,
    ) -> None:
        import time

        self._max_symbols = max_symbols_per_account
        self._max_reservations = max_reservations_per_account

        self._clock = clock or (lambda: time.time_ns() // 1_000_000)
        self.config: dict[str, Any] = dict(config or {})
        if limits is None:
            limits = _limits_from_legacy(self.config)
        self.rules: tuple[Rule, ...] = DEFAULT_RULES + tuple(_own_context(r) for r in rules)
        self.risk_manager = (
            risk_manager if risk_manager is not None else self.config.get("risk_manager")
        )
        self._new_reservation_id = reservation_ids or _random_reservation_id
        self._defer_publication = False
        # Set by gateway.embedded when the original async API is used.
        self._embedded: Any = None
        self.reset_state(limits)

    @property
    def limits(self) -> Limits:
        """The limits in force. Read-only: they change through ``prepare_limits``
        (an admin's change, journaled and versioned), recovery, or
        ``use_limits`` (an offline what-if), each of which keeps the values
        derived from them (the limit strings decisions report) in step."""
        return self._limits

    def use_limits(self, limits: Limits) -> None:
        """Validate against ``limits`` from now on, without a record, a version
        or an alert: for an offline what-if over recorded history."""
        self._limits = limits
        self._limit_strings: tuple[str, str] = (
            fmt(limits.max_account_exposure),
            fmt(limits.max_exposure),
        )

    def reset_state(self, limits: Limits) -> None:
        """Forget every state (positions, reservations, modes, limits, queued
        records and events): as constructed, with ``limits`` as version 1.
        Recovery starts over with it when what it read cannot be applied."""
        self._limits = limits
        self.limits_version = 1
        self.file_limits: dict[str, Any] | None = None
        self.gateway_mode = ModeState(
            mode=Mode.NORMAL, reason="", actor=GATEWAY_ACTOR, since_ms=self._clock()
        )
        self.account_modes: dict[str, ModeState] = {}
        self.emergency_version = 0
        self.accounts: dict[str, AccountBook] = {}
        self.gross_exposure = ZERO
        self.reference_prices: dict[str, Decimal] = {}
        self.reservations: dict[str, Reservation] = {}
        self._by_client_order: dict[tuple[str, str], str] = {}
        self._expiry_heap: list[tuple[int, str]] = []
        self._gateway_breached = False
        self._gateway_warned = False
        self._records: list[dict[str, Any]] = []
        self._events: list[Event] = []
        self._replaying = False
        # Symbols whose position a replay changed: repriced once when the replay
        # ends rather than once per record (a position is updated many times).
        self._reprice_due: list[tuple[AccountBook, SymbolBook]] = []
        self._committed = False  # applying a record that is already in the journal
        # Emergency and limits records on their way to the journal, oldest
        # first (see ``stage``): published once durable, in this order.
        self._staged: deque[dict[str, Any]] = deque()
        # The modes validations enforce: each scope's published mode, or a
        # staged one where that is stricter (see _enforce).
        self._enforced_gateway = Mode.NORMAL
        self._enforced_accounts: dict[str, Mode] = {}
        self._emergency_view: dict[str, Any] | None = None
        self._limit_strings = (fmt(limits.max_account_exposure), fmt(limits.max_exposure))
        # (limits, 80% of max_account_exposure, 80% of max_exposure), computed
        # in the exact context on first use after each limits change.
        self._warning_levels: tuple[Limits | None, Decimal, Decimal] = (None, ZERO, ZERO)

    # ------------------------------------------------------------------ outputs

    def drain_records(self) -> list[dict[str, Any]]:
        """Journal records produced since the last call, in order (each exactly once)."""
        records, self._records = self._records, []
        return records

    def drain_events(self) -> list[Event]:
        """Fan-out events produced since the last call, in order (each exactly once)."""
        events, self._events = self._events, []
        return events

    def _record(self, record: dict[str, Any]) -> None:
        if not self._replaying and not self._committed:
            self._records.append(record)

    def _event(self, event: Event) -> None:
        if not self._replaying:
            self._events.append(event)

    def _alert(
        self,
        level: AlertLevel,
        code: AlertCode,
        message: str,
        now_ms: int,
        *,
        account: str | None = None,
        symbol: str | None = None,
        for_traders: bool = True,
    ) -> None:
        if self._replaying:
            return
        alert: dict[str, Any] = {"level": level.value, "code": code.value, "message": message}
        if account is not None:
            alert["account"] = account
        if symbol is not None:
            alert["symbol"] = symbol
        alert["ts"] = format_time_ms(now_ms)
        self._events.append(AlertRaised(alert, for_traders))

    def raise_alert(
        self,
        level: AlertLevel,
        code: AlertCode,
        message: str,
        *,
        account: str | None = None,
        now_ms: int | None = None,
        for_traders: bool = True,
    ) -> None:
        """Queue an alert raised outside the manager (by the server or journal).

        ``account``: the account it is about (traders of other accounts never
        see it); ``for_traders`` False: about a connection, for staff only.
        """
        self._alert(
            level, code, message, self._now(now_ms), account=account, for_traders=for_traders
        )

    def _now(self, now_ms: int | None) -> int:
        return self._clock() if now_ms is None else now_ms

    # ------------------------------------------------------------ emergency
    #
    # Emergency and limits changes are published (applied to the EMERGENCY
    # document or the limits, pushed, answered) only once their record is
    # durable, and in the order of their records: so a version is never shown
    # before it can survive a crash, and never names two contents. Until then
    # the record is *staged*: a change towards safety is enforced at once (a
    # validation sees the stricter of the published and every staged mode of
    # its scope), one away from safety only once published. A manager that no
    # store owns (a library host, the tests) publishes at once.

    def emergency_view(self, readable: Callable[[str], bool] | None = None) -> dict[str, Any]:
        """The EMERGENCY object of the protocol (cached until the next change).

        ``readable``: which accounts the reader may see (a trader's own);
        ``accounts`` then lists only those.
        """
        view = self._emergency_view
        if view is None:
            view = self.gateway_mode.to_wire()
            view["version"] = self.emergency_version
            view["accounts"] = {a: s.to_wire() for a, s in sorted(self.account_modes.items())}
            self._emergency_view = view
        if readable is None:
            return view
        return filter_emergency(view, readable)

    def mode_of(self, account: str | None) -> Mode:
        """The published mode of the gateway (``None``) or of one account."""
        if account is None:
            return self.gateway_mode.mode
        state = self.account_modes.get(account)
        return Mode.NORMAL if state is None else state.mode

    def enforced_mode(self, account: str | None) -> Mode:
        """The mode validations enforce: the published one, or a staged change
        towards safety that is not durable yet."""
        if account is None:
            return self._enforced_gateway
        return self._enforced_accounts.get(account, Mode.NORMAL)

    def is_emergency_mode_active(self) -> bool:
        """True while the gateway-wide mode is not ``normal``."""
        return self._enforced_gateway is not Mode.NORMAL

    def _intended_mode(self, account: str | None) -> Mode:
        """The mode the journal will say: the last staged change of the scope,
        else the published mode."""
        for rec in reversed(self._staged):
            if rec["t"] == "emg" and rec["a"] == account:
                return Mode(rec["m"])
        return self.mode_of(account)

    def _next_version(self, kind: str, published: int) -> int:
        version = published
        for rec in self._staged:
            if rec["t"] == kind and rec["v"] > version:
                version = rec["v"]
        return version + 1

    def prepare_emergency(
        self, request: EmergencySet, actor: str, now_ms: int | None = None
    ) -> dict[str, Any] | None:
        """The journal record for a mode change, or ``None`` when it changes nothing.

        Nothing is applied: ``stage`` it (the server), or ``apply_record`` it
        (no persistence in between).
        """
        if self._intended_mode(request.account) is request.mode:
            return None
        return {
            "t": "emg",
            "a": request.account,
            "m": request.mode.value,
            "r": request.reason,
            "by": actor,
            "at": self._now(now_ms),
            "v": self._next_version("emg", self.emergency_version),
        }

    def defer_publication(self, enabled: bool = True) -> None:
        """From now on, ``stage`` leaves a change to ``publish`` (a store owns
        this manager), or with ``enabled`` False publishes it at once (no store,
        or its journal failed: nothing can be made durable any more)."""
        self._defer_publication = enabled

    @_exact
    def stage(self, record: dict[str, Any]) -> None:
        """Queue an emergency or limits record for the journal, to be published
        once durable (``publish``, in staging order). A mode change towards
        safety is enforced at once. Without a store, published at once."""
        if not self._defer_publication:
            self._apply_record(record)
            return
        self._staged.append(record)
        self._records.append(record)
        if record["t"] == "emg":
            self._enforce()

    def is_staged(self, record: Mapping[str, Any]) -> bool:
        """Whether ``record`` (this very object) waits to be published."""
        return any(rec is record for rec in self._staged)

    @_exact
    def publish(self, record: Mapping[str, Any]) -> None:
        """The staged ``record`` is durable: apply it, with its events and
        alerts. Records are published in the order they were staged."""
        if not self._staged or self._staged[0] is not record:
            raise ValueError("publish() out of staging order")
        self._staged.popleft()
        self.apply_committed(record)
        self._enforce()

    def discard_staged(self) -> int:
        """Forget the staged records (the journal failed: they will never be
        durable). Returns how many there were."""
        count = len(self._staged)
        self._staged.clear()
        self._enforce()
        return count

    def _enforce(self) -> None:
        gateway = self.gateway_mode.mode
        accounts = {a: s.mode for a, s in self.account_modes.items()}
        for rec in self._staged:
            if rec["t"] != "emg":
                continue
            mode = Mode(rec["m"])
            account = rec["a"]
            if account is None:
                if _MODE_RANK[mode] > _MODE_RANK[gateway]:
                    gateway = mode
            elif _MODE_RANK[mode] > _MODE_RANK[accounts.get(account, Mode.NORMAL)]:
                accounts[account] = mode
        self._enforced_gateway = gateway
        self._enforced_accounts = accounts

    def record_initial_state(self, now_ms: int | None = None) -> None:
        """A fresh state directory: journal the initial mode (normal since now,
        version 0) so that every restart shows the same ``since``."""
        self.replay(
            [
                {
                    "t": "emg",
                    "a": None,
                    "m": Mode.NORMAL.value,
                    "r": "",
                    "by": GATEWAY_ACTOR,
                    "at": self._now(now_ms),
                    "v": 0,
                }
            ]
        )
        self._records.append({"t": "emg", "a": None, **_mode_to_record(self.gateway_mode), "v": 0})

    def set_emergency(
        self, request: EmergencySet, actor: str, now_ms: int | None = None
    ) -> dict[str, Any]:
        """Prepare and ``stage`` a mode change; returns EMERGENCY. Without a
        store it is published at once; with one, once its record is durable
        (the EMERGENCY returned does not show it yet)."""
        record = self.prepare_emergency(request, actor, now_ms)
        if record is not None:
            self.stage(record)
        return self.emergency_view()

    def _apply_emergency(self, rec: Mapping[str, Any]) -> None:
        account = rec.get("a")
        mode = Mode(rec["m"])
        state = ModeState(mode=mode, reason=rec["r"], actor=rec["by"], since_ms=rec["at"])
        previous = self.mode_of(account)
        if account is None:
            self.gateway_mode = state
        elif mode is Mode.NORMAL:
            self.account_modes.pop(account, None)
        else:
            self.account_modes[account] = state
        self.emergency_version = rec["v"]
        self._emergency_view = None
        self._enforce()
        self._record(dict(rec))
        if self._replaying:
            return
        view = self.emergency_view()
        self._event(EmergencyChanged(view, account, state.actor))
        scope = "gateway" if account is None else f"account {account}"
        level = (
            AlertLevel.CRITICAL
            if mode is Mode.HALTED
            else AlertLevel.WARNING
            if mode is Mode.REDUCING
            else AlertLevel.INFO
        )
        text = f"{scope} {previous.value} -> {mode.value} by {state.actor}"
        if state.reason:
            text += f": {state.reason}"
        self._alert(level, AlertCode.EMERGENCY_CHANGED, text, state.since_ms, account=account)

    @_exact
    def force_halt(self, reason: str, now_ms: int | None = None, *, durable: bool = True) -> None:
        """The gateway halts itself (recovery damage, persistence failure).

        Also when already halted, so that the reason says why it must stay so.
        ``durable``: staged like any change (published once its record is
        durable). Without (the journal has failed, nothing can be written),
        applied at once and held in memory only.
        """
        if self._intended_mode(None) is Mode.HALTED and self._intended_reason() == reason:
            return
        rec = {
            "t": "emg",
            "a": None,
            "m": Mode.HALTED.value,
            "r": reason,
            "by": GATEWAY_ACTOR,
            "at": self._now(now_ms),
            "v": self._next_version("emg", self.emergency_version),
        }
        if durable:
            self.stage(rec)
        else:
            self._apply_emergency(rec)

    def _intended_reason(self) -> str:
        for rec in reversed(self._staged):
            if rec["t"] == "emg" and rec["a"] is None:
                return str(rec["r"])
        return self.gateway_mode.reason

    # ----------------------------------------------------------------- limits

    def limits_view(self) -> dict[str, Any]:
        return {"version": self.limits_version, "limits": self.limits.to_wire()}

    def _intended_limits(self) -> tuple[int, Limits, dict[str, Any] | None]:
        """(version, limits, file limits) as the journal will say."""
        for rec in reversed(self._staged):
            if rec["t"] == "lim":
                limits = Limits.from_mapping(rec["limits"], where="staged limits")
                return rec["v"], limits, rec.get("file", self.file_limits)
        return self.limits_version, self.limits, self.file_limits

    @_exact
    def prepare_file_limits(
        self, limits: Limits, actor: str = "config", now_ms: int | None = None
    ) -> tuple[dict[str, Any] | None, list[tuple[str, Any, Any]]]:
        """The journal record for the config file's ``[limits]`` (start, SIGHUP).

        Only the keys whose value in the file differs from the value the file
        had when it was last applied change (per symbol for ``symbols``): a key
        the file did not change keeps its current value, one set by
        ``limits.set`` included. Returns the record (``None``: the file is as
        last applied) and, for the log, ``(key, old, new)`` per key whose
        value changes. A record that changes no value keeps the version and
        only moves the file's baseline.
        """
        version, current, baseline = self._intended_limits()
        file_wire = limits.to_wire()
        if baseline == file_wire:
            return None, []
        before = baseline or {}
        changes: dict[str, Any] = {}
        for key, value in file_wire.items():
            if key != "symbols":
                if before.get(key) != value:
                    changes[key] = value
                continue
            old_symbols = before.get("symbols") or {}
            edited = {
                symbol: value.get(symbol, {})
                for symbol in sorted(set(old_symbols) | set(value))
                if old_symbols.get(symbol) != value.get(symbol)
            }
            if edited:
                changes["symbols"] = edited
        new = Limits.from_mapping(changes, where="config limits", base=current)
        current_wire = current.to_wire()
        new_wire = new.to_wire()
        changed = [
            (key, current_wire[key], new_wire[key])
            for key in new_wire
            if new_wire[key] != current_wire[key]
        ]
        rec: dict[str, Any] = {
            "t": "lim",
            "v": version + 1 if changed else version,
            "limits": new_wire,
            "file": file_wire,
            "by": actor,
            "at": self._now(now_ms),
        }
        return rec, changed

    @_exact
    def prepare_limits(
        self,
        version: int,
        changes: Mapping[str, Any],
        actor: str,
        now_ms: int | None = None,
    ) -> dict[str, Any] | None:
        """The journal record for a limits change (``None`` if nothing changes).

        Raises ``ProtocolError(CONFLICT)`` when ``version`` is not current and
        ``ProtocolError(BAD_REQUEST)`` naming the key when a value is wrong.
        """
        from gateway.config import ConfigError

        current_version, current, _file = self._intended_limits()
        if version != current_version:
            raise ProtocolError(
                ErrorCode.CONFLICT,
                f"params.version is {version} but the limits are at version "
                f"{current_version}; read them again with limits.get",
            )
        try:
            new = Limits.from_mapping(changes, where="params.limits", base=current)
        except ConfigError as exc:
            raise bad_request(str(exc)) from None
        except ProtocolError as exc:
            raise bad_request(exc.message) from None
        wire = new.to_wire()
        if wire == current.to_wire():
            return None
        return {
            "t": "lim",
            "v": current_version + 1,
            "limits": wire,
            "by": actor,
            "at": self._now(now_ms),
        }

    @_exact
    def adopt_file_limits(self, limits: Limits, now_ms: int | None = None) -> None:
        """First start on a fresh state directory: the config file's limits are
        version 1, recorded without an alert (nothing changed)."""
        wire = limits.to_wire()
        rec = {"t": "lim", "v": 1, "limits": wire, "by": "config", "at": self._now(now_ms)}
        rec["file"] = wire
        self._replaying = True
        try:
            self._apply_limits(rec)
        finally:
            self._replaying = False
        self._records.append(rec)

    def _apply_limits(self, rec: Mapping[str, Any]) -> None:
        changed = rec["v"] != self.limits_version
        self._limits = Limits.from_mapping(rec["limits"], where="journal limits")
        self.limits_version = rec["v"]
        if "file" in rec:
            self.file_limits = rec["file"]
        self._limit_strings = (
            fmt(self._limits.max_account_exposure),
            fmt(self._limits.max_exposure),
        )
        self._record(dict(rec))
        if not self._replaying and changed:
            self._alert(
                AlertLevel.WARNING,
                AlertCode.LIMITS_CHANGED,
                f"limits changed to version {self.limits_version} by {rec['by']}",
                rec["at"],
            )
            for account in self.accounts:
                self._event(ExposureChanged(account))
            self._check_thresholds(None, rec["at"], allow_auto_reduce=False)

    # ------------------------------------------------------------- positions

    def _book(self, account: str) -> AccountBook:
        book = self.accounts.get(account)
        if book is None:
            book = self.accounts[account] = AccountBook()
        return book

    def _reprice(self, book: AccountBook, sym: SymbolBook) -> None:
        """Bring the cached exposures of one symbol and its totals in step."""
        mark = sym.mark
        if mark is None:
            exposure = position_exposure = ZERO
        else:
            # SymbolBook.worst(), inlined: this runs for every record replayed.
            qty = sym.qty
            long_side = abs(qty + sym.reserved_buy)
            short_side = abs(qty - sym.reserved_sell)
            exposure = (long_side if long_side >= short_side else short_side) * mark
            position_exposure = abs(qty) * mark
        delta = exposure - sym.exposure
        if delta:
            book.gross += delta
            self.gross_exposure += delta
        reserved_delta = (exposure - position_exposure) - (sym.exposure - sym.position_exposure)
        if reserved_delta:
            book.reserved += reserved_delta
        sym.exposure = exposure
        sym.position_exposure = position_exposure

    @_exact
    def update_position(self, u: PositionUpdate, now_ms: int | None = None) -> dict[str, Any]:
        """``position.update``: set the absolute position. Never rejected for risk.

        Raises ``ProtocolError(BAD_REQUEST)`` when ``release`` does not name a
        live reservation of the same account and symbol (unknown, expired,
        another symbol's or another account's: one wording for all, so it
        tells nothing about other accounts); nothing changes then.
        """
        now = self._now(now_ms)
        self._expire_due(now)
        released: bool | None = None
        if u.release is not None:
            res = self.reservations.get(u.release)
            if res is None or res.account != u.account or res.symbol != u.symbol:
                raise bad_request(
                    f"params.release {u.release} is not a live reservation of account "
                    f"{u.account} in {u.symbol}"
                )
            released = True
        cap = self._max_symbols
        if cap is not None:
            book = self.accounts.get(u.account)
            if book is not None and u.symbol not in book.positions and len(book.positions) >= cap:
                raise bad_request(
                    f"account {u.account} holds positions or reservations in {cap} symbols, "
                    f"the limit (server.max_symbols_per_account); params.symbol {u.symbol} "
                    "would be one more"
                )
        rec: dict[str, Any] = {
            "t": "pos",
            "a": u.account,
            "s": u.symbol,
            "q": fmt(u.qty),
            "p": fmt(u.price),
            "ts": now,
        }
        if u.seq is not None:
            rec["seq"] = u.seq
        if released:
            rec["rel"] = u.release
        self._apply_position(rec, u.qty, u.price)
        book = self.accounts[u.account]
        result: dict[str, Any] = {
            "account": u.account,
            "symbol": u.symbol,
            "qty": rec["q"],
            "price": rec["p"],
            "exposure": fmt(book.gross),
        }
        if released is not None:
            result["released"] = released
        self._check_thresholds(u.account, now, allow_auto_reduce=True)
        return result

    def _apply_position(self, rec: Mapping[str, Any], qty: Decimal, price: Decimal) -> None:
        account = rec["a"]
        book = self._book(account)
        seq = rec.get("seq")
        if seq is not None:
            last = book.seq
            if last is not None and seq != last + 1 and seq != last and not book.stale:
                book.stale = True
                self._alert(
                    AlertLevel.WARNING,
                    AlertCode.POSITION_SEQ_GAP,
                    f"account {account}: position seq {seq} after {last}; "
                    "validations rejected until position.snapshot",
                    rec["ts"],
                    account=account,
                    symbol=rec["s"],
                )
            book.seq = seq
        release = rec.get("rel")
        if release is not None:
            res = self.reservations.get(release)
            if res is not None:
                self._drop_reservation(res)
        book.known = True
        sym = book.positions.get(rec["s"])
        if sym is None:
            sym = book.positions[rec["s"]] = SymbolBook()
        sym.qty = qty
        sym.mark = price
        sym.reported = True
        if self._replaying:
            # Exposure is a function of the final qty, mark and reservations;
            # the cached exposure and the totals stay consistent with each other
            # until _reprice_replayed brings them in step. Everything that reads
            # them during a replay (reservations, snapshots) reprices its symbol.
            if not sym.reprice_due:
                sym.reprice_due = True
                self._reprice_due.append((book, sym))
        else:
            self._reprice(book, sym)
        if not self._replaying:  # _record and _event, without building what replay drops
            if not self._committed:
                self._records.append(rec)  # type: ignore[arg-type]
            self._events.append(ExposureChanged(account))

    @_exact
    def snapshot_positions(self, s: PositionSnapshot, now_ms: int | None = None) -> dict[str, Any]:
        """``position.snapshot``: replace every position of the account, clear stale.

        Raises ``ProtocolError(BAD_REQUEST)`` naming the cap when the account
        would hold more than ``max_symbols_per_account`` symbols (those named
        and those its live reservations hold); nothing changes then.
        """
        now = self._now(now_ms)
        self._expire_due(now)
        cap = self._max_symbols
        if cap is not None and len(s.positions) > cap - self._reserved_only(s):
            raise bad_request(
                f"params.positions would give account {s.account} positions or reservations "
                f"in more than {cap} symbols, the limit (server.max_symbols_per_account)"
            )
        entries = [(e.symbol, e.qty, e.price) for e in s.positions]
        wire = [[symbol, fmt(qty), fmt(price)] for symbol, qty, price in entries]
        rec: dict[str, Any] = {"t": "psnap", "a": s.account, "pos": wire, "ts": now}
        if s.seq is not None:
            rec["seq"] = s.seq
        self._apply_position_snapshot(rec, entries)
        book = self.accounts[s.account]
        self._check_thresholds(s.account, now, allow_auto_reduce=True)
        return {
            "account": s.account,
            "positions": [{"symbol": e[0], "qty": e[1], "price": e[2]} for e in wire],
            "exposure": fmt(book.gross),
        }

    def _reserved_only(self, s: PositionSnapshot) -> int:
        """Symbols of the account that only its live reservations will hold
        after snapshot ``s``: they count towards its symbols too."""
        book = self.accounts.get(s.account)
        if book is None or not book.reservations:
            return 0
        named = {e.symbol for e in s.positions}
        return sum(
            1
            for symbol, sym in book.positions.items()
            if symbol not in named and (sym.reserved_buy or sym.reserved_sell)
        )

    def _apply_position_snapshot(
        self,
        rec: Mapping[str, Any],
        entries: Iterable[tuple[str, Decimal, Decimal]] | None = None,
    ) -> None:
        """A ``psnap`` record; ``entries`` are its positions already read
        (the live path), else they are read from the record (replay)."""
        book = self._book(rec["a"])
        book.known = True
        named = set()
        if entries is None:
            entries = [(symbol, _d(qty), _d(price)) for symbol, qty, price in rec["pos"]]
        positions = book.positions
        reprice = self._reprice
        for symbol, qty, price in entries:
            named.add(symbol)
            sym = positions.get(symbol)
            if sym is None:
                sym = positions[symbol] = SymbolBook()
            sym.qty = qty
            sym.mark = price
            sym.reported = True
            reprice(book, sym)
        for symbol, sym in list(book.positions.items()):
            if symbol in named:
                continue
            if sym.reserved_buy or sym.reserved_sell:
                sym.qty = ZERO
                self._reprice(book, sym)
            else:
                self._reprice_to_zero(book, sym)
                del book.positions[symbol]
        book.stale = False
        if "seq" in rec:
            book.seq = rec["seq"]
        self._record(dict(rec))
        self._event(ExposureChanged(rec["a"]))

    def _reprice_to_zero(self, book: AccountBook, sym: SymbolBook) -> None:
        sym.qty = ZERO
        sym.mark = None
        self._reprice(book, sym)

    @_exact
    def update_price(self, u: PriceUpdate, now_ms: int | None = None) -> dict[str, Any]:
        """``price.update``: the reference price of a symbol, used by the price collar."""
        rec = {"t": "px", "s": u.symbol, "p": fmt(u.price), "ts": self._now(now_ms)}
        self.reference_prices[u.symbol] = u.price
        self._record(rec)
        return {"symbol": u.symbol, "price": rec["p"]}

    # ---------------------------------------------------------- reservations

    def _add_reservation(self, res: Reservation) -> None:
        book = self._book(res.account)
        book.known = True
        sym = book.positions.get(res.symbol)
        if sym is None:
            sym = book.positions[res.symbol] = SymbolBook()
        if sym.mark is None:
            # No position yet: value the reservation at the reference price if
            # one exists, else at the order's own price.
            sym.mark = self.reference_prices.get(res.symbol, res.price)
        if res.side == "buy":
            sym.reserved_buy += res.qty
        else:
            sym.reserved_sell += res.qty
        self._reprice(book, sym)
        self.reservations[res.id] = res
        book.reservations += 1
        if res.client_order_id is not None:
            self._by_client_order[(res.account, res.client_order_id)] = res.id
        heapq.heappush(self._expiry_heap, (res.expires_ms, res.id))

    def _drop_reservation(self, res: Reservation) -> None:
        del self.reservations[res.id]
        if res.client_order_id is not None:
            self._by_client_order.pop((res.account, res.client_order_id), None)
        book = self.accounts[res.account]
        book.reservations -= 1
        sym = book.positions[res.symbol]
        if res.side == "buy":
            sym.reserved_buy -= res.qty
        else:
            sym.reserved_sell -= res.qty
        if not sym.reported and not sym.reserved_buy and not sym.reserved_sell:
            self._reprice_to_zero(book, sym)
            del book.positions[res.symbol]
        else:
            self._reprice(book, sym)
        self._event(ExposureChanged(res.account))

    @_exact
    def release_reservation(
        self, reservation_id: str, why: str = "released", now_ms: int | None = None
    ) -> Reservation | None:
        """Free a live reservation; ``None`` if it does not exist (or already expired)."""
        now = self._now(now_ms)
        self._expire_due(now)
        res = self.reservations.get(reservation_id)
        if res is None:
            return None
        self._apply_record({"t": "rel", "id": reservation_id, "why": why, "ts": now})
        return res

    @_exact
    def set_cancel_on_disconnect(
        self, connection: int, enabled: bool, now_ms: int | None = None
    ) -> int:
        """``session.hello``'s ``cancel_on_disconnect`` for a live connection: it
        applies to every reservation the connection made, before the hello too
        (journaled, so recovery releases them as well). Returns how many
        reservations changed."""
        ids = [
            r.id
            for r in self.reservations.values()
            if r.connection == connection and r.cancel_on_disconnect is not enabled
        ]
        if ids:
            self._apply_record({"t": "cod", "ids": ids, "on": enabled, "ts": self._now(now_ms)})
        return len(ids)

    @_exact
    def release_connection(self, connection: int, now_ms: int | None = None) -> int:
        """Release every reservation a closed connection made with cancel_on_disconnect."""
        now = self._now(now_ms)
        owned = [
            r.id
            for r in self.reservations.values()
            if r.connection == connection and r.cancel_on_disconnect
        ]
        for rid in owned:
            self._apply_record({"t": "rel", "id": rid, "why": "disconnect", "ts": now})
        return len(owned)

    @_exact
    def expire_reservations(self, now_ms: int) -> None:
        """Release every reservation whose time is up (O(1) when none is)."""
        self._expire_due(now_ms)

    def _expire_due(self, now_ms: int) -> None:
        heap = self._expiry_heap
        while heap and heap[0][0] <= now_ms:
            expires, rid = heapq.heappop(heap)
            res = self.reservations.get(rid)
            if res is not None and res.expires_ms == expires:
                self._apply_record({"t": "rel", "id": rid, "why": "expired", "ts": now_ms})

    # ------------------------------------------------------------ validation

    @_exact
    def validate(
        self,
        order: OrderValidate,
        now_ms: int | None = None,
        *,
        connection: int | None = None,
        cancel_on_disconnect: bool = False,
    ) -> dict[str, Any]:
        """``order.validate``: the DECISION object. Check and reservation are one step."""
        now = self._clock() if now_ms is None else now_ms
        heap = self._expiry_heap
        if heap and heap[0][0] <= now:
            self._expire_due(now)
        account = order.account
        if order.client_order_id is not None:
            rid = self._by_client_order.get((account, order.client_order_id))
            if rid is not None:
                live = self.reservations[rid]
                _require_same_order(live, order)
                again = dict(live.decision)
                again["exposure"] = self._exposure_summary(self.accounts[account])
                return again
        book = self.accounts.get(account)
        if book is None:
            book = self._book(account)
        elif order.reserve:
            # Before anything changes (a new account holds nothing: no cap to pass).
            self._check_reservation_caps(book, order)
        recent = book.recent_orders
        recent.append(now)
        horizon = now - 1000
        while recent[0] <= horizon:
            recent.popleft()
        sym = book.positions.get(order.symbol)
        reference = self.reference_prices.get(order.symbol)
        if sym is None:
            p = b = s = ZERO
            worst_now = ZERO
        else:
            p, b, s = sym.qty, sym.reserved_buy, sym.reserved_sell
            worst_now = sym.worst()
            if reference is None and sym.reported:
                # No feed price yet: the account's own mark is its reference
                # (and never another account's).
                reference = sym.mark
        qty = order.qty
        if order.side == "buy":
            long_side = abs(p + b + qty)
            short_side = abs(p - s)
            reduces = p < 0 and qty + b <= -p
        else:
            long_side = abs(p + b)
            short_side = abs(p - s - qty)
            reduces = p > 0 and qty + s <= p
        worst_after = long_side if long_side >= short_side else short_side
        delta = (worst_after - worst_now) * order.price
        limits = self._limits
        check = OrderCheck(
            account=account,
            symbol=order.symbol,
            side=order.side,
            qty=qty,
            price=order.price,
            position=p,
            reserved_buy=b,
            reserved_sell=s,
            worst_after=worst_after,
            account_exposure_after=book.gross + delta,
            gateway_exposure_after=self.gross_exposure + delta,
            reduces=reduces,
            gateway_mode=self._enforced_gateway,
            account_mode=self._enforced_accounts.get(account, Mode.NORMAL),
            limits=limits,
            symbol_limits=limits.for_symbol(order.symbol),
            reference_price=reference,
            orders_last_second=len(recent),
            stale=book.stale,
        )
        reasons = []
        for rule in self.rules:
            failed = rule(check)
            if failed is not None:
                reasons.append({"code": str(failed[0]), "message": failed[1]})
        accepted = not reasons
        rec: dict[str, Any] = {
            "t": "dec",
            "a": account,
            "s": order.symbol,
            "side": order.side,
            "q": fmt(qty),
            "p": fmt(order.price),
            "d": "accept" if accepted else "reject",
            "r": [r["code"] for r in reasons] if reasons else [],
            "ts": now,
        }
        reservation_id = None
        expires_at = None
        if order.reserve:
            rec["reserve"] = True
            if order.client_order_id is not None:
                rec["coid"] = order.client_order_id
            if accepted:
                reservation_id = self._new_reservation_id()
                while reservation_id in self.reservations:  # pragma: no cover - 2**-64
                    reservation_id = self._new_reservation_id()
                expires_ms = now + limits.reservation_ttl_ms
                expires_at = format_time_ms(expires_ms)
                rec["rid"] = reservation_id
                rec["exp"] = expires_ms
                rec["ev"] = self.emergency_version
                rec["lv"] = self.limits_version
                if cancel_on_disconnect:
                    rec["cod"] = True
        decision = {
            "decision": rec["d"],
            "reasons": reasons,
            "reservation_id": reservation_id,
            "expires_at": expires_at,
            "exposure": None,
            "emergency_version": self.emergency_version,
            "limits_version": self.limits_version,
        }
        if reservation_id is not None:
            self._apply_decision(rec, decision, connection)
            # A reservation valued at its mark can cross 80% of a limit too.
            self._check_thresholds(account, now, allow_auto_reduce=False)
        else:
            self._record(rec)
        decision["exposure"] = self._exposure_summary(book)
        if not self._replaying:
            data = {
                **decision,
                "account": account,
                "symbol": order.symbol,
                "side": order.side,
                "qty": rec["q"],
                "price": rec["p"],
                "ts": format_time_ms(now),
            }
            self._events.append(DecisionMade(data))
        return decision

    def _check_reservation_caps(self, book: AccountBook, order: OrderValidate) -> None:
        """``BAD_REQUEST`` naming the cap when reserving would pass
        ``max_reservations_per_account`` or ``max_symbols_per_account``."""
        cap = self._max_reservations
        if cap is not None and book.reservations >= cap:
            raise bad_request(
                f"account {order.account} holds {book.reservations} live reservations, the "
                "limit (server.max_reservations_per_account); release some or wait for "
                "them to expire"
            )
        cap = self._max_symbols
        if cap is not None and order.symbol not in book.positions and len(book.positions) >= cap:
            raise bad_request(
                f"account {order.account} holds positions or reservations in {cap} symbols, "
                f"the limit (server.max_symbols_per_account); params.symbol {order.symbol} "
                "would be one more"
            )

    def _exposure_summary(self, book: AccountBook) -> dict[str, str]:
        return {
            "account": fmt(book.gross),
            "account_limit": self._limit_strings[0],
            "global": fmt(self.gross_exposure),
            "global_limit": self._limit_strings[1],
        }

    def _apply_decision(
        self,
        rec: Mapping[str, Any],
        decision: dict[str, Any] | None = None,
        connection: int | None = None,
    ) -> None:
        """A decision record; only an accepted reservation changes state."""
        # validate() opens the account's book (its rate window lives there), so
        # replay must too, or recovered STATE would lack accounts live STATE has.
        self._book(rec["a"])
        rid = rec.get("rid")
        if rid is not None and rid not in self.reservations:
            if decision is None:
                decision = _decision_from_record(rec)
            res = Reservation(
                id=rid,
                account=rec["a"],
                symbol=rec["s"],
                side=rec["side"],
                qty=_d(rec["q"]),
                price=_d(rec["p"]),
                expires_ms=rec["exp"],
                client_order_id=rec.get("coid"),
                cancel_on_disconnect=bool(rec.get("cod")),
                connection=connection,
                # A copy taken before the figures are filled in: a retry gets
                # current exposure, so the cache holds none (as after recovery).
                decision=dict(decision),
            )
            self._add_reservation(res)
            self._event(ExposureChanged(res.account))
        self._record(rec)  # type: ignore[arg-type]

    # ------------------------------------------------------- alerts on limits

    def _check_thresholds(
        self, account: str | None, now_ms: int, *, allow_auto_reduce: bool
    ) -> None:
        """Raise EXPOSURE_WARNING / EXPOSURE_BREACH on crossing, and auto-reduce."""
        if self._replaying:
            return
        limits = self._limits
        warning = self._warning_levels
        if warning[0] is not limits:
            warning = self._warning_levels = (
                limits,
                limits.max_account_exposure * _WARNING_FRACTION,
                limits.max_exposure * _WARNING_FRACTION,
            )
        accounts: Iterable[str] = self.accounts if account is None else (account,)
        for name in accounts:
            book = self.accounts[name]
            limit = limits.max_account_exposure
            over = book.gross > limit
            near = book.gross >= warning[1]
            if over and not book.breached:
                self._alert(
                    AlertLevel.CRITICAL,
                    AlertCode.EXPOSURE_BREACH,
                    f"account {name} gross exposure {fmt(book.gross)} over limit {fmt(limit)}",
                    now_ms,
                    account=name,
                )
            elif near and not over and not book.warned:
                self._alert(
                    AlertLevel.WARNING,
                    AlertCode.EXPOSURE_WARNING,
                    f"account {name} gross exposure {fmt(book.gross)} is 80% or more of "
                    f"limit {fmt(limit)}",
                    now_ms,
                    account=name,
                )
            book.breached = over
            book.warned = near
        limit = limits.max_exposure
        gross = self.gross_exposure
        over = gross > limit
        near = gross >= warning[2]
        if over and not self._gateway_breached:
            self._alert(
                AlertLevel.CRITICAL,
                AlertCode.EXPOSURE_BREACH,
                f"gateway gross exposure {fmt(gross)} over max_exposure {fmt(limit)}",
                now_ms,
            )
        elif near and not over and not self._gateway_warned:
            self._alert(
                AlertLevel.WARNING,
                AlertCode.EXPOSURE_WARNING,
                f"gateway gross exposure {fmt(gross)} is 80% or more of max_exposure {fmt(limit)}",
                now_ms,
            )
        self._gateway_breached = over
        self._gateway_warned = near
        if (
            over
            and allow_auto_reduce
            and limits.auto_reduce_on_breach
            and self._enforced_gateway is Mode.NORMAL
        ):
            self.stage(
                {
                    "t": "emg",
                    "a": None,
                    "m": Mode.REDUCING.value,
                    "r": f"gross exposure {fmt(gross)} over max_exposure {fmt(limit)}",
                    "by": GATEWAY_ACTOR,
                    "at": now_ms,
                    "v": self._next_version("emg", self.emergency_version),
                }
            )

    # ------------------------------------------------------------------ reads

    @_exact
    def state_view(
        self,
        accounts: Iterable[str] | None = None,
        readable: Callable[[str], bool] | None = None,
    ) -> dict[str, Any]:
        """The STATE object; ``accounts`` limits it (a trader sees only its own),
        ``readable`` the accounts of its EMERGENCY document (``emergency_view``)."""
        names = sorted(self.accounts) if accounts is None else sorted(accounts)
        emergency = self.emergency_view(readable)
        out: dict[str, Any] = {}
        for name in names:
            book = self.accounts.get(name)
            if book is None or not book.known:
                continue
            out[name] = {
                "positions": {
                    symbol: {"qty": fmt(sym.qty), "price": fmt(sym.mark)}
                    for symbol, sym in sorted(book.positions.items())
                    if sym.reported and sym.mark is not None
                },
                "gross_exposure": fmt(book.gross),
                "reserved_exposure": fmt(book.reserved),
                "stale": book.stale,
            }
        return {
            "emergency": emergency,
            "accounts": out,
            "gross_exposure": fmt(self.gross_exposure),
            "limits_version": self.limits_version,
        }

    @_exact
    def exposure_of(self, account: str) -> dict[str, Any]:
        """One ``exposure`` channel entry."""
        book = self.accounts.get(account)
        gross = ZERO if book is None else book.gross
        return {
            "account": account,
            "gross": fmt(gross),
            "limit": self._limit_strings[0],
            "global": fmt(self.gross_exposure),
            "global_limit": self._limit_strings[1],
        }

    @_exact
    def recompute_exposure(self) -> tuple[Decimal, dict[str, Decimal]]:
        """Gross exposure from scratch (gateway, per account): a check on the cache."""
        per_account: dict[str, Decimal] = {}
        for name, book in self.accounts.items():
            total = ZERO
            for sym in book.positions.values():
                if sym.mark is not None:
                    total += sym.worst() * sym.mark
            per_account[name] = total
        return sum(per_account.values(), ZERO), per_account

    # ------------------------------------------------------ records, snapshot

    @_exact
    def apply_record(self, rec: Mapping[str, Any]) -> None:
        """Apply one journal record (live changes and recovery share this path)."""
        self._apply_record(rec)

    def _apply_record(self, rec: Mapping[str, Any]) -> None:
        kind = rec["t"]
        if kind == "pos":
            self._apply_position(rec, _d(rec["q"]), _d(rec["p"]))
        elif kind == "psnap":
            self._apply_position_snapshot(rec)
        elif kind == "px":
            self.reference_prices[rec["s"]] = _d(rec["p"])
            self._record(dict(rec))
        elif kind == "dec":
            self._apply_decision(rec)
        elif kind == "rel":
            res = self.reservations.get(rec["id"])
            if res is not None:
                self._drop_reservation(res)
            self._record(dict(rec))
        elif kind == "emg":
            self._apply_emergency(rec)
        elif kind == "lim":
            self._apply_limits(rec)
        elif kind == "cod":
            enabled = bool(rec["on"])
            for rid in rec["ids"]:
                res = self.reservations.get(rid)
                if res is not None:
                    self.reservations[rid] = dataclasses.replace(res, cancel_on_disconnect=enabled)
            self._record(dict(rec))
        elif kind == "boot":
            self._record(dict(rec))
        else:
            raise ValueError(f"unknown journal record type {kind!r}")

    @_exact
    def apply_committed(self, rec: Mapping[str, Any]) -> None:
        """Apply a record the caller already made durable (changes away from
        safety are journaled first, applied second): events and alerts are
        produced, no journal record is queued again."""
        self._committed = True
        try:
            self._apply_record(rec)
        finally:
            self._committed = False

    @_exact
    def replay(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Apply recovered records without alerts, events or new records.

        Raises ``RecordNotApplied`` when one cannot be applied (a record this
        manager did not write); the state is then undefined: ``reset_state``
        and start over (``gateway.persistence.rebuild`` does, and finds which).
        """
        self._replaying = True
        count = 0
        try:
            apply = self._apply_record
            accounts = self.accounts
            due = self._reprice_due
            for rec in records:
                count += 1
                # The common record, a position update without seq or release,
                # inline: what _apply_position does for it during a replay.
                if rec["t"] != "pos" or "seq" in rec or "rel" in rec:
                    apply(rec)
                    continue
                book = accounts.get(rec["a"])
                if book is None:
                    book = self._book(rec["a"])
                book.known = True
                symbol = rec["s"]
                sym = book.positions.get(symbol)
                if sym is None:
                    sym = book.positions[symbol] = SymbolBook()
                sym.qty = _d(rec["q"])
                sym.mark = _d(rec["p"])
                sym.reported = True
                if not sym.reprice_due:
                    sym.reprice_due = True
                    due.append((book, sym))
            self._reprice_replayed()
        except Exception as exc:
            self._reprice_due = []
            raise RecordNotApplied(exc) from exc
        finally:
            self._replaying = False
        return count

    def _reprice_replayed(self) -> None:
        due, self._reprice_due = self._reprice_due, []
        for book, sym in due:
            sym.reprice_due = False
            self._reprice(book, sym)

    @_exact
    def snapshot(self) -> dict[str, Any]:
        """The whole durable state as one dict that ``load_snapshot`` reads.

        Built on the event loop, so it only collects: fresh containers with
        immutable leaves (str, int, ``Decimal``), which the journal encodes in
        its writer thread (``Decimal`` as ``str``, exactly).
        """
        return {
            "format": 1,
            "limits": self.limits.to_wire(),
            "limits_version": self.limits_version,
            "file_limits": self.file_limits,
            "emergency": {
                "gateway": _mode_to_record(self.gateway_mode),
                "accounts": {a: _mode_to_record(s) for a, s in self.account_modes.items()},
                "version": self.emergency_version,
            },
            "accounts": {
                name: {
                    "known": book.known,
                    "seq": book.seq,
                    "stale": book.stale,
                    "positions": [
                        [symbol, sym.qty, sym.mark]
                        for symbol, sym in book.positions.items()
                        if sym.reported and sym.mark is not None
                    ],
                    # Symbols held only by reservations keep the mark they were
                    # valued at, which the reference price may since have left.
                    "marks": {
                        symbol: sym.mark
                        for symbol, sym in book.positions.items()
                        if not sym.reported and sym.mark is not None
                    },
                }
                for name, book in self.accounts.items()
            },
            "prices": dict(self.reference_prices),
            "reservations": [
                {
                    "rid": r.id,
                    "a": r.account,
                    "s": r.symbol,
                    "side": r.side,
                    "q": r.qty,
                    "p": r.price,
                    "exp": r.expires_ms,
                    "coid": r.client_order_id,
                    "cod": r.cancel_on_disconnect,
                    "decision": r.decision,
                }
                for r in self.reservations.values()
            ],
            # Staged changes: in the journal up to the snapshot's seq (or about
            # to be), not yet published. Loading the snapshot publishes them,
            # so a snapshot taken while one waits for its fsync still holds it.
            "pending": list(self._staged),
        }

    @_exact
    def load_snapshot(self, snap: Mapping[str, Any]) -> None:
        """Replace the whole state with a ``snapshot()`` dict.

        Raises ``RecordNotApplied`` when it cannot be loaded (a snapshot this
        manager did not write); the state is then undefined (``reset_state``).
        """
        try:
            self._load_snapshot(snap)
        except Exception as exc:
            raise RecordNotApplied(exc) from exc

    def _load_snapshot(self, snap: Mapping[str, Any]) -> None:
        self._limits = Limits.from_mapping(snap["limits"], where="snapshot limits")
        self.limits_version = snap["limits_version"]
        self.file_limits = snap.get("file_limits")
        self._limit_strings = (
            fmt(self._limits.max_account_exposure),
            fmt(self._limits.max_exposure),
        )
        emergency = snap["emergency"]
        self.gateway_mode = _mode_from_record(emergency["gateway"])
        self.account_modes = {a: _mode_from_record(s) for a, s in emergency["accounts"].items()}
        self.emergency_version = emergency["version"]
        self._emergency_view = None
        self.accounts = {}
        self.gross_exposure = ZERO
        for name, data in snap["accounts"].items():
            book = self._book(name)
            book.known = data.get("known", True)
            book.seq = data["seq"]
            book.stale = data["stale"]
            for symbol, qty, price in data["positions"]:
                sym = book.positions[symbol] = SymbolBook(
                    qty=_d(qty), mark=_d(price), reported=True
                )
                self._reprice(book, sym)
            for symbol, mark in data.get("marks", {}).items():
                book.positions[symbol] = SymbolBook(mark=_d(mark))
        self.reference_prices = {s: _d(p) for s, p in snap["prices"].items()}
        self.reservations = {}
        self._by_client_order = {}
        self._expiry_heap = []
        self._replaying = True
        try:
            for r in snap["reservations"]:
                rec = dict(r)
                decision = rec.pop("decision")
                self._apply_decision(rec, decision)
        finally:
            self._replaying = False
        self._staged.clear()
        self._enforce()
        self._replaying = True
        try:
            for rec in snap.get("pending", ()):
                self._apply_record(rec)
        finally:
            self._replaying = False

    @_exact
    def release_orphaned_reservations(self, now_ms: int | None = None) -> int:
        """After a restart, reservations made with cancel_on_disconnect have lost
        their connection: release them, as a disconnect would have."""
        now = self._now(now_ms)
        orphaned = [r.id for r in self.reservations.values() if r.cancel_on_disconnect]
        for rid in orphaned:
            self._apply_record({"t": "rel", "id": rid, "why": "disconnect", "ts": now})
        return len(orphaned)

    # -------------------------------------------- the original embedding API

    async def validate_new_position(self, symbol: str, size: Any, price: Any) -> dict[str, Any]:
        """Original API: may the default account add ``size`` (signed) at ``price``?

        Returns ``{'status': 'success'}`` (the position is then recorded) or
        ``{'status': 'error', 'error': MESSAGE, 'code': CODE}``.
        """
        from gateway.embedded import validate_new_position

        return await validate_new_position(self, symbol, size, price)

    async def update_state(self, emergency_mode: bool, reason: str = "") -> None:
        """Original API: halt (True) or reopen (False) the gateway, durably."""
        from gateway.embedded import update_state

        await update_state(self, emergency_mode, reason)

    async def recover_state(self) -> None:
        """Original API: load the state directory (``emergency_state_file``).

        A missing directory starts ``normal``; a damaged one starts ``halted``.
        """
        from gateway.embedded import recover_state

        await recover_state(self)

    async def close(self) -> None:
        """Flush and close the embedded journal, if any (writes a snapshot)."""
        from gateway.embedded import close

        await close(self)

    async def __aenter__(self) -> EmergencyManager:
        await self.recover_state()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _require_same_order(live: Reservation, order: OrderValidate) -> None:
    """A repeat of a live ``client_order_id`` must be the same order; any other
    order under that id is refused (``CONFLICT`` naming the field), since it
    would be answered with a decision made for another order."""
    differs: tuple[str, str, str] | None = None
    if order.symbol != live.symbol:
        differs = ("symbol", order.symbol, live.symbol)
    elif order.side != live.side:
        differs = ("side", order.side, live.side)
    elif order.qty != live.qty:
        differs = ("qty", fmt(order.qty), fmt(live.qty))
    elif order.price != live.price:
        differs = ("price", fmt(order.price), fmt(live.price))
    elif not order.reserve:
        differs = ("reserve", "false", "true")
    if differs is not None:
        field, given, held = differs
        raise ProtocolError(
            ErrorCode.CONFLICT,
            f"params.client_order_id {live.client_order_id} belongs to live reservation "
            f"{live.id} of another order: params.{field} is {given}, the reserved order's "
            f"is {held}; use a new client_order_id",
        )


def filter_emergency(view: dict[str, Any], readable: Callable[[str], bool]) -> dict[str, Any]:
    """An EMERGENCY document whose ``accounts`` lists only the readable ones
    (``view`` itself when it lists no other)."""
    accounts = view["accounts"]
    if all(readable(account) for account in accounts):
        return view
    return {**view, "accounts": {a: s for a, s in accounts.items() if readable(a)}}


def _random_reservation_id() -> str:
    """``R`` and 16 random hex digits: ids tell nothing about other accounts'
    reservations (how many, or which one comes next)."""
    return "R" + secrets.token_hex(8)


def _mode_to_record(state: ModeState) -> dict[str, Any]:
    return {"m": state.mode.value, "r": state.reason, "by": state.actor, "at": state.since_ms}


def _mode_from_record(rec: Mapping[str, Any]) -> ModeState:
    return ModeState(mode=Mode(rec["m"]), reason=rec["r"], actor=rec["by"], since_ms=rec["at"])


def _decision_from_record(rec: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "decision": "accept",
        "reasons": [],
        "reservation_id": rec["rid"],
        "expires_at": format_time_ms(rec["exp"]),
        "exposure": None,
        "emergency_version": rec.get("ev"),
        "limits_version": rec.get("lv"),
    }


_LEGACY_KEYS = frozenset({"emergency_state_file", "state_dir", "fsync", "risk_manager", "account"})


def _limits_from_legacy(config: Mapping[str, Any]) -> Limits:
    """Limits from the original dict config: ``max_exposure`` plus any [limits] key.

    The original had one total limit, so ``max_account_exposure`` follows
    ``max_exposure`` unless given.
    """
    from gateway.config import ConfigError

    values = {k: v for k, v in config.items() if k not in _LEGACY_KEYS}
    if "max_exposure" in values and "max_account_exposure" not in values:
        values["max_account_exposure"] = values["max_exposure"]
    for key, value in list(values.items()):
        if isinstance(value, Decimal):
            values[key] = str(value)
    try:
        return Limits.from_mapping(values, where="config")
    except ProtocolError as exc:
        raise ConfigError(exc.message) from None
