"""Graceful shutdown and start-up refusals, with a real ``risk-gateway serve`` process.

SIGTERM under load: exit 0, clients see 1001, a restart has every acknowledged
update, and ``inspect`` finds a snapshot and no damage. A second gateway on the
same state directory, and a config file with an unknown key, are refused at
once with a clear message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from tests.gwprocess import GatewayProcess, write_config
from tests.wsclient import TestClient

SYMBOLS = [f"S{i}" for i in range(6)]


class AckLedger:
    """Each symbol's qty only rises, so the recovered qty must lie between the
    last acknowledged and the last sent."""

    def __init__(self) -> None:
        self.counter = 0
        self.sent: dict[str, int] = {}
        self.acked: dict[str, int] = {}

    def next_update(self) -> tuple[str, int]:
        self.counter += 1
        symbol = SYMBOLS[self.counter % len(SYMBOLS)]
        self.sent[symbol] = self.counter
        return symbol, self.counter

    def ack(self, symbol: str, qty: int) -> None:
        self.acked[symbol] = max(qty, self.acked.get(symbol, 0))

    def check(self, state: dict[str, Any]) -> None:
        positions = state["accounts"].get("A1", {}).get("positions", {})
        assert set(positions) <= set(self.sent)
        for symbol, acked in self.acked.items():
            recovered = int(positions[symbol]["qty"])
            assert acked <= recovered <= self.sent[symbol], (symbol, acked, recovered)


async def stream(client: TestClient, ledger: AckLedger, in_flight: int = 32) -> None:
    """Pipeline position updates until the connection drops."""

    async def one() -> None:
        symbol, qty = ledger.next_update()
        params = {"account": "A1", "symbol": symbol, "qty": str(qty), "price": "10"}
        response = await client.call("position.update", params, timeout=30)
        if response["status"] == "ok":
            ledger.ack(symbol, qty)

    tasks: set[asyncio.Task[None]] = set()
    with contextlib.suppress(Exception):
        while client.ws.close_code is None:
            while len(tasks) < in_flight:
                task = asyncio.create_task(one())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )


async def test_sigterm_when_a_client_never_answers_the_close_then_stop_not_held_up(
    tmp_path: Path,
) -> None:
    """websockets waits 10 s for a closing handshake by default; the gateway
    bounds it (docs/operations.md), so one silent client cannot hold up a stop."""
    config = write_config(tmp_path / "gw.toml", tmp_path / "state")
    proc = await GatewayProcess.start(config)
    try:
        host, port = proc.url.split("/")[2].split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            (
                f"GET /v1/ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\nAuthorization: Bearer trader-token\r\n\r\n"
            ).encode()
        )
        assert b" 101 " in await reader.readline()
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)  # the emergency push has begun: authenticated
        # From now on this client reads nothing and never answers a close.
        started = time.monotonic()
        proc.terminate()
        assert await proc.wait(timeout=30) == 0
        # Well under websockets' own 10 s close timeout.
        assert time.monotonic() - started < 7
        writer.close()
    finally:
        if proc.proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_sigterm_while_streaming_then_exit_0_clients_see_1001_and_every_ack_survives(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    config = write_config(tmp_path / "gw.toml", state_dir)
    proc = await GatewayProcess.start(config)
    ledger = AckLedger()
    try:
        trader = await TestClient.open(proc.url, "trader-token")
        admin = await TestClient.open(proc.url, "admin-token")
        await admin.ok("subscribe", {"channels": ["alerts", "exposure"]})
        streamer = asyncio.create_task(stream(trader, ledger))
        async with asyncio.timeout(20):
            while len(ledger.acked) < len(SYMBOLS) or ledger.counter < 300:
                await asyncio.sleep(0.02)
        proc.terminate()
        assert await proc.wait() == 0
        async with asyncio.timeout(10):
            await streamer
        for client in (trader, admin):
            await asyncio.wait_for(client.ws.wait_closed(), 5)
            assert client.ws.close_code == 1001, client.ws.close_code
    finally:
        if proc.proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert sum(ledger.acked.values()) > 0

    # A clean stop leaves a snapshot covering everything, and no damage.
    inspected = await asyncio.to_thread(run_cli, "inspect", str(state_dir), "--json")
    assert inspected.returncode == 0, inspected.stderr
    report = orjson.loads(inspected.stdout)
    assert report["damage"] is None
    assert report["torn_tail"] is None
    assert report["snapshots"], report
    assert all(snapshot["valid"] for snapshot in report["snapshots"])
    assert report["snapshot_seq"] == report["last_seq"]
    assert report["records"] == 0, "records after the final snapshot"
    assert report["emergency"]["mode"] == "normal"
    assert report["positions"] == len(SYMBOLS)

    again = await GatewayProcess.start(config)
    try:
        client = await TestClient.open(again.url, "admin-token")
        state = await client.ok("state.get")
        ledger.check(state)
        assert state["emergency"]["mode"] == "normal"
        await client.close()
    finally:
        again.terminate()
        assert await again.wait() == 0


async def test_second_gateway_on_same_state_dir_then_exits_non_zero_at_once(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "gw.toml", tmp_path / "state")
    first = await GatewayProcess.start(config)
    try:
        # The first keeps the lock throughout: a second that waited for it
        # instead of exiting would never end, and the run's timeout fails it.
        second = await asyncio.to_thread(run_cli, "serve", "--config", str(config), timeout=20)
        assert second.returncode != 0
        assert "another gateway" in second.stderr, second.stderr
        assert "listening" not in second.stdout
        # The first one is unharmed.
        client = await TestClient.open(first.url, "admin-token")
        assert (await client.ok("ping"))["ts"]
        await client.close()
    finally:
        first.terminate()
        assert await first.wait() == 0


async def test_config_with_unknown_key_then_exit_2_with_one_line_naming_it(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "gw.toml", tmp_path / "state")
    text = config.read_text().replace("heartbeat_s = 1", "heartbeat_s = 1\nmax_conections = 5")
    config.write_text(text)
    result = await asyncio.to_thread(run_cli, "serve", "--config", str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "server.max_conections" in lines[0]
    assert "unknown key" in lines[0]
    assert not (tmp_path / "state").exists(), "a refused config must not touch the state dir"
