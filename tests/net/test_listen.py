"""A gateway that cannot listen says so and exits, releasing what it opened."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def serve(port: int, state_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--state-dir",
            str(state_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )


def test_serve_when_port_in_use_then_one_line_naming_the_address_and_exit_2(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve(port, tmp_path / "state")
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("risk-gateway: cannot listen on 127.0.0.1:"), last
    assert str(port) in last and "in use" in last, last
