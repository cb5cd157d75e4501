"""What can go wrong with a state directory, and where.

``PersistenceError`` is a run-time failure (a write, an fsync, a snapshot):
the journal is failed for good. ``Damage`` is what recovery found unusable
on disk. ``RecordNotApplied`` (defined with the records' schema, in the core) is the
state machine's verdict on a record or snapshot that reads fine but holds
something it never writes: the one thing persistence knows of the records.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.core.records import RecordNotApplied

__all__ = ["Damage", "PersistenceError", "RecordNotApplied"]


class PersistenceError(Exception):
    """A write/fsync/snapshot failed at run time; the journal is failed for good.

    No later record becomes durable; records reported durable before the failure stay
    durable. A record whose ``durable()`` raised is normally gone from disk too (the
    journal truncates back to the last acknowledged record), but if that clean-up also
    fails it can reappear at recovery: treat its outcome as unknown. The caller should
    halt, answer state-changing requests with ``UNAVAILABLE``, and restart to recover
    from disk.
    """


@dataclass(frozen=True, slots=True, kw_only=True)
class Damage:
    """Where and why a file of the state directory could not be used.

    ``file`` is relative to the state directory; ``offset`` is the byte offset of the
    record (or header) that failed to validate.
    """

    file: str
    offset: int
    detail: str

    def describe(self) -> str:
        """One line for an operator, e.g. ``journal-...log at offset 1234: checksum mismatch``."""
        return f"{self.file} at offset {self.offset}: {self.detail}"

    def as_dict(self) -> dict[str, str | int]:
        return {"file": self.file, "offset": self.offset, "detail": self.detail}
