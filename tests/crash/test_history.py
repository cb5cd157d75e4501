"""The last 100 alerts and decisions survive kill -9 (PROTOCOL section 5's
snapshots of ``alerts`` and ``decisions``).

A gateway that restarts ``reducing`` must still show the alert that says why,
and the decisions list must not start empty. Both the journal (no snapshot
since the changes) and a snapshot (one every few records) must carry them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest

from tests.gwprocess import GatewayProcess, write_config
from tests.wsclient import TestClient

pytestmark = pytest.mark.crash

# What a decision recovered from the journal repeats exactly (its exposure
# figures and, without a reservation, its versions are not journaled).
DECISION_KEYS = ("account", "symbol", "side", "qty", "price", "ts", "decision", "reasons")


async def snapshots(client: TestClient, *channels: str) -> dict[str, dict[str, Any]]:
    await client.ok("subscribe", {"channels": list(channels)})
    found = {}
    for channel in channels:
        push = await client.next_push(channel)
        assert push.get("snapshot") is True, push
        found[channel] = push["data"]
    return found


async def order(trader: TestClient, side: str, qty: str, **extra: Any) -> dict[str, Any]:
    params = {"account": "A1", "symbol": "BTC-USD", "side": side, "qty": qty, "price": "50000"}
    return await trader.ok("order.validate", {**params, **extra})


@pytest.mark.parametrize("snapshot_every", [100_000, 7], ids=["journal", "snapshots"])
async def test_after_kill9_the_last_alerts_and_decisions_come_back(
    tmp_path: Path, snapshot_every: int
) -> None:
    config = write_config(tmp_path / "gw.toml", tmp_path / "state", snapshot_every=snapshot_every)
    proc = await GatewayProcess.start(config)
    try:
        admin = await TestClient.open(proc.url, "admin-token")
        trader = await TestClient.open(proc.url, "trader-token")
        position = {"account": "A1", "symbol": "BTC-USD", "qty": "5", "price": "50000"}
        await trader.ok("position.update", position)
        await admin.ok(
            "emergency.set", {"account": "A1", "mode": "reducing", "reason": "desk drill 7"}
        )
        await admin.ok("emergency.set", {"account": "B9", "mode": "halted", "reason": "other desk"})
        # 130 decisions, alternately rejected (a buy grows a reducing account)
        # and accepted (a sell shrinks it); some reserve. The last 100 come back.
        for i in range(130):
            qty = f"0.{i + 1:03d}"
            if i % 2:
                await order(trader, "sell", qty, reserve=i % 3 == 0)
            else:
                await order(trader, "buy", qty)
        # An acknowledged change: every record before it is durable too.
        await trader.ok("position.update", {**position, "qty": "4.9"})
        before = await snapshots(admin, "alerts", "decisions")
        trader_before = await snapshots(trader, "alerts")
        proc.kill()
        await proc.wait()
        for client in (admin, trader):
            with contextlib.suppress(Exception):
                await client.close()

        proc = await GatewayProcess.start(config)
        admin = await TestClient.open(proc.url, "admin-token")
        trader = await TestClient.open(proc.url, "trader-token")
        state = await admin.ok("state.get")
        assert state["emergency"]["accounts"]["A1"]["mode"] == "reducing"
        after = await snapshots(admin, "alerts", "decisions")
        trader_after = await snapshots(trader, "alerts")

        # The alert that says why A1 is reducing is there, for staff and trader.
        why = [a for a in after["alerts"]["alerts"] if "desk drill 7" in a["message"]]
        assert len(why) == 1 and why[0]["account"] == "A1", after["alerts"]
        assert after["alerts"] == before["alerts"]
        # The trader still sees only what it may: nothing about B9.
        assert trader_after["alerts"] == trader_before["alerts"]
        assert any("desk drill 7" in a["message"] for a in trader_after["alerts"]["alerts"])
        assert not any(a.get("account") == "B9" for a in trader_after["alerts"]["alerts"])

        # The last 100 decisions, in order, each as it was answered.
        lived, recovered = before["decisions"]["decisions"], after["decisions"]["decisions"]
        assert len(lived) == len(recovered) == 100
        assert recovered[0]["qty"] == "0.031" and recovered[-1]["qty"] == "0.13"
        for was, now in zip(lived, recovered, strict=True):
            assert {k: now[k] for k in DECISION_KEYS} == {k: was[k] for k in DECISION_KEYS}
            assert now["reservation_id"] == was["reservation_id"]
            assert now["expires_at"] == was["expires_at"]
        assert {d["decision"] for d in recovered} == {"accept", "reject"}
        assert all(d["reasons"][0]["message"] for d in recovered if d["decision"] == "reject")
        await admin.close()
        await trader.close()
    finally:
        if proc.proc.returncode is None:
            proc.terminate()
            await proc.wait()
