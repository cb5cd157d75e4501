"""Fan-out and outbox behaviour, without sockets.

The outbox runs its real writer task against a fake connection that records
what it was asked to send; the fan-out runs against a real manager with a
pinned clock, and the exposure timer is driven through ``flush_exposure``.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson
import pytest
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from gateway import fanout as fanout_module
from gateway.auth import Principal
from gateway.core.engine import RiskEngine
from gateway.core.events import AlertRaised, DecisionMade, Event, ModeChanged
from gateway.core.limits import Limits
from gateway.fanout import Fanout, Flusher, Outbox, text_frame
from protocol.codec import encode_ok
from protocol.codes import Channel, ErrorCode, Role
from protocol.errors import ProtocolError
from protocol.messages import PositionUpdate, Subscribe, Unsubscribe

T0 = 1_700_000_000_000
ADMIN = Principal(name="ops", role=Role.ADMIN)
VIEWER = Principal(name="dash", role=Role.VIEWER)
TRADER_A1 = Principal(name="desk-1", role=Role.TRADER, accounts=frozenset({"A1"}))
BIG = 1 << 30


class FakeTransport:
    def __init__(self, ws: FakeWs) -> None:
        self.ws = ws
        self.wires: list[bytes] = []
        self.buffered = 0
        self.aborted = asyncio.Event()

    def write(self, data: bytes) -> None:
        """Framed bytes from the flusher: unmasked, final text frames."""
        self.wires.append(data)
        off = 0
        while off < len(data):
            assert data[off] == 0x81, "a final text frame"
            length = data[off + 1]
            assert not length & 0x80, "server frames are not masked"
            start = off + 2
            if length == 126:
                length, start = int.from_bytes(data[off + 2 : off + 4]), off + 4
            elif length == 127:
                length, start = int.from_bytes(data[off + 2 : off + 10]), off + 10
            assert len(data) >= start + length
            self.ws.write(data[start : start + length])
            off = start + length

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def abort(self) -> None:
        self.aborted.set()


class FakeProtocol:
    def __init__(self, ws: FakeWs) -> None:
        self.ws = ws
        self.state = State.OPEN
        self.extensions: list[object] = []


class FakeWs:
    """Records sent frames, written to the transport (framed, parsed back by
    ``FakeTransport``) or by ``send``. With ``reading=False`` it behaves like a client that stopped
    reading: the first frame lands in the write buffer, which then stays over
    the high-water mark (``paused``), and a ``send`` waits (as websockets waits
    in drain) until ``resume_reading``."""

    send_in_progress = None

    def __init__(self, *, reading: bool = True, close_hangs: bool = False) -> None:
        self.sent: list[bytes] = []
        self.transport = FakeTransport(self)
        self.protocol = FakeProtocol(self)
        self.paused = False
        self.closes: list[tuple[int, str]] = []
        self.close_hangs = close_hangs
        self.activity = asyncio.Event()
        self._reading = asyncio.Event()
        if reading:
            self._reading.set()

    def write(self, frame: bytes) -> None:
        self.sent.append(frame)
        self.activity.set()
        if not self._reading.is_set():
            self.transport.buffered += len(text_frame(frame))  # framed, as on the wire
            self.paused = True

    async def send(self, frame: bytes, text: bool | None = None) -> None:
        assert text is True, "pushes are text frames"
        self.write(frame)
        await self._reading.wait()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closes.append((code, reason))
        if self.close_hangs:
            await asyncio.Event().wait()

    def resume_reading(self) -> None:
        self._reading.set()
        self.transport.buffered = 0
        self.paused = False

    def take(self, size: int) -> None:
        """The client reads ``size`` bytes of the write buffer (and no more)."""
        self.transport.buffered = max(0, self.transport.buffered - size)


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


_conn_ids = itertools.count(1)


@dataclass(eq=False)
class Sub:
    """A subscriber as the server's session looks to the fan-out."""

    conn_id: int
    principal: Principal
    outbox: Outbox
    ws: FakeWs
    evicted: list[Outbox] = field(default_factory=list)

    async def eviction(self, timeout: float = 5) -> None:
        """Wait until the outbox evicted this subscriber (closed 4003)."""
        async with asyncio.timeout(timeout):
            while not self.evicted:
                await self.ws.activity.wait()
                self.ws.activity.clear()

    def messages(self) -> list[dict[str, Any]]:
        return [orjson.loads(frame) for frame in self.ws.sent]

    def pushes(self, channel: Channel) -> list[dict[str, Any]]:
        return [m for m in self.messages() if m.get("channel") == channel.value]


