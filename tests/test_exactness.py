"""Every value the codec accepts is computed with exactly, in every combination.

PROTOCOL section 3: a 32-digit quantity at a 32-digit price beside a position
of ``0.000000000000000000000000000001`` never rounds, never fails and never
answers ``INTERNAL``; and nothing the gateway wrote can stop it from starting.
"""

from __future__ import annotations

import itertools
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any

from gateway.config import Limits
from gateway.manager import EmergencyManager
from gateway.persistence import Store
from protocol.messages import OrderValidate, PositionUpdate
from tests.conftest import TRADER, GatewayFactory

T0 = 1_700_000_000_000
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


def test_manager_when_huge_and_tiny_positions_meet_then_exposure_is_exact() -> None:
    m = EmergencyManager(limits=_unbounded(), clock=lambda: T0)
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
    assert decision["decision"] == "accept" or decision["reasons"], decision
    expected = _exact(*terms, (HUGE, HUGE))
    if decision["decision"] == "accept":
        assert Decimal(decision["exposure"]["account"]) == expected


def test_manager_when_state_holds_the_extremes_then_snapshot_and_replay_restore_it() -> None:
    m = EmergencyManager(limits=_unbounded(), clock=lambda: T0)
    m.update_position(_update("A1", "BIG", HUGE, HUGE), T0)
    m.update_position(_update("A1", "TINY", TINY, TINY), T0)
    m.update_position(_update("B1", "TINY", NEG_TINY, HUGE), T0)
    records = m.drain_records()
    from_snapshot = EmergencyManager(limits=_unbounded(), clock=lambda: T0)
    from_snapshot.load_snapshot(m.snapshot())
    from_records = EmergencyManager(limits=_unbounded(), clock=lambda: T0)
    from_records.replay(records)
    assert from_snapshot.state_view() == m.state_view()
    assert from_records.state_view() == m.state_view()
    assert Decimal(m.state_view()["gross_exposure"]) == _exact(
        (HUGE, HUGE), (TINY, TINY), (NEG_TINY, HUGE)
    )


async def _restart_state(
    make_gateway: GatewayFactory, state_dir: Path, **kwargs: Any
) -> dict[str, Any]:
    gw = await make_gateway(state_dir=state_dir, **kwargs)
    admin = await gw.client()
    return await admin.ok("state.get")


async def test_trader_when_big_then_tiny_update_then_both_acknowledged_and_restart_works(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    # The reproduction: qty and price of 32 nines for BIG, then 1e-30 for TINY.
    state_dir = tmp_path / "state"
    gw = await make_gateway(
        state_dir=state_dir, limits=_unbounded().to_wire(), persistence={"snapshot_every": 2}
    )
    trader = await gw.client(TRADER)
    big = await trader.ok(
        "position.update", {"account": "A1", "symbol": "BIG", "qty": HUGE, "price": HUGE}
    )
    tiny = await trader.ok(
        "position.update", {"account": "A1", "symbol": "TINY", "qty": TINY, "price": TINY}
    )
    assert Decimal(big["exposure"]) == _exact((HUGE, HUGE))
    assert Decimal(tiny["exposure"]) == _exact((HUGE, HUGE), (TINY, TINY))
    # Another account's requests go on as before.
    other = await trader.ok(
        "position.update", {"account": "A2", "symbol": "X", "qty": "1", "price": "10"}
    )
    assert other["exposure"] == "10"
    before = await trader.ok("state.get")
    await gw.gateway.stop()
    after = await _restart_state(make_gateway, state_dir, limits=_unbounded().to_wire())
    assert after["emergency"]["mode"] == "normal", after["emergency"]
    assert after["accounts"] == before["accounts"]
    assert after["gross_exposure"] == before["gross_exposure"]


def test_store_when_snapshot_holds_extremes_then_reopens(tmp_path: Path) -> None:
    m = EmergencyManager(limits=_unbounded(), clock=lambda: T0)
    m.update_position(_update("A1", "BIG", HUGE, HUGE), T0)
    m.update_position(_update("A1", "TINY", TINY, TINY), T0)
    m.drain_records()
    snap = m.snapshot()
    fresh = EmergencyManager(limits=_unbounded(), clock=lambda: T0)
    fresh.load_snapshot(snap)  # raised decimal.Inexact before
    assert fresh.state_view()["gross_exposure"] == m.state_view()["gross_exposure"]
    assert Store  # the start-up path (Store.open) loads snapshots through load_snapshot
