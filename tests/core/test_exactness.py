"""Every value the codec accepts is computed with exactly, in every combination.

PROTOCOL section 3: a 32-digit quantity at a 32-digit price beside a position
of ``0.000000000000000000000000000001`` never rounds and never fails in the
engine, and a snapshot holding such values loads again. (Over a real
gateway: tests/e2e/test_exactness.py.)
"""

from __future__ import annotations

import itertools
from decimal import Decimal, localcontext

from gateway.core.engine import RiskEngine
from gateway.core.limits import Limits
from protocol.messages import OrderValidate, PositionUpdate
from tests.builders import T0

# The extremes a decimal string of at most 32 characters can hold.
HUGE = "9" * 32
TINY = "0." + "0" * 29 + "1"
NEG_TINY = "-0." + "0" * 28 + "1"
EXTREMES = [HUGE, "-" + "9" * 31, TINY, NEG_TINY, "1", "0"]
PRICES = [HUGE, TINY, "1"]


def _unbounded() -> Limits:
    huge = Decimal(HUGE)
    return Limits(
        max_exposure=huge,
        max_account_exposure=huge,
        max_position=huge,
        max_order_qty=huge,
        max_order_notional=huge,
        price_collar=huge,
        max_orders_per_second=1_000_000,
        # 32 nines at 32 nines is over any limit the protocol can express.
        auto_reduce_on_breach=False,
    )


def _exact(*terms: tuple[str, str]) -> Decimal:
    """The sum of |qty| * price, worked out with digits to spare."""
    with localcontext() as ctx:
        ctx.prec = 1000
        return sum((abs(Decimal(q)) * Decimal(p) for q, p in terms), Decimal(0))


def _update(account: str, symbol: str, qty: str, price: str) -> PositionUpdate:
    return PositionUpdate(
        account=account,
        symbol=symbol,
        qty=Decimal(qty),
        price=Decimal(price),
        seq=None,
        release=None,
    )


def test_engine_when_huge_and_tiny_positions_meet_then_exposure_is_exact() -> None:
    m = RiskEngine(limits=_unbounded(), now_ms=T0)
    terms: list[tuple[str, str]] = []
    for i, (qty, price) in enumerate(itertools.product(EXTREMES, PRICES)):
        symbol = f"S{i}"
        result = m.update_position(_update("A1", symbol, qty, price), T0)
        terms.append((qty, price))
        assert Decimal(result["exposure"]) == _exact(*terms), (qty, price)
    assert Decimal(m.state_view()["gross_exposure"]) == _exact(*terms)
    # An order of the largest quantity at the largest price, beside all that.
    order = OrderValidate(
        account="A1",
        symbol="NEW",
        side="buy",
        qty=Decimal(HUGE),
        price=Decimal(HUGE),
        reserve=True,
        client_order_id=None,
    )
    decision = m.validate(order, T0)
    assert decision.decision == "accept" or decision.reasons, decision
    expected = _exact(*terms, (HUGE, HUGE))
    if decision.decision == "accept":
        assert Decimal(decision.exposure["account"]) == expected


def test_engine_when_state_holds_the_extremes_then_snapshot_and_replay_restore_it() -> None:
    m = RiskEngine(limits=_unbounded(), now_ms=T0)
    m.update_position(_update("A1", "BIG", HUGE, HUGE), T0)
    m.update_position(_update("A1", "TINY", TINY, TINY), T0)
    m.update_position(_update("B1", "TINY", NEG_TINY, HUGE), T0)
    records = m.drain_records()
    from_snapshot = RiskEngine(limits=_unbounded(), now_ms=T0)
    from_snapshot.load_snapshot(m.snapshot())
    from_records = RiskEngine(limits=_unbounded(), now_ms=T0)
    from_records.replay(records)
    assert from_snapshot.state_view() == m.state_view()
    assert from_records.state_view() == m.state_view()
    assert Decimal(m.state_view()["gross_exposure"]) == _exact(
        (HUGE, HUGE), (TINY, TINY), (NEG_TINY, HUGE)
    )


def test_snapshot_when_it_holds_extremes_then_loads() -> None:
    m = RiskEngine(limits=_unbounded(), now_ms=T0)
    m.update_position(_update("A1", "BIG", HUGE, HUGE), T0)
    m.update_position(_update("A1", "TINY", TINY, TINY), T0)
    m.drain_records()
    snap = m.snapshot()
    fresh = RiskEngine(limits=_unbounded(), now_ms=T0)
    # The start-up path (Store.open) loads snapshots through load_snapshot.
    fresh.load_snapshot(snap)  # raised decimal.Inexact before
    assert fresh.state_view()["gross_exposure"] == m.state_view()["gross_exposure"]
