"""``RiskEngine``: exposure, reducing mode, emergency state, reservations,
limits, and recovery of the same state from snapshots and journal records.

Plain sync tests, the time passed explicitly; everything asserted is visible
to a client (DECISION, STATE, EMERGENCY, alerts) or to the journal (records).
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from gateway.core.engine import RiskEngine
from gateway.core.events import AlertRaised, ModeChanged
from gateway.core.limits import Limits
from gateway.core.views import EmergencyView, PositionResult
from protocol.codes import ErrorCode, Mode
from protocol.errors import ProtocolError
from protocol.messages import (
    EmergencySet,
    PositionEntry,
    PositionSnapshot,
    PositionUpdate,
    PriceUpdate,
)
from protocol.values import format_time_ms
from tests.builders import (
    T0,
    Clock,
    alerts,
    assert_cache_matches_recompute,
    codes,
    emergency,
    engine,
    gross,
    order,
    update,
)


def position(
    m: RiskEngine,
    qty: str | int,
    price: str | int = 100,
    *,
    account: str = "A1",
    symbol: str = "X",
    release: str | None = None,
    now: int = T0,
) -> PositionResult:
    return m.update_position(
        update(qty, price, account=account, symbol=symbol, release=release), now
    )


def set_mode(
    m: RiskEngine,
    mode: Mode,
    *,
    account: str | None = None,
    actor: str = "ops",
    now: int = T0,
) -> EmergencyView:
    return m.set_emergency(emergency(mode, account=account), actor, now)


# ----------------------------------------------------------- gross exposure


def test_gross_exposure_when_spec_example_then_700_and_a_buy_of_1_makes_800() -> None:
    m = engine()
    position(m, 5, 100, symbol="X")
    position(m, -2, 100, symbol="Y")
    assert gross(m) == "700"
    decision = m.validate(order("buy", 1, 100, symbol="X", reserve=True), T0)
    assert decision.decision == "accept"
    assert decision.exposure["account"] == "800"
    assert decision.exposure["global"] == "800"
    assert gross(m) == "800"


def test_validate_when_spec_example_then_limit_of_800_accepts_and_799_rejects() -> None:
    for limit, outcome in (("800", "accept"), ("799", "reject")):
        m = engine({"max_exposure": limit})
        position(m, 5, 100, symbol="X")
        position(m, -2, 100, symbol="Y")
        assert m.validate(order("buy", 1, 100, symbol="X"), T0).decision == outcome


def test_gross_exposure_when_long_and_short_then_counted_gross_not_netted() -> None:
    m = engine()
    position(m, 10, 100, symbol="X")
    position(m, -10, 100, symbol="Y")
    assert gross(m, "A1") == "2000"
    position(m, -10, 100, symbol="X", account="A2")
    assert gross(m, "A2") == "1000"
    assert gross(m) == "3000"
    assert_cache_matches_recompute(m)


def test_gross_exposure_when_position_updated_then_absolute_not_delta() -> None:
    m = engine()
    position(m, 5, 100)
    result = position(m, 5, 100)  # a replayed update changes nothing
    assert result == {"account": "A1", "symbol": "X", "qty": "5", "price": "100", "exposure": "500"}
    position(m, 2, 110)
    assert gross(m) == "220"
    position(m, 0, 110)
    assert gross(m) == "0"
    assert m.state_view()["accounts"]["A1"]["positions"] == {"X": {"qty": "0", "price": "110"}}


def test_gross_exposure_when_decimals_then_exact() -> None:
    m = engine()
    position(m, "0.1", "0.1", symbol="X")
    position(m, "0.2", "0.1", symbol="Y")
    assert gross(m) == "0.03"
    assert m.gross_exposure == Decimal("0.03")


def test_snapshot_positions_when_symbol_left_out_then_it_is_dropped() -> None:
    m = engine()
    position(m, 5, 100, symbol="X")
    position(m, 3, 100, symbol="Y")
    result = m.snapshot_positions(
        PositionSnapshot(
            account="A1",
            positions=(PositionEntry(symbol="Y", qty=Decimal(-1), price=Decimal(50)),),
        ),
        T0,
    )
    assert result == {
        "account": "A1",
        "positions": [{"symbol": "Y", "qty": "-1", "price": "50"}],
        "exposure": "50",
    }
    assert m.state_view()["accounts"]["A1"]["positions"] == {"Y": {"qty": "-1", "price": "50"}}
    assert gross(m) == "50"


# ------------------------------------------------------------ reducing mode


def test_validate_when_reducing_and_account_flat_then_cannot_open_either_side() -> None:
    m = engine()
    set_mode(m, Mode.REDUCING)
    assert codes(m.validate(order("buy", 1), T0)) == ["REDUCE_ONLY"]
    assert codes(m.validate(order("sell", 1), T0)) == ["REDUCE_ONLY"]


def test_validate_when_reducing_and_long_then_cannot_flip_short_but_may_sell_to_flat() -> None:
    m = engine()
    position(m, 5)
    set_mode(m, Mode.REDUCING)
    assert codes(m.validate(order("sell", 6), T0)) == ["REDUCE_ONLY"]
    assert codes(m.validate(order("buy", 1), T0)) == ["REDUCE_ONLY"]
    assert m.validate(order("sell", 5), T0).decision == "accept"
    assert m.validate(order("sell", "0.5"), T0).decision == "accept"


def test_validate_when_reducing_and_short_then_may_buy_back_to_flat_only() -> None:
    m = engine()
    position(m, -4)
    set_mode(m, Mode.REDUCING)
    assert m.validate(order("buy", 4), T0).decision == "accept"
    assert codes(m.validate(order("buy", 5), T0)) == ["REDUCE_ONLY"]
    assert codes(m.validate(order("sell", 1), T0)) == ["REDUCE_ONLY"]


def test_validate_when_reducing_and_same_side_reservation_pending_then_counted() -> None:
    m = engine()
    position(m, 5)
    set_mode(m, Mode.REDUCING)
    first = m.validate(order("sell", 3, reserve=True), T0)
    assert first.decision == "accept"
    decision = m.validate(order("sell", 3), T0)
    assert codes(decision) == ["REDUCE_ONLY"]
    assert "with 3 pending on the same side" in decision.reasons[0]["message"]
    assert m.validate(order("sell", 2), T0).decision == "accept"
    m.release_reservation(first.reservation_id, "released", T0)
    assert m.validate(order("sell", 3), T0).decision == "accept"


def test_validate_when_order_reduces_then_never_rejected_for_exposure_or_position() -> None:
    m = engine(
        {
            "max_exposure": "1000",
            "max_account_exposure": "1000",
            "max_position": "10",
            "auto_reduce_on_breach": False,
        }
    )
    position(m, 20, 100)  # a fact: 2000, twice every limit
    assert m.validate(order("sell", 5, 100), T0).decision == "accept"
    assert m.validate(order("sell", 20, 100), T0).decision == "accept"
    # Crossing zero does not reduce, so the limits apply again.
    assert codes(m.validate(order("sell", 21, 100), T0)) == [
        "MAX_EXPOSURE",
        "MAX_ACCOUNT_EXPOSURE",
        "MAX_POSITION",
    ]
    assert codes(m.validate(order("buy", 1, 100), T0)) == [
        "MAX_EXPOSURE",
        "MAX_ACCOUNT_EXPOSURE",
        "MAX_POSITION",
    ]


def test_validate_when_short_reduces_while_over_limits_then_accepted() -> None:
    m = engine({"max_exposure": "100", "max_position": "1", "auto_reduce_on_breach": False})
    position(m, -30, 10)
    assert m.validate(order("buy", 30, 10, reserve=True), T0).decision == "accept"


# ----------------------------------------------------- account-level modes


def test_validate_when_account_halted_then_other_accounts_trade() -> None:
    m = engine()
    set_mode(m, Mode.HALTED, account="A7")
    assert codes(m.validate(order(account="A7"), T0)) == ["ACCOUNT_HALTED"]
    assert m.validate(order(account="A1"), T0).decision == "accept"
    assert m.is_emergency_mode_active() is False
    view = m.emergency_view()
    assert view["mode"] == "normal"
    assert view["accounts"]["A7"]["mode"] == "halted"
    assert view["accounts"]["A7"]["reason"] == "test halted"


def test_validate_when_account_reducing_then_other_accounts_may_open() -> None:
    m = engine()
    set_mode(m, Mode.REDUCING, account="A7")
    assert codes(m.validate(order(account="A7"), T0)) == ["REDUCE_ONLY"]
    assert m.validate(order(account="A1"), T0).decision == "accept"


def test_set_emergency_when_account_set_back_to_normal_then_removed_from_view() -> None:
    m = engine()
    set_mode(m, Mode.HALTED, account="A7")
    view = set_mode(m, Mode.NORMAL, account="A7")
    assert view["accounts"] == {}
    assert m.validate(order(account="A7"), T0).decision == "accept"


# ---------------------------------------------------------- emergency state


def test_set_emergency_when_real_change_then_version_up_by_one_with_actor_and_time() -> None:
    clock = Clock()
    m = engine(now_ms=clock.now)
    assert m.emergency_view()["version"] == 0
    clock.now = T0 + 1234
    view = set_mode(m, Mode.HALTED, actor="ops-admin", now=clock.now)
    assert view == {
        "mode": "halted",
        "reason": "test halted",
        "actor": "ops-admin",
        "since": format_time_ms(T0 + 1234),
        "version": 1,
        "accounts": {},
    }
    assert m.is_emergency_mode_active() is True
    assert set_mode(m, Mode.REDUCING, account="A7", actor="desk", now=clock.now)["version"] == 2
    assert m.emergency_view()["accounts"]["A7"]["actor"] == "desk"
    assert set_mode(m, Mode.NORMAL, actor="boss", now=clock.now)["version"] == 3
    assert m.emergency_view()["actor"] == "boss"
    assert m.is_emergency_mode_active() is False


def test_set_emergency_when_mode_unchanged_then_nothing_changes() -> None:
    m = engine()
    set_mode(m, Mode.HALTED)
    set_mode(m, Mode.HALTED, account="A7")
    m.drain_records()
    m.drain_events()
    before = m.emergency_view()
    again = m.set_emergency(EmergencySet(mode=Mode.HALTED, reason="other reason"), "someone", T0)
    assert again == before
    assert again["version"] == 2
    assert again["reason"] == "test halted"
    assert m.prepare_emergency(EmergencySet(mode=Mode.HALTED, reason="x"), "a", T0) is None
    set_mode(m, Mode.HALTED, account="A7")
    set_mode(m, Mode.NORMAL, account="A8")  # already normal: no change either
    assert m.drain_records() == []
    assert m.drain_events() == []
    assert m.emergency_view()["version"] == 2


def test_set_emergency_when_halting_then_critical_alert_and_emergency_push() -> None:
    m = engine()
    set_mode(m, Mode.HALTED, actor="ops")
    events = m.drain_events()
    pushes = [e.view for e in events if isinstance(e, ModeChanged)]
    assert [p["mode"] for p in pushes] == ["halted"]
    raised = [e.alert for e in events if isinstance(e, AlertRaised)]
    assert [(a["level"], a["code"]) for a in raised] == [("critical", "EMERGENCY_CHANGED")]
    assert "normal -> halted by ops: test halted" in raised[0]["message"]


# ------------------------------------------------------------- reservations


def test_reserve_when_buy_and_sell_both_pending_then_worst_case_not_netted_nor_summed() -> None:
    m = engine()
    buy = m.validate(order("buy", 5, 100, reserve=True), T0)
    sell = m.validate(order("sell", 5, 100, reserve=True), T0)
    assert buy.decision == sell.decision == "accept"
    assert buy.reservation_id != sell.reservation_id
    assert gross(m) == "500"
    account = m.state_view()["accounts"]["A1"]
    assert account["reserved_exposure"] == "500"
    assert account["positions"] == {}  # reservations are not positions
    assert_cache_matches_recompute(m)


def test_reserve_when_accepted_then_holds_exposure_and_answers_id_and_expiry() -> None:
    m = engine({"reservation_ttl_ms": 2500})
    position(m, 2, 100)
    decision = m.validate(order("buy", 3, 100, reserve=True), T0)
    assert decision.reservation_id is not None
    assert decision.expires_at == format_time_ms(T0 + 2500)
    assert decision.exposure["account"] == "500"
    state = m.state_view()["accounts"]["A1"]
    assert state["gross_exposure"] == "500"
    assert state["reserved_exposure"] == "300"


def test_reserve_when_not_requested_then_nothing_held() -> None:
    m = engine()
    decision = m.validate(order("buy", 3, 100), T0)
    assert decision.decision == "accept"
    assert decision.reservation_id is None
    assert decision.expires_at is None
    assert gross(m) == "0"


def test_release_when_reservation_released_then_exposure_back_and_second_release_false() -> None:
    m = engine()
    position(m, 1, 100)
    rid = m.validate(order("buy", 4, 100, reserve=True), T0).reservation_id
    assert gross(m) == "500"
    released = m.release_reservation(rid, "released", T0)
    assert released is not None and released.id == rid
    assert gross(m) == "100"
    assert m.release_reservation(rid, "released", T0) is None
    assert m.release_reservation("R999", "released", T0) is None


def test_position_update_when_release_names_reservation_then_fill_replaces_it() -> None:
    m = engine()
    rid = m.validate(order("buy", 5, 100, reserve=True), T0).reservation_id
    result = position(m, 5, 100, release=rid)
    assert result["released"] is True
    assert result["exposure"] == "500"  # the fill, not fill plus reservation
    assert gross(m) == "500"
    assert m.release_reservation(rid, "released", T0) is None
    # Released already: the fill is refused and changes nothing.
    with pytest.raises(ProtocolError) as info:
        position(m, 6, 100, release=rid)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert gross(m) == "500"


def test_position_update_when_release_names_other_accounts_reservation_then_bad_request() -> None:
    m = engine()
    rid = m.validate(order("buy", 5, 100, reserve=True, account="A2"), T0).reservation_id
    with pytest.raises(ProtocolError) as info:
        position(m, 5, 100, release=rid)
    assert info.value.code is ErrorCode.BAD_REQUEST
    # Worded as for an unknown id: nothing about the other account leaks.
    with pytest.raises(ProtocolError) as unknown:
        position(m, 5, 100, release="R-unknown")
    assert info.value.message.replace(rid, "ID") == unknown.value.message.replace("R-unknown", "ID")
    assert gross(m, "A2") == "500"
    assert "A1" not in m.state_view()["accounts"]


def test_reserve_when_ttl_passes_then_expired_and_exposure_freed() -> None:
    clock = Clock()
    m = engine({"reservation_ttl_ms": 1000, "max_exposure": "500"}, now_ms=clock.now)
    first = m.validate(order("buy", 5, 100, reserve=True), clock.now)
    assert first.decision == "accept"
    clock.now = T0 + 999
    assert codes(m.validate(order("buy", 1, 100, reserve=True), clock.now)) == ["MAX_EXPOSURE"]
    m.expire_reservations(clock.now)
    assert gross(m) == "500"
    clock.now = T0 + 1000
    m.expire_reservations(clock.now)
    assert gross(m) == "0"
    assert m.release_reservation(first.reservation_id, "released", clock.now) is None
    records = m.drain_records()
    assert records[-1]["t"] == "rel"
    assert records[-1]["why"] == "expired"


def test_validate_when_ttl_passed_then_expired_reservation_frees_room_first() -> None:
    clock = Clock()
    m = engine({"reservation_ttl_ms": 1000, "max_exposure": "500"}, now_ms=clock.now)
    assert m.validate(order("buy", 5, 100, reserve=True), clock.now).decision == "accept"
    clock.now = T0 + 1000
    assert m.validate(order("buy", 5, 100, reserve=True), clock.now).decision == "accept"
    assert gross(m) == "500"


def test_reserve_when_client_order_id_repeated_then_same_reservation_and_nothing_new() -> None:
    m = engine({"max_exposure": "1000"})
    first = m.validate(order("buy", 6, 100, reserve=True, client_order_id="c1"), T0)
    m.drain_records()
    again = m.validate(order("buy", 6, 100, reserve=True, client_order_id="c1"), T0)
    assert again.decision == "accept"
    assert again.reservation_id == first.reservation_id
    assert again.expires_at == first.expires_at
    assert gross(m) == "600"
    assert m.drain_records() == []
    # Another account's order with the same id is its own order.
    other = m.validate(order("buy", 1, 100, reserve=True, client_order_id="c1", account="A2"), T0)
    assert other.reservation_id != first.reservation_id
    assert gross(m) == "700"


def test_reserve_when_client_order_id_reused_after_release_then_new_reservation() -> None:
    m = engine()
    first = m.validate(order("buy", 1, 100, reserve=True, client_order_id="c1"), T0)
    m.release_reservation(first.reservation_id, "released", T0)
    second = m.validate(order("buy", 1, 100, reserve=True, client_order_id="c1"), T0)
    assert second.decision == "accept"
    assert second.reservation_id != first.reservation_id
    assert gross(m) == "100"


def test_release_connection_when_closed_then_only_its_cancel_on_disconnect_reservations_go() -> (
    None
):
    m = engine()
    cod = m.validate(
        order("buy", 1, 100, reserve=True), T0, connection=1, cancel_on_disconnect=True
    )
    kept = m.validate(order("buy", 2, 100, reserve=True, symbol="Y"), T0, connection=1)
    other = m.validate(
        order("buy", 4, 100, reserve=True, symbol="Z"), T0, connection=2, cancel_on_disconnect=True
    )
    assert gross(m) == "700"
    assert m.release_connection(1, T0) == 1
    assert gross(m) == "600"
    assert m.release_reservation(cod.reservation_id, "released", T0) is None
    assert m.release_reservation(kept.reservation_id, "released", T0) is not None
    assert m.release_reservation(other.reservation_id, "released", T0) is not None
    assert m.release_connection(1, T0) == 0


def test_reserve_when_50_orders_race_for_room_for_one_then_exactly_one_accepted() -> None:
    m = engine({"max_exposure": "1000"})
    position(m, 4, 100, account="B")
    decisions = [
        m.validate(order("buy", 6, 100, reserve=True, account=f"A{i}"), T0) for i in range(50)
    ]
    assert [d.decision for d in decisions].count("accept") == 1
    assert gross(m) == "1000"
    rejected = [d for d in decisions if d.decision == "reject"]
    assert all(codes(d) == ["MAX_EXPOSURE"] for d in rejected)
    assert rejected[0].reasons[0]["message"] == "gross exposure would be 1600, limit 1000"


# --------------------------------------------------------- breach handling


def test_position_update_when_over_max_exposure_then_gateway_reducing_by_gateway() -> None:
    m = engine({"max_exposure": "1000"})
    position(m, 10, 100)
    assert m.emergency_view()["mode"] == "normal"
    m.drain_events()
    position(m, 11, 100)  # facts are never rejected: 1100 now
    assert gross(m) == "1100"
    view = m.emergency_view()
    assert view["mode"] == "reducing"
    assert view["actor"] == "gateway"
    assert view["version"] == 1
    assert "1100" in view["reason"]
    raised = alerts(m)
    breach = [a for a in raised if a["code"] == "EXPOSURE_BREACH" and "account" not in a]
    assert len(breach) == 1
    assert breach[0]["level"] == "critical"
    assert codes(m.validate(order("buy", 1, 100), T0)) == ["REDUCE_ONLY", "MAX_EXPOSURE"]
    assert m.validate(order("sell", 2, 100), T0).decision == "accept"


def test_position_update_when_over_max_exposure_and_auto_reduce_off_then_alert_only() -> None:
    m = engine({"max_exposure": "1000", "auto_reduce_on_breach": False})
    position(m, 11, 100)
    assert m.emergency_view()["mode"] == "normal"
    assert m.emergency_view()["version"] == 0
    assert "EXPOSURE_BREACH" in [a["code"] for a in alerts(m)]


def test_position_update_when_breach_persists_then_alert_raised_once() -> None:
    m = engine({"max_exposure": "1000", "auto_reduce_on_breach": False})
    position(m, 11, 100)
    m.drain_events()
    position(m, 12, 100)
    assert [a["code"] for a in alerts(m)] == []


def test_position_update_when_already_halted_and_breach_then_stays_halted() -> None:
    m = engine({"max_exposure": "1000"})
    set_mode(m, Mode.HALTED)
    position(m, 11, 100)
    assert m.emergency_view()["mode"] == "halted"


def test_limits_change_when_gateway_halted_then_never_reopens() -> None:
    m = engine({"max_exposure": "1000"})
    position(m, 11, 100)
    assert m.emergency_view()["mode"] == "reducing"
    rec = m.prepare_limits(1, {"max_exposure": "100000"}, "ops", T0)
    assert rec is not None
    m.apply_record(rec)
    assert m.limits.max_exposure == Decimal(100000)
    assert m.emergency_view()["mode"] == "reducing"
    set_mode(m, Mode.HALTED)
    rec = m.prepare_limits(2, {"max_exposure": "1000000"}, "ops", T0)
    assert rec is not None
    m.apply_record(rec)
    assert m.emergency_view()["mode"] == "halted"
    assert codes(m.validate(order("buy", 1, 100), T0)) == ["EMERGENCY_HALTED"]


# ------------------------------------------------------------------ limits


def test_prepare_limits_when_version_is_stale_then_conflict() -> None:
    m = engine()
    rec = m.prepare_limits(1, {"max_exposure": "5"}, "ops", T0)
    assert rec is not None and rec["v"] == 2
    m.apply_record(rec)
    assert m.limits_view()["version"] == 2
    with pytest.raises(ProtocolError) as info:
        m.prepare_limits(1, {"max_exposure": "6"}, "ops", T0)
    assert info.value.code is ErrorCode.CONFLICT
    assert "version 2" in info.value.message
    assert m.limits.max_exposure == Decimal(5)


def test_prepare_limits_when_key_unknown_or_value_bad_then_bad_request() -> None:
    m = engine()
    with pytest.raises(ProtocolError) as info:
        m.prepare_limits(1, {"max_exposur": "5"}, "ops", T0)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert "max_exposur" in info.value.message
    with pytest.raises(ProtocolError) as info:
        m.prepare_limits(1, {"max_exposure": "-5"}, "ops", T0)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert "max_exposure" in info.value.message
    assert m.limits_view()["version"] == 1


def test_prepare_limits_when_nothing_changes_then_none() -> None:
    m = engine({"max_exposure": "5"})
    assert m.prepare_limits(1, {"max_exposure": "5.0"}, "ops", T0) is None
    assert m.prepare_limits(1, {}, "ops", T0) is None


def test_limits_change_when_applied_then_validations_use_new_values_and_version() -> None:
    m = engine({"max_order_qty": "5"})
    assert codes(m.validate(order("buy", 6), T0)) == ["MAX_ORDER_QTY"]
    rec = m.prepare_limits(1, {"max_order_qty": "10"}, "ops", T0)
    assert rec is not None
    m.apply_record(rec)
    decision = m.validate(order("buy", 6), T0)
    assert decision.decision == "accept"
    assert decision.limits_version == 2
    assert "LIMITS_CHANGED" in [a["code"] for a in alerts(m)]


# ---------------------------------------------------- snapshots and replay


def busy_manager(clock: Clock) -> RiskEngine:
    """A manager that went through every kind of state change."""
    m = engine(
        {"max_exposure": "100000", "max_orders_per_second": 100, "reservation_ttl_ms": 1000},
        now_ms=clock.now,
    )
    position(m, 5, 100, symbol="X", now=clock.now)
    position(m, -2, "100.5", symbol="Y", now=clock.now)
    position(m, 3, 7, account="A2", symbol="X", now=clock.now)
    m.update_price(PriceUpdate(symbol="Z", price=Decimal(50)), clock.now)
    m.update_position(
        PositionUpdate(account="A3", symbol="X", qty=Decimal(1), price=Decimal(100), seq=1),
        clock.now,
    )
    m.update_position(
        PositionUpdate(account="A3", symbol="X", qty=Decimal(2), price=Decimal(100), seq=3),
        clock.now,
    )
    kept = m.validate(order("buy", 2, 100, reserve=True, client_order_id="k"), clock.now)
    assert kept.decision == "accept"
    dropped = m.validate(order("sell", 1, 100, reserve=True, symbol="Y"), clock.now)
    m.release_reservation(dropped.reservation_id, "released", clock.now)
    m.validate(order("buy", 1, 50, reserve=True, symbol="Z", account="A4"), clock.now)
    m.validate(order("sell", 1, 100), clock.now)
    m.validate(
        order("buy", 1, 100, account="NEWCOMER"), clock.now
    )  # rejected or not, no state of its own
    m.validate(order("buy", 1_000_000, 100, reserve=True, account="A5"), clock.now)  # rejected
    filled = m.validate(order("buy", 1, 100, reserve=True, account="A2"), clock.now)
    position(m, 4, 100, account="A2", symbol="X", release=filled.reservation_id, now=clock.now)
    clock.now += 10
    expiring = m.validate(order("sell", 1, 100, reserve=True, account="A2"), clock.now)
    assert expiring.decision == "accept"
    set_mode(m, Mode.REDUCING, account="A2", now=clock.now)
    set_mode(m, Mode.HALTED, account="A9", now=clock.now)
    set_mode(m, Mode.NORMAL, account="A9", now=clock.now)
    rec = m.prepare_limits(
        1, {"max_position": "500", "symbols": {"X": {"max_order_qty": "9"}}}, "ops", clock.now
    )
    assert rec is not None
    m.apply_record(rec)
    set_mode(m, Mode.HALTED, actor="ops", now=clock.now)
    return m


def test_snapshot_when_loaded_into_fresh_manager_then_same_state_view() -> None:
    clock = Clock()
    m = busy_manager(clock)
    fresh = engine(now_ms=clock.now)
    fresh.load_snapshot(m.snapshot())
    assert fresh.state_view() == m.state_view()
    assert fresh.limits_view() == m.limits_view()
    assert fresh.gross_exposure == m.gross_exposure
    assert_cache_matches_recompute(fresh)


def test_replay_when_all_records_into_fresh_manager_then_same_state_view() -> None:
    clock = Clock()
    m = busy_manager(clock)
    records = m.drain_records()
    fresh = engine()
    assert fresh.replay(records) == len(records)
    assert fresh.state_view() == m.state_view()
    assert fresh.limits_view() == m.limits_view()
    assert fresh.drain_records() == []
    assert fresh.drain_events() == []


def test_replay_when_state_reloaded_then_reservations_and_client_order_ids_still_work() -> None:
    clock = Clock()
    m = busy_manager(clock)
    fresh = engine(now_ms=clock.now)
    fresh.replay(m.drain_records())
    set_mode(fresh, Mode.NORMAL, now=clock.now)
    set_mode(m, Mode.NORMAL, now=clock.now)
    live = m.validate(order("buy", 2, 100, reserve=True, client_order_id="k"), clock.now)
    again = fresh.validate(order("buy", 2, 100, reserve=True, client_order_id="k"), clock.now)
    assert live.decision == again.decision == "accept"
    assert again.reservation_id == live.reservation_id
    assert fresh.state_view() == m.state_view()
    # Time runs out for the same reservations in both.
    clock.now += 5000
    fresh.expire_reservations(clock.now)
    m.expire_reservations(clock.now)
    assert fresh.state_view() == m.state_view()
    assert fresh.state_view()["accounts"]["A1"]["reserved_exposure"] == "0"


def test_snapshot_then_replay_of_later_records_then_same_state_view() -> None:
    clock = Clock()
    m = busy_manager(clock)
    m.drain_records()
    snap = m.snapshot()
    set_mode(m, Mode.NORMAL, now=clock.now)
    position(m, 7, 101, symbol="Q", now=clock.now)
    rid = m.validate(order("buy", 1, 101, reserve=True, symbol="Q"), clock.now).reservation_id
    assert rid is not None
    later = m.drain_records()
    fresh = engine(now_ms=clock.now)
    fresh.load_snapshot(snap)
    fresh.replay(later)
    assert fresh.state_view() == m.state_view()
    # The recovered reservation keeps its id; a new one never takes it.
    assert rid in fresh.reservations
    next_fresh = fresh.validate(order("buy", 1, 101, reserve=True, symbol="Q"), clock.now)
    assert next_fresh.reservation_id not in (None, rid)


def test_snapshot_when_reserved_only_symbol_repriced_later_then_exposure_kept() -> None:
    clock = Clock()
    m = engine(now_ms=clock.now)
    m.validate(order("buy", 5, 100, reserve=True, symbol="Z"), clock.now)
    m.update_price(PriceUpdate(symbol="Z", price=Decimal(200)), clock.now)
    assert gross(m) == "500"  # valued at the price it was reserved at
    fresh = engine(now_ms=clock.now)
    fresh.load_snapshot(m.snapshot())
    assert fresh.state_view() == m.state_view()
    assert gross(fresh) == "500"
    # Both value the next order the same way, too.
    assert fresh.validate(order("buy", 1, 200, reserve=True, symbol="Z"), clock.now).exposure == (
        m.validate(order("buy", 1, 200, reserve=True, symbol="Z"), clock.now).exposure
    )


def test_limits_when_assigned_from_outside_then_refused_and_use_limits_keeps_reports_in_step() -> (
    None
):
    manager = RiskEngine(limits=Limits.from_mapping({"max_account_exposure": "1000"}), now_ms=T0)
    with pytest.raises(AttributeError):
        manager.limits = Limits.from_mapping({"max_account_exposure": "5000"})  # type: ignore[misc]
    # The offline what-if's way: decisions report the limits they were made against.
    manager.use_limits(Limits.from_mapping({"max_account_exposure": "5000"}))
    decision = manager.validate(order(qty="3", price="1000"), 1_000)
    assert decision.decision == "accept"
    assert decision.exposure["account_limit"] == "5000"
