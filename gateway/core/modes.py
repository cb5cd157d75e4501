"""Emergency modes, their transitions, and when a change takes effect.

One table (``TRANSITIONS``) decides, for every change of a scope's mode
(gateway-wide or one account): whether it goes towards safety, when
validations start to enforce it, and the level of the alert it raises.
Everything that orders a mode change (the engine's staging, the server, the
embedded API) reads it here.

A change is *published* (the EMERGENCY document, its version, the push, the
alert) only once its journal record is durable, so nothing is shown that a
crash could undo. Until then it is *staged*: towards safety it is enforced at
once (validations stop before the fsync); away from safety only once
published, so a crash can never leave the gateway more open than what was
acknowledged.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from gateway.core.records import EmergencyRecord, LimitsRecord, StagedRecord
from protocol.codes import AlertLevel, Mode

#: The actor of the changes the gateway makes itself (auto-reduce, halts on
#: damage or persistence failure).
GATEWAY_ACTOR: Final = "gateway"


class Enforced(enum.Enum):
    """When validations start to see a mode change."""

    #: As soon as it is staged, before its record is durable.
    AT_ONCE = "at once"
    #: Only once its record is durable and the change is published.
    WHEN_DURABLE = "when durable"


@dataclass(frozen=True, slots=True)
class Transition:
    """One change of a scope's mode."""

    before: Mode
    after: Mode
    towards_safety: bool
    enforced: Enforced
    #: The level of the EMERGENCY_CHANGED alert the change raises.
    alert: AlertLevel


#: Strictness: a higher rank lets fewer orders through.
RANK: Final[Mapping[Mode, int]] = {Mode.NORMAL: 0, Mode.REDUCING: 1, Mode.HALTED: 2}


def _transition(before: Mode, after: Mode, alert: AlertLevel) -> Transition:
    towards = RANK[after] > RANK[before]
    return Transition(
        before=before,
        after=after,
        towards_safety=towards,
        enforced=Enforced.AT_ONCE if towards else Enforced.WHEN_DURABLE,
        alert=alert,
    )


#: Every change of mode. Setting the mode a scope already has is no change:
#: no record, no version, no alert.
TRANSITIONS: Final[Mapping[tuple[Mode, Mode], Transition]] = {
    (t.before, t.after): t
    for t in (
        _transition(Mode.NORMAL, Mode.REDUCING, AlertLevel.WARNING),
        _transition(Mode.NORMAL, Mode.HALTED, AlertLevel.CRITICAL),
        _transition(Mode.REDUCING, Mode.HALTED, AlertLevel.CRITICAL),
        _transition(Mode.REDUCING, Mode.NORMAL, AlertLevel.INFO),
        _transition(Mode.HALTED, Mode.REDUCING, AlertLevel.WARNING),
        _transition(Mode.HALTED, Mode.NORMAL, AlertLevel.INFO),
    )
}

# A record that sets the mode its scope has already (the journal's first
# record, a halt restating its reason) still raises its alert.
_SAME_MODE_ALERT: Final[Mapping[Mode, AlertLevel]] = {
    Mode.NORMAL: AlertLevel.INFO,
    Mode.REDUCING: AlertLevel.WARNING,
    Mode.HALTED: AlertLevel.CRITICAL,
}


def transition(before: Mode, after: Mode) -> Transition | None:
    """The change from ``before`` to ``after``; ``None`` when they are the same."""
    return TRANSITIONS.get((before, after))


def alert_level(before: Mode, after: Mode) -> AlertLevel:
    """The level of the alert a published change from ``before`` to ``after`` raises."""
    change = TRANSITIONS.get((before, after))
    return _SAME_MODE_ALERT[after] if change is None else change.alert


def enforced_at_once(before: Mode, after: Mode) -> bool:
    """Whether validations enforce ``after`` as soon as the change is staged."""
    change = TRANSITIONS.get((before, after))
    return change is not None and change.enforced is Enforced.AT_ONCE


