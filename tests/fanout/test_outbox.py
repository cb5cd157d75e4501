"""Outbox and flusher behaviour, without sockets.

The outbox runs its real writer task, in a real task group, against a fake
connection (tests/fanout/builders.py) that records what it was asked to send.
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.fanout import Delivery
from gateway.fanout import outbox as outbox_module
from protocol.codec import encode_ok
from protocol.codes import Channel
from tests.fanout.builders import (
    ADMIN,
    FakeWs,
    emergency,
    make_fanout,
    make_sub,
    seqs,
    settle,
)


async def test_outbox_when_idle_then_written_at_once_without_writer_task() -> None:
    sub = make_sub()
    assert not sub.outbox.busy
    assert sub.outbox.push(b'{"a":1}', Delivery.ANSWER)
    # Handed to the transport within the call: no task, nothing queued.
    assert sub.ws.sent == [b'{"a":1}']
    assert not sub.outbox.busy
    assert sub.outbox.queued_bytes == 0


async def test_outbox_when_transport_paused_then_queued_and_sent_in_order_after_drain() -> None:
    ws = FakeWs(reading=False)
    sub = make_sub(ws=ws)
    # Straight to the transport, which is now over its mark.
    assert sub.outbox.push(b"1", Delivery.ANSWER)
    assert ws.over_high_water
    assert sub.outbox.push(b"2", Delivery.ANSWER)
    assert sub.outbox.push(b"3", Delivery.ANSWER)
    assert sub.outbox.busy  # a writer drains the rest
    await settle()
    assert ws.sent == [b"1", b"2"]  # 2 is in the transport, waiting for the drain
    ws.resume_reading()
    await settle()
    assert ws.sent == [b"1", b"2", b"3"]
    assert not sub.outbox.busy
    # Idle again: the next push is written at once.
    assert sub.outbox.push(b"4", Delivery.ANSWER)
    assert ws.sent[-1] == b"4"


async def test_flusher_when_broadcast_to_many_then_written_a_slice_per_loop_turn() -> None:
    fanout = make_fanout()
    fanout.flusher.per_turn = 16
    subs = [make_sub(flusher=fanout.flusher) for _ in range(50)]
    for sub in subs:
        fanout.add(sub)
    await settle()
    fanout.publish([emergency(1)])
    # Queued, not written, within the publishing callback.
    assert all(len(sub.pushes(Channel.EMERGENCY)) == 1 for sub in subs)
    assert fanout.flusher.pending == 50
    await asyncio.sleep(0)
    reached = [len(sub.pushes(Channel.EMERGENCY)) == 2 for sub in subs]
    assert reached.count(True) == 16  # one slice, then the loop's other work
    await settle()
    for sub in subs:
        assert seqs(sub.pushes(Channel.EMERGENCY)) == [0, 1]
    assert fanout.flusher.pending == 0


async def test_flusher_when_response_pushed_behind_pending_broadcast_then_after_it() -> None:
    fanout = make_fanout()
    sub = make_sub(ADMIN, flusher=fanout.flusher)
    fanout.add(sub)
    await settle()
    fanout.publish([emergency(1)])
    assert sub.outbox.busy
    # What the server does with a response while the outbox is busy.
    assert sub.outbox.push(encode_ok(5, {"ok": True}), Delivery.ANSWER)
    await settle()
    messages = sub.messages()
    assert [m.get("seq", m.get("id")) for m in messages] == [0, 1, 5]
    assert not sub.outbox.busy


async def test_flusher_when_answer_deferred_during_broadcast_then_written_ahead_of_slices() -> None:
    fanout = make_fanout()
    fanout.flusher.per_turn = 4
    subs = [make_sub(flusher=fanout.flusher) for _ in range(40)]
    for sub in subs:
        fanout.add(sub)
    await settle()
    fanout.publish([emergency(1)])
    last = subs[-1]
    assert last.outbox.push(encode_ok(9, {"ok": True}), Delivery.ANSWER_BATCHED)
    await asyncio.sleep(0)  # one flusher run
    # The answer went out in the first run, after the push queued before it;
    # most other subscribers still wait for their slice.
    assert [m.get("seq", m.get("id")) for m in last.messages()] == [0, 1, 9]
    waiting = [sub for sub in subs if len(sub.pushes(Channel.EMERGENCY)) == 1]
    assert len(waiting) == 40 - 1 - 4
    await settle()
    assert all(seqs(sub.pushes(Channel.EMERGENCY)) == [0, 1] for sub in subs)


async def test_flusher_when_transport_paused_midway_then_writer_sends_the_rest() -> None:
    fanout = make_fanout()
    ws = FakeWs(reading=False)
    sub = make_sub(ws=ws, flusher=fanout.flusher)
    fanout.add(sub)  # the snapshot: written, buffer now over its mark
    fanout.publish([emergency(1), emergency(2)])
    await settle()
    assert seqs(sub.pushes(Channel.EMERGENCY)) == [0, 1]  # the writer waits in send
    ws.resume_reading()
    await settle()
    assert seqs(sub.pushes(Channel.EMERGENCY)) == [0, 1, 2]
    assert not sub.outbox.busy


async def test_flusher_when_outbox_closed_before_its_slice_then_nothing_written() -> None:
    fanout = make_fanout()
    sub = make_sub(flusher=fanout.flusher)
    fanout.add(sub)
    await settle()
    fanout.publish([emergency(1)])
    sub.outbox.close()
    await settle()
    assert seqs(sub.pushes(Channel.EMERGENCY)) == [0]


async def test_flusher_barrier_when_awaited_then_returns_after_earlier_broadcasts_written() -> None:
    fanout = make_fanout()
    fanout.flusher.per_turn = 4
    slow_ws = FakeWs(reading=False)
    slow = make_sub(ws=slow_ws, flusher=fanout.flusher)
    subs = [make_sub(flusher=fanout.flusher) for _ in range(10)]
    for sub in [slow, *subs]:
        fanout.add(sub)
    await settle()
    fanout.publish([emergency(1), emergency(2)])
    await fanout.flusher.barrier()
    # Every connection that keeps up was handed the pushes; the one that
    # stopped reading did not hold the barrier up: its writer waits in the
    # send of the first, the second still queued.
    for sub in subs:
        assert seqs(sub.pushes(Channel.EMERGENCY)) == [0, 1, 2]
    assert seqs(slow.pushes(Channel.EMERGENCY)) == [0, 1]
    assert slow.outbox.busy
    slow.outbox.close()


async def test_flusher_barrier_when_nothing_pending_then_returns_at_once() -> None:
    fanout = make_fanout()
    await asyncio.wait_for(fanout.flusher.barrier(), timeout=5)
    assert fanout.flusher.pending == 0


async def test_outbox_when_connection_not_open_then_frame_left_to_writer() -> None:
    ws = FakeWs()
    ws.open = False  # closing
    sub = make_sub(ws=ws)
    assert sub.outbox.push(b"1", Delivery.ANSWER)
    assert ws.sent == []  # not written under a closing protocol
    assert sub.outbox.busy  # queued: the flusher hands it to a writer, whose send fails
    sub.outbox.close()


async def test_outbox_when_full_then_priority_frame_kept_and_droppable_dropped() -> None:
    ws = FakeWs(reading=False)
    sub = make_sub(max_queued_bytes=1000, ws=ws)
    assert sub.outbox.push(b"f" * 100, Delivery.BROADCAST)
    await settle()  # that one is now in the socket buffer
    assert sub.outbox.push(b"r" * 100, Delivery.ANSWER)  # a response: never dropped
    for _ in range(7):
        assert sub.outbox.push(b"d" * 100, Delivery.BROADCAST)
    assert sub.outbox.queued_bytes == 102 + 800  # the first, framed, in the socket buffer
    assert sub.outbox.push(b"E" * 300, Delivery.EMERGENCY_CATCH_UP)
    assert sub.outbox.queued_bytes == 102 + 100 + 300
    ws.resume_reading()
    await settle()
    assert ws.sent == [b"f" * 100, b"r" * 100, b"E" * 300]
    assert sub.evicted == []


async def test_outbox_when_over_limit_then_kept_until_nothing_taken_for_slow_consumer_ms() -> None:
    ws = FakeWs(reading=False)
    sub = make_sub(max_queued_bytes=1000, ws=ws, slow_consumer_ms=50)
    sub.outbox.push(b"x" * 900, Delivery.ANSWER)
    await settle()
    # Over the bound: a priority frame is still queued, not an eviction.
    assert sub.outbox.push(b"E" * 200, Delivery.EMERGENCY_CATCH_UP)
    assert sub.evicted == []
    await sub.eviction()
    assert sub.evicted == [sub.outbox]
    assert not sub.outbox.push(b"late", Delivery.ANSWER)


async def test_outbox_when_client_keeps_taking_output_then_never_evicted() -> None:
    ws = FakeWs(reading=False)
    sub = make_sub(max_queued_bytes=1000, ws=ws, slow_consumer_ms=200)
    sub.outbox.push(b"x" * 5000, Delivery.ANSWER)  # one large answer onto empty output: accepted
    await settle()
    # The client reads a little, far slower than the answer's size, but
    # within every slow_consumer_ms; pushes keep coming meanwhile.
    for n in range(30):
        assert sub.outbox.push(b"r%d" % n, Delivery.ANSWER)
        ws.take(100)
        await asyncio.sleep(0.02)
    assert sub.evicted == []
    # Then it stops reading: evicted one slow_consumer_ms later.
    await sub.eviction()
    assert sub.evicted == [sub.outbox]


async def test_outbox_when_over_limit_then_droppable_dropped_and_on_evict_once_and_close_4003(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(outbox_module, "EVICTION_CLOSE_TIMEOUT_S", 0.05)
    ws = FakeWs(reading=False, close_hangs=True)
    sub = make_sub(max_queued_bytes=1000, ws=ws, slow_consumer_ms=50)
    before = -1
    while sub.outbox.queued_bytes != before:  # until a push no longer fits
        before = sub.outbox.queued_bytes
        assert sub.outbox.push(b"d" * 100, Delivery.BROADCAST)
        await asyncio.sleep(0)
    full = sub.outbox.queued_bytes
    assert 900 < full <= 1000
    # Over the bound: droppable frames are dropped, answers still queued.
    assert sub.outbox.push(b"d" * 100, Delivery.BROADCAST)
    assert sub.outbox.queued_bytes == full
    assert sub.outbox.push(b"r" * 200, Delivery.ANSWER)
    assert sub.outbox.queued_bytes == full + 200
    await sub.eviction()
    assert not sub.outbox.push(b"E", Delivery.EMERGENCY_CATCH_UP)
    assert sub.evicted == [sub.outbox]
    assert sub.outbox.evicted and sub.outbox.eviction_queued_bytes == full + 200
    async with asyncio.timeout(2):
        await ws.aborted.wait()
    assert ws.closes == [(4003, "slow consumer")]


async def test_outbox_when_stalled_client_only_gets_droppable_pushes_then_still_evicted() -> None:
    ws = FakeWs(reading=False)
    sub = make_sub(max_queued_bytes=1000, ws=ws, slow_consumer_ms=50)
    sub.outbox.push(b"e" * 100, Delivery.ANSWER)
    await settle()
    for _ in range(20):
        sub.outbox.push(b"h" * 100, Delivery.BROADCAST)
    await sub.eviction()
    assert sub.evicted == [sub.outbox]


async def test_outbox_when_client_completes_close_then_no_abort() -> None:
    ws = FakeWs(reading=False)
    sub = make_sub(max_queued_bytes=100, ws=ws, slow_consumer_ms=20)
    sub.outbox.push(b"x" * 80, Delivery.ANSWER)
    await settle()
    assert sub.outbox.push(b"x" * 80, Delivery.ANSWER)
    await sub.eviction()
    await settle()
    assert ws.closes == [(4003, "slow consumer")]
    assert not ws.aborted.is_set()


async def test_outbox_when_queue_empty_then_frame_larger_than_limit_accepted() -> None:
    sub = make_sub(max_queued_bytes=100)
    assert sub.outbox.push(b"s" * 500, Delivery.ANSWER)
    await settle()
    assert sub.ws.sent == [b"s" * 500]


async def test_outbox_when_closed_then_push_refused_and_writer_stopped() -> None:
    ws = FakeWs(reading=False)
    sub = make_sub(ws=ws)
    sub.outbox.push(b"1", Delivery.ANSWER)  # written at once
    sub.outbox.push(b"2", Delivery.ANSWER)  # the writer's send, waiting for the drain
    sub.outbox.push(b"3", Delivery.ANSWER)  # queued
    await settle()
    sub.outbox.close()
    assert not sub.outbox.busy
    assert not sub.outbox.push(b"4", Delivery.ANSWER)
    ws.resume_reading()
    await settle()
    assert ws.sent == [b"1", b"2"]
    assert sub.evicted == []


async def test_outbox_when_scheduled_as_answer_and_broadcast_in_one_run_then_one_writer() -> None:
    ws = FakeWs(reading=False)
    sub = make_sub(ws=ws)
    # Written at once; the transport is now over its mark.
    assert sub.outbox.push(b"a", Delivery.ANSWER)
    sub.outbox.push(b"b", Delivery.BROADCAST)  # a broadcast's slice
    sub.outbox.push(b"c", Delivery.ANSWER_BATCHED)  # an answer: flushed ahead
    await settle()
    # One writer, waiting for the drain after "b": "c" waits its turn.
    assert ws.sent == [b"a", b"b"]
    ws.resume_reading()
    await settle()
    assert ws.sent == [b"a", b"b", b"c"]


# ------------------------------------------------------------ task group


async def test_writer_when_connection_closes_under_it_then_outbox_closed_and_siblings_run() -> None:
    # The connection's read loop stands for every other task of its group.
    ws = FakeWs(reading=False)
    async with asyncio.TaskGroup() as tasks:
        read_loop = tasks.create_task(asyncio.Event().wait())
        sub = make_sub(ws=ws, tasks=tasks)
        sub.outbox.push(b"1", Delivery.ANSWER)  # written; the transport is over its mark
        ws.open = False  # the client went away
        sub.outbox.push(b"2", Delivery.ANSWER)
        await settle()  # the writer's send raised ConnectionClosed
        assert sub.outbox.closed and not sub.outbox.busy
        assert not sub.outbox.push(b"3", Delivery.ANSWER)
        assert not read_loop.done()
        read_loop.cancel()
    assert ws.sent == [b"1"]


async def test_outbox_when_its_task_group_has_ended_then_closed_and_aborted_not_raising() -> None:
    ws = FakeWs(reading=False)
    async with asyncio.TaskGroup() as tasks:
        sub = make_sub(ws=ws, tasks=tasks)
        sub.outbox.push(b"1", Delivery.ANSWER)  # written; the transport is over its mark
    # The handler is gone; a late answer needs a writer the group cannot start.
    assert sub.outbox.push(b"2", Delivery.ANSWER_BATCHED)
    await settle()
    assert sub.outbox.closed
    assert ws.aborted.is_set()


async def test_eviction_close_when_cancelled_with_its_group_then_socket_aborted() -> None:
    ready: asyncio.Future[asyncio.TaskGroup] = asyncio.get_running_loop().create_future()

    async def connection_handler() -> None:
        async with asyncio.TaskGroup() as tasks:
            ready.set_result(tasks)
            await asyncio.Event().wait()  # until the connection ends

    handler = asyncio.create_task(connection_handler())
    ws = FakeWs(reading=False, close_hangs=True)
    sub = make_sub(max_queued_bytes=100, ws=ws, slow_consumer_ms=20, tasks=await ready)
    sub.outbox.push(b"x" * 200, Delivery.ANSWER)  # over the bound, never taken
    await sub.eviction()
    await settle()
    assert ws.closes == [(4003, "slow consumer")]  # the closing handshake hangs
    assert not ws.aborted.is_set()
    handler.cancel()  # the connection's group ends: no error, the socket goes
    await asyncio.wait([handler])
    assert handler.cancelled(), "a task of the group failed"
    assert ws.aborted.is_set()
