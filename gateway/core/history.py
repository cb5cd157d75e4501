"""The last alerts and decisions, kept with the state so that they survive a
restart (the snapshots of the ``alerts`` and ``decisions`` channels).

Both rings are part of the engine's state: a snapshot holds them, and replay
rebuilds them from the records after it, as live operation built them. A
decision comes back from its ``dec`` record; an alert from the record that
raised it (``emg``, ``lim``, a ``pos`` with a seq gap) or, when no record
implies it, from its own ``alr`` record.

A decision rebuilt from its record is the one answered (the record carries
its messages, versions and exposure figures). Only a record written before
the history was kept lacks them: its messages repeat the codes, and its
exposure (and, without a reservation, its versions) are null.

Alerts come back in the journal's order, which is the order they were raised
in but for one case: the alert of an emergency or limits change is raised
when the change is published, once durable, and comes back at its record's
place, so before (not after) an alert raised while it waited for its fsync.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, cast

from gateway.core.records import AlertRecord
from gateway.core.views import AlertView, DecisionPush, ExposureSummary, ReasonView, alert_view
from protocol.values import format_time_ms

#: Alerts kept: a trader's snapshot holds the last 100 alerts it may see,
#: found among the most recent of these.
ALERT_HISTORY = 1000
#: Decisions kept (the ``decisions`` snapshot holds them all).
DECISION_HISTORY = 100

# A ``dec`` record met in replay, and the limits then in force (as texts).
_Recorded = tuple[Mapping[str, Any], tuple[str, str]]


class History:
    """Two bounded rings: ``alerts`` as ``(alert, for_traders)`` and the decisions."""

    __slots__ = ("_decisions", "alerts")

    def __init__(self) -> None:
        #: ``for_traders`` False: about a connection, staff only.
        self.alerts: deque[tuple[AlertView, bool]] = deque(maxlen=ALERT_HISTORY)
        # A live decision's push, or (in replay) its record with the limits
        # then in force, turned into its push only when read: replay meets
        # every record, reads keep 100.
        self._decisions: deque[DecisionPush | _Recorded] = deque(maxlen=DECISION_HISTORY)

    def clear(self) -> None:
        self.alerts.clear()
        self._decisions.clear()

    def add_alert(self, alert: AlertView, for_traders: bool) -> None:
        self.alerts.append((alert, for_traders))

    def add_decision(self, push: DecisionPush) -> None:
        """A decision's push, as published."""
        self._decisions.append(push)

    def add_decision_record(self, rec: Mapping[str, Any], limit_texts: tuple[str, str]) -> None:
        """A ``dec`` record met in replay, with the account's and the gateway's
        limit then in force (as the wire writes them); rebuilt when read."""
        self._decisions.append((rec, limit_texts))

    def decisions(self) -> list[DecisionPush]:
        """The kept decisions, oldest first."""
        ring = self._decisions
        for i in range(len(ring)):
            entry = ring[i]
            if isinstance(entry, tuple):
                ring[i] = decision_from_record(*entry)
        return cast(list[DecisionPush], list(ring))

    def snapshot(self) -> dict[str, Any]:
        """Fresh lists of the (never changed) alert and decision dicts."""
        return {
            "alerts": [[alert, for_traders] for alert, for_traders in self.alerts],
            "decisions": self.decisions(),
        }

    def load(self, snap: Mapping[str, Any] | None) -> None:
        """Replace both rings with a ``snapshot()`` (None: a snapshot written
        before history was kept; both start empty)."""
        self.clear()
        if snap is None:
            return
        for alert, for_traders in snap["alerts"]:
            self.alerts.append((cast(AlertView, dict(alert)), bool(for_traders)))
        for push in snap["decisions"]:
            self._decisions.append(cast(DecisionPush, dict(push)))


def alert_record(alert: AlertView, now_ms: int, for_traders: bool) -> AlertRecord:
    """The ``alr`` record of ``alert``, raised at ``now_ms``."""
    rec: AlertRecord = {
        "t": "alr",
        "lvl": alert["level"],
        "c": alert["code"],
        "m": alert["message"],
        "ts": now_ms,
    }
    if "account" in alert:
        rec["a"] = alert["account"]
    if "symbol" in alert:
        rec["s"] = alert["symbol"]
    if not for_traders:
        rec["staff"] = True
    return rec


def alert_from_record(rec: Mapping[str, Any]) -> tuple[AlertView, bool]:
    """The alert an ``alr`` record holds, and whether traders may see it."""
    alert = alert_view(rec["lvl"], rec["c"], rec["m"], rec["ts"], rec.get("a"), rec.get("s"))
    return alert, not rec.get("staff", False)


def decision_from_record(rec: Mapping[str, Any], limit_texts: tuple[str, str]) -> DecisionPush:
    """The ``decisions`` entry a ``dec`` record describes, made under limits
    ``limit_texts`` (the account's and the gateway's; see the module's note)."""
    codes: Sequence[str] = rec["r"]
    # A record written before messages were journaled repeats the code.
    messages: Sequence[str] = rec.get("m") or codes
    reasons: list[ReasonView] = [
        {"code": code, "message": message} for code, message in zip(codes, messages, strict=False)
    ]
    expires = rec.get("exp")
    figures = rec.get("x")
    exposure: ExposureSummary | None = None
    if figures is not None:
        exposure = {
            "account": figures[0],
            "account_limit": limit_texts[0],
            "global": figures[1],
            "global_limit": limit_texts[1],
        }
    return {
        "decision": rec["d"],
        "reasons": reasons,
        "reservation_id": rec.get("rid"),
        "expires_at": None if expires is None else format_time_ms(expires),
        "exposure": exposure,
        "emergency_version": rec.get("ev"),
        "limits_version": rec.get("lv"),
        "account": rec["a"],
        "symbol": rec["s"],
        "side": rec["side"],
        "qty": rec["q"],
        "price": rec["p"],
        "ts": format_time_ms(rec["ts"]),
    }
