"""``RedisState`` against a real Redis: each promise of the shared-state
interface, and the faults it must turn into ``SharedStateUnavailable``."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gateway.cluster.redis_state import RedisState, open_redis_state
from gateway.cluster.shared import (
    DurabilityRefused,
    NotForgettable,
    OwnershipRefused,
    SharedStateUnavailable,
)
from tests.cluster.redisproc import RedisProcess, require_redis

ALIVE = 60_000


async def test_durable_redis_is_accepted(shared: RedisState) -> None:
    await shared.check_durability()


async def test_redis_without_fsync_always_is_refused_naming_the_setting(tmp_path: Path) -> None:
    require_redis()
    server = RedisProcess(tmp_path / "lax", fsync="everysec").start()
    state = await open_redis_state(server.url, timeout_ms=500)
    try:
        with pytest.raises(DurabilityRefused, match=r"appendfsync 'everysec'.*appendfsync always"):
            await state.check_durability()
    finally:
        await state.close()
        server.stop()


async def test_join_claims_accounts_and_refuses_a_live_owner(shared: RedisState) -> None:
    first = await shared.join("m1", "ws://m1", ["A1", "A2"], alive_ms=ALIVE, epoch="e1")
    assert first.created and first.epoch == "e1"
    second = await shared.join("m2", "ws://m2", ["B1"], alive_ms=ALIVE, epoch="e2")
    assert not second.created and second.epoch == "e1"
    with pytest.raises(OwnershipRefused) as refused:
        await shared.join("m3", "ws://m3", ["C1", "A2"], alive_ms=ALIVE, epoch="e3")
    assert (refused.value.account, refused.value.owner, refused.value.url) == (
        "A2",
        "m1",
        "ws://m1",
    )
    members = {m.name: m for m in await shared.members(alive_ms=ALIVE)}
    assert set(members) == {"m1", "m2"}  # the refused join changed nothing
    assert members["m1"].accounts == ("A1", "A2") and members["m1"].alive


async def test_a_dead_owners_accounts_can_be_claimed(shared: RedisState) -> None:
    await shared.join("m1", "ws://m1", ["A1"], alive_ms=ALIVE, epoch="e1")
    await asyncio.sleep(0.03)
    await shared.join("m2", "ws://m2", ["A1"], alive_ms=10, epoch="e1")
    members = {m.name: m for m in await shared.members(alive_ms=10)}
    assert members["m2"].accounts == ("A1",) and members["m1"].accounts == ()


async def test_rejoining_drops_accounts_no_longer_listed(shared: RedisState) -> None:
    await shared.join("m1", "ws://m1", ["A1", "A2"], alive_ms=ALIVE, epoch="e1")
    await shared.join("m1", "ws://m1", ["A2"], alive_ms=ALIVE, epoch="e1")
    (member,) = await shared.members(alive_ms=ALIVE)
    assert member.accounts == ("A2",)


async def test_documents_are_versioned_and_tailed_in_order(shared: RedisState) -> None:
    assert await shared.read_document("emergency") is None
    assert (await shared.write_document("emergency", 0, '{"a":1}')).version == 1
    stale = await shared.write_document("emergency", 0, '{"a":2}')
    assert not stale.ok and stale.version == 1
    assert (await shared.write_document("emergency", 1, '{"a":3}', max_units=5)).ok
    stored = await shared.read_document("emergency")
    assert stored is not None and (stored.version, stored.body) == (2, '{"a":3}')
    tailed = await shared.tail({"emergency": 0, "limits": 0}, 10)
    assert [(d.name, d.version, d.body) for d in tailed] == [
        ("emergency", 1, '{"a":1}'),
        ("emergency", 2, '{"a":3}'),
    ]
    assert await shared.tail({"emergency": 2, "limits": 0}, 10) == []


async def test_tail_wakes_on_a_write(shared: RedisState, redis_server: RedisProcess) -> None:
    other = await open_redis_state(redis_server.url, timeout_ms=500)
    try:
        waiting = asyncio.ensure_future(shared.tail({"emergency": 0, "limits": 0}, 5000))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await other.write_document("limits", 0, "{}")
        tailed = await asyncio.wait_for(waiting, 2)
        assert [(d.name, d.version) for d in tailed] == [("limits", 1)]
    finally:
        await other.close()


async def test_restore_writes_only_a_higher_version(shared: RedisState) -> None:
    await shared.write_document("limits", 0, "one")
    await shared.write_document("limits", 1, "two")
    assert not await shared.restore_document("limits", 2, "old")
    assert await shared.restore_document("limits", 7, "seven", max_units=100)
    stored = await shared.read_document("limits")
    assert stored is not None and (stored.version, stored.body) == (7, "seven")
    assert (await shared.write_document("limits", 7, "eight")).version == 8
    tailed = await shared.tail({"emergency": 0, "limits": 6}, 10)
    assert [d.version for d in tailed] == [7, 8]


async def test_credit_never_sums_over_the_ceiling(shared: RedisState) -> None:
    await shared.write_document("limits", 0, "{}", max_units=1000)
    answers = await asyncio.gather(*(shared.credit(f"m{i}", 1, 400, "increase") for i in range(4)))
    assert sorted(a.units for a in answers) == [0, 200, 400, 400]
    assert max(a.total_units for a in answers) == sum(a.units for a in answers) == 1000
    # Replaying a request (same seq) changes nothing.
    again = await shared.credit("m0", 1, 999, "decrease")
    assert (again.units, again.seq) == (answers[0].units, 1)
    # A decrease is stored as asked; the freed room goes to the next increase.
    await shared.credit("m0", 2, 0, "decrease")
    grown = await shared.credit("m3", 2, 1000, "increase")
    assert grown.total_units == 1000 and grown.units == answers[3].units + answers[0].units


async def test_recovery_blocks_increases_until_every_member_reasserts(
    shared: RedisState, redis_server: RedisProcess
) -> None:
    await shared.join("m1", "ws://m1", [], alive_ms=ALIVE, epoch="e1")
    await shared.write_document("limits", 0, "{}", max_units=1000)
    await shared.credit("m1", 1, 300, "increase")
    redis_server.wipe()
    beat = await shared.beat("m1", exposure=None, applied={}, alive_ms=ALIVE)
    assert beat.epoch is None and beat.credit_units == 0
    assert await shared.begin_recovery(["m1", "m2"], "e2") == "e2"
    assert await shared.begin_recovery(["m1"], "e3") == "e2"
    await shared.restore_document("limits", 1, "{}", max_units=1000)
    blocked = await shared.credit("m1", 2, 500, "increase")
    assert blocked.units == 0 and blocked.recovering == ("m1", "m2")
    await shared.credit("m1", 3, 300, "reassert")
    await shared.credit("m2", 1, 100, "reassert")
    grown = await shared.credit("m1", 4, 500, "increase")
    assert (grown.units, grown.recovering) == (500, ())


async def test_forget_needs_a_member_unseen_for_long_enough(shared: RedisState) -> None:
    await shared.join("m1", "ws://m1", ["A1"], alive_ms=ALIVE, epoch="e1")
    await shared.write_document("limits", 0, "{}", max_units=1000)
    await shared.credit("m1", 1, 600, "increase")
    with pytest.raises(NotForgettable, match=r"seen \d+ ms ago"):
        await shared.forget("m1", min_unseen_ms=60_000)
    with pytest.raises(NotForgettable, match="no member m9"):
        await shared.forget("m9", min_unseen_ms=0)
    await asyncio.sleep(0.02)
    await shared.forget("m1", min_unseen_ms=5)
    assert await shared.members(alive_ms=ALIVE) == ()
    beat = await shared.beat("m1", exposure="1", applied={}, alive_ms=ALIVE)
    assert beat.forgotten and beat.total_units == 0 and beat.members == ()
    # Its credit is released, and it cannot borrow again until it rejoins.
    assert (await shared.credit("m1", 2, 600, "increase")).units == 0
    assert (await shared.credit("m2", 1, 1000, "increase")).units == 1000


async def test_acknowledged_writes_survive_a_sigkill_of_redis(
    shared: RedisState, redis_server: RedisProcess
) -> None:
    await shared.join("m1", "ws://m1", ["A1"], alive_ms=ALIVE, epoch="e1")
    await shared.write_document("emergency", 0, "halted", max_units=10)
    await shared.credit("m1", 1, 7, "increase")
    redis_server.restart()  # SIGKILL, then a start that replays the AOF
    beat = await shared.beat("m1", exposure=None, applied={}, alive_ms=ALIVE)
    assert (beat.epoch, beat.versions["emergency"], beat.credit_units) == ("e1", 1, 7)


async def test_a_hung_redis_answers_unavailable_within_the_timeout(
    shared: RedisState, redis_server: RedisProcess
) -> None:
    await shared.join("m1", "ws://m1", [], alive_ms=ALIVE, epoch="e1")
    redis_server.pause()
    started = time.monotonic()
    try:
        with pytest.raises(SharedStateUnavailable, match="did not answer"):
            await shared.beat("m1", exposure=None, applied={}, alive_ms=ALIVE)
    finally:
        redis_server.resume()
    assert time.monotonic() - started < 5
    # The handle works again once Redis does.
    beat = await shared.beat("m1", exposure=None, applied={}, alive_ms=ALIVE)
    assert beat.epoch == "e1"


async def test_a_dead_redis_answers_unavailable(
    shared: RedisState, redis_server: RedisProcess
) -> None:
    redis_server.kill()
    with pytest.raises(SharedStateUnavailable):
        await shared.members(alive_ms=ALIVE)
    redis_server.start()
    assert await shared.members(alive_ms=ALIVE) == ()
