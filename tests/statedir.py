"""Helpers for tests that build or change a state directory by hand."""

from __future__ import annotations

import re
import time
from pathlib import Path

from gateway.persistence import MANIFEST_NAME, manifest_bytes


def wall_clock_ms() -> int:
    """The time now in milliseconds since the epoch: the clock a store is given
    when a test does not pin one."""
    return time.time_ns() // 1_000_000


def list_live(state: Path) -> None:
    """Write a MANIFEST listing every snapshot and segment file present, as
    the journal would (for a directory a test built or pruned by hand)."""
    names = sorted(p.name for p in state.iterdir())
    snapshots = [n for n in names if re.fullmatch(r"snapshot-\d{20}\.snap", n)]
    segments = [n for n in names if re.fullmatch(r"journal-\d{20}\.log", n)]
    (state / MANIFEST_NAME).write_bytes(manifest_bytes(snapshots, segments))
