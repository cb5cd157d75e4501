"""Write-ahead journal, snapshots and crash recovery for the gateway's state.

The journal knows nothing about risk: a record payload is an opaque JSON-able dict,
a snapshot payload is one opaque dict holding the full state. The manager produces
both and replays them after :func:`recover`.

Start-up sequence::

    lock = lock_state_dir(state_dir)             # refuses a second gateway
    rec = recover(state_dir)                     # repairs a torn tail, reports damage
    ... rebuild the manager from rec.snapshot + rec.payloads; halt it if rec.damage ...
    journal = Journal(state_dir, rec, snapshot_source=manager.snapshot)
    await journal.start()
    seq = journal.append(payload); await journal.durable(seq)   # before acknowledging
    ...
    await journal.close(); lock.release()

Directory layout (``STATE_DIR``)::

    LOCK                                   flock(LOCK_EX|LOCK_NB) by the running gateway
    journal-<first_seq:020d>.log           append-only segments, one per run / snapshot
    snapshot-<seq:020d>.snap               full state as of <seq>; the newest two are kept
    snapshot-<seq:020d>.snap.tmp           a snapshot being written (removed by recovery)
    <name>.damaged-<ns>                    files set aside after a damaged recovery

All integers are little-endian.

Segment header, 20 bytes, written and fdatasync'ed (plus a directory fsync) before
the first frame goes in::

    b"RGJ1" | u32 version=2 | u64 first_seq | u32 crc32(previous 16 bytes)

After it come frames, one per group-commit batch (a batch whose payload would exceed
``MAX_FRAME_BYTES`` is split over several). A frame is 21 bytes of header then the
payload::

    u8 magic=0xA5 | u32 length | u32 crc32 | u64 first_seq | u32 count | payload[length]

The payload is a JSON array of ``count`` (at least one) orjson-encoded objects, the
records ``first_seq``, ``first_seq + 1``, ... ``first_seq + count - 1`` in order, so
every record has its own sequence number. ``crc32`` is ``zlib.crc32`` over
``first_seq``, ``count`` and the payload (the bytes that follow it) and checks every
record of the frame; ``length`` is checked by the CRC indirectly, since a wrong length
moves the range the CRC covers. A frame is the unit of checking: recovery keeps or
drops whole frames. Framing and decoding per batch rather than per record is what
keeps recovery fast. The magic is non-zero so that a zero-filled tail (a file that
grew before its data landed) never parses as a frame; note that ``zlib.crc32(b"") ==
0``, which is why the magic alone carries that guarantee. Frames in a segment carry
the records ``first_seq``, ``first_seq + 1``, ... of the segment with no gaps.

Snapshot file (version 2), 32 bytes of header, a checksum per 64 KiB block, the payload::

    b"RGS1" | u32 version=2 | u64 seq | u64 length | u32 block=65536 | u32 crc32(28 bytes)
    u32 crc32 of each block of the payload | u32 crc32 of those | payload[length]

so damage is reported at the block that holds it; ``seq`` must match the file name.
Version 1 (read still): ``b"RGS1" | u32 1 | u64 seq | u64 length | u32 crc32`` of the
first 24 header bytes and the payload, then the payload.

A snapshot is written to ``.tmp``, fsync'ed, renamed into place and the directory
fsync'ed; then a new segment ``journal-<seq+1>.log`` is started, the MANIFEST lists
them (and no longer what they retire), and only then are old files removed: segments
whose records are all covered by the *previous* snapshot, and snapshots older than the
previous one. Keeping one snapshot interval of
journal means a newest snapshot that later turns unreadable still recovers completely
(from the previous snapshot plus the journal), though it is reported as damage.

Recovery trusts the newest snapshot that validates, then requires the journal after it
to continue without gaps. A frame cut short by the end of the last segment (fewer bytes
left than a header, a length reaching past the end, or only zero bytes to the end) is
a torn tail: a crash mid-write, never reported durable, dropped and truncated away to
the end of the last whole frame. A whole frame that fails its checks is damage, the
last one included, and so is a length reaching past the end where a shorter length
makes a whole checksummed frame (the length field itself is damaged): see
``_cut_short``. Any other bad byte, gap or unreadable newest snapshot is damage:
recovery stops at the last good frame and the caller starts halted. Starting a
:class:`Journal` on a damaged recovery first snapshots the recovered state, then
renames the segments and unreadable snapshots to ``<name>.damaged-<ns>``
(evidence for the operator), so the directory is consistent again and later
recoveries are clean.

Durability policies (``fsync=``): ``"always"`` reports a record durable after the
fdatasync that covers it (group commit: one write and one fdatasync per batch);
``"interval"`` and ``"never"`` report it durable once ``write()`` returned, and
fdatasync every ``fsync_interval_ms`` or only when asked (:meth:`Journal.synced`),
respectively. Batches are lazy about records nobody waits for: ``append`` alone
does not wake the writer; ``durable``/``synced`` do, and so do
``LAZY_BATCH_RECORDS`` queued records or ``LAZY_BATCH_DELAY_S`` after the first.
Under ``"always"`` a batch is fdatasync'ed when someone waits for durability or
``fsync_interval_ms`` has passed, so a record that is never awaited (a
validation's audit record) is on disk within ``fsync_interval_ms``.

Any write, fsync or snapshot error fails the journal for good; fsync is never
retried, because after a failed fsync the kernel may have dropped the dirty pages
and a second fsync can succeed without the data.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import fcntl
import gc
import heapq
import itertools
import logging
import operator
import os
import re
import struct
import sys
import time
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal

import orjson

__all__ = [
    "Damage",
    "FileOps",
    "Journal",
    "PersistenceError",
    "Recovered",
    "StateDirLocked",
    "StateLock",
    "inspect_state_dir",
    "locate_record",
    "lock_state_dir",
    "recover",
]

log = logging.getLogger(__name__)

FsyncPolicy = Literal["always", "interval", "never"]

SEGMENT_VERSION: Final = 2  # 2: one frame of records per batch; 1 had a frame per record
SNAPSHOT_VERSION: Final = 2  # 2: a checksum per block; 1 (still read) had one in all
SEGMENT_MAGIC: Final = b"RGJ1"
SNAPSHOT_MAGIC: Final = b"RGS1"
FRAME_MAGIC: Final = 0xA5
# A length above this is treated as a corrupt length field rather than a frame, so a
# flipped high bit cannot make recovery swallow the rest of the file as one payload.
# The writer splits a batch over several frames rather than exceed it.
MAX_FRAME_BYTES: Final = 16 * 1024 * 1024
# One record alone must fit in a frame: its JSON plus the array's brackets.
MAX_RECORD_BYTES: Final = MAX_FRAME_BYTES - 2

_SEGMENT_HEADER = struct.Struct("<4sIQI")
_FRAME_HEADER = struct.Struct("<BIIQI")
_FRAME_TAIL = struct.Struct("<QI")  # first_seq, count: the CRC-covered part of the header
_SNAPSHOT_HEADER = struct.Struct("<4sIQQI")  # version 1
# Version 2: magic, version, seq, length, block size, crc32 of the 28 bytes before.
_SNAPSHOT_HEADER_V2 = struct.Struct("<4sIQQII")
SNAPSHOT_BLOCK_BYTES: Final = 64 * 1024
SEGMENT_HEADER_BYTES: Final = _SEGMENT_HEADER.size  # 20
FRAME_HEADER_BYTES: Final = _FRAME_HEADER.size  # 21
SNAPSHOT_HEADER_BYTES: Final = _SNAPSHOT_HEADER.size  # 28
# Offset inside a frame header where the CRC-covered bytes (first_seq, count, payload)
# start.
_CRC_START: Final = 9

# Records nobody waits for (a validation's audit record) do not wake the writer
# each: it is woken when someone awaits ``durable``/``synced``, when this many
# records are queued, or this long after the first record of a batch was queued.
LAZY_BATCH_RECORDS: Final = 1024
LAZY_BATCH_DELAY_S: Final = 0.005

_SEGMENT_RE = re.compile(r"journal-(\d{20})\.log")
_SNAPSHOT_RE = re.compile(r"snapshot-(\d{20})\.snap")
_TMP_SUFFIX: Final = ".tmp"
_LOCK_NAME: Final = "LOCK"
MANIFEST_NAME: Final = "MANIFEST"
MANIFEST_MAGIC: Final = b"RGM1"
MANIFEST_VERSION: Final = 1
_MANIFEST_HEADER = struct.Struct("<4sIII")  # magic, version, length, crc32 of the payload


def segment_name(first_seq: int) -> str:
    return f"journal-{first_seq:020d}.log"


def snapshot_name(seq: int) -> str:
    return f"snapshot-{seq:020d}.snap"


# --------------------------------------------------------------------------- errors


class PersistenceError(Exception):
    """A write/fsync/snapshot failed at run time; the journal is failed for good.

    No later record becomes durable; records reported durable before the failure stay
    durable. A record whose ``durable()`` raised is normally gone from disk too (the
    journal truncates back to the last acknowledged record), but if that clean-up also
    fails it can reappear at recovery: treat its outcome as unknown. The caller should
    halt, answer state-changing requests with ``UNAVAILABLE``, and restart to recover
    from disk.
    """


class StateDirLocked(Exception):
    """Another gateway holds STATE_DIR/LOCK."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True, kw_only=True)
