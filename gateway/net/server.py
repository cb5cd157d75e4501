"""The WebSocket and HTTP shell: ``ws://HOST:PORT/v1/ws``, ``/healthz``, ``/metrics``, ``/``.

The shell turns bytes into a typed request and an authenticated principal,
hands them to the ``RiskService``, and turns its outcome back into bytes. It
makes no decision: who may call what, and what an answer waits for, are the
service's.

Lifetime: ``open_gateway`` recovers the state directory (nothing is served
before that); ``async with gateway:`` serves, inside one TaskGroup that owns
every task of the gateway (the journal's writer, the fan-out's timers, the
reservation sweeper); each connection has a TaskGroup of its own for its
answers and its output. ``running_gateway`` does both.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import ipaddress
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request as HttpRequest
from websockets.http11 import Response as HttpResponse

from gateway import metrics
from gateway.auth import Principal, TokenStore
from gateway.cluster.member import ClusterMember, ClusterStartError
from gateway.cluster.shared import SharedStateError
from gateway.config import ClusterConfig, GatewayConfig, IPNetwork
from gateway.core.engine import RiskEngine
from gateway.core.reservations import random_reservation_id
from gateway.core.rules import Rule
from gateway.fanout import Fanout, Outbox
from gateway.net import http as routes
from gateway.net import wsio
from gateway.net.admission import (
    FD_RESERVE,
    Admission,
    GatewayConnection,
    open_fds,
    raise_fd_limit,
)
from gateway.net.ratelimit import FrameRateLimiter, Verdict
from gateway.net.session import RequestId, Session
from gateway.persistence import RecordStore, Store
from gateway.service import (
    SERVER_NAME,
    Outcome,
    Reply,
    ReplyLater,
    ReplyWhenDurable,
    RiskService,
)
from protocol import codec
from protocol.codes import CloseCode, ErrorCode
from protocol.errors import ProtocolError

log = logging.getLogger("gateway.server")


class _NoDebugLogger(logging.LoggerAdapter[logging.Logger]):
    """websockets' logger without DEBUG: at that level websockets writes every
    handshake header (``Authorization: Bearer ...`` included) and every frame."""

    def isEnabledFor(self, level: int) -> bool:
        return level > logging.DEBUG and self.logger.isEnabledFor(level)


_WS_LOG = _NoDebugLogger(logging.getLogger("websockets.server"), {})

WS_PATH = "/v1/ws"

#: A connection whose request took longer than this yields to the others
#: before its next frame (fairness under a flood of costly requests).
_TURN_BUDGET_S = 0.001

#: How long a closing handshake may take before the socket is aborted (a
#: client that never answers the close must not hold up a shutdown).
CLOSE_TIMEOUT_S = 2.0

#: How often reservations are expired when no request comes.
_SWEEP_S = 0.05


class CannotListen(OSError):
    """The gateway could not bind its address (in use, not permitted, ...);
    the message names the address and why."""


def wall_clock_ms() -> int:
    """The gateway's one clock: Unix time in milliseconds."""
    return time.time_ns() // 1_000_000


