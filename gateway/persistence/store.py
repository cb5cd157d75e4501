"""The durable shell around a state machine: lock, recovery, journal, commit.

Start-up and crash recovery are one code path (``Store.open``): take the lock
on the state directory, load the newest valid snapshot, replay the journal
after it, and only then let anything be served. Damage that recovery cannot
explain away (a bad record with good ones after it, an unreadable snapshot)
starts the state machine ``halted`` with a critical alert; a fresh directory
starts ``normal``.

At run time ``commit`` hands the state machine's queued records to the journal
and returns the sequence number to wait on before answering. The store knows
the state machine only through :class:`StateMachine`: records are opaque dicts
to it, and every time it hands over comes from the clock it was given.

:class:`MemoryStore` has the same interface and keeps nothing, for a state
machine without a state directory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from gateway.persistence.errors import Damage, PersistenceError, RecordNotApplied
from gateway.persistence.journal import Journal
from gateway.persistence.lock import StateLock, lock_state_dir
from gateway.persistence.recovery import Recovered, locate_record, recover
from gateway.persistence.segments import FsyncPolicy
from protocol.codes import AlertCode, AlertLevel

if TYPE_CHECKING:
    from gateway.core.limits import Limits

__all__ = ["MemoryStore", "RecordStore", "StateMachine", "Store", "rebuild"]

log = logging.getLogger("gateway.store")


class StateMachine(Protocol):
    """What a store needs of the state it keeps durable.

    The state machine queues a journal record (a JSON-able dict) for each change
    and hands them over once (``drain_records``); it rebuilds itself from a
    ``snapshot()`` and the records after it. Emergency and limits changes are
    *staged*: journaled first, published once their record is fdatasync'ed.
    ``replay`` and ``load_snapshot`` raise :class:`RecordNotApplied` for a record
    or snapshot they cannot apply. Every time is passed in as ``now_ms``.
    """

    @property
    def limits(self) -> Limits: ...

    def reset_state(self, limits: Limits, now_ms: int) -> None: ...

    def load_snapshot(self, snap: Mapping[str, Any]) -> None: ...

    def replay(self, records: Iterable[Mapping[str, Any]]) -> int: ...

    def snapshot(self) -> dict[str, Any]: ...

    def drain_records(self) -> Sequence[Mapping[str, Any]]: ...

    def defer_publication(self, enabled: bool = True) -> None: ...

    def is_staged(self, record: Mapping[str, Any]) -> bool: ...

    def publish(self, record: Mapping[str, Any]) -> None: ...

    def discard_staged(self) -> int: ...

    def record_initial_state(self, now_ms: int) -> None: ...

    def force_halt(self, reason: str, now_ms: int, *, durable: bool = True) -> None: ...

    def raise_alert(
        self, level: AlertLevel, code: AlertCode, message: str, *, now_ms: int
    ) -> None: ...

    def release_orphaned_reservations(self, now_ms: int) -> int: ...

    def expire_reservations(self, now_ms: int) -> None: ...


def rebuild(
    machine: StateMachine, state_dir: Path, *, repair: bool, now_ms: int
) -> tuple[Recovered, int]:
    """Recover ``state_dir`` into ``machine``: the newest snapshot that loads,
    then the journal records after it. Returns the recovery and how many
    records were replayed.

    Never fails on what the files hold: a snapshot that reads but cannot be
    loaded counts as unreadable (damage; the previous one is used), and a
    record that cannot be applied ends the replay before it (damage naming its
    file, frame offset and seq; the state is rebuilt from scratch up to the
    record before, so nothing of it remains). Start halted on any damage.
    Raises ``OSError`` only when the directory cannot be read or repaired.
    """
    limits = machine.limits
    unusable: dict[int, str] = {}
    while True:
        recovered = recover(state_dir, repair=repair, unusable_snapshots=unusable)
        machine.reset_state(limits, now_ms)
        if recovered.snapshot is not None:
            try:
                machine.load_snapshot(recovered.snapshot)
            except RecordNotApplied as exc:
                unusable[recovered.snapshot_seq] = f"snapshot cannot be loaded ({exc})"
                continue
        try:
            return recovered, machine.replay(recovered.payloads)
        except RecordNotApplied:
            pass
        # Which record: one at a time on a fresh state (only after a failure).
        machine.reset_state(limits, now_ms)
        if recovered.snapshot is not None:
            machine.load_snapshot(recovered.snapshot)
        payloads = recovered.payloads
        failed = _first_not_applied(machine, payloads)
        if failed is None:  # each applies on its own: the state is complete
            return recovered, len(payloads)
        index, why = failed
        seq = recovered.snapshot_seq + 1 + index
        machine.reset_state(limits, now_ms)
        if recovered.snapshot is not None:
            machine.load_snapshot(recovered.snapshot)
        replayed = machine.replay(payloads[:index])
        where = locate_record(state_dir, seq) or ("journal", 0)
        damage = Damage(
            file=where[0], offset=where[1], detail=f"record {seq} cannot be applied ({why})"
        )
        return (
            dataclasses.replace(
                recovered,
                payloads=payloads[:index],
                last_seq=seq - 1,
                damage=recovered.damage or damage,
                torn_tail=None,
            ),
            replayed,
        )


def _first_not_applied(
    machine: StateMachine, payloads: list[dict[str, Any]]
) -> tuple[int, str] | None:
    """The index of the first record ``machine`` cannot apply, and why (None:
    applied one at a time, they all apply, and ``machine`` holds them)."""
    for index, record in enumerate(payloads):
        try:
            machine.replay([record])
        except RecordNotApplied as error:
            return index, str(error)
    return None


class RecordStore(Protocol):
    """What the server needs of a store, durable (:class:`Store`) or not
    (:class:`MemoryStore`)."""

    #: Called (on the loop) after a journal failure halted the state machine.
    on_failure: Callable[[PersistenceError], None] | None
    #: Called (on the loop) after staged changes were published.
    on_published: Callable[[], None] | None
    recovered: Recovered | None
    replayed: int
    recovery_seconds: float

    @property
    def started(self) -> bool: ...

    @property
    def failed(self) -> PersistenceError | None: ...

    @property
    def last_seq(self) -> int: ...

    def open(self) -> Recovered: ...

    async def start(self, tasks: asyncio.TaskGroup) -> None: ...

    async def start_inline(self) -> None: ...

    def commit(self) -> int: ...

    def when_durable(
        self, seq: int, callback: Callable[[PersistenceError | None], None]
    ) -> None: ...

    async def durable(self, seq: int) -> None: ...

    async def synced(self, seq: int) -> None: ...

    async def snapshot_now(self) -> None: ...

    async def close(self, *, snapshot: bool = True) -> None: ...

    def stats(self) -> dict[str, Any]: ...


class Store:
    """Owns one state directory for one state machine.

    Call ``open`` (recovery), then ``start(tasks)`` or ``start_inline()``, then
    ``commit`` after each change and wait (``durable``/``synced``/``when_durable``)
    before answering; ``close`` at the end. ``clock`` gives the time (milliseconds
    since the epoch) of everything the store does to the state machine.
    """

    def __init__(
        self,
        machine: StateMachine,
        state_dir: Path,
        *,
        clock: Callable[[], int],
        fsync: FsyncPolicy = "always",
        fsync_interval_ms: int = 100,
        snapshot_every: int = 100_000,
        on_failure: Callable[[PersistenceError], None] | None = None,
        on_batch: Callable[[int, float | None], None] | None = None,
    ) -> None:
        self.machine = machine
        self.state_dir = Path(state_dir)
        self.fsync: FsyncPolicy = fsync
        self.fsync_interval_ms = fsync_interval_ms
        self.snapshot_every = snapshot_every
        self._clock = clock
        #: Called (on the loop) after a journal failure halted the state machine.
        self.on_failure = on_failure
        #: Called (on the loop) after staged changes were published, so their
        #: events can be handed on (the server's fan-out).
        self.on_published: Callable[[], None] | None = None
        self._on_batch = on_batch
        self._lock: StateLock | None = None
        self._journal: Journal | None = None
        self.recovered: Recovered | None = None
        self.recovery_seconds = 0.0
        self.replayed = 0

    def open(self) -> Recovered:
        """Lock the directory and rebuild the state machine from it (sync).

        Raises ``StateDirLocked`` when another gateway holds the directory.
        """
        started = time.perf_counter()
        self._lock = lock_state_dir(self.state_dir)
        machine = self.machine
        # Emergency and limits changes wait for their records to be durable.
        machine.defer_publication()
        recovered, self.replayed = rebuild(
            machine, self.state_dir, repair=True, now_ms=self._clock()
        )
        # Replayed: keep the summary (seqs, damage), not the payloads, which
        # would stay alive as long as the gateway (half a gigabyte for a
        # million records).
        recovered = dataclasses.replace(recovered, snapshot=None, payloads=[])
        self.recovered = recovered
        self.recovery_seconds = time.perf_counter() - started
        if recovered.fresh:
            machine.record_initial_state(self._clock())
        damage = recovered.damage
        if damage is not None:
            reason = f"recovery found damage in {damage.describe()}; state is as of seq " + str(
                recovered.last_seq
            )
            log.critical("starting halted: %s", reason)
            machine.force_halt(reason, self._clock())
            machine.raise_alert(
                AlertLevel.CRITICAL, AlertCode.PERSISTENCE_FAILURE, reason, now_ms=self._clock()
            )
        if recovered.torn_tail is not None:
            log.warning("dropped a torn last record: %s", recovered.torn_tail.describe())
        machine.release_orphaned_reservations(self._clock())
        machine.expire_reservations(self._clock())
        return recovered

    async def start(self, tasks: asyncio.TaskGroup) -> None:
        """Start the journal's writer task in ``tasks`` and make the recovery's own
        records durable. The task ends once ``close`` is called.

        After damage the journal snapshots the (already halted) state and sets
        the damaged files aside as ``<name>.damaged-<ns>``, so the next start
        recovers the same halted state without meeting the damage again.
        """
        await self._new_journal().start(tasks)
        await self._commit_recovery()

    async def start_inline(self) -> None:
        """As ``start``, with no task (``Journal.start_inline``): for an embedding
        host without a task of its own."""
        await self._new_journal().start_inline()
        await self._commit_recovery()

    def _new_journal(self) -> Journal:
        assert self.recovered is not None, "call open() first"
        if self._journal is not None:
            raise RuntimeError("store already started")
        self._journal = Journal(
            self.state_dir,
            self.recovered,
            fsync=self.fsync,
            fsync_interval_ms=self.fsync_interval_ms,
            snapshot_every=self.snapshot_every,
            snapshot_source=self.machine.snapshot,
            on_failure=self._journal_failed,
            on_batch=self._on_batch,
        )
        return self._journal

    async def _commit_recovery(self) -> None:
        seq = self.commit()
        if seq:
            await self.synced(seq)

    def _journal_failed(self, error: PersistenceError) -> None:
        log.critical("persistence failed: %s", error)
        machine = self.machine
        # The staged changes can never become durable; the halt cannot be
        # written either, so it is held in memory only.
        machine.discard_staged()
        machine.defer_publication(False)
        machine.force_halt(f"persistence failure: {error}", self._clock(), durable=False)
        machine.raise_alert(
            AlertLevel.CRITICAL,
            AlertCode.PERSISTENCE_FAILURE,
            f"journal write failed, gateway halted: {error}",
            now_ms=self._clock(),
        )
        # Nothing more can be written: drop what the halt queued for the journal.
        machine.drain_records()
        if self.on_failure is not None:
            self.on_failure(error)

    @property
    def started(self) -> bool:
        """Whether ``start`` or ``start_inline`` was called."""
        return self._journal is not None

    @property
    def failed(self) -> PersistenceError | None:
        """The journal's failure (None while it works, or before ``start``)."""
        return None if self._journal is None else self._journal.failed

    @property
    def last_seq(self) -> int:
        """Seq of the last record committed (0 before ``start``)."""
        return 0 if self._journal is None else self._journal.last_seq

    def commit(self) -> int:
        """Append the state machine's queued records; the seq of the last one (0: none).

        Before ``start`` the records are dropped. Raises ``PersistenceError`` when
        the journal has failed.
        """
        machine = self.machine
        records = machine.drain_records()
        journal = self._journal
        if journal is None:
            return 0
        seq = 0
        append = journal.append
        for rec in records:
            seq = append(rec)
            if machine.is_staged(rec):
                journal.when_synced(seq, functools.partial(self._staged_synced, rec))
        return seq

    def _staged_synced(self, record: Mapping[str, Any], error: PersistenceError | None) -> None:
        """A staged change's record is fsynced (or never will be): publish it."""
        if error is not None:
            return  # the failure discards every staged change (_journal_failed)
        self.machine.publish(record)
        if self.on_published is not None:
            self.on_published()

    def when_durable(self, seq: int, callback: Callable[[PersistenceError | None], None]) -> None:
        """Call ``callback(None)`` once record ``seq`` is durable (at once for 0),
        ``callback(error)`` if it never will be; see ``Journal.when_durable``."""
        if seq and self._journal is not None:
            self._journal.when_durable(seq, callback)
        else:
            callback(None)

    async def durable(self, seq: int) -> None:
        """Return once record ``seq`` is durable (at once for 0); see ``Journal.durable``."""
        if seq and self._journal is not None:
            await self._journal.durable(seq)

    async def synced(self, seq: int) -> None:
        """Return once record ``seq`` is fdatasync'ed (at once for 0)."""
        if seq and self._journal is not None:
            await self._journal.synced(seq)

    async def snapshot_now(self) -> None:
        """Snapshot the state as of ``last_seq`` now; see ``Journal.snapshot_now``."""
        if self._journal is None:
            raise RuntimeError("store not started")
        await self._journal.snapshot_now()

    async def close(self, *, snapshot: bool = True) -> None:
        """Flush, fsync, snapshot (unless failed), and release the lock."""
        try:
            journal = self._journal
            if journal is not None:
                if journal.failed is None:
                    self.commit()  # what is still queued, if anything
                await journal.close(snapshot=snapshot and journal.failed is None)
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def stats(self) -> dict[str, Any]:
        """The journal's counters (``Journal.stats``; empty before ``start``)."""
        return {} if self._journal is None else self._journal.stats