class Damage:
    """Where and why a file of the state directory could not be used.

    ``file`` is relative to the state directory; ``offset`` is the byte offset of the
    record (or header) that failed to validate.
    """

    file: str
    offset: int
    detail: str

    def describe(self) -> str:
        """One line for an operator, e.g. ``journal-...log at offset 1234: checksum mismatch``."""
        return f"{self.file} at offset {self.offset}: {self.detail}"

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "offset": self.offset, "detail": self.detail}


@dataclass(frozen=True, slots=True, kw_only=True)
class Recovered:
    """What :func:`recover` found, ready to replay and to hand to :class:`Journal`.

    Replay ``snapshot`` (if any) then ``payloads`` in order: the records
    ``snapshot_seq + 1`` to ``last_seq``, without gaps. If ``damage`` is set the state
    is the last consistent point before it, and the caller must start halted.
    """

    snapshot: dict[str, Any] | None
    snapshot_seq: int
    # Payloads only: a million (seq, payload) tuples would cost recovery a tenth of
    # its time to build and have the cyclic collector scan them (the dicts are not
    # tracked by it).
    payloads: list[dict[str, Any]]
    last_seq: int
    damage: Damage | None
    torn_tail: Damage | None
    fresh: bool
    #: The live files (names) after recovery: what the MANIFEST lists and is
    #: present; without a MANIFEST, every snapshot and segment present.
    live_snapshots: tuple[str, ...] = ()
    live_segments: tuple[str, ...] = ()

    @property
    def records(self) -> list[tuple[int, dict[str, Any]]]:
        """The records to replay as (seq, payload) pairs (a new list on each call)."""
        seqs = range(self.snapshot_seq + 1, self.last_seq + 1)
        return list(zip(seqs, self.payloads, strict=True))


# --------------------------------------------------------------------------- file ops


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


def _write_all(ops: FileOps, fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = ops.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "write() wrote nothing")
        view = view[n:]


def _snapshot_default(value: object) -> str:
    if isinstance(value, Decimal):
        return str(value)  # exact: Decimal(str(d)) == d, digits and exponent kept
    raise TypeError(f"cannot store {type(value).__name__} in a snapshot")


def _snapshot_payload(state: dict[str, Any]) -> bytes:
    """Encode a captured state (in the writer thread). ``snapshot_source`` must
    return fresh containers whose leaves are immutable (str, int, Decimal...),
    since they are read here while the loop goes on."""
    return orjson.dumps(state, default=_snapshot_default)


def _snapshot_bytes(seq: int, payload: bytes) -> bytes:
    """A version-2 snapshot file: header, a crc32 per block of the payload (and one
    of that table), payload. Damage is then reported at the block that holds it."""
    block = SNAPSHOT_BLOCK_BYTES
    head = _SNAPSHOT_HEADER_V2.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, seq, len(payload), block, 0)
    head = head[:28] + zlib.crc32(head[:28]).to_bytes(4, "little")
    view = memoryview(payload)
    table = b"".join(
        zlib.crc32(view[at : at + block]).to_bytes(4, "little")
        for at in range(0, len(payload), block)
    )
    return head + table + zlib.crc32(table).to_bytes(4, "little") + payload


def _segment_header(first_seq: int) -> bytes:
    head = _SEGMENT_HEADER.pack(SEGMENT_MAGIC, SEGMENT_VERSION, first_seq, 0)
    return head[:16] + zlib.crc32(head[:16]).to_bytes(4, "little")


def _write_snapshot_file(ops: FileOps, state_dir: Path, seq: int, payload: bytes) -> None:
    final = state_dir / snapshot_name(seq)
    tmp = final.with_name(final.name + _TMP_SUFFIX)
    fd = ops.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        _write_all(ops, fd, _snapshot_bytes(seq, payload))
        ops.fsync(fd)
    finally:
        ops.close(fd)
    ops.replace(tmp, final)
    ops.fsync_dir(state_dir)


# --------------------------------------------------------------------------- lock


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

    Hold the returned lock for as long as the gateway runs; call :func:`recover` next.
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
    path = state_dir / _LOCK_NAME
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


# --------------------------------------------------------------------------- reading


@dataclass(slots=True, kw_only=True)
class _SnapshotInfo:
    name: str
    seq: int
    size: int
    payload: dict[str, Any] | None = None
    error: Damage | None = None


@dataclass(slots=True, kw_only=True)
class _SegmentInfo:
    name: str
    first_seq: int
    size: int = 0
    records: int = 0
    last_seq: int | None = None
    read: bool = False
    error: Damage | None = None


@dataclass(slots=True, kw_only=True)
class _Analysis:
    exists: bool
    snapshots: list[_SnapshotInfo] = field(default_factory=list)
    segments: list[_SegmentInfo] = field(default_factory=list)
    tmp_files: list[str] = field(default_factory=list)
    other_files: list[str] = field(default_factory=list)
    # What the MANIFEST lists (None: there is none, or it is unreadable), the
    # listed files that are missing, and snapshot and segment files it does not
    # list (left by an interrupted rotation; recovery removes them).
    manifest: dict[str, list[str]] | None = None
    missing: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)
    # Unlisted segments that hold records of the past (a snapshot retired them
    # and a crash came before their removal): renamed aside, not deleted.
    retired: list[str] = field(default_factory=list)
    snapshot: _SnapshotInfo | None = None
    payloads: list[dict[str, Any]] = field(default_factory=list)
    last_seq: int = 0
    damage: Damage | None = None
    torn_tail: Damage | None = None


def manifest_bytes(snapshots: list[str], segments: list[str]) -> bytes:
    """A MANIFEST listing the live ``snapshots`` and ``segments`` (file names)."""
    payload = orjson.dumps({"snapshots": snapshots, "segments": segments})
    head = _MANIFEST_HEADER.pack(MANIFEST_MAGIC, MANIFEST_VERSION, len(payload), 0)
    return head[:12] + zlib.crc32(payload).to_bytes(4, "little") + payload


def _read_manifest(path: Path) -> tuple[dict[str, list[str]] | None, str | None]:
    """(the MANIFEST's lists, None) or (None, why it is unusable)."""
    data = _read_bytes(path)
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
        or not all(_SNAPSHOT_RE.fullmatch(n) for n in snapshots)
        or not all(_SEGMENT_RE.fullmatch(n) for n in segments)
    ):
        return None, "MANIFEST does not list snapshot and segment files"
    return {"snapshots": snapshots, "segments": segments}, None


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _read_snapshot(path: Path, seq: int) -> tuple[dict[str, Any] | None, Damage | None]:
    name = path.name
    data = _read_bytes(path)
    if len(data) < SNAPSHOT_HEADER_BYTES:
        return None, Damage(file=name, offset=0, detail="truncated snapshot header")
    magic, version, head_seq, length, crc = _SNAPSHOT_HEADER.unpack_from(data)
    if magic != SNAPSHOT_MAGIC:
        return None, Damage(file=name, offset=0, detail="bad snapshot magic")
    if version == SNAPSHOT_VERSION:
        return _read_snapshot_v2(name, data, seq)
    if version != 1:
        return None, Damage(file=name, offset=4, detail=f"unsupported snapshot version {version}")
    if head_seq != seq:
        return None, Damage(
            file=name, offset=8, detail=f"snapshot header says seq {head_seq}, name says {seq}"
        )
    if length != len(data) - SNAPSHOT_HEADER_BYTES:
        return None, Damage(
            file=name,
            offset=16,
            detail=f"snapshot length {length} but {len(data) - SNAPSHOT_HEADER_BYTES} "
            "payload bytes present",
        )
    body = memoryview(data)[SNAPSHOT_HEADER_BYTES:]
    if zlib.crc32(body, zlib.crc32(memoryview(data)[:24])) != crc:
        return None, Damage(file=name, offset=0, detail="snapshot checksum mismatch")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, Damage(
            file=name, offset=SNAPSHOT_HEADER_BYTES, detail="undecodable snapshot payload"
        )
    if not isinstance(payload, dict):
        return None, Damage(
            file=name, offset=SNAPSHOT_HEADER_BYTES, detail="snapshot payload is not an object"
        )
    return payload, None