# The flusher of the running test (see the autouse fixture): as in the server,
# every outbox of one gateway shares one.
_flusher = Flusher()


@pytest.fixture(autouse=True)
def fresh_flusher() -> None:
    global _flusher
    _flusher = Flusher()


def make_sub(
    principal: Principal = VIEWER,
    *,
    max_queued_bytes: int = BIG,
    ws: FakeWs | None = None,
    flusher: Flusher | None = None,
    slow_consumer_ms: int = 1000,
) -> Sub:
    ws = ws or FakeWs()
    evicted: list[Outbox] = []

    def on_evict(outbox: Outbox) -> None:
        evicted.append(outbox)
        ws.activity.set()

    outbox = Outbox(
        ws,  # type: ignore[arg-type]
        max_queued_bytes=max_queued_bytes,
        on_evict=on_evict,
        flusher=flusher or _flusher,
        slow_consumer_ms=slow_consumer_ms,
    )
    return Sub(next(_conn_ids), principal, outbox, ws, evicted)


async def settle() -> None:
    """Let every writer task run until its queue is empty."""
    for _ in range(10):
        await asyncio.sleep(0)


def make_fanout(
    manager: RiskEngine | None = None, clock: Clock | None = None, **kwargs: Any
) -> Fanout:
    clock = clock or Clock()
    manager = manager or RiskEngine(limits=Limits(), now_ms=clock.now)
    return Fanout(manager, heartbeat_s=1.0, clock=clock, **kwargs)


def subscribe(
    fanout: Fanout,
    sub: Sub,
    *channels: Channel,
    resume: dict[Channel, int] | None = None,
    request_id: int = 1,
) -> dict[str, Any]:
    """What the server does for a subscribe: response first, then the catch-up."""
    result = fanout.subscribe(sub, Subscribe(channels=channels, resume=resume or {}))  # type: ignore[arg-type]
    sub.outbox.push(encode_ok(request_id, result))
    fanout.deliver_subscription(sub)  # type: ignore[arg-type]
    return result


def emergency(version: int) -> ModeChanged:
    return ModeChanged(
        {
            "mode": "halted",
            "reason": f"r{version}",
            "actor": "ops",
            "since": "x",
            "version": version,
            "accounts": {},
        }
    )


def alert(n: int) -> AlertRaised:
    return AlertRaised({"level": "info", "code": "LIMITS_CHANGED", "message": f"m{n}", "ts": "x"})


def decision(n: int, account: str = "A1") -> DecisionMade:
    return DecisionMade({"decision": "accept", "n": n, "account": account})


def seqs(messages: list[dict[str, Any]]) -> list[int]:
    return [m["seq"] for m in messages]


def move(
    manager: RiskEngine, account: str, qty: int, price: int = 10, now: int = T0
) -> list[Event]:
    manager.update_position(
        PositionUpdate(account=account, symbol="X", qty=Decimal(qty), price=Decimal(price)), now
    )
    return manager.drain_events()


# --------------------------------------------------------------------- seq


async def test_add_when_authenticated_then_emergency_snapshot_with_current_seq() -> None:
    fanout = make_fanout()
    fanout.publish([emergency(1), emergency(2)])
    sub = make_sub()
    fanout.add(sub)  # type: ignore[arg-type]
    await settle()
    (snapshot,) = sub.messages()
    assert snapshot["channel"] == "emergency"
    assert snapshot["seq"] == 2
    assert snapshot["snapshot"] is True
    assert snapshot["data"] == fanout.manager.emergency_view()


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_when_any_length_then_same_bytes_as_websockets(length: int) -> None:
    payload = bytes(random.Random(length).randrange(32, 127) for _ in range(length))
    expected = Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
    assert text_frame(payload) == expected
    # What the writer task counts for a frame websockets frames itself.
    assert fanout_module._framed_size(length) == len(expected)


