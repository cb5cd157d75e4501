"""The pre-trade checks of PROTOCOL section 6, each at its boundary.

Every test drives a real ``RiskEngine`` with small limits, the time passed
explicitly, and looks only at what a client sees: the decision's
``decision`` and ``reasons`` (codes and messages carrying the figures).
"""

from __future__ import annotations

import contextvars
import decimal
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway.core import context as context_module
from gateway.core.context import install_risk_context
from gateway.core.engine import RiskEngine
from gateway.core.events import AlertRaised
from gateway.core.rules import OrderCheck, RuleResult
from gateway.rules import load_rule
from protocol.codes import Mode
from protocol.messages import (
    EmergencySet,
    OrderValidate,
    PositionEntry,
    PositionSnapshot,
    PositionUpdate,
    PriceUpdate,
)
from protocol.values import RISK_CONTEXT, format_decimal
from tests.builders import T0, Clock, accepted, codes, engine, order, reasons, update
from tests.conftest import BIG_PRICE, BIG_QTY, unbounded_limits


def manager(limits: dict[str, Any] | None = None, **kwargs: Any) -> RiskEngine:
    return engine(limits, **kwargs)


def position(
    m: RiskEngine,
    qty: str | int,
    price: str | int = 100,
    *,
    account: str = "A1",
    symbol: str = "X",
    seq: int | None = None,
    now: int = T0,
) -> None:
    m.update_position(update(qty, price, account=account, symbol=symbol, seq=seq), now)


def halt(
    m: RiskEngine, mode: Mode = Mode.HALTED, account: str | None = None, now: int = T0
) -> None:
    m.set_emergency(EmergencySet(mode=mode, reason="test", account=account), "ops", now)


# ---------------------------------------------------------------- emergency


def test_validate_when_gateway_halted_then_emergency_halted() -> None:
    m = manager()
    assert accepted(m.validate(order(), T0))
    halt(m)
    assert reasons(m.validate(order(), T0)) == [("EMERGENCY_HALTED", "the gateway is halted")]
    # A sell that would reduce a position is refused too: halted means nothing trades.
    position(m, 5)
    assert codes(m.validate(order("sell", 1), T0)) == ["EMERGENCY_HALTED"]


def test_validate_when_gateway_reopened_then_accepted_again() -> None:
    m = manager()
    halt(m)
    m.set_emergency(EmergencySet(mode=Mode.NORMAL, reason=""), "ops", T0)
    assert accepted(m.validate(order(), T0))


def test_validate_when_account_halted_then_account_halted_only_for_that_account() -> None:
    m = manager()
    halt(m, account="A1")
    assert reasons(m.validate(order(account="A1"), T0)) == [
        ("ACCOUNT_HALTED", "account A1 is halted")
    ]
    assert accepted(m.validate(order(account="A2"), T0))


# ----------------------------------------------------------------- reducing


def test_validate_when_reducing_and_sell_brings_long_exactly_flat_then_accepted() -> None:
    m = manager()
    position(m, 5)
    halt(m, Mode.REDUCING)
    assert accepted(m.validate(order("sell", 5), T0))


def test_validate_when_reducing_and_sell_just_crosses_zero_then_reduce_only_with_figures() -> None:
    m = manager()
    position(m, 5)
    halt(m, Mode.REDUCING)
    assert reasons(m.validate(order("sell", "5.01"), T0)) == [
        (
            "REDUCE_ONLY",
            "the gateway is reducing: sell 5.01 with 0 pending on the same side "
            "does not strictly reduce position 5",
        )
    ]


def test_validate_when_account_reducing_and_buy_adds_then_reduce_only_naming_account() -> None:
    m = manager()
    position(m, -3)
    halt(m, Mode.REDUCING, account="A1")
    assert accepted(m.validate(order("buy", 3), T0))
    assert reasons(m.validate(order("buy", 4), T0)) == [
        (
            "REDUCE_ONLY",
            "account A1 is reducing: buy 4 with 0 pending on the same side "
            "does not strictly reduce position -3",
        )
    ]


