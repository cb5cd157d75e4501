"""The WebSocket and HTTP shell: ``ws://HOST:PORT/v1/ws``, ``/healthz``, ``/metrics``, ``/``.

The server decodes a frame through the codec, checks the caller's role and
accounts, asks the manager, hands the manager's records to the journal and its
events to the fan-out, and answers. It makes no risk decision itself.

Acknowledgements of state changes wait for the journal (per the fsync policy)
in a task of their own, so one connection may pipeline many updates and one
fsync serves them all; read-only answers go out at once. Responses may
therefore come out of request order; they are matched by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiofiles
import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request as HttpRequest
from websockets.http11 import Response as HttpResponse

from gateway import metrics
from gateway.admission import FD_RESERVE, Admission, GatewayConnection, open_fds, raise_fd_limit
from gateway.auth import Principal, TokenStore
from gateway.config import GatewayConfig, Limits
from gateway.core.engine import RiskEngine
from gateway.core.events import Decision, ModeChanged
from gateway.core.modes import GATEWAY_ACTOR
from gateway.core.records import StagedRecord
from gateway.fanout import Fanout, Outbox
from gateway.journal import PersistenceError
from gateway.rules import Rule
from gateway.store import Store
from protocol import codec
from protocol.codes import PROTOCOL_VERSION, CloseCode, ErrorCode, Mode, Role
from protocol.errors import ProtocolError
from protocol.messages import (
    EmergencySet,
    LimitsSet,
    OrderValidate,
    PositionSnapshot,
    PositionUpdate,
    PriceUpdate,
    Request,
    ReservationRelease,
    SessionAuth,
    SessionHello,
    StateGet,
    Subscribe,
    Unsubscribe,
)
from protocol.values import format_time_ms

log = logging.getLogger("gateway.server")


class _NoDebugLogger(logging.LoggerAdapter[logging.Logger]):
    """websockets' logger without DEBUG: at that level websockets writes every
    handshake header (``Authorization: Bearer ...`` included) and every frame."""

    def isEnabledFor(self, level: int) -> bool:
        return level > logging.DEBUG and self.logger.isEnabledFor(level)


_WS_LOG = _NoDebugLogger(logging.getLogger("websockets.server"), {})

SERVER_NAME = "risk-gateway/0.1.0"
WS_PATH = "/v1/ws"
DASHBOARD_FILE = Path(__file__).resolve().parent.parent / "clients" / "dashboard" / "index.html"
# The dashboard's files, served from DASHBOARD_FILE's directory: path -> (file, content type).
_DASHBOARD_ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
# Methods that change state: refused with UNAVAILABLE once persistence failed.
_WRITES = frozenset(
    {
        "position.update",
        "position.snapshot",
        "price.update",
        "reservation.release",
        "emergency.set",
        "limits.set",
    }
)
_TRADING = frozenset(
    {
        "position.update",
        "position.snapshot",
        "price.update",
        "order.validate",
        "reservation.release",
    }
)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


#: A connection whose request took longer than this yields to the others
#: before its next frame (fairness under a flood of costly requests).
_TURN_BUDGET_S = 0.001

#: How long a closing handshake may take before the socket is aborted (a
#: client that never answers the close must not hold up a shutdown).
CLOSE_TIMEOUT_S = 2.0

#: Answers held for one write while a burst of requests is handled, at most.
ANSWER_BATCH_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class _Durable:
    """A request's answer, to be sent once journal record ``seq`` is durable."""

    seq: int
    result: Mapping[str, Any]


@dataclass(eq=False, slots=True)
class Session:
    """One WebSocket connection: who it is and what it asked for."""

    conn_id: int
    ws: ServerConnection
    outbox: Outbox
    peer: str
    principal: Principal | None = None
    cancel_on_disconnect: bool = False
    window_start: float = 0.0
    window_count: int = 0
    over_since: float | None = None
    pending: set[asyncio.Task[None]] = field(default_factory=set)

    async def send(self, frame: bytes) -> None:
        """Send a response, keeping order behind any queued pushes.

        While more requests were read already, answers wait to go out
        together in one write, up to ``ANSWER_BATCH_BYTES``; then they are
        written, and reading waits while the transport is over its high-water
        mark, so a client pipelining a large burst is slowed down, never
        taken for a slow consumer.
        """
        if not self.answer(frame):
            # Through the outbox, which counts what it writes (slow-consumer rule).
            self.outbox.push(frame, answer=True)
        await self.drained()

    def answer(self, frame: bytes) -> bool:
        """The part of ``send`` that never waits: True when ``frame`` was
        written, or queued in order behind pushes and earlier answers (or
        dropped, the connection being closed or evicted). False when nothing
        is queued here but the frame cannot be written now: the transport is
        over its high-water mark, or the connection is closing."""
        outbox = self.outbox
        if outbox.busy or len(self.ws.recv_messages.frames):
            outbox.push(frame, defer=True, answer=True)
            if outbox.queued_bytes >= ANSWER_BATCH_BYTES:
                outbox.flush_now()
            return True
        return outbox.write_now(frame)

    async def drained(self) -> None:
        """Wait while the transport is over its high-water mark (stop reading)."""
        if self.ws.paused:
            await self.ws.drain()


