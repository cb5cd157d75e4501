"""The engine's state, and the one code path that applies records to it.

Every state change is a journal record, and ``RiskState.apply`` is how a
record changes the state, live and in recovery alike, so recovered state
equals live state. Applying a record queues what it produced: the record
itself (``records``, unless it is already in the journal or being replayed)
and the events and alerts for the fan-out (``events``, unless replayed).

``RiskEngine`` (``gateway.core.engine``) owns one ``RiskState``; nothing else
should touch it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any, cast

from gateway.core.book import Book, SymbolBook
from gateway.core.events import AlertRaised, Decision, Event, ExposureChanged, ModeChanged
from gateway.core.history import History, alert_from_record, alert_record
from gateway.core.limits import Limits, LimitsInForce
from gateway.core.modes import GATEWAY_ACTOR, Modes, ModeState, Staging, alert_level
from gateway.core.records import (
    CreditRecord,
    EmergencyRecord,
    LimitsRecord,
    Record,
    StagedRecord,
    emergency_record,
)
from gateway.core.reservations import (
    Reservation,
    Reservations,
    accepted_reservation,
    decision_from_snapshot,
)
from gateway.core.share import LimitShare
from gateway.core.views import AlertView, EmergencyView, alert_view, emergency_view
from protocol.codes import AlertCode, AlertLevel, Mode
from protocol.values import format_decimal as fmt

_d = Decimal  # a journal decimal string to a Decimal (exact: no context involved)


class RiskState:
    """Limits, modes, staged changes, books, reservations, and the queued outputs."""

    __slots__ = (
        "book",
        "committed",
        "credit",
        "deferred",
        "events",
        "history",
        "in_force",
        "modes",
        "records",
        "replaying",
        "reservations",
        "share",
        "staging",
        "view",
    )

    def __init__(self, limits: Limits, now_ms: int) -> None:
        #: Staged changes wait for ``publish``; else they apply at once.
        self.deferred = False
        #: Set when max_exposure is shared with other engines (kept by a reset).
        self.share: LimitShare | None = None
        self.reset(limits, now_ms)

    def reset(self, limits: Limits, now_ms: int) -> None:
        """Everything as new at ``now_ms``, with ``limits`` as version 1
        (``deferred`` stays as it is)."""
        self.in_force = LimitsInForce(limits)
        self.modes = Modes(now_ms)
        self.staging = Staging()
        self.book = Book()
        self.reservations = Reservations()
        self.records: list[Record] = []
        self.events: list[Event] = []
        #: Applying recovered records: no alerts, events or records.
        self.replaying = False
        #: Applying a record that is already in the journal: no record.
        self.committed = False
        self.view: EmergencyView | None = None  # the EMERGENCY document, cached
        #: The last ``crd`` record: the share of a shared limit this engine
        #: was granted (``gateway.core.share``), None when it never was.
        self.credit: CreditRecord | None = None
        #: The last alerts and decisions (``gateway.core.history``).
        self.history = History()

    # ----------------------------------------------------------- outputs

    def record(self, record: Record) -> None:
        if not self.replaying and not self.committed:
            self.records.append(record)

    def alert(
        self,
        level: AlertLevel,
        code: AlertCode,
        message: str,
        now_ms: int,
        account: str | None = None,
        symbol: str | None = None,
        for_traders: bool = True,
        *,
        implied: bool = False,
    ) -> None:
        """Raise an alert: kept in the history, and when live published and
        journaled. ``implied``: raised by applying a record, which replay
        applies again (so it raises the alert into the history again, and
        the alert needs no ``alr`` record of its own)."""
        if self.replaying and not implied:
            return
        alert = alert_view(level.value, code.value, message, now_ms, account, symbol)
        self.history.add_alert(alert, for_traders)
        if self.replaying:
            return
        self.events.append(AlertRaised(alert, for_traders))
        if not implied:
            self.records.append(alert_record(alert, now_ms, for_traders))

    def note_alert(self, alert: AlertView, now_ms: int, for_traders: bool) -> None:
        """Keep and journal an alert published by someone else (the fan-out's
        slow-consumer alert); no event."""
        self.history.add_alert(alert, for_traders)
        self.records.append(alert_record(alert, now_ms, for_traders))

    def emergency_view(self) -> EmergencyView:
        view = self.view
        if view is None:
            view = self.view = emergency_view(self.modes, self.share)
        return view

    # ------------------------------------------------------------ records

    def apply(self, rec: Mapping[str, Any]) -> None:
        """Apply one journal record; ``ValueError`` for an unknown type."""
        kind = rec["t"]
        if kind == "pos":
            self.apply_position(rec, _d(rec["q"]), _d(rec["p"]))
        elif kind == "psnap":
            entries = [(symbol, _d(qty), _d(price)) for symbol, qty, price in rec["pos"]]
            self.apply_position_snapshot(rec, entries)
        elif kind == "px":
            self.book.reference_prices[rec["s"]] = _d(rec["p"])
            self.record(cast(Record, dict(rec)))
        elif kind == "dec":
            self.apply_decision(rec)
            if self.replaying:
                self.history.add_decision_record(rec, self.in_force.texts)
        elif kind == "alr":
            alert, for_traders = alert_from_record(rec)
            self.history.add_alert(alert, for_traders)
            self.record(cast(Record, dict(rec)))
        elif kind == "crd":
            self.credit = cast(CreditRecord, dict(rec))
            self.record(self.credit)
        elif kind == "rel":
            res = self.reservations.live.get(rec["id"])
            if res is not None:
                self.drop_reservation(res)
            self.record(cast(Record, dict(rec)))
        elif kind == "emg":
            self.apply_emergency(rec)
        elif kind == "lim":
            self.apply_limits(rec)
        elif kind == "cod":
            enabled = bool(rec["on"])
            live = self.reservations.live
            for rid in rec["ids"]:
                res = live.get(rid)
                if res is not None:
                    live[rid] = dataclasses.replace(res, cancel_on_disconnect=enabled)
            self.record(cast(Record, dict(rec)))
        elif kind == "boot":
            self.record(cast(Record, dict(rec)))
        else:
            raise ValueError(f"unknown journal record type {kind!r}")

    def apply_position(self, rec: Mapping[str, Any], qty: Decimal, price: Decimal) -> None:
        account = rec["a"]
        book = self.book.account(account)
        seq = rec.get("seq")
        if seq is not None:
            last = book.seq
            if last is not None and seq != last + 1 and seq != last and not book.stale:
                book.stale = True
                self.alert(
                    AlertLevel.WARNING,
                    AlertCode.POSITION_SEQ_GAP,
                    f"account {account}: position seq {seq} after {last}; "
                    "validations rejected until position.snapshot",
                    rec["ts"],
                    account,
                    rec["s"],
                    implied=True,
                )
            book.seq = seq
        release = rec.get("rel")
        if release is not None:
            res = self.reservations.live.get(release)
            if res is not None:
                self.drop_reservation(res)
        replaying = self.replaying
        self.book.set_position(book, rec["s"], qty, price, deferred=replaying)
        if not replaying:  # record and event, without building what replay drops
            if not self.committed:
                self.records.append(cast(Record, rec))
            self.events.append(ExposureChanged(account))

    def apply_position_snapshot(
        self, rec: Mapping[str, Any], entries: Iterable[tuple[str, Decimal, Decimal]]
    ) -> None:
        """A ``psnap`` record, its positions already read into ``entries``."""
        book = self.book.account(rec["a"])
        self.book.replace_positions(book, entries)
        if "seq" in rec:
            book.seq = rec["seq"]
        self.record(cast(Record, dict(rec)))
        if not self.replaying:
            self.events.append(ExposureChanged(rec["a"]))

    def apply_decision(
        self,
        rec: Mapping[str, Any],
        decision: Decision | None = None,
        connection: int | None = None,
    ) -> None:
        """A decision record; only an accepted reservation changes state.
        ``decision``: the accept decision (else rebuilt from the record)."""
        # validate() opens the account's book (its rate window lives there), so
        # replay must too, or recovered STATE would lack accounts live STATE has.
        self.book.account(rec["a"])
        rid = rec.get("rid")
        if rid is not None and rid not in self.reservations.live:
            if decision is None:
                decision = accepted_reservation(rid, rec["exp"], rec.get("ev"), rec.get("lv"))
            res = Reservation(
                id=rid,
                account=rec["a"],
                symbol=rec["s"],
                side=rec["side"],
                qty=_d(rec["q"]),
                price=_d(rec["p"]),
                expires_ms=rec["exp"],
                client_order_id=rec.get("coid"),
                cancel_on_disconnect=bool(rec.get("cod")),
                connection=connection,
                decision=decision,
            )
            self.add_reservation(res)
            if not self.replaying:
                self.events.append(ExposureChanged(res.account))
        self.record(cast(Record, rec))

    def add_reservation(self, res: Reservation) -> None:
        book = self.book.account(res.account)
        self.book.reserve(book, res.symbol, res.side, res.qty, res.price)
        self.reservations.add(res)

    def drop_reservation(self, res: Reservation) -> None:
        self.reservations.remove(res)
        self.book.unreserve(self.book.accounts[res.account], res.symbol, res.side, res.qty)
        if not self.replaying:
            self.events.append(ExposureChanged(res.account))

    # ---------------------------------------------------- modes and limits

    def stage(self, record: StagedRecord) -> None:
        """Queue ``record`` for the journal and ``publish``; without
        ``deferred``, apply it at once."""
        if not self.deferred:
            self.apply(record)
            return
        self.staging.append(record)
        self.records.append(record)
        if record["t"] == "emg":
            self.modes.enforce(self.staging.emergencies())

    def apply_emergency(self, rec: Mapping[str, Any]) -> None:
        account = rec.get("a")
        state = ModeState.from_record(rec)
        previous = self.modes.publish(account, state, rec["v"])
        self.view = None
        self.modes.enforce(self.staging.emergencies())
        self.record(cast(EmergencyRecord, dict(rec)))
        if not self.replaying:
            self.events.append(ModeChanged(self.emergency_view(), account, state.actor))
        if rec["v"] == 0:
            return  # the initial mode of a new state directory: no change
        scope = "gateway" if account is None else f"account {account}"
        text = f"{scope} {previous.value} -> {state.mode.value} by {state.actor}"
        if state.reason:
            text += f": {state.reason}"
        level = alert_level(previous, state.mode)
        self.alert(level, AlertCode.EMERGENCY_CHANGED, text, state.since_ms, account, implied=True)

    def apply_limits(self, rec: Mapping[str, Any]) -> None:
        in_force = self.in_force
        changed = rec["v"] != in_force.version
        in_force.use(Limits.from_mapping(rec["limits"], where="journal limits"))
        in_force.version = rec["v"]
        if "file" in rec:
            in_force.file = rec["file"]
        self.record(cast(LimitsRecord, dict(rec)))
        if not changed:
            return
        self.alert(
            AlertLevel.WARNING,
            AlertCode.LIMITS_CHANGED,
            f"limits changed to version {in_force.version} by {rec['by']}",
            rec["at"],
            implied=True,
        )
        if not self.replaying:
            for account in self.book.accounts:
                self.events.append(ExposureChanged(account))
            self.check_thresholds(None, rec["at"], allow_auto_reduce=False)

    def check_thresholds(
        self, account: str | None, now_ms: int, *, allow_auto_reduce: bool
    ) -> None:
        """Raise EXPOSURE_WARNING / EXPOSURE_BREACH on crossing, and with
        ``allow_auto_reduce`` (a position fact, not a decision) and the
        limits' ``auto_reduce_on_breach``, stage the gateway's reducing mode."""
        if self.replaying:
            return
        limits = self.in_force.limits
        for level, code, message, about in self.book.crossings(account, limits):
            self.alert(level, code, message, now_ms, about)
        if (
            allow_auto_reduce
            and self.book.gateway_breached
            and limits.auto_reduce_on_breach
            and self.modes.enforced_gateway is Mode.NORMAL
        ):
            gross, limit = fmt(self.book.global_gross), fmt(limits.max_exposure)
            if self.share is not None:
                # The gateway-wide mode is shared: its owner sets it.
                self.share.breach = f"cluster gross exposure {gross} over max_exposure {limit}"
                return
            self.stage(
                emergency_record(
                    None,
                    Mode.REDUCING.value,
                    f"gross exposure {gross} over max_exposure {limit}",
                    GATEWAY_ACTOR,
                    now_ms,
                    self.staging.next_version("emg", self.modes.version),
                )
            )

    # ------------------------------------------------------------ replay

    def replay(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Apply recovered records without alerts, events or new records;
        returns how many. What one raises propagates (the state is then
        undefined)."""
        self.replaying = True
        count = 0
        try:
            apply = self.apply
            book = self.book
            accounts = book.accounts
            deferred = book.deferred
            for rec in records:
                count += 1
                # The common record, a position update without seq or release,
                # inline: what apply_position does for it during a replay.
                if rec["t"] != "pos" or "seq" in rec or "rel" in rec:
                    apply(rec)
                    continue
                account = accounts.get(rec["a"])
                if account is None:
                    account = book.account(rec["a"])
                account.known = True
                symbol = rec["s"]
                sym = account.positions.get(symbol)
                if sym is None:
                    sym = account.positions[symbol] = SymbolBook()
                sym.qty = _d(rec["q"])
                sym.mark = _d(rec["p"])
                sym.reported = True
                if not sym.reprice_due:
                    sym.reprice_due = True
                    deferred.append((account, sym))
            self.book.reprice_deferred()
        except Exception:
            self.book.forget_deferred()
            raise
        finally:
            self.replaying = False
        return count


