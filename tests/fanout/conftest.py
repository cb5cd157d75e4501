"""Every fan-out test runs its outboxes on a fake connection in a real task group."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.fanout import Flusher
from gateway.net.taskhost import TaskHost
from tests.fanout.builders import current, patch_wsio


@pytest.fixture(autouse=True)
def fake_wsio(monkeypatch: pytest.MonkeyPatch) -> None:
    patch_wsio(monkeypatch)


@pytest.fixture(autouse=True)
async def outbox_tasks() -> AsyncIterator[None]:
    """A fresh flusher and the task group of the test's outboxes; a task that
    let an error out into the group fails the test at teardown."""
    host = TaskHost()
    current.flusher = Flusher()
    current.tasks = await host.start()
    yield
    current.tasks = None
    await host.stop()
