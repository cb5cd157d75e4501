"""``GatewayClient``: an asyncio client of the risk gateway, protocol version 1.

What a caller can rely on:

- ``async with GatewayClient(url, token) as client`` opens the connection
  (``Authorization: Bearer`` at the handshake), sends ``session.hello`` and
  subscribes to the channels given in ``subscribe``. A refused token raises
  ``AuthenticationError``; an unreachable gateway raises ``ConnectionError``.
- ``await client.request(method, params)`` returns the ``result`` of the
  response with the same id. An error response raises ``GatewayError`` (with
  the protocol's ``code`` and ``message``), no answer within
  ``request_timeout`` raises ``TimeoutError``, and a connection lost while
  waiting raises ``ConnectionError``. Requests are never re-sent by the client
  (except, in a cluster, to the owner a ``WRONG_GATEWAY`` answer names: that
  answer means nothing was done): whether a lost request took effect is for
  the caller to find out (position updates are absolute, so re-sending those
  is harmless).
- Pushes are handed to callbacks (``client.on(channel, callback)``) and to
  iterators (``client.pushes(channel)``) in the order the gateway sent them,
  with per-channel ``seq`` checked: a gap makes the client subscribe to that
  channel again without ``resume``, and the snapshot that answers it replaces
  what came before (pushes of that channel are held back until it arrives).
- When the connection drops, the client reconnects with exponential backoff and
  full jitter (``reconnect=True``), says hello again and re-subscribes with
  ``resume`` set to the last seq seen per channel, so the events missed while
  away arrive before new ones. A new ``epoch`` in the hello (the gateway
  restarted, seqs started again at 1) takes snapshots instead. Authentication
  failures (HTTP 401/403, close codes 4001 and 1008) are not retried.
- ``client.emergency`` is the current EMERGENCY object, kept up to date from
  the ``emergency`` channel that every connection receives.

A cluster (PROTOCOL section 10: several gateways, "members", each owning some
accounts) is used the same way; give one member's URL or a list of them:

- The first URL that answers is the *primary* connection: hello, pushes,
  subscriptions and every request without an account (``emergency.*``,
  ``limits.*``, ``subscribe``, ``cluster.*``, ``ping``, ``state.get`` without
  ``account``, which shows the primary's accounts only) go there. When it
  drops, reconnecting tries the same URL first, then the next one (the given
  URLs, then the members learned from ``cluster.get``); a different member
  has its own seqs, so its channels are taken from snapshots.
- The hello shows whether the gateway is a member (its EMERGENCY has a
  ``cluster`` object). If so, and unless ``discover=False``, the client asks
  ``cluster.get`` once connected (and after each reconnect) and learns which
  member owns which account.
- Requests for an account (``order.validate``, ``position.update``,
  ``position.snapshot``, ``state.get`` with ``account``) go to the account's
  owner, ``reservation.release`` to the member named by the id's
  ``<member>:`` prefix, each over a connection of its own to that member,
  opened when first needed and kept (with the same reconnect policy). An
  account not known yet goes to the primary; a ``WRONG_GATEWAY`` answer is
  followed: the owner it names is remembered and the request sent there, at
  most ``MAX_REDIRECTS`` times, never twice to the same member; then the
  ``GatewayError`` (its ``owner`` attribute set) is raised. An account no
  member owns raises ``WRONG_GATEWAY`` with ``owner`` None at once.
- ``price.update`` is sent to every known member (each member keeps its own
  reference prices): the primary's answer is the result; a member that cannot
  be reached is skipped for ``backoff_cap`` seconds and, like the other
  members' refusals, logged.
- Requests for one account keep their order once its owner is known (one
  connection per member); a request sent on by a ``WRONG_GATEWAY`` answer
  may be overtaken by later ones, and requests for different members may be
  answered in any order.

Clients import ``protocol``, never ``gateway``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import itertools
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, cast

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.typing import Origin

from protocol.codec import decode_message, encode_request
from protocol.codes import Channel, CloseCode, ErrorCode, Mode, Role
from protocol.errors import ProtocolError

__all__ = [
    "BACKOFF_BASE_S",
    "BACKOFF_CAP_S",
    "MAX_REDIRECTS",
    "AuthenticationError",
    "DecimalLike",
    "GatewayClient",
    "GatewayError",
    "Push",
    "PushCallback",
    "PushStream",
    "backoff_delay",
    "decimal_text",
]

log = logging.getLogger("clients.client")

BACKOFF_BASE_S: Final = 0.1
BACKOFF_CAP_S: Final = 5.0
#: Close codes after which reconnecting with the same token cannot help.
AUTH_CLOSE_CODES: Final = frozenset({CloseCode.AUTH_FAILED, 1008})
#: Incoming frames (a STATE of many accounts can be large) are allowed up to this.
MAX_INCOMING_BYTES: Final = 64 * 1024 * 1024
#: ``WRONG_GATEWAY`` answers followed for one request before the error is raised.
MAX_REDIRECTS: Final = 2
#: Methods whose ``params.account`` is sent to the account's owner in a cluster.
ACCOUNT_METHODS: Final = frozenset(
    {"order.validate", "position.update", "position.snapshot", "state.get"}
)
#: Methods sent to every member of a cluster: each member keeps its own reference prices.
BROADCAST_METHODS: Final = frozenset({"price.update"})

DecimalLike = str | Decimal | int
JSONObject = dict[str, Any]


class GatewayError(Exception):
    """The gateway answered a request with an error (``code`` as in PROTOCOL section 7).

    ``code`` is the protocol's error code (``BAD_REQUEST``, ``FORBIDDEN``,
    ``CONFLICT``...) and ``message`` the gateway's explanation, which names the
    field at fault when there is one. ``details`` holds the error object's
    other keys, e.g. ``owner`` of ``WRONG_GATEWAY`` (also the ``owner``
    attribute).
    """

    def __init__(self, code: str, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details: JSONObject = dict(details or {})

    @property
    def owner(self) -> JSONObject | None:
        """``WRONG_GATEWAY``'s ``{"name", "url"}`` of the member owning the
        account (or that made the reservation); None otherwise, and when no
        member owns it."""
        owner = self.details.get("owner")
        return owner if isinstance(owner, dict) else None


class AuthenticationError(GatewayError):
    """The gateway refused this client's credentials or origin.

    Raised for HTTP 401/403 at the handshake and for close codes 4001/1008.
    The client does not reconnect after it: fix the token (or origin) first.
    """


@dataclass(frozen=True, slots=True)
class Push:
    """One push frame: ``data`` as the gateway sent it.

    ``snapshot`` pushes replace what the consumer held for the channel;
    ``seq`` is None only on ``heartbeat``.
    """

    channel: str
    seq: int | None
    data: JSONObject
    snapshot: bool = False


PushCallback = Callable[[Push], Awaitable[None] | None]


def backoff_delay(
    attempt: int,
    *,
    base: float = BACKOFF_BASE_S,
    cap: float = BACKOFF_CAP_S,
    rng: random.Random | None = None,
) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    ceiling = min(cap, base * (2 ** min(attempt, 62)))
    return (rng or random).uniform(0.0, ceiling)


def decimal_text(value: DecimalLike, name: str = "value") -> str:
    """The wire form of a decimal given as ``str``, ``Decimal`` or ``int``.

    Floats are refused (``TypeError``): the protocol's values are exact
    decimals and a float rarely holds the number its writer meant. Strings are
    sent as given; the gateway checks them and names the field if they are wrong.
    """
    if isinstance(value, bool) or not isinstance(value, str | Decimal | int):
        raise TypeError(f"{name} must be a str, Decimal or int, was {type(value).__name__}")
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if not value.is_finite():
        raise ValueError(f"{name} must be a finite decimal, was {value}")
    return format(value, "f")


def _wire(value: Any) -> Any:
    """Decimals anywhere in a params tree become strings; everything else is kept."""
    if isinstance(value, Decimal):
        return decimal_text(value)
    if isinstance(value, Mapping):
        return {key: _wire(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_wire(item) for item in value]
    return value


class PushStream:
    """An async iterator over the pushes of one channel (see ``GatewayClient.pushes``).

    It starts collecting when created, so nothing is missed between creating it
    and the first ``async for`` step. Iteration ends when the stream or the
    client is closed. The queue is unbounded: iterate promptly or close it.
    """

    def __init__(self, client: GatewayClient, channel: str) -> None:
        self.channel = channel
        self._client = client
        self._queue: asyncio.Queue[Push | None] = asyncio.Queue()
        self._closed = False

    def __aiter__(self) -> PushStream:
        return self

    async def __anext__(self) -> Push:
        if self._closed and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is None:
            raise StopAsyncIteration
        return item

    async def get(self) -> Push:
        """The next push (bound it with ``asyncio.timeout``); ``EOFError`` once closed."""
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            raise EOFError(f"push stream {self.channel} is closed") from None

    def close(self) -> None:
        """Stop collecting; a waiting ``async for`` ends."""
        if not self._closed:
            self._closed = True
            self._client._drop_stream(self)
            self._queue.put_nowait(None)

    def _put(self, push: Push) -> None:
        if not self._closed:
            self._queue.put_nowait(push)

    async def __aenter__(self) -> PushStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[JSONObject]
    method: str
    # Run by the reader when the response arrives, before any later frame is read.
    on_response: Callable[[JSONObject], None] | None = None


class GatewayClient:
    """A connection to the gateway that matches responses by id and follows channels.

    ``subscribe`` names the channels to follow (``alerts``, ``exposure``,
    ``decisions``, ``heartbeat``); ``emergency`` is always followed. With
    ``cancel_on_disconnect`` the gateway releases this connection's reservations
    when it closes. ``origin`` sets the handshake's ``Origin`` header (only
    needed to act like a browser page).

    ``url`` is one URL or a list of them (members of one cluster, tried in
    order); ``self.url`` is the primary connection's current one. In a
    cluster, requests are routed to the member that owns their account (see
    the module's documentation); ``discover=False`` learns the owners from
    ``WRONG_GATEWAY`` answers only, instead of asking ``cluster.get`` first.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        token: str,
        *,
        request_timeout: float = 10.0,
        reconnect: bool = True,
        subscribe: Iterable[str] = (),
        cancel_on_disconnect: bool = False,
        origin: str | None = None,
        backoff_base: float = BACKOFF_BASE_S,
        backoff_cap: float = BACKOFF_CAP_S,
        discover: bool = True,
    ) -> None:
        urls = (url,) if isinstance(url, str) else tuple(url)
        if not urls or not all(isinstance(u, str) and u for u in urls):
            raise ValueError("url must be a URL or a non-empty list of URLs")
        self.urls: tuple[str, ...] = urls
        self.url = urls[0]
        self.discover = discover
        self.request_timeout = request_timeout
        self.reconnect = reconnect
        self.cancel_on_disconnect = cancel_on_disconnect
        self.origin = origin
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._token = token
        self._channels: list[str] = []
        for name in subscribe:
            self._add_channel(str(name))
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._ws: ClientConnection | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self._failure: BaseException | None = None
        self._last_seq: dict[str, int] = {}
        # Channels live on the current connection (their subscribe was answered).
        self._live: set[str] = set()
        # Channels re-subscribed for a snapshot after a gap; their deltas are held back.
        self._resyncing: set[str] = set()
        self._epoch: int | None = None
        self._hello: JSONObject | None = None
        self._emergency: JSONObject | None = None
        self._callbacks: dict[str, list[PushCallback]] = {}
        self._streams: dict[str, list[PushStream]] = {}
        self._connection_callbacks: list[Callable[[bool], None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.reconnects = 0
        # The URL the seqs in _last_seq came from (another member has its own).
        self._epoch_url: str | None = None
        # Cluster routing: off on the per-member connections this client opens.
        self._routing = True
        self._in_cluster = False
        self._member_name: str | None = None  # the primary's name in the cluster
        self._owners: dict[str, str] = {}  # account -> member name
        self._member_urls: dict[str, str] = {}  # member name -> url
        # Members a broadcast could not reach, skipped until then (loop time).
        self._skip_until: dict[str, float] = {}
        self._links: dict[str, GatewayClient] = {}  # url -> connection to that member
        self._opening: dict[str, asyncio.Task[GatewayClient]] = {}

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> GatewayClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the connection, say hello and subscribe. Called by ``async with``.

        Raises ``AuthenticationError`` (token or origin refused),
        ``ConnectionError`` (gateway unreachable, or not a gateway),
        ``TimeoutError`` or ``GatewayError`` (hello or subscribe refused). The
        first connection is not retried; later drops are (``reconnect``).
        """
        if self._supervisor is not None:
            raise RuntimeError("GatewayClient.connect was already called")
        self._closing = False
        self._failure = None
        reader = await self._open_first()
        self._supervisor = asyncio.create_task(self._supervise(reader), name="gateway-client")
        if self._routing and self._in_cluster and self.discover:
            await self._discover()

    async def _open_first(self) -> asyncio.Task[None]:
        """``_open`` on the first of ``urls`` that can be reached."""
        for index, url in enumerate(self.urls):
            self.url = url
            try:
                return await self._open()
            except AuthenticationError:
                raise
            except (OSError, TimeoutError) as exc:
                if index == len(self.urls) - 1:
                    raise
                log.info("cannot connect to %s (%s); trying %s", url, exc, self.urls[index + 1])
        raise AssertionError("unreachable: urls is never empty")

    async def close(self) -> None:
        """Close the connection and stop reconnecting. Pending requests raise
        ``ConnectionError``; push iterators end. Safe to call twice."""
        self._closing = True
        self._connected.clear()
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await ws.close()
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(BaseException):
                await supervisor
        self._ws = None
        self._lost(ConnectionError("the client was closed"))
        for opening in list(self._opening.values()):
            opening.cancel()
        links, self._links = self._links, {}
        for link in links.values():
            await link.close()
        self._finish()
        for task in list(self._tasks):
            task.cancel()

    @property
    def connected(self) -> bool:
        """True while a connection is open and its hello and subscriptions are done."""
        return self._connected.is_set()

    @property
    def failure(self) -> BaseException | None:
        """Why the client stopped for good (auth refused, or a drop without
        ``reconnect``); None while it runs or reconnects."""
        return self._failure

    @property
    def emergency(self) -> JSONObject | None:
        """The current EMERGENCY object (``None`` before the first connection)."""
        return self._emergency

    @property
    def mode(self) -> Mode | None:
        """The gateway-wide emergency mode, or None before the first connection."""
        return None if self._emergency is None else Mode(self._emergency["mode"])

    @property
    def session(self) -> JSONObject | None:
        """The last ``session.hello`` result: protocol, server, epoch, role, accounts..."""
        return self._hello

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels this client follows (besides ``emergency``)."""
        return tuple(self._channels)

    @property
    def last_seqs(self) -> dict[str, int]:
        """The last seq seen per channel (what a reconnect resumes from)."""
        return dict(self._last_seq)

    @property
    def in_cluster(self) -> bool:
        """True when the primary connection's gateway is a member of a cluster."""
        return self._in_cluster

    @property
    def routes(self) -> dict[str, str]:
        """The accounts whose owner is known: account -> the owning member's URL."""
        return {
            account: self._member_urls[name]
            for account, name in self._owners.items()
            if name in self._member_urls
        }

    async def wait_connected(self) -> None:
        """Return once connected (again); raise the stop reason if the client stopped.

        Bound it with ``asyncio.timeout``: a reconnecting client may take long.
        """
        await self._ready()

    # ------------------------------------------------------------- requests

    async def request(self, method: str, params: Mapping[str, Any] | None = None) -> JSONObject:
        """Send one request and return its ``result``.

        Decimal values in ``params`` are sent as strings. Raises
        ``GatewayError`` on an error response, ``TimeoutError`` after
        ``request_timeout`` seconds (waiting for a reconnect counts), and
        ``ConnectionError`` when the connection drops before the answer or the
        client has stopped.
        """
        async with asyncio.timeout(self.request_timeout):
            future = await self.send(method, params)
            return await future

    async def send(
        self, method: str, params: Mapping[str, Any] | None = None
    ) -> asyncio.Future[JSONObject]:
        """Send one request now and return a future of its ``result``.

        For pipelining (many requests in flight, sent in order): the frame has
        been handed to the connection when this returns. The future raises as
        ``request`` does, except that no timeout applies to it. In a cluster
        the frame goes to the member the request is routed to, and the future
        follows ``WRONG_GATEWAY`` answers.
        """
        if not (self._routing and self._in_cluster):
            await self._ready()
            return await self._send(method, params)
        if method in BROADCAST_METHODS:
            return await self._broadcast(method, params)
        key = _route_key(method, params)
        if key is None:
            await self._ready()
            return await self._send(method, params)
        url = self._target(key)
        future = await self._send_at(url, method, params, key)
        return asyncio.ensure_future(self._follow(future, method, params, key, url))

    # -------------------------------------------------------------- routing

    def _target(self, key: tuple[str, str]) -> str | None:
        """The URL of the member that owns the account (or made the
        reservation), None while unknown (the primary is asked)."""
        kind, value = key
        name = self._owners.get(value) if kind == "account" else value
        return None if name is None else self._member_urls.get(name)

    async def _send_at(
        self,
        url: str | None,
        method: str,
        params: Mapping[str, Any] | None,
        key: tuple[str, str] | None = None,
    ) -> asyncio.Future[JSONObject]:
        """Send over the primary (``url`` None or its own) or the member at ``url``."""
        if url is None or url == self.url:
            await self._ready()
            return await self._send(method, params)
        try:
            link = await self._link(url)
        except (OSError, TimeoutError) as exc:
            if key is None:
                raise
            what = "owns account" if key[0] == "account" else "made reservation"
            held = key[1] if key[0] == "account" else str((params or {}).get("reservation_id"))
            message = f"{exc} (the member that {what} {held})"
            if isinstance(exc, TimeoutError):
                raise TimeoutError(message) from None
            raise ConnectionError(message) from None
        await link._ready()
        return await link._send(method, params)

    async def _follow(
        self,
        future: asyncio.Future[JSONObject],
        method: str,
        params: Mapping[str, Any] | None,
        key: tuple[str, str],
        url: str | None,
    ) -> JSONObject:
        """The result of a routed request, following ``WRONG_GATEWAY`` answers."""
        tried = {url or self.url}
        for hop in range(MAX_REDIRECTS + 1):
            try:
                return await future
            except GatewayError as error:
                owner_url = self._learn_owner(error, key)
                if owner_url is None or owner_url in tried or hop == MAX_REDIRECTS:
                    raise
                log.info("%s for %s: following %s to %s", method, key[1], error.code, owner_url)
                tried.add(owner_url)
                future = await self._send_at(owner_url, method, params, key)
        raise AssertionError("unreachable: the last hop returns or raises")

    def _learn_owner(self, error: GatewayError, key: tuple[str, str]) -> str | None:
        """Remember the owner a ``WRONG_GATEWAY`` names; its URL (None: not one)."""
        if error.code != ErrorCode.WRONG_GATEWAY.value:
            return None
        kind, value = key
        owner = error.owner
        name = None if owner is None else owner.get("name")
        url = None if owner is None else owner.get("url")
        if not isinstance(url, str) or not url:
            if kind == "account":
                self._owners.pop(value, None)  # no member owns it (any more)
            return None
        if isinstance(name, str) and name:
            self._member_urls[name] = url
            if kind == "account":
                self._owners[value] = name
        return url

    async def _broadcast(
        self, method: str, params: Mapping[str, Any] | None
    ) -> asyncio.Future[JSONObject]:
        """Send to the primary and to every other member; the primary's future.

        A member that cannot be reached is skipped (logged), and not tried
        again for ``backoff_cap`` seconds; a connection that is reconnecting
        is skipped without waiting.
        """
        await self._ready()
        future = await self._send(method, params)
        now = asyncio.get_running_loop().time()
        for name, url in sorted(self._member_urls.items()):
            if name == self._member_name or url == self.url:
                continue
            if self._skip_until.get(url, 0.0) > now:
                continue
            try:
                link = await self._link(url)
                if not link.connected:
                    raise ConnectionError(f"the connection to {url} is reconnecting")
                other = await link._send(method, params)
            except (OSError, TimeoutError, GatewayError) as exc:
                log.warning("%s not sent to member %s (%s): %s", method, name, url, exc)
                self._skip_until[url] = asyncio.get_running_loop().time() + self.backoff_cap
                continue
            other.add_done_callback(functools.partial(_log_refusal, method, name))
        return future

    async def _link(self, url: str) -> GatewayClient:
        """The connection to the member at ``url``, opened when first needed."""
        if self._closing:
            raise ConnectionError("the client was closed")
        link = self._links.get(url)
        if link is not None:
            if link._failure is None and not link._closing:
                return link
            del self._links[url]  # stopped for good: open a new one
            self._spawn(link.close())
        opening = self._opening.get(url)
        if opening is None:
            opening = asyncio.ensure_future(self._open_link(url))
            self._opening[url] = opening
            opening.add_done_callback(functools.partial(self._opened, url))
        return await asyncio.shield(opening)

    async def _open_link(self, url: str) -> GatewayClient:
        link = GatewayClient(
            url,
            self._token,
            request_timeout=self.request_timeout,
            reconnect=self.reconnect,
            cancel_on_disconnect=self.cancel_on_disconnect,
            origin=self.origin,
            backoff_base=self.backoff_base,
            backoff_cap=self.backoff_cap,
            discover=False,
        )
        link._routing = False
        await link.connect()
        if self._closing:
            await link.close()
            raise ConnectionError("the client was closed")
        self._links[url] = link
        return link

    def _opened(self, url: str, task: asyncio.Task[GatewayClient]) -> None:
        if self._opening.get(url) is task:
            del self._opening[url]
        if not task.cancelled():
            task.exception()  # retrieved: the waiters have raised it

    def _learn_cluster(self, view: JSONObject) -> None:
        """Take the members and their accounts from a ``cluster.get`` result."""
        members = view.get("members")
        if not isinstance(members, list):
            return
        owners: dict[str, str] = {}
        urls: dict[str, str] = {}
        for member in members:
            if not isinstance(member, dict):
                continue
            name, url = member.get("name"), member.get("url")
            if not isinstance(name, str) or not isinstance(url, str):
                continue
            urls[name] = url
            for account in member.get("accounts") or ():
                if isinstance(account, str):
                    owners[account] = name
        self._owners, self._member_urls = owners, urls
        for url in [u for u in self._links if u not in urls.values()]:
            self._spawn(self._links.pop(url).close())  # a member no longer in the cluster
        name = view.get("name")
        self._member_name = name if isinstance(name, str) else None

    async def _discover(self) -> None:
        try:
            await self.cluster()
        except (GatewayError, OSError, TimeoutError) as exc:
            log.warning(
                "cluster.get failed (%s); owners are learned from WRONG_GATEWAY answers", exc
            )

    def _failover_urls(self) -> list[str]:
        """Where the primary connection may go: the given URLs, then the known members."""
        urls = list(self.urls)
        for _name, url in sorted(self._member_urls.items()):
            if url not in urls:
                urls.append(url)
        return urls

    def _next_url(self) -> None:
        urls = self._failover_urls()
        if len(urls) < 2:
            return
        index = urls.index(self.url) if self.url in urls else -1
        self.url = urls[(index + 1) % len(urls)]

    async def _send(
        self,
        method: str,
        params: Mapping[str, Any] | None,
        on_response: Callable[[JSONObject], None] | None = None,
    ) -> asyncio.Future[JSONObject]:
        ws = self._ws
        if ws is None:
            raise ConnectionError("not connected to the gateway")
        rid = next(self._ids)
        future: asyncio.Future[JSONObject] = asyncio.get_running_loop().create_future()
        self._pending[rid] = _Pending(future, method, on_response)
        future.add_done_callback(lambda _f: self._pending.pop(rid, None))
        frame = encode_request(rid, method, None if params is None else _wire(params))
        try:
            await ws.send(frame, text=True)
        except ConnectionClosed as exc:
            future.cancel()
            raise ConnectionError(
                f"connection to the gateway lost while sending {method}: {_close_text(exc)}"
            ) from None
        return future

    async def _ready(self) -> None:
        while not self._connected.is_set():
            if self._failure is not None:
                raise self._failure
            if self._closing or self._supervisor is None:
                raise ConnectionError("not connected to the gateway")
            waiter = asyncio.ensure_future(self._connected.wait())
            stopped = asyncio.ensure_future(self._supervisor_done())
            try:
                await asyncio.wait({waiter, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                stopped.cancel()

    async def _supervisor_done(self) -> None:
        supervisor = self._supervisor
        if supervisor is not None:
            await asyncio.wait({supervisor})

    # ------------------------------------------------------ method helpers

    async def ping(self) -> JSONObject:
        return await self.request("ping")

    async def validate(
        self,
        account: str,
        symbol: str,
        side: str,
        qty: DecimalLike,
        price: DecimalLike,
        reserve: bool = False,
        client_order_id: str | None = None,
    ) -> JSONObject:
        """``order.validate``: the DECISION (``decision`` is ``accept`` or ``reject``).

        A rejection is a normal result, not an exception; its ``reasons`` list
        every failing check.
        """
        params: JSONObject = {
            "account": account,
            "symbol": symbol,
            "side": side,
            "qty": decimal_text(qty, "qty"),
            "price": decimal_text(price, "price"),
        }
        if reserve:
            params["reserve"] = True
        if client_order_id is not None:
            params["client_order_id"] = client_order_id
        return await self.request("order.validate", params)

    async def update_position(
        self,
        account: str,
        symbol: str,
        qty: DecimalLike,
        price: DecimalLike,
        *,
        seq: int | None = None,
        release: str | None = None,
    ) -> JSONObject:
        """``position.update``: set the absolute position (signed ``qty``) at mark ``price``."""
        params: JSONObject = {
            "account": account,
            "symbol": symbol,
            "qty": decimal_text(qty, "qty"),
            "price": decimal_text(price, "price"),
        }
        if seq is not None:
            params["seq"] = seq
        if release is not None:
            params["release"] = release
        return await self.request("position.update", params)

    async def snapshot_positions(
        self,
        account: str,
        positions: Iterable[tuple[str, DecimalLike, DecimalLike]],
        *,
        seq: int | None = None,
    ) -> JSONObject:
        """``position.snapshot``: replace every position of ``account`` (symbol, qty, price)."""
        params: JSONObject = {
            "account": account,
            "positions": [
                {"symbol": s, "qty": decimal_text(q, "qty"), "price": decimal_text(p, "price")}
                for s, q, p in positions
            ],
        }
        if seq is not None:
            params["seq"] = seq
        return await self.request("position.snapshot", params)

    async def update_price(self, symbol: str, price: DecimalLike) -> JSONObject:
        """``price.update``: the reference price every account's collar compares
        with. Needs a ``feed`` or ``admin`` token (a trader gets ``FORBIDDEN``)."""
        return await self.request(
            "price.update", {"symbol": symbol, "price": decimal_text(price, "price")}
        )

    async def release(self, reservation_id: str) -> bool:
        """``reservation.release``: True if the reservation was still live."""
        result = await self.request("reservation.release", {"reservation_id": reservation_id})
        return bool(result["released"])

    async def emergency_set(
        self, mode: Mode | str, reason: str = "", account: str | None = None
    ) -> JSONObject:
        """``emergency.set`` (admin): the resulting EMERGENCY.

        ``reason`` is required except for ``normal``; without ``account`` the
        gateway-wide mode is set. Setting the current mode changes nothing.
        """
        params: JSONObject = {"mode": str(mode), "reason": reason}
        if account is not None:
            params["account"] = account
        result = await self.request("emergency.set", params)
        self._adopt_emergency(result)
        return result

    async def emergency_get(self) -> JSONObject:
        """``emergency.get``: the current EMERGENCY."""
        result = await self.request("emergency.get")
        self._adopt_emergency(result)
        return result

    async def state(self, account: str | None = None) -> JSONObject:
        """``state.get``: the STATE (a trader sees only its own accounts)."""
        return await self.request("state.get", None if account is None else {"account": account})

    async def limits_get(self) -> JSONObject:
        """``limits.get``: ``{version, limits}``."""
        return await self.request("limits.get")

    async def limits_set(self, version: int, limits: Mapping[str, Any]) -> JSONObject:
        """``limits.set`` (admin): ``CONFLICT`` unless ``version`` is current."""
        return await self.request("limits.set", {"version": version, "limits": dict(limits)})

    async def history(self) -> JSONObject:
        """``history.get``: the last 15 minutes the dashboard plots: ``gateway``
        and per-account ``[time, gross, limit]`` points, and (not for a
        trader) ``decisions`` counted per second."""
        return await self.request("history.get")

    async def cluster(self) -> JSONObject:
        """``cluster.get`` on the primary: ``{name, members}``; also refreshes
        the routes. ``NOT_FOUND`` from a gateway that is not in a cluster."""
        view = await self.request("cluster.get")
        if self._routing:
            self._learn_cluster(view)
        return view

    async def cluster_forget(self, name: str) -> JSONObject:
        """``cluster.forget`` (admin): ``{"forgotten": name}``; ``CONFLICT`` while
        the member was seen recently, ``NOT_FOUND`` for an unknown one."""
        return await self.request("cluster.forget", {"name": name})

    async def subscribe(self, *channels: str) -> JSONObject:
        """Follow more channels (kept across reconnects); the result maps channel to seq."""
        new = [c for c in channels if c not in self._channels]
        for channel in new:
            self._add_channel(channel)
        if not new or not self.connected:
            return {"channels": {}}
        return await self._subscribe(new, resume=False)

    async def unsubscribe(self, *channels: str) -> JSONObject:
        """Stop following channels (``emergency`` cannot be unsubscribed)."""
        for channel in channels:
            if channel in self._channels:
                self._channels.remove(channel)
            self._live.discard(channel)
            self._last_seq.pop(channel, None)
            self._resyncing.discard(channel)
        return await self.request("unsubscribe", {"channels": list(channels)})

    def _add_channel(self, channel: str) -> None:
        if channel == Channel.EMERGENCY.value:
            return  # every connection receives it from authentication on
        if channel not in self._channels:
            self._channels.append(channel)

    # --------------------------------------------------------------- pushes

    def on(self, channel: str, callback: PushCallback) -> Callable[[], None]:
        """Call ``callback(push)`` for each push of ``channel``; returns a remover.

        A plain function runs in the reader, in order, before the next frame is
        read (keep it short; it must not wait for a response). A coroutine
        function runs in a task of its own, so it may make requests. Exceptions
        from callbacks are logged, never raised into the client. Subscribing to
        the channel is separate (``subscribe=...`` or ``subscribe()``).
        """
        self._callbacks.setdefault(channel, []).append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.get(channel, []).remove(callback)

        return remove

    def pushes(self, channel: str) -> PushStream:
        """An async iterator of the pushes of ``channel``, from now on."""
        stream = PushStream(self, channel)
        if self._failure is not None or self._closing:
            stream.close()
        else:
            self._streams.setdefault(channel, []).append(stream)
        return stream

    def on_connection_change(self, callback: Callable[[bool], None]) -> Callable[[], None]:
        """Call ``callback(True)`` once (re)connected and ``callback(False)`` when the
        connection drops, before any reconnect attempt. Returns a remover."""
        self._connection_callbacks.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._connection_callbacks.remove(callback)

        return remove

    def _drop_stream(self, stream: PushStream) -> None:
        with contextlib.suppress(ValueError):
            self._streams.get(stream.channel, []).remove(stream)

    # ------------------------------------------------------- the connection

    async def _handshake(self) -> ClientConnection:
        try:
            return await connect(
                self.url,
                additional_headers={"Authorization": f"Bearer {self._token}"},
                origin=None if self.origin is None else Origin(self.origin),
                compression=None,
                open_timeout=self.request_timeout,
                max_size=MAX_INCOMING_BYTES,
                ping_interval=10,
                ping_timeout=10,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status == 401:
                raise AuthenticationError(
                    "UNAUTHENTICATED", f"the gateway at {self.url} refused the token (HTTP 401)"
                ) from None
            if status == 403:
                raise AuthenticationError(
                    "FORBIDDEN",
                    f"the gateway at {self.url} refused the connection (HTTP 403: origin "
                    "not allowed)",
                ) from None
            body = exc.response.body.decode("utf-8", "replace").strip() if exc.response.body else ""
            detail = f": {body}" if body else ""
            raise ConnectionError(
                f"the gateway at {self.url} refused the connection (HTTP {status}{detail})"
            ) from None
        except InvalidURI as exc:
            raise ConnectionError(f"{self.url} is not a WebSocket URL ({exc})") from None
        except InvalidHandshake as exc:
            raise ConnectionError(
                f"{self.url} did not answer as a WebSocket gateway ({exc})"
            ) from None
        except TimeoutError:
            raise TimeoutError(
                f"no handshake answer from {self.url} within {self.request_timeout} s"
            ) from None
        except ConnectionRefusedError:
            raise ConnectionError(
                f"cannot connect to {self.url}: connection refused (is the gateway running?)"
            ) from None
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise ConnectionError(f"cannot connect to {self.url}: {reason}") from None

    async def _open(self) -> asyncio.Task[None]:
        """Handshake, start the reader, hello, subscribe; returns the reader task."""
        ws = await self._handshake()
        self._ws = ws
        self._live.clear()
        self._resyncing.clear()
        reader = asyncio.create_task(self._read(ws), name="gateway-client-reader")
        try:
            async with asyncio.timeout(self.request_timeout):
                hello_params = {"cancel_on_disconnect": True} if self.cancel_on_disconnect else None
                hello = await (await self._send("session.hello", hello_params))
                epoch = hello.get("epoch")
                if self._epoch is not None and (
                    epoch != self._epoch or self.url != self._epoch_url
                ):
                    # The gateway restarted, or this is another member: its
                    # seqs are not the ones seen so far.
                    log.info(
                        "gateway epoch changed (%s at %s -> %s at %s): taking snapshots",
                        self._epoch,
                        self._epoch_url,
                        epoch,
                        self.url,
                    )
                    emergency_seq = self._last_seq.get(Channel.EMERGENCY.value)
                    self._last_seq.clear()
                    if emergency_seq is not None:
                        # The emergency snapshot of this connection came before the hello.
                        self._last_seq[Channel.EMERGENCY.value] = emergency_seq
                self._epoch = epoch if isinstance(epoch, int) else None
                if self.url != self._epoch_url:
                    self._member_name = None  # learned again from cluster.get
                self._epoch_url = self.url
                self._hello = hello
                emergency = hello.get("emergency")
                if isinstance(emergency, dict):
                    self._in_cluster = isinstance(emergency.get("cluster"), dict)
                    self._adopt_emergency(emergency)
                if self._channels:
                    await self._subscribe(list(self._channels), resume=True)
        except BaseException:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await ws.close()
            with contextlib.suppress(BaseException):
                await reader
            self._ws = None
            raise
        self._connected.set()
        self._notify_connection(True)
        return reader

    async def _subscribe(self, channels: list[str], *, resume: bool) -> JSONObject:
        params: JSONObject = {"channels": channels}
        if resume:
            seqs = {c: self._last_seq[c] for c in channels if c in self._last_seq}
            if seqs:
                params["resume"] = seqs
        else:
            for channel in channels:
                self._last_seq.pop(channel, None)

        def live(_response: JSONObject) -> None:
            # Runs in the reader: every push after this response is on the
            # subscription (catch-up first), so heartbeats can be checked.
            self._live.update(channels)

        future = await self._send("subscribe", params, on_response=live)
        return await future

    async def _resync(self, channel: str) -> None:
        """Subscribe again without resume: a snapshot replaces the gap."""
        try:
            future = await self._send("subscribe", {"channels": [channel]})
            async with asyncio.timeout(self.request_timeout):
                await future
        except (ConnectionError, TimeoutError, GatewayError) as exc:
            # A reconnect takes a snapshot or resumes anyway.
            log.warning("re-subscribing to %s after a seq gap failed: %s", channel, exc)

    async def _supervise(self, reader: asyncio.Task[None]) -> None:
        attempt = 0
        while True:
            with contextlib.suppress(Exception):
                await reader
            ws = self._ws
            code = ws.close_code if ws is not None else None
            text = _ws_close_text(ws)
            self._ws = None
            self._connected.clear()
            self._lost(ConnectionError(f"connection to the gateway lost ({text})"))
            if self._closing:
                return
            self._notify_connection(False)
            if code in AUTH_CLOSE_CODES:
                self._stop(
                    AuthenticationError(
                        "UNAUTHENTICATED",
                        f"the gateway closed the connection: authentication failed ({text})",
                    )
                )
                return
            if not self.reconnect:
                self._stop(ConnectionError(f"connection to the gateway lost ({text})"))
                return
            log.warning("connection to %s lost (%s); reconnecting", self.url, text)
            while True:
                await asyncio.sleep(
                    backoff_delay(attempt, base=self.backoff_base, cap=self.backoff_cap)
                )
                attempt += 1
                try:
                    reader = await self._open()
                except AuthenticationError as exc:
                    self._stop(exc)
                    return
                except (OSError, TimeoutError, GatewayError, ProtocolError) as exc:
                    log.info("reconnect attempt %d to %s failed: %s", attempt, self.url, exc)
                    self._next_url()  # another member of the cluster, if any is known
                    continue
                self.reconnects += 1
                attempt = 0
                if self._routing and self._in_cluster and self.discover:
                    self._spawn(self._discover())
                break

    def _lost(self, error: ConnectionError) -> None:
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if not entry.future.done():
                entry.future.set_exception(
                    ConnectionError(f"{error} while waiting for the answer to {entry.method}")
                )

    def _stop(self, error: BaseException) -> None:
        self._failure = error
        log.error("gateway client stopped: %s", error)
        self._finish()

    def _finish(self) -> None:
        for streams in list(self._streams.values()):
            for stream in list(streams):
                stream.close()
        self._streams.clear()

    def _notify_connection(self, connected: bool) -> None:
        for callback in list(self._connection_callbacks):
            try:
                callback(connected)
            except Exception:
                log.exception("connection callback failed")

    # ---------------------------------------------------------- the reader

    async def _read(self, ws: ClientConnection) -> None:
        try:
            await self._read_frames(ws)
        finally:
            # Fail what waits on this connection at once, also during _open.
            self._lost(ConnectionError(f"connection to the gateway lost ({_ws_close_text(ws)})"))

    async def _read_frames(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                try:
                    message = decode_message(raw)
                except (orjson.JSONDecodeError, ProtocolError):
                    log.warning("ignored a frame that is not a JSON object")
                    continue
                try:
                    if "channel" in message:
                        self._on_push(message)
                    else:
                        self._on_response(message)
                except Exception:
                    log.exception("failed to handle a gateway message")

    def _on_response(self, message: JSONObject) -> None:
        rid = message.get("id")
        entry = self._pending.pop(rid, None) if isinstance(rid, int) else None
        if entry is None:
            if message.get("status") == "error":
                error = message.get("error") or {}
                log.warning(
                    "gateway error for no pending request (id %r): %s %s",
                    rid,
                    error.get("code"),
                    error.get("message"),
                )
            return
        if entry.future.done():
            return
        if message.get("status") == "ok":
            result = message.get("result")
            result = result if isinstance(result, dict) else {}
            if entry.on_response is not None:
                entry.on_response(result)
            entry.future.set_result(result)
            return
        error = message.get("error")
        if not isinstance(error, dict):
            error = {}
        details = {k: v for k, v in error.items() if k not in ("code", "message")}
        entry.future.set_exception(
            GatewayError(str(error.get("code", "INTERNAL")), str(error.get("message", "")), details)
        )

    def _on_push(self, message: JSONObject) -> None:
        channel = message.get("channel")
        data = message.get("data")
        if not isinstance(channel, str) or not isinstance(data, dict):
            return
        seq = message.get("seq")
        seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
        snapshot = message.get("snapshot") is True
        if channel == Channel.HEARTBEAT.value:
            self._check_heartbeat(data)
        elif seq is not None and not self._accept_seq(channel, seq, snapshot):
            return
        if channel == Channel.EMERGENCY.value:
            self._emergency = data
        self._dispatch(Push(channel, seq, data, snapshot))

    def _accept_seq(self, channel: str, seq: int, snapshot: bool) -> bool:
        """Track the channel's seq; False for a push not to hand on."""
        if snapshot:
            self._resyncing.discard(channel)
            self._last_seq[channel] = seq
            return True
        if channel in self._resyncing:
            return False  # the snapshot on its way covers it
        last = self._last_seq.get(channel)
        if last is not None and seq <= last:
            return False  # a duplicate: already handed on
        if last is None or seq == last + 1 or self._jumps_expected(channel):
            self._last_seq[channel] = seq
            return True
        log.warning("seq gap on %s: %d after %d; re-subscribing for a snapshot", channel, seq, last)
        self._start_resync(channel)
        return False

    def _jumps_expected(self, channel: str) -> bool:
        # A trader sees only its accounts' exposure pushes of a shared seq, and
        # no alert about another account or about a connection.
        hello = self._hello or {}
        if hello.get("role") != Role.TRADER.value:
            return False
        if channel == Channel.ALERTS.value:
            return True
        return channel == Channel.EXPOSURE.value and "*" not in (hello.get("accounts") or ())

    def _check_heartbeat(self, data: JSONObject) -> None:
        seqs = data.get("seqs")
        if not isinstance(seqs, dict):
            return
        for channel, seq in seqs.items():
            if not isinstance(seq, int) or channel in self._resyncing:
                continue
            if channel != Channel.EMERGENCY.value and channel not in self._live:
                continue
            if self._jumps_expected(channel):
                continue
            last = self._last_seq.get(channel)
            if last is not None and seq > last:
                log.warning(
                    "heartbeat shows %s at seq %d, last seen %d; re-subscribing", channel, seq, last
                )
                self._start_resync(channel)

    def _start_resync(self, channel: str) -> None:
        self._resyncing.add(channel)
        self._spawn(self._resync(channel))

    def _dispatch(self, push: Push) -> None:
        for callback in list(self._callbacks.get(push.channel, ())):
            try:
                outcome = callback(push)
                if inspect.isawaitable(outcome):
                    self._spawn(_guarded(outcome))
            except Exception:
                log.exception("push callback for %s failed", push.channel)
        for stream in list(self._streams.get(push.channel, ())):
            stream._put(push)

    def _spawn(self, awaitable: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _adopt_emergency(self, view: JSONObject) -> None:
        """Take an EMERGENCY from a response unless a newer one came by push."""
        current = self._emergency
        version = view.get("version")
        if (
            current is None
            or not isinstance(version, int)
            or version >= cast(int, current.get("version", -1))
        ):
            self._emergency = view


def _route_key(method: str, params: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """``("account", A)`` or ``("member", M)`` for a request routed in a
    cluster; None for one the primary answers."""
    if params is None:
        return None
    if method in ACCOUNT_METHODS:
        account = params.get("account")
        return ("account", account) if isinstance(account, str) else None
    if method == "reservation.release":
        reservation_id = params.get("reservation_id")
        if isinstance(reservation_id, str):
            member, sep, _rest = reservation_id.partition(":")
            if sep and member:
                return ("member", member)
    return None


def _log_refusal(method: str, member: str, future: asyncio.Future[JSONObject]) -> None:
    if future.cancelled():
        return
    error = future.exception()
    if error is not None:
        log.warning("%s on member %s failed: %s", method, member, error)


async def _guarded(awaitable: Awaitable[None]) -> None:
    try:
        await awaitable
    except Exception:
        log.exception("async push callback failed")


def _ws_close_text(ws: ClientConnection | None) -> str:
    code = None if ws is None else ws.close_code
    if code is None:
        return "no close code"
    reason = ws.close_reason if ws is not None else None
    return f"code {code}" + (f": {reason}" if reason else "")


def _close_text(exc: ConnectionClosed) -> str:
    frame = exc.rcvd
    if frame is None:
        return "closed without a close frame"
    return f"code {frame.code}" + (f": {frame.reason}" if frame.reason else "")
