"""The MANIFEST: which snapshots and segments are live.

A file is listed before anything is written into it and unlisted before it is
removed, so a listed file that is missing is damage (deleting the newest
segment never silently loses what it held), and a file the MANIFEST does not
list is a leftover of a step a crash interrupted. Format, little-endian::

    b"RGM1" | u32 version=1 | u32 length | u32 crc32(payload) | payload[length]

where the payload is ``{"snapshots": [names], "segments": [names]}`` in JSON.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Final

import orjson

from gateway.persistence.fileops import FileOps, write_all
from gateway.persistence.framing import SEGMENT_RE, SNAPSHOT_RE, TMP_SUFFIX

__all__ = ["MANIFEST_NAME", "manifest_bytes", "read_manifest", "write_manifest"]

MANIFEST_NAME: Final = "MANIFEST"
MANIFEST_MAGIC: Final = b"RGM1"
MANIFEST_VERSION: Final = 1
_MANIFEST_HEADER = struct.Struct("<4sIII")  # magic, version, length, crc32 of the payload


def manifest_bytes(snapshots: list[str], segments: list[str]) -> bytes:
    """A MANIFEST listing the live ``snapshots`` and ``segments`` (file names)."""
    payload = orjson.dumps({"snapshots": snapshots, "segments": segments})
    head = _MANIFEST_HEADER.pack(MANIFEST_MAGIC, MANIFEST_VERSION, len(payload), 0)
    return head[:12] + zlib.crc32(payload).to_bytes(4, "little") + payload


def read_manifest(path: Path) -> tuple[dict[str, list[str]] | None, str | None]:
    """(the MANIFEST's lists, None) or (None, why it is unusable)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _MANIFEST_HEADER.size:
        return None, "truncated MANIFEST header"
    magic, version, length, crc = _MANIFEST_HEADER.unpack_from(data)
    if magic != MANIFEST_MAGIC:
        return None, "bad MANIFEST magic"
    if version != MANIFEST_VERSION:
        return None, f"unsupported MANIFEST version {version}"
    payload = memoryview(data)[_MANIFEST_HEADER.size :]
    if length != len(payload) or zlib.crc32(payload) != crc:
        return None, "MANIFEST checksum mismatch"
    try:
        lists = orjson.loads(payload)
        snapshots, segments = lists["snapshots"], lists["segments"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None, "undecodable MANIFEST"
    names = [*snapshots, *segments] if isinstance(snapshots, list) else None
    if (
        names is None
        or not isinstance(segments, list)
        or not all(isinstance(n, str) for n in names)
        or not all(SNAPSHOT_RE.fullmatch(n) for n in snapshots)
        or not all(SEGMENT_RE.fullmatch(n) for n in segments)
    ):
        return None, "MANIFEST does not list snapshot and segment files"
    return {"snapshots": snapshots, "segments": segments}, None


def write_manifest(
    ops: FileOps, state_dir: Path, snapshots: list[str], segments: list[str]
) -> None:
    """List the live files: a temporary file, fsynced, renamed over the
    MANIFEST, the directory fsynced (a crash leaves the old or the new)."""
    final = state_dir / MANIFEST_NAME
    tmp = final.with_name(MANIFEST_NAME + TMP_SUFFIX)
    fd = ops.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        write_all(ops, fd, manifest_bytes(snapshots, segments))
        ops.fsync(fd)
    finally:
        ops.close(fd)
    ops.replace(tmp, final)
    ops.fsync_dir(state_dir)