class Gateway:
    """One gateway: the service, its store and fan-out, and the listening server.

    Use as ``async with gateway:`` (or ``running_gateway``); ``stop()`` may be
    called from anywhere to shut it down gracefully, and ``wait_stopped()``
    returns once it has.
    """

    def __init__(
        self,
        config: GatewayConfig,
        *,
        tokens: TokenStore,
        engine: RiskEngine,
        store: RecordStore,
        clock: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self.config = config
        self.engine = engine
        self.store = store
        self.clock = clock
        self.fanout = Fanout(engine, heartbeat_s=config.server.heartbeat_s, clock=clock)
        self.service = RiskService(
            config, tokens=tokens, engine=engine, store=store, fanout=self.fanout, clock=clock
        )
        self.sessions: dict[int, Session] = {}
        #: Sessions that have authenticated (the others wait for session.auth).
        self.authenticated = 0
        self.per_ip: dict[str, int] = {}
        self._next_conn = 1
        self.admission = Admission(
            max_unauthenticated=config.server.max_unauthenticated, fd_budget=1 << 30
        )
        self._server: Server | None = None
        #: This gateway as a member of a cluster (``[cluster]``), once joined.
        self.member: ClusterMember | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._exits = AsyncExitStack()
        self._stopping = False
        self._stopped = asyncio.Event()
        self.port = 0
        self.host = config.server.host

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Gateway:
        """Start the store's writer, bind and serve. The state was recovered by
        ``Store.open`` (see ``open_gateway``); a failure here closes the store."""
        try:
            tasks = await self._exits.enter_async_context(asyncio.TaskGroup())
            await self._start(tasks)
        except BaseException:
            # The store first: closing it ends the journal's writer task,
            # which the TaskGroup would otherwise wait for without end.
            try:
                await self.store.close(snapshot=False)
            finally:
                await self._exits.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.stop()
        finally:
            await self._exits.__aexit__(exc_type, exc, tb)

    async def _start(self, tasks: asyncio.TaskGroup) -> None:
        await self.store.start(tasks)
        self.service.publish()
        if self.config.cluster is not None:
            # Joined before listening: no order is checked outside the cluster.
            self.member = await join_cluster(self.config.cluster, self.service, tasks)
        server_cfg = self.config.server
        fd_limit = raise_fd_limit()
        self.admission.fd_budget = max(1, fd_limit - open_fds() - FD_RESERVE)
        log.info(
            "open-file limit %d: at most %d sockets at once", fd_limit, self.admission.fd_budget
        )
        try:
            self._server = await self._listen()
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise CannotListen(
                f"cannot listen on {server_cfg.host}:{server_cfg.port}: {why}"
            ) from exc
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]
        self.fanout.start(tasks)
        self._sweeper = tasks.create_task(self._sweep(), name="reservation-sweeper")

    async def _listen(self) -> Server:
        server_cfg = self.config.server
        return await serve(
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

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}{WS_PATH}"

    async def stop(self) -> None:
        """Graceful stop: no new connections, close all with 1001, flush, snapshot.

        Raises ``PersistenceError`` when the final snapshot cannot be written
        (changes after a journal failure were never acknowledged)."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        try:
            if self._sweeper is not None:
                self._sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._sweeper
            if self._server is not None:
                # Stop accepting; close every WebSocket with 1001, each bounded
                # to CLOSE_TIMEOUT_S (websockets' own close waits without a
                # bound for a client that does not read); drop sockets still in
                # a handshake. wait_closed returns once every handler (and so
                # every connection's TaskGroup) has finished.
                self._server.close(close_connections=False)
                await asyncio.gather(
                    *(
                        close(session.ws, CloseCode.GOING_AWAY, "")
                        for session in list(self.sessions.values())
                    ),
                    return_exceptions=True,
                )
                self.admission.abort_handshakes()
                await self._server.wait_closed()
            await self.fanout.stop()
            self.service.commit()
            if self.member is not None:
                await self.member.close()
        finally:
            try:
                # Always: closing the store ends the journal's writer task,
                # which the gateway's TaskGroup waits for.
                await self.store.close(snapshot=True)
            finally:
                self._stopped.set()

    async def wait_stopped(self) -> None:
        """Return once ``stop()`` has finished."""
        await self._stopped.wait()

    async def _sweep(self) -> None:
        """Expire reservations on time even when no request arrives."""
        while True:
            await asyncio.sleep(_SWEEP_S)
            try:
                self.service.expire(self.clock())
            except Exception:  # a bug here must not take the gateway down
                log.exception("expiring reservations")

    # --------------------------------------------------------- the handshake

    async def _process_request(
        self, connection: ServerConnection, request: HttpRequest
    ) -> HttpResponse | None:
        self.admission.request_read(connection)
        path = request.path.split("?", 1)[0]
        if path != WS_PATH:
            return await routes.respond(self, connection, path)
        origin = request.headers.get("Origin")
        peer = client_host(connection, self.config.server.trusted_proxies, request.headers)
        if origin is not None and origin not in self._allowed_origins():
            metrics.AUTH_FAILURES.labels(reason="origin").inc()
            log.warning("refused handshake from %s: origin %r not allowed", peer, origin[:100])
            return connection.respond(http.HTTPStatus.FORBIDDEN, "origin not allowed\n")
        server_cfg = self.config.server
        # A program with a token counts against authenticated connections
        # only; sockets waiting for session.auth never take its place.
        authorization = request.headers.get("Authorization")
        in_use = self.authenticated if authorization is not None else len(self.sessions)
        if in_use >= (cap := server_cfg.max_connections):
            why = f"over max_connections ({cap})"
            return _refuse(connection, peer, "max_connections", why, "too many connections\n")
        if self.per_ip.get(peer, 0) >= (cap := server_cfg.max_connections_per_ip):
            why, text = (
                f"over max_connections_per_ip ({cap})",
                "too many connections from this address\n",
            )
            return _refuse(connection, peer, "per_ip", why, text)
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            tokens = self.service.tokens
            principal = tokens.authenticate(token.strip()) if scheme.lower() == "bearer" else None
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

    # ---------------------------------------------------------- connections

    async def _handle(self, ws: ServerConnection) -> None:
        assert isinstance(ws, GatewayConnection)
        conn_id = self._next_conn
        self._next_conn += 1
        peer = client_host(ws, self.config.server.trusted_proxies)
        server_cfg = self.config.server
        async with asyncio.TaskGroup() as tasks:
            outbox = Outbox(
                ws,
                max_queued_bytes=server_cfg.max_queued_bytes,
                slow_consumer_ms=server_cfg.slow_consumer_ms,
                on_evict=lambda _box: metrics.EVICTIONS.inc(),
                flusher=self.fanout.flusher,
                tasks=tasks,
            )
            session = Session(
                conn_id=conn_id,
                ws=ws,
                outbox=outbox,
                peer=peer,
                tasks=tasks,
                limiter=FrameRateLimiter(server_cfg.max_messages_per_second),
            )
            self.sessions[conn_id] = session
            self.per_ip[peer] = self.per_ip.get(peer, 0) + 1
            deadline: asyncio.Task[None] | None = None
            if ws.principal is not None:
                self._authenticated(session, ws.principal)
            else:
                deadline = tasks.create_task(self._auth_deadline(session))
            try:
                await self._read_loop(session)
            except ConnectionClosed:
                pass
            except Exception:
                log.exception("connection %d failed", conn_id)
                with contextlib.suppress(Exception):
                    await ws.close(CloseCode.INTERNAL_ERROR, "internal error")
            finally:
                if deadline is not None and not session.closing:
                    deadline.cancel()
                self._closed(session)

    def _authenticated(self, session: Session, principal: Principal) -> None:
        session.principal = principal
        self.authenticated += 1
        self.admission.authenticated(session.ws)
        self.fanout.add(session)

    async def _auth_deadline(self, session: Session) -> None:
        await asyncio.sleep(self.config.server.auth_timeout_s)
        if session.principal is None:
            metrics.AUTH_FAILURES.labels(reason="timeout").inc()
            log.warning(
                "connection %d from %s: no authentication within auth_timeout_s (%s s), closing",
                session.conn_id,
                session.peer,
                self.config.server.auth_timeout_s,
            )
            session.closing = True  # the read loop's end must not cut this close short
            await close(session.ws, CloseCode.AUTH_FAILED, "authentication timeout")

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
            self.fanout.remove(session)
        self.service.connection_closed(session, self.clock())

    async def _read_loop(self, session: Session) -> None:
        ws = session.ws
        limiter = session.limiter
        while True:
            frame = await ws.recv(decode=False)
            started = time.monotonic()
            verdict = limiter.check()
            if verdict is Verdict.CLOSE:
                log.warning(
                    "connection %d (%s) closed 4008: over %d messages per second for 2 s",
                    session.conn_id,
                    session.principal.name if session.principal else session.peer,
                    limiter.limit,
                )
                session.outbox.flush_now()  # the answers before the close
                await close(ws, CloseCode.TOO_MANY_MESSAGES, "too many messages")
                return
            if verdict is Verdict.REFUSE:
                await session.refuse(
                    codec.peek_id(frame),
                    "?",
                    ProtocolError(
                        ErrorCode.RATE_LIMITED,
                        f"more than {limiter.limit} messages per second on this connection",
                    ),
                )
                continue
            await self._on_frame(session, frame)
            if time.monotonic() - started > _TURN_BUDGET_S:
                # A costly request (a large position.snapshot or state.get):
                # let other connections' requests in before this one's next
                # frame, which would otherwise be read without a wait.
                await asyncio.sleep(0)

    async def _on_frame(self, session: Session, frame: bytes) -> None:
        if session.principal is None:
            method = codec.peek_method(frame)
            if method is not None and method != "session.auth":
                # Before authentication no method is known to the caller.
                await session.refuse(
                    codec.peek_id(frame),
                    "?",
                    ProtocolError(
                        ErrorCode.UNAUTHENTICATED, "authenticate first with session.auth"
                    ),
                )
                return
        try:
            request = codec.decode(frame)
        except ProtocolError as exc:
            log.debug("connection %d: frame refused, %s", session.conn_id, exc.code.value)
            await session.refuse(exc.request_id, "?", exc)
            return
        method = request.method
        try:
            outcome = self.service.handle(session, request, self.clock())
        except ProtocolError as exc:
            log.debug("connection %d: %s refused, %s", session.conn_id, method, exc.code.value)
            await session.refuse(request.id, method, exc)
            if exc.code is ErrorCode.UNAUTHENTICATED and method == "session.auth":
                session.outbox.flush_now()  # the UNAUTHENTICATED answer first
                await close(session.ws, CloseCode.AUTH_FAILED, "authentication failed")
            return
        except Exception:
            log.exception("internal error in %s", method)
            await session.refuse(
                request.id, method, ProtocolError(ErrorCode.INTERNAL, "internal error (logged)")
            )
            return
        try:
            await self._deliver(session, request.id, method, outcome)
        except ConnectionClosed:
            raise
        except Exception:  # e.g. a result the codec cannot encode: a bug
            log.exception("internal error answering %s", method)
            await session.refuse(
                request.id, method, ProtocolError(ErrorCode.INTERNAL, "internal error (logged)")
            )

    async def _deliver(
        self, session: Session, request_id: RequestId, method: str, outcome: Outcome
    ) -> None:
        if isinstance(outcome, Reply):
            await session.reply(request_id, method, outcome)
        elif isinstance(outcome, ReplyWhenDurable):
            # Answered by the journal's callback once durable; keep reading,
            # unless the answers already out wait for the client to read.
            session.reply_when_durable(self.store, request_id, method, outcome)
            await session.drained()
        elif isinstance(outcome, ReplyLater):
            session.reply_later(request_id, method, outcome)
        else:
            # The answer first, then the registration, which pushes the
            # emergency snapshot; then wait for the transport, if need be.
            session.answer(codec.encode_ok(request_id, outcome.result))
            metrics.count_request(method, "ok")
            self._authenticated(session, outcome.principal)
            await session.drained()


def _refuse(
    connection: ServerConnection, peer: str, reason: str, why: str, text: str
) -> HttpResponse:
    """A handshake refused for a connection cap: counted, logged naming the
    client's address (``peer``), answered 503."""
    metrics.CONNECTIONS_REFUSED.labels(reason=reason).inc()
    log.warning("refused handshake from %s: %s", peer, why)
    return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, text)


