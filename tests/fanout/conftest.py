"""Every fan-out test runs its outboxes on a fake connection in a real task group."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.fanout import Flusher
from tests.fanout.builders import current, patch_wsio


@pytest.fixture(autouse=True)
def fake_wsio(monkeypatch: pytest.MonkeyPatch) -> None:
    patch_wsio(monkeypatch)


@pytest.fixture(autouse=True)
async def outbox_tasks() -> AsyncIterator[None]:
    """A fresh flusher and the task group of the test's outboxes, held open by
    a task standing in for the connection handler (a fixture's setup and
    teardown run in different tasks); a task that let an error out into the
    group fails the test at teardown."""
    ready: asyncio.Future[asyncio.TaskGroup] = asyncio.get_running_loop().create_future()

    async def connection_handler() -> None:
        async with asyncio.TaskGroup() as tasks:
            ready.set_result(tasks)
            await asyncio.Event().wait()  # until the test ends

    handler = asyncio.create_task(connection_handler())
    current.flusher = Flusher()
    current.tasks = await ready
    yield
    current.tasks = None
    handler.cancel()
    await asyncio.wait([handler])
    if not handler.cancelled():
        raise AssertionError("a task of the outboxes' group failed") from handler.exception()
