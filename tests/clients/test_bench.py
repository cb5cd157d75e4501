"""``riskctl bench``: the report's shape (no timing thresholds here), its statistics,
and the exactness of the hot-path shortcuts the benchmark led to."""

from __future__ import annotations

import contextvars
import decimal
import math
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clients.bench import SECTIONS, latency_summary, paired_ratios, percentile
from gateway.core import context as context_module
from gateway.core.context import install_risk_context
from gateway.core.engine import RiskEngine
from gateway.core.limits import Limits
from protocol.messages import OrderValidate, PositionUpdate
from protocol.values import RISK_CONTEXT, format_decimal, format_time_ms
from tests.builders import T0
from tests.conftest import BIG_PRICE, BIG_QTY, unbounded_limits

ROOT = Path(__file__).resolve().parents[2]

# Every figure of the report that must be a positive number, per section.
POSITIVE: dict[str, tuple[str, ...]] = {
    "latency": ("n",),
    "pipelined": ("n", "gateway_rps", "echo_rps", "ratio"),
    "scaling": ("p50_us_small", "p50_us_large", "p99_us_small", "p99_us_large", "ratio"),
    "fanout": (
        "subscribers",
        "last_receipt_after_request_ms",
        "p50_us_quiet",
        "p50_us_storm",
        "p99_us_quiet",
        "p99_us_storm",
        "ratio",
        "storm_changes_per_s",
        "p99_us_flat_out",
        "ratio_flat_out",
        "flat_out_changes_per_s",
        "heartbeat_s",
        "heartbeat_intervals",
        "heartbeat_interval_ms",
        "heartbeat_interval_max_ms",
        "heartbeat_ratio",
    ),
    "recovery": ("records", "journal_bytes", "seconds", "read_seconds", "positions"),
    "memory": ("connections", "rss_before_kib", "rss_after_kib"),
    "snapshots": (
        "positions",
        "snapshot_ms",
        "snapshot_us_per_position",
        "update_us",
        "per_position_ratio",
        "p99_us_quiet",
        "p99_us_flood",
        "flood_p99_in_snapshots",
    ),
}


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def test_bench_quick_json_when_run_then_every_section_is_reported() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "clients.riskctl", "bench", "--quick", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    report = orjson.loads(done.stdout)
    assert report["mode"] == "quick"
    assert report["machine"]["nproc"] >= 1
    for section in SECTIONS:
        assert section in report, section
    for section, keys in POSITIVE.items():
        for key in keys:
            assert _positive(report[section][key]), (section, key, report[section][key])
    for server in ("gateway_us", "echo_us"):
        for key in ("p50", "p99", "p999", "mean"):
            assert _positive(report["latency"][server][key]), (server, key)
    for key in ("p50", "p99", "p999"):
        assert _positive(report["latency"]["ratio"][key]), key
    for mode in ("always", "interval", "never"):
        assert _positive(report["updates"][mode]["updates_per_s"]), mode
        assert report["updates"][mode]["fsyncs_per_s"] >= 0
    assert report["updates"]["always"]["fsyncs_per_s"] > 0
    # Signed: a subscriber may get the push before the admin gets its answer.
    assert math.isfinite(report["fanout"]["last_receipt_after_response_ms"])
    assert report["fanout"]["missing_receipts"] == 0
    assert isinstance(report["memory"]["kib_per_connection"], int | float)
    assert report["recovery"]["positions"] == 10_000
    names = [target["name"] for target in report["targets"]]
    assert len(names) == 11 and all(isinstance(t["holds"], bool) for t in report["targets"])
    # Nothing was rejected: the benchmark measured accepted validations.
    for section in ("latency", "pipelined", "scaling", "fanout", "snapshots"):
        assert report[section]["failures"] == 0, section


