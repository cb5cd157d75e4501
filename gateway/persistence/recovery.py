"""Reading a state directory back: the newest valid snapshot and the journal after it.

Recovery trusts the newest snapshot that validates, then requires the journal after it
to continue without gaps. A frame cut short by the end of the last segment (fewer bytes
left than a header, a length reaching past the end, or only zero bytes to the end) is
a torn tail: a crash mid-write, never reported durable, dropped and truncated away to
the end of the last whole frame. A whole frame that fails its checks is damage, the
last one included, and so is a length reaching past the end where a shorter length
makes a whole checksummed frame (the length field itself is damaged): see
``_cut_short``. Any other bad byte, gap or unreadable newest snapshot is damage:
recovery stops at the last good frame and the caller starts halted. Starting a
:class:`~gateway.persistence.journal.Journal` on a damaged recovery first snapshots
the recovered state, then renames the segments and unreadable snapshots to
``<name>.damaged-<ns>`` (evidence for the operator), so the directory is consistent
again and later recoveries are clean.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import itertools
import logging
import operator
import os
import struct
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from gateway.persistence.errors import Damage
from gateway.persistence.fileops import FileOps
from gateway.persistence.framing import (
    CRC_START,
    FRAME_HEADER,
    FRAME_HEADER_BYTES,
    FRAME_MAGIC,
    MAX_FRAME_BYTES,
    SEGMENT_HEADER_BYTES,
    SEGMENT_RE,
    SNAPSHOT_HEADER_BYTES,
    SNAPSHOT_RE,
    TMP_SUFFIX,
    frame_error,
    segment_header_error,
)
from gateway.persistence.lock import LOCK_NAME
from gateway.persistence.manifest import MANIFEST_NAME, read_manifest
from gateway.persistence.snapshots import read_snapshot

__all__ = [
    "Analysis",
    "Damage",
    "Recovered",
    "SegmentInfo",
    "analyse",
    "locate_record",
    "read_bytes",
    "recover",
    "recovered_from",
    "repair_torn_tail",
    "scan_segment",
]

log = logging.getLogger("gateway.journal")


@dataclass(frozen=True, slots=True, kw_only=True)
class Recovered:
    """What :func:`recover` found, ready to replay and to hand to a ``Journal``.

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


@dataclass(slots=True, kw_only=True)
class SnapshotInfo:
    name: str
    seq: int
    size: int
    payload: dict[str, Any] | None = None
    error: Damage | None = None


@dataclass(slots=True, kw_only=True)
class SegmentInfo:
    """One segment file as a scan found it (filled in by :func:`scan_segment`)."""

    name: str
    first_seq: int
    size: int = 0
    records: int = 0
    last_seq: int | None = None
    read: bool = False
    error: Damage | None = None


@dataclass(slots=True, kw_only=True)
class Analysis:
    """A state directory as read, before anything is repaired."""

    exists: bool
    snapshots: list[SnapshotInfo] = field(default_factory=list)
    segments: list[SegmentInfo] = field(default_factory=list)
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
    snapshot: SnapshotInfo | None = None
    payloads: list[dict[str, Any]] = field(default_factory=list)
    last_seq: int = 0
    damage: Damage | None = None
    torn_tail: Damage | None = None


def read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# --------------------------------------------------------------------------- segments


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
    _magic, length, crc, _first, _count = FRAME_HEADER.unpack_from(data, off)
    if off + FRAME_HEADER_BYTES + length <= size or length > MAX_FRAME_BYTES:
        return False
    # Every place the payload (a JSON array) could end: one pass of the CRC.
    running = zlib.crc32(view[off + CRC_START : off + FRAME_HEADER_BYTES])
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
        if frame_error(data, view, pos) is None:
            return True
        pos = data.find(magic, pos + 1)
    return False


