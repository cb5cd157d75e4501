"""Push channels: per-channel seq, resume buffers, bounded per-connection queues.

Three pieces (docs/protocol.md section 5):

- ``Outbox``: one per connection. ``push`` never waits: to a connection that
  is keeping up (nothing queued, transport below its high-water mark) it hands
  a response straight to the transport; broadcasts wait for the flusher;
  what a connection cannot take yet goes to a queue that its own writer task
  drains, so a slow socket never blocks request handling or the other
  subscribers. A connection whose queue plus transport buffer stays over
  ``max_queued_bytes`` with nothing taken for ``slow_consumer_ms`` is evicted
  (close 4003; see "Slow consumers" below).
- ``Flusher``: one per gateway. A push to many connections is queued on their
  outboxes and written by the flusher, a slice of connections per loop turn,
  so requests are answered between slices.
- ``Fanout``: the channels. The server hands it the manager's events
  (``publish``, sync); it numbers them per channel, encodes each push once, keeps
  the last ``buffer_size`` of each channel for ``resume``, and queues the same
  bytes on every subscriber's outbox.

Sequence numbers. Each channel with a seq (``emergency``, ``alerts``,
``exposure``, ``decisions``) counts from 1 when the gateway starts, +1 per
event, and every subscriber sees the same number for the same event. A
snapshot push is stamped with the seq of the last event it includes; the
events that follow it start at that seq + 1, with no gap and no duplicate. The
``heartbeat`` carries each channel's last seq, so a client also notices a lost
last event. Seqs restart at 1 when the gateway restarts (``session.hello``
returns a new ``epoch``): a client resuming across a restart gets a snapshot.

Traders and the exposure channel. A trader receives exposure pushes only for
its own accounts, but the exposure seq is shared by all subscribers and counts
the pushes of every account. A trader therefore sees jumps in the exposure seq
(for instance 3, then 7): the numbers in between were pushes for accounts it
may not read, not lost data. Nothing is lost, because each exposure push
carries the whole state of one account (gross, limit, global, global_limit),
never a delta: the latest push for an account is that account's current state.
A trader should not treat an exposure seq jump as a gap; when in doubt it can
subscribe to ``exposure`` again (with no ``resume``) to get a fresh snapshot of
its accounts. Every other channel is the same for every subscriber that may
read it, and there a jump is a real gap (see the next paragraph).

Slow consumers. A connection is closed 4003 (and an alert ``SLOW_CONSUMER``
raised) only when its output (queued frames plus the socket's write buffer)
is over ``max_queued_bytes`` and the client took none of it for
``slow_consumer_ms``; a client that keeps reading is never closed, however
large one answer is. While the output is over the bound, pushes the client can
detect as missing (seq'd events and heartbeats; never responses, snapshots or
replayed events) are dropped instead of queued, and an ``emergency`` push first
drops the ones already queued, so an emergency change always reaches a
connected client. The client sees the seq gap and subscribes again with
``resume``.

Exposure pushes are coalesced: at most one per account every ``coalesce_ms``,
always carrying the values at send time, and a change inside the window is
pushed at the window's end, so the last push always shows the final state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from gateway.auth import Principal
from gateway.core.engine import RiskEngine
from gateway.core.events import AlertRaised, DecisionMade, Event, ExposureChanged, ModeChanged
from gateway.core.views import EmergencyView, filter_emergency
from protocol.codec import encode_push
from protocol.codes import AlertCode, AlertLevel, Channel, CloseCode, ErrorCode, Role
from protocol.errors import ProtocolError, bad_request
from protocol.messages import Subscribe, Unsubscribe
from protocol.values import format_decimal, format_time_ms

__all__ = ["SEQ_CHANNELS", "Fanout", "Flusher", "Outbox", "Subscriber", "text_frame"]

log = logging.getLogger("gateway.fanout")

#: Channels whose pushes carry a seq (``heartbeat`` has none).
SEQ_CHANNELS: tuple[Channel, ...] = (
    Channel.EMERGENCY,
    Channel.ALERTS,
    Channel.EXPOSURE,
    Channel.DECISIONS,
)
# Every authenticated connection is on these from `add` until `remove`.
_PERMANENT = frozenset({Channel.EMERGENCY, Channel.HEARTBEAT})
# Channels a connection joins and leaves with subscribe / unsubscribe.
_OPTIONAL = (Channel.ALERTS, Channel.EXPOSURE, Channel.DECISIONS)
# How long an evicted client gets to complete the closing handshake.
EVICTION_CLOSE_TIMEOUT_S = 1.0
# Who may see a seq'd event: None (everyone on the channel), an account name
# (whoever may read that account), or this, which is no account name (names
# are [A-Za-z0-9._:/-]): staff only, never a trader (alerts about a connection).
STAFF_ONLY = "\x00staff"
# Alerts kept for the snapshot: a trader's snapshot holds the last 100 it may
# see, found among the most recent of these.
ALERT_HISTORY = 1000

# Close tasks of evicted connections: held here so they are not collected
# before they have aborted the transport.
_closing: set[asyncio.Task[None]] = set()


class Flusher:
    """Writes broadcast pushes to their outboxes a slice at a time.

    Writing one frame to a socket costs about 13-20 µs here (the send system
    call dominates), so one push to a thousand subscribers is 13-20 ms of
    loop time. Done in one go, it would hold up every request that arrives
    meanwhile. A broadcast therefore only queues the frame on each outbox
    (about 1 µs each) and registers the outbox here; ``run`` then writes
    ``per_turn`` outboxes per loop iteration, so requests are read and
    answered between slices (16: about 0.3 ms, the longest a request waits
    for a slice). Order per connection is kept because anything
    pushed to a registered outbox (a response included) queues behind what
    is already there.

    A frame broadcast to many connections is framed once: with no extensions
    (compression is off) a server's WebSocket frame is the same bytes for every
    connection, so each gets one ``transport.write`` of the framed bytes.
    """

    __slots__ = ("_answers", "_due", "_loop", "_scheduled", "_wires", "per_turn")

    #: Framed frames kept at most; beyond that the cache starts again.
    MAX_FRAMED = 4096

    def __init__(self, *, per_turn: int = 16) -> None:
        self.per_turn = per_turn
        # Outboxes to flush, and barriers (futures) to resolve when reached.
        self._due: deque[Outbox | asyncio.Future[None]] = deque()
        # Outboxes holding answers: all flushed first in every run, so an
        # answer never waits behind a broadcast's slices.
        self._answers: deque[Outbox] = deque()
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # id(frame) -> (frame, framed bytes), for the frames of the broadcasts
        # being written: a broadcast pushes the same bytes object to every
        # outbox. Holding the frame keeps its id from being reused meanwhile.
        self._wires: dict[int, tuple[bytes, bytes]] = {}

    @property
    def pending(self) -> int:
        """Outboxes waiting for their slice."""
        return sum(1 for entry in self._due if type(entry) is not asyncio.Future)

    def schedule(self, outbox: Outbox, *, answer: bool = False) -> None:
        (self._answers if answer else self._due).append(outbox)
        if not self._scheduled:
            self._start()

    async def barrier(self) -> None:
        """Return once every outbox scheduled before this call has been flushed.

        An outbox that has fallen behind (its writer task is waiting for the
        client) is not waited for: it counts as flushed once the flusher has
        handed its frames over.
        """
        if not self._due:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._due.append(waiter)
        await waiter

    def _start(self) -> None:
        self._scheduled = True
        self._loop = asyncio.get_running_loop()
        self._loop.call_soon(self.run)

    def run(self) -> None:
        """Write one slice; schedule the next if outboxes are still waiting.

        ``call_soon`` runs the next slice in the next loop iteration, after
        the I/O that became ready meanwhile.
        """
        self._scheduled = False
        answers = self._answers
        while answers:
            answers.popleft().flush()
        due = self._due
        left = self.per_turn
        while due and left:
            entry = due.popleft()
            if type(entry) is asyncio.Future:
                if not entry.done():
                    entry.set_result(None)
                continue
            entry.flush()  # type: ignore[union-attr]
            left -= 1
        if due:
            self._scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self.run)
        else:
            self._wires.clear()

    def framed(self, frame: bytes) -> bytes:
        """``frame`` as an unmasked, unfragmented WebSocket text frame."""
        wires = self._wires
        entry = wires.get(id(frame))
        if entry is not None and entry[0] is frame:
            return entry[1]
        if len(wires) >= self.MAX_FRAMED:
            wires.clear()
        wire = text_frame(frame)
        wires[id(frame)] = (frame, wire)
        return wire


_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")


def text_frame(payload: bytes) -> bytes:
    """``payload`` as one final, unmasked WebSocket text frame (RFC 6455 5.2).

    What websockets' ``Frame(Opcode.TEXT, payload).serialize(mask=False,
    extensions=[])`` returns (a test holds the two equal at every length
    boundary), in a tenth of the time: the flusher frames every answer it
    writes, not only broadcasts.
    """
    length = len(payload)
    if length < 126:
        return bytes((0x81, length)) + payload
    if length < 65536:
        return _HEADER_16.pack(0x81, 126, length) + payload
    return _HEADER_64.pack(0x81, 127, length) + payload


def _framed_size(length: int) -> int:
    """Bytes of ``text_frame`` for a payload of ``length`` bytes."""
    return length + (2 if length < 126 else 4 if length < 65536 else 10)


def _takes_frames(ws: ServerConnection) -> bool:
    """True when frames framed here may go straight to the connection's
    transport: open, under the high-water mark, no fragmented send of
    websockets' own in progress, and no extension (the frames carry none)."""
    protocol = ws.protocol
    return (
        not ws.paused
        and protocol.state is State.OPEN
        and ws.send_in_progress is None
        and not protocol.extensions
    )


