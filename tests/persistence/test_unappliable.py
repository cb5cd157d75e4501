"""Recovery never fails on what it reads (PROTOCOL section 9).

A journal record or a snapshot that is whole and checksummed but cannot be
applied starts the gateway halted naming it: never a traceback, never a
gateway that cannot start; ``risk-gateway inspect`` reports it too.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.config import Limits
from gateway.core.engine import RiskEngine
from gateway.persistence import Journal, Store, recover, snapshot_name
from gateway.persistence.framing import snapshot_bytes
from protocol.codes import Mode
from tests.gwprocess import GatewayProcess, write_config
from tests.statedir import wall_clock_ms
from tests.wsclient import TestClient


def pos(i: int, qty: str | None = None) -> dict[str, Any]:
    return {"t": "pos", "a": "A1", "s": f"S{i}", "q": qty or str(i), "p": "10", "ts": i}


async def write_journal(state_dir: Path, records: list[dict[str, Any]]) -> None:
    """Checksummed, durable records exactly as given, as a journal writes them."""
    state_dir.mkdir(parents=True, exist_ok=True)
    journal = Journal(state_dir, recover(state_dir), snapshot_source=dict)
    async with asyncio.TaskGroup() as tasks:
        await journal.start(tasks)
        seq = 0
        for record in records:
            seq = journal.append(record)
        await journal.durable(seq)
        await journal.close(snapshot=False)


def opened(state_dir: Path) -> tuple[RiskEngine, Any]:
    manager = RiskEngine(limits=Limits(), now_ms=0)
    store = Store(manager, state_dir, clock=wall_clock_ms)
    recovered = store.open()
    return manager, recovered


@pytest.mark.parametrize(
    "bad",
    [
        pos(4, qty="abc"),  # not a decimal
        {"t": "no-such-record", "x": 1},  # a type this gateway never writes
        {"t": "pos", "a": "A1"},  # keys missing
        {"t": "emg", "a": None, "m": "panic", "r": "", "by": "x", "at": 1, "v": 9},
    ],
)
async def test_record_that_cannot_be_applied_when_starting_then_halted_naming_it(
    tmp_path: Path, bad: dict[str, Any]
) -> None:
    state_dir = tmp_path / "state"
    await write_journal(state_dir, [pos(1), pos(2), pos(3), bad, pos(5)])
    manager, recovered = opened(state_dir)
    assert recovered.damage is not None
    assert "record 4 cannot be applied" in recovered.damage.detail
    assert recovered.damage.file.startswith("journal-")
    assert manager.enforced_mode(None) is Mode.HALTED
    # The state is the records before it, and nothing of it or after it.
    positions = manager.state_view()["accounts"]["A1"]["positions"]
    assert sorted(positions) == ["S1", "S2", "S3"]


async def test_snapshot_that_cannot_be_loaded_when_an_older_one_exists_then_it_is_used(
    tmp_path: Path, tasks: asyncio.TaskGroup
) -> None:
    state_dir = tmp_path / "state"
    manager = RiskEngine(limits=Limits(), now_ms=0)
    store = Store(manager, state_dir, clock=wall_clock_ms, snapshot_every=3)
    store.open()
    await store.start(tasks)
    from decimal import Decimal

    from protocol.messages import PositionUpdate

    for i in range(1, 8):
        manager.update_position(
            PositionUpdate(account="A1", symbol=f"S{i}", qty=Decimal(i), price=Decimal(10)),
            wall_clock_ms(),
        )
        await store.durable(store.commit())
    await store.close(snapshot=False)
    newest = max(state_dir.glob("snapshot-*.snap"))
    seq = int(newest.name[9:29])
    broken = manager.snapshot()
    broken["accounts"]["A1"]["positions"][0][1] = "abc"  # whole and checksummed, not loadable
    newest.write_bytes(snapshot_bytes(seq, orjson.dumps(broken, default=str)))
    assert newest.name == snapshot_name(seq)

    fresh, recovered = opened(state_dir)

    assert recovered.damage is not None and recovered.damage.file == newest.name
    assert "cannot be loaded" in recovered.damage.detail
    assert fresh.enforced_mode(None) is Mode.HALTED
    positions = fresh.state_view()["accounts"]["A1"]["positions"]
    assert sorted(positions) == [f"S{i}" for i in range(1, 8)]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )


async def test_gateway_process_when_journal_holds_an_unappliable_record_then_starts_halted(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    await write_journal(state_dir, [pos(1), pos(2, qty="abc"), pos(3)])
    inspected = await asyncio.to_thread(run_cli, "inspect", str(state_dir))
    assert inspected.returncode == 1, inspected.stderr
    assert "record 2 cannot be applied" in inspected.stdout
    assert "Traceback" not in inspected.stderr + inspected.stdout
    config = write_config(tmp_path / "gw.toml", state_dir)
    proc = await GatewayProcess.start(config)
    try:
        admin = await TestClient.open(proc.url, "admin-token")
        view = await admin.ok("emergency.get")
        assert view["mode"] == "halted" and "record 2 cannot be applied" in view["reason"]
        await admin.close()
    finally:
        proc.terminate()
        assert await proc.wait() == 0
    assert "Traceback" not in await proc.stderr_text()
    # The next start recovers the same halted state, without meeting it again.
    again = await asyncio.to_thread(run_cli, "inspect", str(state_dir), "--json")
    report = orjson.loads(again.stdout)
    assert report["damage"] is None and report["emergency"]["mode"] == "halted"