async def test_publish_when_events_then_seq_consecutive_per_channel_and_shared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    framed: list[bytes] = []
    real_text_frame = fanout_module.text_frame

    def counting_frame(data: bytes) -> bytes:
        framed.append(data)
        return real_text_frame(data)

    monkeypatch.setattr(fanout_module, "text_frame", counting_frame)
    fanout = make_fanout()
    first, second = make_sub(ADMIN), make_sub(VIEWER)
    for sub in (first, second):
        fanout.add(sub)  # type: ignore[arg-type]
        subscribe(fanout, sub, Channel.ALERTS, Channel.DECISIONS)
    await settle()
    framed.clear()  # the snapshots and answers so far are each their own
    fanout.publish([alert(1), emergency(1), decision(1), alert(2), decision(2), emergency(2)])
    fanout.publish([alert(3)])
    await settle()
    for sub in (first, second):
        assert seqs(sub.pushes(Channel.EMERGENCY)) == [0, 1, 2]
        assert seqs(sub.pushes(Channel.ALERTS)) == [0, 1, 2, 3]
        assert seqs(sub.pushes(Channel.DECISIONS)) == [0, 1, 2]
    # Encoded once and framed once: 7 events for 2 subscribers, 7 framings,
    # and both transports got the same bytes.
    assert len(framed) == 7
    assert first.ws.transport.wires == second.ws.transport.wires


async def test_subscribe_then_snapshot_then_events_without_gap_or_duplicate() -> None:
    fanout = make_fanout()
    fanout.publish([alert(n) for n in range(1, 6)])
    sub = make_sub()
    fanout.add(sub)  # type: ignore[arg-type]
    result = subscribe(fanout, sub, Channel.ALERTS, request_id=9)
    fanout.publish([alert(6), alert(7)])
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
    fanout.publish([alert(n) for n in range(1, 151)])
    sub = make_sub()
    fanout.add(sub)  # type: ignore[arg-type]
    subscribe(fanout, sub, Channel.ALERTS)
    await settle()
    (snapshot,) = sub.pushes(Channel.ALERTS)
    assert [a["message"] for a in snapshot["data"]["alerts"]] == [f"m{n}" for n in range(51, 151)]


async def test_resume_when_buffer_holds_missed_events_then_exactly_those() -> None:
    fanout = make_fanout(buffer_size=10)
    fanout.publish([alert(n) for n in range(1, 13)])
    sub = make_sub()
    fanout.add(sub)  # type: ignore[arg-type]
    result = subscribe(fanout, sub, Channel.ALERTS, resume={Channel.ALERTS: 4})
    fanout.publish([alert(13)])
    await settle()
    assert result["channels"]["alerts"]["seq"] == 12
    pushes = sub.pushes(Channel.ALERTS)
    assert seqs(pushes) == list(range(5, 14))
    assert not any(p.get("snapshot") for p in pushes)
    assert [p["data"]["message"] for p in pushes] == [f"m{n}" for n in range(5, 14)]


async def test_resume_when_too_far_back_then_snapshot_with_current_seq() -> None:
    fanout = make_fanout(buffer_size=10)
    fanout.publish([alert(n) for n in range(1, 13)])
    sub = make_sub()
    fanout.add(sub)  # type: ignore[arg-type]
    subscribe(fanout, sub, Channel.ALERTS, resume={Channel.ALERTS: 1})
    fanout.publish([alert(13)])
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
    fanout.publish([alert(n) for n in range(1, 4)])
    sub = make_sub()
    fanout.add(sub)  # type: ignore[arg-type]
    subscribe(fanout, sub, Channel.ALERTS, resume={Channel.ALERTS: resume})
    await settle()
    pushes = sub.pushes(Channel.ALERTS)
    assert seqs(pushes) == expected
    assert all(p["snapshot"] for p in pushes)


async def test_subscribe_emergency_with_resume_then_missed_emergency_events() -> None:
    fanout = make_fanout()
    sub = make_sub()
    fanout.add(sub)  # type: ignore[arg-type]
    fanout.remove(sub)  # type: ignore[arg-type]
    fanout.publish([emergency(1), emergency(2)])
    sub2 = make_sub()
    fanout.add(sub2)  # type: ignore[arg-type]
    subscribe(fanout, sub2, Channel.EMERGENCY, resume={Channel.EMERGENCY: 1})
    await settle()
    assert [(p["seq"], p.get("snapshot", False)) for p in sub2.pushes(Channel.EMERGENCY)] == [
        (2, True),
        (2, False),
    ]