@dataclass(frozen=True, slots=True, kw_only=True)
class ModeState:
    """One scope's published mode: gateway-wide or one account's."""

    mode: Mode
    reason: str
    actor: str
    since_ms: int

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> ModeState:
        """Read the ``m``, ``r``, ``by`` and ``at`` of an ``emg`` record (or a snapshot's mode)."""
        return cls(mode=Mode(rec["m"]), reason=rec["r"], actor=rec["by"], since_ms=rec["at"])


class Modes:
    """Every scope's published mode, the EMERGENCY version, and the modes
    validations enforce (the published one, or a stricter staged one)."""

    __slots__ = ("accounts", "enforced_accounts", "enforced_gateway", "gateway", "version")

    def __init__(self, now_ms: int) -> None:
        self.gateway = ModeState(mode=Mode.NORMAL, reason="", actor=GATEWAY_ACTOR, since_ms=now_ms)
        #: Accounts whose mode is not normal.
        self.accounts: dict[str, ModeState] = {}
        self.version = 0
        self.enforced_gateway = Mode.NORMAL
        self.enforced_accounts: dict[str, Mode] = {}

    def mode_of(self, account: str | None) -> Mode:
        """The published mode of the gateway (``None``) or of one account."""
        if account is None:
            return self.gateway.mode
        state = self.accounts.get(account)
        return Mode.NORMAL if state is None else state.mode

    def publish(self, account: str | None, state: ModeState, version: int) -> Mode:
        """Make ``state`` the published mode of the scope; returns the mode before."""
        previous = self.mode_of(account)
        if account is None:
            self.gateway = state
        elif state.mode is Mode.NORMAL:
            self.accounts.pop(account, None)
        else:
            self.accounts[account] = state
        self.version = version
        return previous

    def enforce(self, staged: Iterator[EmergencyRecord]) -> None:
        """Recompute the enforced modes: per scope the published mode, or a
        staged change the table enforces at once."""
        gateway = self.gateway.mode
        accounts = {a: s.mode for a, s in self.accounts.items()}
        for rec in staged:
            mode = Mode(rec["m"])
            account = rec["a"]
            if account is None:
                if enforced_at_once(gateway, mode):
                    gateway = mode
            elif enforced_at_once(accounts.get(account, Mode.NORMAL), mode):
                accounts[account] = mode
        self.enforced_gateway = gateway
        self.enforced_accounts = accounts


class Staging:
    """Emergency and limits records on their way to the journal, oldest first:
    published once durable, in this order, so a version is never shown before
    it can survive a crash and never names two contents."""

    __slots__ = ("_records",)

    def __init__(self) -> None:
        self._records: deque[StagedRecord] = deque()

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[StagedRecord]:
        return iter(self._records)

    def append(self, record: StagedRecord) -> None:
        self._records.append(record)

    def contains(self, record: object) -> bool:
        """Whether ``record`` (this very object) waits to be published."""
        # Asked for every record committed; almost always nothing is staged.
        return bool(self._records) and any(rec is record for rec in self._records)

    def pop_first(self, record: object) -> None:
        """Remove ``record``, which must be the oldest (``ValueError`` otherwise)."""
        if not self._records or self._records[0] is not record:
            raise ValueError("publish() out of staging order")
        self._records.popleft()

    def clear(self) -> int:
        """Forget every staged record; returns how many there were."""
        count = len(self._records)
        self._records.clear()
        return count

    def emergencies(self) -> Iterator[EmergencyRecord]:
        """The staged mode changes, oldest first."""
        for rec in self._records:
            if rec["t"] == "emg":
                yield rec

    def intended(self, account: str | None) -> EmergencyRecord | None:
        """The last staged change of the scope: what the journal will say."""
        rec: StagedRecord  # reversed() of a union of TypedDicts is Any to mypy
        for rec in reversed(self._records):
            if rec["t"] == "emg" and rec["a"] == account:
                return rec
        return None

    def last_limits(self) -> LimitsRecord | None:
        """The last staged limits change."""
        rec: StagedRecord
        for rec in reversed(self._records):
            if rec["t"] == "lim":
                return rec
        return None

    def next_version(self, kind: str, published: int) -> int:
        """The version the next record of ``kind`` (``emg``, ``lim``) takes."""
        version = published
        for rec in self._records:
            if rec["t"] == kind and rec["v"] > version:
                version = rec["v"]
        return version + 1
