"""Journal behaviour on a real file system: round trips, snapshots, torn tails,
corruption, group commit, fsync policies and the state-directory lock."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.persistence import (
    FileOps,
    Journal,
    PersistenceError,
    Recovered,
    StateDirLocked,
    inspect_state_dir,
    lock_state_dir,
    recover,
)
from gateway.persistence.framing import FRAME_HEADER_BYTES, SEGMENT_HEADER_BYTES

# --------------------------------------------------------------------------- helpers
# The encoders below restate the documented on-disk format independently of the
# module, so a change to the format that the docstring does not describe fails here.


def seg_name(first_seq: int) -> str:
    return f"journal-{first_seq:020d}.log"


def snap_name(seq: int) -> str:
    return f"snapshot-{seq:020d}.snap"


def encode_segment_header(first_seq: int) -> bytes:
    head = b"RGJ1" + struct.pack("<IQ", 2, first_seq)
    return head + struct.pack("<I", zlib.crc32(head))


def encode_frame_body(first_seq: int, count: int, body: bytes) -> bytes:
    tail = struct.pack("<QI", first_seq, count)
    return struct.pack("<BII", 0xA5, len(body), zlib.crc32(tail + body)) + tail + body


def encode_frame(first_seq: int, payloads: list[dict[str, Any]]) -> bytes:
    return encode_frame_body(first_seq, len(payloads), orjson.dumps(payloads))


def encode_snapshot(seq: int, payload: dict[str, Any]) -> bytes:
    body = orjson.dumps(payload)
    head = b"RGS1" + struct.pack("<IQQ", 1, seq, len(body))
    return head + struct.pack("<I", zlib.crc32(head + body)) + body


def list_live(state: Path) -> None:
    """A MANIFEST listing every snapshot and segment file present, as the
    journal writes it (for directories these tests build by hand)."""
    names = sorted(p.name for p in state.iterdir())
    snapshots = [n for n in names if re.fullmatch(r"snapshot-\d{20}\.snap", n)]
    segments = [n for n in names if re.fullmatch(r"journal-\d{20}\.log", n)]
    body = orjson.dumps({"snapshots": snapshots, "segments": segments})
    head = b"RGM1" + struct.pack("<II", 1, len(body)) + struct.pack("<I", zlib.crc32(body))
    (state / "MANIFEST").write_bytes(head + body)


def frame_bounds(data: bytes) -> list[int]:
    """Start offsets of the frames of a segment, plus its end."""
    bounds = [SEGMENT_HEADER_BYTES]
    off = SEGMENT_HEADER_BYTES
    while off < len(data):
        (length,) = struct.unpack_from("<I", data, off + 1)
        off += FRAME_HEADER_BYTES + length
        bounds.append(off)
    return bounds


def frame_counts(data: bytes) -> list[int]:
    """How many records each frame of a segment holds."""
    return [struct.unpack_from("<I", data, off + 17)[0] for off in frame_bounds(data)[:-1]]


def payload(i: int) -> dict[str, Any]:
    return {"t": "pos", "account": "A1", "symbol": "BTC-USD", "qty": str(i), "i": i}


class Model:
    """A stand-in for the manager: its state is the list of applied record ids."""

    def __init__(self, recovered: Recovered | None = None) -> None:
        self.items: list[int] = []
        self.halted = False
        if recovered is not None:
            if recovered.snapshot is not None:
                self.items = list(recovered.snapshot["items"])
                self.halted = bool(recovered.snapshot.get("halted", False))
            self.items.extend(p["i"] for _seq, p in recovered.records)

    def snapshot(self) -> dict[str, Any]:
        return {"items": list(self.items), "halted": self.halted}


def files(state: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(state.iterdir())}


async def write_records(
    state: Path,
    ids: list[int],
    *,
    model: Model | None = None,
    wave: int = 5,
    close_snapshot: bool = False,
    **kwargs: Any,
) -> Journal:
    """Recover, start a journal, append ``ids`` in waves awaiting durability, close."""
    state.mkdir(parents=True, exist_ok=True)
    rec = recover(state)
    model = model or Model(rec)
    journal = Journal(state, rec, snapshot_source=model.snapshot, **kwargs)
    async with asyncio.TaskGroup() as tasks:
        await journal.start(tasks)
        for start in range(0, len(ids), wave):
            seqs = []
            for i in ids[start : start + wave]:
                model.items.append(i)
                seqs.append(journal.append(payload(i)))
            await asyncio.gather(*(journal.durable(s) for s in seqs))
        await journal.close(snapshot=close_snapshot)
    return journal


# --------------------------------------------------------------------------- round trips


async def test_recover_when_records_were_durable_then_same_payloads_and_seqs(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    await write_records(state, list(range(1, 51)), wave=7)

    rec = recover(state)

    assert rec.damage is None and rec.torn_tail is None and not rec.fresh
    assert rec.snapshot is None and rec.snapshot_seq == 0
    assert rec.records == [(i, payload(i)) for i in range(1, 51)]
    assert rec.last_seq == 50


async def test_restart_when_appending_again_then_new_segment_and_seqs_continue(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    await write_records(state, [1, 2, 3])
    await write_records(state, [4, 5])

    rec = recover(state)

    assert sorted(p.name for p in state.glob("journal-*.log")) == [seg_name(1), seg_name(4)]
    assert rec.records == [(i, payload(i)) for i in range(1, 6)]


def test_recover_when_directory_missing_or_empty_then_fresh(tmp_path: Path) -> None:
    missing = recover(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    empty = recover(tmp_path / "empty")

    for rec in (missing, empty):
        assert rec.fresh and rec.damage is None and rec.torn_tail is None
        assert rec.records == [] and rec.last_seq == 0 and rec.snapshot is None
    assert not (tmp_path / "nope").exists()


async def test_recover_when_journal_started_but_nothing_appended_then_fresh(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    await write_records(state, [])

    rec = recover(state)

    assert rec.fresh and rec.last_seq == 0
    assert (state / seg_name(1)).stat().st_size == SEGMENT_HEADER_BYTES


async def test_snapshots_when_due_then_old_files_removed_and_recovery_uses_snapshot_plus_tail(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    model = Model()
    # Waves of 10 with snapshot_every=10 snapshot at 10, 20 and 30 exactly.
    journal = await write_records(
        state, list(range(1, 36)), model=model, wave=10, snapshot_every=10
    )

    assert journal.stats["snapshots"] == 3
    # The newest two snapshots stay, with the journal back to the older one.
    assert sorted(p.name for p in state.iterdir() if p.name != "LOCK") == [
        "MANIFEST",
        seg_name(21),
        seg_name(31),
        snap_name(20),
        snap_name(30),
    ]
    rec = recover(state)
    assert rec.damage is None and rec.snapshot_seq == 30
    assert rec.snapshot == {"items": list(range(1, 31)), "halted": False}
    assert rec.records == [(i, payload(i)) for i in range(31, 36)]
    assert Model(rec).items == list(range(1, 36))


async def test_close_when_snapshot_requested_then_recovery_replays_no_records(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    await write_records(state, list(range(1, 13)), close_snapshot=True)

    rec = recover(state)

    assert rec.snapshot_seq == 12 and rec.records == [] and rec.last_seq == 12
    assert Model(rec).items == list(range(1, 13))


async def test_snapshot_now_when_called_then_durable_snapshot_at_last_seq(
    tmp_path: Path,
    tasks: asyncio.TaskGroup,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    model = Model()
    journal = Journal(state, recover(state), snapshot_source=model.snapshot)
    await journal.start(tasks)
    for i in (1, 2, 3):
        model.items.append(i)
        journal.append(payload(i))

    await journal.snapshot_now()

    assert (state / snap_name(3)).exists() and (state / seg_name(4)).exists()
    assert journal.synced_seq == 3
    await journal.close(snapshot=False)
    rec = recover(state)
    assert rec.snapshot_seq == 3 and rec.records == []


# --------------------------------------------------------------------------- torn tails


@pytest.mark.parametrize("batch", [1, 3])
async def test_torn_tail_at_every_offset_of_last_three_frames_then_exact_prefix(
    tmp_path: Path, batch: int
) -> None:
    base = tmp_path / "base"
    # One frame per group-commit batch: each wave of ``batch`` records is one batch.
    await write_records(base, list(range(1, 3 * batch + 4)), wave=batch)
    data = (base / seg_name(1)).read_bytes()
    bounds = frame_bounds(data)
    counts = frame_counts(data)
    assert counts[-3:] == [batch] * 3

    for cut in range(bounds[-4], bounds[-1] + 1):
        state = tmp_path / f"cut{cut}"
        state.mkdir()
        (state / seg_name(1)).write_bytes(data[:cut])
        list_live(state)
        frames = sum(1 for end in bounds[1:] if end <= cut)
        complete = sum(counts[:frames])
        good_len = bounds[frames]

        rec = recover(state)

        assert rec.damage is None, cut
        assert rec.records == [(i, payload(i)) for i in range(1, complete + 1)], cut
        assert (rec.torn_tail is None) == (cut == good_len), cut
        if rec.torn_tail is not None:
            assert rec.torn_tail.file == seg_name(1) and rec.torn_tail.offset == good_len
        assert (state / seg_name(1)).stat().st_size == good_len

        await write_records(state, [100])
        again = recover(state)
        assert again.damage is None and again.torn_tail is None, cut
        assert again.records == [
            *((i, payload(i)) for i in range(1, complete + 1)),
            (complete + 1, payload(100)),
        ]


async def test_torn_segment_header_when_not_yet_listed_then_left_over_and_removed(
    tmp_path: Path,
) -> None:
    # A crash while a new segment's header was written: the MANIFEST does not
    # list it yet, so it is a leftover, not the journal's tail.
    state = tmp_path / "state"
    await write_records(state, [1, 2, 3])
    (state / seg_name(4)).write_bytes(encode_segment_header(4)[:7])

    peek = recover(state, repair=False)
    assert peek.damage is None and peek.torn_tail is None and peek.last_seq == 3
    assert (state / seg_name(4)).exists()

    rec = recover(state)

    assert rec.damage is None and rec.torn_tail is None and rec.last_seq == 3
    assert not (state / seg_name(4)).exists()
    await write_records(state, [4])
    assert recover(state).records[-1] == (4, payload(4))


async def test_zero_filled_tail_when_recovering_then_never_parsed_as_records(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    await write_records(state, [1, 2, 3])
    path = state / seg_name(1)
    good = path.stat().st_size
    with open(path, "ab") as f:
        f.write(bytes(4096))

    rec = recover(state)

    assert rec.damage is None and rec.last_seq == 3
    assert rec.torn_tail is not None and rec.torn_tail.offset == good
    assert path.stat().st_size == good


async def test_recover_without_repair_when_torn_then_nothing_on_disk_changes(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    await write_records(state, [1, 2, 3], wave=1)
    path = state / seg_name(1)
    path.write_bytes(path.read_bytes()[:-5])
    (state / (snap_name(9) + ".tmp")).write_bytes(b"half a snapshot")
    before = files(state)

    rec = recover(state, repair=False)

    assert rec.torn_tail is not None and rec.last_seq == 2
    assert files(state) == before


async def test_recover_when_snapshot_tmp_left_over_then_deleted(tmp_path: Path) -> None:
    state = tmp_path / "state"
    await write_records(state, [1])
    (state / (snap_name(1) + ".tmp")).write_bytes(b"partial")

    rec = recover(state)

    assert rec.damage is None and rec.last_seq == 1
    assert not list(state.glob("*.tmp"))


# --------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("batch", [1, 3])
async def test_flipped_byte_in_middle_frame_then_damage_names_file_and_offset(
    tmp_path: Path, batch: int
) -> None:
    base = tmp_path / "base"
    await write_records(base, list(range(1, 9 * batch + 1)), wave=batch)
    data = (base / seg_name(1)).read_bytes()
    bounds = frame_bounds(data)
    assert frame_counts(data) == [batch] * 9
    start, end = bounds[4], bounds[5]  # frame 5 of 9

    for pos in range(start, end):
        state = tmp_path / f"flip{pos}"
        state.mkdir()
        corrupted = bytearray(data)
        corrupted[pos] ^= 0xFF
        (state / seg_name(1)).write_bytes(bytes(corrupted))
        list_live(state)

        rec = recover(state)

        assert rec.damage is not None, pos
        assert rec.damage.file == seg_name(1)
        assert start <= rec.damage.offset < end, (pos, rec.damage)
        assert rec.damage.describe().startswith(f"{seg_name(1)} at offset {rec.damage.offset}: ")
        assert rec.torn_tail is None and not rec.fresh
        assert rec.records == [(i, payload(i)) for i in range(1, 4 * batch + 1)]
        assert rec.last_seq == 4 * batch
        assert (state / seg_name(1)).read_bytes() == bytes(corrupted)


async def test_damage_in_earlier_segment_when_later_segments_exist_then_stop_there(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    await write_records(state, [1, 2, 3], wave=2)
    await write_records(state, [4, 5])
    path = state / seg_name(1)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last frame (record 3) of a segment that is not the last one
    path.write_bytes(bytes(data))

    rec = recover(state)

    assert rec.damage is not None and rec.damage.file == seg_name(1)
    assert rec.torn_tail is None
    assert [seq for seq, _p in rec.records] == [1, 2]


def test_sequence_discontinuity_when_checksums_valid_then_damage(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    frames = [
        encode_frame(1, [payload(1)]),
        encode_frame(2, [payload(2), payload(3)]),
        encode_frame(5, [payload(5), payload(6)]),
        encode_frame(7, [payload(7)]),
    ]
    (state / seg_name(1)).write_bytes(encode_segment_header(1) + b"".join(frames))
    list_live(state)

    rec = recover(state)

    assert rec.damage is not None
    assert rec.damage.offset == SEGMENT_HEADER_BYTES + len(frames[0]) + len(frames[1])
    assert rec.damage.detail == "sequence discontinuity: expected seq 4, found 5"
    assert [seq for seq, _p in rec.records] == [1, 2, 3]


def test_journal_starting_after_snapshot_seq_when_recovering_then_gap_damage(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / snap_name(5)).write_bytes(encode_snapshot(5, {"items": [1, 2, 3, 4, 5]}))
    (state / seg_name(8)).write_bytes(encode_segment_header(8) + encode_frame(8, [payload(8)]))
    list_live(state)

    rec = recover(state)

    assert rec.damage is not None and rec.damage.file == seg_name(8)
    assert "missing" in rec.damage.detail
    assert rec.snapshot_seq == 5 and rec.records == [] and rec.last_seq == 5


def test_checksummed_record_that_is_not_an_object_then_damage_at_its_frame(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    good = encode_frame(1, [payload(1), payload(2)])
    bad = encode_frame_body(3, 2, orjson.dumps([payload(3), [1, 2]]))
    (state / seg_name(1)).write_bytes(
        encode_segment_header(1) + good + bad + encode_frame(5, [payload(5)])
    )
    list_live(state)

    rec = recover(state)

    assert rec.damage is not None
    assert rec.damage.detail == "record 4 payload is not a JSON object"
    assert rec.damage.offset == SEGMENT_HEADER_BYTES + len(good)
    assert rec.torn_tail is None
    # The frame is the unit of checking: none of its records is kept.
    assert rec.records == [(1, payload(1)), (2, payload(2))] and rec.last_seq == 2


@pytest.mark.parametrize(
    ("count", "body"),
    [
        (2, orjson.dumps([payload(3)])),  # fewer records than the header counts
        (1, orjson.dumps([payload(3), payload(4)])),  # more
        (1, orjson.dumps(payload(3))),  # not an array
        (1, b"[{"),  # not JSON
    ],
)
def test_checksummed_frame_that_does_not_hold_its_count_then_damage_at_its_frame(
    tmp_path: Path, count: int, body: bytes
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    good = encode_frame(1, [payload(1), payload(2)])
    (state / seg_name(1)).write_bytes(
        encode_segment_header(1) + good + encode_frame_body(3, count, body)
    )
    list_live(state)

    rec = recover(state)
    report = inspect_state_dir(state)

    assert rec.damage is not None and rec.torn_tail is None
    assert rec.damage.offset == SEGMENT_HEADER_BYTES + len(good)
    assert rec.damage.detail == f"frame payload is not a JSON array of {count} records"
    assert rec.records == [(1, payload(1)), (2, payload(2))] and rec.last_seq == 2
    assert report["damage"] == rec.damage.as_dict()
    assert report["segments"][0]["records"] == 2


def test_checksummed_frame_of_no_records_then_not_a_frame(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    good = encode_frame(1, [payload(1)])
    empty = encode_frame_body(2, 0, b"[]")
    path = state / seg_name(1)
    path.write_bytes(encode_segment_header(1) + good + empty + encode_frame(2, [payload(2)]))
    list_live(state)

    damaged = recover(state, repair=False)
    path.write_bytes(encode_segment_header(1) + good + empty)
    last = recover(state)

    assert damaged.damage is not None and damaged.damage.detail == "frame holds no records"
    assert damaged.damage.offset == SEGMENT_HEADER_BYTES + len(good)
    assert damaged.records == [(1, payload(1))]
    # As the last frame too: it is whole, so it is damage, not a torn write.
    assert last.damage == damaged.damage and last.torn_tail is None
    assert last.records == [(1, payload(1))]
    assert path.stat().st_size == SEGMENT_HEADER_BYTES + len(good) + len(empty)


def test_snapshot_inside_a_frame_when_recovering_then_records_after_it_only(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / snap_name(6)).write_bytes(encode_snapshot(6, {"items": [1, 2, 3, 4, 5, 6]}))
    (state / seg_name(1)).write_bytes(
        encode_segment_header(1)
        + encode_frame(1, [payload(i) for i in range(1, 5)])
        + encode_frame(5, [payload(i) for i in range(5, 9)])
        + encode_frame(9, [payload(9)])
    )
    list_live(state)

    rec = recover(state)
    report = inspect_state_dir(state)

    assert rec.damage is None and rec.torn_tail is None and rec.snapshot_seq == 6
    assert rec.records == [(i, payload(i)) for i in (7, 8, 9)] and rec.last_seq == 9
    assert Model(rec).items == list(range(1, 10))
    assert report["segments"][0]["records"] == 9 and report["first_seq"] == 7


async def test_newest_snapshot_corrupt_when_older_exists_then_damage_and_full_fallback(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    await write_records(state, list(range(1, 13)), wave=5, snapshot_every=5)
    assert {p.name for p in state.glob("snapshot-*")} == {snap_name(5), snap_name(10)}
    newest = state / snap_name(10)
    data = bytearray(newest.read_bytes())
    data[-3] ^= 0x20
    newest.write_bytes(bytes(data))

    rec = recover(state)

    assert rec.damage is not None and rec.damage.file == snap_name(10)
    assert "checksum" in rec.damage.detail
    assert rec.snapshot_seq == 5
    assert Model(rec).items == list(range(1, 13))


async def test_only_snapshot_corrupt_when_journal_starts_at_one_then_recovered_from_journal(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    await write_records(state, list(range(1, 8)), wave=5, snapshot_every=5)
    (state / snap_name(5)).write_bytes(b"RGS1 definitely not a snapshot")

    rec = recover(state)

    assert rec.damage is not None and rec.damage.file == snap_name(5)
    assert rec.snapshot is None and rec.snapshot_seq == 0
    assert rec.records == [(i, payload(i)) for i in range(1, 8)]


async def test_inspect_when_damaged_then_same_report_as_recover_and_files_untouched(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    await write_records(state, list(range(1, 15)), wave=1, snapshot_every=5)
    tail = state / seg_name(11)  # records 11..14 after the snapshot at 10, a frame each
    data = bytearray(tail.read_bytes())
    bounds = frame_bounds(bytes(data))
    data[bounds[1] + 24] ^= 0x55  # record 12, followed by good records 13 and 14
    tail.write_bytes(bytes(data))
    covered = state / seg_name(6)  # records 6..10, redundant while snapshot 10 reads
    covered.write_bytes(covered.read_bytes()[:-1] + b"?")
    (state / (snap_name(99) + ".tmp")).write_bytes(b"leftover")
    os.utime(tail, ns=(1_000_000_000, 1_000_000_000))
    before = files(state)

    report = inspect_state_dir(state)

    assert files(state) == before
    expected = recover(state, repair=False)
    assert expected.damage is not None
    assert report["damage"] == {
        "file": seg_name(11),
        "offset": expected.damage.offset,
        "detail": expected.damage.detail,
    }
    assert bounds[1] <= expected.damage.offset < bounds[2]
    assert report["torn_tail"] is None
    assert report["snapshot_seq"] == 10 and report["last_seq"] == expected.last_seq == 11
    assert report["snapshot_payload"] == expected.snapshot
    assert report["tail_payloads"] == [payload(11)]
    assert report["records"] == 1 and report["first_seq"] == 11
    assert [s["file"] for s in report["snapshots"]] == [snap_name(5), snap_name(10)]
    assert all(s["valid"] for s in report["snapshots"])
    by_file = {s["file"]: s for s in report["segments"]}
    assert by_file[seg_name(11)]["records"] == 1
    assert by_file[seg_name(11)]["error"] == report["damage"]
    assert by_file[seg_name(6)]["records"] == 4 and "error" in by_file[seg_name(6)]
    assert list(by_file) == [seg_name(6), seg_name(11)]
    assert report["tmp_files"] == [snap_name(99) + ".tmp"]
    assert report["state_dir"] == str(state)
    assert files(state) == before


async def test_inspect_when_healthy_then_counts_and_payloads(tmp_path: Path) -> None:
    state = tmp_path / "state"
    await write_records(state, list(range(1, 8)), wave=5, snapshot_every=5)

    report = inspect_state_dir(state)

    assert report["damage"] is None and report["torn_tail"] is None and not report["fresh"]
    assert report["snapshot_payload"] == {"items": [1, 2, 3, 4, 5], "halted": False}
    assert report["tail_payloads"] == [payload(6), payload(7)]
    assert (report["records"], report["first_seq"], report["last_seq"]) == (2, 6, 7)
    assert report["segments"] == [
        {
            "file": seg_name(1),
            "first_seq": 1,
            "last_seq": 5,
            "records": 5,
            "bytes": (state / seg_name(1)).stat().st_size,
        },
        {
            "file": seg_name(6),
            "first_seq": 6,
            "last_seq": 7,
            "records": 2,
            "bytes": (state / seg_name(6)).stat().st_size,
        },
    ]


async def test_random_damage_when_recovering_then_never_raises_and_never_invents(
    tmp_path: Path,
) -> None:
    state = tmp_path / "base"
    await write_records(state, list(range(1, 16)), wave=4, snapshot_every=6)
    originals = files(state)
    names = [n for n in originals if n != "LOCK"]
    rng = random.Random(20240611)

    for trial in range(300):
        case = tmp_path / f"case{trial}"
        case.mkdir()
        for name, (data, _mtime) in originals.items():
            (case / name).write_bytes(data)
        victim = case / rng.choice(names)
        data = bytearray(victim.read_bytes())
        action = rng.choice(["flip", "truncate", "garbage", "zero", "replace"])
        if action == "flip":
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif action == "truncate":
            del data[rng.randrange(len(data)) :]
        elif action == "garbage":
            at = rng.randrange(len(data))
            data[at:at] = rng.randbytes(rng.randint(1, 40))
        elif action == "zero":
            at = rng.randrange(len(data))
            data[at : at + 64] = bytes(len(data[at : at + 64]))
        else:
            data = bytearray(rng.randbytes(rng.randint(0, 200)))
        victim.write_bytes(bytes(data))

        rec = recover(case, repair=rng.random() < 0.5)
        inspect_state_dir(case)

        items = Model(rec).items
        assert items == list(range(1, len(items) + 1)), (trial, action, victim.name)
        seqs = [seq for seq, _p in rec.records]
        assert seqs == list(range(rec.snapshot_seq + 1, rec.last_seq + 1)), trial


# --------------------------------------------------------------------------- damaged start


async def test_start_when_recovery_damaged_then_files_set_aside_and_halt_survives(
    tmp_path: Path,
    tasks: asyncio.TaskGroup,
) -> None:
    state = tmp_path / "state"
    await write_records(state, list(range(1, 10)), wave=1)
    path = state / seg_name(1)
    data = bytearray(path.read_bytes())
    data[frame_bounds(bytes(data))[4] + 3] ^= 0xFF
    damaged_bytes = bytes(data)
    path.write_bytes(damaged_bytes)
    rec = recover(state)
    assert rec.damage is not None and rec.last_seq == 4
    model = Model(rec)
    model.halted = True  # the caller halts before starting the journal
    journal = Journal(state, rec, snapshot_source=model.snapshot)

    await journal.start(tasks)
    model.items.append(50)
    await journal.durable(journal.append(payload(50)))
    await journal.close(snapshot=False)

    after = recover(state)
    assert after.damage is None and after.snapshot_seq == 4
    assert after.snapshot == {"items": [1, 2, 3, 4], "halted": True}
    assert after.records == [(5, payload(50))]
    (aside,) = state.glob(seg_name(1) + ".damaged-*")
    assert aside.read_bytes() == damaged_bytes
    assert inspect_state_dir(state)["other_files"] == [aside.name]


async def test_start_when_newest_snapshot_unreadable_at_same_seq_then_kept_aside_not_overwritten(
    tmp_path: Path,
    tasks: asyncio.TaskGroup,
) -> None:
    state = tmp_path / "state"
    await write_records(state, list(range(1, 13)), wave=5, snapshot_every=5)
    (state / seg_name(11)).unlink()  # the journal now ends exactly at the snapshot's seq
    list_live(state)
    bad = state / snap_name(10)
    bad_bytes = bad.read_bytes()[:-1] + b"!"
    bad.write_bytes(bad_bytes)
    rec = recover(state)
    assert rec.damage is not None and rec.damage.file == snap_name(10)
    assert rec.snapshot_seq == 5 and rec.last_seq == 10
    model = Model(rec)
    journal = Journal(state, rec, snapshot_source=model.snapshot)

    await journal.start(tasks)
    await journal.close(snapshot=False)

    (aside,) = state.glob(snap_name(10) + ".damaged-*")
    assert aside.read_bytes() == bad_bytes
    after = recover(state)
    assert after.damage is None and after.snapshot_seq == 10
    assert Model(after).items == list(range(1, 11))


def test_inspect_when_directory_missing_then_empty_fresh_report(tmp_path: Path) -> None:
    report = inspect_state_dir(tmp_path / "absent")

    assert report["exists"] is False and report["fresh"] is True
    assert report["snapshots"] == [] and report["segments"] == []
    assert report["damage"] is None and report["tail_payloads"] == []
    assert not (tmp_path / "absent").exists()


# --------------------------------------------------------------------------- group commit


class RecordingOps(FileOps):
    """Logs writes (with the highest record seq they carry) and fdatasyncs in call order.

    A write must hold whole frames."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int]] = []
        self.lock = threading.Lock()

    def write(self, fd: int, data: bytes | memoryview) -> int:
        n = super().write(fd, data)
        chunk = bytes(data[:n])
        top = 0
        off = 0
        while off + FRAME_HEADER_BYTES <= len(chunk) and chunk[off] == 0xA5:
            _m, length, _crc, first, count = struct.unpack_from("<BIIQI", chunk, off)
            top = first + count - 1
            off += FRAME_HEADER_BYTES + length
        if chunk[:1] == b"\xa5":  # not a segment header or a snapshot
            assert off == len(chunk), "a write that is not whole frames"
        with self.lock:
            self.events.append(("write", fd, top))
        return n

    def fdatasync(self, fd: int) -> None:
        super().fdatasync(fd)
        with self.lock:
            self.events.append(("fdatasync", fd, 0))

    def ack(self, seq: int) -> None:
        with self.lock:
            self.events.append(("ack", 0, seq))

    def assert_no_ack_before_its_fsync(self) -> None:
        """Every acked seq was written, then covered by an fdatasync, before its ack."""
        written: dict[int, int] = {}
        synced = 0
        for kind, fd, seq in self.events:
            if kind == "write":
                written[fd] = max(written.get(fd, 0), seq)
            elif kind == "fdatasync":
                synced = max(synced, written.get(fd, 0))
            else:
                assert seq <= synced, f"seq {seq} acknowledged before an fdatasync covered it"


