"""``EmergencyManager``: the original embedding API, over a ``RiskEngine``.

``validate_new_position(symbol, size, price)`` asks for the default account
(``config["account"]``, else ``"default"``): a positive ``size`` buys, a
negative one sells. The order is reserved in the same step as the check, then
the pluggable ``risk_manager`` (if any) is awaited, then the fill is recorded
and the reservation released in one step; a rejection, an exception or a
cancellation in between releases the reservation. So concurrent calls can
never together pass a limit, which the original design allowed.

State lives in the directory named by ``state_dir`` (or, for compatibility,
``emergency_state_file``), journaled like the server's. Without either, the
manager keeps state in memory.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, NotRequired, Protocol, TypedDict

from gateway.core.engine import RiskEngine
from gateway.core.limits import ConfigError, Limits
from gateway.core.rules import Rule
from gateway.persistence import FsyncPolicy, Store
from protocol.codes import Mode, Reason
from protocol.errors import ProtocolError, bad_request
from protocol.messages import EmergencySet, OrderValidate, PositionUpdate
from protocol.values import parse_decimal

LIBRARY_ACTOR = "library"
DEFAULT_ACCOUNT = "default"


class RiskChecker(Protocol):
    """The original pluggable risk manager: may ``symbol`` add ``size`` (signed)
    at ``price``? Sync or async."""

    def validate_position(
        self, symbol: str, size: Decimal, price: Decimal
    ) -> bool | Awaitable[bool]: ...


class PositionVerdict(TypedDict):
    """``{"status": "success"}``, or ``{"status": "error", "error": MESSAGE,
    "code": CODE}`` with a protocol reason code."""

    status: str
    error: NotRequired[str]
    code: NotRequired[str]


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class EmergencyManager:
    """The seed's library API; ``engine`` is the risk core it runs on.

    ``config`` is the original dict: ``max_exposure`` (which
    ``max_account_exposure`` follows unless given), any ``[limits]`` key,
    ``state_dir`` / ``emergency_state_file``, ``fsync``, ``account`` and
    ``risk_manager``; ``limits`` replaces the limits it would give. ``rules``
    are extra checks. ``clock`` returns milliseconds since the epoch (the
    time every decision is made at). The other arguments are the engine's.
    Raises ``ConfigError`` naming a wrong key.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        *,
        limits: Limits | None = None,
        rules: Sequence[Rule] = (),
        risk_manager: RiskChecker | None = None,
        clock: Callable[[], int] | None = None,
        reservation_ids: Callable[[], str] | None = None,
        max_symbols_per_account: int | None = None,
        max_reservations_per_account: int | None = None,
    ) -> None:
        self.config: dict[str, Any] = dict(config or {})
        self._clock = clock or _wall_clock_ms
        self.risk_manager: RiskChecker | None = (
            risk_manager if risk_manager is not None else self.config.get("risk_manager")
        )
        self._engine = RiskEngine(
            limits=limits if limits is not None else limits_from_config(self.config),
            now_ms=self._clock(),
            rules=rules,
            reservation_ids=reservation_ids,
            max_symbols_per_account=max_symbols_per_account,
            max_reservations_per_account=max_reservations_per_account,
        )
        self._store: Store | None = None

    @property
    def engine(self) -> RiskEngine:
        """The risk engine: its views (``state_view``, ``emergency_view``) are
        for reading; change state through this class's methods only, or the
        changes are not journaled."""
        return self._engine

    def is_emergency_mode_active(self) -> bool:
        """True while the gateway-wide mode is not ``normal``."""
        return self._engine.is_emergency_mode_active()

    async def validate_new_position(self, symbol: str, size: Any, price: Any) -> PositionVerdict:
        """May the default account add ``size`` (signed) at ``price``?

        Returns ``{'status': 'success'}`` (the position is then recorded) or
        ``{'status': 'error', 'error': MESSAGE, 'code': CODE}``. What the risk
        manager raises propagates, with nothing held or recorded.
        """
        await self._recovered()
        try:
            signed = parse_decimal(_plain(size), "size")
            order_price = parse_decimal(_plain(price), "price", positive=True)
            if not signed:
                raise bad_request("size must not be 0")
        except ProtocolError as exc:
            return _error(exc.message, exc.code.value)
        engine = self._engine
        account = str(self.config.get("account", DEFAULT_ACCOUNT))
        order = OrderValidate(
            account=account,
            symbol=symbol,
            side="buy" if signed > 0 else "sell",
            qty=abs(signed),
            price=order_price,
            reserve=True,
        )
        decision = engine.validate(order, self._clock())
        rid = decision.reservation_id
        if rid is None:  # rejected: an accepted reserving order holds a reservation
            await self._commit()
            message = "; ".join(r["message"] for r in decision.reasons)
            return _error(message, decision.reasons[0]["code"])
        committed = False
        try:
            await self._commit()
            checker = self.risk_manager
            if checker is not None:
                verdict = checker.validate_position(symbol, signed, order_price)
                if inspect.isawaitable(verdict):
                    verdict = await verdict
                if not verdict:
                    return _error("rejected by the risk manager", Reason.CUSTOM_RULE.value)
            book = engine.accounts[account].positions.get(symbol)
            current = book.qty if book is not None else 0
            fill = PositionUpdate(
                account=account,
                symbol=symbol,
                qty=current + signed,
                price=order_price,
                release=rid,
            )
            engine.update_position(fill, self._clock())
            committed = True
            await self._commit()
            return {"status": "success"}
        finally:
            if not committed:
                engine.release_reservation(rid, "rejected", self._clock())
                await self._commit()

    async def update_state(self, emergency_mode: bool, reason: str = "") -> None:
        """Halt (True) or reopen (False) the gateway, durably.

        When it takes effect is ``gateway.core.modes``'s table: a halt is
        enforced at once, a reopening only once its record is durable; the
        mode and its version change once the record is fsynced (at once
        without a state directory). Raises ``ValueError`` for a halt without
        a reason.
        """
        await self._recovered()
        mode = Mode.HALTED if emergency_mode else Mode.NORMAL
        if mode is Mode.HALTED and not reason.strip():
            raise ValueError("a reason is required to enter emergency mode")
        request = EmergencySet(mode=mode, reason=reason)
        record = self._engine.prepare_emergency(request, LIBRARY_ACTOR, self._clock())
        if record is None:
            return
        self._engine.stage(record)
        await self._commit(synced=True)

    async def recover_state(self) -> None:
        """Load the state directory (``state_dir`` or ``emergency_state_file``).

        A missing directory starts ``normal``; a damaged one starts ``halted``.
        Raises ``StateDirLocked`` when another process holds the directory.
        """
        if self._store is not None:
            return
        state_dir = self._state_dir()
        if state_dir is not None:
            fsync = self.config.get("fsync", "always")
            self._store = await _open_store(self._engine, state_dir, fsync, self._clock)

    async def close(self) -> None:
        """Flush and close the state directory's journal, if any (writes a snapshot)."""
        store, self._store = self._store, None
        if store is not None:
            await store.close()

    async def __aenter__(self) -> EmergencyManager:
        await self.recover_state()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _state_dir(self) -> Path | None:
        path = self.config.get("state_dir") or self.config.get("emergency_state_file")
        return None if path is None else Path(path)

    async def _recovered(self) -> None:
        if self._store is None and self._state_dir() is not None:
            # Never decide on state that was not read yet.
            await self.recover_state()

    async def _commit(self, *, synced: bool = False) -> None:
        """Journal what the engine queued; return once durable (``synced``:
        fsynced, whatever the fsync policy)."""
        await self._recovered()
        # No fan-out here: the events a gateway would push are dropped, or
        # they would pile up for the life of the host process.
        self._engine.drain_events()
        if self._store is None:
            self._engine.drain_records()
        else:
            await _persist(self._store, synced=synced)


