"""Fan-out behaviour: seq, resume, audiences, heartbeats, coalescing, eviction.

The fan-out runs against a real manager with a pinned clock, and the exposure
timer is driven through ``flush_exposure``; subscribers are outboxes on fake
connections (tests/fanout/builders.py).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from gateway.core.engine import RiskEngine
from gateway.core.events import Event
from gateway.core.limits import Limits
from gateway.fanout import Delivery, Fanout, text_frame
from gateway.fanout import flusher as flusher_module
from gateway.fanout import outbox as outbox_module
from protocol.codec import encode_ok
from protocol.codes import Channel, ErrorCode, Role
from protocol.errors import ProtocolError
from protocol.messages import Subscribe, Unsubscribe
from tests.fanout.builders import (
    ADMIN,
    T0,
    TRADER_A1,
    VIEWER,
    Clock,
    FakeWs,
    Sub,
    alert,
    current,
    decision,
    emergency,
    make_fanout,
    make_sub,
    move,
    publish,
    seqs,
    settle,
    subscribe,
)


async def test_add_when_authenticated_then_emergency_snapshot_with_current_seq() -> None:
    fanout = make_fanout()
    publish(fanout, [emergency(1), emergency(2)])
    sub = make_sub()
    fanout.add(sub)
    await settle()
    (snapshot,) = sub.messages()
    assert snapshot["channel"] == "emergency"
    assert snapshot["seq"] == 2
    assert snapshot["snapshot"] is True
    assert snapshot["data"] == fanout.risk.emergency_view()


async def test_publish_when_events_then_seq_consecutive_per_channel_and_shared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    framed: list[bytes] = []

    def counting_frame(data: bytes) -> bytes:
        framed.append(data)
        return text_frame(data)

    # Both places that frame: the flusher (broadcasts) and write_now (answers).
    monkeypatch.setattr(flusher_module, "text_frame", counting_frame)
    monkeypatch.setattr(outbox_module, "text_frame", counting_frame)
    fanout = make_fanout()
    first, second = make_sub(ADMIN), make_sub(VIEWER)
    for sub in (first, second):
        fanout.add(sub)
        subscribe(fanout, sub, Channel.ALERTS, Channel.DECISIONS)
    await settle()
    framed.clear()  # the snapshots and answers so far are each their own
    publish(fanout, [alert(1), emergency(1), decision(1), alert(2), decision(2), emergency(2)])
    publish(fanout, [alert(3)])
    await settle()
    for sub in (first, second):
        assert seqs(sub.pushes(Channel.EMERGENCY)) == [0, 1, 2]
        assert seqs(sub.pushes(Channel.ALERTS)) == [0, 1, 2, 3]
        assert seqs(sub.pushes(Channel.DECISIONS)) == [0, 1, 2]
    # Encoded once and framed once: 7 events for 2 subscribers, 7 framings,
    # and both transports got the same bytes.
    assert len(framed) == 7
    assert first.ws.wires == second.ws.wires


async def test_subscribe_then_snapshot_then_events_without_gap_or_duplicate() -> None:
    fanout = make_fanout()
    publish(fanout, [alert(n) for n in range(1, 6)])
    sub = make_sub()
    fanout.add(sub)
    result = subscribe(fanout, sub, Channel.ALERTS, request_id=9)
    publish(fanout, [alert(6), alert(7)])
    await settle()
    assert result == {"channels": {"alerts": {"seq": 5}}}
    messages = sub.messages()
    assert messages[1] == {"id": 9, "status": "ok", "result": result}
    snapshot, *events = sub.pushes(Channel.ALERTS)
    assert snapshot["snapshot"] is True and snapshot["seq"] == 5
    assert [a["message"] for a in snapshot["data"]["alerts"]] == [f"m{n}" for n in range(1, 6)]
    assert seqs(events) == [6, 7]
    assert [e["data"]["message"] for e in events] == ["m6", "m7"]


async def test_snapshot_when_more_than_history_then_last_100_alerts() -> None:
    fanout = make_fanout()
    publish(fanout, [alert(n) for n in range(1, 151)])
    sub = make_sub()
    fanout.add(sub)
    subscribe(fanout, sub, Channel.ALERTS)
    await settle()
    (snapshot,) = sub.pushes(Channel.ALERTS)
    assert [a["message"] for a in snapshot["data"]["alerts"]] == [f"m{n}" for n in range(51, 151)]


async def test_resume_when_buffer_holds_missed_events_then_exactly_those() -> None:
    fanout = make_fanout(buffer_size=10)
    publish(fanout, [alert(n) for n in range(1, 13)])
    sub = make_sub()
    fanout.add(sub)
    result = subscribe(fanout, sub, Channel.ALERTS, resume={Channel.ALERTS: 4})
    publish(fanout, [alert(13)])
    await settle()
    assert result["channels"]["alerts"]["seq"] == 12
    pushes = sub.pushes(Channel.ALERTS)
    assert seqs(pushes) == list(range(5, 14))
    assert not any(p.get("snapshot") for p in pushes)
    assert [p["data"]["message"] for p in pushes] == [f"m{n}" for n in range(5, 14)]


async def test_resume_when_too_far_back_then_snapshot_with_current_seq() -> None:
    fanout = make_fanout(buffer_size=10)
    publish(fanout, [alert(n) for n in range(1, 13)])
    sub = make_sub()
    fanout.add(sub)
    subscribe(fanout, sub, Channel.ALERTS, resume={Channel.ALERTS: 1})
    publish(fanout, [alert(13)])
    await settle()
    snapshot, event = sub.pushes(Channel.ALERTS)
    assert snapshot["snapshot"] is True and snapshot["seq"] == 12
    assert event["seq"] == 13 and "snapshot" not in event


@pytest.mark.parametrize(("resume", "expected"), [(3, []), (9, [3])])
async def test_resume_when_at_or_past_current_then_nothing_or_snapshot(
    resume: int, expected: list[int]
) -> None:
    # Past current: the seq is from an earlier run of the gateway.
    fanout = make_fanout()
    publish(fanout, [alert(n) for n in range(1, 4)])
    sub = make_sub()
    fanout.add(sub)
    subscribe(fanout, sub, Channel.ALERTS, resume={Channel.ALERTS: resume})
    await settle()
    pushes = sub.pushes(Channel.ALERTS)
    assert seqs(pushes) == expected
    assert all(p["snapshot"] for p in pushes)


async def test_subscribe_emergency_with_resume_then_missed_emergency_events() -> None:
    fanout = make_fanout()
    sub = make_sub()
    fanout.add(sub)
    fanout.remove(sub)
    publish(fanout, [emergency(1), emergency(2)])
    sub2 = make_sub()
    fanout.add(sub2)
    subscribe(fanout, sub2, Channel.EMERGENCY, resume={Channel.EMERGENCY: 1})
    await settle()
    assert [(p["seq"], p.get("snapshot", False)) for p in sub2.pushes(Channel.EMERGENCY)] == [
        (2, True),
        (2, False),
    ]


async def test_unsubscribe_then_no_more_pushes_and_remaining_channels() -> None:
    fanout = make_fanout()
    sub = make_sub(ADMIN)
    fanout.add(sub)
    subscribe(fanout, sub, Channel.ALERTS, Channel.DECISIONS)
    result = fanout.unsubscribe(sub, Unsubscribe(channels=(Channel.ALERTS,)))
    publish(fanout, [alert(1), decision(1)])
    await settle()
    assert result == {"channels": ["emergency", "decisions", "heartbeat"]}
    assert seqs(sub.pushes(Channel.ALERTS)) == [0]  # the snapshot only
    assert seqs(sub.pushes(Channel.DECISIONS)) == [0, 1]


@pytest.mark.parametrize("channel", [Channel.EMERGENCY, Channel.HEARTBEAT])
async def test_unsubscribe_when_permanent_channel_then_bad_request(channel: Channel) -> None:
    fanout = make_fanout()
    sub = make_sub()
    fanout.add(sub)
    with pytest.raises(ProtocolError) as caught:
        fanout.unsubscribe(sub, Unsubscribe(channels=(Channel.ALERTS, channel)))
    assert caught.value.code is ErrorCode.BAD_REQUEST
    assert channel.value in caught.value.message


async def test_heartbeat_when_sent_then_every_connection_gets_seqs_and_no_seq() -> None:
    fanout = make_fanout()
    subs = [make_sub(), make_sub(TRADER_A1)]
    for sub in subs:
        fanout.add(sub)
    publish(fanout, [alert(1), alert(2), emergency(1)])
    fanout.heartbeat()
    await settle()
    for sub in subs:
        (beat,) = sub.pushes(Channel.HEARTBEAT)
        assert "seq" not in beat
        assert beat["data"] == {
            "ts": "2023-11-14T22:13:20.000Z",
            "seqs": {"emergency": 1, "alerts": 2, "exposure": 0, "decisions": 0},
        }


@dataclass
class ModelClient:
    """A client that checks what it receives against the section 5 contract."""

    sub: Sub
    read: int = 0
    next_id: int = 1
    requests: dict[int, tuple[str, tuple[Channel, ...], dict[Channel, int]]] = field(
        default_factory=dict
    )
    # channel -> ("wait", resume, seq in the response) | ("live", next expected seq)
    state: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    last: dict[str, int] = field(default_factory=dict)
    seen_events: int = 0

    def __post_init__(self) -> None:
        self.state["emergency"] = ("wait", None, 0)

    @property
    def filtered(self) -> bool:
        return self.sub.principal.role is Role.TRADER

    def consume(self) -> None:
        for frame in self.sub.ws.sent[self.read :]:
            self._check(orjson.loads(frame))
        self.read = len(self.sub.ws.sent)

    def _check(self, msg: dict[str, Any]) -> None:
        if "id" in msg:
            kind, channels, resume = self.requests.pop(msg["id"])
            if kind == "subscribe":
                for name, entry in msg["result"]["channels"].items():
                    if name != "heartbeat":
                        self.state[name] = ("wait", resume.get(Channel(name)), entry["seq"])
            else:
                for channel in channels:
                    self.state.pop(channel.value, None)
                assert set(msg["result"]["channels"]) >= set(self.state)
            return
        name = msg["channel"]
        if name == "heartbeat":
            assert "seq" not in msg
            return
        assert name in self.state, f"push on {name}, not subscribed"
        seq = msg["seq"]
        state = self.state[name]
        lenient = name == "exposure" and self.filtered
        if msg.get("snapshot"):
            assert state[0] == "wait", f"snapshot on {name} without a subscribe"
            assert seq >= state[2]
        elif state[0] == "wait":
            resume = state[1]
            assert resume is not None, f"event on {name} before its snapshot"
            if lenient:
                assert seq > resume
            else:
                assert seq == resume + 1, f"{name}: resumed after {resume}, got {seq}"
        elif lenient:
            assert seq >= state[1]
        else:
            assert seq == state[1], f"{name}: expected {state[1]}, got {seq}"
        if name == "exposure" and not msg.get("snapshot"):
            assert self.sub.principal.may_read_account(msg["data"]["account"])
            self.seen_events += 1
        self.state[name] = ("live", seq + 1)
        self.last[name] = seq

    def request(self, kind: str, channels: tuple[Channel, ...], resume: dict[Channel, int]) -> int:
        request_id = self.next_id
        self.next_id += 1
        self.requests[request_id] = (kind, channels, resume)
        return request_id


@pytest.mark.parametrize("seed", range(6))
async def test_random_interleaving_then_no_gap_or_duplicate_after_snapshot(seed: int) -> None:
    rng = random.Random(seed)
    clock = Clock()
    manager = RiskEngine(limits=Limits(), now_ms=clock.now)
    fanout = make_fanout(manager, clock, buffer_size=16)
    accounts = ["A1", "A2", "A3"]
    roles = [ADMIN, VIEWER, TRADER_A1]
    clients: list[ModelClient] = []
    gone: list[ModelClient] = []
    counter = itertools.count(1)

    def connect() -> None:
        client = ModelClient(make_sub(rng.choice(roles)))
        fanout.add(client.sub)
        clients.append(client)

    for _ in range(12):
        connect()
    for _step in range(1500):
        op = rng.random()
        if op < 0.35:
            batch: list[Event] = []
            for _ in range(rng.randint(1, 4)):
                kind = rng.random()
                n = next(counter)
                if kind < 0.15:
                    batch.append(emergency(n))
                elif kind < 0.45:
                    batch.append(alert(n))
                elif kind < 0.7:
                    batch.append(decision(n, rng.choice(accounts)))
                else:
                    batch += move(manager, rng.choice(accounts), rng.randint(-50, 50))
            publish(fanout, batch)
        elif op < 0.5 and clients:
            client = rng.choice(clients)
            optional = [Channel.ALERTS, Channel.EXPOSURE, Channel.EMERGENCY]
            if not client.filtered:
                optional.append(Channel.DECISIONS)
            channels = tuple(rng.sample(optional, rng.randint(1, len(optional))))
            resume: dict[Channel, int] = {}
            for channel in channels:
                choice = rng.random()
                if choice < 0.5 and channel.value in client.last:
                    resume[channel] = client.last[channel.value]
                elif choice < 0.7:
                    resume[channel] = rng.randint(0, fanout.seq(channel) + 3)
            request_id = client.request("subscribe", channels, resume)
            subscribe(fanout, client.sub, *channels, resume=resume, request_id=request_id)
        elif op < 0.58 and clients:
            client = rng.choice(clients)
            channels = tuple(
                rng.sample([Channel.ALERTS, Channel.EXPOSURE, Channel.DECISIONS], rng.randint(1, 2))
            )
            request_id = client.request("unsubscribe", channels, {})
            result = fanout.unsubscribe(client.sub, Unsubscribe(channels=channels))
            client.sub.outbox.push(encode_ok(request_id, result), Delivery.ANSWER)
        elif op < 0.7:
            clock.now += rng.randint(0, 60)
            fanout.flush_exposure(clock.now)
        elif op < 0.75:
            fanout.heartbeat()
        elif op < 0.78:
            connect()
        elif op < 0.8 and len(clients) > 2:
            client = clients.pop(rng.randrange(len(clients)))
            fanout.remove(client.sub)
            gone.append(client)
        else:
            await settle()
            for client in clients:
                client.consume()
    clock.now += 1000
    fanout.flush_exposure(clock.now)
    await settle()
    for client in clients + gone:
        client.consume()
    for client in clients:
        for name, state in client.state.items():
            if state[0] == "live" and not (name == "exposure" and client.filtered):
                assert client.last[name] == fanout.seq(Channel(name)), name
    assert any(c.seen_events for c in clients if c.filtered), "trader filtering not exercised"


async def test_exposure_when_changes_inside_window_then_one_push_per_window_with_latest() -> None:
    clock = Clock()
    manager = RiskEngine(limits=Limits(), now_ms=clock.now)
    fanout = make_fanout(manager, clock, coalesce_ms=100)
    sub = make_sub()
    fanout.add(sub)
    subscribe(fanout, sub, Channel.EXPOSURE)
    publish(fanout, move(manager, "A1", 1))  # first change: pushed at once
    clock.now += 10
    publish(fanout, move(manager, "A1", 2))
    clock.now += 10
    publish(fanout, move(manager, "A1", 3))
    publish(fanout, move(manager, "A2", 5))  # another account has its own window
    assert fanout.flush_exposure(clock.now) == T0 + 100
    await settle()
    grosses = [(p["data"]["account"], p["data"]["gross"]) for p in sub.pushes(Channel.EXPOSURE)[1:]]
    assert grosses == [("A1", "10"), ("A2", "50")]

    assert fanout.flush_exposure(T0 + 100) is None  # the window's end: the final state
    await settle()
    pushes = sub.pushes(Channel.EXPOSURE)[1:]
    assert [(p["data"]["account"], p["data"]["gross"]) for p in pushes] == [
        ("A1", "10"),
        ("A2", "50"),
        ("A1", "30"),
    ]
    assert pushes[-1]["data"]["global"] == "80"
    assert seqs(pushes) == [1, 2, 3]


async def test_exposure_when_state_already_pushed_then_no_repeat() -> None:
    clock = Clock()
    manager = RiskEngine(limits=Limits(), now_ms=clock.now)
    fanout = make_fanout(manager, clock)
    sub = make_sub()
    fanout.add(sub)
    subscribe(fanout, sub, Channel.EXPOSURE)
    events = move(manager, "A1", 1)
    publish(fanout, events + events)  # two changes reported, one state
    fanout.flush_exposure(T0 + 1000)
    await settle()
    assert seqs(sub.pushes(Channel.EXPOSURE)) == [0, 1]


async def test_exposure_timer_when_started_then_final_state_pushed_at_window_end() -> None:
    manager = RiskEngine(limits=Limits(), now_ms=T0)
    fanout = Fanout(
        manager, heartbeat_s=60, clock=lambda: time.time_ns() // 1_000_000, coalesce_ms=20
    )
    sub = make_sub()
    fanout.add(sub)
    subscribe(fanout, sub, Channel.EXPOSURE)
    assert current.tasks is not None
    fanout.start(current.tasks)
    try:
        publish(fanout, move(manager, "A1", 1))
        publish(fanout, move(manager, "A1", 7))
        async with asyncio.timeout(5):
            while [p["data"]["gross"] for p in sub.pushes(Channel.EXPOSURE)[1:]] != ["10", "70"]:
                sub.ws.activity.clear()
                await sub.ws.activity.wait()
    finally:
        await fanout.stop()


async def test_trader_when_exposure_then_only_own_accounts_and_seq_jumps() -> None:
    clock = Clock()
    manager = RiskEngine(limits=Limits(), now_ms=clock.now)
    fanout = make_fanout(manager, clock)
    publish(fanout, move(manager, "A2", 4))
    trader, viewer = make_sub(TRADER_A1), make_sub(VIEWER)
    for sub in (trader, viewer):
        fanout.add(sub)
        subscribe(fanout, sub, Channel.EXPOSURE)
    clock.now += 100
    publish(fanout, move(manager, "A2", 5) + move(manager, "A1", 1) + move(manager, "A3", 2))
    await settle()
    snapshot, *events = trader.pushes(Channel.EXPOSURE)
    assert list(snapshot["data"]["accounts"]) == ["A1"]
    assert snapshot["data"]["accounts"]["A1"]["gross"] == "0"
    assert snapshot["data"]["global"] == "40"
    assert [(e["seq"], e["data"]["account"]) for e in events] == [(3, "A1")]
    viewer_snapshot, *viewer_events = viewer.pushes(Channel.EXPOSURE)
    assert list(viewer_snapshot["data"]["accounts"]) == ["A2"]
    assert seqs(viewer_events) == [2, 3, 4]


async def test_trader_when_subscribing_decisions_then_forbidden_and_nothing_recorded() -> None:
    fanout = make_fanout()
    sub = make_sub(TRADER_A1)
    fanout.add(sub)
    with pytest.raises(ProtocolError) as caught:
        fanout.subscribe(sub, Subscribe(channels=(Channel.ALERTS, Channel.DECISIONS)))
    assert caught.value.code is ErrorCode.FORBIDDEN
    assert "decisions" in caught.value.message
    publish(fanout, [alert(1)])
    await settle()
    assert sub.pushes(Channel.ALERTS) == []
    assert fanout.stats()["subscribers"]["alerts"] == 0
    assert fanout.unsubscribe(sub, Unsubscribe(channels=(Channel.ALERTS,))) == {
        "channels": ["emergency", "heartbeat"]
    }


async def test_viewer_when_subscribing_decisions_then_snapshot_of_last_decisions() -> None:
    fanout = make_fanout()
    publish(fanout, [decision(1), decision(2, "A9")])
    sub = make_sub(VIEWER)
    fanout.add(sub)
    subscribe(fanout, sub, Channel.DECISIONS)
    await settle()
    (snapshot,) = sub.pushes(Channel.DECISIONS)
    assert [d["n"] for d in snapshot["data"]["decisions"]] == [1, 2]


async def test_fanout_when_subscriber_evicted_then_alert_counted_and_others_keep_receiving() -> (
    None
):
    fanout = make_fanout()
    slow = make_sub(VIEWER, max_queued_bytes=2000, ws=FakeWs(reading=False), slow_consumer_ms=50)
    fast = make_sub(ADMIN)
    for sub in (slow, fast):
        fanout.add(sub)
        subscribe(fanout, sub, Channel.ALERTS)
    await settle()
    for n in range(1, 60):
        publish(fanout, [alert(n)])
    publish(fanout, [emergency(1)])
    await slow.eviction()
    await settle()
    assert slow.evicted == [slow.outbox]
    assert slow.ws.closes == [(4003, "slow consumer")]
    slow_alerts = [
        p["data"] for p in fast.pushes(Channel.ALERTS) if p["data"].get("code") == "SLOW_CONSUMER"
    ]
    assert len(slow_alerts) == 1
    (raised,) = slow_alerts
    assert raised["level"] == "warning"
    assert f"connection {slow.conn_id}" in raised["message"]
    assert f"{slow.outbox.eviction_queued_bytes} bytes" in raised["message"]
    assert seqs(fast.pushes(Channel.ALERTS)) == list(range(61))
    assert seqs(fast.pushes(Channel.EMERGENCY)) == [0, 1]
    stats = fanout.stats()
    assert stats["evictions"] == 1
    assert stats["connections"] == 1
    assert stats["subscribers"] == {
        "emergency": 1,
        "heartbeat": 1,
        "alerts": 1,
        "exposure": 0,
        "decisions": 0,
    }
    # The alert is in the history a later subscriber's snapshot shows.
    late = make_sub()
    fanout.add(late)
    subscribe(fanout, late, Channel.ALERTS)
    await settle()
    (snapshot,) = late.pushes(Channel.ALERTS)
    assert [a for a in snapshot["data"]["alerts"] if a["code"] == "SLOW_CONSUMER"] == [raised]
    # Journaled: an engine replaying the records has it in its history too,
    # for staff only.
    risk = fanout.risk
    assert isinstance(risk, RiskEngine)
    restarted = RiskEngine(limits=Limits(), now_ms=T0)
    restarted.replay(risk.drain_records())
    assert list(restarted.history.alerts) == [(raised, False)]


async def test_fanout_when_emergency_on_full_connection_then_delivered_and_gap_visible() -> None:
    fanout = make_fanout()
    ws = FakeWs(reading=False)
    sub = make_sub(VIEWER, max_queued_bytes=1500, ws=ws)
    fanout.add(sub)
    subscribe(fanout, sub, Channel.ALERTS)
    await settle()
    n, before = 0, -1
    while sub.outbox.queued_bytes != before:  # until an alert no longer fits
        before = sub.outbox.queued_bytes
        n += 1
        publish(fanout, [alert(n)])
    publish(fanout, [emergency(1)])
    ws.resume_reading()
    await settle()
    assert sub.evicted == []
    assert seqs(sub.pushes(Channel.EMERGENCY)) == [0, 1]
    alert_seqs = seqs(sub.pushes(Channel.ALERTS))
    assert alert_seqs[-1] < n  # some alerts were dropped: the client sees a gap
    # It resumes from what it has and gets exactly the rest.
    subscribe(fanout, sub, Channel.ALERTS, resume={Channel.ALERTS: alert_seqs[-1]})
    await settle()
    assert seqs(sub.pushes(Channel.ALERTS))[len(alert_seqs) :] == list(
        range(alert_seqs[-1] + 1, n + 1)
    )
