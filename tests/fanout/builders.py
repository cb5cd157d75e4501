"""Builders for outbox and fan-out tests: a connection faked at the ``wsio`` boundary.

The outbox reaches websockets' internals only through ``gateway.net.wsio``;
``patch_wsio`` routes those functions to ``FakeWs`` for fake connections (and
to the real ones for anything else), so no fake here copies a websockets
internal. tests/net/test_wsio.py holds ``wsio`` to a real connection.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson
import pytest
from websockets.exceptions import ConnectionClosedError

from gateway.auth import Principal
from gateway.core.engine import RiskEngine
from gateway.core.events import AlertRaised, DecisionMade, Event, ModeChanged
from gateway.core.limits import Limits
from gateway.fanout import Delivery, Fanout, Flusher, Outbox, text_frame
from gateway.net import wsio
from protocol.codec import encode_ok
from protocol.codes import Channel, Role
from protocol.messages import PositionUpdate, Subscribe

T0 = 1_700_000_000_000
ADMIN = Principal(name="ops", role=Role.ADMIN)
VIEWER = Principal(name="dash", role=Role.VIEWER)
TRADER_A1 = Principal(name="desk-1", role=Role.TRADER, accounts=frozenset({"A1"}))
BIG = 1 << 30


class FakeWs:
    """Records sent frames, written framed (parsed back here) or by ``send``.

    With ``reading=False`` it behaves like a client that stopped reading: the
    first frame lands in the write buffer, which then stays over the
    high-water mark, and a ``send`` waits (as websockets waits in drain)
    until ``resume_reading``.
    """

    def __init__(self, *, reading: bool = True, close_hangs: bool = False) -> None:
        self.sent: list[bytes] = []
        #: Each ``wsio.write``, as written.
        self.wires: list[bytes] = []
        #: Bytes written and not yet taken by the client.
        self.buffered = 0
        self.over_high_water = False
        #: False once the connection is closing (no frame may be written).
        self.open = True
        #: Frames received and not yet read by the handler.
        self.unread = 0
        self.aborted = asyncio.Event()
        self.closes: list[tuple[int, str]] = []
        self.close_hangs = close_hangs
        self.activity = asyncio.Event()
        self._reading = asyncio.Event()
        if reading:
            self._reading.set()

    def record(self, frame: bytes) -> None:
        self.sent.append(frame)
        self.activity.set()
        if not self._reading.is_set():
            self.buffered += len(text_frame(frame))  # framed, as on the wire
            self.over_high_water = True

    def write_framed(self, data: bytes) -> None:
        """What ``wsio.write`` hands the transport: unmasked, final text frames."""
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
            self.record(data[start : start + length])
            off = start + length

    async def drained(self) -> None:
        await self._reading.wait()

    # The public websockets API the outbox calls.

    async def send(self, frame: bytes, text: bool | None = None) -> None:
        assert text is True, "pushes are text frames"
        if not self.open:
            raise ConnectionClosedError(None, None)
        self.record(frame)
        await self._reading.wait()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closes.append((code, reason))
        self.open = False
        if self.close_hangs:
            await asyncio.Event().wait()

    # The client's side.

    def resume_reading(self) -> None:
        self._reading.set()
        self.buffered = 0
        self.over_high_water = False

    def take(self, size: int) -> None:
        """The client reads ``size`` bytes of the write buffer (and no more)."""
        self.buffered = max(0, self.buffered - size)


def _fake_takes_frames(ws: FakeWs) -> bool:
    return ws.open and not ws.over_high_water


_FAKES: dict[str, Callable[..., Any]] = {
    "frames_waiting": lambda ws: ws.unread,
    "is_write_paused": lambda ws: ws.over_high_water,
    "drain": lambda ws: ws.drained(),
    "takes_frames": _fake_takes_frames,
    "write": lambda ws, data: ws.write_framed(data),
    "buffered": lambda ws: ws.buffered,
    "abort": lambda ws: ws.aborted.set(),
}


def patch_wsio(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route every ``wsio`` function to ``FakeWs`` when given one."""
    for name, fake in _FAKES.items():
        real = getattr(wsio, name)

        def routed(
            ws: Any, *args: Any, _fake: Callable[..., Any] = fake, _real: Callable[..., Any] = real
        ) -> Any:
            return _fake(ws, *args) if isinstance(ws, FakeWs) else _real(ws, *args)

        monkeypatch.setattr(wsio, name, routed)


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


_conn_ids = itertools.count(1)


@dataclass
class Current:
    """The flusher and task group of the running test (see tests/fanout/conftest.py):
    as in the server, every outbox of one gateway shares one flusher."""

    flusher: Flusher = field(default_factory=Flusher)
    tasks: asyncio.TaskGroup | None = None


current = Current()


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


def make_sub(
    principal: Principal = VIEWER,
    *,
    max_queued_bytes: int = BIG,
    ws: FakeWs | None = None,
    flusher: Flusher | None = None,
    slow_consumer_ms: int = 1000,
    tasks: asyncio.TaskGroup | None = None,
) -> Sub:
    ws = ws or FakeWs()
    evicted: list[Outbox] = []

    def on_evict(outbox: Outbox) -> None:
        evicted.append(outbox)
        ws.activity.set()

    tasks = tasks or current.tasks
    assert tasks is not None, "needs the outbox_tasks fixture"
    outbox = Outbox(
        ws,  # type: ignore[arg-type]
        max_queued_bytes=max_queued_bytes,
        on_evict=on_evict,
        flusher=flusher or current.flusher,
        tasks=tasks,
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
    result = fanout.subscribe(sub, Subscribe(channels=channels, resume=resume or {}))
    sub.outbox.push(encode_ok(request_id, result), Delivery.ANSWER)
    fanout.deliver_subscription(sub)
    return result


def publish(fanout: Fanout, events: list[Event]) -> None:
    """Publish made-up events as the engine would have raised them: its
    alerts and decisions are in the engine's history first."""
    history = fanout.risk.history
    for event in events:
        if isinstance(event, AlertRaised):
            history.add_alert(event.alert, event.for_traders)
        elif isinstance(event, DecisionMade):
            history.add_decision(event.data)
    fanout.publish(events)


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