# The store, in one place: how it is opened and how a commit waits.


async def _open_store(
    engine: RiskEngine, state_dir: Path, fsync: object, clock: Callable[[], int]
) -> Store:
    if fsync not in _FSYNC_POLICIES:
        raise ValueError(f"fsync must be one of always, interval, never, not {fsync!r}")
    store = Store(engine, state_dir, fsync=_FSYNC_POLICIES[fsync], clock=clock)
    store.open()
    # A library host owns no long-lived task: the journal runs without one.
    await store.start_inline()
    return store


async def _persist(store: Store, *, synced: bool) -> None:
    seq = store.commit()
    if synced:
        await store.synced(seq)
    else:
        await store.durable(seq)


def _error(message: str, code: str) -> PositionVerdict:
    return {"status": "error", "error": message, "code": code}


def _plain(value: Any) -> Any:
    # The original took floats; keep accepting Decimal and int as they are.
    return str(value) if not isinstance(value, int | float | str) else value


_FSYNC_POLICIES: dict[object, FsyncPolicy] = {
    "always": "always",
    "interval": "interval",
    "never": "never",
}
_LEGACY_KEYS = frozenset({"emergency_state_file", "state_dir", "fsync", "risk_manager", "account"})


def limits_from_config(config: Mapping[str, Any]) -> Limits:
    """Limits from the original dict config: ``max_exposure`` plus any [limits] key.

    The original had one total limit, so ``max_account_exposure`` follows
    ``max_exposure`` unless given. Raises ``ConfigError`` naming a wrong key.
    """
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
