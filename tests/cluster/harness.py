"""A real cluster on loopback for the tests and the benchmark: one Redis
process and N ``risk-gateway serve`` processes, each with its own state
directory, port and accounts; every process stopped by PID."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson

from tests.cluster.redisproc import RedisProcess, free_port

ADMIN = "admin-token"
TRADER = "trader-token"

MEMBER_CONFIG = """
[server]
host = "127.0.0.1"
port = {port}
heartbeat_s = 1

[persistence]
state_dir = "{state_dir}"
fsync = "always"

[limits]
max_exposure = "{max_exposure}"
max_account_exposure = "{max_exposure}"
max_order_notional = "{max_exposure}"
max_position = "1000000000"
max_order_qty = "1000000000"
max_orders_per_second = 1000000
reservation_ttl_ms = {reservation_ttl_ms}

[cluster]
redis_url = "{redis_url}"
name = "{name}"
accounts = [{accounts}]
public_url = "ws://127.0.0.1:{port}/v1/ws"
max_staleness_ms = {staleness_ms}
redis_timeout_ms = {redis_timeout_ms}

[[tokens]]
name = "ops-admin"
role = "admin"
token = "{admin}"

[[tokens]]
name = "desk"
role = "trader"
accounts = [{all_accounts}]
token = "{trader}"
"""


def _healthz(base: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=2) as answer:
            return cast(dict[str, Any], orjson.loads(answer.read()))
    except urllib.error.HTTPError as error:
        return cast(dict[str, Any], orjson.loads(error.read()))
    except OSError:
        return None


@dataclass
class MemberProcess:
    name: str
    accounts: tuple[str, ...]
    directory: Path
    port: int = field(default_factory=free_port)
    proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config(self) -> Path:
        return self.directory / "gateway.toml"

    @property
    def log(self) -> Path:
        return self.directory / "gateway.log"

    async def start(self, timeout: float = 30) -> None:
        """Start ``serve`` and wait until it listens (it joined the cluster first)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway",
                "serve",
                "--config",
                str(self.config),
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=env,
            )
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.proc.stdout.readline()).decode()
                if not line:
                    code = await self.proc.wait()
                    raise RuntimeError(
                        f"member {self.name} exited {code} before listening:\n"
                        + self.log.read_text(errors="replace")[-3000:]
                    )
                if line.startswith("risk-gateway listening on "):
                    break
        # Keep stdout drained so the process never blocks on a full pipe.
        self._drain = asyncio.ensure_future(self._drain_stdout())

    async def _drain_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while await self.proc.stdout.read(65536):
            pass

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def kill(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    async def stop(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await self.proc.wait()
            except TimeoutError:
                await self.kill()


class Cluster:
    """``Cluster(tmp, accounts={"m1": ("A1",), ...})``: configs written, nothing started."""

    def __init__(
        self,
        directory: Path,
        accounts: dict[str, tuple[str, ...]],
        *,
        max_exposure: str = "1000000",
        staleness_ms: int = 75,
        redis_timeout_ms: int = 1000,
        reservation_ttl_ms: int = 5000,
        redis_url: str | None = None,
        redis_urls: dict[str, str] | None = None,
        redis_port: int | None = None,
    ) -> None:
        """``redis_urls``: a member's own way to Redis (a proxy), by name."""
        self.directory = directory
        self.redis = RedisProcess(directory / "redis", port=redis_port)
        self.redis_url = redis_url or self.redis.url
        self.staleness_ms = staleness_ms
        self.members: dict[str, MemberProcess] = {}
        every = sorted(a for owned in accounts.values() for a in owned)
        for name, owned in accounts.items():
            member = MemberProcess(name, owned, directory / name)
            member.directory.mkdir(parents=True, exist_ok=True)
            member.config.write_text(
                MEMBER_CONFIG.format(
                    port=member.port,
                    state_dir=member.directory / "state",
                    max_exposure=max_exposure,
                    reservation_ttl_ms=reservation_ttl_ms,
                    redis_url=(redis_urls or {}).get(name, self.redis_url),
                    name=name,
                    accounts=", ".join(f'"{a}"' for a in owned),
                    staleness_ms=staleness_ms,
                    redis_timeout_ms=redis_timeout_ms,
                    admin=ADMIN,
                    all_accounts=", ".join(f'"{a}"' for a in every),
                    trader=TRADER,
                )
            )
            self.members[name] = member

    def owner_of(self, account: str) -> MemberProcess:
        return next(m for m in self.members.values() if account in m.accounts)

    async def start(self) -> Cluster:
        """Start Redis and every member; return once each member's
        ``/healthz`` lists every member alive (they know each other)."""
        self.redis.start()
        for member in self.members.values():
            await member.start()
        await self.settled()
        return self

    async def settled(self, timeout: float = 10) -> None:
        """Wait until every running member sees every running member alive."""
        running = {m.name for m in self.members.values() if m.running}
        async with asyncio.timeout(timeout):
            for member in self.members.values():
                if not member.running:
                    continue
                while True:
                    health = await asyncio.to_thread(_healthz, member.http)
                    alive = {
                        m["name"]
                        for m in (health or {}).get("cluster", {}).get("members", [])
                        if m["alive"]
                    }
                    if running <= alive:
                        break
                    await asyncio.sleep(0.02)

    async def stop(self) -> None:
        for member in self.members.values():
            await member.stop()
        self.redis.resume() if self.redis.proc and self.redis.proc.poll() is None else None
        self.redis.stop()

    def logs(self) -> str:
        return "\n".join(
            f"--- {m.name}\n" + m.log.read_text(errors="replace")[-4000:]
            for m in self.members.values()
            if m.log.exists()
        )