class Gateway:
    """One gateway: manager, store, fan-out and the listening server."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        tokens: TokenStore,
        manager: RiskEngine,
        store: Store | None,
        clock: Callable[[], int] = _now_ms,
    ) -> None:
        self.config = config
        self.tokens = tokens
        self.manager = manager
        self.store = store
        self.clock = clock
        self.epoch = clock()
        self.fanout = Fanout(manager, heartbeat_s=config.server.heartbeat_s, clock=clock)
        self.sessions: dict[int, Session] = {}
        #: Sessions that have authenticated (the others wait for session.auth).
        self.authenticated = 0
        self.per_ip: dict[str, int] = {}
        self._next_conn = 1
        self.admission = Admission(
            max_unauthenticated=config.server.max_unauthenticated, fd_budget=1 << 30
        )
        self._admin_lock = asyncio.Lock()
        if store is not None:
            store.on_failure = self._persistence_failed(store.on_failure)
            # A staged emergency or limits change is pushed once published.
            store.on_published = self._publish
        self._server: Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.port = 0
        self.host = config.server.host
        self._stopping = False

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind and serve. The state must already be recovered (``Store.open``)."""
        if self.store is not None and self.store.journal is None:
            await self.store.start()
        self._publish()
        server_cfg = self.config.server
        fd_limit = raise_fd_limit()
        self.admission.fd_budget = max(1, fd_limit - open_fds() - FD_RESERVE)
        log.info(
            "open-file limit %d: at most %d sockets at once", fd_limit, self.admission.fd_budget
        )
        self._server = await serve(
            self._handle,
            server_cfg.host,
            server_cfg.port,
            process_request=self._process_request,
            create_connection=self.admission.connection_class(),
            close_timeout=CLOSE_TIMEOUT_S,
            compression=None,
            max_size=server_cfg.max_message_bytes,
            ping_interval=20,
            ping_timeout=20,
            server_header=SERVER_NAME,
            logger=_WS_LOG,
        )
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]
        self.fanout.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="reservation-sweeper")

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}{WS_PATH}"

    async def stop(self) -> None:
        """Graceful stop: no new connections, close all with 1001, flush, snapshot."""
        if self._stopping:
            return
        self._stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server is not None:
            # Stop accepting; close every WebSocket with 1001, each bounded to
            # CLOSE_TIMEOUT_S (websockets' own close waits without a bound for
            # a client that does not read); drop sockets still in a handshake.
            self._server.close(close_connections=False)
            await asyncio.gather(
                *(
                    _close(session.ws, CloseCode.GOING_AWAY, "")
                    for session in list(self.sessions.values())
                ),
                return_exceptions=True,
            )
            self.admission.abort_handshakes()
            await self._server.wait_closed()
        for session in list(self.sessions.values()):
            for task in list(session.pending):
                with contextlib.suppress(BaseException):
                    await task
        await self.fanout.stop()
        if self.store is not None:
            self._commit()
            await self.store.close(snapshot=True)

    async def _sweep(self) -> None:
        """Expire reservations on time even when no request arrives."""
        while True:
            await asyncio.sleep(0.05)
            self.manager.expire_reservations(self.clock())
            self._commit()
            self._publish()

    # --------------------------------------------------------- the handshake

    async def _process_request(
        self, connection: ServerConnection, request: HttpRequest
    ) -> HttpResponse | None:
        self.admission.request_read(connection)
        path = request.path.split("?", 1)[0]
        if path != WS_PATH:
            return await self._http(connection, request, path)
        origin = request.headers.get("Origin")
        if origin is not None and origin not in self._allowed_origins():
            metrics.AUTH_FAILURES.labels(reason="origin").inc()
            log.warning(
                "refused handshake from %s: origin %r not allowed",
                _peer_host(connection),
                origin[:100],
            )
            return connection.respond(http.HTTPStatus.FORBIDDEN, "origin not allowed\n")
        peer = _peer_host(connection)
        server_cfg = self.config.server
        # A program with a token counts against authenticated connections
        # only; sockets waiting for session.auth never take its place.
        authorization = request.headers.get("Authorization")
        in_use = self.authenticated if authorization is not None else len(self.sessions)
        if in_use >= server_cfg.max_connections:
            metrics.CONNECTIONS_REFUSED.labels(reason="max_connections").inc()
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n")
        if self.per_ip.get(peer, 0) >= server_cfg.max_connections_per_ip:
            metrics.CONNECTIONS_REFUSED.labels(reason="per_ip").inc()
            return connection.respond(
                http.HTTPStatus.SERVICE_UNAVAILABLE, "too many connections from this address\n"
            )
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            principal = (
                self.tokens.authenticate(token.strip()) if scheme.lower() == "bearer" else None
            )
            if principal is None:
                metrics.AUTH_FAILURES.labels(reason="bad_token").inc()
                log.warning("refused handshake from %s: wrong token", peer)
                response = connection.respond(http.HTTPStatus.UNAUTHORIZED, "invalid token\n")
                response.headers["WWW-Authenticate"] = 'Bearer realm="risk-gateway"'
                return response
            assert isinstance(connection, GatewayConnection)
            connection.principal = principal
        elif not self.admission.wait_for_auth(connection):
            return connection.respond(
                http.HTTPStatus.SERVICE_UNAVAILABLE, "too many unauthenticated connections\n"
            )
        return None

    def _allowed_origins(self) -> set[str]:
        own = {f"http://{self.host}:{self.port}"}
        if self.host in ("127.0.0.1", "localhost"):
            own |= {f"http://127.0.0.1:{self.port}", f"http://localhost:{self.port}"}
        return own | set(self.config.server.allowed_origins)

    async def _http(
        self, connection: ServerConnection, request: HttpRequest, path: str
    ) -> HttpResponse:
        if path == "/healthz":
            failed = self.store.failed if self.store is not None else None
            if failed is not None:
                body = {
                    "status": "failing",
                    "mode": self.manager.gateway_mode.mode.value,
                    "reason": f"persistence failure: {failed}",
                }
                return _json_response(http.HTTPStatus.SERVICE_UNAVAILABLE, body)
            body = {"status": "ok", "mode": self.manager.gateway_mode.mode.value}
            return _json_response(http.HTTPStatus.OK, body)
        if path == "/metrics":
            self._refresh_gauges()
            payload, content_type = metrics.render()
            return HttpResponse(
                200,
                "OK",
                Headers([("Content-Type", content_type), ("Content-Length", str(len(payload)))]),
                payload,
            )
        asset = _DASHBOARD_ASSETS.get(path)
        if asset is not None:
            name, content_type = asset
            try:
                # Off the event loop: validations must not wait on the disk.
                async with aiofiles.open(DASHBOARD_FILE.parent / name, "rb") as handle:
                    page = await handle.read()
            except OSError:
                return connection.respond(http.HTTPStatus.NOT_FOUND, "dashboard not installed\n")
            return HttpResponse(
                200,
                "OK",
                Headers(
                    [
                        ("Content-Type", content_type),
                        ("Content-Length", str(len(page))),
                        ("Cache-Control", "no-store"),
                        ("X-Content-Type-Options", "nosniff"),
                    ]
                ),
                page,
            )
        return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")

    def _refresh_gauges(self) -> None:
        manager = self.manager
        metrics.EMERGENCY_MODE.set(
            {Mode.NORMAL: 0, Mode.REDUCING: 1, Mode.HALTED: 2}[manager.gateway_mode.mode]
        )
        metrics.GROSS_EXPOSURE.set(float(manager.gross_exposure))
        by_role = {role.value: 0 for role in Role}
        for session in self.sessions.values():
            if session.principal is not None:
                by_role[session.principal.role.value] += 1
        for role, count in by_role.items():
            metrics.CONNECTIONS.labels(role=role).set(count)
        stats = self.fanout.stats()
        metrics.QUEUED_BYTES.set(stats.get("queued_bytes", 0))
        for channel, count in stats.get("subscribers", {}).items():
            metrics.SUBSCRIBERS.labels(channel=channel).set(count)
        if self.store is not None:
            metrics.update_journal(self.store.stats())

    # ---------------------------------------------------------- connections

    async def _handle(self, ws: ServerConnection) -> None:
        conn_id = self._next_conn
        self._next_conn += 1
        peer = _peer_host(ws)
        outbox = Outbox(
            ws,
            max_queued_bytes=self.config.server.max_queued_bytes,
            slow_consumer_ms=self.config.server.slow_consumer_ms,
            on_evict=lambda _box: metrics.EVICTIONS.inc(),
            flusher=self.fanout.flusher,
        )
        session = Session(conn_id=conn_id, ws=ws, outbox=outbox, peer=peer)
        self.sessions[conn_id] = session
        self.per_ip[peer] = self.per_ip.get(peer, 0) + 1
        assert isinstance(ws, GatewayConnection)
        principal = ws.principal
        auth_timer: asyncio.TimerHandle | None = None
        if principal is not None:
            self._authenticated(session, principal)
        else:
            auth_timer = asyncio.get_running_loop().call_later(
                self.config.server.auth_timeout_s, self._auth_timeout, session
            )
        try:
            await self._read_loop(session)
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("connection %d failed", conn_id)
            with contextlib.suppress(Exception):
                await ws.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            if auth_timer is not None:
                auth_timer.cancel()
            self._closed(session)

    def _authenticated(self, session: Session, principal: Principal) -> None:
        session.principal = principal
        self.authenticated += 1
        self.admission.authenticated(session.ws)
        self.fanout.add(session)  # type: ignore[arg-type]

    def _auth_timeout(self, session: Session) -> None:
        if session.principal is None:
            metrics.AUTH_FAILURES.labels(reason="timeout").inc()
            log.warning(
                "connection %d from %s: no authentication within auth_timeout_s (%s s), closing",
                session.conn_id,
                session.peer,
                self.config.server.auth_timeout_s,
            )
            task = asyncio.create_task(
                _close(session.ws, CloseCode.AUTH_FAILED, "authentication timeout")
            )
            session.pending.add(task)
            task.add_done_callback(session.pending.discard)

    def _closed(self, session: Session) -> None:
        self.sessions.pop(session.conn_id, None)
        count = self.per_ip.get(session.peer, 1) - 1
        if count:
            self.per_ip[session.peer] = count
        else:
            self.per_ip.pop(session.peer, None)
        session.outbox.close()
        if session.principal is not None:
            self.authenticated -= 1
            self.fanout.remove(session)  # type: ignore[arg-type]
        if session.cancel_on_disconnect and session.principal is not None:
            released = self.manager.release_connection(session.conn_id, self.clock())
            from protocol.codes import AlertCode, AlertLevel

            self.manager.raise_alert(
                AlertLevel.WARNING,
                AlertCode.CLIENT_DISCONNECTED,
                f"connection {session.conn_id} of {session.principal.name} closed; "
                f"released {released} reservation(s)",
                now_ms=self.clock(),
                for_traders=False,
            )
            self._commit()
            self._publish()

    async def _read_loop(self, session: Session) -> None:
        ws = session.ws
        limit = self.config.server.max_messages_per_second
        while True:
            frame = await ws.recv(decode=False)
            now = time.monotonic()
            if now - session.window_start >= 1.0:
                if session.window_count > limit:
                    if session.over_since is None:
                        session.over_since = session.window_start
                else:
                    session.over_since = None
                session.window_start = now
                session.window_count = 0
            session.window_count += 1
            if session.window_count > limit:
                if session.over_since is not None and now - session.over_since >= 2.0:
                    log.warning(
                        "connection %d (%s) closed 4008: over %d messages per second for 2 s",
                        session.conn_id,
                        session.principal.name if session.principal else session.peer,
                        limit,
                    )
                    session.outbox.flush_now()  # the answers before the close
                    await _close(ws, CloseCode.TOO_MANY_MESSAGES, "too many messages")
                    return
                metrics.count_request("?", ErrorCode.RATE_LIMITED.value)
                await session.send(
                    codec.encode_error(
                        codec.peek_id(frame),
                        ErrorCode.RATE_LIMITED,
                        f"more than {limit} messages per second on this connection",
                    )
                )
                continue
            await self._on_frame(session, frame)
            if time.monotonic() - now > _TURN_BUDGET_S:
                # A costly request (a large position.snapshot or state.get):
                # let other connections' requests in before this one's next
                # frame, which would otherwise be read without a wait.
                await asyncio.sleep(0)

    async def _on_frame(self, session: Session, frame: bytes) -> None:
        if session.principal is None:
            method = codec.peek_method(frame)
            if method is not None and method != "session.auth":
                # Before authentication no method is known to the caller.
                metrics.count_request("?", ErrorCode.UNAUTHENTICATED.value)
                await session.send(
                    codec.encode_error(
                        codec.peek_id(frame),
                        ErrorCode.UNAUTHENTICATED,
                        "authenticate first with session.auth",
                    )
                )
                return
        try:
            request = codec.decode(frame)
        except ProtocolError as exc:
            metrics.count_request("?", exc.code.value)
            log.debug("connection %d: frame refused, %s", session.conn_id, exc.code.value)
            await session.send(codec.encode_error(exc.request_id, exc.code, exc.message))
            return
        method = request.method
        try:
            # Before authentication only session.auth gets here (see above).
            outcome = self._dispatch(session, request)
            if isinstance(outcome, bytes):
                metrics.count_request(method, "ok")
                if outcome:
                    await session.send(outcome)
                else:  # the answer was already written or queued in order
                    await session.drained()
            elif isinstance(outcome, _Durable):
                # Answered by the journal's callback once durable; keep reading,
                # unless the answers already out wait for the client to read.
                self._when_durable(session, request, outcome)
                await session.drained()
            else:
                # Answered from a task once durable; keep reading meanwhile.
                task = asyncio.create_task(self._answer_later(session, request, outcome))
                session.pending.add(task)
                task.add_done_callback(session.pending.discard)
        except ProtocolError as exc:
            metrics.count_request(method, exc.code.value)
            log.debug("connection %d: %s refused, %s", session.conn_id, method, exc.code.value)
            await session.send(codec.encode_error(request.id, exc.code, exc.message))
            if exc.code is ErrorCode.UNAUTHENTICATED and method == "session.auth":
                session.outbox.flush_now()  # the UNAUTHENTICATED answer first
                await _close(session.ws, CloseCode.AUTH_FAILED, "authentication failed")
        except Exception:
            log.exception("internal error in %s", method)
            metrics.count_request(method, ErrorCode.INTERNAL.value)
            await session.send(
                codec.encode_error(request.id, ErrorCode.INTERNAL, "internal error (logged)")
            )

    def _when_durable(self, session: Session, request: Request, outcome: _Durable) -> None:
        request_id = request.id
        method = request.method
        result = outcome.result

        def answer(error: PersistenceError | None) -> None:
            if error is None:
                metrics.count_request(method, "ok")
                frame = codec.encode_ok(request_id, result)
            else:
                metrics.count_request(method, ErrorCode.UNAVAILABLE.value)
                frame = codec.encode_error(request_id, ErrorCode.UNAVAILABLE, _unavailable(error))
            # Queued behind any pushes, and written with the other answers the
            # same fsync released; a closed connection drops it.
            session.outbox.push(frame, defer=True, answer=True)

        assert self.store is not None and self.store.journal is not None
        self.store.journal.when_durable(outcome.seq, answer)

    async def _answer_later(
        self, session: Session, request: Request, outcome: Awaitable[Mapping[str, Any]]
    ) -> None:
        try:
            result = await outcome
            frame = codec.encode_ok(request.id, result)
            metrics.count_request(request.method, "ok")
        except ProtocolError as exc:
            metrics.count_request(request.method, exc.code.value)
            frame = codec.encode_error(request.id, exc.code, exc.message)
        except PersistenceError as exc:
            metrics.count_request(request.method, ErrorCode.UNAVAILABLE.value)
            frame = codec.encode_error(request.id, ErrorCode.UNAVAILABLE, _unavailable(exc))
        except Exception:
            log.exception("internal error in %s", request.method)
            frame = codec.encode_error(request.id, ErrorCode.INTERNAL, "internal error (logged)")
        with contextlib.suppress(ConnectionClosed):
            await session.send(frame)

    # -------------------------------------------------------------- methods

    def _dispatch(
        self, session: Session, request: Request
    ) -> bytes | _Durable | Awaitable[Mapping[str, Any]]:
        """Run one request. Returns the response bytes; ``_Durable`` when the
        answer must wait for its journal records (answered by a journal
        callback); or an awaitable result for the admin changes, which wait
        for their fsync and the fan-out in a task."""
        params = request.params
        method = request.method
        principal = session.principal
        if method == "order.validate":
            assert isinstance(params, OrderValidate) and principal is not None
            self._require_trading(principal, params.account)
            if params.reserve:
                self._require_writable()
            started = time.perf_counter()
            decision = self.manager.validate(
                params,
                self.clock(),
                connection=session.conn_id,
                cancel_on_disconnect=session.cancel_on_disconnect,
            )
            took = time.perf_counter() - started
            if not params.reserve:
                # Nothing to wait for: the answer goes out first, and the audit
                # record, the metrics and the decision push follow, off the
                # client's round trip. Records and pushes keep their order: the
                # next request's are queued after these.
                frame = codec.encode_ok(request.id, decision.to_wire())
                if not session.answer(frame):
                    # Queued ahead of the push, flushed with the answers (a
                    # writer waits for the drain), and the read loop waits too.
                    session.outbox.push(frame, answer=True)
                try:
                    self._validated(session, params, decision, took)
                except Exception:  # answered already: log it, never answer twice
                    log.exception("bookkeeping after order.validate")
                return b""
            seq = self._validated(session, params, decision, took)
            if decision.reservation_id is not None:
                # A repeat of a client_order_id writes no record, but answers
                # with a reservation whose own record may not be durable yet:
                # wait for everything appended so far.
                seq = seq or self._last_seq()
                if seq:
                    return _Durable(seq, decision.to_wire())
            return codec.encode_ok(request.id, decision.to_wire())
        if method == "session.auth":
            assert isinstance(params, SessionAuth)
            if principal is not None:
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST, "this connection is already authenticated"
                )
            found = self.tokens.authenticate(params.token)
            if found is None:
                metrics.AUTH_FAILURES.labels(reason="bad_token").inc()
                log.warning("session.auth from %s: wrong token", session.peer)
                raise ProtocolError(ErrorCode.UNAUTHENTICATED, "invalid token")
            # Answer first, then the emergency snapshot push.
            frame = codec.encode_ok(request.id, found.to_wire())
            session.outbox.push(frame)
            self._authenticated(session, found)
            return b""
        assert principal is not None
        if method == "ping":
            return codec.encode_ok(request.id, {"ts": format_time_ms(self.clock())})
        if method == "session.hello":
            assert isinstance(params, SessionHello)
            session.cancel_on_disconnect = params.cancel_on_disconnect
            # Also for the reservations this connection made before the hello.
            if self.manager.set_cancel_on_disconnect(
                session.conn_id, params.cancel_on_disconnect, self.clock()
            ):
                seq = self._commit()
                if seq:
                    return _Durable(seq, self._hello(principal))
            return codec.encode_ok(request.id, self._hello(principal))

        if method in _TRADING:
            return self._trading(session, request, principal)
        if method == "emergency.get":
            return codec.encode_ok(request.id, self.manager.emergency_view(principal.readable))
        if method == "emergency.set":
            assert isinstance(params, EmergencySet)
            self._require_admin(principal, method)
            self._require_writable()
            return self._set_emergency(params, principal.name)
        if method == "state.get":
            assert isinstance(params, StateGet)
            return codec.encode_ok(request.id, self._state(principal, params))
        if method == "limits.get":
            return codec.encode_ok(request.id, self.manager.limits_view())
        if method == "limits.set":
            assert isinstance(params, LimitsSet)
            self._require_admin(principal, method)
            self._require_writable()
            return self._set_limits(params, principal.name)
        if method == "subscribe":
            assert isinstance(params, Subscribe)
            result = self.fanout.subscribe(session, params)  # type: ignore[arg-type]
            session.outbox.push(codec.encode_ok(request.id, result))
            self.fanout.deliver_subscription(session)  # type: ignore[arg-type]
            return b""
        if method == "unsubscribe":
            assert isinstance(params, Unsubscribe)
            return codec.encode_ok(
                request.id,
                self.fanout.unsubscribe(session, params),  # type: ignore[arg-type]
            )
        raise ProtocolError(ErrorCode.UNKNOWN_METHOD, f"unknown method {method}")

    def _hello(self, principal: Principal) -> dict[str, Any]:
        """The ``session.hello`` result."""
        return {
            "protocol": PROTOCOL_VERSION,
            "server": SERVER_NAME,
            "epoch": self.epoch,
            **principal.to_wire(),
            "heartbeat_s": self.config.server.heartbeat_s,
            "emergency": self.manager.emergency_view(principal.readable),
        }

    def _validated(
        self, session: Session, params: OrderValidate, decision: Decision, took: float
    ) -> int:
        """After a validation: metrics, the journal record(s), the decision push.

        Returns the seq of the last record appended (0: none)."""
        metrics.VALIDATION_LATENCY.observe(took)
        metrics.count_validation(decision.decision, decision.reasons)
        if decision.reasons and log.isEnabledFor(logging.DEBUG):
            log.debug(
                "connection %d: order.validate %s %s %s rejected: %s",
                session.conn_id,
                params.account,
                params.symbol,
                params.side,
                ", ".join(reason["code"] for reason in decision.reasons),
            )
        seq = self._commit()
        self._publish()
        return seq

    def _trading(
        self, session: Session, request: Request, principal: Principal
    ) -> bytes | _Durable | Awaitable[Mapping[str, Any]]:
        params = request.params
        self._require_writable()
        manager = self.manager
        now = self.clock()
        result: Mapping[str, Any]
        if isinstance(params, PositionUpdate):
            self._require_trading(principal, params.account)
            result = manager.update_position(params, now)
        elif isinstance(params, PositionSnapshot):
            self._require_trading(principal, params.account)
            result = manager.snapshot_positions(params, now)
        elif isinstance(params, PriceUpdate):
            if not principal.publishes_prices:
                raise _forbidden(principal, request.method)
            result = manager.update_price(params, now)
        elif isinstance(params, ReservationRelease):
            if not (principal.role is Role.TRADER or principal.role is Role.ADMIN):
                raise _forbidden(principal, request.method)
            res = manager.reservations.get(params.reservation_id)
            if res is not None and not principal.may_trade_account(res.account):
                # Answered as an unknown id: the caller learns nothing about
                # another account's reservations.
                result = {"released": False}
            else:
                released = manager.release_reservation(params.reservation_id, "released", now)
                result = {"released": released is not None}
        else:  # pragma: no cover - _TRADING lists exactly the cases above
            raise ProtocolError(ErrorCode.UNKNOWN_METHOD, request.method)
        seq = self._commit()
        self._publish()
        if not seq:
            return codec.encode_ok(request.id, result)
        return _Durable(seq, result)

    async def _set_emergency(self, params: EmergencySet, actor: str) -> Mapping[str, Any]:
        """Durable before the response and the push, in every fsync mode.

        The response follows the push (see ``Flusher.barrier``).
        Towards safety (e.g. normal -> halted) the change is enforced at once,
        so validations stop before the fsync; away from safety it applies only
        once durable, so a crash can never leave the gateway more open than
        what was acknowledged. Either way the EMERGENCY document, its version
        and the push change only once the record is durable (``stage``).
        """
        manager = self.manager
        async with self._admin_lock:
            record = manager.prepare_emergency(params, actor, self.clock())
            if record is None:
                return manager.emergency_view()
            log.warning(
                "emergency change by %s: %s %s -> %s (%s), version %d",
                actor,
                "gateway" if params.account is None else f"account {params.account}",
                manager.mode_of(params.account).value,
                params.mode.value,
                params.reason,
                record["v"],
            )
            await self._stage_durably(record)
            view = manager.emergency_view()
            # Answer once every subscriber that keeps up has been handed the
            # push (written in slices between other requests): the admin's
            # answer means "everyone connected was told", and a script
            # changing modes in a loop is paced by the fan-out it causes.
            await self.fanout.flusher.barrier()
            return view

    async def _set_limits(self, params: LimitsSet, actor: str) -> Mapping[str, Any]:
        manager = self.manager
        async with self._admin_lock:
            record = manager.prepare_limits(params.version, params.limits, actor, self.clock())
            if record is None:
                return manager.limits_view()
            current = manager.limits.to_wire()
            log.warning(
                "limits change by %s to version %d: %s",
                actor,
                record["v"],
                ", ".join(
                    f"{key} {_show_limit(current.get(key))} -> {_show_limit(value)}"
                    for key, value in record["limits"].items()
                    if current.get(key) != value
                ),
            )
            await self._stage_durably(record)
            return manager.limits_view()

    async def reload_limits(self, limits: Limits, actor: str = "config") -> bool:
        """Apply the config file's [limits] (SIGHUP, or a start with an edited file):
        only the keys the file changed since it was last applied (see
        ``EmergencyManager.prepare_file_limits``), each logged with its old and
        new value. True when a value changed.

        Raises ``PersistenceError`` when the change cannot be made durable.
        """
        manager = self.manager
        async with self._admin_lock:
            record, changed = manager.prepare_file_limits(limits, actor, self.clock())
            if record is None:
                return False
            if changed:
                log.warning(
                    "limits change by %s to version %d: %s",
                    actor,
                    record["v"],
                    ", ".join(
                        f"{key} {_show_limit(old)} -> {_show_limit(new)}"
                        for key, old, new in changed
                    ),
                )
            else:
                log.info("limits from the config file: no value changes (version %d)", record["v"])
            await self._stage_durably(record)
            return bool(changed)

    def _state(self, principal: Principal, params: StateGet) -> Mapping[str, Any]:
        manager = self.manager
        manager.expire_reservations(self.clock())
        self._commit()
        self._publish()
        if params.account is not None:
            if not principal.may_read_account(params.account):
                raise ProtocolError(
                    ErrorCode.FORBIDDEN,
                    f"{principal.name} may not read account {params.account}",
                )
            return manager.state_view([params.account], principal.readable)
        if not principal.reads_every_account:
            return manager.state_view(principal.accounts, principal.readable)
        return manager.state_view()

    # -------------------------------------------------------------- helpers

    def _require_trading(self, principal: Principal, account: str) -> None:
        if not principal.may_trade_account(account):
            raise ProtocolError(
                ErrorCode.FORBIDDEN,
                f"{principal.name} ({principal.role.value}) may not trade account {account}",
            )

    def _require_admin(self, principal: Principal, method: str) -> None:
        if principal.role is not Role.ADMIN:
            raise _forbidden(principal, method)

    def _require_writable(self) -> None:
        failed = self.store.failed if self.store is not None else None
        if failed is not None:
            raise ProtocolError(ErrorCode.UNAVAILABLE, _unavailable(failed))

    def _commit(self) -> int:
        if self.store is None:
            self.manager.drain_records()
            return 0
        if self.store.failed is not None:
            self.manager.drain_records()
            return 0
        return self.store.commit()

    def _last_seq(self) -> int:
        """Seq of the last journal record appended (0 without a journal)."""
        if self.store is None or self.store.journal is None or self.store.failed is not None:
            return 0
        return self.store.journal.last_seq

    async def _stage_durably(self, record: StagedRecord) -> None:
        """Stage an emergency or limits record and return once it is published
        (fsynced first, in every fsync mode); its events are pushed by then.

        Raises ``PersistenceError`` when it cannot be made durable; then
        nothing is staged.
        """
        failed = self.store.failed if self.store is not None else None
        if failed is not None:
            raise PersistenceError(str(failed))
        self.manager.stage(record)
        seq = self._commit()
        if self.store is not None:
            await self.store.synced(seq)
        self._publish()

    def _persistence_failed(
        self, then: Callable[[PersistenceError], None] | None
    ) -> Callable[[PersistenceError], None]:
        def failed(error: PersistenceError) -> None:
            # The halt and its alert go out at once, not with the next
            # request's events (that request's answer would come first).
            self._publish()
            if then is not None:
                then(error)

        return failed

    def _publish(self) -> None:
        """Hand the manager's events to the fan-out.

        An emergency change is among them only once its record is durable
        (the manager publishes staged changes then, see ``Store.commit``), so
        nothing is pushed about a change a crash could still undo.
        """
        events = self.manager.drain_events()
        if events:
            for event in events:
                if type(event) is ModeChanged and event.actor == GATEWAY_ACTOR:
                    view = event.view
                    log.warning(
                        "emergency change by %s: gateway %s (%s), version %d",
                        event.actor,
                        view["mode"],
                        view["reason"],
                        view["version"],
                    )
            self.fanout.publish(events)


