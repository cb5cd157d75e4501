"""Fixtures of the cluster tests: real Redis processes, stopped by PID."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.cluster.redis_state import RedisState, open_redis_state
from tests.cluster.redisproc import RedisProcess, require_redis


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    require_redis()
    server = RedisProcess(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.resume() if server.proc and server.proc.poll() is None else None
        server.stop()


@pytest.fixture
async def shared(redis_server: RedisProcess) -> AsyncIterator[RedisState]:
    state = await open_redis_state(redis_server.url, timeout_ms=500)
    try:
        yield state
    finally:
        await state.close()