# ----------------------------------------------------------------- exposure


def test_validate_when_gateway_exposure_equals_limit_then_accepted_and_just_over_rejected() -> None:
    m = manager({"max_exposure": "1000"})
    position(m, 4, account="A2")  # 400 of another account counts towards the gateway
    assert accepted(m.validate(order("buy", 6), T0))
    assert reasons(m.validate(order("buy", "6.01"), T0)) == [
        ("MAX_EXPOSURE", "gross exposure would be 1001, limit 1000")
    ]


def test_validate_when_account_exposure_equals_limit_then_accepted_and_just_over_rejected() -> None:
    m = manager({"max_account_exposure": "800"})
    position(m, 3)
    position(m, 50, account="A2")  # other accounts do not count against A1's limit
    assert accepted(m.validate(order("buy", 5), T0))
    assert reasons(m.validate(order("buy", "5.01"), T0)) == [
        ("MAX_ACCOUNT_EXPOSURE", "account A1 gross exposure would be 801, limit 800")
    ]


def test_validate_when_exposure_is_at_the_orders_own_price_then_figures_use_it() -> None:
    m = manager({"max_exposure": "1000"})
    position(m, 5, 100)  # 500
    # 5 more at 101 adds 505, not 500: the order's own price.
    assert reasons(m.validate(order("buy", 5, 101), T0)) == [
        ("MAX_EXPOSURE", "gross exposure would be 1005, limit 1000")
    ]


# ----------------------------------------------------------------- position


def test_validate_when_position_equals_max_position_then_accepted_and_just_over_rejected() -> None:
    m = manager({"max_position": "10"})
    position(m, 2)
    assert accepted(m.validate(order("buy", 8), T0))
    assert reasons(m.validate(order("buy", 10), T0)) == [
        ("MAX_POSITION", "position would be 12, limit 10")
    ]


def test_validate_when_short_grows_past_max_position_then_rejected_by_absolute_value() -> None:
    m = manager({"max_position": "10"})
    position(m, -4)
    assert accepted(m.validate(order("sell", 6), T0))
    assert reasons(m.validate(order("sell", 7), T0)) == [
        ("MAX_POSITION", "position would be 11, limit 10")
    ]


def test_validate_when_reserved_buys_pending_then_max_position_counts_them() -> None:
    m = manager({"max_position": "10"})
    assert accepted(m.validate(order("buy", 6, reserve=True), T0))
    assert accepted(m.validate(order("buy", 4), T0))
    assert reasons(m.validate(order("buy", 5), T0)) == [
        ("MAX_POSITION", "position would be 11, limit 10")
    ]


# -------------------------------------------------------------- order size


def test_validate_when_qty_equals_max_order_qty_then_accepted_and_just_over_rejected() -> None:
    m = manager({"max_order_qty": "5"})
    assert accepted(m.validate(order("buy", 5), T0))
    assert reasons(m.validate(order("sell", "5.5"), T0)) == [
        ("MAX_ORDER_QTY", "order quantity 5.5, limit 5")
    ]


def test_validate_when_notional_equals_limit_then_accepted_and_just_over_rejected() -> None:
    m = manager({"max_order_notional": "1000"})
    assert accepted(m.validate(order("buy", 10, 100), T0))
    assert reasons(m.validate(order("buy", "10", "100.1"), T0)) == [
        ("MAX_ORDER_NOTIONAL", "order notional 1001, limit 1000")
    ]


def test_validate_when_order_reduces_then_order_size_limits_still_apply() -> None:
    m = manager({"max_order_qty": "5"})
    position(m, 10)
    assert codes(m.validate(order("sell", 6), T0)) == ["MAX_ORDER_QTY"]


# ------------------------------------------------------------------ collar


