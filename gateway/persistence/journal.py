"""The loop side of the write-ahead journal: append, group commit, durability waiters.

``append`` queues a record and returns its seq at once; batches of queued records
go to a :class:`~gateway.persistence.segments.SegmentWriter` in the journal's one
writer thread, one batch at a time, and the callers waiting for a seq resume once
the batch that covers it is written (and fdatasync'ed, as the policy says).

Who hands the batches over is the only difference between the two ways to run a
journal. ``start(tasks)`` puts a writer task in the caller's ``TaskGroup``: the
running gateway's way. ``start_inline()`` starts no task: the batches are handed
over from the calls that need them (``durable``, ``synced``...) and from the
journal's timer callbacks, for an embedding host with no long-lived task of its
own. The files, the batches and every promise below are the same.

Durability policies (``fsync=``): ``"always"`` reports a record durable after the
fdatasync that covers it (group commit: one write and one fdatasync per batch);
``"interval"`` and ``"never"`` report it durable once ``write()`` returned, and
fdatasync every ``fsync_interval_ms`` or only when asked (:meth:`Journal.synced`),
respectively. Batches are lazy about records nobody waits for: ``append`` alone
does not start one; ``durable``/``synced`` do, and so do ``LAZY_BATCH_RECORDS``
queued records or ``LAZY_BATCH_DELAY_S`` after the first. Under ``"always"`` a
batch is fdatasync'ed when someone waits for durability or ``fsync_interval_ms``
has passed, so a record that is never awaited (a validation's audit record) is on
disk within ``fsync_interval_ms``.

Any write, fsync or snapshot error fails the journal for good; fsync is never
retried, because after a failed fsync the kernel may have dropped the dirty pages
and a second fsync can succeed without the data.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

import orjson

from gateway.persistence.errors import PersistenceError
from gateway.persistence.fileops import FileOps
from gateway.persistence.framing import MAX_RECORD_BYTES
from gateway.persistence.recovery import Recovered
from gateway.persistence.segments import (
    BatchProgress,
    FsyncPolicy,
    SegmentWriter,
    SnapshotWrite,
    WriteItem,
)

__all__ = ["LAZY_BATCH_DELAY_S", "LAZY_BATCH_RECORDS", "FsyncPolicy", "Journal"]

log = logging.getLogger("gateway.journal")

# Records nobody waits for (a validation's audit record) do not start a batch
# each: one starts when someone awaits ``durable``/``synced``, when this many
# records are queued, or this long after the first record of a batch was queued.
LAZY_BATCH_RECORDS: Final = 1024
LAZY_BATCH_DELAY_S: Final = 0.005

# Who waits for a seq: a future (``durable``/``synced``) or a callback
# (``when_durable``/``when_synced``).
_Waiter = asyncio.Future[None] | Callable[[PersistenceError | None], None]


def _call(
    callback: Callable[[PersistenceError | None], None], error: PersistenceError | None
) -> None:
    try:
        callback(error)
    except Exception:
        log.exception("durability callback raised")


class _Waiters:
    """The callers waiting for one kind of progress, lowest seq first (a heap, so
    a million acknowledgements in flight cost a push and a pop each)."""

    __slots__ = ("_heap", "_tiebreak")

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, _Waiter]] = []
        self._tiebreak = itertools.count()

    def __bool__(self) -> bool:
        return bool(self._heap)

    def add(self, seq: int, waiter: _Waiter) -> None:
        heapq.heappush(self._heap, (seq, next(self._tiebreak), waiter))

    def release(self, upto: int) -> None:
        """Resume every waiter for a seq up to ``upto``, in seq order."""
        heap = self._heap
        while heap and heap[0][0] <= upto:
            waiter = heapq.heappop(heap)[2]
            if not isinstance(waiter, asyncio.Future):
                _call(waiter, None)
            elif not waiter.done():  # a cancelled caller left its future behind
                waiter.set_result(None)

    def fail(self, make: Callable[[], PersistenceError | RuntimeError]) -> None:
        """Tell every waiter its seq will never get there."""
        waiters = [waiter for _seq, _n, waiter in self._heap]
        self._heap.clear()
        for waiter in waiters:
            if not isinstance(waiter, asyncio.Future):
                error = make()
                if not isinstance(error, PersistenceError):  # closed meanwhile
                    error = PersistenceError(f"record not made durable: {error}")
                _call(waiter, error)
            elif not waiter.done():
                waiter.set_exception(make())


class _Ledger:
    """How far the records got (written, fdatasync'ed), who waits for how far, and
    what the batches cost (``stats``)."""

    def __init__(self, policy: FsyncPolicy, last_seq: int) -> None:
        self._always = policy == "always"
        self.written_seq = self.synced_seq = last_seq
        self._durable = _Waiters()
        self._synced = _Waiters()
        self.stats: dict[str, Any] = {
            "records_written": 0,
            "bytes_written": 0,
            "fsyncs": 0,
            "batches": 0,
            "last_batch_records": 0,
            "fsync_seconds_total": 0.0,
            "snapshots": 0,
        }

    @property
    def durable_seq(self) -> int:
        return self.synced_seq if self._always else self.written_seq

    def reached(self, seq: int, *, synced: bool) -> bool:
        return seq <= (self.synced_seq if synced else self.durable_seq)

    def add(self, seq: int, waiter: _Waiter, *, synced: bool) -> None:
        (self._synced if synced else self._durable).add(seq, waiter)

    def owes_sync(self) -> bool:
        """Whether a waiter needs an fdatasync: under "always" whoever waits for
        durability does (records nobody waits for are fsynced on the interval)."""
        return bool(self._synced) or (self._always and bool(self._durable))

    def advance(self, progress: BatchProgress) -> None:
        """Count a batch's progress; ``release`` then resumes who it satisfies."""
        self.written_seq = max(self.written_seq, progress.written_seq)
        self.synced_seq = max(self.synced_seq, progress.synced_seq)
        stats = self.stats
        stats["records_written"] += progress.records
        stats["bytes_written"] += progress.bytes
        stats["fsyncs"] += progress.fsyncs
        stats["fsync_seconds_total"] += progress.fsync_seconds
        stats["last_batch_records"] = progress.records
        stats["snapshots"] += len(progress.snapshots)

    def release(self) -> None:
        self._durable.release(self.durable_seq)
        self._synced.release(self.synced_seq)

    def fail(self, make: Callable[[], PersistenceError | RuntimeError]) -> None:
        self._durable.fail(make)
        self._synced.fail(make)


# What the journal hands the writer thread for one batch: the items, the seq of
# the first record among them, whether to fdatasync after, and where to report.
_Batch = tuple[list[WriteItem], int, bool, BatchProgress]


class _WriterLink:
    """Hands the journal's batches to its writer thread, one at a time.

    Either a writer task (``run_in``) waits to be woken and hands over the next
    batch, or (``run_inline``) ``wake`` and the end of each batch do it from
    callbacks. Both ask ``take_batch`` for the batch (None: nothing is owed now)
    and report each batch's end to ``batch_done`` exactly once, on the loop; a
    batch once handed over always runs to its end, whoever is cancelled.
    """

    def __init__(
        self,
        writer: SegmentWriter,
        *,
        take_batch: Callable[[], _Batch | None],
        batch_done: Callable[[BatchProgress, BaseException | None], None],
        fail: Callable[[PersistenceError, BaseException | None], None],
    ) -> None:
        self._writer = writer
        self._take_batch = take_batch
        self._batch_done = batch_done
        self._fail = fail
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-writer")
        self._event = asyncio.Event()  # wakes the writer task
        self._inline = False
        self._woken = False  # inline: woken while a batch was in flight
        self._batch: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._halted = False
        self._stopping = False
        self._finishing = False
        self._done: asyncio.Future[None] | None = None
        self._soon: asyncio.TimerHandle | None = None
        self._ticking: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def open(self, rescue: SnapshotWrite | None) -> None:
        """Run the writer's ``open`` in its thread; raises what it raises."""
        self._loop = asyncio.get_running_loop()
        await self._loop.run_in_executor(self._executor, self._writer.open, rescue)

    def run_in(self, tasks: asyncio.TaskGroup) -> None:
        self._task = tasks.create_task(self._run(), name="journal-writer")
        self._task.add_done_callback(self._task_ended)

    def run_inline(self) -> None:
        self._inline = True

    def wake(self) -> None:
        """Something may be owed: hand over the next batch once none is in flight."""
        if not self._inline:
            self._event.set()
        elif self._batch is None:
            self._pump()
        else:
            self._woken = True

    def wake_soon(self, delay: float) -> None:
        """``wake`` in ``delay`` seconds, unless woken before."""
        if self._soon is None:
            assert self._loop is not None, "not opened"
            self._soon = self._loop.call_later(delay, self._woken_soon)

    def tick_every(self, seconds: float, tick: Callable[[], None]) -> None:
        """Call ``tick`` every ``seconds`` until the journal fails or is closed."""

        def due() -> None:
            self._ticking = asyncio.get_running_loop().call_later(seconds, due)
            tick()

        self._ticking = asyncio.get_running_loop().call_later(seconds, due)

    def halt(self) -> None:
        """The journal failed: hand over nothing more."""
        self._halted = True
        self._cancel_timers()
        self.wake()

    def stop(self) -> asyncio.Future[None]:
        """Hand over what is still owed, then close the segment and end the thread
        (and the task). The future (the same on every call) resolves once all that
        is done; it never fails."""
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
            self._stopping = True
            if self._task is not None and not self._task.done():
                self._event.set()  # the task hands over the rest, ends, then _finish
            elif self._inline:
                self.wake()
            else:
                self._finish()
        return self._done

    @property
    def stopped(self) -> bool:
        return self._done is not None and self._done.done()

    def _woken_soon(self) -> None:
        self._soon = None
        self.wake()

    def _cancel_timers(self) -> None:
        for handle in (self._soon, self._ticking):
            if handle is not None:
                handle.cancel()
        self._soon = self._ticking = None

    def _submit(self) -> asyncio.Future[None] | None:
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None
        taken = self._take_batch()
        if taken is None:
            return None
        items, first_seq, sync, progress = taken
        loop = asyncio.get_running_loop()
        batch = loop.run_in_executor(
            self._executor, self._writer.run_batch, items, first_seq, sync, progress
        )
        batch.add_done_callback(functools.partial(self._finished, progress))
        self._batch = batch
        return batch

    def _finished(self, progress: BatchProgress, batch: asyncio.Future[None]) -> None:
        self._batch = None
        error = asyncio.CancelledError() if batch.cancelled() else batch.exception()
        self._batch_done(progress, error)
        if self._inline and (self._woken or self._stopping):
            self._pump()

    def _pump(self) -> None:
        self._woken = False
        if (self._halted or self._submit() is None) and self._stopping:
            self._finish()

    async def _run(self) -> None:
        try:
            while True:
                await self._event.wait()
                self._event.clear()
                if self._halted:
                    return
                batch = self._submit()
                if batch is None:
                    if self._stopping:
                        return
                    continue
                # Not cancelled with this task: its end is reported all the same.
                await asyncio.wait([batch])
                if self._stopping:
                    self._event.set()  # one more pass, so a final fsync-only batch runs
        except asyncio.CancelledError:
            self._fail(PersistenceError("journal writer was cancelled"), None)
            raise
        except Exception as exc:
            self._fail(PersistenceError(f"journal writer crashed: {exc!r}"), exc)

    def _task_ended(self, _task: asyncio.Task[None]) -> None:
        if self._stopping:
            self._finish()

    def _finish(self) -> None:
        if self._finishing:
            return
        self._finishing = True
        self._cancel_timers()
        loop = asyncio.get_running_loop()
        # Queued behind any batch still running, so the fd is not closed under a write.
        closed = loop.run_in_executor(self._executor, self._writer.close)
        self._executor.shutdown(wait=False)
        closed.add_done_callback(self._released)

    def _released(self, _closed: asyncio.Future[None]) -> None:
        assert self._done is not None
        if not self._done.done():
            self._done.set_result(None)


class Journal:
    """The single writer of a state directory.

    Build it from ``recover``'s result, ``await start(tasks)`` (or
    ``start_inline()``), then ``append`` records and ``await durable(seq)`` before
    acknowledging what they record; ``await close()`` at the end. On the first
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
        self._damaged = recovered.damage is not None
        self._policy: FsyncPolicy = fsync
        self._interval_s = fsync_interval_ms / 1000
        self._snapshot_every = snapshot_every
        self._snapshot_source = snapshot_source
        self._on_failure = on_failure
        self._on_batch = on_batch
        writer = SegmentWriter(self._dir, recovered, policy=fsync, ops=ops or FileOps())
        self._link = _WriterLink(
            writer, take_batch=self._take_batch, batch_done=self._batch_done, fail=self._fail
        )
        self._last_seq = recovered.last_seq
        self._ledger = _Ledger(fsync, recovered.last_seq)
        self._planned_seq = recovered.last_seq  # the last seq handed to the writer
        self._queue: list[WriteItem] = []
        # Counted from the snapshot, across restarts: a gateway that crashes
        # before every snapshot would otherwise never take one.
        self._since_snapshot = recovered.last_seq - recovered.snapshot_seq
        self._last_snapshot_seq = recovered.snapshot_seq
        self._snapshot_scheduled = False
        self._snapshot_waiters: dict[SnapshotWrite, asyncio.Future[None]] = {}
        self._sync_due = False
        self._started = False
        self._closed = False
        self._failed: PersistenceError | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ properties

    @property
    def last_seq(self) -> int:
        """Seq of the last appended record (durable or not)."""
        return self._last_seq

    @property
    def durable_seq(self) -> int:
        """Every record up to this seq is as durable as the policy promises."""
        return self._ledger.durable_seq

    @property
    def synced_seq(self) -> int:
        """Every record up to this seq has been fdatasync'ed."""
        return self._ledger.synced_seq

    @property
    def failed(self) -> PersistenceError | None:
        """The error that failed the journal, or None while it works."""
        return self._failed

    @property
    def stats(self) -> dict[str, Any]:
        """Counters for metrics (a copy): records_written, bytes_written, fsyncs, batches,
        last_batch_records, fsync_seconds_total, snapshots."""
        return dict(self._ledger.stats)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, tasks: asyncio.TaskGroup) -> None:
        """Open a new segment and start the writer task in ``tasks``; then ``append``
        may be called. The task ends once :meth:`close` is called (earlier if the
        journal fails) and never raises into ``tasks``.

        If the recovery reported damage, first writes a snapshot of ``snapshot_source()``
        at ``last_seq`` and renames every segment and unreadable snapshot to
        ``<name>.damaged-<ns>`` (kept for the operator), so the directory is consistent
        again. Put the state into its halted mode *before* calling ``start`` so the
        snapshot carries it. Raises :class:`PersistenceError` (after ``on_failure``) if
        the directory cannot be prepared; no task is started then.
        """
        await self._open()
        self._link.run_in(tasks)
        if self._policy != "never":  # under "always" too: records nobody waits for
            self._link.tick_every(self._interval_s, self._interval_due)

    async def start_inline(self) -> None:
        """As :meth:`start`, without a task: each batch is handed to the writer thread
        from the callbacks of the calls that need it (``durable``, ``synced``, the
        journal's timers), so nothing has to outlive the caller: for an embedding
        host. The same files and the same promises; ``close()`` is still required."""
        await self._open()
        self._link.run_inline()
        if self._policy != "never":
            self._link.tick_every(self._interval_s, self._interval_due)

    async def close(self, *, snapshot: bool = True) -> None:
        """Write everything queued, fsync it, optionally snapshot, and release all resources.

        Idempotent; cancelling a caller does not stop the close. Raises
        :class:`PersistenceError` (after releasing everything) if the journal failed at
        any time, so a shutdown can tell a clean stop from a lossy one.
        """
        source_error: Exception | None = None
        if not self._closed:
            self._closed = True
            running = self._started and self._failed is None
            if snapshot and running and self._last_seq > self._last_snapshot_seq:
                try:
                    self._queue_snapshot(None)
                except Exception as exc:  # the caller's bug; still drain what is queued
                    source_error = exc
            # Registered first, so every closer resumes with the waiters answered.
            self._link.stop().add_done_callback(self._released)
        await asyncio.shield(self._link.stop())
        if self._failed is not None:
            raise self._caller_error() from self._failed
        if source_error is not None:
            raise source_error

    async def _open(self) -> None:
        if self._started:
            raise RuntimeError("journal already started")
        if self._closed:
            raise RuntimeError("journal is closed")
        self._loop = asyncio.get_running_loop()
        rescue = SnapshotWrite(self._last_seq, self._capture_state()) if self._damaged else None
        self._started = True
        try:
            await self._link.open(rescue)
        except Exception as exc:
            self._fail(PersistenceError(f"cannot open the journal in {self._dir}: {exc}"), exc)
            raise self._caller_error() from exc
        if rescue is not None:
            self._last_snapshot_seq = rescue.seq
            self._ledger.stats["snapshots"] += 1

    def _released(self, _done: asyncio.Future[None]) -> None:
        self._fail_waiters(lambda: RuntimeError("journal closed"))

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
        queue.append(body)  # framed by the writer thread, per batch
        self._last_seq = seq
        if len(queue) >= LAZY_BATCH_RECORDS:
            self._link.wake()
        else:
            self._link.wake_soon(LAZY_BATCH_DELAY_S)
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
        if not self._ledger.reached(seq, synced=False):
            await self._wait(seq, synced=False)

    async def synced(self, seq: int) -> None:
        """Return once record ``seq`` is fdatasync'ed, whatever the policy.

        Under ``"interval"``/``"never"`` this makes the writer fsync promptly rather than
        at the next interval. Raises :class:`PersistenceError` like :meth:`durable`.
        """
        if not self._ledger.reached(seq, synced=True):
            await self._wait(seq, synced=True)

    def when_durable(self, seq: int, callback: Callable[[PersistenceError | None], None]) -> None:
        """Call ``callback(None)`` once record ``seq`` is durable, as ``durable`` would
        return; ``callback(error)`` if it never will be.

        For a caller with many records in flight (a connection's acknowledgements),
        this costs a heap entry instead of a task and a future per record. The
        callback runs on the loop, at once if ``seq`` is durable already, else from
        the journal's bookkeeping: it must be quick, and what it raises is logged.
        Raises like ``durable`` for a seq never appended or a closed journal.
        """
        self._when(seq, callback, synced=False)

    def when_synced(self, seq: int, callback: Callable[[PersistenceError | None], None]) -> None:
        """Call ``callback(None)`` once record ``seq`` is fdatasync'ed, whatever the
        policy (as ``synced`` would return); ``callback(error)`` if it never will be.

        Callbacks for the same or lower seqs run in seq order, before the
        futures of ``synced`` callers of the same seq resume. Otherwise as
        ``when_durable``.
        """
        self._when(seq, callback, synced=True)

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

    # ------------------------------------------------------------------ waiting

    async def _wait(self, seq: int, *, synced: bool) -> None:
        if self._failed is not None:
            raise self._caller_error() from self._failed
        self._check_waitable(seq)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Listed before the wake: the batch a wake starts at once must know it is owed.
        self._ledger.add(seq, fut, synced=synced)
        self._link.wake()
        await fut

    def _when(
        self, seq: int, callback: Callable[[PersistenceError | None], None], *, synced: bool
    ) -> None:
        if self._failed is not None:
            _call(callback, self._caller_error())
        elif self._ledger.reached(seq, synced=synced):
            _call(callback, None)
        else:
            self._check_waitable(seq)
            self._ledger.add(seq, callback, synced=synced)
            self._link.wake()

    def _check_waitable(self, seq: int) -> None:
        if seq > self._last_seq:
            raise ValueError(f"seq {seq} was never appended (last is {self._last_seq})")
        if self._link.stopped:
            raise RuntimeError("journal closed")

    def _caller_error(self) -> PersistenceError:
        # A fresh instance per raise: re-raising one shared instance from many tasks
        # would keep growing its traceback.
        return PersistenceError(str(self._failed))

    # ------------------------------------------------------------------ snapshots

    def _capture_state(self) -> dict[str, Any]:
        # Only the capture runs on the loop; encoding a large state would stall
        # it, so the writer thread does that (see encode_state).
        state = self._snapshot_source()
        if not isinstance(state, dict):
            raise TypeError(f"snapshot_source() returned {type(state).__name__}, not a dict")
        return state

    def _queue_snapshot(self, waiter: asyncio.Future[None] | None) -> None:
        request = SnapshotWrite(self._last_seq, self._capture_state())
        self._queue.append(request)
        if waiter is not None:
            self._snapshot_waiters[request] = waiter
        self._last_snapshot_seq = request.seq
        self._since_snapshot = 0
        self._link.wake()

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

    # ------------------------------------------------------------------ batches

    def _interval_due(self) -> None:
        if self._ledger.written_seq > self._ledger.synced_seq or self._queue:
            self._sync_due = True
            self._link.wake()

    def _take_batch(self) -> _Batch | None:
        """The next batch for the writer thread (None: nothing is owed)."""
        if self._failed is not None:
            return None
        ledger = self._ledger
        sync = ledger.owes_sync() or self._sync_due or self._closed
        if not self._queue and not (sync and ledger.written_seq > ledger.synced_seq):
            return None
        items, self._queue = self._queue, []
        if sync:
            self._sync_due = False
        progress = BatchProgress(written_seq=ledger.written_seq, synced_seq=ledger.synced_seq)
        first_seq = self._planned_seq + 1
        self._planned_seq += sum(1 for item in items if type(item) is bytes)
        return items, first_seq, sync, progress

    def _batch_done(self, progress: BatchProgress, error: BaseException | None) -> None:
        try:
            if error is None:
                self._absorb(progress)
            elif isinstance(error, OSError):
                self._absorb(progress)
                self._fail(PersistenceError(f"journal write failed: {error}"), error)
            else:
                self._fail(PersistenceError(f"journal writer crashed: {error!r}"), error)
        except Exception as exc:  # an on_batch callback raised
            self._fail(PersistenceError(f"journal writer crashed: {exc!r}"), exc)

    def _absorb(self, progress: BatchProgress) -> None:
        self._ledger.stats["batches"] += 1
        if self._failed is not None:
            # Failed elsewhere while this batch ran: waiters were already told it is
            # lost, so durable_seq must not move past what they were told.
            return
        self._ledger.advance(progress)
        if self._on_batch is not None and (progress.records or progress.fsyncs):
            # Per batch, for latency histograms: records written (0 for an
            # fsync-only batch) and, when the batch was fsynced, the time its
            # fsync took.
            self._on_batch(progress.records, progress.fsync_seconds if progress.fsyncs else None)
        for request in progress.snapshots:
            waiter = self._snapshot_waiters.pop(request, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        self._ledger.release()

    def _fail_waiters(self, make: Callable[[], PersistenceError | RuntimeError]) -> None:
        self._ledger.fail(make)
        waiters = list(self._snapshot_waiters.values())
        self._snapshot_waiters.clear()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(make())

    def _fail(self, err: PersistenceError, cause: BaseException | None) -> None:
        if self._failed is not None:
            return
        err.__cause__ = cause
        self._failed = err
        log.error(
            "journal failed; nothing after seq %d will become durable: %s", self.durable_seq, err
        )
        self._fail_waiters(self._caller_error)
        self._link.halt()
        if self._on_failure is not None:
            try:
                self._on_failure(err)
            except Exception:
                log.exception("journal on_failure callback raised")
