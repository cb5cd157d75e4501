"""What the engine hands to the wire: the DECISION, the ``decisions`` push and
alerts carry the protocol's keys in the protocol's order (the codec writes
them as they are, so the order is what a client reads)."""

from __future__ import annotations

from gateway.core.events import AlertRaised, DecisionMade
from protocol.codes import Mode
from protocol.values import format_time_ms
from tests.builders import T0, emergency, engine, order, update

DECISION_KEYS = [
    "decision",
    "reasons",
    "reservation_id",
    "expires_at",
    "exposure",
    "emergency_version",
    "limits_version",
]


def test_decision_when_rejected_then_wire_lists_every_reason_in_order() -> None:
    m = engine({"max_order_qty": "5", "restricted_symbols": ["X"]})
    decision = m.validate(order("buy", 6), T0)
    wire = decision.to_wire()
    assert list(wire) == DECISION_KEYS
    assert wire["decision"] == "reject"
    assert wire["reasons"] == [
        {"code": "MAX_ORDER_QTY", "message": "order quantity 6, limit 5"},
        {"code": "RESTRICTED_SYMBOL", "message": "symbol X is restricted"},
    ]
    assert list(wire["exposure"] or {}) == ["account", "account_limit", "global", "global_limit"]
    assert (wire["reservation_id"], wire["expires_at"]) == (None, None)
    assert (wire["emergency_version"], wire["limits_version"]) == (0, 1)


def test_decision_when_made_then_push_is_the_decision_and_the_order() -> None:
    m = engine({"reservation_ttl_ms": 1000})
    decision = m.validate(order("sell", "2.50", "10.0", reserve=True), T0)
    pushes = [e.data for e in m.drain_events() if isinstance(e, DecisionMade)]
    assert len(pushes) == 1
    push = pushes[0]
    assert list(push) == [*DECISION_KEYS, "account", "symbol", "side", "qty", "price", "ts"]
    assert {k: push[k] for k in DECISION_KEYS} == decision.to_wire()
    assert (push["account"], push["symbol"], push["side"]) == ("A1", "X", "sell")
    assert (push["qty"], push["price"], push["ts"]) == ("2.5", "10", format_time_ms(T0))
    assert decision.expires_at == format_time_ms(T0 + 1000)


def test_alert_when_about_an_account_and_symbol_then_ts_comes_last() -> None:
    m = engine()
    m.update_position(update(1, seq=1), T0)
    m.drain_events()
    m.update_position(update(2, seq=5), T0 + 1)
    raised = [e.alert for e in m.drain_events() if isinstance(e, AlertRaised)]
    assert [list(a) for a in raised] == [["level", "code", "message", "account", "symbol", "ts"]]
    m.set_emergency(emergency(Mode.HALTED), "ops", T0 + 2)
    gateway_wide = [e.alert for e in m.drain_events() if isinstance(e, AlertRaised)]
    assert [list(a) for a in gateway_wide] == [["level", "code", "message", "ts"]]
