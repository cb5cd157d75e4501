"""Snapshot files: the whole state as of one record, written atomically.

A snapshot is written to ``snapshot-<seq>.snap.tmp``, fsync'ed, renamed into
place and the directory fsync'ed, so a crash leaves either no snapshot or a
whole one (and a ``.tmp`` file recovery removes). The byte format is in
:mod:`gateway.persistence.framing`.
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from gateway.persistence.errors import Damage
from gateway.persistence.fileops import FileOps, write_all
from gateway.persistence.framing import TMP_SUFFIX, parse_snapshot, snapshot_bytes, snapshot_name

__all__ = ["encode_state", "read_snapshot", "write_snapshot_file"]


def _snapshot_default(value: object) -> str:
    if isinstance(value, Decimal):
        return str(value)  # exact: Decimal(str(d)) == d, digits and exponent kept
    raise TypeError(f"cannot store {type(value).__name__} in a snapshot")


def encode_state(state: dict[str, Any]) -> bytes:
    """Encode a captured state (in the writer thread). The state must be made of
    fresh containers whose leaves are immutable (str, int, Decimal...), since they
    are read here while the loop goes on."""
    return orjson.dumps(state, default=_snapshot_default)


def read_snapshot(path: Path, seq: int) -> tuple[dict[str, Any] | None, Damage | None]:
    """The state the snapshot file at ``path`` (for ``seq``) holds: (state, None),
    or (None, where and why it is unusable). Raises ``OSError`` when unreadable."""
    with open(path, "rb") as f:
        data = f.read()
    return parse_snapshot(path.name, data, seq)


def write_snapshot_file(ops: FileOps, state_dir: Path, seq: int, payload: bytes) -> None:
    """Durably write the encoded state ``payload`` as the snapshot at ``seq``
    (replacing one of that name). Raises ``OSError``; a failure leaves at most a
    ``.tmp`` file behind."""
    final = state_dir / snapshot_name(seq)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    fd = ops.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        write_all(ops, fd, snapshot_bytes(seq, payload))
        ops.fsync(fd)
    finally:
        ops.close(fd)
    ops.replace(tmp, final)
    ops.fsync_dir(state_dir)