def client_host(
    connection: ServerConnection, trusted: Sequence[IPNetwork], headers: Headers | None = None
) -> str:
    """The client's address: the TCP peer, or, when the peer is a trusted
    proxy, the right-most address of ``X-Forwarded-For`` that is not itself a
    trusted proxy (left-most entries are the client's own claims, which it
    could forge). A malformed header is ignored: the peer is the answer."""
    peer = peer_host(connection)
    if headers is None and connection.request is not None:
        headers = connection.request.headers
    if not trusted or headers is None or not _trusted(peer, trusted):
        return peer
    hops = ",".join(headers.get_all("X-Forwarded-For")).split(",")
    for hop in reversed(hops):
        text = hop.strip()
        try:
            ipaddress.ip_address(text)
        except ValueError:
            return peer
        if not _trusted(text, trusted):
            return text
    return peer


def _trusted(address: str, trusted: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def peer_host(connection: ServerConnection) -> str:
    try:
        peer = connection.remote_address
    except Exception:  # transport already gone
        return "?"
    return str(peer[0]) if peer else "?"


async def close(ws: ServerConnection, code: int, reason: str) -> None:
    """Close with ``code``, aborting the socket if the client does not answer in time."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await ws.close(code, reason)
    except (TimeoutError, ConnectionClosed, OSError):
        wsio.abort(ws)


async def replace_tokens(gateway: Gateway, tokens: TokenStore) -> int:
    """Accept ``tokens`` from now on; close with 4001 every connection whose
    token was revoked or rotated. Returns how many were closed."""
    before = gateway.service.tokens.digests()
    after = tokens.digests()
    gateway.service.tokens = tokens
    gone = [
        session
        for session in list(gateway.sessions.values())
        if session.principal is not None
        and after.get(session.principal.name) != before.get(session.principal.name)
    ]
    await asyncio.gather(
        *(close(s.ws, CloseCode.AUTH_FAILED, "token revoked") for s in gone),
        return_exceptions=True,
    )
    return len(gone)


async def join_cluster(
    config: ClusterConfig, service: RiskService, tasks: asyncio.TaskGroup
) -> ClusterMember:
    """Open the shared state and join the cluster (``ClusterStartError``
    names what refused it)."""
    # Imported here: a single gateway never loads the Redis client.
    from gateway.cluster.redis_state import open_redis_state

    try:
        shared = await open_redis_state(config.redis_url, timeout_ms=config.redis_timeout_ms)
    except SharedStateError as error:
        raise ClusterStartError(f"cannot join the cluster: {error}") from None
    member = ClusterMember(config, shared, service.admin)
    service.cluster = member
    try:
        await member.start(tasks)
    except BaseException:
        service.cluster = None
        await member.close()
        raise
    return member


def open_gateway(
    config: GatewayConfig,
    tokens: TokenStore,
    rules: tuple[Rule, ...] = (),
    *,
    clock: Callable[[], int] = wall_clock_ms,
) -> Gateway:
    """Lock and recover the state directory; the gateway, ready to serve.

    A fresh directory takes the config file's limits as version 1. Raises
    ``StateDirLocked`` when another gateway holds the directory, ``OSError``
    or ``PersistenceError`` when it cannot be opened.
    """
    reservation_ids = None
    if config.cluster is not None:
        # A reservation id names the member that holds it (WRONG_GATEWAY).
        prefix = config.cluster.name + ":"

        def reservation_ids() -> str:
            return prefix + random_reservation_id()

    engine = RiskEngine(
        limits=config.limits,
        now_ms=clock(),
        rules=rules,
        reservation_ids=reservation_ids,
        max_symbols_per_account=config.server.max_symbols_per_account,
        max_reservations_per_account=config.server.max_reservations_per_account,
    )
    persistence = config.persistence
    store = Store(
        engine,
        persistence.state_dir,
        clock=clock,
        fsync=persistence.fsync,
        fsync_interval_ms=persistence.fsync_interval_ms,
        snapshot_every=persistence.snapshot_every,
        on_batch=metrics.observe_batch,
    )
    recovered = store.open()
    if recovered.fresh:
        engine.adopt_file_limits(config.limits, clock())
    return Gateway(config, tokens=tokens, engine=engine, store=store, clock=clock)


@asynccontextmanager
async def running_gateway(
    config: GatewayConfig, tokens: TokenStore, rules: tuple[Rule, ...] = ()
) -> AsyncIterator[Gateway]:
    """Recover the state directory and serve until the block ends (the
    start-up path of ``serve``). A directory whose file limits were edited
    since they were last applied gets the changed keys as a new version."""
    gateway = open_gateway(config, tokens, rules)
    async with gateway:
        recovered = gateway.store.recovered
        assert recovered is not None
        if not recovered.fresh and await gateway.service.admin.reload_limits(
            config.limits, actor="config"
        ):
            log.warning(
                "limits edited in %s applied as version %d",
                config.source,
                gateway.engine.limits_version,
            )
        yield gateway
