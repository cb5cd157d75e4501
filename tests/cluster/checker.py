"""A history of operations on a cluster and the checks section 10 promises.

Every operation is recorded as it is invoked and as it completes (``ok``,
``fail`` or ``unknown``: no answer, so it may or may not have happened), with
times from ``time.monotonic()``: CLOCK_MONOTONIC, one clock for every process
on the machine, so the members' fences and the clients' times compare.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

OK, FAIL, UNKNOWN = "ok", "fail", "unknown"
#: Operations that are orders: reservations, and plain validations (checks).
ORDERS = ("order", "check")


@dataclass
class Op:
    id: int
    process: str  # who invoked it (client name)
    member: str  # which member it was sent to
    kind: str  # order | release | emergency | limits
    args: dict[str, Any]
    invoked: float
    completed: float | None = None
    outcome: str | None = None
    result: Any = None
    #: For an ``unknown`` order later resolved by a read: what it turned out to be.
    resolved: str | None = None

    @property
    def accepted(self) -> bool:
        """An order (a reservation) or a check (a plain validation) accepted,
        or, for an unknown order, not shown to have failed."""
        if self.kind not in ("order", "check"):
            return False
        if self.outcome == OK:
            return bool(self.result and self.result.get("decision") == "accept")
        return self.outcome == UNKNOWN and self.resolved != FAIL

    @property
    def notional(self) -> Decimal:
        return Decimal(self.args["qty"]) * Decimal(self.args["price"])


@dataclass
class Fault:
    kind: str
    member: str | None
    start: float
    end: float | None = None
    #: When the member first accepted an order again after the heal.
    recovered: float | None = None


@dataclass
class History:
    ops: list[Op] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def invoke(self, process: str, member: str, kind: str, args: dict[str, Any]) -> Op:
        op = Op(next(self._ids), process, member, kind, dict(args), time.monotonic())
        self.ops.append(op)
        return op

    @staticmethod
    def complete(op: Op, outcome: str, result: Any = None) -> None:
        op.completed = time.monotonic()
        op.outcome = outcome
        op.result = result

    def fault(self, kind: str, member: str | None = None) -> Fault:
        fault = Fault(kind, member, time.monotonic())
        self.faults.append(fault)
        return fault

    def summary(self) -> str:
        counts: dict[tuple[str, str | None, bool], int] = {}
        for op in self.ops:
            key = (op.kind, op.outcome, op.accepted)
            counts[key] = counts.get(key, 0) + 1
        lines = [f"{k}: {v}" for k, v in sorted(counts.items(), key=str)]
        lines += [f"fault {f.kind} {f.member or ''} {f.start:.3f}..{f.end}" for f in self.faults]
        return "\n".join(lines)


# ------------------------------------------------------------------ checks


def never_overshoot(history: History, limit: Decimal) -> list[str]:
    """(a) Reservations without fills: at every accept, the orders accepted
    or unknown (counted from their invocation until their release
    completed) sum to at most ``limit``."""
    releases: dict[str, float] = {}
    for op in history.ops:
        if op.kind == "release" and op.outcome == OK and op.completed is not None:
            releases[op.args["reservation_id"]] = op.completed
    held = [op for op in history.ops if op.kind == "order" and op.accepted]
    problems = []
    for op in held:
        if op.outcome != OK or op.completed is None:
            continue
        at = op.completed
        total = Decimal(0)
        for other in held:
            if other.invoked > at:
                continue
            rid = (other.result or {}).get("reservation_id")
            released = releases.get(rid) if rid else None
            if released is not None and released < at:
                continue
            total += other.notional
        if total > limit:
            problems.append(
                f"overshoot: {total} > {limit} at the accept of op {op.id} on {op.member}"
            )
            break
    return problems


def admin_changes_kept(
    history: History, final: dict[str, dict[str, Any]], document: str
) -> list[str]:
    """(b) No acknowledged change lost, no version reused. ``final``: each
    member's view (``emergency.get`` or ``limits.get``) at the end."""
    acked = [op for op in history.ops if op.kind == document and op.outcome == OK]
    problems = []
    by_version: dict[int, Any] = {}
    for op in acked:
        version = op.result["version"]
        content = _content(document, op.result)
        if version in by_version and by_version[version] != content:
            problems.append(f"{document} version {version} acknowledged twice with other content")
        by_version[version] = content
    if not acked:
        return problems
    last = max(acked, key=lambda op: op.result["version"])
    highest = last.result["version"]
    for member, view in final.items():
        if view["version"] < highest:
            problems.append(
                f"{document} on {member} at version {view['version']}, below the acknowledged "
                f"{highest}"
            )
        elif view["version"] == highest and _content(document, view) != _content(
            document, last.result
        ):
            problems.append(f"{document} on {member} at version {highest} has other content")
    versions = {view["version"] for view in final.values()}
    if len(versions) > 1:
        problems.append(f"{document}: members ended at different versions {sorted(versions)}")
    return problems


def _content(document: str, view: dict[str, Any]) -> Any:
    if document == "emergency":
        return (view["mode"], view["reason"])
    return view["limits"]


def halts_bind(history: History, staleness_s: float, slack_s: float) -> list[str]:
    """(c) No order invoked more than S (plus ``slack_s``) after an
    acknowledged halt completed is accepted on any member, while the halt
    stands (until the next emergency change is invoked)."""
    changes = sorted(
        (op for op in history.ops if op.kind == "emergency" and op.args.get("account") is None),
        key=lambda op: op.invoked,
    )
    problems = []
    for index, change in enumerate(changes):
        if change.outcome != OK or change.args["mode"] != "halted" or change.completed is None:
            continue
        start = change.completed + staleness_s + slack_s
        end = changes[index + 1].invoked if index + 1 < len(changes) else float("inf")
        for op in history.ops:
            if op.kind in ORDERS and op.outcome == OK and op.accepted and start < op.invoked < end:
                problems.append(
                    f"order {op.id} on {op.member} accepted {op.invoked - change.completed:.3f} s "
                    f"after the halt acknowledged by op {change.id}"
                )
    return problems


def partitioned_member_rejects(
    history: History, staleness_s: float, slice_s: float, recover_s: float
) -> list[str]:
    """(d) A member cut from Redis rejects every order invoked more than S
    plus one scheduling slice after the cut, until the cut heals; and
    accepts again within ``recover_s`` of the heal."""
    problems = []
    for fault in history.faults:
        if fault.kind not in ("blackhole", "reset") or fault.end is None:
            continue
        for op in history.ops:
            if (
                op.kind in ORDERS
                and op.member == fault.member
                and op.outcome == OK
                and op.accepted
                and fault.start + staleness_s + slice_s < op.invoked
                and (op.completed or 0) < fault.end
            ):
                problems.append(
                    f"order {op.id} accepted on cut member {fault.member} "
                    f"{op.invoked - fault.start:.3f} s into the cut"
                )
        if fault.recovered is None or fault.recovered > fault.end + recover_s:
            problems.append(f"member {fault.member} did not accept again within {recover_s} s")
    return problems
