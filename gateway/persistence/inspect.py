"""Reading a state directory for people and offline tools, changing nothing.

Neither function takes the lock: both may run next to a live gateway.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gateway.persistence.framing import SEGMENT_RE, SNAPSHOT_RE
from gateway.persistence.recovery import (
    Analysis,
    SegmentInfo,
    analyse,
    read_bytes,
    recovered_from,
    scan_segment,
)
from gateway.persistence.snapshots import read_snapshot

__all__ = ["inspect_state_dir", "read_history"]


def inspect_state_dir(state_dir: Path) -> dict[str, Any]:
    """Describe a state directory without locking or changing it.

    Keys: ``state_dir``, ``exists``, ``fresh``, ``snapshots`` (each ``file``, ``seq``,
    ``bytes``, ``valid`` and, when invalid, ``error``), ``segments`` (each ``file``,
    ``first_seq``, ``last_seq``, ``records``, ``bytes`` and, when a record failed,
    ``error``), ``records`` (how many journal records recovery would replay),
    ``first_seq``/``last_seq`` (of those records; ``last_seq`` falls back to the
    snapshot's), ``snapshot_seq``, ``damage`` and ``torn_tail`` (exactly what
    ``recover`` would report, as dicts), ``snapshot_payload``, ``tail_payloads``,
    ``tmp_files``, ``other_files``, ``manifest`` (its lists, or None), ``missing``
    (listed files that are not there) and ``unlisted`` (snapshot and segment files it
    does not list).
    """
    state_dir = Path(state_dir)
    analysis = _analyse_live(state_dir)
    recovered = recovered_from(analysis)
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


def _analyse_live(state_dir: Path) -> Analysis:
    for attempt in range(5):
        try:
            return analyse(state_dir, full=True)
        except FileNotFoundError:
            # A running gateway removed a file between listing and reading (inspection
            # does not take the lock); look again.
            if attempt == 4:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def read_history(
    state_dir: Path,
) -> tuple[dict[str, Any] | None, list[tuple[int, dict[str, Any]]]]:
    """The oldest valid snapshot and every record after it that is still on disk.

    Recovery needs only the newest snapshot; history wants to reach back as far
    as possible, so this starts from the oldest one (the journal keeps one
    snapshot interval of segments behind the newest). Reading stops at damage.
    """
    snapshots: list[tuple[int, str]] = []
    segments: list[tuple[int, str]] = []
    for name in os.listdir(state_dir):
        if m := SNAPSHOT_RE.fullmatch(name):
            snapshots.append((int(m[1]), name))
        elif m := SEGMENT_RE.fullmatch(name):
            segments.append((int(m[1]), name))
    snapshots.sort()
    segments.sort()
    # Start where the records still on disk begin: from nothing when the first
    # segment starts at seq 1, else from the oldest snapshot that reaches it.
    first_available = segments[0][0] if segments else None
    base_seq, snapshot = 0, None
    if first_available != 1:
        for seq, name in snapshots:
            if first_available is not None and seq + 1 < first_available:
                continue
            payload, error = read_snapshot(state_dir / name, seq)
            if error is None:
                base_seq, snapshot = seq, payload
                break
    records: list[tuple[int, dict[str, Any]]] = []
    expected = base_seq + 1
    for i, (first_seq, name) in enumerate(segments):
        is_last = i == len(segments) - 1
        if not is_last and segments[i + 1][0] <= expected:
            continue  # every record of this segment is at or before the base
        info = SegmentInfo(name=name, first_seq=first_seq)
        payloads: list[dict[str, Any]] = []
        expected, damage, _torn = scan_segment(
            info, read_bytes(state_dir / name), expected=expected, is_last=is_last, out=payloads
        )
        # Those are the records up to expected - 1, without gaps.
        records.extend(zip(range(expected - len(payloads), expected), payloads, strict=True))
        if damage is not None:
            break
    return snapshot, records