async def test_unsubscribe_then_no_more_pushes_and_remaining_channels() -> None:
    fanout = make_fanout()
    sub = make_sub(ADMIN)
    fanout.add(sub)  # type: ignore[arg-type]
    subscribe(fanout, sub, Channel.ALERTS, Channel.DECISIONS)
    result = fanout.unsubscribe(sub, Unsubscribe(channels=(Channel.ALERTS,)))  # type: ignore[arg-type]
    fanout.publish([alert(1), decision(1)])
    await settle()
    assert result == {"channels": ["emergency", "decisions", "heartbeat"]}
    assert seqs(sub.pushes(Channel.ALERTS)) == [0]  # the snapshot only
    assert seqs(sub.pushes(Channel.DECISIONS)) == [0, 1]


@pytest.mark.parametrize("channel", [Channel.EMERGENCY, Channel.HEARTBEAT])
async def test_unsubscribe_when_permanent_channel_then_bad_request(channel: Channel) -> None:
    fanout = make_fanout()
    sub = make_sub()
    fanout.add(sub)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError) as caught:
        fanout.unsubscribe(sub, Unsubscribe(channels=(Channel.ALERTS, channel)))  # type: ignore[arg-type]
    assert caught.value.code is ErrorCode.BAD_REQUEST
    assert channel.value in caught.value.message


async def test_heartbeat_when_sent_then_every_connection_gets_seqs_and_no_seq() -> None:
    fanout = make_fanout()
    subs = [make_sub(), make_sub(TRADER_A1)]
    for sub in subs:
        fanout.add(sub)  # type: ignore[arg-type]
    fanout.publish([alert(1), alert(2), emergency(1)])
    fanout.heartbeat()
    await settle()
    for sub in subs:
        (beat,) = sub.pushes(Channel.HEARTBEAT)
        assert "seq" not in beat
        assert beat["data"] == {
            "ts": "2023-11-14T22:13:20.000Z",
            "seqs": {"emergency": 1, "alerts": 2, "exposure": 0, "decisions": 0},
        }


# ------------------------------------------------ randomised interleavings


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
        fanout.add(client.sub)  # type: ignore[arg-type]
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
            fanout.publish(batch)
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
            result = fanout.unsubscribe(client.sub, Unsubscribe(channels=channels))  # type: ignore[arg-type]
            client.sub.outbox.push(encode_ok(request_id, result))
        elif op < 0.7:
            clock.now += rng.randint(0, 60)
            fanout.flush_exposure(clock.now)
        elif op < 0.75:
            fanout.heartbeat()
        elif op < 0.78:
            connect()
        elif op < 0.8 and len(clients) > 2:
            client = clients.pop(rng.randrange(len(clients)))
            fanout.remove(client.sub)  # type: ignore[arg-type]
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


# ---------------------------------------------------------------- exposure


async def test_exposure_when_changes_inside_window_then_one_push_per_window_with_latest() -> None:
    clock = Clock()
    manager = RiskEngine(limits=Limits(), now_ms=clock.now)
    fanout = make_fanout(manager, clock, coalesce_ms=100)
    sub = make_sub()
    fanout.add(sub)  # type: ignore[arg-type]
    subscribe(fanout, sub, Channel.EXPOSURE)
    fanout.publish(move(manager, "A1", 1))  # first change: pushed at once
    clock.now += 10
    fanout.publish(move(manager, "A1", 2))
    clock.now += 10
    fanout.publish(move(manager, "A1", 3))
    fanout.publish(move(manager, "A2", 5))  # another account has its own window
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
    fanout.add(sub)  # type: ignore[arg-type]
    subscribe(fanout, sub, Channel.EXPOSURE)
    events = move(manager, "A1", 1)
    fanout.publish(events + events)  # two changes reported, one state
    fanout.flush_exposure(T0 + 1000)
    await settle()
    assert seqs(sub.pushes(Channel.EXPOSURE)) == [0, 1]


