"""The durable shell around a ``RiskEngine``: lock, recovery, journal.

Start-up and crash recovery are one code path (``Store.open``): take the lock
on the state directory, load the newest valid snapshot, replay the journal
after it, and only then let anything be served. Damage that recovery cannot
explain away (a bad record with good ones after it, an unreadable snapshot)
starts the gateway ``halted`` with a critical alert; a fresh directory starts
``normal``.

At run time ``commit`` hands the manager's queued records to the journal and
returns the sequence number to wait on before answering.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gateway.core.engine import RiskEngine
from gateway.core.records import RecordNotApplied
from gateway.journal import (
    Damage,
    Journal,
    PersistenceError,
    Recovered,
    StateLock,
    locate_record,
    lock_state_dir,
    recover,
)
from protocol.codes import AlertCode, AlertLevel

log = logging.getLogger("gateway.store")

FsyncPolicy = str
# Record types that are staged (published once durable): emergency and limits.
_STAGED_TYPES = frozenset({"emg", "lim"})


def rebuild(
    manager: RiskEngine, state_dir: Path, *, repair: bool, now_ms: int
) -> tuple[Recovered, int]:
    """Recover ``state_dir`` into ``manager``: the newest snapshot that loads,
    then the journal records after it. Returns the recovery and how many
    records were replayed.

    Never fails on what the files hold: a snapshot that reads but cannot be
    loaded counts as unreadable (damage; the previous one is used), and a
    record that cannot be applied ends the replay before it (damage naming its
    file, frame offset and seq; the state is rebuilt from scratch up to the
    record before, so nothing of it remains). Start halted on any damage.
    Raises ``OSError`` only when the directory cannot be read or repaired.
    """
    limits = manager.limits
    unusable: dict[int, str] = {}
    while True:
        recovered = recover(state_dir, repair=repair, unusable_snapshots=unusable)
        manager.reset_state(limits, now_ms)
        if recovered.snapshot is not None:
            try:
                manager.load_snapshot(recovered.snapshot)
            except RecordNotApplied as exc:
                unusable[recovered.snapshot_seq] = f"snapshot cannot be loaded ({exc})"
                continue
        try:
            return recovered, manager.replay(recovered.payloads)
        except RecordNotApplied:
            pass
        # Which record: one at a time on a fresh state (only after a failure).
        manager.reset_state(limits, now_ms)
        if recovered.snapshot is not None:
            manager.load_snapshot(recovered.snapshot)
        payloads = recovered.payloads
        failed = _first_not_applied(manager, payloads)
        if failed is None:  # each applies on its own: the state is complete
            return recovered, len(payloads)
        index, why = failed
        seq = recovered.snapshot_seq + 1 + index
        manager.reset_state(limits, now_ms)
        if recovered.snapshot is not None:
            manager.load_snapshot(recovered.snapshot)
        replayed = manager.replay(payloads[:index])
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
    manager: RiskEngine, payloads: list[dict[str, Any]]
) -> tuple[int, str] | None:
    """The index of the first record ``manager`` cannot apply, and why (None:
    applied one at a time, they all apply, and ``manager`` holds them)."""
    for index, record in enumerate(payloads):
        try:
            manager.replay([record])
        except RecordNotApplied as error:
            return index, str(error)
    return None


class Store:
    """Owns one state directory for one manager. Call ``open``, then ``start``."""

    def __init__(
        self,
        manager: RiskEngine,
        state_dir: Path,
        *,
        fsync: str = "always",
        fsync_interval_ms: int = 100,
        snapshot_every: int = 100_000,
        on_failure: Callable[[PersistenceError], None] | None = None,
        on_batch: Callable[[int, float | None], None] | None = None,
        clock: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.manager = manager
        #: Milliseconds since the epoch: the time of the records recovery writes.
        self.clock = clock
        self.state_dir = Path(state_dir)
        self.fsync = fsync
        self.fsync_interval_ms = fsync_interval_ms
        self.snapshot_every = snapshot_every
        #: Called (on the loop) after a journal failure halted the manager.
        self.on_failure = on_failure
        #: Called (on the loop) after staged changes were published, so their
        #: events can be handed on (the server's fan-out).
        self.on_published: Callable[[], None] | None = None
        self._on_batch = on_batch
        self._lock: StateLock | None = None
        self.journal: Journal | None = None
        self.recovered: Recovered | None = None
        self.recovery_seconds = 0.0
        self.replayed = 0

    def open(self) -> Recovered:
        """Lock the directory and rebuild the manager's state from it (sync).

        Raises ``StateDirLocked`` when another gateway holds the directory.
        """
        started = time.perf_counter()
        self._lock = lock_state_dir(self.state_dir)
        # Emergency and limits changes wait for their records to be durable.
        self.manager.defer_publication()
        manager = self.manager
        recovered, self.replayed = rebuild(
            manager, self.state_dir, repair=True, now_ms=self.clock()
        )
        # Replayed: keep the summary (seqs, damage), not the payloads, which
        # would stay alive as long as the gateway (half a gigabyte for a
        # million records).
        recovered = dataclasses.replace(recovered, snapshot=None, payloads=[])
        self.recovered = recovered
        self.recovery_seconds = time.perf_counter() - started
        if recovered.fresh:
            manager.record_initial_state(self.clock())
        damage = recovered.damage
        if damage is not None:
            reason = f"recovery found damage in {damage.describe()}; state is as of seq " + str(
                recovered.last_seq
            )
            log.critical("starting halted: %s", reason)
            manager.force_halt(reason, self.clock())
            manager.raise_alert(
                AlertLevel.CRITICAL, AlertCode.PERSISTENCE_FAILURE, reason, now_ms=self.clock()
            )
        if recovered.torn_tail is not None:
            log.warning("dropped a torn last record: %s", recovered.torn_tail.describe())
        manager.release_orphaned_reservations(self.clock())
        manager.expire_reservations(self.clock())
        return recovered

    async def start(self) -> None:
        """Start the journal writer and make the recovery's own records durable.

        After damage the journal snapshots the (already halted) state and sets
        the damaged files aside as ``<name>.damaged-<ns>``, so the next start
        recovers the same halted state without meeting the damage again.
        """
        assert self.recovered is not None, "call open() first"
        journal = Journal(
            self.state_dir,
            self.recovered,
            fsync=self.fsync,  # type: ignore[arg-type]
            fsync_interval_ms=self.fsync_interval_ms,
            snapshot_every=self.snapshot_every,
            snapshot_source=self.manager.snapshot,
            on_failure=self._failed,
            on_batch=self._on_batch,
        )
        self.journal = journal
        await journal.start()
        seq = self.commit()
        if seq:
            await journal.synced(seq)

    def _failed(self, error: PersistenceError) -> None:
        log.critical("persistence failed: %s", error)
        # The staged changes can never become durable; the halt cannot be
        # written either, so it is held in memory only.
        self.manager.discard_staged()
        self.manager.defer_publication(False)
        self.manager.force_halt(f"persistence failure: {error}", self.clock(), durable=False)
        self.manager.raise_alert(
            AlertLevel.CRITICAL,
            AlertCode.PERSISTENCE_FAILURE,
            f"journal write failed, gateway halted: {error}",
            now_ms=self.clock(),
        )
        # Nothing more can be written: drop what the halt queued for the journal.
        self.manager.drain_records()
        if self.on_failure is not None:
            self.on_failure(error)

    @property
    def failed(self) -> PersistenceError | None:
        return None if self.journal is None else self.journal.failed

    def commit(self) -> int:
        """Append the manager's queued records; the seq of the last one (0: none).

        Raises ``PersistenceError`` when the journal has failed.
        """
        manager = self.manager
        records = manager.drain_records()
        journal = self.journal
        if journal is None:
            return 0
        seq = 0
        append = journal.append
        for rec in records:
            seq = append(rec)
            if rec["t"] in _STAGED_TYPES and manager.is_staged(rec):
                journal.when_synced(seq, functools.partial(self._staged_synced, rec))
        return seq

    def _staged_synced(self, record: Mapping[str, Any], error: PersistenceError | None) -> None:
        """A staged change's record is fsynced (or never will be): publish it."""
        if error is not None:
            return  # the failure discards every staged change (_failed)
        self.manager.publish(record)
        if self.on_published is not None:
            self.on_published()

    async def durable(self, seq: int) -> None:
        if seq and self.journal is not None:
            await self.journal.durable(seq)

    async def synced(self, seq: int) -> None:
        if seq and self.journal is not None:
            await self.journal.synced(seq)

    async def close(self, *, snapshot: bool = True) -> None:
        """Flush, fsync, snapshot (unless failed), and release the lock."""
        try:
            if self.journal is not None:
                if self.manager.has_records() and self.journal.failed is None:
                    self.commit()
                await self.journal.close(snapshot=snapshot and self.journal.failed is None)
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def stats(self) -> dict[str, Any]:
        return {} if self.journal is None else dict(self.journal.stats)
