"""Builders shared by the engine's tests: an engine with limits, orders,
position updates, mode changes, and reading a decision the way a client does.

The engine has no clock: every call takes the time. Tests pass ``T0`` (or a
``Clock``'s ``now`` when time moves).
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Literal

from gateway.core.engine import RiskEngine
from gateway.core.events import AlertRaised, Decision
from gateway.core.limits import Limits
from gateway.core.views import AlertView
from protocol.codes import Mode
from protocol.messages import EmergencySet, OrderValidate, PositionUpdate

T0 = 1_700_000_000_000


class Clock:
    """A time the test moves by hand (``clock.now += 1000``)."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def engine(
    limits: Mapping[str, Any] | Limits | None = None, *, now_ms: int = T0, **kwargs: Any
) -> RiskEngine:
    """An engine started at ``now_ms`` with ``limits`` (a ``[limits]`` table or
    ``Limits``; default limits when None); ``kwargs`` go to ``RiskEngine``."""
    if not isinstance(limits, Limits):
        limits = Limits.from_mapping(limits or {})
    return RiskEngine(limits=limits, now_ms=now_ms, **kwargs)


def order(
    side: Literal["buy", "sell"] = "buy",
    qty: str | int = 1,
    price: str | int = 100,
    *,
    account: str = "A1",
    symbol: str = "X",
    reserve: bool = False,
    client_order_id: str | None = None,
) -> OrderValidate:
    return OrderValidate(
        account=account,
        symbol=symbol,
        side=side,
        qty=Decimal(qty),
        price=Decimal(price),
        reserve=reserve,
        client_order_id=client_order_id,
    )


def update(
    qty: str | int,
    price: str | int = 100,
    *,
    account: str = "A1",
    symbol: str = "X",
    seq: int | None = None,
    release: str | None = None,
) -> PositionUpdate:
    return PositionUpdate(
        account=account,
        symbol=symbol,
        qty=Decimal(qty),
        price=Decimal(price),
        seq=seq,
        release=release,
    )


def emergency(mode: Mode, *, account: str | None = None, reason: str | None = None) -> EmergencySet:
    """A mode change; the reason defaults to ``test MODE`` (none for normal)."""
    if reason is None:
        reason = "" if mode is Mode.NORMAL else f"test {mode.value}"
    return EmergencySet(mode=mode, reason=reason, account=account)


def codes(decision: Decision) -> list[str]:
    return [r["code"] for r in decision.reasons]


def reasons(decision: Decision) -> list[tuple[str, str]]:
    return [(r["code"], r["message"]) for r in decision.reasons]


def accepted(decision: Decision) -> bool:
    """Whether accepted; an accept lists no reason and a reject at least one."""
    assert decision.accepted == (not decision.reasons)
    return decision.accepted


def gross(m: RiskEngine, account: str | None = None) -> str:
    """The gross exposure STATE shows (gateway-wide, or ``account``'s)."""
    state = m.state_view()
    if account is None:
        return state["gross_exposure"]
    return state["accounts"][account]["gross_exposure"]


def alerts(m: RiskEngine) -> list[AlertView]:
    """The alerts queued since the last drain (drains every event)."""
    return [e.alert for e in m.drain_events() if isinstance(e, AlertRaised)]


def assert_cache_matches_recompute(m: RiskEngine) -> None:
    total, per_account = m.recompute_exposure()
    assert m.gross_exposure == total
    for name, book in m.accounts.items():
        assert book.gross == per_account[name], name