async def test_exposure_timer_when_started_then_final_state_pushed_at_window_end() -> None:
    manager = RiskEngine(limits=Limits(), now_ms=T0)
    fanout = Fanout(
        manager, heartbeat_s=60, clock=lambda: time.time_ns() // 1_000_000, coalesce_ms=20
    )
    sub = make_sub()
    fanout.add(sub)  # type: ignore[arg-type]
    subscribe(fanout, sub, Channel.EXPOSURE)
    fanout.start()
    try:
        fanout.publish(move(manager, "A1", 1))
        fanout.publish(move(manager, "A1", 7))
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
    fanout.publish(move(manager, "A2", 4))
    trader, viewer = make_sub(TRADER_A1), make_sub(VIEWER)
    for sub in (trader, viewer):
        fanout.add(sub)  # type: ignore[arg-type]
        subscribe(fanout, sub, Channel.EXPOSURE)
    clock.now += 100
    fanout.publish(move(manager, "A2", 5) + move(manager, "A1", 1) + move(manager, "A3", 2))
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
    fanout.add(sub)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError) as caught:
        fanout.subscribe(sub, Subscribe(channels=(Channel.ALERTS, Channel.DECISIONS)))  # type: ignore[arg-type]
    assert caught.value.code is ErrorCode.FORBIDDEN
    assert "decisions" in caught.value.message
    fanout.publish([alert(1)])
    await settle()
    assert sub.pushes(Channel.ALERTS) == []
    assert fanout.stats()["subscribers"]["alerts"] == 0
    assert fanout.unsubscribe(sub, Unsubscribe(channels=(Channel.ALERTS,))) == {  # type: ignore[arg-type]
        "channels": ["emergency", "heartbeat"]
    }


async def test_viewer_when_subscribing_decisions_then_snapshot_of_last_decisions() -> None:
    fanout = make_fanout()
    fanout.publish([decision(1), decision(2, "A9")])
    sub = make_sub(VIEWER)
    fanout.add(sub)  # type: ignore[arg-type]
    subscribe(fanout, sub, Channel.DECISIONS)
    await settle()
    (snapshot,) = sub.pushes(Channel.DECISIONS)
    assert [d["n"] for d in snapshot["data"]["decisions"]] == [1, 2]


# ------------------------------------------------------ outbox and eviction


async def test_outbox_when_idle_then_written_at_once_without_writer_task() -> None:
    sub = make_sub()
    assert not sub.outbox.busy
    assert sub.outbox.push(b'{"a":1}')
    # Handed to the transport within the call: no task, nothing queued.
    assert sub.ws.sent == [b'{"a":1}']
    assert not sub.outbox.busy
    assert sub.outbox.queued_bytes == 0


async def test_outbox_when_transport_paused_then_queued_and_sent_in_order_after_drain() -> None:
    ws = FakeWs(reading=False)
    sub = make_sub(ws=ws)
    assert sub.outbox.push(b"1")  # straight to the transport, which is now over its mark
    assert ws.paused
    assert sub.outbox.push(b"2")
    assert sub.outbox.push(b"3")
    assert sub.outbox.busy  # a writer drains the rest
    await settle()
    assert ws.sent == [b"1", b"2"]  # 2 is in the transport, waiting for the drain
    ws.resume_reading()
    await settle()
    assert ws.sent == [b"1", b"2", b"3"]
    assert not sub.outbox.busy
    # Idle again: the next push is written at once.
    assert sub.outbox.push(b"4")
    assert ws.sent[-1] == b"4"


async def test_flusher_when_broadcast_to_many_then_written_a_slice_per_loop_turn() -> None:
    fanout = make_fanout()
    fanout.flusher.per_turn = 16
    subs = [make_sub(flusher=fanout.flusher) for _ in range(50)]
    for sub in subs:
        fanout.add(sub)  # type: ignore[arg-type]
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
    fanout.add(sub)  # type: ignore[arg-type]
    await settle()
    fanout.publish([emergency(1)])
    assert sub.outbox.busy
    # What the server does with a response while the outbox is busy.
    assert sub.outbox.push(encode_ok(5, {"ok": True}))
    await settle()
    messages = sub.messages()
    assert [m.get("seq", m.get("id")) for m in messages] == [0, 1, 5]
    assert not sub.outbox.busy


async def test_flusher_when_answer_deferred_during_broadcast_then_written_ahead_of_slices() -> None:
    fanout = make_fanout()
    fanout.flusher.per_turn = 4
    subs = [make_sub(flusher=fanout.flusher) for _ in range(40)]
    for sub in subs:
        fanout.add(sub)  # type: ignore[arg-type]
    await settle()
    fanout.publish([emergency(1)])
    last = subs[-1]
    assert last.outbox.push(encode_ok(9, {"ok": True}), defer=True, answer=True)
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
    fanout.add(sub)  # type: ignore[arg-type]  # the snapshot: written, buffer now over its mark
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
    fanout.add(sub)  # type: ignore[arg-type]
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
        fanout.add(sub)  # type: ignore[arg-type]
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
    ws.protocol.state = State.CLOSING
    sub = make_sub(ws=ws)
    assert sub.outbox.push(b"1")
    assert ws.sent == []  # not written under a closing protocol
    assert sub.outbox.busy  # queued: the flusher hands it to a writer, whose send fails
    sub.outbox.close()


async def test_outbox_when_full_then_priority_frame_kept_and_droppable_dropped() -> None:
    ws = FakeWs(reading=False)
    sub = make_sub(max_queued_bytes=1000, ws=ws)
    assert sub.outbox.push(b"f" * 100, droppable=True)
    await settle()  # that one is now in the socket buffer
    assert sub.outbox.push(b"r" * 100)  # a response: never dropped
    for _ in range(7):
        assert sub.outbox.push(b"d" * 100, droppable=True)
    assert sub.outbox.queued_bytes == 102 + 800  # the first, framed, in the socket buffer
    assert sub.outbox.push(b"E" * 300, priority=True)
    assert sub.outbox.queued_bytes == 102 + 100 + 300
    ws.resume_reading()
    await settle()
    assert ws.sent == [b"f" * 100, b"r" * 100, b"E" * 300]
    assert sub.evicted == []


async def test_outbox_when_over_limit_then_kept_until_nothing_taken_for_slow_consumer_ms() -> None:
    ws = FakeWs(reading=False)
    sub = make_sub(max_queued_bytes=1000, ws=ws, slow_consumer_ms=50)
    sub.outbox.push(b"x" * 900)
    await settle()
    # Over the bound: a priority frame is still queued, not an eviction.
    assert sub.outbox.push(b"E" * 200, priority=True)
    assert sub.evicted == []
    await sub.eviction()
    assert sub.evicted == [sub.outbox]
    assert not sub.outbox.push(b"late")


async def test_outbox_when_client_keeps_taking_output_then_never_evicted() -> None:
    ws = FakeWs(reading=False)
    sub = make_sub(max_queued_bytes=1000, ws=ws, slow_consumer_ms=200)
    sub.outbox.push(b"x" * 5000)  # one large answer onto empty output: accepted
    await settle()
    # The client reads a little, far slower than the answer's size, but
    # within every slow_consumer_ms; pushes keep coming meanwhile.
    for n in range(30):
        assert sub.outbox.push(b"r%d" % n)
        ws.take(100)
        await asyncio.sleep(0.02)
    assert sub.evicted == []
    # Then it stops reading: evicted one slow_consumer_ms later.
    await sub.eviction()
    assert sub.evicted == [sub.outbox]


async def test_outbox_when_over_limit_then_droppable_dropped_and_on_evict_once_and_close_4003(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fanout_module, "EVICTION_CLOSE_TIMEOUT_S", 0.05)
    ws = FakeWs(reading=False, close_hangs=True)
    sub = make_sub(max_queued_bytes=1000, ws=ws, slow_consumer_ms=50)
    before = -1
    while sub.outbox.queued_bytes != before:  # until a push no longer fits
        before = sub.outbox.queued_bytes
        assert sub.outbox.push(b"d" * 100, droppable=True)
        await asyncio.sleep(0)
    full = sub.outbox.queued_bytes
    assert 900 < full <= 1000
    # Over the bound: droppable frames are dropped, answers still queued.
    assert sub.outbox.push(b"d" * 100, droppable=True)
    assert sub.outbox.queued_bytes == full
    assert sub.outbox.push(b"r" * 200)
    assert sub.outbox.queued_bytes == full + 200
    await sub.eviction()
    assert not sub.outbox.push(b"E", priority=True)
    assert sub.evicted == [sub.outbox]
    assert sub.outbox.evicted and sub.outbox.eviction_queued_bytes == full + 200
    async with asyncio.timeout(2):
        await ws.transport.aborted.wait()
    assert ws.closes == [(4003, "slow consumer")]


