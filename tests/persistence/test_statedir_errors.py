"""A state directory that cannot be opened stops start-up with one line, exit 2.

PROTOCOL section 9: read-only or without permissions, the start names the
directory and the reason; exit 1 stays "another gateway holds the lock".
Faults are real: a read-only tmpfs (as root), unmounted afterwards.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gwprocess import write_config


@contextlib.contextmanager
def read_only_mount(path: Path) -> Iterator[Path]:
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        (path / "state").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)
        yield path / "state"
    finally:
        subprocess.run(["umount", str(path)], capture_output=True, check=False)


def serve(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )


def test_serve_when_state_dir_read_only_then_one_line_naming_it_and_exit_2(
    tmp_path: Path,
) -> None:
    with read_only_mount(tmp_path / "mnt") as state_dir:
        config = write_config(tmp_path / "gw.toml", state_dir)
        done = serve(config)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert str(state_dir) in lines[0] and "read-only" in lines[0].lower()


def test_serve_when_state_dir_is_a_file_then_one_line_naming_it_and_exit_2(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    state_dir.write_text("not a directory")
    config = write_config(tmp_path / "gw.toml", state_dir)
    done = serve(config)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(state_dir) in lines[0], done.stderr