def test_bench_cluster_quick_json_when_run_then_every_figure_is_reported() -> None:
    from tests.cluster.redisproc import require_redis

    require_redis()
    done = subprocess.run(
        [sys.executable, "-m", "clients.riskctl", "bench", "--cluster", "--quick", "--json"],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    report = orjson.loads(done.stdout)
    latency = report["latency"]
    for key in ("member_p50_us", "member_p99_us", "single_p50_us", "single_p99_us"):
        assert _positive(latency[key]), key
    assert _positive(latency["ratio_p50"]) and latency["failures"] == 0
    fanout = report["fanout"]
    assert fanout["members"] == 3 and fanout["missing_receipts"] == 0
    assert 0 < fanout["last_receipt_median_ms"] <= fanout["last_receipt_worst_ms"]
    for kind in ("updates", "validations"):
        figures = report["throughput"][kind]
        assert _positive(figures["one_member_per_s"]) and _positive(figures["two_members_per_s"])
        assert _positive(figures["cpu_total_two_members"])
    room = report["room"]
    # One member filled up while two held idle headroom: the room it could
    # not use is within what the design promises.
    assert room["within_bound"] is True, room
    assert Decimal(room["room_lost"]) > 0


# ------------------------------------------------------------- statistics


def test_percentile_when_nearest_rank_then_picks_the_sample() -> None:
    values = list(range(1, 101))
    assert percentile(values, 0.5) == 50
    assert percentile(values, 0.99) == 99
    assert percentile(values, 0.999) == 100
    assert percentile([7], 0.999) == 7


def test_latency_summary_when_nanoseconds_then_microseconds() -> None:
    summary = latency_summary([1000 * i for i in range(1, 1001)])
    assert summary["p50"] == 500
    assert summary["p99"] == 990
    assert summary["p999"] == 999


def test_paired_ratios_when_repeats_then_median_of_ratios() -> None:
    gateway = [{"p50": 2.0}, {"p50": 9.0}, {"p50": 3.0}]
    echo = [{"p50": 1.0}, {"p50": 3.0}, {"p50": 1.0}]
    assert paired_ratios(gateway, echo) == {"p50": 3.0}


# ----------------------------------------- shortcuts stay exact (hot path)


def _reference_format_decimal(value: Decimal) -> str:
    # The implementation before the fast path.
    if not value:
        return "0"
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(RISK_CONTEXT), "f")


wire_decimals = st.decimals(allow_nan=False, allow_infinity=False, places=None).filter(
    lambda d: abs(d.adjusted()) < 60
)


@given(wire_decimals)
def test_format_decimal_when_fast_path_then_same_as_reference(value: Decimal) -> None:
    with decimal.localcontext(RISK_CONTEXT):
        assert format_decimal(value) == _reference_format_decimal(value)


@given(st.integers(min_value=-(10**32) + 1, max_value=10**32 - 1), st.integers(0, 40))
def test_format_decimal_when_scaled_integers_then_same_as_reference(
    digits: int, scale: int
) -> None:
    value = Decimal(digits).scaleb(-scale)
    with decimal.localcontext(RISK_CONTEXT):
        assert format_decimal(value) == _reference_format_decimal(value)


@pytest.mark.parametrize(
    "text", ["0", "-0", "-0.000", "1.50", "100", "100.00", "1E+3", "1E-7", "2.5E+2", "-5.50"]
)
def test_format_decimal_when_edge_forms_then_same_as_reference(text: str) -> None:
    assert format_decimal(Decimal(text)) == _reference_format_decimal(Decimal(text))


def _reference_time(epoch_ms: int) -> str:
    seconds, millis = divmod(epoch_ms, 1000)
    stamp = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{millis:03d}Z"


@given(st.lists(st.integers(min_value=-(10**12), max_value=4 * 10**12), min_size=1))
def test_format_time_ms_when_cached_then_same_as_reference(stamps: list[int]) -> None:
    for epoch_ms in stamps:
        # Also the neighbours, which hit the cached second.
        for ms in (epoch_ms, epoch_ms + 1, epoch_ms - 1, epoch_ms + 999):
            assert format_time_ms(ms) == _reference_time(ms)


