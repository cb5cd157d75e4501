"""What the engine decides and what it tells the fan-out: immutable values.

``Decision`` is the answer to ``order.validate``; ``Decision.to_wire`` is the
DECISION object, built once. The events (``ModeChanged``, ``AlertRaised``,
``ExposureChanged``, ``DecisionMade``) are queued by the engine and drained by
its owner (``RiskEngine.drain_events``), in the order they happened; each
carries wire-ready data so that the fan-out renders nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.core.views import (
    AlertView,
    DecisionPush,
    DecisionView,
    EmergencyView,
    ExposureSummary,
    ReasonView,
)


class Decision:
    """The outcome of one validation: read-only typed fields over the
    DECISION object, which is built once (a decision is made per
    validation, and answering it is the hot path).

    ``reasons`` lists every failed check, in the order the checks ran (empty
    exactly when accepted): a stable ``code`` (``protocol.codes.Reason`` or a
    desk rule's own) and a ``message`` giving the figures.
    ``reservation_id`` and ``expires_at`` are set when the order was reserved.
    ``exposure`` is the account's and the gateway's gross exposure after the
    decision, with their limits (None only in a reservation's stored
    decision). The versions are those of the EMERGENCY document and the
    limits it was made under (None only for a reservation recovered from a
    record that did not carry them).
    """

    __slots__ = ("_wire",)

    def __init__(self, wire: DecisionView) -> None:
        self._wire = wire

    @property
    def decision(self) -> Literal["accept", "reject"]:
        return self._wire["decision"]

    @property
    def accepted(self) -> bool:
        return self._wire["decision"] == "accept"

    @property
    def reasons(self) -> Sequence[ReasonView]:
        return self._wire["reasons"]

    @property
    def reservation_id(self) -> str | None:
        return self._wire["reservation_id"]

    @property
    def expires_at(self) -> str | None:
        return self._wire["expires_at"]

    @property
    def exposure(self) -> ExposureSummary | None:
        return self._wire["exposure"]

    @property
    def emergency_version(self) -> int | None:
        return self._wire["emergency_version"]

    @property
    def limits_version(self) -> int | None:
        return self._wire["limits_version"]

    def to_wire(self) -> DecisionView:
        """The DECISION object, ready for the codec. The same dict on every
        call, shared: encode it, never change it."""
        return self._wire

    def with_exposure(self, exposure: ExposureSummary | None) -> Decision:
        """The same decision reporting ``exposure``."""
        wire = self._wire.copy()
        wire["exposure"] = exposure
        return Decision(wire)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Decision) and other._wire == self._wire

    def __repr__(self) -> str:
        return f"Decision({self._wire!r})"


@dataclass(frozen=True, slots=True)
class ModeChanged:
    """The whole EMERGENCY document after a published change (``view``), and
    who changed what: ``account`` is the scope changed (None: gateway-wide)."""

    view: EmergencyView
    account: str | None = None
    actor: str = ""


@dataclass(frozen=True, slots=True)
class AlertRaised:
    """An alert; ``alert.get("account")`` names the account it is about.
    ``for_traders`` False: about a connection, never shown to a trader."""

    alert: AlertView
    for_traders: bool = True


@dataclass(frozen=True, slots=True)
class ExposureChanged:
    """The gross exposure of ``account`` (and so the gateway's) may have changed."""

    account: str


@dataclass(frozen=True, slots=True)
class DecisionMade:
    """A validation was decided: the ``decisions`` channel's entry."""

    data: DecisionPush


Event = ModeChanged | AlertRaised | ExposureChanged | DecisionMade
