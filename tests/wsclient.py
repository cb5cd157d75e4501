"""A small WebSocket client for the tests: requests matched by id, pushes queued."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect


class TestClient:
    """Sends requests, returns the response with the same id; pushes go to queues."""

    __test__ = False

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self.pushes: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self.unmatched: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(
        cls, url: str, token: str | None = None, *, origin: str | None = None, **kwargs: Any
    ) -> TestClient:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        ws = await connect(
            url,
            additional_headers=headers,
            origin=origin,  # type: ignore[arg-type]
            compression=None,
            **kwargs,
        )
        return cls(ws)

    def channel(self, name: str) -> asyncio.Queue[dict[str, Any]]:
        return self.pushes.setdefault(name, asyncio.Queue())

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for raw in self.ws:
                msg = orjson.loads(raw)
                if "channel" in msg:
                    self.channel(msg["channel"]).put_nowait(msg)
                    continue
                fut = self._waiting.pop(msg.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
                else:
                    self.unmatched.put_nowait(msg)
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError("connection closed"))

    async def call(
        self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 10
    ) -> dict[str, Any]:
        """The whole response envelope."""
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        frame: dict[str, Any] = {"id": rid, "method": method}
        if params is not None:
            frame["params"] = params
        self._waiting[rid] = fut
        try:
            await self.ws.send(orjson.dumps(frame), text=True)
        except BaseException:
            self._waiting.pop(rid, None)
            fut.cancel()
            raise
        async with asyncio.timeout(timeout):
            return await fut

    async def ok(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The result of a request that must succeed."""
        response = await self.call(method, params)
        assert response["status"] == "ok", response
        result: dict[str, Any] = response["result"]
        return result

    async def error(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The error of a request that must fail."""
        response = await self.call(method, params)
        assert response["status"] == "error", response
        error: dict[str, Any] = response["error"]
        return error

    async def send_raw(self, frame: bytes | str) -> dict[str, Any]:
        """Send any frame; return the next response that matched no pending id."""
        await self.ws.send(frame)
        async with asyncio.timeout(10):
            return await self.unmatched.get()

    async def next_push(self, channel: str, *, timeout: float = 5) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            return await self.channel(channel).get()

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader
