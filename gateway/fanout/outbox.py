"""Per-connection output: written at once, queued for the flusher, or for a writer.

A connection that keeps up (nothing queued, transport under its high-water
mark) gets each answer straight from ``push``; broadcasts wait for the
gateway's ``Flusher``; what a connection cannot take yet is queued, and a
writer task of its own drains that queue, so a slow socket never blocks
request handling or the other subscribers.

Slow consumers (docs/protocol.md section 5). A connection is closed 4003 only
when its output (queued frames plus the socket's write buffer) is over
``max_queued_bytes`` and the client took none of it for ``slow_consumer_ms``;
a client that keeps reading is never closed, however large one answer is.
While the output is over the bound, the pushes a client can detect as missing
(``Delivery.BROADCAST``: seq'd events and heartbeats) are dropped instead of
queued, and an emergency push first drops the ones already queued, so an
emergency change always reaches a connected client.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from collections.abc import Callable

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from gateway.fanout.flusher import Flusher, framed_size, text_frame
from gateway.net import wsio
from protocol.codes import CloseCode

__all__ = ["EVICTION_CLOSE_TIMEOUT_S", "Delivery", "Outbox"]

log = logging.getLogger("gateway.fanout")

#: How long an evicted client gets to complete the closing handshake.
EVICTION_CLOSE_TIMEOUT_S = 1.0


class Delivery(enum.Enum):
    """What a frame is, which decides when it is written and whether it may
    be dropped while the connection's output is over ``max_queued_bytes``.

    Only broadcasts are ever dropped; every other frame is queued however
    full the output is (the slow-consumer rule bounds it in time instead).
    """

    #: The answer to this connection's request: written at once when the
    #: connection is idle; when it must wait, it is flushed in the flusher's
    #: next run, ahead of the broadcasts' slices.
    ANSWER = (False, False, False, True)
    #: An answer released together with others (a burst of requests read at
    #: once, or the answers one fsync made durable): queued for the flusher's
    #: next run, ahead of the broadcasts' slices, so they go out in one write.
    ANSWER_BATCHED = (False, False, True, True)
    #: A snapshot or a replayed event for this connection (a subscription's
    #: catch-up): written at once when the connection is idle.
    CATCH_UP = (False, False, False, False)
    #: The same for the emergency channel: also makes room by dropping the
    #: queued broadcasts when the output is over the bound.
    EMERGENCY_CATCH_UP = (False, True, False, False)
    #: A seq'd event or heartbeat pushed to many connections: written in the
    #: flusher's slices, dropped while the output is over the bound (the
    #: client sees the gap in seq and resumes).
    BROADCAST = (True, False, True, False)
    #: An emergency push to every connection: written in the flusher's
    #: slices, never dropped, and over the bound it first drops the queued
    #: broadcasts.
    EMERGENCY_BROADCAST = (False, True, True, False)

    def __init__(self, droppable: bool, priority: bool, deferred: bool, answer: bool) -> None:
        self.droppable = droppable
        self.priority = priority
        self.deferred = deferred
        self.answer = answer


class Outbox:
    """Per-connection output: straight to the transport, or queued for the flusher.

    ``push`` never blocks: it writes the frame at once when the connection is
    idle (see ``write_now``), else queues it for the gateway's ``Flusher``
    (always for deferred deliveries); a connection that falls behind gets a
    writer task, in ``tasks``, that waits for its socket (only such a
    connection costs a task). Frames go out in push order; output that stays
    over ``max_queued_bytes`` with nothing taken for ``slow_consumer_ms``
    evicts the connection: ``on_evict`` is called and the connection closed
    4003 from a task in ``tasks``. Once the connection is evicted or ``close``
    was called, ``push`` returns False and sends nothing.

    ``tasks`` is the connection's own task group. No task of the outbox lets
    an error out into it (a failing child would cancel the connection's read
    loop): a lost connection ends the writer quietly.
    """

    __slots__ = (
        "_closed",
        "_evict_callbacks",
        "_flusher",
        "_queue",
        "_queued",
        "_scheduled",
        "_taken_mark",
        "_tasks",
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
        tasks: asyncio.TaskGroup,
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
        self._tasks = tasks
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
        return self._queued + wsio.buffered(self.ws)

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

    def push(self, frame: bytes, delivery: Delivery) -> bool:
        """Queue one JSON text frame; False if the connection is evicted or closed.

        ``delivery`` says what the frame is (see ``Delivery``). When the
        output is over ``max_queued_bytes``: a broadcast is dropped; an
        emergency push first drops the queued broadcasts; any other frame is
        queued. Over the bound, the output is watched: if the client takes
        none of it for ``slow_consumer_ms``, ``on_evict`` is called once and
        the connection is closed with 4003.
        """
        if self._closed:
            return False
        size = len(frame)
        queued = self.queued_bytes
        if queued and queued + size > self.max_queued_bytes:
            if delivery.priority:
                self._drop_droppable()
                queued = self.queued_bytes
            if queued and queued + size > self.max_queued_bytes:
                self._watch_progress()
                if delivery.droppable:
                    return True  # dropped: the client sees the gap in seq
        if not delivery.deferred and self.write_now(frame):
            return True
        self._queue.append((frame, delivery.droppable))
        self._queued += size
        if self._writer is None:  # else the writer sends it after the rest
            if delivery.answer and not self._urgent:
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
        if not wsio.takes_frames(ws):
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
            wsio.write(ws, data)
        except Exception as exc:
            self._lost(exc)
            return
        self._wrote(len(data))

    def write_now(self, frame: bytes) -> bool:
        """Hand ``frame`` to the transport at once if the connection can take it.

        True when written: the connection is open, nothing is queued here and the
        transport is below its high-water mark (not paused). Otherwise nothing is
        written and False is returned: queue the frame instead. Writing straight
        to an idle connection costs one framing (``text_frame``, as the flusher
        frames) and one transport write, where a writer task would cost a
        task per frame. The transport's buffer counts in ``queued_bytes``, so the
        eviction bound still applies to what is written.
        """
        if self._writer is not None or self._scheduled or self._closed:
            return False
        ws = self.ws
        if not wsio.takes_frames(ws):
            return False
        data = text_frame(frame)
        try:
            wsio.write(ws, data)
        except Exception as exc:
            self._lost(exc)
            return True
        self._wrote(len(data))
        return True

    def close(self) -> None:
        """Stop the writer and discard what is queued (the connection is gone).

        A closing handshake an eviction started is left to finish: it ends
        within ``EVICTION_CLOSE_TIMEOUT_S`` (then the socket is aborted), and
        the connection's task group waits for it.
        """
        self._closed = True
        self._discard()

    # ------------------------------------------------------------ internals

    def _start_writer(self) -> None:
        write = self._write()
        try:
            self._writer = self._tasks.create_task(write)
        except RuntimeError as exc:
            # The connection's task group has ended: its handler is gone, so
            # nothing can reach this client any more.
            write.close()
            self._lost(exc)

    def _lost(self, exc: BaseException) -> None:
        # The socket is gone (or the protocol refused the frame): nothing can
        # reach this client any more; the read loop ends with the connection.
        log.debug("connection write failed: %r", exc)
        self._closed = True
        self._discard()
        wsio.abort(self.ws)

    def _wrote(self, size: int) -> None:
        self._written += size
        if self._watch is None and self.queued_bytes > self.max_queued_bytes:
            self._watch_progress()

    def _taken(self) -> int:
        return self._written - wsio.buffered(self.ws)

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
        close = self._close_slow()
        try:
            self._tasks.create_task(close)
        except RuntimeError:
            # The connection's task group has ended: no handshake to wait for.
            close.close()
            wsio.abort(self.ws)

    async def _close_slow(self) -> None:
        ws = self.ws
        closed = False
        try:
            async with asyncio.timeout(EVICTION_CLOSE_TIMEOUT_S):
                await ws.close(CloseCode.SLOW_CONSUMER, "slow consumer")
            closed = True
        except Exception as exc:
            # A client that stopped reading never completes the closing
            # handshake (and websockets keepalive never fires then): the
            # connection must go regardless of why the close did not finish.
            log.debug("closing handshake of a slow consumer failed: %r", exc)
        finally:
            if not closed:  # also when cancelled: the socket must not stay
                wsio.abort(ws)

    async def _write(self) -> None:
        send = self.ws.send
        try:
            # self._queue, not a local: dropping frames replaces the deque.
            while self._queue:
                frame, _ = self._queue.popleft()
                self._queued -= len(frame)
                self._written += framed_size(len(frame))
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