@pytest.mark.parametrize(("price", "ok"), [("110", True), ("110.01", False), ("90", True)])
def test_validate_when_price_at_collar_edge_then_equal_accepted_and_beyond_rejected(
    price: str, ok: bool
) -> None:
    m = manager({"price_collar": "0.10"})
    m.update_price(PriceUpdate(symbol="X", price=Decimal(100)), T0)
    decision = m.validate(order("buy", 1, price), T0)
    assert accepted(decision) is ok
    if not ok:
        assert reasons(decision) == [
            ("PRICE_COLLAR", f"price {price} is more than 10% from reference 100")
        ]


def test_validate_when_price_below_collar_then_rejected() -> None:
    m = manager({"price_collar": "0.10"})
    m.update_price(PriceUpdate(symbol="X", price=Decimal(100)), T0)
    assert reasons(m.validate(order("sell", 1, "89.99"), T0)) == [
        ("PRICE_COLLAR", "price 89.99 is more than 10% from reference 100")
    ]


def test_validate_when_no_reference_price_then_no_collar() -> None:
    m = manager({"price_collar": "0.10"})
    assert accepted(m.validate(order("buy", 1, 1_000_000, symbol="NEW"), T0))


def test_validate_when_reference_comes_from_position_update_then_collar_uses_it() -> None:
    m = manager({"price_collar": "0.05"})
    position(m, 1, 200)  # the account's own mark is its reference while no feed price exists
    assert accepted(m.validate(order("buy", 1, 210), T0))
    assert reasons(m.validate(order("buy", 1, 211), T0)) == [
        ("PRICE_COLLAR", "price 211 is more than 5% from reference 200")
    ]
    # ... and never another account's.
    assert accepted(m.validate(order("buy", 1, 211, account="A2"), T0))


def test_validate_when_price_update_follows_position_then_latest_reference_wins() -> None:
    m = manager({"price_collar": "0.10"})
    position(m, 1, 100)
    m.update_price(PriceUpdate(symbol="X", price=Decimal(200)), T0)
    assert codes(m.validate(order("buy", 1, 100), T0)) == ["PRICE_COLLAR"]
    assert accepted(m.validate(order("buy", 1, 200), T0))


# ------------------------------------------------------------- restricted


def test_validate_when_symbol_restricted_then_rejected_and_others_not() -> None:
    m = manager({"restricted_symbols": ["BAD"]})
    assert reasons(m.validate(order(symbol="BAD"), T0)) == [
        ("RESTRICTED_SYMBOL", "symbol BAD is restricted")
    ]
    assert accepted(m.validate(order(symbol="X"), T0))


# --------------------------------------------------------------- rate limit


def test_validate_when_more_than_max_orders_per_second_then_rate_limited_until_next_second() -> (
    None
):
    clock = Clock()
    m = manager({"max_orders_per_second": 3}, now_ms=clock.now)
    for _ in range(3):
        assert accepted(m.validate(order(), clock.now))
    assert reasons(m.validate(order(), clock.now)) == [
        ("RATE_LIMITED", "account A1 sent 4 validations in the last second, limit 3")
    ]
    # Other accounts have their own budget.
    assert accepted(m.validate(order(account="A2"), clock.now))
    clock.now += 999
    assert codes(m.validate(order(), clock.now)) == ["RATE_LIMITED"]
    clock.now = T0 + 2000
    assert accepted(m.validate(order(), clock.now))


def test_validate_when_now_is_passed_explicitly_then_rate_window_follows_it() -> None:
    m = manager({"max_orders_per_second": 1})
    assert accepted(m.validate(order(), T0))
    assert codes(m.validate(order(), T0 + 500)) == ["RATE_LIMITED"]
    assert accepted(m.validate(order(), T0 + 1600))


# -------------------------------------------------------------------- stale