def _show_limit(value: Any) -> str:
    """A limit's value for the log: decimals and numbers as they are, the rest as JSON."""
    if isinstance(value, str | int):
        return str(value)
    return orjson.dumps(value).decode()


def _forbidden(principal: Principal, method: str) -> ProtocolError:
    return ProtocolError(
        ErrorCode.FORBIDDEN, f"{principal.name} ({principal.role.value}) may not call {method}"
    )


def _unavailable(error: BaseException) -> str:
    return f"state cannot be made durable ({error}); the gateway has halted itself"


def _peer_host(connection: ServerConnection) -> str:
    try:
        peer = connection.remote_address
    except Exception:  # transport already gone
        return "?"
    return str(peer[0]) if peer else "?"


def _json_response(status: http.HTTPStatus, body: dict[str, Any]) -> HttpResponse:
    payload = orjson.dumps(body) + b"\n"
    return HttpResponse(
        status.value,
        status.phrase,
        Headers([("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]),
        payload,
    )


async def _close(ws: ServerConnection, code: int, reason: str) -> None:
    try:
        async with asyncio.timeout(2):
            await ws.close(code, reason)
    except (TimeoutError, ConnectionClosed, OSError):
        transport = ws.transport
        if transport is not None:
            transport.abort()


async def start_gateway(
    config: GatewayConfig, tokens: TokenStore, rules: tuple[Rule, ...] = ()
) -> Gateway:
    """Recover the state directory and serve: the start-up path of ``serve``.

    A fresh directory takes the config file's limits as version 1; a
    directory whose file limits were since edited gets them as a new version.
    Raises ``StateDirLocked`` when another gateway holds the directory.
    """
    manager = RiskEngine(
        limits=config.limits,
        now_ms=_now_ms(),
        rules=rules,
        max_symbols_per_account=config.server.max_symbols_per_account,
        max_reservations_per_account=config.server.max_reservations_per_account,
    )
    persistence = config.persistence
    store = Store(
        manager,
        persistence.state_dir,
        fsync=persistence.fsync,
        fsync_interval_ms=persistence.fsync_interval_ms,
        snapshot_every=persistence.snapshot_every,
        on_batch=metrics.observe_batch,
        clock=_now_ms,
    )
    recovered = store.open()
    if recovered.fresh:
        manager.adopt_file_limits(config.limits, _now_ms())
    gateway = Gateway(config, tokens=tokens, manager=manager, store=store)
    await gateway.start()
    # The operator may have edited the file since its limits were last applied:
    # the keys it changed apply, the others keep their current values.
    if not recovered.fresh and await gateway.reload_limits(config.limits, actor="config"):
        log.warning(
            "limits edited in %s applied as version %d", config.source, manager.limits_version
        )
    return gateway