async def test_group_commit_when_many_concurrent_producers_then_few_fsyncs_and_no_early_ack(
    tmp_path: Path,
    tasks: asyncio.TaskGroup,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    ops = RecordingOps()
    journal = Journal(state, recover(state), snapshot_source=dict, ops=ops)
    await journal.start(tasks)

    async def producer(k: int) -> None:
        for round_ in range(3):
            seq = journal.append(payload(k * 10 + round_))
            await journal.durable(seq)
            ops.ack(seq)

    await asyncio.gather(*(producer(k) for k in range(200)))
    await journal.close(snapshot=False)

    fsyncs = sum(1 for kind, _fd, _s in ops.events if kind == "fdatasync")
    acks = [seq for kind, _fd, seq in ops.events if kind == "ack"]
    assert sorted(acks) == list(range(1, 601))
    assert fsyncs < 600 / 10, fsyncs
    ops.assert_no_ack_before_its_fsync()
    assert journal.stats["records_written"] == 600
    assert journal.stats["fsyncs"] < 60


async def test_when_durable_when_many_callbacks_then_each_called_once_after_its_fsync(
    tmp_path: Path,
    tasks: asyncio.TaskGroup,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    ops = RecordingOps()
    journal = Journal(state, recover(state), snapshot_source=dict, ops=ops)
    await journal.start(tasks)
    done = asyncio.Event()
    answered: list[tuple[int, PersistenceError | None]] = []

    def callback_for(seq: int) -> Any:
        def answer(error: PersistenceError | None) -> None:
            ops.ack(seq)
            answered.append((seq, error))
            if len(answered) == 300:
                done.set()

        return answer

    for i in range(300):
        seq = journal.append(payload(i))
        journal.when_durable(seq, callback_for(seq))
        if i % 50 == 49:
            await asyncio.sleep(0)  # let some batches go while more arrive
    await asyncio.wait_for(done.wait(), timeout=10)

    assert sorted(seq for seq, _e in answered) == list(range(1, 301))
    assert all(error is None for _s, error in answered)
    ops.assert_no_ack_before_its_fsync()
    # Already durable: answered at once.
    late: list[PersistenceError | None] = []
    journal.when_durable(300, late.append)
    assert late == [None]
    await journal.close(snapshot=False)


class FailingSyncOps(FileOps):
    """fdatasync fails once ``armed``."""

    armed = False

    def fdatasync(self, fd: int) -> None:
        if self.armed:
            raise OSError(5, "Input/output error")
        super().fdatasync(fd)


async def test_when_durable_when_fsync_fails_then_callback_gets_persistence_error(
    tmp_path: Path,
    tasks: asyncio.TaskGroup,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    ops = FailingSyncOps()
    journal = Journal(state, recover(state), snapshot_source=dict, ops=ops)
    await journal.start(tasks)
    ops.armed = True  # from now on: the segment exists, fsyncs fail
    answered: asyncio.Queue[PersistenceError | None] = asyncio.Queue()
    seq = journal.append(payload(1))
    journal.when_durable(seq, answered.put_nowait)

    error = await asyncio.wait_for(answered.get(), timeout=10)

    assert isinstance(error, PersistenceError)
    assert "Input/output error" in str(error)
    # A failed journal answers later callers at once, with the same cause.
    again: list[PersistenceError | None] = []
    journal.when_durable(seq, again.append)
    assert len(again) == 1 and isinstance(again[0], PersistenceError)
    with pytest.raises(PersistenceError):
        await journal.close(snapshot=False)


async def test_batch_when_written_then_one_frame_in_one_write_per_group_commit(
    tmp_path: Path,
    tasks: asyncio.TaskGroup,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    ops = RecordingOps()
    journal = Journal(state, recover(state), snapshot_source=dict, ops=ops)
    await journal.start(tasks)
    start = len(ops.events)

    seqs = [journal.append(payload(i)) for i in range(1, 51)]
    await journal.durable(seqs[-1])
    seqs.append(journal.append(payload(51)))
    await journal.durable(seqs[-1])
    await journal.close(snapshot=False)

    assert [kind for kind, _fd, _seq in ops.events[start:]] == ["write", "fdatasync"] * 2
    data = (state / seg_name(1)).read_bytes()
    assert frame_counts(data) == [50, 1]
    assert recover(state).records == [(i, payload(i)) for i in range(1, 52)]


async def test_batch_when_larger_than_a_frame_then_split_over_frames_in_one_write(
    tmp_path: Path, tasks: asyncio.TaskGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    size = len(orjson.dumps(payload(10)))
    # Room for three records of this size per frame, not four.
    monkeypatch.setattr("gateway.persistence.framing.MAX_FRAME_BYTES", 3 * (size + 1) + 1)
    ops = RecordingOps()
    journal = Journal(state, recover(state), snapshot_source=dict, ops=ops)
    await journal.start(tasks)
    start = len(ops.events)

    seqs = [journal.append(payload(i)) for i in range(10, 20)]
    await journal.durable(seqs[-1])
    await journal.close(snapshot=False)

    assert [kind for kind, _fd, _seq in ops.events[start:]] == ["write", "fdatasync"]
    data = (state / seg_name(1)).read_bytes()
    assert frame_counts(data) == [3, 3, 3, 1]
    assert max(b - a for a, b in itertools.pairwise(frame_bounds(data))) <= (
        FRAME_HEADER_BYTES + 3 * (size + 1) + 1
    )
    assert recover(state).records == [(s, payload(s + 9)) for s in range(1, 11)]


class BlockingSyncOps(FileOps):
    """fdatasync waits for the test to let it through; ``held`` is set while one waits."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.held = threading.Event()
        self.syncs = 0

    def fdatasync(self, fd: int) -> None:
        if not self.gate.is_set():
            self.held.set()
        self.gate.wait(10)
        self.syncs += 1
        super().fdatasync(fd)


async def test_durable_waiter_cancelled_when_write_in_flight_then_record_still_durable(
    tmp_path: Path,
    tasks: asyncio.TaskGroup,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    ops = BlockingSyncOps()
    journal = Journal(state, recover(state), snapshot_source=dict, ops=ops)
    await journal.start(tasks)
    ops.gate.clear()
    seq = journal.append(payload(1))
    waiter = tasks.create_task(journal.durable(seq))
    # The write is in flight: its fdatasync is held.
    assert await asyncio.to_thread(ops.held.wait, 10)

    waiter.cancel()
    ops.gate.set()
    await journal.durable(seq)

    assert waiter.cancelled()
    await journal.close(snapshot=False)
    assert recover(state).records == [(1, payload(1))]


# --------------------------------------------------------------------------- policies


class CountingOps(FileOps):
    def __init__(self) -> None:
        self.fdatasyncs = 0

    def fdatasync(self, fd: int) -> None:
        self.fdatasyncs += 1
        super().fdatasync(fd)


@pytest.mark.parametrize("policy", ["interval", "never"])
async def test_relaxed_policy_when_durable_then_no_fsync_until_synced_asks(
    tmp_path: Path, tasks: asyncio.TaskGroup, policy: Any
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    ops = CountingOps()
    journal = Journal(
        state,
        recover(state),
        fsync=policy,
        fsync_interval_ms=3_600_000,
        snapshot_source=dict,
        ops=ops,
    )
    await journal.start(tasks)
    after_start = ops.fdatasyncs
    seqs = [journal.append(payload(i)) for i in range(1, 11)]

    await asyncio.gather(*(journal.durable(s) for s in seqs))

    assert ops.fdatasyncs == after_start
    assert journal.durable_seq == 10 and journal.synced_seq == 0
    await asyncio.wait_for(journal.synced(10), timeout=10)
    assert ops.fdatasyncs == after_start + 1 and journal.synced_seq == 10
    await journal.close(snapshot=False)
    assert [s for s, _p in recover(state).records] == seqs


async def test_always_policy_when_nobody_waits_then_written_lazily_and_fsync_owed_to_waiters(
    tmp_path: Path,
    tasks: asyncio.TaskGroup,
) -> None:
    # A validation's audit record is appended and never awaited: under
    # "always" it is written in a batch of its own accord but costs no
    # fdatasync until someone waits for durability (or the interval passes).
    state = tmp_path / "state"
    state.mkdir()
    ops = CountingOps()
    batches: asyncio.Queue[tuple[int, float | None]] = asyncio.Queue()
    journal = Journal(
        state,
        recover(state),
        fsync="always",
        fsync_interval_ms=3_600_000,
        snapshot_source=dict,
        ops=ops,
        on_batch=lambda records, fsync_s: batches.put_nowait((records, fsync_s)),
    )
    await journal.start(tasks)
    after_start = ops.fdatasyncs
    for i in range(1, 6):
        journal.append(payload(i))

    records, fsync_s = await asyncio.wait_for(batches.get(), timeout=10)

    assert (records, fsync_s) == (5, None)  # one batch, written, not fsynced
    assert ops.fdatasyncs == after_start
    assert journal.durable_seq == 0  # under "always", durable means fsynced
    assert [s for s, _p in recover(state, repair=False).records] == [1, 2, 3, 4, 5]
    await asyncio.wait_for(journal.durable(3), timeout=10)
    assert ops.fdatasyncs == after_start + 1
    assert journal.durable_seq == 5  # the one fsync covers everything written
    await journal.close(snapshot=False)


async def test_always_policy_when_nobody_waits_then_fsynced_within_the_interval(
    tmp_path: Path,
    tasks: asyncio.TaskGroup,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    fsynced = asyncio.Event()
    journal = Journal(
        state,
        recover(state),
        fsync="always",
        fsync_interval_ms=10,
        snapshot_source=dict,
        on_batch=lambda _records, fsync_s: fsynced.set() if fsync_s is not None else None,
    )
    await journal.start(tasks)
    seq = journal.append(payload(1))

    await asyncio.wait_for(fsynced.wait(), timeout=10)

    assert journal.synced_seq == journal.durable_seq == seq
    await journal.close(snapshot=False)


async def test_interval_policy_when_time_passes_then_fsynced_without_asking(
    tmp_path: Path,
    tasks: asyncio.TaskGroup,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    journal = Journal(
        state, recover(state), fsync="interval", fsync_interval_ms=10, snapshot_source=dict
    )
    await journal.start(tasks)
    seq = journal.append(payload(1))
    await journal.durable(seq)

    async def until_synced() -> None:
        while journal.synced_seq < seq:
            await asyncio.sleep(0.005)

    await asyncio.wait_for(until_synced(), timeout=10)
    await journal.close(snapshot=False)


async def test_close_when_never_policy_then_everything_fsynced(
    tmp_path: Path, tasks: asyncio.TaskGroup
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    journal = Journal(state, recover(state), fsync="never", snapshot_source=dict)
    await journal.start(tasks)
    for i in range(5):
        journal.append(payload(i))

    await journal.close(snapshot=False)

    assert journal.synced_seq == 5
    await journal.close()  # idempotent


# --------------------------------------------------------------------------- misuse


async def test_append_when_not_started_or_closed_then_runtime_error(
    tmp_path: Path, tasks: asyncio.TaskGroup
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    journal = Journal(state, recover(state), snapshot_source=dict)
    with pytest.raises(RuntimeError):
        journal.append(payload(1))
    await journal.start(tasks)
    await journal.close()
    with pytest.raises(RuntimeError):
        journal.append(payload(1))


async def test_append_when_payload_not_encodable_then_type_error_and_no_seq_used(
    tmp_path: Path,
    tasks: asyncio.TaskGroup,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    journal = Journal(state, recover(state), snapshot_source=dict)
    await journal.start(tasks)
    with pytest.raises(TypeError):
        journal.append({"qty": object()})
    assert journal.append(payload(1)) == 1
    await journal.close(snapshot=False)


async def test_durable_when_seq_never_appended_then_value_error(
    tmp_path: Path, tasks: asyncio.TaskGroup
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    journal = Journal(state, recover(state), snapshot_source=dict)
    await journal.start(tasks)
    with pytest.raises(ValueError):
        await journal.durable(1)
    await journal.durable(0)
    await journal.close()


# --------------------------------------------------------------------------- lock


def test_lock_when_already_held_in_process_then_state_dir_locked_at_once(tmp_path: Path) -> None:
    state = tmp_path / "a" / "state"
    with lock_state_dir(state) as held:
        assert held.path == state / "LOCK"
        with pytest.raises(StateDirLocked) as info:
            lock_state_dir(state)
        assert str(info.value) == (
            f"another gateway holds the state directory {state} (lock file {state / 'LOCK'})"
        )
    lock_state_dir(state).release()


def test_lock_when_held_by_another_process_then_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    child = (
        "import sys\n"
        "from pathlib import Path\n"
        "from gateway.persistence import StateDirLocked, lock_state_dir\n"
        "try:\n"
        "    lock_state_dir(Path(sys.argv[1]))\n"
        "except StateDirLocked as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    root = Path(__file__).resolve().parents[2]
    with lock_state_dir(state):
        done = subprocess.run(
            [sys.executable, "-c", child, str(state)],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 3, done.stderr
    assert "another gateway holds the state directory" in done.stdout


# --------------------------------------------------------------------------- failure basics


async def test_failed_journal_when_appending_then_persistence_error(
    tmp_path: Path, tasks: asyncio.TaskGroup
) -> None:
    class FailingSync(FileOps):
        armed = False

        def fdatasync(self, fd: int) -> None:
            if self.armed:
                raise OSError(5, "injected EIO")
            super().fdatasync(fd)

    state = tmp_path / "state"
    state.mkdir()
    ops = FailingSync()
    failures: list[PersistenceError] = []
    loop = asyncio.get_running_loop()

    def on_failure(err: PersistenceError) -> None:
        assert asyncio.get_running_loop() is loop  # called on the loop, not the writer thread
        failures.append(err)

    journal = Journal(state, recover(state), snapshot_source=dict, on_failure=on_failure, ops=ops)
    await journal.start(tasks)
    await journal.durable(journal.append(payload(1)))
    ops.armed = True
    seq = journal.append(payload(2))

    with pytest.raises(PersistenceError):
        await asyncio.wait_for(journal.durable(seq), timeout=30)

    assert journal.failed is not None and len(failures) == 1
    assert journal.durable_seq == 1
    with pytest.raises(PersistenceError):
        journal.append(payload(3))
    with pytest.raises(PersistenceError):
        await journal.close()
    assert len(failures) == 1
    assert recover(state).records == [(1, payload(1))]


# ------------------------------------------------------- damage in the last frame


async def test_flipped_bit_in_last_frame_when_recovering_then_damage_never_torn(
    tmp_path: Path,
) -> None:
    # A group-commit frame of many acknowledged records is the last in the
    # file: one flipped bit anywhere in it (header or payload, the length
    # field included) is damage, never a torn tail silently truncated away.
    base = tmp_path / "base"
    await write_records(base, list(range(1, 4)), wave=3)
    await write_records(base, list(range(4, 44)), wave=40)
    name = seg_name(4)
    data = (base / name).read_bytes()
    start = frame_bounds(data)[-2]
    assert frame_counts(data)[-1] == 40
    rng = random.Random(13)
    header_bits = range(start * 8, (start + FRAME_HEADER_BYTES) * 8)
    payload_bits = rng.sample(range((start + FRAME_HEADER_BYTES) * 8, len(data) * 8), 200)
    for bit in [*header_bits, *payload_bits]:
        damaged = bytearray(data)
        damaged[bit // 8] ^= 1 << (bit % 8)
        state = tmp_path / f"bit{bit}"
        shutil.copytree(base, state)
        (state / name).write_bytes(damaged)

        rec = recover(state)

        assert rec.torn_tail is None, bit
        assert rec.damage is not None, bit
        assert (rec.damage.file, rec.damage.offset) == (name, start), (bit, rec.damage)
        assert (state / name).read_bytes() == damaged, "the damaged file was changed"
        assert rec.last_seq == 3


async def test_restarts_when_each_run_appends_less_than_snapshot_every_then_still_snapshots(
    tmp_path: Path,
) -> None:
    # A gateway that crashes often (no snapshot at close) must still snapshot,
    # so a start never replays much more than snapshot_every records.
    state = tmp_path / "state"
    model = Model()
    for run in range(8):
        await write_records(
            state, list(range(run * 6, run * 6 + 6)), model=model, wave=6, snapshot_every=10
        )
        rec = recover(state)
        assert len(rec.records) <= 10 + 6, (run, len(rec.records))
        model = Model(rec)
    assert Model(recover(state)).items == list(range(48))


async def test_flipped_byte_in_snapshot_when_recovering_then_offset_names_its_block(
    tmp_path: Path,
) -> None:
    # A damaged snapshot is reported where it is damaged, not "at offset 0".
    base = tmp_path / "base"
    model = Model()
    model.items = list(range(60_000))  # a payload of several 64 KiB blocks
    await write_records(base, [1, 2, 3], model=model, wave=3, close_snapshot=True)
    (snap,) = base.glob("snapshot-*.snap")
    data = snap.read_bytes()
    assert len(data) > 4 * 65536
    block = 65536
    payload_start = len(data) - len(orjson.dumps({"items": model.items, "halted": False}))
    for flip in [payload_start + 10, payload_start + 3 * block + 77, len(data) - 1]:
        state = tmp_path / f"flip{flip}"
        shutil.copytree(base, state)
        damaged = bytearray(data)
        damaged[flip] ^= 0x10
        (state / snap.name).write_bytes(bytes(damaged))

        rec = recover(state, repair=False)

        assert rec.damage is not None and rec.damage.file == snap.name
        block_start = payload_start + (flip - payload_start) // block * block
        assert rec.damage.offset == block_start, (flip, rec.damage)
        assert "checksum" in rec.damage.detail
