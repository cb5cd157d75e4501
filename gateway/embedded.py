"""The original embedding API of ``EmergencyManager``, on the journal.

``validate_new_position(symbol, size, price)`` asks for the default account
(``config["account"]``, else ``"default"``): a positive ``size`` buys, a
negative one sells. The order is reserved in the same step as the check, then
the pluggable ``risk_manager`` (if any) is awaited, then the fill is recorded
and the reservation released in one step; a rejection, an exception or a
cancellation in between releases the reservation. So concurrent calls can
never together pass a limit, which the original design allowed.

State lives in the directory named by ``state_dir`` (or, for compatibility,
``emergency_state_file``). Without either, the manager keeps state in memory.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from gateway.manager import EmergencyManager
from gateway.persistence import Store
from protocol.codes import Mode, Reason
from protocol.errors import ProtocolError, bad_request
from protocol.messages import EmergencySet, OrderValidate, PositionUpdate
from protocol.values import parse_decimal

LIBRARY_ACTOR = "library"
DEFAULT_ACCOUNT = "default"


def _store(manager: EmergencyManager) -> Store | None:
    store: Store | None = manager._embedded
    return store


def _state_dir(manager: EmergencyManager) -> Path | None:
    config = manager.config
    path = config.get("state_dir") or config.get("emergency_state_file")
    return None if path is None else Path(path)


async def recover_state(manager: EmergencyManager) -> None:
    if _store(manager) is not None:
        return
    state_dir = _state_dir(manager)
    if state_dir is None:
        return
    store = Store(
        manager, state_dir, clock=manager._clock, fsync=manager.config.get("fsync", "always")
    )
    store.open()
    manager._embedded = store
    # A library host owns no long-lived task: the journal runs without one.
    await store.start_inline()


async def _ensure_recovered(manager: EmergencyManager) -> Store | None:
    if _store(manager) is None and _state_dir(manager) is not None:
        # Never decide on state that was not read yet.
        await recover_state(manager)
    return _store(manager)


async def _commit(manager: EmergencyManager, *, synced: bool = False) -> None:
    store = await _ensure_recovered(manager)
    if store is None:
        manager.drain_records()
        return
    seq = store.commit()
    if synced:
        await store.synced(seq)
    else:
        await store.durable(seq)


def _error(message: str, code: str) -> dict[str, Any]:
    return {"status": "error", "error": message, "code": code}


async def validate_new_position(
    manager: EmergencyManager, symbol: str, size: Any, price: Any
) -> dict[str, Any]:
    await _ensure_recovered(manager)
    try:
        signed = parse_decimal(_plain(size), "size")
        order_price = parse_decimal(_plain(price), "price", positive=True)
        if not signed:
            raise bad_request("size must not be 0")
    except ProtocolError as exc:
        return _error(exc.message, exc.code.value)
    account = str(manager.config.get("account", DEFAULT_ACCOUNT))
    order = OrderValidate(
        account=account,
        symbol=symbol,
        side="buy" if signed > 0 else "sell",
        qty=abs(signed),
        price=order_price,
        reserve=True,
    )
    decision = manager.validate(order)
    if decision["decision"] != "accept":
        await _commit(manager)
        first = decision["reasons"][0]
        message = "; ".join(r["message"] for r in decision["reasons"])
        return _error(message, first["code"])
    rid = decision["reservation_id"]
    committed = False
    try:
        await _commit(manager)
        checker = manager.risk_manager
        if checker is not None:
            verdict = checker.validate_position(symbol, signed, order_price)
            if inspect.isawaitable(verdict):
                verdict = await verdict
            if not verdict:
                return _error("rejected by the risk manager", Reason.CUSTOM_RULE.value)
        book = manager.accounts[account].positions.get(symbol)
        current = book.qty if book is not None else 0
        manager.update_position(
            PositionUpdate(
                account=account,
                symbol=symbol,
                qty=current + signed,
                price=order_price,
                release=rid,
            )
        )
        committed = True
        await _commit(manager)
        return {"status": "success"}
    finally:
        if not committed:
            manager.release_reservation(rid, "rejected")
            await _commit(manager)


def _plain(value: Any) -> Any:
    # The original took floats; keep accepting Decimal and int as they are.
    return str(value) if not isinstance(value, int | float | str) else value


async def update_state(manager: EmergencyManager, emergency_mode: bool, reason: str) -> None:
    await _ensure_recovered(manager)
    mode = Mode.HALTED if emergency_mode else Mode.NORMAL
    if mode is Mode.HALTED and not reason.strip():
        raise ValueError("a reason is required to enter emergency mode")
    request = EmergencySet(mode=mode, reason=reason)
    record = manager.prepare_emergency(request, LIBRARY_ACTOR)
    if record is None:
        return
    # Towards safety enforced at once, away from it only once durable; the
    # mode and its version change once the record is fsynced (or at once
    # without a state directory).
    manager.stage(record)
    await _commit(manager, synced=True)


async def close(manager: EmergencyManager) -> None:
    store = _store(manager)
    if store is not None:
        await store.close()
        manager._embedded = None