class Outbox:
    """Per-connection output: straight to the transport, or queued for the flusher.

    ``push`` never blocks: it writes the frame at once when the connection is
    idle (see ``write_now``), else queues it for the gateway's ``Flusher``
    (always for ``defer``); a connection that falls behind gets a writer task
    that waits for its socket (only such a connection costs a task). Frames go out
    in push order; output that stays over ``max_queued_bytes`` with nothing
    taken for ``slow_consumer_ms`` evicts the connection. Once the connection is
    evicted or ``close`` was called, ``push`` returns False and sends nothing.
    """

    __slots__ = (
        "_closed",
        "_evict_callbacks",
        "_flusher",
        "_queue",
        "_queued",
        "_scheduled",
        "_taken_mark",
        "_urgent",
        "_watch",
        "_writer",
        "_written",
        "evicted",
        "eviction_queued_bytes",
        "max_queued_bytes",
        "slow_consumer_s",
        "ws",
    )

    def __init__(
        self,
        ws: ServerConnection,
        *,
        max_queued_bytes: int,
        on_evict: Callable[[Outbox], None],
        flusher: Flusher,
        slow_consumer_ms: int = 1000,
    ) -> None:
        self.ws = ws
        self.max_queued_bytes = max_queued_bytes
        #: How long output over the bound may go without a byte taken.
        self.slow_consumer_s = slow_consumer_ms / 1000
        #: True once this connection was evicted as a slow consumer.
        self.evicted = False
        #: The output (queue + socket buffer) the connection had when evicted.
        self.eviction_queued_bytes = 0
        self._evict_callbacks: list[Callable[[Outbox], None]] = [on_evict]
        # (frame, droppable)
        self._queue: deque[tuple[bytes, bool]] = deque()
        self._queued = 0
        self._writer: asyncio.Task[None] | None = None
        # Writes deferred pushes, a slice of connections at a time.
        self._flusher = flusher
        self._scheduled = False
        self._urgent = False  # scheduled with the flusher's answers
        self._closed = False
        # Bytes handed to the transport, framed; minus its buffer: bytes the
        # client took. Watched while the output is over the bound.
        self._written = 0
        self._taken_mark = 0
        self._watch: asyncio.TimerHandle | None = None

    def add_evict_callback(self, callback: Callable[[Outbox], None]) -> None:
        """Also call ``callback(outbox)`` on eviction, after ``on_evict``."""
        self._evict_callbacks.append(callback)

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting for this client: in this queue plus the socket's write buffer."""
        transport = self.ws.transport
        buffered = transport.get_write_buffer_size() if transport is not None else 0
        return self._queued + buffered

    @property
    def busy(self) -> bool:
        """True while frames are queued or being written.

        While busy, send responses through ``push`` too, so they stay in
        order behind the pushes already queued.
        """
        return self._writer is not None or self._scheduled

    @property
    def closed(self) -> bool:
        return self._closed

    def push(
        self,
        frame: bytes,
        *,
        priority: bool = False,
        droppable: bool = False,
        defer: bool = False,
        answer: bool = False,
    ) -> bool:
        """Queue one JSON text frame; False if the connection is evicted or closed.

        When the output is over ``max_queued_bytes``: a ``droppable`` frame (one
        whose loss the client can detect: a seq'd event, a heartbeat) is dropped;
        a ``priority`` frame (emergency pushes) first drops the queued droppable
        frames; any other frame is queued. Responses, snapshots and replayed
        events must not be droppable. Over the bound, the output is watched:
        if the client takes none of it for ``slow_consumer_ms``, ``on_evict`` is
        called once and the connection is closed with 4003.

        ``defer``: queue the frame for the flusher's next slice (see ``Flusher``)
        instead of writing it at once: for a push to many connections, and for
        answers that come in bunches (the outbox's queued frames go out in one
        write). ``answer``: the frame answers a request; a deferred answer is
        flushed ahead of the broadcasts' slices.
        """
        if self._closed:
            return False
        size = len(frame)
        queued = self.queued_bytes
        if queued and queued + size > self.max_queued_bytes:
            if priority:
                self._drop_droppable()
                queued = self.queued_bytes
            if queued and queued + size > self.max_queued_bytes:
                self._watch_progress()
                if droppable:
                    return True  # dropped: the client sees the gap in seq
        if not defer and self.write_now(frame):
            return True
        self._queue.append((frame, droppable))
        self._queued += size
        if self._writer is None:  # else the writer sends it after the rest
            if answer and not self._urgent:
                # Flushed with the answers, even when already waiting for a
                # broadcast's slice (which then finds nothing left).
                self._urgent = self._scheduled = True
                self._flusher.schedule(self, answer=True)
            elif not self._scheduled:
                self._scheduled = True
                self._flusher.schedule(self)
        return True

    def flush_now(self) -> None:
        """Write what waits for the flusher at once (before a close, or when a
        burst of answers grows large); nothing if a writer task has it."""
        if self._scheduled:
            self.flush()

    def flush(self) -> None:
        """Write what is queued (the flusher's call); a writer takes over any rest.

        Frames go straight to the transport while the connection is open and
        the transport is under its high-water mark; what remains after that
        (a connection falling behind) is left to a writer task, which waits for
        the drain.
        """
        self._scheduled = self._urgent = False
        if self._closed or not self._queue or self._writer is not None:
            return  # a writer sends the rest (scheduled twice in one run)
        ws = self.ws
        queue = self._queue
        flusher = self._flusher
        if not _takes_frames(ws):
            self._start_writer()
            return
        # Everything queued goes out in one write: one system call, however many
        # frames piled up since the last slice. The transport buffers what the
        # socket does not take, and its buffer counts towards the bound.
        if len(queue) == 1:
            data = flusher.framed(queue[0][0])
        else:
            data = b"".join([flusher.framed(frame) for frame, _ in queue])
        queue.clear()
        self._queued = 0
        try:
            ws.transport.write(data)
        except Exception as exc:
            self._lost(exc)
            return
        self._wrote(len(data))

    def _start_writer(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._write())

    def _lost(self, exc: BaseException) -> None:
        # The socket is gone (or the protocol refused the frame): nothing can
        # reach this client any more; the read loop ends with the connection.
        log.debug("connection write failed: %r", exc)
        self._closed = True
        self._discard()
        transport = self.ws.transport
        if transport is not None:
            transport.abort()

    def write_now(self, frame: bytes) -> bool:
        """Hand ``frame`` to the transport at once if the connection can take it.

        True when written: the connection is open, nothing is queued here and the
        transport is below its high-water mark (not paused). Otherwise nothing is
        written and False is returned: queue the frame instead. Writing straight
        to an idle connection costs one framing (``text_frame``, as the flusher
        frames) and one ``transport.write``, where a writer task would cost a
        task per frame. The transport's buffer counts in ``queued_bytes``, so the
        eviction bound still applies to what is written.
        """
        if self._writer is not None or self._scheduled or self._closed:
            return False
        ws = self.ws
        if not _takes_frames(ws):
            return False
        data = text_frame(frame)
        try:
            ws.transport.write(data)
        except Exception as exc:
            self._lost(exc)
            return True
        self._wrote(len(data))
        return True

    def _wrote(self, size: int) -> None:
        self._written += size
        if self._watch is None and self.queued_bytes > self.max_queued_bytes:
            self._watch_progress()

    def _taken(self) -> int:
        transport = self.ws.transport
        buffered = transport.get_write_buffer_size() if transport is not None else 0
        return self._written - buffered

    def _watch_progress(self) -> None:
        """Check in ``slow_consumer_s`` whether the client took any output."""
        if self._watch is None and not self._closed:
            self._taken_mark = self._taken()
            self._watch = asyncio.get_running_loop().call_later(
                self.slow_consumer_s, self._check_progress
            )

    def _check_progress(self) -> None:
        """``slow_consumer_s`` after the output went over the bound: a client
        that took nothing since is evicted (even if dropping its droppable
        pushes brought the output back under the bound); one that took some
        output is watched again while the output is still over."""
        self._watch = None
        if self._closed:
            return
        queued = self.queued_bytes
        if self._taken() > self._taken_mark or not queued:
            if queued > self.max_queued_bytes:
                self._watch_progress()  # still reading: watch the next interval
            return
        self._evict(queued)

    def close(self) -> None:
        """Stop the writer and discard what is queued (the connection is gone)."""
        self._closed = True
        self._discard()

    def _drop_droppable(self) -> None:
        kept = deque(entry for entry in self._queue if not entry[1])
        self._queued = sum(len(frame) for frame, _ in kept)
        self._queue = kept

    def _discard(self) -> None:
        self._queue.clear()
        self._queued = 0
        self._scheduled = self._urgent = False  # a pending flush finds it closed
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        writer, self._writer = self._writer, None
        if writer is not None and writer is not asyncio.current_task():
            writer.cancel()

    def _evict(self, queued: int) -> None:
        self._closed = True
        self.evicted = True
        self.eviction_queued_bytes = queued
        self._discard()
        for callback in self._evict_callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("eviction callback failed")
        task = asyncio.get_running_loop().create_task(self._close_slow())
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    async def _close_slow(self) -> None:
        ws = self.ws
        try:
            async with asyncio.timeout(EVICTION_CLOSE_TIMEOUT_S):
                await ws.close(CloseCode.SLOW_CONSUMER, "slow consumer")
            return
        except Exception:
            # A client that stopped reading never completes the closing
            # handshake (and websockets keepalive never fires then): the
            # connection must go regardless of why the close did not finish.
            pass
        transport = ws.transport
        if transport is not None:
            transport.abort()

    async def _write(self) -> None:
        send = self.ws.send
        try:
            # self._queue, not a local: dropping frames replaces the deque.
            while self._queue:
                frame, _ = self._queue.popleft()
                self._queued -= len(frame)
                self._written += _framed_size(len(frame))
                await send(frame, text=True)
                if self._watch is None and self.queued_bytes > self.max_queued_bytes:
                    self._watch_progress()
        except ConnectionClosed:
            self._closed = True
            self._queue.clear()
            self._queued = 0
        except Exception:
            log.exception("writer of a connection failed")
            self._closed = True
            self._queue.clear()
            self._queued = 0
        finally:
            if self._writer is asyncio.current_task():
                self._writer = None


