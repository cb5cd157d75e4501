"""The benchmark's baseline: a plain websockets server that answers like the gateway.

``python -m clients.echo [--host H] [--port 0]`` prints
``echo listening on ws://HOST:PORT/v1/ws`` on stdout once it accepts
connections and serves until SIGTERM or SIGINT.

It has the gateway's transport settings (uvloop, no compression, the same
``max_size`` and keepalive, ``recv(decode=False)`` and ``send(bytes,
text=True)``) and does the JSON work a request costs at the edges: it reads
each frame with ``orjson.loads`` and answers with ``orjson.dumps`` of a
response shaped and sized like a gateway DECISION. Everything the gateway
does on top of that (checking, routing, the risk decision, the journal, the
fan-out, metrics) is what ``riskctl bench`` compares against this server.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

import orjson
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

# The gateway's defaults (server.max_message_bytes, keepalive).
MAX_MESSAGE_BYTES = 65536
PING_INTERVAL_S = 20

# A DECISION as the gateway answers a typical accepted order.
DECISION: dict[str, Any] = {
    "decision": "accept",
    "reasons": [],
    "reservation_id": None,
    "expires_at": None,
    "exposure": {
        "account": "100000",
        "account_limit": "1000000000000",
        "global": "100000",
        "global_limit": "1000000000000",
    },
    "emergency_version": 0,
    "limits_version": 1,
}


async def _answer(ws: ServerConnection) -> None:
    dumps, loads = orjson.dumps, orjson.loads
    try:
        while True:
            frame = await ws.recv(decode=False)
            try:
                request = loads(frame)
                rid = request.get("id") if type(request) is dict else None
            except orjson.JSONDecodeError:
                rid = None
            await ws.send(dumps({"id": rid, "status": "ok", "result": DECISION}), text=True)
    except ConnectionClosed:
        pass


async def serve_echo(host: str, port: int) -> None:
    """Serve until SIGTERM/SIGINT; prints the listening line first."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(
        _answer,
        host,
        port,
        compression=None,
        max_size=MAX_MESSAGE_BYTES,
        ping_interval=PING_INTERVAL_S,
        ping_timeout=PING_INTERVAL_S,
    ) as server:
        bound = next(iter(server.sockets)).getsockname()
        print(f"echo listening on ws://{bound[0]}:{bound[1]}/v1/ws", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.echo", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 for any free port")
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.run(serve_echo(args.host, args.port))
    except ImportError:  # pragma: no cover - uvloop is a Linux dependency
        asyncio.run(serve_echo(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
