"""The charts' history: last value per 5-second slot, decisions counted per
second, nothing older than the window, each reader shown what it may see."""

from __future__ import annotations

from typing import Any

from gateway.fanout.charts import WINDOW_MS, ChartHistory
from protocol.values import format_time_ms

T = 1_700_000_000_000  # a multiple of 5,000 ms


def exposure(account: str, gross: str, total: str) -> dict[str, Any]:
    return {
        "account": account,
        "gross": gross,
        "limit": "100",
        "global": total,
        "global_limit": "1000",
    }


def decision(verdict: str, *codes: str) -> dict[str, Any]:
    return {"decision": verdict, "reasons": [{"code": c, "message": c} for c in codes]}


def test_exposure_when_pushed_then_last_value_per_slot_and_old_slots_dropped() -> None:
    charts = ChartHistory()
    charts.exposure(exposure("A1", "10", "10"), T)
    charts.exposure(exposure("A1", "20", "20"), T + 4_999)  # same slot: replaces
    charts.exposure(exposure("B1", "5", "25"), T + 5_000)
    view = charts.view(T + 5_000, readable=None, decisions=True)
    assert view["gateway"] == [
        [format_time_ms(T), "20", "1000"],
        [format_time_ms(T + 5_000), "25", "1000"],
    ]
    assert view["accounts"] == {
        "A1": [[format_time_ms(T), "20", "100"]],
        "B1": [[format_time_ms(T + 5_000), "5", "100"]],
    }
    assert view["window_s"] == 900
    # Past the window, A1's only point and the gateway's first are gone.
    later = charts.view(T + WINDOW_MS + 1, readable=None, decisions=True)
    assert list(later["accounts"]) == ["B1"]
    assert later["gateway"] == [[format_time_ms(T + 5_000), "25", "1000"]]


def test_decisions_when_made_then_counted_per_second_with_reasons() -> None:
    charts = ChartHistory()
    charts.decision(decision("accept"), T)
    charts.decision(decision("reject", "MAX_ORDER_QTY", "PRICE_COLLAR"), T + 10)
    charts.decision(decision("reject", "MAX_ORDER_QTY"), T + 999)
    charts.decision(decision("accept"), T + 1_000)
    view = charts.view(T + 1_000, readable=None, decisions=True)
    assert view["decisions"] == [
        [format_time_ms(T), 1, 2, {"MAX_ORDER_QTY": 2, "PRICE_COLLAR": 1}],
        [format_time_ms(T + 1_000), 1, 0, {}],
    ]
    charts.decision(decision("accept"), T + WINDOW_MS + 500)
    assert [
        p[1:3] for p in charts.view(T + WINDOW_MS + 500, readable=None, decisions=True)["decisions"]
    ] == [[1, 0], [1, 0]]


def test_view_when_trader_then_own_accounts_and_no_decisions() -> None:
    charts = ChartHistory()
    charts.exposure(exposure("A1", "10", "10"), T)
    charts.exposure(exposure("B1", "5", "15"), T)
    charts.decision(decision("accept"), T)
    view = charts.view(T, readable=lambda account: account == "A1", decisions=False)
    assert list(view["accounts"]) == ["A1"]
    assert "decisions" not in view
    assert view["gateway"] == [[format_time_ms(T), "15", "1000"]]