async def test_outbox_when_stalled_client_only_gets_droppable_pushes_then_still_evicted() -> None:
    ws = FakeWs(reading=False)
    sub = make_sub(max_queued_bytes=1000, ws=ws, slow_consumer_ms=50)
    sub.outbox.push(b"e" * 100)
    await settle()
    for _ in range(20):
        sub.outbox.push(b"h" * 100, droppable=True)
    await sub.eviction()
    assert sub.evicted == [sub.outbox]


async def test_outbox_when_client_completes_close_then_no_abort() -> None:
    ws = FakeWs(reading=False)
    sub = make_sub(max_queued_bytes=100, ws=ws, slow_consumer_ms=20)
    sub.outbox.push(b"x" * 80)
    await settle()
    assert sub.outbox.push(b"x" * 80)
    await sub.eviction()
    await settle()
    assert ws.closes == [(4003, "slow consumer")]
    assert not ws.transport.aborted.is_set()


async def test_outbox_when_queue_empty_then_frame_larger_than_limit_accepted() -> None:
    sub = make_sub(max_queued_bytes=100)
    assert sub.outbox.push(b"s" * 500)
    await settle()
    assert sub.ws.sent == [b"s" * 500]


async def test_outbox_when_closed_then_push_refused_and_writer_stopped() -> None:
    ws = FakeWs(reading=False)
    sub = make_sub(ws=ws)
    sub.outbox.push(b"1")  # written at once
    sub.outbox.push(b"2")  # the writer's send, waiting for the drain
    sub.outbox.push(b"3")  # queued
    await settle()
    sub.outbox.close()
    assert not sub.outbox.busy
    assert not sub.outbox.push(b"4")
    ws.resume_reading()
    await settle()
    assert ws.sent == [b"1", b"2"]
    assert sub.evicted == []


async def test_fanout_when_subscriber_evicted_then_alert_counted_and_others_keep_receiving() -> (
    None
):
    fanout = make_fanout()
    slow = make_sub(VIEWER, max_queued_bytes=2000, ws=FakeWs(reading=False), slow_consumer_ms=50)
    fast = make_sub(ADMIN)
    for sub in (slow, fast):
        fanout.add(sub)  # type: ignore[arg-type]
        subscribe(fanout, sub, Channel.ALERTS)
    await settle()
    for n in range(1, 60):
        fanout.publish([alert(n)])
    fanout.publish([emergency(1)])
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
    fanout.add(late)  # type: ignore[arg-type]
    subscribe(fanout, late, Channel.ALERTS)
    await settle()
    (snapshot,) = late.pushes(Channel.ALERTS)
    assert [a for a in snapshot["data"]["alerts"] if a["code"] == "SLOW_CONSUMER"] == [raised]


async def test_fanout_when_emergency_on_full_connection_then_delivered_and_gap_visible() -> None:
    fanout = make_fanout()
    ws = FakeWs(reading=False)
    sub = make_sub(VIEWER, max_queued_bytes=1500, ws=ws)
    fanout.add(sub)  # type: ignore[arg-type]
    subscribe(fanout, sub, Channel.ALERTS)
    await settle()
    n, before = 0, -1
    while sub.outbox.queued_bytes != before:  # until an alert no longer fits
        before = sub.outbox.queued_bytes
        n += 1
        fanout.publish([alert(n)])
    fanout.publish([emergency(1)])
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


async def test_outbox_when_scheduled_as_answer_and_broadcast_in_one_run_then_one_writer() -> None:
    ws = FakeWs(reading=False)
    sub = make_sub(ws=ws)
    assert sub.outbox.push(b"a")  # written at once; the transport is now over its mark
    sub.outbox.push(b"b", defer=True)  # a broadcast's slice
    sub.outbox.push(b"c", defer=True, answer=True)  # an answer: flushed ahead
    await settle()
    # One writer, waiting for the drain after "b": "c" waits its turn.
    assert ws.sent == [b"a", b"b"]
    ws.resume_reading()
    await settle()
    assert ws.sent == [b"a", b"b", b"c"]
