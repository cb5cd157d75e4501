"""The shared state a cluster's members meet in: the interface.

Section 10 of the protocol. ``RedisState`` (``gateway.cluster.redis_state``)
implements it on one Redis server; ``MemoryState``
(``gateway.cluster.memory``) implements the same contract in memory for the
service's tests. Every method is one atomic step on the shared state (one
Lua script on Redis). Every number crossing it is an exact integer or a
string: never a float.

What lives there (key names are the Redis implementation's):

- ``epoch``: a random id made when the shared state is first created (by the
  first ``join``). A member that finds it gone or changed knows the shared
  state lost data: see ``begin_recovery``.
- documents ``emergency`` and ``limits``: ``(version, body)``, body an
  opaque JSON text the members agree on; each write goes through
  ``write_document`` (version checked, then the document written and
  appended to the document's log, a stream whose entry id is
  ``<version>-0``, so ``tail`` delivers every change at least once).
- members: name -> url, accounts, last seen (the shared state's own clock,
  milliseconds), the exposure it last published (a decimal string), the
  document versions it has applied; owners: account -> member name.
- the credit ledger: member -> credit units and the sequence of the last
  credit request applied; the most every credit may sum to (``max_units``,
  set with the limits document); the members still to re-assert after a data
  loss (``recovering``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

#: The shared documents.
DocumentName = Literal["emergency", "limits"]
DOCUMENTS: tuple[DocumentName, ...] = ("emergency", "limits")

CreditKind = Literal["increase", "decrease", "reassert"]


class SharedStateError(Exception):
    """Base of the errors below."""


class SharedStateUnavailable(SharedStateError):
    """The shared state did not answer (refused, reset, timed out). For a
    write, whether it happened is unknown."""


class DurabilityRefused(SharedStateError):
    """The shared state is not configured to keep what it acknowledges; the
    message names the setting and the value it needs (``appendonly yes``,
    ``appendfsync always``, a server of version 7.0 or newer)."""


class OwnershipRefused(SharedStateError):
    """``join``: ``account`` is owned by ``owner``, another live member."""

    def __init__(self, account: str, owner: str, url: str) -> None:
        super().__init__(f"account {account} is owned by member {owner} ({url}), which is alive")
        self.account = account
        self.owner = owner
        self.url = url


class NotForgettable(SharedStateError):
    """``forget``: no such member, or it was seen too recently (the message says which)."""


@dataclass(frozen=True, slots=True)
class Document:
    name: DocumentName
    version: int
    body: str


@dataclass(frozen=True, slots=True)
class Written:
    """``write_document``'s answer: ``ok`` and the version now stored (on a
    conflict, the stored version the write was refused against)."""

    ok: bool
    version: int


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    url: str
    accounts: tuple[str, ...]
    #: Seen within ``alive_ms`` of the shared state's clock.
    alive: bool
    #: Milliseconds since the shared state last heard from it.
    unseen_ms: int
    credit_units: int
    #: Its last published gross exposure (a decimal string), or None.
    exposure: str | None
    #: Document name -> the version it has applied.
    applied: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Joined:
    epoch: str
    #: True when this join created the shared state (no epoch was there).
    created: bool


@dataclass(frozen=True, slots=True)
class Beat:
    """``beat``'s answer: one round trip that renews the member's liveness and
    tells it what it must know."""

    epoch: str | None  # None: the shared state has no epoch (it lost data)
    versions: Mapping[str, int]  # document name -> stored version (0: none)
    members: tuple[Member, ...]
    forgotten: bool  # this member was forgotten (it must fence itself)
    recovering: tuple[str, ...]  # members still to re-assert after a data loss
    credit_units: int  # this member's credit as the shared state counts it
    credit_seq: int
    max_units: int
    total_units: int  # the sum of every member's credit


@dataclass(frozen=True, slots=True)
class CreditAnswer:
    """``credit``'s answer: this member's credit and sequence as stored after
    the request (a request whose ``seq`` is not above the stored one changes
    nothing and answers the stored values)."""

    units: int
    seq: int
    max_units: int
    total_units: int
    recovering: tuple[str, ...]


class SharedState(Protocol):
    """One member's handle on the shared state. Every method raises
    ``SharedStateUnavailable`` when the shared state does not answer within
    the handle's timeout."""

    async def check_durability(self) -> None:
        """Raise ``DurabilityRefused`` unless acknowledged writes survive a
        crash of the shared state (and its version is supported)."""

    async def join(
        self, name: str, url: str, accounts: Sequence[str], *, alive_ms: int, epoch: str
    ) -> Joined:
        """One atomic step: create the epoch (``epoch``) if there is none;
        refuse (``OwnershipRefused``) if any of ``accounts`` is owned by
        another member seen within ``alive_ms``; else register ``name`` (url,
        accounts, seen now, clear its forgotten mark), take the accounts, and
        drop those it owned before but no longer lists."""

    async def beat(
        self,
        name: str,
        *,
        exposure: str | None,
        applied: Mapping[str, int],
        alive_ms: int,
    ) -> Beat:
        """Mark ``name`` seen now; store ``exposure`` (if not None) and the
        document versions it has ``applied``; answer a ``Beat``. A forgotten
        member is not marked seen (``forgotten`` is True)."""

    async def read_document(self, name: DocumentName) -> Document | None: ...

    async def write_document(
        self, name: DocumentName, expected_version: int, body: str, *, max_units: int | None = None
    ) -> Written:
        """If the stored version is ``expected_version`` (0: none stored),
        store ``(expected_version + 1, body)``, append it to the document's
        log with entry id ``<version>-0``, and, with ``max_units``, set the
        credit ceiling; all in one step. Else change nothing (``ok`` False)."""

    async def restore_document(
        self, name: DocumentName, version: int, body: str, *, max_units: int | None = None
    ) -> bool:
        """After a data loss: store ``(version, body)`` (and the log entry,
        and ``max_units``) only if the stored version is lower. True if written."""

    async def tail(self, after: Mapping[DocumentName, int], block_ms: int) -> list[Document]:
        """The log entries of each document with a version above
        ``after[name]``, in version order, waiting up to ``block_ms`` for one
        (an empty list when none came)."""

    async def credit(self, name: str, seq: int, units: int, kind: CreditKind) -> CreditAnswer:
        """Set ``name``'s credit, if ``seq`` is above its stored sequence:
        ``decrease`` and ``reassert`` store ``units`` as they are (a reassert
        also removes ``name`` from ``recovering``); ``increase`` stores the
        most of ``units`` that keeps the sum of all credits within
        ``max_units`` (never less than the stored credit), and nothing more
        while ``recovering`` is not empty. Answers what is stored after."""

    async def begin_recovery(self, known_members: Sequence[str], epoch: str) -> str:
        """The epoch is gone (the shared state lost data): if there is still
        none, store ``epoch`` and mark ``known_members`` as ``recovering``.
        Answers the epoch now stored."""

    async def forget(self, name: str, *, min_unseen_ms: int) -> None:
        """Remove member ``name`` (its registration, accounts, credit and
        recovering mark) and mark it forgotten, only if it has not been seen
        for more than ``min_unseen_ms``; else raise ``NotForgettable``."""

    async def members(self, *, alive_ms: int) -> tuple[Member, ...]: ...

    async def close(self) -> None: ...
