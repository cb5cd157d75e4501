"""Run ``risk-gateway serve`` as a real subprocess (for crash and signal tests)."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sys
from pathlib import Path

CONFIG = """
[server]
host = "127.0.0.1"
port = 0
heartbeat_s = 1

[persistence]
state_dir = "{state_dir}"
fsync = "{fsync}"
snapshot_every = {snapshot_every}

[limits]
max_exposure = "1000000000000"
max_account_exposure = "1000000000000"

[[tokens]]
name = "ops-admin"
role = "admin"
token = "admin-token"

[[tokens]]
name = "desk-1"
role = "trader"
accounts = ["A1", "A2"]
token = "trader-token"
"""


def write_config(
    path: Path, state_dir: Path, *, fsync: str = "always", snapshot_every: int = 100_000
) -> Path:
    path.write_text(CONFIG.format(state_dir=state_dir, fsync=fsync, snapshot_every=snapshot_every))
    return path


class GatewayProcess:
    """A gateway subprocess; ``url`` is read from its start-up line."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str) -> None:
        self.proc = proc
        self.url = url

    @classmethod
    async def start(
        cls, config: Path, *extra: str, timeout: float = 20, fd_limit: int | None = None
    ) -> GatewayProcess:
        """Start ``serve``; ``fd_limit`` lowers its soft and hard open-file limits."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}

        def limit_fds() -> None:
            if fd_limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(config),
            *extra,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            preexec_fn=limit_fds if fd_limit is not None else None,
        )
        assert proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    err = b"" if proc.stderr is None else await proc.stderr.read()
                    raise RuntimeError(f"gateway exited before listening: {err.decode()}")
                if line.startswith("risk-gateway listening on "):
                    url = line.split()[3]
                    return cls(proc, url)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float = 20) -> int:
        async with asyncio.timeout(timeout):
            return await self.proc.wait()

    async def stderr_text(self) -> str:
        assert self.proc.stderr is not None
        return (await self.proc.stderr.read()).decode()
