"""kill -9 under load: nothing acknowledged is lost, nothing unsent appears.

A client streams position updates (many in flight, so group commit is used)
and keeps a ledger of acknowledgements. Each symbol's quantity only rises, so
after a SIGKILL at a random moment and a restart, the recovered quantity of
every symbol must be at least the last acknowledged one and at most the last
sent one. Some iterations acknowledge an emergency change just before the kill;
the restart must show it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path
from typing import Any

import pytest

from tests.gwprocess import GatewayProcess, write_config
from tests.wsclient import TestClient

pytestmark = pytest.mark.crash

SYMBOLS = [f"S{i}" for i in range(8)]
ITERATIONS = 24
SEED = 20261123


class Ledger:
    def __init__(self) -> None:
        self.counter = 0
        self.sent: dict[str, int] = {}
        self.acked: dict[str, int] = {}
        self.mode = "normal"

    def next_update(self, rng: random.Random) -> tuple[str, int]:
        self.counter += 1
        symbol = rng.choice(SYMBOLS)
        self.sent[symbol] = self.counter
        return symbol, self.counter

    def ack(self, symbol: str, qty: int) -> None:
        if qty > self.acked.get(symbol, 0):
            self.acked[symbol] = qty


async def stream_updates(
    client: TestClient, ledger: Ledger, rng: random.Random, stop: asyncio.Event
) -> None:
    """Keep 32 updates in flight until stopped or the connection drops."""

    async def one() -> None:
        symbol, qty = ledger.next_update(rng)
        params = {"account": "A1", "symbol": symbol, "qty": str(qty), "price": "10"}
        response = await client.call("position.update", params, timeout=30)
        if response["status"] == "ok":
            ledger.ack(symbol, qty)

    in_flight: set[asyncio.Task[None]] = set()
    with contextlib.suppress(Exception):
        while not stop.is_set():
            while len(in_flight) < 32:
                task = asyncio.create_task(one())
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
    for task in list(in_flight):
        task.cancel()
    await asyncio.gather(*in_flight, return_exceptions=True)


def check_recovered(state: dict[str, Any], ledger: Ledger, iteration: int) -> None:
    positions = state["accounts"].get("A1", {}).get("positions", {})
    for symbol in set(positions) | set(ledger.acked):
        assert symbol in ledger.sent, f"iteration {iteration}: {symbol} was never sent"
        recovered = int(positions[symbol]["qty"]) if symbol in positions else 0
        acked = ledger.acked.get(symbol, 0)
        assert recovered >= acked, (
            f"iteration {iteration}: {symbol} recovered {recovered} < acknowledged {acked}"
        )
        assert recovered <= ledger.sent[symbol], (
            f"iteration {iteration}: {symbol} recovered {recovered} > sent {ledger.sent[symbol]}"
        )
    assert state["emergency"]["mode"] == ledger.mode, f"iteration {iteration}"


@pytest.mark.parametrize("fsync", ["always"])
async def test_kill9_under_load_when_restarted_then_every_ack_is_there(
    tmp_path: Path, fsync: str
) -> None:
    rng = random.Random(SEED)
    state_dir = tmp_path / "state"
    # Small snapshot interval so kills also land during snapshots and compaction.
    config = write_config(tmp_path / "gw.toml", state_dir, fsync=fsync, snapshot_every=700)
    ledger = Ledger()
    acked_total = 0
    for iteration in range(ITERATIONS):
        proc = await GatewayProcess.start(config)
        try:
            admin = await TestClient.open(proc.url, "admin-token")
            state = await admin.ok("state.get")
            check_recovered(state, ledger, iteration)
            if ledger.mode != "normal":
                await admin.ok("emergency.set", {"mode": "normal", "reason": ""})
                ledger.mode = "normal"
            trader = await TestClient.open(proc.url, "trader-token")
            stop = asyncio.Event()
            streamer = asyncio.create_task(stream_updates(trader, ledger, rng, stop))
            await asyncio.sleep(rng.uniform(0.05, 0.3))  # the random moment of the kill
            if iteration % 3 == 0:
                # An acknowledged emergency change right before the kill.
                await admin.ok("emergency.set", {"mode": "halted", "reason": f"drill {iteration}"})
                ledger.mode = "halted"
            proc.kill()
            await proc.wait()
            stop.set()
            await streamer
            acked_total = sum(1 for _ in ledger.acked)
            for client in (admin, trader):
                with contextlib.suppress(Exception):
                    await client.close()
        finally:
            if proc.proc.returncode is None:
                proc.kill()
                await proc.wait()
    # The last iteration's kill is checked by one more start.
    proc = await GatewayProcess.start(config)
    try:
        admin = await TestClient.open(proc.url, "admin-token")
        check_recovered(await admin.ok("state.get"), ledger, ITERATIONS)
        await admin.close()
    finally:
        proc.terminate()
        assert await proc.wait() == 0
    assert ledger.counter > ITERATIONS * 10, "the load was too light to mean anything"
    assert acked_total > 0
