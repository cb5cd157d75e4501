"""I/O failures: the N-th call failing once or for good, real ENOSPC and EFBIG,
a dead writer, failures during recovery. The contract under test: nothing that was
not made durable is reported durable, the journal fails closed and never retries an
fsync, and a later recovery returns a clean prefix holding every acknowledged record."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.persistence import FileOps, Journal, PersistenceError, lock_state_dir, recover

ROOT = Path(__file__).resolve().parents[2]
MUTATING = frozenset(
    {"open", "write", "fdatasync", "fsync", "ftruncate", "replace", "unlink", "fsync_dir"}
)
# After a failure the journal may still undo a partial write and close its fd;
# anything else would be a retry.
ALLOWED_AFTER_FAULT = frozenset({"ftruncate", "close"})


def payload(i: int) -> dict[str, Any]:
    return {"t": "pos", "account": "A1", "symbol": "BTC-USD", "qty": str(i), "i": i}


def items_of(state: Path) -> tuple[list[int], Any]:
    rec = recover(state)
    items = list(rec.snapshot["items"]) if rec.snapshot is not None else []
    items.extend(p["i"] for _seq, p in rec.records)
    return items, rec


class FaultyOps(FileOps):
    """Fails the ``fail_at``-th call among ``kinds`` (and, if persistent, every later one).

    A failing write first puts half of its data on disk, as a real short write
    followed by ENOSPC does, so the journal's clean-up is exercised too.
    """

    def __init__(self, *, fail_at: int, kinds: frozenset[str], persistent: bool) -> None:
        self.fail_at = fail_at
        self.kinds = kinds
        self.persistent = persistent
        self.calls = 0
        self.tripped_at: int | None = None
        self.log: list[str] = []

    def _fault(self, kind: str) -> bool:
        if kind in self.kinds:
            self.calls += 1
            if self.calls == self.fail_at or (self.persistent and self.calls > self.fail_at):
                if self.tripped_at is None:
                    self.tripped_at = len(self.log)
                self.log.append(kind + "!")
                return True
        self.log.append(kind)
        return False

    def open(self, path: Path, flags: int, mode: int = 0o644) -> int:
        if self._fault("open"):
            raise OSError(errno.EIO, "injected open failure")
        return super().open(path, flags, mode)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if self._fault("write"):
            half = bytes(data[: len(data) // 2])
            if half:
                os.write(fd, half)
            raise OSError(errno.ENOSPC, "injected write failure")
        return super().write(fd, data)

    def fdatasync(self, fd: int) -> None:
        if self._fault("fdatasync"):
            raise OSError(errno.EIO, "injected fdatasync failure")
        super().fdatasync(fd)

    def fsync(self, fd: int) -> None:
        if self._fault("fsync"):
            raise OSError(errno.EIO, "injected fsync failure")
        super().fsync(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        if self._fault("ftruncate"):
            raise OSError(errno.EIO, "injected ftruncate failure")
        super().ftruncate(fd, length)

    def close(self, fd: int) -> None:
        self.log.append("close")
        super().close(fd)

    def replace(self, src: Path, dst: Path) -> None:
        if self._fault("replace"):
            raise OSError(errno.EIO, "injected rename failure")
        super().replace(src, dst)

    def unlink(self, path: Path) -> None:
        if self._fault("unlink"):
            raise OSError(errno.EIO, "injected unlink failure")
        super().unlink(path)

    def fsync_dir(self, path: Path) -> None:
        if self._fault("fsync_dir"):
            raise OSError(errno.EIO, "injected directory fsync failure")
        super().fsync_dir(path)


@dataclass
class Outcome:
    issued: dict[int, int] = field(default_factory=dict)  # seq -> item id
    acked: set[int] = field(default_factory=set)
    refused: set[int] = field(default_factory=set)
    failures: list[PersistenceError] = field(default_factory=list)
    append_refused_after_failure: bool = False
    journal: Journal | None = None


WAVES = (3, 5, 4, 6, 2)  # with snapshot_every=6: snapshots at 8, 18 and 20 (on close)


async def run_workload(state: Path, ops: FileOps, *, policy: Any = "always") -> Outcome:
    out = Outcome()
    rec = recover(state)
    items = list(rec.snapshot["items"]) if rec.snapshot is not None else []
    items.extend(p["i"] for _s, p in rec.records)
    journal = Journal(
        state,
        rec,
        fsync=policy,
        snapshot_every=6,
        snapshot_source=lambda: {"items": list(items)},
        on_failure=out.failures.append,
        ops=ops,
    )
    out.journal = journal
    async with asyncio.TaskGroup() as tasks:
        await run_waves(journal, tasks, items, out)
        with contextlib.suppress(PersistenceError):
            await asyncio.wait_for(journal.close(), timeout=60)
    return out


async def run_waves(
    journal: Journal, tasks: asyncio.TaskGroup, items: list[int], out: Outcome
) -> None:
    next_id = 1000
    try:
        await journal.start(tasks)
    except PersistenceError:
        return
    for size in WAVES:
        seqs = []
        for _ in range(size):
            try:
                seq = journal.append(payload(next_id))
            except PersistenceError:
                out.append_refused_after_failure = True
                break
            items.append(next_id)
            out.issued[seq] = next_id
            seqs.append(seq)
            next_id += 1
        # A waiter that is never resolved must fail the test, not hang it.
        results = await asyncio.wait_for(
            asyncio.gather(*(journal.durable(s) for s in seqs), return_exceptions=True),
            timeout=60,
        )
        for seq, result in zip(seqs, results, strict=True):
            if result is None:
                out.acked.add(seq)
            else:
                assert isinstance(result, PersistenceError), result
                out.refused.add(seq)


def check_outcome(
    state: Path, ops: FaultyOps, out: Outcome, label: str, *, cleanup_works: bool = True
) -> None:
    journal = out.journal
    assert journal is not None
    tripped = ops.tripped_at is not None
    assert (journal.failed is not None) == tripped, label
    assert len(out.failures) == (1 if tripped else 0), label
    if tripped:
        # The faulted record and every later one were refused, never acknowledged.
        if out.acked and out.refused:
            assert max(out.acked) < min(out.refused), label
        with pytest.raises(PersistenceError):
            journal.append(payload(0))
        after = {call.rstrip("!") for call in ops.log[ops.tripped_at + 1 :]}
        assert after <= ALLOWED_AFTER_FAULT, (label, after)
    else:
        assert not out.refused, label

    items, rec = items_of(state)
    assert rec.damage is None, (label, rec.damage)
    # Prefix check: recovery holds the issued records in order, up to some point
    # that includes every acknowledged record, and nothing else.
    issued = [out.issued[s] for s in sorted(out.issued)]
    assert items == issued[: len(items)], label
    if out.acked:
        assert len(items) >= max(out.acked), label
    if out.refused and cleanup_works:
        # Callers were told these failed; with the truncate back working they are gone.
        assert len(items) < min(out.refused), label


async def check_resume(state: Path, label: str) -> None:
    before, _rec = items_of(state)
    lock = lock_state_dir(state)
    try:
        rec = recover(state)
        journal = Journal(state, rec, snapshot_source=lambda: {"items": [*before, 7]})
        async with asyncio.TaskGroup() as tasks:
            await journal.start(tasks)
            await journal.durable(journal.append(payload(7)))
            await journal.close()
    finally:
        lock.release()
    after, rec = items_of(state)
    assert rec.damage is None and after == [*before, 7], label


@pytest.mark.parametrize("persistent", [False, True], ids=["once", "persistent"])
@pytest.mark.parametrize(
    "kinds",
    [frozenset({"write"}), frozenset({"fdatasync", "fsync", "fsync_dir"}), MUTATING],
    ids=["write", "sync", "any"],
)
async def test_nth_call_fails_then_nothing_unsynced_acked_and_recovery_is_clean_prefix(
    tmp_path: Path, kinds: frozenset[str], persistent: bool
) -> None:
    for n in range(1, 200):
        state = tmp_path / f"n{n}"
        state.mkdir()
        ops = FaultyOps(fail_at=n, kinds=kinds, persistent=persistent)

        out = await run_workload(state, ops)

        label = f"fault at call {n}: {ops.log}"
        cleanup_works = not (persistent and "ftruncate" in kinds)
        check_outcome(state, ops, out, label, cleanup_works=cleanup_works)
        await check_resume(state, label)
        if ops.tripped_at is None:
            assert len(out.acked) == sum(WAVES)
            break
    else:
        pytest.fail("the workload never completed without reaching the fault")


@pytest.mark.parametrize("policy", ["interval", "never"])
async def test_nth_write_fails_under_relaxed_policy_then_recovery_is_clean_prefix(
    tmp_path: Path, policy: str
) -> None:
    for n in range(1, 200):
        state = tmp_path / f"n{n}"
        state.mkdir()
        ops = FaultyOps(fail_at=n, kinds=MUTATING, persistent=True)

        out = await run_workload(state, ops, policy=policy)

        label = f"{policy}, fault at call {n}: {ops.log}"
        check_outcome(state, ops, out, label, cleanup_works=False)
        if ops.tripped_at is None:
            break


async def test_snapshot_source_raising_when_snapshot_due_then_fails_closed(
    tmp_path: Path,
    tasks: asyncio.TaskGroup,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    failures: list[PersistenceError] = []
    failed = asyncio.Event()

    def broken() -> dict[str, Any]:
        raise ValueError("state not serialisable")

    def on_failure(error: PersistenceError) -> None:
        failures.append(error)
        failed.set()

    journal = Journal(
        state, recover(state), snapshot_every=2, snapshot_source=broken, on_failure=on_failure
    )
    await journal.start(tasks)
    first = journal.append(payload(1))
    second = journal.append(payload(2))
    # The snapshot is due after the second record, once this callback returns.
    await asyncio.wait_for(failed.wait(), timeout=10)

    assert journal.failed is not None and len(failures) == 1
    with pytest.raises(PersistenceError):
        journal.append(payload(3))
    for seq in (first, second):
        if seq > journal.durable_seq:
            with pytest.raises(PersistenceError):
                await journal.durable(seq)
    with pytest.raises(PersistenceError):
        await journal.close()
    assert recover(state).damage is None


async def test_snapshot_now_when_snapshot_write_fails_then_raises_instead_of_hanging(
    tmp_path: Path,
    tasks: asyncio.TaskGroup,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    # The first rename is the MANIFEST's at start; the second, the snapshot's.
    ops = FaultyOps(fail_at=2, kinds=frozenset({"replace"}), persistent=True)
    failures: list[PersistenceError] = []
    journal = Journal(
        state,
        recover(state),
        snapshot_source=lambda: {"items": [1]},
        on_failure=failures.append,
        ops=ops,
    )
    await journal.start(tasks)
    await journal.durable(journal.append(payload(1)))

    with pytest.raises(PersistenceError):
        await asyncio.wait_for(journal.snapshot_now(), timeout=30)

    assert len(failures) == 1
    with pytest.raises(PersistenceError):
        await journal.close()
    rec = recover(state)
    assert rec.damage is None and rec.records == [(1, payload(1))]
    assert not list(state.glob("*.tmp"))


async def test_writer_task_cancelled_then_journal_fails_and_reports_once(
    tmp_path: Path, tasks: asyncio.TaskGroup
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    failures: list[PersistenceError] = []
    journal = Journal(state, recover(state), snapshot_source=dict, on_failure=failures.append)
    await journal.start(tasks)
    await journal.durable(journal.append(payload(1)))
    (writer,) = [t for t in asyncio.all_tasks() if t.get_name() == "journal-writer"]

    writer.cancel()
    await asyncio.wait([writer])

    assert journal.failed is not None and len(failures) == 1
    with pytest.raises(PersistenceError):
        journal.append(payload(2))
    with pytest.raises(PersistenceError):
        await journal.close()
    assert recover(state).records == [(1, payload(1))]


async def test_file_ops_raising_non_os_error_then_writer_crash_is_a_failure(
    tmp_path: Path,
    tasks: asyncio.TaskGroup,
) -> None:
    class Buggy(FileOps):
        armed = False

        def write(self, fd: int, data: bytes | memoryview) -> int:
            if self.armed:
                raise RuntimeError("bug in the storage layer")
            return super().write(fd, data)

    state = tmp_path / "state"
    state.mkdir()
    ops = Buggy()
    failures: list[PersistenceError] = []
    journal = Journal(
        state, recover(state), snapshot_source=dict, on_failure=failures.append, ops=ops
    )
    await journal.start(tasks)
    ops.armed = True

    with pytest.raises(PersistenceError, match="crashed"):
        await journal.durable(journal.append(payload(1)))

    assert len(failures) == 1
    with pytest.raises(PersistenceError):
        await journal.close()


async def test_repair_fails_during_recovery_then_os_error_and_next_recovery_succeeds(
    tmp_path: Path,
    tasks: asyncio.TaskGroup,
) -> None:
    state = tmp_path / "state"
    lock = lock_state_dir(state)
    journal = Journal(state, recover(state), snapshot_source=dict)
    await journal.start(tasks)
    for i in range(1, 4):
        await journal.durable(journal.append(payload(i)))
    await journal.close(snapshot=False)
    lock.release()
    segment = next(state.glob("journal-*.log"))
    torn = segment.read_bytes()[:-4]

    for kind in ("open", "ftruncate", "fdatasync"):
        case = tmp_path / kind
        case.mkdir()
        (case / segment.name).write_bytes(torn)
        (case / "MANIFEST").write_bytes((state / "MANIFEST").read_bytes())
        with pytest.raises(OSError):
            recover(case, ops=FaultyOps(fail_at=1, kinds=frozenset({kind}), persistent=True))

        rec = recover(case)

        assert rec.damage is None, kind
        assert [s for s, _p in rec.records] == [1, 2], kind
        assert (case / segment.name).stat().st_size == rec_end(rec)
        assert recover(case).torn_tail is None


def rec_end(rec: Any) -> int:
    """Length of the segment holding exactly the records ``rec`` returned, each in a
    frame of its own (each was awaited before the next was appended)."""
    return 20 + sum(21 + len(orjson.dumps([p])) for _s, p in rec.records)


# --------------------------------------------------------------------------- real disk full


def _mount_tmpfs(target: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
        capture_output=True,
        timeout=30,
    )
    return done.returncode == 0


async def test_disk_full_on_tmpfs_then_fails_closed_and_recovery_is_clean_prefix(
    tmp_path: Path,
    tasks: asyncio.TaskGroup,
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not _mount_tmpfs(mnt, "256k"):
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        state = mnt / "state"
        lock = lock_state_dir(state)
        failures: list[PersistenceError] = []
        journal = Journal(
            state,
            recover(state),
            snapshot_every=10**9,
            snapshot_source=dict,
            on_failure=failures.append,
        )
        await journal.start(tasks)
        acked: list[int] = []
        refused: list[int] = []
        blob = "x" * 1500
        for _wave in range(400):
            try:
                seqs = [journal.append({"i": journal.last_seq + 1, "pad": blob}) for _ in range(8)]
            except PersistenceError:
                break
            results = await asyncio.gather(
                *(journal.durable(s) for s in seqs), return_exceptions=True
            )
            for seq, result in zip(seqs, results, strict=True):
                (acked if result is None else refused).append(seq)
        else:
            pytest.fail("a 256 KiB file system never filled up")

        assert refused and max(acked) < min(refused)
        assert len(failures) == 1 and "No space left" in str(failures[0])
        with pytest.raises(PersistenceError):
            await journal.close()

        rec = recover(state)  # same directory, still full
        assert rec.damage is None
        seqs = [s for s, _p in rec.records]
        assert seqs == list(range(1, len(seqs) + 1))
        assert len(seqs) >= max(acked) and len(seqs) < min(refused)
        assert all(p["i"] == s for s, p in rec.records)
        lock.release()
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)


_FSIZE_CHILD = r"""
import asyncio, json, resource, signal, sys
from pathlib import Path
from gateway.persistence import Journal, PersistenceError, lock_state_dir, recover