# ------------------------------------------------------------ snapshots


def state_snapshot(state: RiskState) -> dict[str, Any]:
    """The whole durable state as one document that ``load_state_snapshot`` reads.

    Built on the event loop, so it only collects: fresh containers with
    immutable leaves (str, int, ``Decimal``), which the journal encodes in
    its writer thread (``Decimal`` as ``str``, exactly).
    """
    modes = state.modes
    return {
        "format": 1,
        "limits": state.in_force.limits.to_wire(),
        "limits_version": state.in_force.version,
        "file_limits": state.in_force.file,
        "emergency": {
            "gateway": _mode_record(modes.gateway),
            "accounts": {a: _mode_record(s) for a, s in modes.accounts.items()},
            "version": modes.version,
        },
        "accounts": state.book.snapshot_accounts(),
        "prices": dict(state.book.reference_prices),
        "reservations": [r.to_snapshot() for r in state.reservations.live.values()],
        "credit": None if state.credit is None else dict(state.credit),
        "history": state.history.snapshot(),
        # Staged changes: in the journal up to the snapshot's seq (or about
        # to be), not yet published. Loading the snapshot publishes them,
        # so a snapshot taken while one waits for its fsync still holds it.
        "pending": list(state.staging),
    }


def load_state_snapshot(state: RiskState, snap: Mapping[str, Any]) -> None:
    """Replace the whole state with a ``state_snapshot`` document. What it
    raises propagates (the state is then undefined)."""
    in_force = state.in_force
    in_force.use(Limits.from_mapping(snap["limits"], where="snapshot limits"))
    in_force.version = snap["limits_version"]
    in_force.file = snap.get("file_limits")
    emergency = snap["emergency"]
    modes = state.modes
    modes.gateway = ModeState.from_record(emergency["gateway"])
    modes.accounts = {a: ModeState.from_record(s) for a, s in emergency["accounts"].items()}
    modes.version = emergency["version"]
    state.view = None
    state.book.load(snap["accounts"], snap["prices"])
    credit = snap.get("credit")
    state.credit = None if credit is None else cast(CreditRecord, dict(credit))
    state.history.load(snap.get("history"))
    state.reservations.clear()
    state.replaying = True
    try:
        for r in snap["reservations"]:
            rec = dict(r)
            decision = decision_from_snapshot(rec.pop("decision"))
            state.apply_decision(rec, decision)
    finally:
        state.replaying = False
    state.staging.clear()
    state.modes.enforce(state.staging.emergencies())
    state.replaying = True
    try:
        for rec in snap.get("pending", ()):
            state.apply(rec)
    finally:
        state.replaying = False


def _mode_record(state: ModeState) -> dict[str, Any]:
    return {"m": state.mode.value, "r": state.reason, "by": state.actor, "at": state.since_ms}
