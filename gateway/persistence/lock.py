"""The state directory's lock: one gateway per directory.

``flock(LOCK_EX | LOCK_NB)`` on ``STATE_DIR/LOCK``: a second gateway is refused
at once, and the lock goes with the process however it ends.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType
from typing import Final

from gateway.persistence.fileops import FileOps

__all__ = ["LOCK_NAME", "StateDirLocked", "StateLock", "lock_state_dir"]

LOCK_NAME: Final = "LOCK"


class StateDirLocked(Exception):
    """Another gateway holds STATE_DIR/LOCK."""


class StateLock:
    """An exclusive hold on ``STATE_DIR/LOCK``; released by :meth:`release` or process exit."""

    def __init__(self, path: Path, fd: int) -> None:
        self._path = path
        self._fd = fd

    @property
    def path(self) -> Path:
        return self._path

    def release(self) -> None:
        """Drop the lock (idempotent). Close the journal first."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)  # closing the open file description releases the flock

    def __enter__(self) -> StateLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def lock_state_dir(state_dir: Path) -> StateLock:
    """Create ``state_dir`` if missing and lock it, or raise :class:`StateDirLocked` at once.

    Hold the returned lock for as long as the gateway runs; call
    :func:`~gateway.persistence.recovery.recover` next.
    """
    state_dir = Path(state_dir)
    created = []
    ancestor = state_dir
    while not ancestor.exists():
        created.append(ancestor)
        ancestor = ancestor.parent
    state_dir.mkdir(parents=True, exist_ok=True)
    for directory in reversed(created):
        # A new directory is only durable once its parent is fsync'ed; otherwise a power
        # cut could remove the whole state directory and the next start would be fresh.
        FileOps().fsync_dir(directory.parent)
    path = state_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateDirLocked(
            f"another gateway holds the state directory {state_dir} (lock file {path})"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return StateLock(path, fd)
