"""One WebSocket connection: who it is, its output, and how its answers go out.

A ``Session`` turns the service's outcomes into frames: at once, once a
journal record is durable, or from a task of the connection's own TaskGroup.
Answers may therefore come out of request order; clients match them by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from dataclasses import dataclass

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from gateway import metrics
from gateway.auth import Principal
from gateway.fanout import Delivery, Outbox
from gateway.net import wsio
from gateway.net.ratelimit import FrameRateLimiter
from gateway.persistence import PersistenceError, RecordStore
from gateway.service import Reply, ReplyLater, ReplyWhenDurable, Result, unavailable_message
from protocol import codec
from protocol.codes import ErrorCode
from protocol.errors import ProtocolError

#: A request's id as the client sent it (echoed in the answer).
RequestId = int | str | None

log = logging.getLogger("gateway.net")

#: Answers held for one write while a burst of requests is handled, at most.
ANSWER_BATCH_BYTES = 64 * 1024


@dataclass(eq=False, slots=True)
class Session:
    """One WebSocket connection. ``tasks`` is its own TaskGroup: every task
    working for this connection (answers waiting for an fsync, its outbox's
    writer) lives there and ends with it."""

    conn_id: int
    ws: ServerConnection
    outbox: Outbox
    peer: str
    tasks: asyncio.TaskGroup
    limiter: FrameRateLimiter
    principal: Principal | None = None
    cancel_on_disconnect: bool = False
    #: The gateway is closing this connection (a task of its own does it).
    closing: bool = False

    async def send(self, frame: bytes) -> None:
        """Send a response, keeping order behind any queued pushes.

        While more requests were read already, answers wait to go out
        together in one write, up to ``ANSWER_BATCH_BYTES``; then they are
        written, and reading waits while the transport is over its high-water
        mark, so a client pipelining a large burst is slowed down, never
        taken for a slow consumer.
        """
        self.answer(frame)
        await self.drained()

    def answer(self, frame: bytes) -> None:
        """The part of ``send`` that never waits: the frame is written, or
        queued in order behind pushes and earlier answers (dropped if the
        connection is closed or evicted)."""
        outbox = self.outbox
        if outbox.busy or wsio.frames_waiting(self.ws):
            outbox.push(frame, Delivery.ANSWER_BATCHED)
            if outbox.queued_bytes >= ANSWER_BATCH_BYTES:
                outbox.flush_now()
        elif not outbox.write_now(frame):
            # Over the high-water mark or closing: through the outbox, which
            # counts what it writes (the slow-consumer rule).
            outbox.push(frame, Delivery.ANSWER)

    async def drained(self) -> None:
        """Wait while the transport is over its high-water mark (stop reading)."""
        if wsio.is_write_paused(self.ws):
            await wsio.drain(self.ws)

    # ------------------------------------------------------------- outcomes

    async def reply(self, request_id: RequestId, method: str, outcome: Reply) -> None:
        """Answer now, then run the outcome's follow-up."""
        self.answer(codec.encode_ok(request_id, outcome.result))
        metrics.count_request(method, "ok")
        if outcome.after is not None:
            try:
                outcome.after()
            except Exception:  # answered already: log it, never answer twice
                log.exception("bookkeeping after %s", method)
        await self.drained()

    def reply_when_durable(
        self, store: RecordStore, request_id: RequestId, method: str, outcome: ReplyWhenDurable
    ) -> None:
        """Answer from the journal's callback once ``outcome.seq`` is durable."""
        result = outcome.result

        def answer(error: PersistenceError | None) -> None:
            if error is None:
                metrics.count_request(method, "ok")
                frame = codec.encode_ok(request_id, result)
            else:
                metrics.count_request(method, ErrorCode.UNAVAILABLE.value)
                frame = codec.encode_error(
                    request_id, ErrorCode.UNAVAILABLE, unavailable_message(error)
                )
            # Queued behind any pushes, and written with the other answers the
            # same fsync released; a closed connection drops it.
            self.outbox.push(frame, Delivery.ANSWER_BATCHED)

        store.when_durable(outcome.seq, answer)

    def reply_later(self, request_id: RequestId, method: str, outcome: ReplyLater) -> None:
        """Answer from a task of this connection once the result is ready."""
        self.tasks.create_task(self._answer_later(request_id, method, outcome.result))

    async def _answer_later(
        self, request_id: RequestId, method: str, result: Awaitable[Result]
    ) -> None:
        try:
            frame = codec.encode_ok(request_id, await result)
            metrics.count_request(method, "ok")
        except ProtocolError as exc:
            metrics.count_request(method, exc.code.value)
            frame = codec.encode_error(request_id, exc.code, exc.message, exc.details)
        except PersistenceError as exc:
            metrics.count_request(method, ErrorCode.UNAVAILABLE.value)
            frame = codec.encode_error(request_id, ErrorCode.UNAVAILABLE, unavailable_message(exc))
        except Exception:
            log.exception("internal error in %s", method)
            frame = codec.encode_error(request_id, ErrorCode.INTERNAL, "internal error (logged)")
        # The connection may be gone by now: nothing to answer, and no error
        # may reach the connection's TaskGroup (it would cancel the others).
        with contextlib.suppress(ConnectionClosed, OSError):
            await self.send(frame)

    async def refuse(self, request_id: RequestId, method: str, error: ProtocolError) -> None:
        metrics.count_request(method, error.code.value)
        await self.send(codec.encode_error(request_id, error.code, error.message, error.details))
