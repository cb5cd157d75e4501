"""The store over a state machine it knows only through ``StateMachine``, both ways
of running a journal (a writer task in the owner's TaskGroup, or inline with no
task), and the in-memory store with the same interface."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Limits
from gateway.persistence import (
    FileOps,
    Journal,
    MemoryStore,
    PersistenceError,
    RecordNotApplied,
    Store,
    recover,
)
from protocol.codes import AlertCode, AlertLevel

T0 = 1_700_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


class Tally:
    """The smallest state machine a store can keep: a list of items and a mode.

    ``{"t": "add", "i": n}`` appends an item; ``{"t": "mode", "m": ...}`` is a
    staged change, published once durable.
    """

    def __init__(self) -> None:
        self._limits = Limits()
        self._defer = False
        self.reset_state(self._limits, 0)
        self.alerts: list[tuple[AlertLevel, AlertCode, str, int]] = []
        self.expired_at: list[int] = []
        self.released_at: list[int] = []

    @property
    def limits(self) -> Limits:
        return self._limits

    def reset_state(self, limits: Limits, now_ms: int) -> None:
        self._limits = limits
        self.reset_at = now_ms
        self.items: list[int] = []
        self.mode = "normal"
        self.mode_at = 0
        self._records: list[dict[str, Any]] = []
        self._staged: deque[dict[str, Any]] = deque()

    def add(self, i: int) -> None:
        self.items.append(i)
        self._records.append({"t": "add", "i": i})

    def set_mode(self, mode: str, now_ms: int) -> None:
        record = {"t": "mode", "m": mode, "at": now_ms}
        if self._defer:
            self._staged.append(record)
            self._records.append(record)
        else:
            self._apply(record)

    def _apply(self, record: Mapping[str, Any]) -> None:
        if record["t"] == "add":
            self.items.append(record["i"])
        else:
            self.mode, self.mode_at = record["m"], record["at"]

    def load_snapshot(self, snap: Mapping[str, Any]) -> None:
        try:
            self.items = list(snap["items"])
            self.mode, self.mode_at = snap["mode"], snap["mode_at"]
        except (KeyError, TypeError) as exc:
            raise RecordNotApplied(exc) from exc

    def replay(self, records: Iterable[Mapping[str, Any]]) -> int:
        count = 0
        for record in records:
            try:
                self._apply(record)
            except (KeyError, TypeError) as exc:
                raise RecordNotApplied(exc) from exc
            count += 1
        return count

    def snapshot(self) -> dict[str, Any]:
        return {"items": list(self.items), "mode": self.mode, "mode_at": self.mode_at}

    def drain_records(self) -> list[dict[str, Any]]:
        records, self._records = self._records, []
        return records

    def defer_publication(self, enabled: bool = True) -> None:
        self._defer = enabled

    def is_staged(self, record: Mapping[str, Any]) -> bool:
        return any(staged is record for staged in self._staged)

    def publish(self, record: Mapping[str, Any]) -> None:
        assert self._staged.popleft() is record
        self._apply(record)

    def discard_staged(self) -> int:
        count = len(self._staged)
        self._staged.clear()
        return count

    def record_initial_state(self, now_ms: int) -> None:
        self.mode_at = now_ms
        self._records.append({"t": "mode", "m": "normal", "at": now_ms})

    def force_halt(self, reason: str, now_ms: int, *, durable: bool = True) -> None:
        if durable:
            self.set_mode("halted", now_ms)
        else:
            self._apply({"t": "mode", "m": "halted", "at": now_ms})

    def raise_alert(self, level: AlertLevel, code: AlertCode, message: str, *, now_ms: int) -> None:
        self.alerts.append((level, code, message, now_ms))

    def release_orphaned_reservations(self, now_ms: int) -> int:
        self.released_at.append(now_ms)
        return 0

    def expire_reservations(self, now_ms: int) -> None:
        self.expired_at.append(now_ms)


def writer_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "journal-writer"]


async def test_store_when_opened_fresh_then_every_time_it_hands_over_comes_from_its_clock(
    tmp_path: Path, tasks: asyncio.TaskGroup
) -> None:
    clock, machine = Clock(), Tally()
    store = Store(machine, tmp_path / "state", clock=clock)

    recovered = store.open()

    assert recovered.fresh
    assert machine.mode_at == T0
    assert machine.released_at == machine.expired_at == [T0]
    assert machine.reset_at == T0
    assert not store.started and store.last_seq == 0
    await store.start(tasks)
    assert store.started
    assert store.last_seq == 1  # the initial state, synced by start
    await store.close()


async def test_store_when_records_committed_then_durable_and_back_after_a_restart(
    tmp_path: Path, tasks: asyncio.TaskGroup
) -> None:
    state = tmp_path / "state"
    clock, machine = Clock(), Tally()
    store = Store(machine, state, clock=clock, snapshot_every=4)
    store.open()
    await store.start(tasks)
    answered: list[PersistenceError | None] = []
    for i in range(10):
        machine.add(i)
        seq = store.commit()
        store.when_durable(seq, answered.append)
    await store.durable(store.last_seq)
    assert answered == [None] * 10
    await store.snapshot_now()
    machine.add(10)
    await store.synced(store.commit())
    await store.close(snapshot=False)

    clock.now = T0 + 5
    again = Tally()
    reopened = Store(again, state, clock=clock)
    recovered = reopened.open()

    assert recovered.damage is None and recovered.last_seq == store.last_seq == 12
    assert again.items == list(range(11))
    assert again.expired_at == [T0 + 5]
    await reopened.close()


def hold_fsyncs(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """From now on every fdatasync waits for the first event; the second is set
    once one waits."""
    gate, held = threading.Event(), threading.Event()
    real_fdatasync = FileOps.fdatasync

    def gated_fdatasync(self: FileOps, fd: int) -> None:
        held.set()
        gate.wait(10)
        real_fdatasync(self, fd)

    monkeypatch.setattr(FileOps, "fdatasync", gated_fdatasync)
    return gate, held


async def test_store_when_staged_change_committed_then_published_only_once_synced(
    tmp_path: Path, tasks: asyncio.TaskGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    machine = Tally()
    store = Store(machine, tmp_path / "state", clock=Clock(), fsync="never")
    published = asyncio.Event()
    store.on_published = published.set
    store.open()
    await store.start(tasks)
    gate, held = hold_fsyncs(monkeypatch)

    machine.set_mode("halted", T0 + 1)
    seq = store.commit()
    assert await asyncio.to_thread(held.wait, 10)  # its fsync has begun, not ended
    assert machine.mode == "normal" and not published.is_set()
    gate.set()
    await store.synced(seq)

    assert published.is_set() and machine.mode == "halted"
    await store.close()


async def test_store_when_recovery_finds_damage_then_halted_at_its_clock_with_alert(
    tmp_path: Path, tasks: asyncio.TaskGroup
) -> None:
    state = tmp_path / "state"
    first = Store(Tally(), state, clock=Clock())
    first.open()
    await first.start(tasks)
    await first.close()
    (state / "MANIFEST").unlink()  # every journal file is recovered, and that is damage

    clock, machine = Clock(), Tally()
    clock.now = T0 + 9
    store = Store(machine, state, clock=clock)
    recovered = store.open()

    assert recovered.damage is not None
    assert machine.mode == "normal"  # staged: published once its record is fsynced
    assert [(a[0], a[1], a[3]) for a in machine.alerts] == [
        (AlertLevel.CRITICAL, AlertCode.PERSISTENCE_FAILURE, T0 + 9)
    ]
    await store.start(tasks)
    assert (machine.mode, machine.mode_at) == ("halted", T0 + 9)
    await store.close()


async def test_store_when_journal_fails_then_machine_halted_in_memory_and_owner_told(
    tmp_path: Path, tasks: asyncio.TaskGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock, machine = Clock(), Tally()
    failures: list[PersistenceError] = []
    store = Store(machine, tmp_path / "state", clock=clock, on_failure=failures.append)
    store.open()
    await store.start(tasks)

    def failing_write(self: FileOps, fd: int, data: bytes | memoryview) -> int:
        raise OSError(5, "injected EIO")

    monkeypatch.setattr(FileOps, "write", failing_write)
    machine.set_mode("reducing", T0)
    clock.now = T0 + 3

    with pytest.raises(PersistenceError):
        await store.synced(store.commit())

    assert len(failures) == 1 and store.failed is not None
    assert (machine.mode, machine.mode_at) == ("halted", T0 + 3)
    assert machine.drain_records() == []
    with pytest.raises(PersistenceError):
        await store.close()


async def test_store_started_inline_when_records_awaited_then_durable_without_a_task(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    machine = Tally()
    store = Store(machine, state, clock=Clock())
    store.open()
    before = asyncio.all_tasks()

    await store.start_inline()
    for i in range(5):
        machine.add(i)
    seq = store.commit()
    await store.durable(seq)
    machine.set_mode("halted", T0 + 2)
    await store.synced(store.commit())
    assert machine.mode == "halted"
    await store.close(snapshot=False)

    assert asyncio.all_tasks() == before

    assert recover(state).last_seq == seq + 1
    again = Tally()
    Store(again, state, clock=Clock()).open()
    assert again.items == list(range(5)) and again.mode == "halted"


class CountingSyncs(FileOps):
    def __init__(self) -> None:
        self.fdatasyncs = 0
        self.lock = threading.Lock()

    def fdatasync(self, fd: int) -> None:
        super().fdatasync(fd)
        with self.lock:
            self.fdatasyncs += 1


def payload(i: int) -> dict[str, Any]:
    return {"t": "add", "i": i}


async def test_inline_journal_when_many_wait_at_once_then_group_commit_and_no_task(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    ops = CountingSyncs()
    journal = Journal(state, recover(state), snapshot_source=dict, ops=ops)
    before = asyncio.all_tasks()
    await journal.start_inline()
    after_start = ops.fdatasyncs
    acked: list[int] = []

    async def producer(k: int) -> None:
        for round_ in range(3):
            seq = journal.append(payload(k * 10 + round_))
            await journal.durable(seq)
            assert journal.synced_seq >= seq
            acked.append(seq)

    await asyncio.gather(*(producer(k) for k in range(100)))

    assert sorted(acked) == list(range(1, 301))
    assert ops.fdatasyncs - after_start < 300 / 5
    await journal.close(snapshot=False)
    assert asyncio.all_tasks() == before
    records = recover(state).records
    assert [s for s, _p in records] == list(range(1, 301))
    assert sorted(p["i"] for _s, p in records) == sorted(
        k * 10 + r for k in range(100) for r in range(3)
    )


async def test_inline_journal_when_nobody_waits_then_fsynced_within_the_interval(
    tmp_path: Path,
) -> None:
    # The promise of start(): a record never awaited is on disk within
    # fsync_interval_ms under "always", with no task running.
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
    await journal.start_inline()
    seq = journal.append(payload(1))

    await asyncio.wait_for(fsynced.wait(), timeout=10)

    assert journal.synced_seq == journal.durable_seq == seq
    await journal.close(snapshot=False)


async def test_inline_journal_when_closed_with_records_queued_then_written_and_snapshotted(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    journal = Journal(
        state, recover(state), fsync="never", snapshot_source=lambda: {"items": [1, 2, 3]}
    )
    await journal.start_inline()
    for i in (1, 2, 3):
        journal.append(payload(i))

    await journal.close()

    assert journal.synced_seq == 3
    rec = recover(state)
    assert rec.snapshot_seq == 3 and rec.snapshot == {"items": [1, 2, 3]}
    await journal.close()  # idempotent


class HeldSyncs(FileOps):
    """fdatasync waits at the gate once it is closed; ``held`` says one waits."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.held = threading.Event()

    def fdatasync(self, fd: int) -> None:
        if not self.gate.is_set():
            self.held.set()
        self.gate.wait(10)
        super().fdatasync(fd)


