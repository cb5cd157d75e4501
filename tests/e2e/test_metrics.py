"""Observability from outside: ``GET /metrics``, ``GET /healthz`` and the logs.

The metrics registry is per process and other tests use it too, so counters
are compared before and after; gauges are read from this test's gateway.
"""

from __future__ import annotations

import asyncio
import errno
import http.client
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.persistence import PersistenceError
from tests.conftest import ADMIN, TRADER, TRADER_B, VIEWER, GatewayFactory, RunningGateway
from tests.gwprocess import GatewayProcess, write_config
from tests.wsclient import TestClient

ORDER = {"account": "A1", "symbol": "BTC-USD", "side": "buy", "qty": "1", "price": "100"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def http_get(port: int, path: str) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


async def scrape(gw: RunningGateway) -> Samples:
    status, content_type, body = await asyncio.to_thread(http_get, gw.gateway.port, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_metrics_when_validations_errors_and_halt_then_counters_move_by_that_much(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(limits={"max_order_qty": "10", "max_order_notional": "5000"})
    trader = await gw.client(TRADER)
    other = await gw.client(TRADER_B)
    await gw.client(VIEWER)
    admin = await gw.client(ADMIN)
    await admin.ok("subscribe", {"channels": ["alerts", "decisions"]})
    await trader.ok(
        "position.update", {"account": "A1", "symbol": "ETH", "qty": "4", "price": "25"}
    )
    before = await scrape(gw)

    decisions = [await trader.ok("order.validate", ORDER) for _ in range(3)]
    decisions += [await trader.ok("order.validate", {**ORDER, "qty": "11"}) for _ in range(2)]
    decisions.append(await trader.ok("order.validate", {**ORDER, "qty": "60"}))  # two reasons
    assert (await other.error("order.validate", ORDER))["code"] == "FORBIDDEN"
    assert (await trader.error("order.validate", {**ORDER, "quantity": "1"}))["code"] == (
        "BAD_REQUEST"
    )
    assert (await trader.error("order.nope"))["code"] == "UNKNOWN_METHOD"
    await admin.ok("emergency.set", {"mode": "halted", "reason": "metrics drill"})
    decisions.append(await trader.ok("order.validate", ORDER))
    with pytest.raises(InvalidStatus):
        await connect(gw.url, additional_headers={"Authorization": "Bearer wrong"})
    state = await admin.ok("state.get")
    after = await scrape(gw)

    by_decision = Counter(d["decision"] for d in decisions)
    assert by_decision == {"accept": 3, "reject": 4}
    for decision, count in by_decision.items():
        assert moved(before, after, "riskgw_validations_total", decision=decision) == count
    reasons = Counter(r["code"] for d in decisions for r in d["reasons"])
    assert reasons["MAX_ORDER_QTY"] == 3 and reasons["MAX_ORDER_NOTIONAL"] == 1
    assert reasons["EMERGENCY_HALTED"] == 1
    for reason, count in reasons.items():
        assert moved(before, after, "riskgw_reject_reasons_total", reason=reason) == count
    # Latency: one observation per validation (a FORBIDDEN one never got that far).
    assert moved(before, after, "riskgw_validation_seconds_count") == len(decisions)
    assert moved(before, after, "riskgw_validation_seconds_sum") > 0
    assert value(after, "riskgw_validation_seconds_bucket", le="+Inf") >= len(decisions)
    # Requests by method and outcome.
    requests = "riskgw_requests_total"
    assert moved(before, after, requests, method="order.validate", code="ok") == len(decisions)
    assert moved(before, after, requests, method="order.validate", code="FORBIDDEN") == 1
    assert moved(before, after, requests, method="?", code="BAD_REQUEST") == 1
    assert moved(before, after, requests, method="?", code="UNKNOWN_METHOD") == 1
    assert moved(before, after, requests, method="emergency.set", code="ok") == 1
    assert moved(before, after, "riskgw_auth_failures_total", reason="bad_token") == 1
    # Gauges of this gateway.
    assert value(after, "riskgw_emergency_mode") == 2
    assert value(after, "riskgw_gross_exposure") == float(state["gross_exposure"]) == 100
    assert value(after, "riskgw_connections", role="trader") == 2
    assert value(after, "riskgw_connections", role="viewer") == 1
    assert value(after, "riskgw_connections", role="admin") == 1
    assert value(after, "riskgw_subscribers", channel="alerts") == 1
    assert value(after, "riskgw_subscribers", channel="decisions") == 1
    assert value(after, "riskgw_subscribers", channel="emergency") == 4
    assert ("riskgw_queued_bytes", frozenset()) in after
    assert ("riskgw_slow_consumer_evictions_total", frozenset()) in after
    # The journal: records, fsyncs and their time, the last group commit.
    assert value(after, "riskgw_journal_records_written") >= 2
    assert value(after, "riskgw_journal_fsyncs") >= 2
    assert value(after, "riskgw_journal_fsync_seconds_count") >= 2
    assert value(after, "riskgw_journal_batch_records_count") >= 2
    assert value(after, "riskgw_journal_last_batch_records") >= 1

    await admin.ok("emergency.set", {"mode": "reducing", "reason": "metrics drill"})
    assert value(await scrape(gw), "riskgw_emergency_mode") == 1
    await admin.ok("emergency.set", {"mode": "normal", "reason": ""})
    assert value(await scrape(gw), "riskgw_emergency_mode") == 0


async def wait_for_push(
    client: TestClient, channel: str, match: dict[str, Any], timeout: float = 5
) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            push = await client.next_push(channel, timeout=timeout)
            data: dict[str, Any] = push["data"]
            if all(data.get(key) == want for key, want in match.items()):
                return data


async def test_healthz_when_fsync_fails_then_503_unavailable_halted_and_alert(
    make_gateway: GatewayFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = await make_gateway()
    admin = await gw.client(ADMIN)
    await admin.ok("subscribe", {"channels": ["alerts"]})
    trader = await gw.client(TRADER)
    update = {"account": "A1", "symbol": "X", "qty": "1", "price": "10"}
    await trader.ok("position.update", update)
    status, _, body = await asyncio.to_thread(http_get, gw.gateway.port, "/healthz")
    assert (status, orjson.loads(body)["status"]) == (200, "ok")

    def broken_fdatasync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fdatasync", broken_fdatasync)
    response = await trader.call("position.update", {**update, "qty": "2"})
    assert response["error"]["code"] == "UNAVAILABLE", response
    # Never acknowledged, and every later write is refused at once.
    assert (await trader.error("position.update", {**update, "qty": "3"}))["code"] == "UNAVAILABLE"
    reserve = {**ORDER, "reserve": True}
    assert (await trader.error("order.validate", reserve))["code"] == "UNAVAILABLE"
    halt = {"mode": "halted", "reason": "x"}
    assert (await admin.error("emergency.set", halt))["code"] == "UNAVAILABLE"
    decision = await trader.ok("order.validate", ORDER)
    assert [r["code"] for r in decision["reasons"]] == ["EMERGENCY_HALTED"]

    emergency = await wait_for_push(admin, "emergency", {"mode": "halted"})
    assert emergency["actor"] == "gateway"
    assert "persistence" in emergency["reason"]
    alert = await wait_for_push(admin, "alerts", {"code": "PERSISTENCE_FAILURE"})
    assert alert["level"] == "critical"
    assert (await wait_for_push(trader, "emergency", {"mode": "halted"}))["actor"] == "gateway"

    status, _, body = await asyncio.to_thread(http_get, gw.gateway.port, "/healthz")
    health = orjson.loads(body)
    assert status == 503
    assert health["status"] == "failing"
    assert health["mode"] == "halted"
    assert "persistence failure" in health["reason"]
    assert os.strerror(errno.EIO) in health["reason"]
    assert value(await scrape(gw), "riskgw_emergency_mode") == 2
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("persistence failed" in m for m in messages)
    assert any("emergency change by gateway" in m and "halted" in m for m in messages)
    # A stop after a persistence failure says it was not clean.
    await gw.close_clients()
    with pytest.raises(PersistenceError):
        await gw.gateway.stop()


async def test_after_a_journal_failure_when_trading_goes_on_then_the_gateway_stays_up_and_pushes(
    make_gateway: GatewayFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Halted and refusing writes, the gateway still answers, pushes decisions
    # and alerts, expires reservations on time and releases a closed
    # connection's reservations: nothing after the failure may take it down.
    gw = await make_gateway(limits={"reservation_ttl_ms": 300})
    admin = await gw.client(ADMIN)
    await admin.ok("subscribe", {"channels": ["alerts", "decisions"]})
    trader = await gw.client(TRADER)
    await trader.ok("session.hello", {"cancel_on_disconnect": True})
    leaving = await gw.client(TRADER)
    await leaving.ok("session.hello", {"cancel_on_disconnect": True})
    expiring = await trader.ok("order.validate", {**ORDER, "reserve": True})
    held = await leaving.ok("order.validate", {**ORDER, "reserve": True})
    assert expiring["reservation_id"] and held["reservation_id"]

    def broken_fdatasync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fdatasync", broken_fdatasync)
    update = {"account": "A1", "symbol": "X", "qty": "1", "price": "10"}
    assert (await trader.error("position.update", update))["code"] == "UNAVAILABLE"
    await wait_for_push(admin, "alerts", {"code": "PERSISTENCE_FAILURE"})

    # A request the caller may not make at all is FORBIDDEN, failure or not.
    viewer = await gw.client(VIEWER)
    assert (await viewer.error("position.update", update))["code"] == "FORBIDDEN"
    decision = await trader.ok("order.validate", ORDER)
    assert decision["decision"] == "reject"
    pushed = await wait_for_push(admin, "decisions", {"account": "A1", "decision": "reject"})
    assert [r["code"] for r in pushed["reasons"]] == ["EMERGENCY_HALTED"]
    await leaving.close()
    alert = await wait_for_push(admin, "alerts", {"code": "CLIENT_DISCONNECTED"})
    assert "released 1 reservation" in alert["message"]
    # The first reservation's expiry comes and goes; the gateway still serves.
    async with asyncio.timeout(10):
        while (await admin.ok("state.get"))["accounts"]["A1"]["reserved_exposure"] != "0":
            await asyncio.sleep(0.05)
    assert (await trader.ok("ping"))["ts"]
    status, _, _ = await asyncio.to_thread(http_get, gw.gateway.port, "/healthz")
    assert status == 503
    await gw.close_clients()
    with pytest.raises(PersistenceError):
        await gw.gateway.stop()


# -------------------------------------------------------------------- logs


async def drive_logged_events(url: str) -> None:
    """A wrong token, a rejection, an emergency change and a limits change."""
    with pytest.raises(InvalidStatus):
        await connect(url, additional_headers={"Authorization": "Bearer wrong-token-xyz"})
    trader = await TestClient.open(url, "trader-token")
    admin = await TestClient.open(url, "admin-token")
    await trader.ok("order.validate", {**ORDER, "qty": "2000000"})
    await admin.ok("emergency.set", {"mode": "halted", "reason": "json log drill"})
    version = (await admin.ok("limits.get"))["version"]
    await admin.ok("limits.set", {"version": version, "limits": {"max_order_qty": "7"}})
    for client in (trader, admin):
        await client.close()


async def run_logged(tmp_path: Path, *args: str) -> list[str]:
    config = write_config(tmp_path / "gw.toml", tmp_path / "state")
    proc = await GatewayProcess.start(config, *args)
    try:
        await drive_logged_events(proc.url)
    finally:
        proc.terminate()
        assert await proc.wait() == 0
    return (await proc.stderr_text()).splitlines()


async def test_logs_when_json_format_then_one_object_per_line_with_who_and_why(
    tmp_path: Path,
) -> None:
    lines = await run_logged(tmp_path, "--log-format", "json", "--log-level", "debug")
    entries = [orjson.loads(line) for line in lines if line.strip()]
    assert entries and all(isinstance(entry, dict) for entry in entries)
    for entry in entries:
        assert {"ts", "level", "logger", "message"} <= set(entry), entry
        assert entry["ts"].endswith("Z")
    text = "\n".join(lines)
    for secret in ("wrong-token-xyz", "admin-token", "trader-token"):
        assert secret not in text
    messages = [(entry["level"], entry["message"]) for entry in entries]
    assert any(level == "warning" and "wrong token" in m for level, m in messages)
    assert any("ops-admin" in m and "halted" in m and "json log drill" in m for _, m in messages)
    assert any("limits change by ops-admin" in m and "max_order_qty" in m for _, m in messages)
    assert any(level == "debug" and "rejected" in m for level, m in messages)
    assert any(level == "info" and "stopped cleanly" in m for level, m in messages)


async def test_logs_when_level_warning_then_nothing_below_warning(tmp_path: Path) -> None:
    lines = await run_logged(tmp_path, "--log-format", "json", "--log-level", "warning")
    levels = [orjson.loads(line)["level"] for line in lines if line.strip()]
    assert "warning" in levels
    assert set(levels) <= {"warning", "error", "critical"}, levels


async def test_fsync_failure_when_next_validation_then_halt_pushed_before_its_answer(
    make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = await make_gateway()
    update = {"account": "A1", "symbol": "X", "qty": "1", "price": "10"}
    async with connect(
        gw.url, additional_headers={"Authorization": f"Bearer {TRADER}"}, compression=None
    ) as ws:

        async def call(request_id: int, method: str, params: dict[str, Any]) -> list[Any]:
            """The frames up to this request's answer, in the order they arrived."""
            frame = {"id": request_id, "method": method, "params": params}
            await ws.send(orjson.dumps(frame), text=True)
            seen = []
            while True:
                seen.append(orjson.loads(await ws.recv()))
                if seen[-1].get("id") == request_id:
                    return seen

        assert (await call(1, "position.update", update))[-1]["status"] == "ok"

        def broken_fdatasync(fd: int) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(os, "fdatasync", broken_fdatasync)
        failed = await call(2, "position.update", update)
        assert failed[-1]["error"]["code"] == "UNAVAILABLE"
        frames = failed + await call(3, "order.validate", ORDER)
        decision = frames[-1]["result"]
        assert [r["code"] for r in decision["reasons"]] == ["EMERGENCY_HALTED"]
        # The halt that explains the rejection came before it.
        halts = [
            f["data"]
            for f in frames[:-1]
            if f.get("channel") == "emergency" and f["data"]["mode"] == "halted"
        ]
        assert halts and halts[-1]["actor"] == "gateway", frames
        assert halts[-1]["version"] == decision["emergency_version"]
    with pytest.raises(PersistenceError):
        await gw.gateway.stop()
