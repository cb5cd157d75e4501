"""The segment writer: every file change the running journal makes, synchronously.

A :class:`SegmentWriter` runs only in the journal's single writer thread (the
loop-side :class:`~gateway.persistence.journal.Journal` hands it one batch at a
time), so it owns its state without locks: the open segment, how many of its
bytes are written, fdatasync'ed and acknowledged, the live files and the
MANIFEST listing them, snapshot files, and the retiring of files a snapshot
made redundant.

A snapshot is written to ``.tmp``, fsync'ed, renamed into place and the directory
fsync'ed; then a new segment ``journal-<seq+1>.log`` is started, the MANIFEST lists
them (and no longer what they retire), and only then are old files removed: segments
whose records are all covered by the *previous* snapshot, and snapshots older than the
previous one. Keeping one snapshot interval of journal means a newest snapshot that
later turns unreadable still recovers completely (from the previous snapshot plus the
journal), though it is reported as damage.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway.persistence.fileops import FileOps, write_all
from gateway.persistence.framing import (
    SEGMENT_HEADER_BYTES,
    SEGMENT_RE,
    SNAPSHOT_RE,
    encode_frames,
    segment_header,
    segment_name,
    snapshot_name,
)
from gateway.persistence.manifest import write_manifest
from gateway.persistence.recovery import Recovered, repair_torn_tail
from gateway.persistence.snapshots import encode_state, read_snapshot, write_snapshot_file

__all__ = ["BatchProgress", "FsyncPolicy", "SegmentWriter", "SnapshotWrite", "WriteItem"]

FsyncPolicy = Literal["always", "interval", "never"]


@dataclass(eq=False, slots=True)
class SnapshotWrite:
    """A snapshot to write at its place in a batch: the state as of record ``seq``,
    captured on the loop and encoded by the writer thread."""

    seq: int
    state: dict[str, Any]


# A record as the journal queues it (its orjson encoding, not yet framed) or a snapshot.
WriteItem = bytes | SnapshotWrite


@dataclass(slots=True)
class BatchProgress:
    """What one batch achieved; filled in by the writer thread, read on the loop
    only after the batch returned (or raised), so no locking is needed."""

    written_seq: int
    synced_seq: int
    records: int = 0
    bytes: int = 0
    fsyncs: int = 0
    fsync_seconds: float = 0.0
    snapshots: list[SnapshotWrite] = field(default_factory=list)


class SegmentWriter:
    """Writes a state directory's segments, snapshots and MANIFEST; synchronous.

    Call :meth:`open` once, then :meth:`run_batch` for each batch, then
    :meth:`close`, all from one thread, one call at a time. Every method raises
    ``OSError`` (or whatever ``ops`` raises) on failure; after a failure the
    journal is failed and only :meth:`close` may follow.
    """

    def __init__(
        self, state_dir: Path, recovered: Recovered, *, policy: FsyncPolicy, ops: FileOps
    ) -> None:
        self._dir = state_dir
        self._recovered = recovered
        self._policy: FsyncPolicy = policy
        self._ops = ops
        self._fd = -1
        self._seg_first_seq = 0
        self._seg_written = 0  # bytes of the current segment written successfully
        self._seg_synced = 0  # bytes of the current segment covered by an fdatasync
        self._seg_acked = 0  # bytes of the current segment already reported durable
        # The files the MANIFEST lists, in order (snapshots oldest first).
        self._live_snapshots = list(recovered.live_snapshots)
        self._live_segments = list(recovered.live_segments)

    def open(self, rescue: SnapshotWrite | None) -> None:
        """Start the segment after the recovered records and list it.

        ``rescue`` (after a damaged recovery): first write it as the only live
        snapshot and set every segment and unreadable snapshot aside as
        ``<name>.damaged-<ns>``.
        """
        ops = self._ops
        torn = self._recovered.torn_tail
        if rescue is None and torn is not None:
            # Idempotent: recover(repair=True) already did this; recover(repair=False)
            # did not, and a new segment after an untruncated torn tail would turn it
            # into mid-log damage.
            repair_torn_tail(ops, self._dir, torn)
        if rescue is not None:
            stamp = time.time_ns()
            clash = self._dir / snapshot_name(rescue.seq)
            if clash.exists() and read_snapshot(clash, rescue.seq)[1] is not None:
                # Keep the unreadable snapshot for the operator instead of overwriting it.
                ops.replace(clash, clash.with_name(f"{clash.name}.damaged-{stamp}"))
            write_snapshot_file(ops, self._dir, rescue.seq, encode_state(rescue.state))
            # The snapshot alone is the state now: listed before anything is
            # set aside, so no crash can find a listed file missing.
            self._live_snapshots = [snapshot_name(rescue.seq)]
            self._live_segments = []
            self._write_manifest()
            # Only now that the snapshot covering them is durable may segments go.
            self._set_aside_unusable_files(rescue.seq, stamp)
        self._new_segment(self._recovered.last_seq + 1)
        self._write_manifest()

    def run_batch(
        self, items: list[WriteItem], first_seq: int, sync: bool, progress: BatchProgress
    ) -> None:
        """Write ``items`` (records from ``first_seq`` on, and snapshots at their
        place), then fdatasync if ``sync``; ``progress`` says how far it got, also
        when this raises."""
        seq = first_seq - 1
        run: list[bytes] = []
        for item in items:
            if type(item) is bytes:
                run.append(item)
                seq += 1
                continue
            assert isinstance(item, SnapshotWrite)
            self._write_run(run, seq, progress)
            run = []
            self._take_snapshot(item, progress)
        self._write_run(run, seq, progress)
        if sync:
            self._sync(progress)

    def close(self) -> None:
        """Close the open segment (idempotent, never raises)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(OSError):
                self._ops.close(fd)

    # ------------------------------------------------------------------ files

    def _set_aside_unusable_files(self, keep_snapshot_seq: int, stamp: int) -> None:
        ops = self._ops
        for name in sorted(os.listdir(self._dir)):
            unusable = SEGMENT_RE.fullmatch(name) is not None
            if (m := SNAPSHOT_RE.fullmatch(name)) and int(m[1]) != keep_snapshot_seq:
                _payload, error = read_snapshot(self._dir / name, int(m[1]))
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
            write_all(ops, fd, segment_header(first_seq))
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
        write_manifest(self._ops, self._dir, self._live_snapshots, self._live_segments)

    # ------------------------------------------------------------------ records

    def _sync(self, progress: BatchProgress) -> None:
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

    def _write_run(self, run: list[bytes], last_seq: int, progress: BatchProgress) -> None:
        if not run:
            return
        data = b"".join(encode_frames(run, last_seq - len(run) + 1))
        try:
            write_all(self._ops, self._fd, data)
        except BaseException:
            self._truncate_to_acked()
            raise
        self._seg_written += len(data)
        if self._policy != "always":
            self._seg_acked = self._seg_written
        progress.written_seq = last_seq
        progress.records += len(run)
        progress.bytes += len(data)

    # ------------------------------------------------------------------ snapshots

    def _take_snapshot(self, request: SnapshotWrite, progress: BatchProgress) -> None:
        ops = self._ops
        # The old segment must hold every record <= seq durably before a snapshot makes
        # it redundant; syncing it now also keeps it free of torn tails.
        self._sync(progress)
        write_snapshot_file(ops, self._dir, request.seq, encode_state(request.state))
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