class MemoryStore:
    """A store that keeps nothing, with :class:`Store`'s interface: for a state
    machine without a state directory.

    Nothing is ever waited for: ``commit`` drops the queued records and returns 0,
    ``durable``/``synced`` return at once, it never fails. The state machine is
    not asked to defer publication, so staged changes are published at once.
    """

    def __init__(self, machine: StateMachine) -> None:
        self.machine = machine
        self.on_failure: Callable[[PersistenceError], None] | None = None
        self.on_published: Callable[[], None] | None = None
        self.recovered: Recovered | None = None
        self.replayed = 0
        self.recovery_seconds = 0.0
        self._started = False

    def open(self) -> Recovered:
        """A fresh start: there is nothing to recover."""
        self.recovered = Recovered(
            snapshot=None,
            snapshot_seq=0,
            payloads=[],
            last_seq=0,
            damage=None,
            torn_tail=None,
            fresh=True,
        )
        return self.recovered

    async def start(self, tasks: asyncio.TaskGroup) -> None:
        """Starts no task: there is nothing to write."""
        self._started = True

    async def start_inline(self) -> None:
        self._started = True

    @property
    def started(self) -> bool:
        return self._started

    @property
    def failed(self) -> PersistenceError | None:
        return None

    @property
    def last_seq(self) -> int:
        return 0

    def commit(self) -> int:
        """Drop the state machine's queued records; 0 (nothing to wait for)."""
        self.machine.drain_records()
        return 0

    def when_durable(self, seq: int, callback: Callable[[PersistenceError | None], None]) -> None:
        callback(None)

    async def durable(self, seq: int) -> None:
        return None

    async def synced(self, seq: int) -> None:
        return None

    async def snapshot_now(self) -> None:
        return None

    async def close(self, *, snapshot: bool = True) -> None:
        self.machine.drain_records()

    def stats(self) -> dict[str, Any]:
        return {}


if TYPE_CHECKING:
    # Both stores meet RecordStore; mypy checks it here, at no run-time cost.
    def _conforms(durable: Store, memory: MemoryStore) -> tuple[RecordStore, RecordStore]:
        return durable, memory
