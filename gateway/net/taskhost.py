"""A task group held open between two calls, for owners started and stopped apart."""

from __future__ import annotations

import asyncio

__all__ = ["TaskHost"]


class TaskHost:
    """An ``asyncio.TaskGroup`` open from ``start`` until ``stop``.

    For an owner whose lifetime is a ``start`` and a ``stop`` call rather
    than one ``async with`` block (the gateway today): ``start`` returns the
    group; tasks created in it run until they end or ``stop`` cancels them.
    As in any task group, a task failing with an error cancels the others,
    and ``stop`` raises that error (in an ``ExceptionGroup``).
    """

    def __init__(self) -> None:
        self._host: asyncio.Task[None] | None = None

    async def start(self) -> asyncio.TaskGroup:
        """Open the group (once) and return it."""
        if self._host is not None:
            raise RuntimeError("TaskHost.start called twice")
        ready: asyncio.Future[asyncio.TaskGroup] = asyncio.get_running_loop().create_future()
        # The one task outside a group: the group needs a task to live in.
        self._host = asyncio.get_running_loop().create_task(self._hold(ready), name="task-host")
        return await ready

    async def stop(self) -> None:
        """Cancel the tasks still running, wait for them, and close the group.

        Raises the ``ExceptionGroup`` of the tasks that failed with an error.
        """
        host, self._host = self._host, None
        if host is None:
            return
        host.cancel()
        await asyncio.wait([host])
        if not host.cancelled():
            error = host.exception()
            if error is not None:
                raise error

    @staticmethod
    async def _hold(ready: asyncio.Future[asyncio.TaskGroup]) -> None:
        async with asyncio.TaskGroup() as group:
            ready.set_result(group)
            await asyncio.Event().wait()  # until stop cancels this task