def scan_segment(
    info: SegmentInfo,
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
    header_error = segment_header_error(data, info.first_seq)
    if header_error is not None:
        bad = Damage(file=name, offset=0, detail=header_error)
        info.error = bad
        if is_last and not _valid_frame_after(data, 0):
            return expected, None, bad
        return expected, bad, None

    view = memoryview(data)
    size = len(data)
    unpack = FRAME_HEADER.unpack_from
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
    # Pass 1, framing: inlines frame_error's checks and lets unpack_from's
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
                and crc32(view[off + CRC_START : end]) == crc
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
        detail = frame_error(data, view, off)
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


# --------------------------------------------------------------------------- the directory


def analyse(state_dir: Path, *, full: bool, unusable: Mapping[int, str] | None = None) -> Analysis:
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


def _analyse_files(state_dir: Path, *, full: bool, unusable: Mapping[int, str]) -> Analysis:
    try:
        names = sorted(os.listdir(state_dir))
    except FileNotFoundError:
        return Analysis(exists=False)
    result = Analysis(exists=True)
    for name in names:
        if m := SNAPSHOT_RE.fullmatch(name):
            size = (state_dir / name).stat().st_size
            result.snapshots.append(SnapshotInfo(name=name, seq=int(m[1]), size=size))
        elif m := SEGMENT_RE.fullmatch(name):
            result.segments.append(SegmentInfo(name=name, first_seq=int(m[1])))
        elif name.endswith(TMP_SUFFIX):
            result.tmp_files.append(name)
        elif name not in (LOCK_NAME, MANIFEST_NAME):
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
            snap.payload, snap.error = read_snapshot(state_dir / snap.name, snap.seq)
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
                seg_data = read_bytes(state_dir / seg.name)
                scan_segment(seg, seg_data, expected=1 << 64, is_last=is_last, out=[])
            else:
                seg.size = (state_dir / seg.name).stat().st_size
            continue
        data = read_bytes(state_dir / seg.name)
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
                scan_segment(seg, data, expected=1 << 64, is_last=is_last, out=[])
            else:
                seg.size = len(data)
            continue
        expected, damage, torn = scan_segment(
            seg, data, expected=expected, is_last=is_last, out=result.payloads
        )
        if damage is not None:
            result.damage = result.damage or damage
            stopped = True
        if torn is not None:
            result.torn_tail = torn
    result.last_seq = expected - 1
    return result


def _apply_manifest(state_dir: Path, names: list[str], result: Analysis) -> None:
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
    manifest, why = read_manifest(state_dir / MANIFEST_NAME)
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


def recovered_from(analysis: Analysis) -> Recovered:
    """What recovery reports for ``analysis``."""
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


def repair_torn_tail(ops: FileOps, state_dir: Path, torn: Damage) -> None:
    """Cut the torn tail ``torn`` away (idempotent); raises ``OSError``."""
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

    Call with the lock held (see :func:`~gateway.persistence.lock.lock_state_dir`).
    Never raises on file content: anything unusable is reported in ``damage`` (start
    halted) or ``torn_tail`` (a crash mid-write; the dropped record was never reported
    durable). With ``repair=True`` leftover ``*.tmp`` files are deleted and a torn tail
    is truncated away (then fdatasync'ed); with ``repair=False`` nothing on disk
    changes. Raises ``OSError`` only if the directory cannot be read or a repair step
    fails (calling again is safe). ``unusable_snapshots`` maps the seq of a snapshot
    that could be read but not applied to why: it is then treated as unreadable
    (damage, and the previous one is used). Next: replay, then build a ``Journal``
    from the result.
    """
    state_dir = Path(state_dir)
    analysis = analyse(state_dir, full=False, unusable=unusable_snapshots)
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
            repair_torn_tail(ops, state_dir, analysis.torn_tail)
    return recovered_from(analysis)


def locate_record(state_dir: Path, seq: int) -> tuple[str, int] | None:
    """The segment and the byte offset of the frame that holds record ``seq``
    (None when no readable segment holds it). Reads the directory, changes nothing."""
    analysis = analyse(Path(state_dir), full=True)
    for seg in analysis.segments:
        if seg.last_seq is None or not seg.first_seq <= seq <= seg.last_seq:
            continue
        data = read_bytes(Path(state_dir) / seg.name)
        off, first = SEGMENT_HEADER_BYTES, seg.first_seq
        while off + FRAME_HEADER_BYTES <= len(data):
            _magic, length, _crc, _first, count = FRAME_HEADER.unpack_from(data, off)
            if first <= seq < first + count:
                return seg.name, off
            off += FRAME_HEADER_BYTES + length
            first += count
    return None
