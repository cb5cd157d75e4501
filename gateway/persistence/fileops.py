"""The one door through which persistence changes files.

Every call that changes a file goes through a :class:`FileOps`, so a test can
count calls or inject faults by subclassing it; reading and listing (which
change nothing) use the standard library directly.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from pathlib import Path

__all__ = ["FileOps", "write_all"]


class FileOps:
    """Every call the journal makes that changes files goes through one instance.

    Subclass it to count calls or inject faults. Reading and listing (which change
    nothing) use the standard library directly.
    """

    def open(self, path: Path, flags: int, mode: int = 0o644) -> int:
        return os.open(path, flags | os.O_CLOEXEC, mode)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        return os.write(fd, data)

    def fdatasync(self, fd: int) -> None:
        if sys.platform == "darwin":  # plain fsync does not flush the drive cache there
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
        else:
            os.fdatasync(fd)

    def fsync(self, fd: int) -> None:
        if sys.platform == "darwin":
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
        else:
            os.fsync(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def close(self, fd: int) -> None:
        os.close(fd)

    def replace(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_all(ops: FileOps, fd: int, data: bytes | memoryview) -> None:
    """Write every byte of ``data`` (``write`` may write less); raises ``OSError``."""
    view = memoryview(data)
    while view:
        n = ops.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "write() wrote nothing")
        view = view[n:]
