"""A member's credit, in exact integer units: the arithmetic, pure.

The shared state counts credit in units of ``CREDIT_UNIT`` (integers below
2**53, exact inside a Lua script, never a float). A member's credit *in
force* (what its orders are checked against) is never more than what the
shared state counts for it:

- an increase is in force only once the shared state answered it;
- a decrease is in force before the shared state hears of it
  (``begin_decrease``; the caller journals it and waits for the fsync first);
- every request carries a new sequence number; the shared state ignores one
  that is not above the last it applied and answers what it holds, so a
  repeated or late request changes nothing;
- an answer whose sequence is above the member's (the shared state applied a
  request the member never journaled: it crashed in between) is adopted: the
  shared state counts that credit for this member, so using it keeps the sum
  within ``max_exposure``.

``CreditLedger`` plans the requests; ``gateway.cluster.credit`` sends them.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Literal

from gateway.cluster.shared import CreditAnswer, CreditKind
from gateway.core.records import CreditRecord

__all__ = [
    "CREDIT_UNIT",
    "MAX_UNITS",
    "CreditLedger",
    "CreditPolicy",
    "CreditRecord",
    "CreditRequest",
    "from_units",
    "max_units_for",
    "to_units_ceil",
    "to_units_floor",
]

CREDIT_UNIT = Decimal("0.0001")
#: Integers up to this are exact in a Lua number (a double).
MAX_UNITS = 2**53 - 1


def to_units_floor(value: Decimal) -> int:
    return int((value / CREDIT_UNIT).to_integral_value(rounding=ROUND_FLOOR))


def to_units_ceil(value: Decimal) -> int:
    return int((value / CREDIT_UNIT).to_integral_value(rounding=ROUND_CEILING))


def from_units(units: int) -> Decimal:
    return Decimal(units).scaleb(-4)


def max_units_for(max_exposure: Decimal) -> int:
    """The credit ceiling of ``max_exposure`` (rounded down: never more).

    Raises ``ValueError`` when it would not be exact in the shared state."""
    units = to_units_floor(max_exposure)
    if units > MAX_UNITS:
        raise ValueError(
            f"max_exposure {max_exposure} is over {from_units(MAX_UNITS)}, the most a cluster's "
            f"credit ledger counts exactly in units of {CREDIT_UNIT}"
        )
    return max(units, 0)


@dataclass(frozen=True, slots=True)
class CreditPolicy:
    """Headroom as fractions of ``max_exposure``: refill below ``low``, up to
    ``high``; give back what is above ``high``."""

    low: Decimal = Decimal("0.05")
    high: Decimal = Decimal("0.10")

    def __post_init__(self) -> None:
        if not (0 <= self.low <= self.high <= 1):
            raise ValueError(
                f"need 0 <= credit_low <= credit_high <= 1, got {self.low}, {self.high}"
            )


@dataclass(frozen=True, slots=True)
class CreditRequest:
    kind: CreditKind
    units: int
    seq: int


class CreditLedger:
    """One member's credit: in force (``units``, ``seq``), and the plans."""

    __slots__ = ("_journaled", "_next_seq", "max_units", "policy", "seq", "units")

    def __init__(self, policy: CreditPolicy, max_units: int) -> None:
        self.policy = policy
        self.max_units = max_units
        self.units = 0
        self.seq = 0
        self._next_seq = 1
        self._journaled: tuple[int, int] = (0, 0)

    @property
    def credit(self) -> Decimal:
        return from_units(self.units)

    def fits(self, exposure_after: Decimal) -> bool:
        return exposure_after <= self.credit

    def _headroom(self, fraction: Decimal) -> int:
        return int((fraction * self.max_units).to_integral_value(rounding=ROUND_FLOOR))

    def _new_seq(self) -> int:
        seq = max(self._next_seq, self.seq + 1)
        self._next_seq = seq + 1
        return seq

    # ------------------------------------------------------------- plans

    def plan_borrow(self, exposure_after: Decimal) -> CreditRequest | None:
        """The increase that makes ``exposure_after`` fit, with ``high`` of
        headroom above it (at most ``max_units``); None if it fits."""
        if self.fits(exposure_after):
            return None
        wanted = min(
            to_units_ceil(exposure_after) + self._headroom(self.policy.high), self.max_units
        )
        if wanted <= self.units:
            return None
        return CreditRequest("increase", wanted, self._new_seq())

    def plan_refill(self, exposure: Decimal) -> CreditRequest | None:
        """Below ``low`` of headroom: the increase up to ``high`` of it."""
        used = to_units_ceil(max(exposure, Decimal(0)))
        if self.units - used >= self._headroom(self.policy.low) or self.units >= self.max_units:
            return None
        wanted = min(used + self._headroom(self.policy.high), self.max_units)
        if wanted <= self.units:
            return None
        return CreditRequest("increase", wanted, self._new_seq())

    def plan_give_back(self, exposure: Decimal) -> CreditRequest | None:
        """Above ``high`` of headroom, or above ``max_units`` (the limit was
        lowered): the decrease to ``high`` of headroom, never below the
        exposure. (Refills start below ``low``: the band between them keeps a
        member from borrowing and giving back in turn.)"""
        used = to_units_ceil(max(exposure, Decimal(0)))
        high = self._headroom(self.policy.high)
        if self.units - used <= high and self.units <= self.max_units:
            return None
        target = max(min(used + high, self.max_units), used)
        if target >= self.units:
            return None
        return CreditRequest("decrease", target, self._new_seq())

    def reassert(self) -> CreditRequest:
        """The journaled credit, told again (after a restart or a data loss)."""
        return CreditRequest("reassert", self.units, self._new_seq())

    # ---------------------------------------------------------- answers

    def begin_decrease(self, request: CreditRequest) -> CreditRecord:
        """Put a decrease in force before the shared state hears of it; the
        record to journal (and make durable) before sending it."""
        assert request.kind == "decrease" and request.units <= self.units
        self.units = request.units
        self.seq = request.seq
        return self._record()

    def answered(self, request: CreditRequest, answer: CreditAnswer) -> CreditRecord | None:
        """What the shared state answered; the record to journal, if the
        credit in force changed beyond what is journaled."""
        if answer.seq >= request.seq:
            if request.kind == "decrease" and answer.seq == request.seq:
                pass  # already in force and journaled
            else:
                self.units = answer.units
            self.seq = max(self.seq, answer.seq)
        self._next_seq = max(self._next_seq, self.seq + 1)
        if (self.units, self.seq) == self._journaled:
            return None
        return self._record()

    def recovered(self, record: CreditRecord) -> None:
        """The last journaled credit, after a restart."""
        self.units = record["u"]
        self.seq = record["seq"]
        self._journaled = (self.units, self.seq)
        self._next_seq = self.seq + 1

    def _record(self) -> CreditRecord:
        self._journaled = (self.units, self.seq)
        return {"t": "crd", "u": self.units, "seq": self.seq}


def decide_credit(
    stored_units: int,
    stored_seq: int,
    others_units: int,
    max_units: int,
    recovering: bool,
    seq: int,
    units: int,
    kind: Literal["increase", "decrease", "reassert"],
) -> tuple[int, int]:
    """What the shared state stores for a credit request: ``(units, seq)``.

    The statement the shared state's script implements: a request whose
    ``seq`` is not above the stored one changes nothing; a decrease or a
    reassert stores its units; an increase stores the most of its units that
    keeps every credit's sum within ``max_units``, never less than the
    stored credit, and nothing more while a recovery is under way."""
    if seq <= stored_seq:
        return stored_units, stored_seq
    if kind != "increase":
        return units, seq
    if recovering:
        return stored_units, seq
    room = max_units - others_units
    return max(stored_units, min(units, room)), seq
