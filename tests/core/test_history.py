"""The last alerts and decisions are state: records and snapshots bring them back.

Each test builds a history live, then rebuilds it the two ways recovery does
(replaying the records, loading a snapshot) and compares what a subscriber's
snapshot would show.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.core.engine import RiskEngine
from gateway.core.history import ALERT_HISTORY, DECISION_HISTORY
from protocol.codes import AlertCode, AlertLevel, Mode
from tests.builders import T0, emergency, engine, order, update

LIMITS = {"max_exposure": "5000", "max_account_exposure": "1000", "max_order_qty": "10"}


def replayed(live: RiskEngine, records: list[Any]) -> RiskEngine:
    again = engine(LIMITS)
    again.replay(records)
    return again


def reloaded(live: RiskEngine) -> RiskEngine:
    """Through the bytes the journal writes for a snapshot."""
    again = engine(LIMITS)
    again.load_snapshot(orjson.loads(orjson.dumps(live.snapshot(), default=str)))
    return again


def history(m: RiskEngine) -> tuple[list[Any], list[Any]]:
    return list(m.history.alerts), m.history.decisions()


def test_history_when_replayed_or_reloaded_then_every_alert_and_decision_as_published() -> None:
    m = engine(LIMITS)
    m.update_position(update(9, 100), T0)  # 900 of 1000: over 80%, a warning
    m.validate(order("sell", 1, 100), T0 + 1)  # accepted
    m.validate(order("buy", 20, 100), T0 + 2)  # max_order_qty, account limit
    m.validate(order("sell", 1, 100, reserve=True, client_order_id="c1"), T0 + 3)
    m.set_emergency(emergency(Mode.REDUCING, account="A1", reason="drill 4"), "ops", T0 + 4)
    m.validate(order("buy", 1, 100), T0 + 5)  # rejected: reducing
    m.update_position(update(1, 100, account="A2", seq=5), T0 + 6)
    m.update_position(update(1, 100, account="A2", seq=9), T0 + 7)  # a seq gap
    m.raise_alert(
        AlertLevel.WARNING,
        AlertCode.CLIENT_DISCONNECTED,
        "conn 3",
        now_ms=T0 + 8,
        for_traders=False,
    )
    records = m.drain_records()
    events = m.drain_events()

    alerts, decisions = history(m)
    codes = [a["code"] for a, _ in alerts]
    assert codes == [
        "EXPOSURE_WARNING",
        "EMERGENCY_CHANGED",
        "POSITION_SEQ_GAP",
        "CLIENT_DISCONNECTED",
    ]
    assert [for_traders for _, for_traders in alerts] == [True, True, True, False]
    assert "drill 4" in alerts[1][0]["message"]
    # The history holds exactly what was published.
    published = [e.alert for e in events if hasattr(e, "alert")]
    assert [a for a, _ in alerts] == published
    assert [d["decision"] for d in decisions] == ["accept", "reject", "accept", "reject"]
    assert decisions[2]["reservation_id"] is not None
    assert all(d["exposure"] is not None for d in decisions)

    assert history(replayed(m, records)) == (alerts, decisions)
    assert history(reloaded(m)) == (alerts, decisions)


def test_history_when_more_than_kept_then_the_newest_in_order() -> None:
    m = engine(LIMITS)
    extra = 7
    for n in range(DECISION_HISTORY + extra):
        m.validate(order("buy", n + 1, 1), T0 + n)
    for n in range(ALERT_HISTORY + extra):
        m.raise_alert(AlertLevel.INFO, AlertCode.LIMITS_CHANGED, f"a{n}", now_ms=T0 + n)
    records = m.drain_records()
    alerts, decisions = history(m)
    assert [d["qty"] for d in decisions] == [
        str(n + 1) for n in range(extra, DECISION_HISTORY + extra)
    ]
    assert [a["message"] for a, _ in alerts] == [
        f"a{n}" for n in range(extra, ALERT_HISTORY + extra)
    ]
    assert history(replayed(m, records)) == (alerts, decisions)
    assert history(reloaded(m)) == (alerts, decisions)


def test_history_when_records_older_than_history_then_what_they_hold() -> None:
    # A decision record as written before the history was kept: no
    # messages, figures or versions; a snapshot with no history at all.
    old = {
        "t": "dec",
        "a": "A1",
        "s": "X",
        "side": "buy",
        "q": "20",
        "p": "100",
        "d": "reject",
        "r": ["MAX_ORDER_QTY"],
        "ts": T0,
    }
    m = engine(LIMITS)
    m.replay([old])
    (decision,) = m.history.decisions()
    assert decision["reasons"] == [{"code": "MAX_ORDER_QTY", "message": "MAX_ORDER_QTY"}]
    assert decision["exposure"] is None and decision["emergency_version"] is None
    assert (decision["account"], decision["qty"], decision["decision"]) == ("A1", "20", "reject")
    snap = m.snapshot()
    del snap["history"]
    again = engine(LIMITS)
    again.load_snapshot(snap)
    assert history(again) == ([], [])
