"""Persistence: the journal, snapshots, the MANIFEST, recovery, the state-directory lock.

Knows nothing about risk: a record is an opaque JSON-able dict, a snapshot one
dict holding the whole state. Start-up sequence::

    lock = lock_state_dir(state_dir)             # refuses a second gateway
    rec = recover(state_dir)                     # repairs a torn tail, reports damage
    ... rebuild the state from rec.snapshot + rec.payloads; halt it if rec.damage ...
    journal = Journal(state_dir, rec, snapshot_source=machine.snapshot)
    await journal.start(tasks)                   # or start_inline(): no task
    seq = journal.append(payload); await journal.durable(seq)   # before acknowledging
    ...
    await journal.close(); lock.release()

:class:`Store` does all of that for a :class:`StateMachine`. Directory layout
(``STATE_DIR``)::

    LOCK                                   flock(LOCK_EX|LOCK_NB) by the running gateway
    MANIFEST                               the live snapshots and segments
    journal-<first_seq:020d>.log           append-only segments, one per run / snapshot
    snapshot-<seq:020d>.snap               full state as of <seq>; the newest two are kept
    snapshot-<seq:020d>.snap.tmp           a snapshot being written (removed by recovery)
    <name>.damaged-<ns>                    files set aside after a damaged recovery

The modules: ``framing`` (the bytes of segments, frames and snapshots),
``segments`` (the synchronous writer, in the journal's thread), ``journal``
(the loop side: queue, group commit, waiters), ``snapshots``, ``manifest``,
``recovery``, ``inspect``, ``lock``, ``store`` and ``errors``.
"""

from gateway.persistence.errors import Damage, PersistenceError, RecordNotApplied
from gateway.persistence.fileops import FileOps
from gateway.persistence.framing import segment_name, snapshot_name
from gateway.persistence.inspect import inspect_state_dir, read_history
from gateway.persistence.journal import Journal
from gateway.persistence.lock import StateDirLocked, StateLock, lock_state_dir
from gateway.persistence.manifest import MANIFEST_NAME, manifest_bytes
from gateway.persistence.recovery import Recovered, locate_record, recover
from gateway.persistence.segments import FsyncPolicy
from gateway.persistence.store import MemoryStore, RecordStore, StateMachine, Store, rebuild

__all__ = [
    "MANIFEST_NAME",
    "Damage",
    "FileOps",
    "FsyncPolicy",
    "Journal",
    "MemoryStore",
    "PersistenceError",
    "RecordNotApplied",
    "RecordStore",
    "Recovered",
    "StateDirLocked",
    "StateLock",
    "StateMachine",
    "Store",
    "inspect_state_dir",
    "locate_record",
    "lock_state_dir",
    "manifest_bytes",
    "read_history",
    "rebuild",
    "recover",
    "segment_name",
    "snapshot_name",
]
