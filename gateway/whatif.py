"""Offline tools over a state directory's journal: what-if replay and record.

``what_if`` re-runs the journal's recorded validations, in order and at their
recorded times, through the same ``EmergencyManager`` with other limits, and
reports every decision that would change. Positions, prices, releases and
emergency changes are applied as recorded (they are facts); recorded limit
changes are skipped, since the point is to try other limits.

``record`` turns the journal into a replay file: NDJSON requests exactly as
the protocol writes them, with ``t`` in milliseconds since the first record.

Both read what the directory still holds: the oldest snapshot kept and the
journal after it (the journal keeps one snapshot interval of segments behind
the newest snapshot; a larger ``persistence.snapshot_every`` keeps more).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from gateway.config import Limits
from gateway.core.engine import RiskEngine
from gateway.core.rules import Rule
from gateway.persistence import read_history
from protocol.messages import OrderValidate


@dataclass(slots=True)
class Change:
    seq: int
    account: str
    symbol: str
    side: str
    qty: str
    price: str
    recorded: str
    now: str
    reasons: list[str]

    def describe(self) -> str:
        why = f" ({', '.join(self.reasons)})" if self.reasons else ""
        return (
            f"#{self.seq} {self.account} {self.side} {self.qty} {self.symbol} @ {self.price}: "
            f"{self.recorded} -> {self.now}{why}"
        )


@dataclass(slots=True)
class WhatIf:
    validations: int = 0
    changed: list[Change] = field(default_factory=list)
    first_seq: int | None = None
    last_seq: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "validations": self.validations,
            "changed": len(self.changed),
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "changes": [
                {
                    "seq": c.seq,
                    "account": c.account,
                    "symbol": c.symbol,
                    "side": c.side,
                    "qty": c.qty,
                    "price": c.price,
                    "recorded": c.recorded,
                    "now": c.now,
                    "reasons": c.reasons,
                }
                for c in self.changed
            ],
        }


def _history(state_dir: Path) -> tuple[dict[str, Any] | None, list[tuple[int, dict[str, Any]]]]:
    return read_history(state_dir)


def what_if(state_dir: Path, limits: Limits, rules: tuple[Rule, ...] = ()) -> WhatIf:
    """Re-run the recorded validations against ``limits``; see the module docstring."""
    snapshot, history = _history(state_dir)
    clock_ms = [0]
    manager = RiskEngine(limits=limits, now_ms=clock_ms[0], rules=rules)
    if snapshot is not None:
        manager.load_snapshot(snapshot)
        manager.use_limits(limits)
    result = WhatIf()
    for seq, rec in history:
        kind = rec.get("t")
        if "ts" in rec:
            clock_ms[0] = rec["ts"]
        elif "at" in rec:
            clock_ms[0] = rec["at"]
        if result.first_seq is None:
            result.first_seq = seq
        result.last_seq = seq
        if kind == "lim":
            continue
        if kind != "dec":
            manager.replay([rec])
            continue
        result.validations += 1
        order = OrderValidate(
            account=rec["a"],
            symbol=rec["s"],
            side=rec["side"],
            qty=Decimal(rec["q"]),
            price=Decimal(rec["p"]),
        )
        decision = manager.validate(order, clock_ms[0])
        manager.drain_records()
        manager.drain_events()
        if rec.get("rid") is not None and decision.accepted:
            # Keep the recorded reservation (and its id) so later releases match.
            manager.replay([rec])
        if decision.decision != rec["d"]:
            result.changed.append(
                Change(
                    seq=seq,
                    account=rec["a"],
                    symbol=rec["s"],
                    side=rec["side"],
                    qty=rec["q"],
                    price=rec["p"],
                    recorded=rec["d"],
                    now=decision.decision,
                    reasons=[r["code"] for r in decision.reasons] or list(rec.get("r", [])),
                )
            )
    return result


def _requests(history: list[tuple[int, dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    start: int | None = None
    for seq, rec in history:
        kind = rec.get("t")
        stamp = rec.get("ts")
        if stamp is not None and start is None:
            start = stamp
        t = None if stamp is None or start is None else stamp - start
        line: dict[str, Any]
        if kind == "pos":
            params: dict[str, Any] = {
                "account": rec["a"],
                "symbol": rec["s"],
                "qty": rec["q"],
                "price": rec["p"],
            }
            if "seq" in rec:
                params["seq"] = rec["seq"]
            line = {"id": seq, "method": "position.update", "params": params}
        elif kind == "psnap":
            params = {
                "account": rec["a"],
                "positions": [{"symbol": s, "qty": q, "price": p} for s, q, p in rec["pos"]],
            }
            if "seq" in rec:
                params["seq"] = rec["seq"]
            line = {"id": seq, "method": "position.snapshot", "params": params}
        elif kind == "px":
            line = {
                "id": seq,
                "method": "price.update",
                "params": {"symbol": rec["s"], "price": rec["p"]},
            }
        elif kind == "dec":
            params = {
                "account": rec["a"],
                "symbol": rec["s"],
                "side": rec["side"],
                "qty": rec["q"],
                "price": rec["p"],
            }
            if rec.get("reserve"):
                params["reserve"] = True
            if rec.get("coid") is not None:
                params["client_order_id"] = rec["coid"]
            line = {"id": seq, "method": "order.validate", "params": params}
        else:
            continue
        if t is not None:
            line["t"] = t
        yield line


def record(state_dir: Path, out: Path) -> int:
    """Write the journal's trading flow as a replay file; returns the number of lines."""
    _, history = _history(state_dir)
    count = 0
    with out.open("wb") as handle:
        for line in _requests(history):
            handle.write(orjson.dumps(line) + b"\n")
            count += 1
    return count


def decisions(state_dir: Path) -> Iterator[Mapping[str, Any]]:
    """The recorded decisions as ``{"id", "decision"}`` lines (for ``riskctl replay --expect``)."""
    _, history = _history(state_dir)
    for seq, rec in history:
        if rec.get("t") == "dec":
            yield {"id": seq, "decision": rec["d"]}