class Subscriber(Protocol):
    """What the fan-out needs of a connection (the server's session)."""

    conn_id: int
    principal: Principal
    outbox: Outbox


@dataclass(eq=False, slots=True)
class _Member:
    sub: Subscriber
    reads_every_account: bool
    # Optional channels currently receiving live events.
    live: set[Channel] = field(default_factory=set)
    # Channels subscribed but not yet delivered: channel -> resume seq or None.
    pending: dict[Channel, int | None] = field(default_factory=dict)


class Fanout:
    """Channels, seqs, resume buffers and delivery to subscribers.

    Call ``add`` once a connection is authenticated and ``remove`` when it is
    closed; ``publish`` with the manager's drained events; ``start`` once a
    loop runs (heartbeat and exposure timer) and ``stop`` on shutdown.
    Nothing here awaits except ``stop``: every method only pushes frames to
    outboxes, which write them at once or queue them for their writer task.
    """

    def __init__(
        self,
        manager: RiskEngine,
        *,
        heartbeat_s: float,
        clock: Callable[[], int],
        buffer_size: int = 1024,
        coalesce_ms: int = 100,
        history: int = 100,
    ) -> None:
        self.manager = manager
        self.heartbeat_s = heartbeat_s
        self.coalesce_ms = coalesce_ms
        self._clock = clock
        self._seq: dict[Channel, int] = dict.fromkeys(SEQ_CHANNELS, 0)
        # (seq, frame or None, audience, data) of the last events, for resume
        # (audience: who may see it, see STAFF_ONLY). An event nobody was
        # subscribed to live is kept unencoded (frame None) and encoded only if
        # a resume asks for it: with no live ``decisions`` subscriber, a
        # validation costs no encoding.
        self._buffers: dict[
            Channel, deque[tuple[int, bytes | None, str | None, Mapping[str, Any]]]
        ] = {channel: deque(maxlen=buffer_size) for channel in SEQ_CHANNELS}
        self.history = history
        # (alert, audience) of the last ALERT_HISTORY alerts.
        self._alerts: deque[tuple[Mapping[str, Any], str | None]] = deque(maxlen=ALERT_HISTORY)
        self._decisions: deque[Mapping[str, Any]] = deque(maxlen=history)
        self._members: dict[int, _Member] = {}
        self._live: dict[Channel, dict[int, _Member]] = {c: {} for c in _OPTIONAL}
        self._exposure_sent_ms: dict[str, int] = {}
        self._exposure_sent: dict[str, Mapping[str, Any]] = {}
        self._exposure_due: dict[str, int] = {}
        self._exposure_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._evicted: list[_Member] = []
        self._depth = 0
        self.evictions = 0
        #: Give it to every subscriber's ``Outbox``: broadcasts are written in slices.
        self.flusher = Flusher()

    # -------------------------------------------------------- connections

    def add(self, sub: Subscriber) -> None:
        """Put a just-authenticated connection on ``emergency`` and ``heartbeat``.

        Queues the emergency snapshot at once, stamped with the current
        emergency seq. Calling it again for the same connection does nothing.
        """
        if sub.conn_id in self._members:
            return
        member = _Member(sub=sub, reads_every_account=sub.principal.reads_every_account)
        self._members[sub.conn_id] = member
        sub.outbox.add_evict_callback(lambda _box: self._on_evicted(member))
        self._depth += 1
        try:
            self._send_snapshot(member, Channel.EMERGENCY)
        finally:
            self._leave()

    def remove(self, sub: Subscriber) -> None:
        """Forget a closed connection (idempotent)."""
        member = self._members.pop(sub.conn_id, None)
        if member is None:
            return
        for channel in member.live:
            self._live[channel].pop(sub.conn_id, None)

    def subscribe(self, sub: Subscriber, req: Subscribe) -> dict[str, Any]:
        """Record a subscription; returns ``{"channels": {NAME: {"seq": current}}}``.

        Pushes nothing: queue the response with ``sub.outbox.push`` and then call
        ``deliver_subscription(sub)`` with no ``await`` in between, which sends
        per channel the events after ``resume[CHANNEL]`` or a snapshot. The
        ``heartbeat`` entry has ``"seq": null`` (heartbeats have no seq).
        Raises ``ProtocolError(FORBIDDEN)`` when a trader asks for
        ``decisions``; then nothing is recorded.
        """
        member = self._member(sub)
        if Channel.DECISIONS in req.channels and sub.principal.role is Role.TRADER:
            raise ProtocolError(
                ErrorCode.FORBIDDEN,
                f"{sub.principal.name} (trader) may not subscribe to decisions "
                "(viewers and admins only)",
            )
        result: dict[str, dict[str, int | None]] = {}
        for channel in req.channels:
            if channel is Channel.HEARTBEAT:
                result[channel.value] = {"seq": None}
                continue
            member.pending[channel] = req.resume.get(channel)
            if channel in self._live:
                # Off live delivery until deliver_subscription, so a catch-up
                # and a live event can never both carry the same seq.
                self._live[channel].pop(sub.conn_id, None)
                member.live.discard(channel)
            result[channel.value] = {"seq": self._seq[channel]}
        return {"channels": result}

    def deliver_subscription(self, sub: Subscriber) -> None:
        """Send what ``subscribe`` recorded, then deliver those channels live.

        Per channel: the events after ``resume[CHANNEL]`` when the resume
        buffer still holds all of them, else a snapshot stamped with the
        current seq. Live events follow with no gap and no duplicate.
        """
        member = self._members.get(sub.conn_id)
        if member is None or not member.pending:
            return
        pending, member.pending = member.pending, {}
        self._depth += 1
        try:
            for channel, resume in pending.items():
                if resume is None or not self._replay(member, channel, resume):
                    self._send_snapshot(member, channel)
                if channel in self._live:
                    self._live[channel][sub.conn_id] = member
                    member.live.add(channel)
        finally:
            self._leave()

    def unsubscribe(self, sub: Subscriber, req: Unsubscribe) -> dict[str, Any]:
        """Stop ``req.channels``; returns ``{"channels": [channels still subscribed]}``.

        Raises ``ProtocolError(BAD_REQUEST)`` naming the channel for
        ``emergency`` or ``heartbeat``, which every connection receives.
        """
        member = self._member(sub)
        for channel in req.channels:
            if channel in _PERMANENT:
                raise bad_request(
                    f"channel {channel.value} cannot be unsubscribed: every connection receives it"
                )
        for channel in req.channels:
            member.pending.pop(channel, None)
            member.live.discard(channel)
            self._live[channel].pop(sub.conn_id, None)
        return {"channels": self._channels_of(member)}

    # ------------------------------------------------------------- events

    def publish(self, events: Iterable[Event]) -> None:
        """Queue the pushes for the manager's events, in order. Never awaits.

        ``ModeChanged`` goes to every added connection (never dropped
        while it is connected), ``AlertRaised`` to ``alerts``,
        ``DecisionMade`` to ``decisions``, ``ExposureChanged`` to ``exposure``
        (coalesced, trader-filtered).
        """
        self._depth += 1
        try:
            for event in events:
                if isinstance(event, ModeChanged):
                    self._emit(Channel.EMERGENCY, event.view)
                elif isinstance(event, AlertRaised):
                    alert = event.alert
                    audience = alert.get("account") if event.for_traders else STAFF_ONLY
                    self._alerts.append((alert, audience))
                    self._emit(Channel.ALERTS, alert, audience)
                elif isinstance(event, DecisionMade):
                    self._decisions.append(event.data)
                    self._emit(Channel.DECISIONS, event.data)
                elif isinstance(event, ExposureChanged):
                    self._exposure_changed(event.account)
        finally:
            self._leave()

    def flush_exposure(self, now_ms: int) -> int | None:
        """Push every coalesced exposure change due at ``now_ms``.

        Returns when the next one is due (ms), or None when none is waiting.
        The timer started by ``start`` calls this; tests call it with a pinned
        clock.
        """
        due = [account for account, at in self._exposure_due.items() if at <= now_ms]
        self._depth += 1
        try:
            for account in due:
                del self._exposure_due[account]
                self._push_exposure(account, now_ms)
        finally:
            self._leave()
        return min(self._exposure_due.values(), default=None)

    def heartbeat(self) -> None:
        """Push one heartbeat to every added connection (the heartbeat task's tick)."""
        frame = encode_push(
            Channel.HEARTBEAT.value,
            None,
            {
                "ts": format_time_ms(self._clock()),
                "seqs": {channel.value: self._seq[channel] for channel in SEQ_CHANNELS},
            },
        )
        self._depth += 1
        try:
            for member in list(self._members.values()):
                member.sub.outbox.push(frame, droppable=True, defer=True)
        finally:
            self._leave()

    # ----------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the heartbeat and the exposure timer (needs a running loop)."""
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._heartbeats(), name="fanout-heartbeat"),
            loop.create_task(self._exposure_timer(), name="fanout-exposure"),
        ]

    async def stop(self) -> None:
        """Stop the background tasks; exposure changes still waiting are pushed."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._exposure_due:
            self.flush_exposure(max(self._exposure_due.values()))

    def stats(self) -> dict[str, Any]:
        """``{"connections", "subscribers": {CHANNEL: n}, "queued_bytes", "evictions"}``."""
        members = self._members.values()
        subscribers = {channel.value: len(self._members) for channel in _PERMANENT}
        subscribers.update({channel.value: len(live) for channel, live in self._live.items()})
        return {
            "connections": len(self._members),
            "subscribers": subscribers,
            "queued_bytes": sum(m.sub.outbox.queued_bytes for m in members),
            "evictions": self.evictions,
        }

    def seq(self, channel: Channel) -> int:
        """The seq of the channel's last event (0 before the first)."""
        return self._seq[channel]

    # ------------------------------------------------------------ internals

    def _member(self, sub: Subscriber) -> _Member:
        member = self._members.get(sub.conn_id)
        if member is None:
            raise RuntimeError(f"connection {sub.conn_id} is not added: call Fanout.add first")
        return member

    def _channels_of(self, member: _Member) -> list[str]:
        names = set(_PERMANENT) | member.live | set(member.pending)
        return [channel.value for channel in Channel if channel in names]

    def _emit(self, channel: Channel, data: Mapping[str, Any], audience: str | None = None) -> None:
        seq = self._seq[channel] + 1
        self._seq[channel] = seq
        if channel is not Channel.EMERGENCY and not self._live[channel]:
            self._buffers[channel].append((seq, None, audience, data))
            return
        frame = encode_push(channel.value, seq, data)
        self._buffers[channel].append((seq, frame, audience, data))
        if channel is Channel.EMERGENCY:
            # Each trader's document lists only its own accounts: one frame
            # per set of accounts, and the shared one for everyone else.
            filtered: dict[frozenset[str], bytes] = {}
            for member in list(self._members.values()):
                wire = frame
                if not member.reads_every_account and data["accounts"]:
                    wire = self._emergency_frame(member, seq, data, filtered)
                member.sub.outbox.push(wire, priority=True, defer=True)
            return
        for member in list(self._live[channel].values()):
            if audience is None or self._may_see(member, audience):
                member.sub.outbox.push(frame, droppable=True, defer=True)

    @staticmethod
    def _may_see(member: _Member, audience: str) -> bool:
        """Whether ``member`` may see an event for ``audience`` (not None)."""
        if audience == STAFF_ONLY:
            return member.sub.principal.role is not Role.TRADER
        return member.reads_every_account or member.sub.principal.may_read_account(audience)

    def _emergency_frame(
        self,
        member: _Member,
        seq: int,
        data: Mapping[str, Any],
        cache: dict[frozenset[str], bytes] | None = None,
        *,
        snapshot: bool = False,
    ) -> bytes:
        """The EMERGENCY push ``data`` as a trader sees it: its own accounts only."""
        principal = member.sub.principal
        key = principal.accounts
        if cache is not None and key in cache:
            return cache[key]
        view = filter_emergency(cast(EmergencyView, data), principal.may_read_account)
        wire = encode_push(Channel.EMERGENCY.value, seq, view, snapshot=snapshot)
        if cache is not None:
            cache[key] = wire
        return wire

    def _replay(self, member: _Member, channel: Channel, resume: int) -> bool:
        """Queue the events after ``resume``; False when the buffer lacks some."""
        current = self._seq[channel]
        if resume > current:
            return False
        if resume == current:
            return True
        buffer = self._buffers[channel]
        if not buffer or buffer[0][0] > resume + 1:
            return False
        outbox = member.sub.outbox
        priority = channel is Channel.EMERGENCY
        start = resume + 1 - buffer[0][0]
        for index in range(start, len(buffer)):
            seq, frame, audience, data = buffer[index]
            if audience is None or self._may_see(member, audience):
                if frame is None:
                    frame = encode_push(channel.value, seq, data)
                    buffer[index] = (seq, frame, audience, data)
                if priority and not member.reads_every_account and data["accounts"]:
                    frame = self._emergency_frame(member, seq, data)
                # Not droppable: the client asked for exactly these.
                outbox.push(frame, priority=priority)
        return True

    def _send_snapshot(self, member: _Member, channel: Channel) -> None:
        data: Mapping[str, Any]
        if channel is Channel.EMERGENCY:
            data = self.manager.emergency_view(member.sub.principal.readable)
        elif channel is Channel.ALERTS:
            data = {"alerts": self._visible_alerts(member)}
        elif channel is Channel.DECISIONS:
            data = {"decisions": list(self._decisions)}
        else:
            data = self._exposure_snapshot(member)
        frame = encode_push(channel.value, self._seq[channel], data, snapshot=True)
        member.sub.outbox.push(frame, priority=channel is Channel.EMERGENCY)

    def _visible_alerts(self, member: _Member) -> list[Mapping[str, Any]]:
        """The last ``history`` alerts ``member`` may see, oldest first."""
        visible: list[Mapping[str, Any]] = []
        for alert, audience in reversed(self._alerts):
            if audience is None or self._may_see(member, audience):
                visible.append(alert)
                if len(visible) == self.history:
                    break
        visible.reverse()
        return visible

    def _exposure_snapshot(self, member: _Member) -> dict[str, Any]:
        manager = self.manager
        principal = member.sub.principal
        if member.reads_every_account:
            accounts = sorted(manager.accounts)
        else:
            # A trader's own accounts, also those with no position yet (gross 0).
            accounts = sorted(principal.accounts)
        return {
            "accounts": {account: manager.exposure_of(account) for account in accounts},
            "global": format_decimal(manager.gross_exposure),
            "global_limit": format_decimal(manager.limits.max_exposure),
        }

    def _exposure_changed(self, account: str) -> None:
        if account in self._exposure_due:
            return  # the scheduled push reads the values at send time
        now = self._clock()
        sent = self._exposure_sent_ms.get(account)
        if sent is None or not 0 <= now - sent < self.coalesce_ms:
            self._push_exposure(account, now)
            return
        self._exposure_due[account] = sent + self.coalesce_ms
        self._exposure_wake.set()

    def _push_exposure(self, account: str, now_ms: int) -> None:
        data = self.manager.exposure_of(account)
        if self._exposure_sent.get(account) == data:
            return  # the last push already shows this state
        self._exposure_sent[account] = data
        self._exposure_sent_ms[account] = now_ms
        self._emit(Channel.EXPOSURE, data, account)

    def _on_evicted(self, member: _Member) -> None:
        self._evicted.append(member)
        if self._depth == 0:
            self._depth += 1
            self._leave()

    def _leave(self) -> None:
        """End a fan-out operation; at the outermost, handle evictions it caused.

        Evictions happen inside loops over the subscribers, so they are
        handled after those loops: removing the connection and publishing the
        ``SLOW_CONSUMER`` alert (which may evict more connections in turn).
        """
        try:
            if self._depth == 1:
                while self._evicted:
                    member = self._evicted.pop(0)
                    if self._members.get(member.sub.conn_id) is not member:
                        continue
                    self.remove(member.sub)
                    self.evictions += 1
                    queued = member.sub.outbox.eviction_queued_bytes
                    message = (
                        f"connection {member.sub.conn_id} ({member.sub.principal.name}) "
                        f"closed 4003 as a slow consumer: {queued} bytes queued, limit "
                        f"{member.sub.outbox.max_queued_bytes}, none taken for "
                        f"{round(member.sub.outbox.slow_consumer_s * 1000)} ms"
                    )
                    log.warning("%s", message)
                    alert = {
                        "level": AlertLevel.WARNING.value,
                        "code": AlertCode.SLOW_CONSUMER.value,
                        "message": message,
                        "ts": format_time_ms(self._clock()),
                    }
                    # About a connection: staff only, never a trader.
                    self._alerts.append((alert, STAFF_ONLY))
                    self._emit(Channel.ALERTS, alert, STAFF_ONLY)
        finally:
            self._depth -= 1

    async def _heartbeats(self) -> None:
        loop = asyncio.get_running_loop()
        period = self.heartbeat_s
        tick = loop.time()
        while True:
            tick += period
            delay = tick - loop.time()
            if delay < 0:
                # Fell behind (a stalled loop): skip the missed beats
                # instead of sending them in a burst.
                tick = loop.time()
                delay = 0
            await asyncio.sleep(delay)
            try:
                self.heartbeat()
            except Exception:
                log.exception("heartbeat failed")

    async def _exposure_timer(self) -> None:
        while True:
            await self._exposure_wake.wait()
            self._exposure_wake.clear()
            while True:
                try:
                    due = self.flush_exposure(self._clock())
                except Exception:
                    log.exception("exposure flush failed")
                    due = None
                if due is None:
                    break
                # Bounded by the window, so a clock step cannot stall pushes.
                wait_ms = min(max(due - self._clock(), 1), self.coalesce_ms)
                await asyncio.sleep(wait_ms / 1000)