def test_validate_when_seq_gap_then_stale_positions_until_snapshot() -> None:
    m = manager()
    position(m, 1, seq=10)
    position(m, 2, seq=11)
    assert accepted(m.validate(order(), T0))
    m.drain_events()
    position(m, 3, seq=13)  # 12 is missing
    alerts = [e.alert for e in m.drain_events() if isinstance(e, AlertRaised)]
    assert [a["code"] for a in alerts] == ["POSITION_SEQ_GAP"]
    assert alerts[0]["account"] == "A1"
    assert reasons(m.validate(order(), T0)) == [
        (
            "STALE_POSITIONS",
            "positions of account A1 are stale after a sequence gap; send position.snapshot",
        )
    ]
    position(m, 4, seq=14)  # in sequence again, but still stale: only a snapshot clears it
    assert codes(m.validate(order(), T0)) == ["STALE_POSITIONS"]
    assert accepted(m.validate(order(account="A2"), T0))
    assert m.state_view()["accounts"]["A1"]["stale"] is True
    m.snapshot_positions(
        PositionSnapshot(
            account="A1",
            positions=(PositionEntry(symbol="X", qty=Decimal(4), price=Decimal(100)),),
            seq=15,
        ),
        T0,
    )
    assert m.state_view()["accounts"]["A1"]["stale"] is False
    assert accepted(m.validate(order(), T0))
    position(m, 5, seq=16)
    assert accepted(m.validate(order(), T0))


def test_position_update_when_seq_repeats_then_not_stale() -> None:
    m = manager()
    position(m, 1, seq=1)
    position(m, 1, seq=1)  # a replayed update is harmless
    position(m, 2, seq=2)
    assert accepted(m.validate(order(), T0))


# ---------------------------------------------------------- symbol overrides


def test_validate_when_symbol_override_then_it_replaces_global_only_for_that_symbol() -> None:
    m = manager(
        {
            "max_position": "10",
            "max_order_qty": "10",
            "max_order_notional": "100000",
            "symbols": {"BTC": {"max_position": "2", "max_order_qty": "1"}},
        }
    )
    assert reasons(m.validate(order("buy", 3, symbol="BTC"), T0)) == [
        ("MAX_POSITION", "position would be 3, limit 2"),
        ("MAX_ORDER_QTY", "order quantity 3, limit 1"),
    ]
    assert accepted(m.validate(order("buy", 1, symbol="BTC"), T0))
    # Other symbols keep the global values, in both directions of the override.
    assert accepted(m.validate(order("buy", 10, symbol="ETH"), T0))
    assert codes(m.validate(order("buy", 11, symbol="ETH"), T0)) == [
        "MAX_POSITION",
        "MAX_ORDER_QTY",
    ]


def test_validate_when_symbol_override_is_looser_then_symbol_gets_more_room() -> None:
    m = manager(
        {
            "max_order_notional": "100",
            "price_collar": "0.01",
            "symbols": {"ETH": {"max_order_notional": "1000", "price_collar": "0.5"}},
        }
    )
    m.update_price(PriceUpdate(symbol="ETH", price=Decimal(100)), T0)
    m.update_price(PriceUpdate(symbol="X", price=Decimal(100)), T0)
    assert accepted(m.validate(order("buy", 6, 150, symbol="ETH"), T0))
    assert reasons(m.validate(order("buy", 6, 150, symbol="X"), T0)) == [
        ("MAX_ORDER_NOTIONAL", "order notional 900, limit 100"),
        ("PRICE_COLLAR", "price 150 is more than 1% from reference 100"),
    ]


def test_validate_when_override_leaves_a_key_out_then_global_value_applies() -> None:
    m = manager({"max_order_qty": "3", "symbols": {"BTC": {"max_position": "100"}}})
    assert codes(m.validate(order("buy", 4, symbol="BTC"), T0)) == ["MAX_ORDER_QTY"]


# ------------------------------------------------------------ all failures


