"""A gateway whose open-file limit is low keeps its journal working under a socket flood.

A real subprocess with soft and hard ``RLIMIT_NOFILE`` of 256 gets 1,100
half-open handshakes (more than its whole limit). The journal must keep
writing and snapshotting, and a client with a valid token must still connect
(docs/protocol.md, section 1).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from urllib.parse import urlsplit

import orjson

from tests.gwprocess import GatewayProcess, write_config
from tests.wsclient import TestClient

FD_LIMIT = 256
FLOOD = 1100


async def http_get(host: str, port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_fd_limit_when_more_half_open_handshakes_than_fds_then_journal_and_clients_work(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "gw.toml", tmp_path / "state", snapshot_every=50)
    proc = await GatewayProcess.start(config, fd_limit=FD_LIMIT)
    url = urlsplit(proc.url)
    host, port = url.hostname or "127.0.0.1", url.port or 0
    flood: list[asyncio.StreamWriter] = []
    try:
        async with asyncio.timeout(120):
            for _ in range(FLOOD):
                _reader, writer = await asyncio.open_connection(host, port)
                writer.write(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n")  # and never the rest
                flood.append(writer)
            trader = await TestClient.open(proc.url, "trader-token")
            admin = await TestClient.open(proc.url, "admin-token")
            # Enough acknowledged updates for several snapshots (snapshot_every 50).
            for n in range(1, 201):
                params = {"account": "A1", "symbol": f"S{n % 7}", "qty": str(n), "price": "10"}
                await trader.ok("position.update", params)
            halted = await admin.ok("emergency.set", {"mode": "halted", "reason": "drill"})
            assert halted["mode"] == "halted"
            status, body = await http_get(host, port, "/healthz")
            assert status == 200, body
            assert orjson.loads(body) == {"status": "ok", "mode": "halted"}
            await trader.close()
            await admin.close()
    finally:
        for writer in flood:
            writer.close()
        proc.terminate()
        with contextlib.suppress(TimeoutError):
            await proc.wait()
        if proc.proc.returncode is None:
            proc.kill()
    log = await proc.stderr_text()
    assert "Too many open files" not in log
    assert "persistence failure" not in log
    state = tmp_path / "state"
    assert any(path.name.startswith("snapshot") for path in state.iterdir()), list(state.iterdir())
