"""Acknowledged admin changes survive a crash at any moment, with their version.

A change away from safety (``limits.set``, an emergency change towards
``normal``) takes effect only once its record is fsynced. A snapshot taken
while it waits for that fsync covers its sequence number, so the snapshot
must hold the change too: otherwise recovery skips the record and the
acknowledged change is gone, and its version is handed out again for
different content (PROTOCOL section 9).
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Limits
from gateway.core.engine import RiskEngine
from gateway.persistence import FileOps, Store
from protocol.codes import Mode
from tests.conftest import ADMIN, GatewayFactory, RunningGateway
from tests.statedir import wall_clock_ms


def hold_fsyncs(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """From now on every journal fdatasync waits until the returned event is set."""
    gate = threading.Event()
    real_fdatasync = FileOps.fdatasync

    def gated_fdatasync(self: FileOps, fd: int) -> None:
        gate.wait(10)
        real_fdatasync(self, fd)

    monkeypatch.setattr(FileOps, "fdatasync", gated_fdatasync)
    return gate


def recovered(state_dir: Path, copy: Path) -> RiskEngine:
    """The state a restart would find if the gateway were killed now."""
    shutil.copytree(state_dir, copy)
    (copy / "LOCK").unlink()
    manager = RiskEngine(limits=Limits(), now_ms=0)
    store = Store(manager, copy, clock=wall_clock_ms)
    store.open()
    return manager


async def snapshot_while_waiting(
    gw: RunningGateway, monkeypatch: pytest.MonkeyPatch, method: str, params: dict[str, Any]
) -> dict[str, Any]:
    """Send an admin change, take a snapshot while its fsync is held, then let
    both finish; returns the change's answer."""
    admin = await gw.client(ADMIN)
    store = gw.gateway.store
    assert store is not None
    gate = hold_fsyncs(monkeypatch)
    change = asyncio.create_task(admin.call(method, params))
    # The change's record is appended once the request is read; wait for it.
    appended = store.last_seq
    async with asyncio.timeout(10):
        while store.last_seq == appended:
            await asyncio.sleep(0.005)
    snapshot = asyncio.create_task(store.snapshot_now())
    await asyncio.sleep(0)  # the snapshot is captured now, with the change in flight
    gate.set()
    response = await change
    await snapshot
    assert response["status"] == "ok", response
    result: dict[str, Any] = response["result"]
    return result


async def test_limits_set_when_snapshot_taken_before_its_fsync_then_survives_a_crash(
    make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gw = await make_gateway(state_dir=tmp_path / "state")
    answer = await snapshot_while_waiting(
        gw, monkeypatch, "limits.set", {"version": 1, "limits": {"max_position": "7"}}
    )
    assert answer["version"] == 2
    manager = recovered(tmp_path / "state", tmp_path / "copy")
    assert manager.limits_view() == answer


async def test_emergency_normal_when_snapshot_taken_before_its_fsync_then_survives_a_crash(
    make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gw = await make_gateway(state_dir=tmp_path / "state")
    admin = await gw.client(ADMIN)
    await admin.ok("emergency.set", {"mode": "halted", "reason": "drill"})
    answer = await snapshot_while_waiting(
        gw, monkeypatch, "emergency.set", {"mode": "normal", "reason": ""}
    )
    assert answer["mode"] == "normal"
    manager = recovered(tmp_path / "state", tmp_path / "copy")
    assert manager.gateway_mode.mode is Mode.NORMAL
    assert manager.emergency_version == answer["version"]


async def test_account_normal_when_snapshot_taken_before_its_fsync_then_survives_a_crash(
    make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gw = await make_gateway(state_dir=tmp_path / "state")
    admin = await gw.client(ADMIN)
    await admin.ok("emergency.set", {"mode": "halted", "reason": "review", "account": "A1"})
    answer = await snapshot_while_waiting(
        gw, monkeypatch, "emergency.set", {"mode": "normal", "reason": "", "account": "A1"}
    )
    assert answer["accounts"] == {}
    manager = recovered(tmp_path / "state", tmp_path / "copy")
    assert manager.emergency_view()["accounts"] == {}
    assert manager.emergency_version == answer["version"]


async def test_gateway_own_halt_while_admin_reopens_then_versions_are_never_reused(
    make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # While an admin's change of account A1 towards normal waits for its
    # fsync, the gateway reduces itself (a breach). Each change gets a version
    # of its own.
    gw = await make_gateway(limits={"max_exposure": "1000", "auto_reduce_on_breach": True})
    admin = await gw.client(ADMIN)
    halted = await admin.ok("emergency.set", {"mode": "halted", "reason": "r", "account": "A1"})
    seen: dict[int, Any] = {halted["version"]: (halted["mode"], halted["accounts"])}
    gate = hold_fsyncs(monkeypatch)
    reopen = asyncio.create_task(
        admin.call("emergency.set", {"mode": "normal", "reason": "", "account": "A1"})
    )
    store = gw.gateway.store
    assert store is not None
    appended = store.last_seq
    async with asyncio.timeout(10):
        while store.last_seq == appended:
            await asyncio.sleep(0.005)
    breach = asyncio.create_task(
        admin.call(
            "position.update", {"account": "A2", "symbol": "X", "qty": "100", "price": "100"}
        )
    )
    # The breach's update and the gateway's own reduction are appended
    # together; wait for them, so both changes are in flight at once.
    appended = store.last_seq
    async with asyncio.timeout(10):
        while store.last_seq == appended:
            await asyncio.sleep(0.005)
    gate.set()
    reopened = (await reopen)["result"]
    assert (await breach)["status"] == "ok"
    pushes = []
    while not admin.channel("emergency").empty():
        pushes.append((await admin.next_push("emergency"))["data"])
    final = await admin.ok("emergency.get")
    for view in [reopened, *pushes, final]:
        content = (view["mode"], view["accounts"])
        assert seen.setdefault(view["version"], content) == content, (seen, view)
    assert final["version"] == max(seen)
    assert final["mode"] == "reducing" and final["accounts"] == {}
