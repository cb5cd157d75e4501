"""Exact decimals over a real gateway (PROTOCOL section 3).

A 32-digit quantity at a 32-digit price beside a position of
``0.000000000000000000000000000001`` never answers ``INTERNAL``, and nothing
the gateway wrote can stop it from starting. (The engine's own exactness:
tests/core/test_exactness.py.)
"""

from __future__ import annotations

from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any

from gateway.config import Limits
from tests.conftest import TRADER, GatewayFactory

# Extremes a decimal string of at most 32 characters can hold.
HUGE = "9" * 32
TINY = "0." + "0" * 29 + "1"


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