def _read_snapshot_v2(
    name: str, data: bytes, seq: int
) -> tuple[dict[str, Any] | None, Damage | None]:
    head = _SNAPSHOT_HEADER_V2
    if len(data) < head.size:
        return None, Damage(file=name, offset=0, detail="truncated snapshot header")
    _magic, _version, head_seq, length, block, crc = head.unpack_from(data)
    view = memoryview(data)
    if zlib.crc32(view[:28]) != crc:
        return None, Damage(file=name, offset=0, detail="snapshot header checksum mismatch")
    if head_seq != seq:
        return None, Damage(
            file=name, offset=8, detail=f"snapshot header says seq {head_seq}, name says {seq}"
        )
    blocks = -(-length // block) if block else -1
    start = head.size + 4 * blocks + 4
    if blocks < 0 or start + length != len(data):
        return None, Damage(
            file=name,
            offset=16,
            detail=f"snapshot length {length} does not match the file's {len(data)} bytes",
        )
    table = view[head.size : start - 4]
    if zlib.crc32(table) != int.from_bytes(view[start - 4 : start], "little"):
        return None, Damage(
            file=name, offset=head.size, detail="snapshot block checksum table mismatch"
        )
    for index in range(blocks):
        at = start + index * block
        expected = int.from_bytes(table[4 * index : 4 * index + 4], "little")
        if zlib.crc32(view[at : min(at + block, len(data))]) != expected:
            return None, Damage(
                file=name,
                offset=at,
                detail=f"snapshot checksum mismatch in the {block}-byte block at offset {at}",
            )
    body = view[start:]
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, Damage(file=name, offset=start, detail="undecodable snapshot payload")
    if not isinstance(payload, dict):
        return None, Damage(file=name, offset=start, detail="snapshot payload is not an object")
    return payload, None


def _frame_error(data: bytes, view: memoryview, off: int) -> str | None:
    """Why the bytes at ``off`` are not a complete, checksummed frame (None: they are)."""
    size = len(data)
    if size - off < FRAME_HEADER_BYTES:
        return "truncated frame header"
    magic, length, crc, _first, count = _FRAME_HEADER.unpack_from(data, off)
    if magic != FRAME_MAGIC:
        return "bad frame magic"
    if length > MAX_FRAME_BYTES:
        return f"implausible frame length {length}"
    end = off + FRAME_HEADER_BYTES + length
    if end > size:
        return "truncated frame"
    if zlib.crc32(view[off + _CRC_START : end]) != crc:
        return "checksum mismatch"
    if count == 0:
        return "frame holds no records"
    return None


def _cut_short(data: bytes, view: memoryview, off: int) -> bool:
    """Whether the bad frame at ``off`` is one a crash cut short: the end of the
    file comes before its header or its payload ends, or only zero bytes
    follow (a file that grew before its data landed).

    A frame that fits in the file is never cut short, whatever failed in it:
    one flipped bit is damage, never a silent loss of the frame's records. A
    header whose length reaches past the end is cut short unless the bytes
    that follow are a whole checksummed frame of some shorter length (then
    the length field itself is damaged).
    """
    size = len(data)
    if data.count(0, off) == size - off:
        return True
    if size - off < FRAME_HEADER_BYTES:
        return True
    _magic, length, crc, _first, _count = _FRAME_HEADER.unpack_from(data, off)
    if off + FRAME_HEADER_BYTES + length <= size or length > MAX_FRAME_BYTES:
        return False
    # Every place the payload (a JSON array) could end: one pass of the CRC.
    running = zlib.crc32(view[off + _CRC_START : off + FRAME_HEADER_BYTES])
    pos = off + FRAME_HEADER_BYTES
    end = data.find(b"]", pos)
    while end != -1:
        running = zlib.crc32(view[pos : end + 1], running)
        if running == crc:
            return False
        pos = end + 1
        end = data.find(b"]", pos)
    return True


def _valid_frame_after(data: bytes, start: int) -> bool:
    """Whether any complete, checksummed frame starts at or after ``start``.

    This is what separates a torn tail (a crash mid-write: nothing valid follows)
    from mid-log damage (valid frames follow the bad bytes).
    """
    view = memoryview(data)
    magic = bytes([FRAME_MAGIC])
    pos = data.find(magic, start)
    while pos != -1:
        if _frame_error(data, view, pos) is None:
            return True
        pos = data.find(magic, pos + 1)
    return False


def _segment_header_error(data: bytes, first_seq: int) -> str | None:
    if len(data) < SEGMENT_HEADER_BYTES:
        return "truncated segment header"
    magic, version, head_seq, crc = _SEGMENT_HEADER.unpack_from(data)
    if magic != SEGMENT_MAGIC:
        return "bad segment magic"
    if zlib.crc32(memoryview(data)[:16]) != crc:
        return "segment header checksum mismatch"
    if version != SEGMENT_VERSION:
        return f"unsupported segment version {version}"
    if head_seq != first_seq:
        return f"segment header says first seq {head_seq}, name says {first_seq}"
    return None


def _scan_segment(
    info: _SegmentInfo,
    data: bytes,
    *,
    expected: int,
    is_last: bool,
    out: list[dict[str, Any]],
) -> tuple[int, Damage | None, Damage | None]:
    """Validate one segment, appending to ``out`` the payloads of its records from seq
    ``expected`` on (from its first record, if that is later).

    Returns (next expected seq, damage, torn tail). The payloads appended are those of
    the records up to the next expected seq, without gaps.
    """
    name = info.name
    info.read = True
    info.size = len(data)
    header_error = _segment_header_error(data, info.first_seq)
    if header_error is not None:
        bad = Damage(file=name, offset=0, detail=header_error)
        info.error = bad
        if is_last and not _valid_frame_after(data, 0):
            return expected, None, bad
        return expected, bad, None

    view = memoryview(data)
    size = len(data)
    unpack = _FRAME_HEADER.unpack_from
    crc32 = zlib.crc32
    hdr = FRAME_HEADER_BYTES
    first_seq = info.first_seq
    seq_here = first_seq
    off = SEGMENT_HEADER_BYTES
    # Frame i spans bounds[i]..bounds[i + 1] and holds the records firsts[i]..
    # firsts[i + 1] - 1: frames are contiguous, so one offset and one seq per frame
    # are enough to find every payload again in pass 2.
    bounds = [off]
    firsts = [seq_here]
    mark = bounds.append
    mark_first = firsts.append
    # Pass 1, framing: inlines _frame_error's checks and lets unpack_from's
    # struct.error stand for "fewer than 21 bytes left".
    with contextlib.suppress(struct.error):
        while off < size:
            magic, length, crc, first, count = unpack(data, off)
            end = off + hdr + length
            if (
                magic == FRAME_MAGIC
                and first == seq_here
                and count
                and length <= MAX_FRAME_BYTES
                and end <= size
                and crc32(view[off + _CRC_START : end]) == crc
            ):
                seq_here += count
                off = end
                mark(end)
                mark_first(seq_here)
                continue
            break
    damage: Damage | None = None
    torn: Damage | None = None
    if off < size:
        detail = _frame_error(data, view, off)
        if detail is None:
            found = unpack(data, off)[3]
            damage = Damage(
                file=name,
                offset=off,
                detail=f"sequence discontinuity: expected seq {seq_here}, found {found}",
            )
        elif is_last and _cut_short(data, view, off) and not _valid_frame_after(data, off + 1):
            torn = Damage(file=name, offset=off, detail=detail)
        else:
            damage = Damage(file=name, offset=off, detail=detail)

    # Pass 2, decoding only the frames the caller needs: from the one holding
    # ``expected`` on (none when ``expected`` is past this segment).
    start = max(bisect.bisect_right(firsts, expected) - 1, 0)
    payloads, invalid = _decode_frames(view, bounds[start:], firsts[start:])
    if invalid is not None:
        # Checksummed but not a frame this journal writes: someone else wrote it.
        bad_offset, seq_here, why = invalid
        damage = Damage(file=name, offset=bad_offset, detail=why)
        torn = None
    if payloads:
        # The first frame may start before ``expected`` (covered by the snapshot).
        first_taken = max(firsts[start], expected)
        drop = first_taken - firsts[start]
        out.extend(itertools.islice(payloads, drop, None) if drop else payloads)
        expected = first_taken + len(payloads) - drop
    info.records = seq_here - first_seq
    info.last_seq = seq_here - 1 if info.records else None
    info.error = damage or torn
    return expected, damage, torn


def _decode_frames(
    view: memoryview, bounds: list[int], firsts: list[int]
) -> tuple[list[dict[str, Any]], tuple[int, int, str] | None]:
    """Decode the checksummed frames ``bounds[i]..bounds[i + 1]`` (records ``firsts[i]``..
    ``firsts[i + 1] - 1``) into one list of records.

    Returns the records and, when a frame is not a JSON array of as many objects as
    its header counts, (its offset, its first seq, why) with only the records of the
    frames before it.
    """
    hdr = FRAME_HEADER_BYTES
    loads = orjson.loads
    counts = list(map(operator.sub, firsts[1:], firsts))
    # The common case stays in C: one loads per frame, then whole-list checks.
    try:
        batches = [loads(view[a + hdr : b]) for a, b in itertools.pairwise(bounds)]
    except orjson.JSONDecodeError:
        batches = None
    if (
        batches is not None
        and set(map(type, batches)) <= {list}
        and list(map(len, batches)) == counts
    ):
        records: list[dict[str, Any]] = list(itertools.chain.from_iterable(batches))
        if set(map(type, records)) <= {dict}:
            return records, None
    # Something is wrong: find the first bad frame, keeping the frames before it.
    payloads: list[dict[str, Any]] = []
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        first, count = firsts[i], counts[i]
        try:
            batch = loads(view[a + hdr : b])
        except orjson.JSONDecodeError:
            batch = None
        if type(batch) is not list or len(batch) != count:
            return payloads, (a, first, f"frame payload is not a JSON array of {count} records")
        for j, record in enumerate(batch):
            if type(record) is not dict:
                return payloads, (a, first, f"record {first + j} payload is not a JSON object")
        payloads.extend(batch)
    raise AssertionError("no bad frame found")  # pragma: no cover


def _analyse(
    state_dir: Path, *, full: bool, unusable: Mapping[int, str] | None = None
) -> _Analysis:
    """Read the state directory without changing it.

    ``full`` reads every file (for inspection); otherwise files that recovery does not
    need are left unread.
    """
    # Decoding creates millions of small acyclic objects; letting the cyclic collector
    # rescan the growing record list over and over more than doubles recovery time.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _analyse_files(state_dir, full=full, unusable=unusable or {})
    finally:
        if gc_was_enabled:
            gc.enable()


def _analyse_files(state_dir: Path, *, full: bool, unusable: Mapping[int, str]) -> _Analysis:
    try:
        names = sorted(os.listdir(state_dir))
    except FileNotFoundError:
        return _Analysis(exists=False)
    result = _Analysis(exists=True)
    for name in names:
        if m := _SNAPSHOT_RE.fullmatch(name):
            size = (state_dir / name).stat().st_size
            result.snapshots.append(_SnapshotInfo(name=name, seq=int(m[1]), size=size))
        elif m := _SEGMENT_RE.fullmatch(name):
            result.segments.append(_SegmentInfo(name=name, first_seq=int(m[1])))
        elif name.endswith(_TMP_SUFFIX):
            result.tmp_files.append(name)
        elif name not in (_LOCK_NAME, MANIFEST_NAME):
            result.other_files.append(name)
    result.snapshots.sort(key=lambda s: s.seq, reverse=True)
    result.segments.sort(key=lambda s: s.first_seq)
    _apply_manifest(state_dir, names, result)

    for snap in result.snapshots:
        if result.snapshot is not None and not full:
            break
        if snap.seq in unusable:
            # Readable, but its state could not be applied (the caller's verdict).
            snap.payload = None
            snap.error = Damage(
                file=snap.name, offset=SNAPSHOT_HEADER_BYTES, detail=unusable[snap.seq]
            )
        else:
            snap.payload, snap.error = _read_snapshot(state_dir / snap.name, snap.seq)
        if snap.error is None:
            if result.snapshot is None:
                result.snapshot = snap
        elif result.snapshot is None and result.damage is None:
            # Only a snapshot newer than the one we use is damage: older ones are spares.
            result.damage = snap.error

    snapshot_seq = result.snapshot.seq if result.snapshot is not None else 0
    expected = snapshot_seq + 1
    stopped = False
    segments = result.segments
    for i, seg in enumerate(segments):
        is_last = i == len(segments) - 1
        next_first = None if is_last else segments[i + 1].first_seq
        covered = next_first is not None and next_first <= snapshot_seq + 1
        if stopped or covered:
            if full:
                seg_data = _read_bytes(state_dir / seg.name)
                _scan_segment(seg, seg_data, expected=1 << 64, is_last=is_last, out=[])
            else:
                seg.size = (state_dir / seg.name).stat().st_size
            continue
        data = _read_bytes(state_dir / seg.name)
        discontinuity = None
        if seg.first_seq > expected:
            discontinuity = (
                f"records {expected}..{seg.first_seq - 1} are missing "
                f"(segment starts at seq {seg.first_seq})"
            )
        elif seg.first_seq < expected and expected - 1 > snapshot_seq:
            discontinuity = (
                f"segment starts at seq {seg.first_seq}, overlapping records "
                f"up to {expected - 1} of the previous segment"
            )
        if discontinuity is not None:
            result.damage = result.damage or Damage(file=seg.name, offset=0, detail=discontinuity)
            stopped = True
            if full:
                _scan_segment(seg, data, expected=1 << 64, is_last=is_last, out=[])
            else:
                seg.size = len(data)
            continue
        expected, damage, torn = _scan_segment(
            seg, data, expected=expected, is_last=is_last, out=result.payloads
        )
        if damage is not None:
            result.damage = result.damage or damage
            stopped = True
        if torn is not None:
            result.torn_tail = torn
    result.last_seq = expected - 1
    return result


def _apply_manifest(state_dir: Path, names: list[str], result: _Analysis) -> None:
    """Keep only the files the MANIFEST lists, and report what it makes damage.

    A listed file that is missing is damage (deleting the newest segment must
    never silently lose what it held). A file the MANIFEST does not list is
    left over from a rotation a crash interrupted (it is listed only once
    complete): ignored, and removed by a repairing recovery; but an unlisted
    segment that holds a record was never written by this journal, so it is
    damage. Without a MANIFEST, a directory holding journal files is damage
    too (everything present is recovered, and the start halts); an empty one
    is a fresh start.
    """
    present = set(names)
    if MANIFEST_NAME not in present:
        holding = result.snapshots or any(
            (state_dir / seg.name).stat().st_size > SEGMENT_HEADER_BYTES for seg in result.segments
        )
        if not holding:
            # A first start that crashed before listing its first segment.
            result.unlisted = [seg.name for seg in result.segments]
            result.segments = []
        else:
            result.damage = Damage(
                file=MANIFEST_NAME,
                offset=0,
                detail="missing: the live snapshot and segments are not known "
                "(every journal file present is recovered)",
            )
        return
    manifest, why = _read_manifest(state_dir / MANIFEST_NAME)
    if manifest is None:
        result.damage = Damage(file=MANIFEST_NAME, offset=0, detail=str(why))
        return
    result.manifest = manifest
    listed = set(manifest["snapshots"]) | set(manifest["segments"])
    result.missing = [
        name for name in [*manifest["snapshots"], *manifest["segments"]] if name not in present
    ]
    if result.missing:
        result.damage = Damage(
            file=result.missing[-1],
            offset=0,
            detail="listed in the MANIFEST but missing",
        )
    result.unlisted = [snap.name for snap in result.snapshots if snap.name not in listed]
    result.snapshots = [snap for snap in result.snapshots if snap.name in listed]
    live = [seg for seg in result.segments if seg.name in listed]
    # Records of an unlisted segment from before the live journal were retired
    # by a snapshot; records after it were never written by this journal,
    # which lists a segment before it writes into it.
    boundary = max(
        [seg.first_seq for seg in live] + [snap.seq + 1 for snap in result.snapshots] + [1]
    )
    for seg in result.segments:
        if seg.name in listed:
            continue
        if (state_dir / seg.name).stat().st_size <= SEGMENT_HEADER_BYTES:
            result.unlisted.append(seg.name)
        elif seg.first_seq <= boundary:
            result.retired.append(seg.name)
        elif result.damage is None:
            result.damage = Damage(
                file=seg.name,
                offset=SEGMENT_HEADER_BYTES,
                detail="holds records the MANIFEST does not know of",
            )
    result.segments = live


def _recovered(analysis: _Analysis) -> Recovered:
    snap = analysis.snapshot
    return Recovered(
        snapshot=snap.payload if snap is not None else None,
        snapshot_seq=snap.seq if snap is not None else 0,
        payloads=analysis.payloads,
        last_seq=analysis.last_seq,
        damage=analysis.damage,
        torn_tail=analysis.torn_tail,
        fresh=(
            not analysis.snapshots
            and not analysis.payloads
            and analysis.damage is None
            and all(seg.records == 0 for seg in analysis.segments)
        ),
        live_snapshots=tuple(sorted(snap.name for snap in analysis.snapshots)),
        live_segments=tuple(seg.name for seg in analysis.segments),
    )


def _repair_torn_tail(ops: FileOps, state_dir: Path, torn: Damage) -> None:
    path = state_dir / torn.file
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if torn.offset < SEGMENT_HEADER_BYTES:
        # A segment without a whole header holds no record; removing it is the only way
        # to leave a directory whose every segment parses.
        ops.unlink(path)
        ops.fsync_dir(state_dir)
        return
    if size <= torn.offset:
        return
    fd = ops.open(path, os.O_WRONLY)
    try:
        ops.ftruncate(fd, torn.offset)
        ops.fdatasync(fd)
    finally:
        ops.close(fd)


def recover(
    state_dir: Path,
    *,
    repair: bool = True,
    ops: FileOps | None = None,
    unusable_snapshots: Mapping[int, str] | None = None,
) -> Recovered:
    """Read the newest valid snapshot and the journal after it.

    Call with the lock held (see :func:`lock_state_dir`). Never raises on file content:
    anything unusable is reported in ``damage`` (start halted) or ``torn_tail`` (a crash
    mid-write; the dropped record was never reported durable). With ``repair=True``
    leftover ``*.tmp`` files are deleted and a torn tail is truncated away (then
    fdatasync'ed); with ``repair=False`` nothing on disk changes. Raises ``OSError``
    only if the directory cannot be read or a repair step fails (calling again is safe).
    ``unusable_snapshots`` maps the seq of a snapshot that could be read but not
    applied to why: it is then treated as unreadable (damage, and the previous one
    is used). Next: replay, then build a :class:`Journal` from the result.
    """
    state_dir = Path(state_dir)
    analysis = _analyse(state_dir, full=False, unusable=unusable_snapshots)
    if repair and analysis.exists:
        ops = ops or FileOps()
        # Left by a step a crash interrupted: temporary files, and (when the
        # MANIFEST is sound) snapshot and segment files it never listed.
        leftovers = list(analysis.tmp_files)
        retired: list[str] = []
        if analysis.damage is None:
            leftovers += analysis.unlisted
            retired = analysis.retired
        stamp = time.time_ns()
        for name in retired:
            log.warning("%s holds retired records and is not listed: set aside", name)
            ops.replace(state_dir / name, state_dir / f"{name}.unlisted-{stamp}")
        for name in leftovers:
            ops.unlink(state_dir / name)
        if leftovers or retired:
            ops.fsync_dir(state_dir)
        if analysis.torn_tail is not None:
            _repair_torn_tail(ops, state_dir, analysis.torn_tail)
    return _recovered(analysis)


def locate_record(state_dir: Path, seq: int) -> tuple[str, int] | None:
    """The segment and the byte offset of the frame that holds record ``seq``
    (None when no readable segment holds it). Reads the directory, changes nothing."""
    analysis = _analyse(Path(state_dir), full=True)
    for seg in analysis.segments:
        if seg.last_seq is None or not seg.first_seq <= seq <= seg.last_seq:
            continue
        data = _read_bytes(Path(state_dir) / seg.name)
        off, first = SEGMENT_HEADER_BYTES, seg.first_seq
        while off + FRAME_HEADER_BYTES <= len(data):
            _magic, length, _crc, _first, count = _FRAME_HEADER.unpack_from(data, off)
            if first <= seq < first + count:
                return seg.name, off
            off += FRAME_HEADER_BYTES + length
            first += count
    return None


def inspect_state_dir(state_dir: Path) -> dict[str, Any]:
    """Describe a state directory without locking or changing it.

    Keys: ``state_dir``, ``exists``, ``fresh``, ``snapshots`` (each ``file``, ``seq``,
    ``bytes``, ``valid`` and, when invalid, ``error``), ``segments`` (each ``file``,
    ``first_seq``, ``last_seq``, ``records``, ``bytes`` and, when a record failed,
    ``error``), ``records`` (how many journal records recovery would replay),
    ``first_seq``/``last_seq`` (of those records; ``last_seq`` falls back to the
    snapshot's), ``snapshot_seq``, ``damage`` and ``torn_tail`` (exactly what
    :func:`recover` would report, as dicts), ``snapshot_payload``, ``tail_payloads``,
    ``tmp_files``, ``other_files``, ``manifest`` (its lists, or None), ``missing``
    (listed files that are not there) and ``unlisted`` (snapshot and segment files it
    does not list).
    """
    state_dir = Path(state_dir)
    for attempt in range(5):
        try:
            analysis = _analyse(state_dir, full=True)
            break
        except FileNotFoundError:
            # A running gateway removed a file between listing and reading (inspection
            # does not take the lock); look again.
            if attempt == 4:
                raise
    recovered = _recovered(analysis)
    snapshots = []
    for snap in sorted(analysis.snapshots, key=lambda s: s.seq):
        entry: dict[str, Any] = {
            "file": snap.name,
            "seq": snap.seq,
            "bytes": snap.size,
            "valid": snap.error is None and snap.payload is not None,
        }
        if snap.error is not None:
            entry["error"] = snap.error.as_dict()
        snapshots.append(entry)
    segments = []
    for seg in analysis.segments:
        seg_entry: dict[str, Any] = {
            "file": seg.name,
            "first_seq": seg.first_seq,
            "last_seq": seg.last_seq,
            "records": seg.records,
            "bytes": seg.size,
        }
        if seg.error is not None:
            seg_entry["error"] = seg.error.as_dict()
        segments.append(seg_entry)
    return {
        "state_dir": str(state_dir),
        "exists": analysis.exists,
        "fresh": recovered.fresh,
        "snapshots": snapshots,
        "segments": segments,
        "records": len(recovered.payloads),
        "first_seq": recovered.snapshot_seq + 1 if recovered.payloads else None,
        "last_seq": recovered.last_seq,
        "snapshot_seq": recovered.snapshot_seq,
        "damage": recovered.damage.as_dict() if recovered.damage else None,
        "torn_tail": recovered.torn_tail.as_dict() if recovered.torn_tail else None,
        "snapshot_payload": recovered.snapshot,
        "tail_payloads": list(recovered.payloads),
        "tmp_files": analysis.tmp_files,
        "other_files": analysis.other_files,
    }


# --------------------------------------------------------------------------- writer


@dataclass(slots=True)
class _SnapshotRequest:
    seq: int
    # The state as captured on the loop; encoded by the writer thread.
    payload: dict[str, Any]
    waiter: asyncio.Future[None] | None


@dataclass(slots=True)
class _Progress:
    """What one writer batch achieved; filled in by the writer thread, read on the loop
    only after the batch returned (or raised), so no locking is needed."""

    written_seq: int
    synced_seq: int
    records: int = 0
    bytes: int = 0
    fsyncs: int = 0
    fsync_seconds: float = 0.0
    snapshots: list[_SnapshotRequest] = field(default_factory=list)


# A record as append() queues it (its orjson encoding, not yet framed) or a snapshot.
_Item = bytes | _SnapshotRequest


# Who waits for a seq: a future (``durable``/``synced``) or a callback
# (``when_durable``).
_Waiter = asyncio.Future[None] | Callable[[PersistenceError | None], None]


def _call(
    callback: Callable[[PersistenceError | None], None], error: PersistenceError | None
) -> None:
    try:
        callback(error)
    except Exception:
        log.exception("durability callback raised")


def _frames(bodies: list[bytes], first_seq: int) -> list[bytes]:
    """The frames holding encoded records ``bodies`` (seqs from ``first_seq``), as pieces
    to join: one frame, unless the payload would exceed ``MAX_FRAME_BYTES``."""
    pieces: list[bytes] = []
    if sum(map(len, bodies)) + len(bodies) + 1 <= MAX_FRAME_BYTES:
        _frame(pieces, bodies, first_seq)
        return pieces
    start = 0
    size = 1  # the payload's size so far: "[", and each body with its "," or "]"
    for i, body in enumerate(bodies):
        if i > start and size + len(body) + 1 > MAX_FRAME_BYTES:
            _frame(pieces, bodies[start:i], first_seq + start)
            start, size = i, 1
        size += len(body) + 1
    _frame(pieces, bodies[start:], first_seq + start)
    return pieces


def _frame(pieces: list[bytes], bodies: list[bytes], first_seq: int) -> None:
    """Append one frame of ``bodies`` to ``pieces``: header, then the JSON array."""
    tail = _FRAME_TAIL.pack(first_seq, len(bodies))
    joined = b",".join(bodies)
    crc = zlib.crc32(b"]", zlib.crc32(joined, zlib.crc32(b"[", zlib.crc32(tail))))
    head = _FRAME_HEADER.pack(FRAME_MAGIC, len(joined) + 2, crc, first_seq, len(bodies))
    pieces += (head, b"[", joined, b"]")


class Journal:
    """The single writer of a state directory.

    Build it from :func:`recover`'s result, ``await start()``, then ``append`` records
    and ``await durable(seq)`` before acknowledging what they record. On the first
    write, fsync or snapshot error the journal fails for good (see
    :class:`PersistenceError`); ``on_failure`` is called once, on the loop.
    """

    def __init__(
        self,
        state_dir: Path,
        recovered: Recovered,
        *,
        fsync: FsyncPolicy = "always",
        fsync_interval_ms: int = 100,
        snapshot_every: int = 100_000,
        snapshot_source: Callable[[], dict[str, Any]],
        on_failure: Callable[[PersistenceError], None] | None = None,
        ops: FileOps | None = None,
        on_batch: Callable[[int, float | None], None] | None = None,
    ) -> None:
        if fsync not in ("always", "interval", "never"):
            raise ValueError(f"fsync must be 'always', 'interval' or 'never', not {fsync!r}")
        if fsync_interval_ms <= 0:
            raise ValueError("fsync_interval_ms must be positive")
        if snapshot_every <= 0:
            raise ValueError("snapshot_every must be positive")
        self._dir = Path(state_dir)
        self._recovered = recovered
        self._policy: FsyncPolicy = fsync
        self._interval_s = fsync_interval_ms / 1000
        self._snapshot_every = snapshot_every
        self._snapshot_source = snapshot_source
        self._on_failure = on_failure
        self._on_batch = on_batch
        self._ops = ops or FileOps()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-writer")

        # Loop-side state.
        self._last_seq = recovered.last_seq
        self._written_seq = recovered.last_seq
        self._synced_seq = recovered.last_seq
        self._planned_seq = recovered.last_seq
        self._queue: list[_Item] = []
        self._inflight: list[_Item] = []  # the batch the writer thread is working on
        # Counted from the snapshot, across restarts: a gateway that crashes
        # before every snapshot would otherwise never take one.
        self._since_snapshot = recovered.last_seq - recovered.snapshot_seq
        self._last_snapshot_seq = recovered.snapshot_seq
        self._snapshot_scheduled = False
        self._durable_waiters: list[tuple[int, int, _Waiter]] = []
        self._synced_waiters: list[tuple[int, int, _Waiter]] = []
        self._tiebreak = itertools.count()
        self._sync_due = False
        self._stopping = False
        self._started = False
        self._closed = False
        self._failed: PersistenceError | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._lazy_wake: asyncio.TimerHandle | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._timer_task: asyncio.Task[None] | None = None
        self._close_task: asyncio.Task[None] | None = None
        self._stats: dict[str, Any] = {
            "records_written": 0,
            "bytes_written": 0,
            "fsyncs": 0,
            "batches": 0,
            "last_batch_records": 0,
            "fsync_seconds_total": 0.0,
            "snapshots": 0,
        }

        # Writer-thread state: touched only by jobs running in self._executor.
        self._fd = -1
        self._seg_first_seq = 0
        self._seg_written = 0  # bytes of the current segment written successfully
        self._seg_synced = 0  # bytes of the current segment covered by an fdatasync
        self._seg_acked = 0  # bytes of the current segment already reported durable
        # The files the MANIFEST lists, in order (snapshots oldest first).
        self._live_snapshots = list(recovered.live_snapshots)
        self._live_segments = list(recovered.live_segments)

    # ------------------------------------------------------------------ properties

    @property
    def last_seq(self) -> int:
        """Seq of the last appended record (durable or not)."""
        return self._last_seq

    @property
    def durable_seq(self) -> int:
        """Every record up to this seq is as durable as the policy promises."""
        return self._synced_seq if self._policy == "always" else self._written_seq

    @property
    def synced_seq(self) -> int:
        """Every record up to this seq has been fdatasync'ed."""
        return self._synced_seq

    @property
    def failed(self) -> PersistenceError | None:
        """The error that failed the journal, or None while it works."""
        return self._failed

    @property
    def stats(self) -> dict[str, Any]:
        """Counters for metrics (a copy): records_written, bytes_written, fsyncs, batches,
        last_batch_records, fsync_seconds_total, snapshots."""
        return dict(self._stats)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open a new segment and start the writer; then ``append`` may be called.

        If the recovery reported damage, first writes a snapshot of ``snapshot_source()``
        at ``last_seq`` and renames every segment and unreadable snapshot to
        ``<name>.damaged-<ns>`` (kept for the operator), so the directory is consistent
        again. Put the state into its halted mode *before* calling ``start`` so the
        snapshot carries it. Raises :class:`PersistenceError` (after ``on_failure``) if
        the directory cannot be prepared.
        """
        if self._started:
            raise RuntimeError("journal already started")
        if self._closed:
            raise RuntimeError("journal is closed")
        self._loop = asyncio.get_running_loop()
        rescue: _SnapshotRequest | None = None
        if self._recovered.damage is not None:
            rescue = _SnapshotRequest(self._last_seq, self._encode_snapshot(), None)
        self._started = True
        try:
            await self._loop.run_in_executor(self._executor, self._open_first_segment, rescue)
        except Exception as exc:
            self._fail(PersistenceError(f"cannot open the journal in {self._dir}: {exc}"), exc)
            raise self._caller_error() from exc
        if rescue is not None:
            self._last_snapshot_seq = rescue.seq
            self._stats["snapshots"] += 1
        self._writer_task = asyncio.create_task(self._writer(), name="journal-writer")
        if self._policy != "never":
            # Under "always" too: records nobody waits for are fsynced by it.
            self._timer_task = asyncio.create_task(self._interval_timer(), name="journal-fsync")

    async def close(self, *, snapshot: bool = True) -> None:
        """Write everything queued, fsync it, optionally snapshot, and release all resources.

        Idempotent. Raises :class:`PersistenceError` (after releasing everything) if the
        journal failed at any time, so a shutdown can tell a clean stop from a lossy one.
        """
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close(snapshot))
        await asyncio.shield(self._close_task)

    async def _close(self, snapshot: bool) -> None:
        self._closed = True
        source_error: Exception | None = None
        if self._writer_task is not None:
            if snapshot and self._failed is None and self._last_seq > self._last_snapshot_seq:
                try:
                    self._queue_snapshot(None)
                except Exception as exc:  # the caller's bug; still drain what is queued
                    source_error = exc
            self._stopping = True
            self._wake.set()
            # The writer turns its own errors into a failure; here we only wait for it.
            await asyncio.wait([self._writer_task])
        if self._timer_task is not None:
            self._timer_task.cancel()
        loop = asyncio.get_running_loop()
        # Queued behind any job still running, so the fd is not closed under a write.
        await loop.run_in_executor(self._executor, self._close_fd)
        self._executor.shutdown(wait=False)
        self._fail_waiters(lambda: RuntimeError("journal closed"))
        if self._failed is not None:
            raise self._caller_error() from self._failed
        if source_error is not None:
            raise source_error

    # ------------------------------------------------------------------ appending

    def append(self, payload: Mapping[str, Any]) -> int:
        """Queue a record and return its seq; it is not durable until ``durable(seq)`` returns.

        Synchronous and O(1). Raises :class:`PersistenceError` if the journal failed
        (answer ``UNAVAILABLE``), ``TypeError`` if orjson cannot encode the payload,
        ``RuntimeError`` before ``start`` or after ``close``.
        """
        if self._failed is not None:
            raise self._caller_error() from self._failed
        if not self._started or self._closed:
            raise RuntimeError("journal is not running (call start() first; not after close())")
        body = orjson.dumps(payload)
        length = len(body)
        if length > MAX_RECORD_BYTES:
            raise ValueError(f"record payload of {length} bytes exceeds {MAX_RECORD_BYTES}")
        seq = self._last_seq + 1
        queue = self._queue
        queue.append(body)  # framed by the writer thread, per batch (_frames)
        self._last_seq = seq
        if len(queue) >= LAZY_BATCH_RECORDS:
            self._wake.set()
        elif self._lazy_wake is None:
            assert self._loop is not None
            self._lazy_wake = self._loop.call_later(LAZY_BATCH_DELAY_S, self._wake_writer)
        self._since_snapshot += 1
        if self._since_snapshot >= self._snapshot_every and not self._snapshot_scheduled:
            self._snapshot_scheduled = True
            # Deferred to the end of the current callback, so a caller that appends all
            # records of one state change in a row is snapshotted after the last one.
            assert self._loop is not None
            self._loop.call_soon(self._scheduled_snapshot)
        return seq

    async def durable(self, seq: int) -> None:
        """Return once record ``seq`` is as durable as the policy promises.

        ``"always"``: fdatasync'ed; ``"interval"``/``"never"``: written to the OS. Raises
        :class:`PersistenceError` if the write or fsync covering it failed. Cancelling the
        caller does not cancel or undo the write.
        """
        if seq <= self.durable_seq:
            return
        self._wake.set()
        await self._wait(self._durable_waiters, seq)

    def when_durable(self, seq: int, callback: Callable[[PersistenceError | None], None]) -> None:
        """Call ``callback(None)`` once record ``seq`` is durable, as ``durable`` would
        return; ``callback(error)`` if it never will be.

        For a caller with many records in flight (a connection's acknowledgements),
        this costs a heap entry instead of a task and a future per record. The
        callback runs on the loop, at once if ``seq`` is durable already, else from
        the journal's bookkeeping: it must be quick, and what it raises is logged.
        Raises like ``durable`` for a seq never appended or a closed journal.
        """
        if self._failed is not None:
            _call(callback, self._caller_error())
            return
        if seq > self._last_seq:
            raise ValueError(f"seq {seq} was never appended (last is {self._last_seq})")
        if seq <= self.durable_seq:
            _call(callback, None)
            return
        if self._closed and self._close_task is not None and self._close_task.done():
            raise RuntimeError("journal closed")
        heapq.heappush(self._durable_waiters, (seq, next(self._tiebreak), callback))
        self._wake.set()

    def when_synced(self, seq: int, callback: Callable[[PersistenceError | None], None]) -> None:
        """Call ``callback(None)`` once record ``seq`` is fdatasync'ed, whatever the
        policy (as ``synced`` would return); ``callback(error)`` if it never will be.

        Callbacks for the same or lower seqs run in seq order, before the
        futures of ``synced`` callers of the same seq resume. Otherwise as
        ``when_durable``.
        """
        if self._failed is not None:
            _call(callback, self._caller_error())
            return
        if seq > self._last_seq:
            raise ValueError(f"seq {seq} was never appended (last is {self._last_seq})")
        if seq <= self._synced_seq:
            _call(callback, None)
            return
        if self._closed and self._close_task is not None and self._close_task.done():
            raise RuntimeError("journal closed")
        heapq.heappush(self._synced_waiters, (seq, next(self._tiebreak), callback))
        self._wake.set()

    async def synced(self, seq: int) -> None:
        """Return once record ``seq`` is fdatasync'ed, whatever the policy.

        Under ``"interval"``/``"never"`` this makes the writer fsync promptly rather than
        at the next interval. Raises :class:`PersistenceError` like :meth:`durable`.
        """
        if seq <= self._synced_seq:
            return
        self._wake.set()
        await self._wait(self._synced_waiters, seq)

    async def snapshot_now(self) -> None:
        """Snapshot ``snapshot_source()`` at ``last_seq`` and wait until it is durable and
        the files it makes redundant are removed. Raises :class:`PersistenceError` on failure."""
        if self._failed is not None:
            raise self._caller_error() from self._failed
        if not self._started or self._closed:
            raise RuntimeError("journal is not running")
        if self._last_seq <= self._last_snapshot_seq:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue_snapshot(waiter)
        await waiter

    # ------------------------------------------------------------------ loop internals

    async def _wait(self, heap: list[tuple[int, int, _Waiter]], seq: int) -> None:
        if self._failed is not None:
            raise self._caller_error() from self._failed
        if seq > self._last_seq:
            raise ValueError(f"seq {seq} was never appended (last is {self._last_seq})")
        if self._closed and self._close_task is not None and self._close_task.done():
            raise RuntimeError("journal closed")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(heap, (seq, next(self._tiebreak), fut))
        await fut

    def _caller_error(self) -> PersistenceError:
        # A fresh instance per raise: re-raising one shared instance from many tasks
        # would keep growing its traceback.
        return PersistenceError(str(self._failed))

    def _encode_snapshot(self) -> dict[str, Any]:
        # Only the capture runs on the loop; encoding a large state would stall
        # it, so the writer thread does that (see _snapshot_payload).
        state = self._snapshot_source()
        if not isinstance(state, dict):
            raise TypeError(f"snapshot_source() returned {type(state).__name__}, not a dict")
        return state

    def _queue_snapshot(self, waiter: asyncio.Future[None] | None) -> None:
        request = _SnapshotRequest(self._last_seq, self._encode_snapshot(), waiter)
        self._queue.append(request)
        self._last_snapshot_seq = request.seq
        self._since_snapshot = 0
        self._wake.set()

    def _scheduled_snapshot(self) -> None:
        self._snapshot_scheduled = False
        if self._failed is not None or self._closed or self._last_seq <= self._last_snapshot_seq:
            return
        try:
            self._queue_snapshot(None)
        except Exception as exc:
            # No caller to hand this to; without snapshots the state could not be
            # compacted or trusted, so fail closed like any other snapshot error.
            self._fail(PersistenceError(f"snapshot_source failed: {exc!r}"), exc)

    async def _interval_timer(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            if self._written_seq > self._synced_seq or self._queue:
                self._sync_due = True
                self._wake.set()

    def _wake_writer(self) -> None:
        self._lazy_wake = None
        self._wake.set()

    def _want_sync(self) -> bool:
        # Under "always", an fsync is owed to whoever waits for durability; the
        # records nobody waits for are fsynced by the interval timer.
        return (
            bool(self._synced_waiters)
            or (self._policy == "always" and bool(self._durable_waiters))
            or self._sync_due
            or self._stopping
        )

    async def _writer(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._lazy_wake is not None:
                    self._lazy_wake.cancel()
                    self._lazy_wake = None
                if self._failed is not None:
                    return
                sync = self._want_sync()
                if not self._queue and not (sync and self._written_seq > self._synced_seq):
                    if self._stopping:
                        return
                    continue
                items, self._queue = self._queue, []
                self._inflight = items
                if sync:
                    self._sync_due = False
                progress = _Progress(written_seq=self._written_seq, synced_seq=self._synced_seq)
                first_seq = self._planned_seq + 1
                self._planned_seq += sum(1 for item in items if type(item) is bytes)
                try:
                    await loop.run_in_executor(
                        self._executor, self._run_batch, items, first_seq, sync, progress
                    )
                except OSError as exc:
                    self._absorb(progress)
                    self._fail(PersistenceError(f"journal write failed: {exc}"), exc)
                    return
                self._absorb(progress)
                self._inflight = []
                if self._stopping and not self._queue:
                    # One more pass so a final fsync-only batch is not skipped.
                    self._wake.set()
        except asyncio.CancelledError:
            self._fail(PersistenceError("journal writer was cancelled"), None)
            raise
        except BaseException as exc:
            self._fail(PersistenceError(f"journal writer crashed: {exc!r}"), exc)

    def _absorb(self, progress: _Progress) -> None:
        stats = self._stats
        stats["batches"] += 1
        if self._failed is not None:
            # Failed elsewhere while this batch ran: waiters were already told it is
            # lost, so durable_seq must not move past what they were told.
            return
        self._written_seq = max(self._written_seq, progress.written_seq)
        self._synced_seq = max(self._synced_seq, progress.synced_seq)
        stats["records_written"] += progress.records
        stats["bytes_written"] += progress.bytes
        stats["fsyncs"] += progress.fsyncs
        stats["fsync_seconds_total"] += progress.fsync_seconds
        stats["last_batch_records"] = progress.records
        stats["snapshots"] += len(progress.snapshots)
        if self._on_batch is not None and (progress.records or progress.fsyncs):
            # Per batch, for latency histograms: records written (0 for an
            # fsync-only batch) and, when the batch was fsynced, the time its
            # fsync took.
            self._on_batch(progress.records, progress.fsync_seconds if progress.fsyncs else None)
        for request in progress.snapshots:
            if request.waiter is not None and not request.waiter.done():
                request.waiter.set_result(None)
        self._release(self._durable_waiters, self.durable_seq)
        self._release(self._synced_waiters, self._synced_seq)

    @staticmethod
    def _release(heap: list[tuple[int, int, _Waiter]], upto: int) -> None:
        while heap and heap[0][0] <= upto:
            waiter = heapq.heappop(heap)[2]
            if not isinstance(waiter, asyncio.Future):
                _call(waiter, None)
            elif not waiter.done():  # a cancelled caller left its future behind
                waiter.set_result(None)

    def _fail_waiters(self, make: Callable[[], PersistenceError | RuntimeError]) -> None:
        for heap in (self._durable_waiters, self._synced_waiters):
            waiters = [waiter for _seq, _n, waiter in heap]
            heap.clear()
            for waiter in waiters:
                if not isinstance(waiter, asyncio.Future):
                    error = make()
                    if not isinstance(error, PersistenceError):  # closed meanwhile
                        error = PersistenceError(f"record not made durable: {error}")
                    _call(waiter, error)
                elif not waiter.done():
                    waiter.set_exception(make())
        for item in itertools.chain(self._inflight, self._queue):
            if isinstance(item, _SnapshotRequest) and item.waiter and not item.waiter.done():
                item.waiter.set_exception(make())

    def _fail(self, err: PersistenceError, cause: BaseException | None) -> None:
        if self._failed is not None:
            return
        err.__cause__ = cause
        self._failed = err
        log.error(
            "journal failed; nothing after seq %d will become durable: %s", self.durable_seq, err
        )
        self._fail_waiters(self._caller_error)
        if self._timer_task is not None:
            self._timer_task.cancel()
        self._wake.set()  # let an idle writer notice and exit
        if self._on_failure is not None:
            try:
                self._on_failure(err)
            except Exception:
                log.exception("journal on_failure callback raised")

    # ------------------------------------------------------------------ thread side

    def _open_first_segment(self, rescue: _SnapshotRequest | None) -> None:
        ops = self._ops
        torn = self._recovered.torn_tail
        if rescue is None and torn is not None:
            # Idempotent: recover(repair=True) already did this; recover(repair=False)
            # did not, and a new segment after an untruncated torn tail would turn it
            # into mid-log damage.
            _repair_torn_tail(ops, self._dir, torn)
        if rescue is not None:
            stamp = time.time_ns()
            clash = self._dir / snapshot_name(rescue.seq)
            if clash.exists() and _read_snapshot(clash, rescue.seq)[1] is not None:
                # Keep the unreadable snapshot for the operator instead of overwriting it.
                ops.replace(clash, clash.with_name(f"{clash.name}.damaged-{stamp}"))
            _write_snapshot_file(ops, self._dir, rescue.seq, _snapshot_payload(rescue.payload))
            # The snapshot alone is the state now: listed before anything is
            # set aside, so no crash can find a listed file missing.
            self._live_snapshots = [snapshot_name(rescue.seq)]
            self._live_segments = []
            self._write_manifest()
            # Only now that the snapshot covering them is durable may segments go.
            self._set_aside_unusable_files(rescue.seq, stamp)
        self._new_segment(self._last_seq + 1)
        self._write_manifest()

    def _set_aside_unusable_files(self, keep_snapshot_seq: int, stamp: int) -> None:
        ops = self._ops
        for name in sorted(os.listdir(self._dir)):
            unusable = _SEGMENT_RE.fullmatch(name) is not None
            if (m := _SNAPSHOT_RE.fullmatch(name)) and int(m[1]) != keep_snapshot_seq:
                _payload, error = _read_snapshot(self._dir / name, int(m[1]))
                unusable = error is not None
            if unusable:
                ops.replace(self._dir / name, self._dir / f"{name}.damaged-{stamp}")
        ops.fsync_dir(self._dir)

    def _new_segment(self, first_seq: int) -> None:
        ops = self._ops
        path = self._dir / segment_name(first_seq)
        # O_TRUNC: a file of this name can only be a segment that a crashed run created
        # and never got a record into (recovery would otherwise have gone past it).
        fd = ops.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
        try:
            _write_all(ops, fd, _segment_header(first_seq))
            ops.fdatasync(fd)
            ops.fsync_dir(self._dir)
        except BaseException:
            ops.close(fd)
            raise
        if self._fd >= 0:
            ops.close(self._fd)
        self._fd = fd
        self._seg_first_seq = first_seq
        self._seg_written = self._seg_synced = self._seg_acked = SEGMENT_HEADER_BYTES
        # Live once the MANIFEST says so: nothing is written to it before.
        if path.name not in self._live_segments:
            self._live_segments.append(path.name)

    def _write_manifest(self) -> None:
        """List the live files: a temporary file, fsynced, renamed over the
        MANIFEST, the directory fsynced (a crash leaves the old or the new)."""
        ops = self._ops
        final = self._dir / MANIFEST_NAME
        tmp = final.with_name(MANIFEST_NAME + _TMP_SUFFIX)
        fd = ops.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            _write_all(ops, fd, manifest_bytes(self._live_snapshots, self._live_segments))
            ops.fsync(fd)
        finally:
            ops.close(fd)
        ops.replace(tmp, final)
        ops.fsync_dir(self._dir)

    def _close_fd(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(OSError):
                self._ops.close(fd)

    def _sync(self, progress: _Progress) -> None:
        if self._seg_synced == self._seg_written:
            progress.synced_seq = progress.written_seq
            return
        started = time.perf_counter()
        try:
            self._ops.fdatasync(self._fd)
        except BaseException:
            if self._policy == "always":
                self._truncate_to_acked()
            raise
        progress.fsyncs += 1
        progress.fsync_seconds += time.perf_counter() - started
        self._seg_synced = self._seg_written
        progress.synced_seq = progress.written_seq
        if self._policy == "always":
            self._seg_acked = self._seg_synced

    def _truncate_to_acked(self) -> None:
        # Records whose callers are about to be told "failed" must not come back at the
        # next recovery, and a half-written record should not wait for recovery to be
        # noticed. Best effort: the journal is failing anyway.
        with contextlib.suppress(OSError):
            self._ops.ftruncate(self._fd, self._seg_acked)

    def _run_batch(
        self, items: list[_Item], first_seq: int, sync: bool, progress: _Progress
    ) -> None:
        seq = first_seq - 1
        run: list[bytes] = []
        for item in items:
            if type(item) is bytes:
                run.append(item)
                seq += 1
                continue
            assert isinstance(item, _SnapshotRequest)
            self._write_run(run, seq, progress)
            run = []
            self._take_snapshot(item, progress)
        self._write_run(run, seq, progress)
        if sync:
            self._sync(progress)

    def _write_run(self, run: list[bytes], last_seq: int, progress: _Progress) -> None:
        if not run:
            return
        data = b"".join(_frames(run, last_seq - len(run) + 1))
        try:
            _write_all(self._ops, self._fd, data)
        except BaseException:
            self._truncate_to_acked()
            raise
        self._seg_written += len(data)
        if self._policy != "always":
            self._seg_acked = self._seg_written
        progress.written_seq = last_seq
        progress.records += len(run)
        progress.bytes += len(data)

    def _take_snapshot(self, request: _SnapshotRequest, progress: _Progress) -> None:
        ops = self._ops
        # The old segment must hold every record <= seq durably before a snapshot makes
        # it redundant; syncing it now also keeps it free of torn tails.
        self._sync(progress)
        _write_snapshot_file(ops, self._dir, request.seq, _snapshot_payload(request.payload))
        if self._seg_first_seq != request.seq + 1:
            self._new_segment(request.seq + 1)
        name = snapshot_name(request.seq)
        if name not in self._live_snapshots:
            self._live_snapshots.append(name)
        # The MANIFEST lists the new files and no longer the redundant ones;
        # only then do those go (a crash in between leaves unlisted leftovers).
        doomed = self._retire(request.seq)
        self._write_manifest()
        for name in doomed:
            ops.unlink(self._dir / name)
        if doomed:
            ops.fsync_dir(self._dir)
        progress.snapshots.append(request)

    def _retire(self, newest_seq: int) -> list[str]:
        """Take the files a new snapshot at ``newest_seq`` makes redundant off
        the live lists; returns their names."""
        snapshot_seqs = sorted(int(name[9:29]) for name in self._live_snapshots)
        older = [s for s in snapshot_seqs if s < newest_seq]
        if not older:
            return []
        # Keep the journal back to the previous snapshot, so losing the newest one to a
        # bad sector still recovers everything from the previous one plus the journal.
        previous = older[-1]
        firsts = sorted(int(name[8:28]) for name in self._live_segments)
        doomed: list[str] = []
        for first, following in itertools.pairwise(firsts):
            if following <= previous + 1 and first != self._seg_first_seq:
                doomed.append(segment_name(first))
        doomed.extend(snapshot_name(s) for s in older[:-1])
        gone = set(doomed)
        self._live_snapshots = [n for n in self._live_snapshots if n not in gone]
        self._live_segments = [n for n in self._live_segments if n not in gone]
        return doomed