async def fill(journal):
    acked, refused, error = [], [], None
    for _ in range(400):
        try:
            seqs = [journal.append({"i": journal.last_seq + 1, "pad": "y" * 700}) for _ in range(5)]
        except PersistenceError as exc:
            error = str(exc)
            break
        results = await asyncio.gather(*(journal.durable(s) for s in seqs), return_exceptions=True)
        for seq, result in zip(seqs, results):
            (acked if result is None else refused).append(seq)
    return acked, refused, error

async def main(state):
    lock = lock_state_dir(state)
    journal = Journal(state, recover(state), snapshot_every=10**9, snapshot_source=dict)
    async with asyncio.TaskGroup() as tasks:
        await journal.start(tasks)
        # Only now: the limit applies to files this process writes from here on.
        resource.setrlimit(resource.RLIMIT_FSIZE, (48 * 1024, 48 * 1024))
        acked, refused, error = await fill(journal)
        try:
            await journal.close()
        except PersistenceError:
            pass
    print(json.dumps({"acked": acked, "refused": refused, "error": error}))

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
asyncio.run(main(Path(sys.argv[1])))
"""


def test_file_size_limit_in_subprocess_then_efbig_fails_closed_and_prefix_recovers(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    done = subprocess.run(
        [sys.executable, "-c", _FSIZE_CHILD, str(state)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    acked, refused = result["acked"], result["refused"]
    assert acked and refused and max(acked) < min(refused)
    assert "File too large" in result["error"]

    rec = recover(state)

    assert rec.damage is None
    seqs = [s for s, _p in rec.records]
    assert seqs == list(range(1, len(seqs) + 1))
    assert max(acked) <= len(seqs) < min(refused)