@pytest.mark.parametrize("inline", [False, True], ids=["task", "inline"])
async def test_close_when_its_caller_is_cancelled_then_the_close_still_completes(
    tmp_path: Path, tasks: asyncio.TaskGroup, inline: bool
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    ops = HeldSyncs()
    journal = Journal(state, recover(state), snapshot_source=dict, ops=ops)
    if inline:
        await journal.start_inline()
    else:
        await journal.start(tasks)
    ops.gate.clear()
    journal.append(payload(1))
    closing = tasks.create_task(journal.close(snapshot=False))
    assert await asyncio.to_thread(ops.held.wait, 10)

    closing.cancel()
    await asyncio.wait([closing])
    ops.gate.set()
    await asyncio.wait_for(journal.close(), timeout=10)

    assert closing.cancelled()
    assert journal.synced_seq == 1
    assert recover(state).records == [(1, payload(1))]


async def test_memory_store_when_used_like_a_store_then_nothing_to_wait_for(
    tasks: asyncio.TaskGroup,
) -> None:
    machine = Tally()
    store = MemoryStore(machine)

    assert store.open().fresh
    await store.start(tasks)
    assert store.started and writer_tasks() == []
    machine.add(1)
    machine.set_mode("halted", T0)  # not deferred: published at once
    assert machine.mode == "halted"
    assert store.commit() == 0
    assert machine.drain_records() == []  # drained, so they never pile up
    answered: list[PersistenceError | None] = []
    store.when_durable(0, answered.append)
    assert answered == [None]
    await store.durable(0)
    await store.synced(0)
    await store.snapshot_now()
    assert store.failed is None and store.last_seq == 0 and store.stats() == {}
    await store.close()
