"""Recovery figures for ``riskctl bench`` (section 6), run as subprocesses.

The benchmark's load generator (``clients.bench``) speaks the wire protocol
only and never imports ``gateway``. Timing a recovery needs the gateway's own
persistence, so that part lives here and runs in processes of its own (a
fresh process, so the recovery is timed without the writer's warm state):

    python -m gateway.benchtools journal STATE_DIR RECORDS
    python -m gateway.benchtools recover STATE_DIR

Each command prints one JSON object on the last line of stdout and exits 0
(see :class:`JournalWritten` and :class:`RecoveryTimed` for its fields); a
wrong command line exits 2 with the usage on stderr. Both import the
journal, the store and the manager from this one module, so they follow
those modules wherever they live.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TypedDict

import orjson

from gateway.core.engine import RiskEngine
from gateway.core.limits import Limits
from gateway.persistence import Journal, Store, recover

USAGE = "usage: python -m gateway.benchtools journal STATE_DIR RECORDS | recover STATE_DIR"

#: Accounts and symbols of the written journal: 100 x 1,000 = 100,000
#: positions, so a million records update each position ten times.
ACCOUNTS = 100
SYMBOLS = 1000


class JournalWritten(TypedDict):
    """What ``journal`` prints: seconds to write, bytes of journal segments."""

    seconds: float
    bytes: int


class RecoveryTimed(TypedDict):
    """What ``recover`` prints.

    ``seconds`` is ``Store.open()`` (lock, recover, replay). The split into
    ``recover_seconds`` (reading) and ``replay_seconds`` (the rest) comes from
    reading the directory once more afterwards, so it is rough and can even
    come out negative.
    """

    seconds: float
    recover_seconds: float
    replay_seconds: float
    replayed: int
    positions: int


async def write_journal(state_dir: Path, records: int) -> float:
    """Fill ``state_dir`` with ``records`` position records (fsync never, no
    snapshot); returns the seconds it took, closing included."""
    started = time.perf_counter()
    journal = Journal(
        state_dir,
        recover(state_dir),
        fsync="never",
        snapshot_every=records + 1,
        snapshot_source=dict,
    )
    now = time.time_ns() // 1_000_000
    async with asyncio.TaskGroup() as tasks:
        await journal.start(tasks)
        for i in range(records):
            journal.append(
                {
                    "t": "pos",
                    "a": f"A{i % ACCOUNTS}",
                    "s": f"S{(i // ACCOUNTS) % SYMBOLS}",
                    "q": str(i % 50 - 25),
                    "p": f"{100 + i % 17}.25",
                    "ts": now + i // 1000,
                }
            )
            if i % 10_000 == 9_999:
                await asyncio.sleep(0)  # let the writer drain what is queued
        await journal.close(snapshot=False)
    return time.perf_counter() - started


def journal_bytes(state_dir: Path) -> int:
    """Bytes of the journal segments in ``state_dir``."""
    return sum(path.stat().st_size for path in state_dir.glob("journal-*"))


def time_recovery(state_dir: Path) -> RecoveryTimed:
    """Time ``Store.open()`` of ``state_dir`` in this process (call it in a fresh one)."""
    manager = RiskEngine(limits=Limits(), now_ms=time.time_ns() // 1_000_000)
    store = Store(manager, state_dir, clock=lambda: time.time_ns() // 1_000_000, fsync="never")
    started = time.perf_counter()
    store.open()
    seconds = time.perf_counter() - started
    positions = sum(len(book.positions) for book in manager.accounts.values())
    started = time.perf_counter()
    recover(state_dir, repair=False)
    read_seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "recover_seconds": read_seconds,
        "replay_seconds": seconds - read_seconds,
        "replayed": store.replayed,
        "positions": positions,
    }


def _run(coroutine: Coroutine[object, object, float]) -> float:
    # The same event loop as ``risk-gateway serve`` where it is installed.
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a Linux dependency
        return asyncio.run(coroutine)
    result: float = uvloop.run(coroutine)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command (see the module's docstring); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    result: JournalWritten | RecoveryTimed
    if len(args) == 3 and args[0] == "journal" and args[2].isdigit():
        state_dir = Path(args[1])
        seconds = _run(write_journal(state_dir, int(args[2])))
        result = {"seconds": seconds, "bytes": journal_bytes(state_dir)}
    elif len(args) == 2 and args[0] == "recover":
        result = time_recovery(Path(args[1]))
    else:
        print(USAGE, file=sys.stderr)
        return 2
    print(orjson.dumps(result).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
