"""Section 10 end to end: real member processes on one real Redis."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.cluster.harness import ADMIN, TRADER, Cluster, MemberProcess
from tests.cluster.redisproc import RedisProcess, require_redis
from tests.wsclient import TestClient

ORDER = {"symbol": "BTC-USD", "side": "buy", "price": "50000"}


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    require_redis()
    running = Cluster(tmp_path, {"m1": ("A1",), "m2": ("B1",)}, max_exposure="1000000")
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def open_client(member: MemberProcess, token: str) -> TestClient:
    return await TestClient.open(member.url, token)


def healthz(member: MemberProcess) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(member.http + "/healthz", timeout=5) as answer:
            return answer.status, orjson.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, orjson.loads(error.read())


async def next_live_push(client: TestClient, channel: str) -> dict[str, Any]:
    """The next push on ``channel`` that is not a snapshot."""
    while True:
        push = await client.next_push(channel)
        if not push.get("snapshot"):
            return push


async def eventually(check: Any, timeout: float = 5.0) -> Any:
    """Poll ``check`` (sync or async) until it returns a truthy value."""
    async with asyncio.timeout(timeout):
        while True:
            value = check()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            await asyncio.sleep(0.02)


async def test_another_members_account_is_answered_with_its_owner(cluster: Cluster) -> None:
    client = await open_client(cluster.members["m1"], TRADER)
    try:
        error = await client.error("order.validate", {"account": "B1", "qty": "1", **ORDER})
        assert error["code"] == "WRONG_GATEWAY"
        assert error["owner"] == {"name": "m2", "url": cluster.members["m2"].url}
        assert "m2" in error["message"]
        error = await client.error("state.get", {"account": "B1"})
        assert error["owner"]["name"] == "m2"
        admin = await open_client(cluster.members["m1"], ADMIN)
        try:
            error = await admin.error("state.get", {"account": "Z9"})
        finally:
            await admin.close()
        assert error["code"] == "WRONG_GATEWAY" and error["owner"] is None
        accepted = await client.ok("order.validate", {"account": "A1", "qty": "1", **ORDER})
        assert accepted["decision"] == "accept"
    finally:
        await client.close()


async def test_reservations_name_their_member_and_route_release(cluster: Cluster) -> None:
    m1 = await open_client(cluster.members["m1"], TRADER)
    m2 = await open_client(cluster.members["m2"], TRADER)
    try:
        held = await m1.ok(
            "order.validate", {"account": "A1", "qty": "1", "reserve": True, **ORDER}
        )
        assert held["reservation_id"].startswith("m1:")
        error = await m2.error("reservation.release", {"reservation_id": held["reservation_id"]})
        assert error["code"] == "WRONG_GATEWAY" and error["owner"]["name"] == "m1"
        released = await m1.ok("reservation.release", {"reservation_id": held["reservation_id"]})
        assert released["released"] is True
        unknown = await m1.error("reservation.release", {"reservation_id": "m9:R0123456789abcdef"})
        assert unknown["code"] == "WRONG_GATEWAY" and unknown["owner"] is None
    finally:
        await m1.close()
        await m2.close()


async def test_cluster_get_lists_members_and_hides_figures_from_traders(cluster: Cluster) -> None:
    admin = await open_client(cluster.members["m1"], ADMIN)
    trader = await open_client(cluster.members["m2"], TRADER)
    try:
        seen = await admin.ok("cluster.get")
        assert seen["name"] == "m1"
        members = {m["name"]: m for m in seen["members"]}
        assert set(members) == {"m1", "m2"}
        assert members["m2"]["accounts"] == ["B1"] and members["m2"]["alive"] is True
        assert members["m2"]["url"] == cluster.members["m2"].url
        assert {"credit", "exposure"} <= set(members["m1"])
        for member in (await trader.ok("cluster.get"))["members"]:
            assert "credit" not in member and "exposure" not in member
        status, health = healthz(cluster.members["m2"])
        assert status == 200 and health["cluster"]["name"] == "m2"
        assert health["cluster"]["reachable"] is True
    finally:
        await admin.close()
        await trader.close()


async def test_an_emergency_change_on_one_member_binds_and_reaches_the_others(
    cluster: Cluster,
) -> None:
    admin = await open_client(cluster.members["m1"], ADMIN)
    trader = await open_client(cluster.members["m2"], TRADER)
    try:
        await trader.ok("subscribe", {"channels": ["emergency"]})
        changed = await admin.ok("emergency.set", {"mode": "halted", "reason": "drill"})
        push = await next_live_push(trader, "emergency")
        assert push["data"]["mode"] == "halted" and push["data"]["version"] == changed["version"]
        decision = await trader.ok("order.validate", {"account": "B1", "qty": "1", **ORDER})
        assert decision["decision"] == "reject"
        assert [r["code"] for r in decision["reasons"]] == ["EMERGENCY_HALTED"]
        # Back to normal from the other member: one version for the cluster.
        admin2 = await open_client(cluster.members["m2"], ADMIN)
        try:
            lifted = await admin2.ok("emergency.set", {"mode": "normal", "reason": "done"})
        finally:
            await admin2.close()
        assert lifted["version"] == changed["version"] + 1
        here = await eventually(
            lambda: admin.ok("emergency.get"),
        )
        assert here["mode"] == "normal" and here["version"] == lifted["version"]
    finally:
        await admin.close()
        await trader.close()


async def test_limits_are_one_version_for_the_cluster(cluster: Cluster) -> None:
    a1 = await open_client(cluster.members["m1"], ADMIN)
    a2 = await open_client(cluster.members["m2"], ADMIN)
    try:
        current = await a1.ok("limits.get")
        changed = await a1.ok(
            "limits.set", {"version": current["version"], "limits": {"max_order_qty": "5"}}
        )
        assert changed["version"] == current["version"] + 1
        stale = await a2.error(
            "limits.set", {"version": current["version"], "limits": {"max_order_qty": "7"}}
        )
        assert stale["code"] == "CONFLICT"
        there = await a2.ok("limits.get")
        assert there["version"] == changed["version"]
        assert there["limits"]["max_order_qty"] == "5"
    finally:
        await a1.close()
        await a2.close()


async def test_orders_on_two_members_never_together_pass_max_exposure(cluster: Cluster) -> None:
    """Each member borrows credit for an order that does not fit; the
    credits sum to at most max_exposure, so reservations cannot overshoot."""
    m1 = await open_client(cluster.members["m1"], TRADER)
    m2 = await open_client(cluster.members["m2"], TRADER)
    admin = await open_client(cluster.members["m1"], ADMIN)
    try:
        # 2 x 12 BTC at 50000 = 600000 each: both fit alone, not together.
        order = {"qty": "12", "reserve": True, **ORDER}
        first, second = await asyncio.gather(
            m1.ok("order.validate", {"account": "A1", **order}),
            m2.ok("order.validate", {"account": "B1", **order}),
        )
        decisions = sorted([first["decision"], second["decision"]])
        assert decisions == ["accept", "reject"]
        rejected = first if first["decision"] == "reject" else second
        codes = [r["code"] for r in rejected["reasons"]]
        assert codes == ["MAX_EXPOSURE"]
        assert "credit" in rejected["reasons"][0]["message"]
        # A smaller order still fits the room that is left.
        # The winner holds its 600000 plus credit_high (10%) of headroom: 5
        # BTC (250000) fits the 300000 left; 7 (350000) would not.
        too_big = {"qty": "7", "reserve": True, **ORDER}
        small = {"qty": "5", "reserve": True, **ORDER}
        loser = "B1" if rejected is second else "A1"
        client = m2 if loser == "B1" else m1
        refused = await client.ok("order.validate", {"account": loser, **too_big})
        assert refused["decision"] == "reject"
        fits = await client.ok("order.validate", {"account": loser, **small})
        assert fits["decision"] == "accept"
        members = (await admin.ok("cluster.get"))["members"]
        credits = sum(Decimal(m["credit"]) for m in members)
        assert credits <= Decimal("1000000")
    finally:
        await m1.close()
        await m2.close()
        await admin.close()


async def test_a_member_fences_itself_while_redis_hangs_and_recovers(cluster: Cluster) -> None:
    trader = await open_client(cluster.members["m1"], TRADER)
    admin = await open_client(cluster.members["m1"], ADMIN)
    try:
        await trader.ok("subscribe", {"channels": ["alerts"]})
        cluster.redis.pause()
        try:

            async def rejected() -> bool:
                decision = await trader.ok("order.validate", {"account": "A1", "qty": "1", **ORDER})
                return decision["decision"] == "reject" and [
                    r["code"] for r in decision["reasons"]
                ] == ["CLUSTER_UNAVAILABLE"]

            await eventually(rejected, timeout=3)
            status, health = healthz(cluster.members["m1"])
            assert status == 503 and health["cluster"]["reachable"] is False
            emergency = await admin.ok("emergency.get")
            assert emergency["cluster"]["reachable"] is False and emergency["cluster"]["since"]
            error = await admin.error("emergency.set", {"mode": "halted", "reason": "x"})
            assert error["code"] == "UNAVAILABLE"
            # Position updates are still accepted and journaled.
            update = await trader.ok(
                "position.update",
                {"account": "A1", "symbol": "BTC-USD", "qty": "1", "price": "50000"},
            )
            assert update["qty"] == "1"
            alert = await next_live_push(trader, "alerts")
            assert alert["data"]["code"] == "CLUSTER_UNAVAILABLE"
            assert alert["data"]["level"] == "critical"
        finally:
            cluster.redis.resume()

        async def accepted() -> bool:
            decision = await trader.ok("order.validate", {"account": "A1", "qty": "1", **ORDER})
            return decision["decision"] == "accept"

        await eventually(accepted, timeout=5)
        assert healthz(cluster.members["m1"])[0] == 200
    finally:
        await trader.close()
        await admin.close()


async def test_a_member_refuses_to_start_with_an_account_a_live_member_owns(
    cluster: Cluster, tmp_path: Path
) -> None:
    rival = Cluster(tmp_path / "rival", {"m3": ("A1",)}, redis_url=cluster.redis.url)
    member = rival.members["m3"]
    with pytest.raises(RuntimeError, match="exited 2") as failed:
        await member.start()
    assert "account A1 is owned by member m1" in str(failed.value)


async def test_a_member_refuses_a_redis_that_does_not_fsync_every_write(tmp_path: Path) -> None:
    require_redis()
    lax = RedisProcess(tmp_path / "redis", fsync="everysec").start()
    try:
        lone = Cluster(tmp_path / "c", {"m1": ("A1",)}, redis_url=lax.url)
        with pytest.raises(RuntimeError, match="exited 2") as failed:
            await lone.members["m1"].start()
        assert "appendfsync always" in str(failed.value)
    finally:
        lax.stop()