def test_validate_when_several_checks_fail_then_every_one_is_listed_in_order() -> None:
    m = manager(
        {
            "max_exposure": "100",
            "max_account_exposure": "100",
            "max_position": "1",
            "max_order_qty": "1",
            "max_order_notional": "100",
            "price_collar": "0.1",
            "restricted_symbols": ["X"],
            "max_orders_per_second": 1,
        }
    )
    m.update_price(PriceUpdate(symbol="X", price=Decimal(10)), T0)
    assert accepted(m.validate(order("buy", 1, 10, symbol="Y"), T0))
    position(m, 1, seq=1, symbol="Y")
    position(m, 1, seq=5, symbol="Y")  # gap: stale
    halt(m)
    halt(m, account="A1")
    decision = m.validate(order("buy", 2, 100), T0)
    assert decision.decision == "reject"
    assert codes(decision) == [
        "EMERGENCY_HALTED",
        "ACCOUNT_HALTED",
        "MAX_EXPOSURE",
        "MAX_ACCOUNT_EXPOSURE",
        "MAX_POSITION",
        "MAX_ORDER_QTY",
        "MAX_ORDER_NOTIONAL",
        "PRICE_COLLAR",
        "RESTRICTED_SYMBOL",
        "RATE_LIMITED",
        "STALE_POSITIONS",
    ]
    assert decision.reservation_id is None
    assert decision.expires_at is None


def test_validate_when_reducing_and_over_limits_then_reduce_only_and_limits_both_listed() -> None:
    m = manager({"max_position": "3"})
    halt(m, Mode.REDUCING)
    assert codes(m.validate(order("buy", 4), T0)) == ["REDUCE_ONLY", "MAX_POSITION"]


# ------------------------------------------------------------- custom rules


def test_validate_when_custom_rule_fails_then_its_code_and_message_are_listed() -> None:
    seen: list[OrderCheck] = []

    def no_odd_lots(check: OrderCheck) -> RuleResult:
        seen.append(check)
        if check.qty % 100:
            return "ODD_LOT", f"quantity {check.qty} is not a multiple of 100"
        return None

    m = manager({"max_order_qty": "150"}, rules=[no_odd_lots])
    assert accepted(m.validate(order("buy", 100, 1), T0))
    decision = m.validate(order("buy", 250, 1), T0)
    assert reasons(decision) == [
        ("MAX_ORDER_QTY", "order quantity 250, limit 150"),
        ("ODD_LOT", "quantity 250 is not a multiple of 100"),
    ]
    # The rule saw the order as the built-in rules do.
    assert seen[-1].account == "A1"
    assert seen[-1].worst_after == Decimal(250)


def test_validate_when_custom_rule_rejects_a_reserve_then_nothing_is_reserved() -> None:
    m = manager(rules=[lambda check: ("DESK", "desk closed")])
    decision = m.validate(order("buy", 5, reserve=True), T0)
    assert reasons(decision) == [("DESK", "desk closed")]
    assert decision.reservation_id is None
    assert m.state_view()["gross_exposure"] == "0"


def test_desk_rule_when_it_changes_the_installed_context_then_later_math_stays_exact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(context_module, "_installed", None)  # restored afterwards
    qty, price, limits = BIG_QTY, BIG_PRICE, unbounded_limits()

    def careless(check: OrderCheck) -> RuleResult:
        context = decimal.getcontext()
        context.prec = 6
        context.traps[decimal.Inexact] = False
        return None

    def in_gateway_process() -> tuple[decimal.Context, list[str]]:
        installed = install_risk_context()
        manager = RiskEngine(limits=limits, rules=[careless], now_ms=T0)
        manager.update_position(PositionUpdate(account="A1", symbol="X", qty=qty, price=price), T0)
        exposures = []
        for _ in range(2):
            decision = manager.validate(
                OrderValidate(account="A1", symbol="X", side="buy", qty=qty, price=price), T0
            )
            exposures.append(decision.exposure["account"])
        return installed, exposures

    installed, exposures = contextvars.copy_context().run(in_gateway_process)
    with decimal.localcontext(RISK_CONTEXT):
        exact = format_decimal(qty * price)
    assert exposures == [exact, exact]
    assert installed.prec == RISK_CONTEXT.prec
    assert installed.traps[decimal.Inexact]


def test_load_rule_when_module_raises_on_import_then_value_error_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "desk_broken.py").write_text("raise RuntimeError('no config for desk 7')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"desk_broken.*no config for desk 7"):
        load_rule("desk_broken:check")
