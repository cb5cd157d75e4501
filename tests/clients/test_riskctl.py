"""riskctl end to end: ``main([...])`` in a thread against an in-process gateway."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from clients.examples.make_example import generate, render
from clients.riskctl import main, parse_limit_changes
from protocol.codes import Mode
from tests.conftest import ADMIN, TRADER, TRADER_B, VIEWER, GatewayFactory, RunningGateway
from tests.wsclient import TestClient

EXAMPLE = Path(__file__).resolve().parents[2] / "clients" / "examples" / "example.ndjson"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RISKGW_URL", raising=False)
    monkeypatch.delenv("RISKGW_TOKEN", raising=False)


async def riskctl(gw: RunningGateway | None, token: str | None, *args: str) -> int:
    argv = list(args)
    if gw is not None:
        argv = ["--url", gw.url, *argv]
    if token is not None:
        argv = ["--token", token, *argv]
    async with asyncio.timeout(60):
        return await asyncio.to_thread(main, argv)


def gateway_mode(gw: RunningGateway) -> Mode:
    return gw.manager.gateway_mode.mode


def one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------- basic commands


async def test_state_json_when_position_reported_then_prints_raw_state(
    gw: RunningGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    trader = await gw.client(TRADER)
    await trader.ok(
        "position.update", {"account": "A1", "symbol": "BTC-USD", "qty": "2", "price": "50000"}
    )
    assert await riskctl(gw, VIEWER, "state", "--json") == 0
    state = orjson.loads(capsys.readouterr().out)
    assert state["accounts"]["A1"]["positions"]["BTC-USD"] == {"qty": "2", "price": "50000"}
    assert state["gross_exposure"] == "100000"
    assert state["emergency"]["mode"] == "normal"


async def test_state_when_table_then_shows_mode_and_positions(
    gw: RunningGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    trader = await gw.client(TRADER)
    await trader.ok(
        "position.update", {"account": "A2", "symbol": "ETH-USD", "qty": "-3", "price": "3000"}
    )
    assert await riskctl(gw, VIEWER, "--timeout", "5", "state") == 0
    out = capsys.readouterr().out
    assert "NORMAL" in out
    assert "ETH-USD" in out and "9000" in out


async def test_emergency_when_halted_then_normal_then_server_mode_follows(
    gw: RunningGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await riskctl(gw, ADMIN, "emergency", "halted", "--reason", "exchange outage", "--json")
    assert code == 0
    assert gw.manager.gateway_mode.mode is Mode.HALTED
    view = orjson.loads(capsys.readouterr().out)
    assert view["mode"] == "halted"
    assert view["reason"] == "exchange outage"
    assert view["actor"] == "admin"
    assert await riskctl(gw, ADMIN, "emergency", "show") == 0
    assert "HALTED" in capsys.readouterr().out
    assert await riskctl(gw, ADMIN, "emergency", "normal") == 0
    assert gateway_mode(gw) is Mode.NORMAL
    assert "NORMAL" in capsys.readouterr().out


async def test_emergency_when_account_given_then_only_that_account_changes(
    gw: RunningGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("emergency", "reducing", "--reason", "desk review", "--account", "A7", "--json")
    assert await riskctl(gw, ADMIN, *args) == 0
    view = orjson.loads(capsys.readouterr().out)
    assert view["mode"] == "normal"
    assert view["accounts"]["A7"]["mode"] == "reducing"


async def test_emergency_when_reason_missing_then_exit_2_and_mode_unchanged(
    gw: RunningGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await riskctl(gw, ADMIN, "emergency", "halted") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--reason is required" in line
    assert gw.manager.gateway_mode.mode is Mode.NORMAL


async def test_emergency_when_trader_sets_mode_then_exit_1_with_forbidden(
    gw: RunningGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await riskctl(gw, TRADER, "emergency", "halted", "--reason", "x") == 1
    line = one_error_line(capsys.readouterr().err)
    assert "FORBIDDEN" in line
    assert gw.manager.gateway_mode.mode is Mode.NORMAL


async def test_command_when_token_missing_then_exit_2_with_clear_message(
    gw: RunningGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await riskctl(gw, None, "state") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--token" in line and "RISKGW_TOKEN" in line


async def test_command_when_token_from_environment_then_used(
    gw: RunningGateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RISKGW_URL", gw.url)
    monkeypatch.setenv("RISKGW_TOKEN", VIEWER)
    assert await riskctl(None, None, "emergency", "get", "--json") == 0
    assert orjson.loads(capsys.readouterr().out)["mode"] == "normal"


async def test_command_when_token_wrong_then_exit_1_naming_http_401(
    gw: RunningGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await riskctl(gw, "not-a-token", "state") == 1
    line = one_error_line(capsys.readouterr().err)
    assert "refused the token" in line and "401" in line


async def test_command_when_gateway_down_then_exit_1_connection_refused(
    gw: RunningGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    url = gw.url
    await gw.gateway.stop()
    assert await riskctl(None, ADMIN, "--url", url, "state") == 1
    line = one_error_line(capsys.readouterr().err)
    assert "connection refused" in line


async def test_limits_set_when_no_version_then_reads_current_and_applies(
    gw: RunningGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("limits", "set", "max_exposure=500000", "symbols.BTC-USD.max_position=5", "--json")
    assert await riskctl(gw, ADMIN, *args) == 0
    view = orjson.loads(capsys.readouterr().out)
    assert view["version"] == 2
    assert view["limits"]["max_exposure"] == "500000"
    assert view["limits"]["symbols"]["BTC-USD"]["max_position"] == "5"
    assert await riskctl(gw, ADMIN, "limits", "set", "max_exposure=1", "--version", "1") == 1
    assert "CONFLICT" in one_error_line(capsys.readouterr().err)
    assert await riskctl(gw, VIEWER, "limits", "get") == 0
    assert "500000" in capsys.readouterr().out


def test_parse_limit_changes_when_typed_like_current_then_json_types() -> None:
    current = {
        "max_exposure": "1000000",
        "max_orders_per_second": 1000,
        "auto_reduce_on_breach": True,
        "restricted_symbols": [],
        "symbols": {"BTC-USD": {"max_position": "10", "price_collar": "0.05"}},
    }
    changes = parse_limit_changes(
        [
            "max_exposure=250000.5",
            "max_orders_per_second=20",
            "auto_reduce_on_breach=no",
            "restricted_symbols=X,Y",
            "symbols.BTC-USD.max_position=3",
            "symbols.ETH-USD=",
        ],
        current,
    )
    assert changes == {
        "max_exposure": "250000.5",
        "max_orders_per_second": 20,
        "auto_reduce_on_breach": False,
        "restricted_symbols": ["X", "Y"],
        "symbols": {"BTC-USD": {"max_position": "3", "price_collar": "0.05"}, "ETH-USD": {}},
    }


async def test_watch_once_when_snapshots_arrive_then_renders_banner_alerts_exposure(
    gw: RunningGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = await gw.client(ADMIN)
    await admin.ok("emergency.set", {"mode": "reducing", "reason": "desk review"})
    await admin.ok(
        "position.update", {"account": "A1", "symbol": "BTC-USD", "qty": "4", "price": "50000"}
    )
    assert await riskctl(gw, VIEWER, "watch", "--once") == 0
    out = capsys.readouterr().out
    assert "REDUCING" in out and "desk review" in out
    assert "EMERGENCY_CHANGED" in out
    assert "A1" in out and "200000" in out and "20.0%" in out


# -------------------------------------------------------------------- replay


async def test_example_file_when_regenerated_then_identical() -> None:
    assert render(generate()) == EXAMPLE.read_bytes()


async def test_replay_max_json_when_example_then_every_line_answered_with_mixed_decisions(
    gw: RunningGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = sum(1 for line in EXAMPLE.read_bytes().splitlines() if line.strip())
    assert await riskctl(gw, ADMIN, "replay", str(EXAMPLE), "--max", "--json") == 0
    report = orjson.loads(capsys.readouterr().out)
    assert report["sent"] == lines
    assert report["ok"] + sum(report["errors"].values()) == report["sent"]
    assert report["errors"] == {}
    assert report["decisions"]["accept"] > 0 and report["decisions"]["reject"] > 0
    assert {"PRICE_COLLAR", "MAX_ORDER_QTY", "MAX_ORDER_NOTIONAL"} <= set(report["reasons"])
    assert set(report["latency_ms"]) == {"p50", "p99", "max"}
    assert gw.manager.gateway_mode.mode is Mode.NORMAL  # the example never breaches


async def test_replay_expect_when_one_decision_changed_then_exit_1_naming_the_id(
    make_gateway: GatewayFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fast = {"fsync": "never"}  # the decisions do not depend on durability
    first = await make_gateway(persistence=fast)
    second = await make_gateway(persistence=fast)
    recorded = tmp_path / "decisions.ndjson"
    args = ("replay", str(EXAMPLE), "--max", "--json", "--record-decisions", str(recorded))
    assert await riskctl(first, ADMIN, *args) == 0
    capsys.readouterr()
    expectations = [orjson.loads(line) for line in recorded.read_bytes().splitlines()]
    assert len(expectations) == 1000
    # The same file on another gateway, at another pace, decides the same.
    args = ("replay", str(EXAMPLE), "--speed", "50", "--expect", str(recorded))
    assert await riskctl(second, ADMIN, *args) == 0
    assert "all 1000 expected decisions match" in capsys.readouterr().out
    changed = expectations[10]
    changed["decision"] = "reject" if changed["decision"] == "accept" else "accept"
    modified = tmp_path / "modified.ndjson"
    modified.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in expectations))
    args = ("replay", str(EXAMPLE), "--max", "--json", "--expect", str(modified))
    assert await riskctl(second, ADMIN, *args) == 1
    captured = capsys.readouterr()
    assert orjson.loads(captured.out)["sent"] == 3000
    assert "1 decision(s) differ" in captured.err
    assert f"id {changed['id']}: expected {changed['decision']}" in captured.err


async def test_replay_expect_when_many_differ_then_at_most_20_lines_and_a_count(
    gw: RunningGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    replay_file = tmp_path / "orders.ndjson"
    order = {"account": "A1", "symbol": "X", "side": "buy", "qty": "1", "price": "10"}
    lines = [{"id": f"o{n}", "method": "order.validate", "params": order} for n in range(30)]
    replay_file.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    expect = tmp_path / "expect.ndjson"
    expect.write_bytes(
        b"".join(orjson.dumps({"id": f"o{n}", "decision": "reject"}) + b"\n" for n in range(30))
    )
    args = ("replay", str(replay_file), "--max", "--expect", str(expect))
    assert await riskctl(gw, TRADER, *args) == 1
    err = capsys.readouterr().err
    assert "30 decision(s) differ" in err
    assert err.count("expected reject, got accept") == 20
    assert "... and 10 more" in err


async def test_replay_when_line_is_bad_then_exit_2_naming_the_line(
    gw: RunningGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.ndjson"
    bad.write_text('{"id": 1, "method": "ping"}\n\n{"id": 2, "method": "ping", "parms": {}}\n')
    assert await riskctl(gw, TRADER, "replay", str(bad)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{bad}:3:" in line and "parms" in line
    bad.write_text('{"id": 1, "method": "ping"}\n{not json\n')
    assert await riskctl(gw, TRADER, "replay", str(bad)) == 2
    assert f"{bad}:2: not valid JSON" in one_error_line(capsys.readouterr().err)


async def test_replay_when_errors_then_counted_by_code(
    gw: RunningGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    replay_file = tmp_path / "mixed.ndjson"
    lines = [
        {"id": 1, "method": "ping", "t": 0},
        {"id": 2, "method": "emergency.set", "params": {"mode": "halted", "reason": "x"}, "t": 1},
        {"id": 3, "method": "nope", "t": 2},
        {"id": 4, "method": "order.validate", "params": {"account": "A1"}, "t": 3},
    ]
    replay_file.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    # FORBIDDEN (a trader's emergency.set) refused the replay itself: exit 1.
    assert await riskctl(gw, TRADER, "replay", str(replay_file), "--json") == 1
    captured = capsys.readouterr()
    report = orjson.loads(captured.out)
    assert report["sent"] == 4 and report["ok"] == 1
    assert report["errors"] == {"BAD_REQUEST": 1, "FORBIDDEN": 1, "UNKNOWN_METHOD": 1}
    assert "refused 1 of 4 request(s) (1 FORBIDDEN)" in one_error_line(captured.err)


async def test_replay_when_every_request_forbidden_then_exit_1(
    gw: RunningGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    """A desk replaying a flow of accounts its token may not trade tested nothing."""
    assert await riskctl(gw, TRADER_B, "replay", str(EXAMPLE), "--max", "--json") == 1
    captured = capsys.readouterr()
    report = orjson.loads(captured.out)
    assert report["errors"].get("FORBIDDEN", 0) > 0
    assert "FORBIDDEN" in one_error_line(captured.err)


async def test_replay_when_only_bad_requests_and_decisions_then_exit_0(
    gw: RunningGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    replay_file = tmp_path / "bad.ndjson"
    lines = [
        {"id": 1, "method": "order.validate", "params": {"account": "A1"}, "t": 0},
        {
            "id": 2,
            "method": "order.validate",
            "params": {
                "account": "A1",
                "symbol": "BTC-USD",
                "side": "buy",
                "qty": "1",
                "price": "50000",
            },
            "t": 1,
        },
    ]
    replay_file.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    assert await riskctl(gw, TRADER, "replay", str(replay_file), "--json") == 0
    report = orjson.loads(capsys.readouterr().out)
    assert report["errors"] == {"BAD_REQUEST": 1} and report["ok"] == 1


async def test_emergency_alone_when_run_then_shows_the_state(
    gw: RunningGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await riskctl(gw, ADMIN, "emergency") == 0
    assert "NORMAL" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "clients.riskctl", "--help"],
        ["-m", "clients.riskctl", "emergency", "--help"],
        ["-m", "gateway", "--help"],
        ["-m", "gateway", "inspect", "{state}"],
    ],
)
def test_command_when_reader_closed_the_pipe_then_no_traceback(
    argv: list[str], tmp_path: Path
) -> None:
    """``| head`` that stopped reading: the command ends quietly."""
    argv = [arg.replace("{state}", str(tmp_path)) for arg in argv]
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to stdout fails with EPIPE
    try:
        done = subprocess.run(
            [sys.executable, *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert b"Traceback" not in done.stderr, done.stderr.decode()
    assert done.returncode in (0, 1, 2), done.stderr.decode()


# -------------------------------------------------------------------- record


async def test_record_live_when_decisions_made_then_written_as_validate_lines(
    gw: RunningGateway,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    subscribed = asyncio.Event()
    deliver = gw.gateway.fanout.deliver_subscription

    def deliver_and_tell(sub: Any) -> None:
        deliver(sub)
        subscribed.set()

    monkeypatch.setattr(gw.gateway.fanout, "deliver_subscription", deliver_and_tell)
    out = tmp_path / "recorded.ndjson"
    args = ("record", "--out", str(out), "--live", "--duration", "1.5")
    recording = asyncio.create_task(riskctl(gw, VIEWER, *args))
    async with asyncio.timeout(10):
        await subscribed.wait()
    trader = await gw.client(TRADER)
    order = {"account": "A1", "symbol": "BTC-USD", "side": "buy", "qty": "2", "price": "50000"}
    await trader.ok("order.validate", order)
    await trader.ok("order.validate", {**order, "side": "sell", "qty": "3"})
    assert await recording == 0
    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [line["params"] for line in lines] == [order, {**order, "side": "sell", "qty": "3"}]
    assert [line["id"] for line in lines] == [1, 2]
    assert all(line["method"] == "order.validate" for line in lines)
    assert 0 <= lines[0]["t"] <= lines[1]["t"]
    assert "recorded 2 decision(s)" in capsys.readouterr().err
    # What was recorded replays.
    assert await riskctl(gw, TRADER, "replay", str(out), "--max", "--json") == 0
    assert orjson.loads(capsys.readouterr().out)["decisions"] == {"accept": 2, "reject": 0}


async def test_record_when_state_dir_then_points_to_the_server_tool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("record", "--out", str(tmp_path / "x"), "--state-dir", str(tmp_path))
    assert await riskctl(None, None, *args) == 2
    assert one_error_line(capsys.readouterr().err) == (
        "use: risk-gateway record STATE_DIR --out FILE"
    )


async def test_record_when_trader_token_then_exit_1_forbidden(
    gw: RunningGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("record", "--out", str(tmp_path / "x"), "--live", "--duration", "1")
    assert await riskctl(gw, TRADER, *args) == 1
    assert "FORBIDDEN" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


async def test_emergency_when_set_by_riskctl_then_other_connections_get_the_push(
    gw: RunningGateway,
) -> None:
    watcher: TestClient = await gw.client(VIEWER)
    assert await riskctl(gw, ADMIN, "emergency", "halted", "--reason", "drill") == 0
    push = await watcher.next_push("emergency")
    assert push["data"]["mode"] == "halted" and push["data"]["reason"] == "drill"


def test_state_when_80_columns_then_no_figure_or_symbol_is_cut() -> None:
    from rich.console import Console

    from clients.riskctl import render_state

    qty = "1234567890123456.789012345678901"
    price = "9876543210987654.321098765432109"
    symbol = "VERY-LONG-SYMBOL-NAME-PERP-2027"
    state = {
        "emergency": {"mode": "normal", "reason": "", "actor": "gateway", "version": 0},
        "accounts": {
            "DESK-ACCOUNT-0001": {
                "positions": {symbol: {"qty": qty, "price": price}},
                "gross_exposure": "12193263113702179522618503273386678859448921",
                "reserved_exposure": "0",
                "stale": False,
            }
        },
        "gross_exposure": "12193263113702179522618503273386678859448921",
        "limits_version": 1,
    }
    for width in (80, 200):
        console = Console(width=width, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
        console.print(render_state(state, width))
        text = console.export_text()
        for figure in (qty, price, symbol, "12193263113702179522618503273386678859448921"):
            assert any(figure in line for line in text.splitlines()), (width, figure, text)
        assert "…" not in text


async def test_client_example_when_run_against_a_gateway_then_every_step_prints(
    gw: RunningGateway,
) -> None:
    """The runnable example of docs/client.md, as a user runs it."""
    env = {**os.environ, "RISKGW_URL": gw.url, "RISKGW_TOKEN": TRADER}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clients.examples.client_example",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[:5] == [
        "mode normal",
        "decision accept []",
        "reserved accept True",
        "released True",
        "error FORBIDDEN",
    ], out.decode()
    # Pushes may be coalesced (PROTOCOL section 5): one of the latest values.
    assert lines[5] in ("exposure push 100000", "exposure push 150000"), out.decode()
