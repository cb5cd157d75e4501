"""Shared fixtures: a real gateway on 127.0.0.1, port 0, with a temporary state dir."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway.auth import TokenStore, hash_token
from gateway.config import GatewayConfig, Limits, PersistenceConfig, ServerConfig, TokenConfig
from gateway.core.engine import RiskEngine
from gateway.net.server import Gateway, running_gateway
from protocol.codes import Role
from tests.wsclient import TestClient

TOKENS = {
    "admin": ("admin-token", Role.ADMIN, ()),
    "viewer": ("viewer-token", Role.VIEWER, ()),
    "desk-1": ("trader-token", Role.TRADER, ("A1", "A2")),
    "desk-2": ("trader-b-token", Role.TRADER, ("B1",)),
    "price-feed": ("feed-token", Role.FEED, ()),
}
ADMIN, VIEWER, TRADER, TRADER_B = "admin-token", "viewer-token", "trader-token", "trader-b-token"
FEED = "feed-token"

#: 32-character decimals (the protocol's longest) whose product needs more
#: digits than Python's default context keeps.
BIG_QTY = Decimal("1234567890123456.789012345678901")
BIG_PRICE = Decimal("9876543210987654.321098765432109")


def unbounded_limits() -> Limits:
    """Limits that no order of ``BIG_QTY`` at ``BIG_PRICE`` reaches."""
    huge = Decimal("9" * 40)
    return Limits(
        max_exposure=huge,
        max_account_exposure=huge,
        max_position=huge,
        max_order_qty=huge,
        max_order_notional=huge,
        max_orders_per_second=1_000_000,
    )


def token_configs() -> tuple[TokenConfig, ...]:
    return tuple(
        TokenConfig(name=name, role=role, accounts=accounts, token_sha256=hash_token(token))
        for name, (token, role, accounts) in TOKENS.items()
    )


class RunningGateway:
    """A started in-process gateway and ways to talk to it."""

    def __init__(
        self, gateway: Gateway, state_dir: Path, held: asyncio.Task[None] | None = None
    ) -> None:
        self.gateway = gateway
        self.state_dir = state_dir
        self.clients: list[TestClient] = []
        self._held = held

    async def stopped(self) -> None:
        """Stop the gateway and wait for the task serving it; raise what
        ended it, if not a clean stop (a gateway that died during a test
        fails the test)."""
        await self.gateway.stop()
        if self._held is not None:
            await self._held

    @property
    def url(self) -> str:
        return self.gateway.url

    @property
    def manager(self) -> RiskEngine:
        return self.gateway.engine

    async def client(self, token: str | None = ADMIN, **kwargs: Any) -> TestClient:
        client = await TestClient.open(self.url, token, **kwargs)
        self.clients.append(client)
        if token is not None:
            # The emergency snapshot arrives first on every authenticated connection.
            await client.next_push("emergency")
        return client

    async def close_clients(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.close()


GatewayFactory = Callable[..., Awaitable[RunningGateway]]


async def start_gateway(
    state_dir: Path,
    *,
    limits: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    persistence: dict[str, Any] | None = None,
) -> RunningGateway:
    config = GatewayConfig(
        server=ServerConfig(**{"host": "127.0.0.1", "port": 0, **(server or {})}),
        persistence=PersistenceConfig(state_dir=state_dir, **(persistence or {})),
        limits=Limits.from_mapping(limits or {}),
        tokens=token_configs(),
    )
    gateway, held = await serve_in_task(config, TokenStore(config.tokens))
    return RunningGateway(gateway, state_dir, held)


async def serve_in_task(
    config: GatewayConfig, tokens: TokenStore
) -> tuple[Gateway, asyncio.Task[None]]:
    """Start a gateway that runs in a task of its own until ``gateway.stop()``
    (a test's setup and teardown run in different tasks, and the gateway's
    TaskGroup must be entered and left in one)."""
    started: asyncio.Future[Gateway] = asyncio.get_running_loop().create_future()

    async def hold() -> None:
        try:
            async with running_gateway(config, tokens) as gateway:
                started.set_result(gateway)
                await gateway.wait_stopped()
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            raise

    task = asyncio.create_task(hold(), name="test-gateway")
    _HELD.add(task)
    task.add_done_callback(_HELD.discard)
    return await started, task


#: The tasks serving the tests' gateways (kept referenced while they run).
_HELD: set[asyncio.Task[None]] = set()


@pytest.fixture
async def make_gateway(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """Start gateways on demand (``await make_gateway(limits={...})``); all stop at the end."""
    running: list[RunningGateway] = []

    async def factory(**kwargs: Any) -> RunningGateway:
        state_dir = kwargs.pop("state_dir", tmp_path / f"state{len(running)}")
        gw = await start_gateway(state_dir, **kwargs)
        running.append(gw)
        return gw

    yield factory
    for gw in running:
        await gw.close_clients()
        await gw.stopped()


@pytest.fixture
async def gw(make_gateway: GatewayFactory) -> RunningGateway:
    """One gateway on default limits."""
    return await make_gateway()