def test_validate_when_32_digit_inputs_under_default_context_then_exposure_is_exact() -> None:
    qty, price, limits = BIG_QTY, BIG_PRICE, unbounded_limits()
    manager = RiskEngine(limits=limits, now_ms=T0)
    caller = decimal.getcontext()
    assert caller.prec == 28  # the host's context: products of 32 digits would round here
    manager.update_position(PositionUpdate(account="A1", symbol="X", qty=qty, price=price), T0)
    order = OrderValidate(account="A1", symbol="X", side="buy", qty=qty, price=price)
    decision = manager.validate(order, T0)
    assert decision.decision == "accept"
    assert decimal.getcontext() is caller and caller.prec == 28
    with decimal.localcontext(RISK_CONTEXT):
        exact = qty * price
    assert decision.exposure["account"] == format_decimal(exact)
    assert len(decision.exposure["account"].replace(".", "")) > 28
    assert Decimal(decision.exposure["account"]) == exact
    # After the order is reserved the worst case is 2 * qty at the mark price.
    reserved = manager.validate(
        OrderValidate(account="A1", symbol="X", side="buy", qty=qty, price=price, reserve=True), T0
    )
    with decimal.localcontext(RISK_CONTEXT):
        assert Decimal(reserved.exposure["account"]) == 2 * qty * price
    assert manager.recompute_exposure()[0] == manager.gross_exposure


def test_validate_when_risk_context_installed_then_exact_and_context_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(context_module, "_installed", None)  # restored afterwards
    qty, price, limits = BIG_QTY, BIG_PRICE, unbounded_limits()

    def in_gateway_process() -> tuple[decimal.Context, decimal.Context, dict[str, Any]]:
        installed = install_risk_context()
        manager = RiskEngine(limits=limits, now_ms=T0)
        manager.update_position(PositionUpdate(account="A1", symbol="X", qty=qty, price=price), T0)
        decision = manager.validate(
            OrderValidate(account="A1", symbol="X", side="buy", qty=qty, price=price), T0
        )
        return installed, decimal.getcontext(), decision

    caller = decimal.getcontext()
    # A copied contextvars context, so the installation stays inside it.
    installed, after, decision = contextvars.copy_context().run(in_gateway_process)
    assert after is installed and installed.prec == RISK_CONTEXT.prec
    assert decimal.Inexact in [t for t, on in installed.traps.items() if on]
    with decimal.localcontext(RISK_CONTEXT):
        assert Decimal(decision.exposure["account"]) == qty * price
    assert decimal.getcontext() is caller and caller.prec == 28


def test_replay_when_records_applied_then_same_state_as_live() -> None:
    now = [1_700_000_000_000]
    live = RiskEngine(limits=Limits(), now_ms=now[0])
    for i in range(200):
        now[0] += 7
        live.update_position(
            PositionUpdate(
                account=f"A{i % 3}",
                symbol=f"S{i % 11}",
                qty=Decimal(i % 9 - 4) / 4,
                price=Decimal(100 + i),
            ),
            now[0],
        )
    records = live.drain_records()
    recovered = RiskEngine(limits=Limits(), now_ms=now[0])
    assert recovered.replay(records) == len(records)
    assert recovered.state_view()["accounts"] == live.state_view()["accounts"]
    assert recovered.gross_exposure == live.gross_exposure == live.recompute_exposure()[0]


def test_manager_entry_point_when_called_then_caller_context_untouched() -> None:
    now_ms = int(time.time() * 1000)
    manager = RiskEngine(limits=Limits(), now_ms=now_ms)
    with decimal.localcontext() as caller:
        caller.prec = 5
        caller.clear_flags()
        manager.update_position(
            PositionUpdate(account="A1", symbol="X", qty=Decimal("1.23456789"), price=Decimal(3)),
            now_ms,
        )
        assert decimal.getcontext() is caller and caller.prec == 5
        assert not caller.flags[decimal.Inexact]
    assert manager.state_view()["gross_exposure"] == "3.70370367"
