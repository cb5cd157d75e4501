"""TaskHost: a task group held open between a start and a stop call."""

from __future__ import annotations

import asyncio

import pytest

from gateway.net.taskhost import TaskHost


async def test_stop_when_tasks_still_running_then_cancelled_and_awaited() -> None:
    host = TaskHost()
    group = await host.start()
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    task = group.create_task(forever())
    await started.wait()
    await host.stop()
    assert cancelled.is_set() and task.cancelled()


async def test_stop_when_a_task_failed_then_its_error_raised_and_siblings_cancelled() -> None:
    host = TaskHost()
    group = await host.start()
    sibling = group.create_task(asyncio.Event().wait())

    async def fail() -> None:
        raise ValueError("broken")

    failing = group.create_task(fail())
    await asyncio.wait([failing])
    with pytest.raises(ExceptionGroup) as caught:
        await host.stop()
    assert caught.group_contains(ValueError, match="broken")
    assert sibling.cancelled()


async def test_start_when_called_twice_then_refused_and_stop_is_idempotent() -> None:
    host = TaskHost()
    await host.start()
    with pytest.raises(RuntimeError):
        await host.start()
    await host.stop()
    await host.stop()
