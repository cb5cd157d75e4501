"""A kill -9 campaign against a real gateway process, with a ledger of what was
acknowledged (PROTOCOL section 9: every acknowledged change survives a crash at
any moment, with its version, and a version never names two contents).

Each round starts ``python -m gateway serve`` on the same state directory
(small ``snapshot_every``, so kills land during snapshots and rotation), checks
what it recovered against the ledger, then runs a random concurrent mix for a
random moment and kills the process with SIGKILL:

- pipelined ``position.update`` of account A1 with an ever-rising quantity per
  symbol (so a recovered quantity is checked against the last acknowledged
  and the last sent);
- ``order.validate`` with ``reserve`` and a ``client_order_id`` on account A2,
  each on its own symbol at price 1, some repeated (the same reservation must
  come back), some released;
- ``emergency.set`` both ways, gateway-wide and for account A2, and
  ``limits.set`` of ``max_order_qty``, from an admin one after the other.

After each restart: every acknowledged position is there (and nothing never
sent), the emergency and limits versions are at least the last acknowledged
ones, every version ever seen (answers, pushes, reads) keeps one content, and
every acknowledged reservation not released since is still there (its
``client_order_id`` returns it again).

Run longer than the suite does::

    python -m tests.crash.crash_campaign --rounds 500 --seed 7
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.gwprocess import GatewayProcess
from tests.wsclient import TestClient

CONFIG = """
[server]
host = "127.0.0.1"
port = 0
heartbeat_s = 1

[persistence]
state_dir = "{state_dir}"
fsync = "always"
snapshot_every = {snapshot_every}

[limits]
max_exposure = "1000000000000"
max_account_exposure = "1000000000000"
reservation_ttl_ms = 31536000000

[[tokens]]
name = "ops-admin"
role = "admin"
token = "admin-token"

[[tokens]]
name = "desk-1"
role = "trader"
accounts = ["A1", "A2"]
token = "trader-token"
"""

SYMBOLS = [f"S{i}" for i in range(6)]


class Violation(AssertionError):
    """The gateway broke a promise of PROTOCOL section 9."""


@dataclass
class Ledger:
    """What was sent and what was acknowledged, across every round."""

    counter: int = 0
    sent: dict[str, int] = field(default_factory=dict)
    acked: dict[str, int] = field(default_factory=dict)
    # version -> content, for every EMERGENCY and limits document ever seen.
    emergency_seen: dict[int, Any] = field(default_factory=dict)
    limits_seen: dict[int, Any] = field(default_factory=dict)
    emergency_acked: int = 0
    limits_acked: int = 0
    # client_order_id -> (params, reservation_id) of acknowledged reservations.
    reservations: dict[str, tuple[dict[str, Any], str]] = field(default_factory=dict)
    # client_order_ids whose release was sent (acknowledged or not).
    releasing: set[str] = field(default_factory=set)
    next_order: int = 0
    acknowledged: int = 0

    def see_emergency(self, view: dict[str, Any], where: str) -> None:
        content = (
            view["mode"],
            view["reason"],
            tuple(sorted((a, s["mode"], s["reason"]) for a, s in view["accounts"].items())),
        )
        known = self.emergency_seen.setdefault(view["version"], content)
        if known != content:
            raise Violation(
                f"emergency version {view['version']} named {known} and now {content} ({where})"
            )

    def see_limits(self, view: dict[str, Any], where: str) -> None:
        content = tuple(sorted((k, str(v)) for k, v in view["limits"].items()))
        known = self.limits_seen.setdefault(view["version"], content)
        if known != content:
            raise Violation(f"limits version {view['version']} changed content ({where})")


@dataclass
class Summary:
    """A campaign that returns lost nothing and reused no version (any loss or
    reuse raises ``Violation``)."""

    rounds: int = 0
    acknowledged: int = 0
    seconds: float = 0.0


async def check_recovered(admin: TestClient, trader: TestClient, ledger: Ledger, rnd: int) -> None:
    state = await admin.ok("state.get")
    positions = state["accounts"].get("A1", {}).get("positions", {})
    for symbol in set(positions) | set(ledger.acked):
        if symbol not in ledger.sent:
            raise Violation(f"round {rnd}: {symbol} recovered but never sent")
        got = int(positions[symbol]["qty"]) if symbol in positions else 0
        if got < ledger.acked.get(symbol, 0):
            raise Violation(
                f"round {rnd}: {symbol} recovered {got} < acknowledged {ledger.acked[symbol]}"
            )
        if got > ledger.sent[symbol]:
            raise Violation(f"round {rnd}: {symbol} recovered {got} > sent {ledger.sent[symbol]}")
    emergency = await admin.ok("emergency.get")
    ledger.see_emergency(emergency, f"round {rnd} after restart")
    if emergency["version"] < ledger.emergency_acked:
        raise Violation(
            f"round {rnd}: emergency version {emergency['version']} < acknowledged "
            f"{ledger.emergency_acked}"
        )
    limits = await admin.ok("limits.get")
    ledger.see_limits(limits, f"round {rnd} after restart")
    if limits["version"] < ledger.limits_acked:
        raise Violation(
            f"round {rnd}: limits version {limits['version']} < acknowledged {ledger.limits_acked}"
        )
    # Every acknowledged reservation not released since is still there: its
    # client_order_id returns the same reservation (and reserves nothing new).
    for coid, (params, rid) in list(ledger.reservations.items()):
        if coid in ledger.releasing:
            continue
        answer = await trader.call("order.validate", params)
        if answer["status"] != "ok" or answer["result"]["reservation_id"] != rid:
            raise Violation(
                f"round {rnd}: reservation {rid} ({coid}) acknowledged, then {answer} after restart"
            )


async def stream_positions(trader: TestClient, ledger: Ledger, rng: random.Random) -> None:
    async def one() -> None:
        ledger.counter += 1
        symbol = rng.choice(SYMBOLS)
        qty = ledger.counter
        ledger.sent[symbol] = qty
        params = {"account": "A1", "symbol": symbol, "qty": str(qty), "price": "1"}
        answer = await trader.call("position.update", params, timeout=30)
        if answer["status"] == "ok" and qty > ledger.acked.get(symbol, 0):
            ledger.acked[symbol] = qty
            ledger.acknowledged += 1

    tasks: set[asyncio.Task[None]] = set()

    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # a kill closes the connection: expected, and seen here

    try:
        with contextlib.suppress(Exception):
            while True:
                while len(tasks) < 16:
                    task = asyncio.create_task(one())
                    tasks.add(task)
                    task.add_done_callback(done)
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def reserve_and_release(trader: TestClient, ledger: Ledger, rng: random.Random) -> None:
    with contextlib.suppress(Exception):
        while True:
            if ledger.reservations and rng.random() < 0.3:
                coid = rng.choice(sorted(ledger.reservations))
                if coid not in ledger.releasing and rng.random() < 0.5:
                    ledger.releasing.add(coid)
                    rid = ledger.reservations[coid][1]
                    await trader.call("reservation.release", {"reservation_id": rid}, timeout=30)
                    continue
                if coid not in ledger.releasing:
                    params, rid = ledger.reservations[coid]
                    again = await trader.call("order.validate", params, timeout=30)
                    if again["status"] == "ok" and again["result"]["reservation_id"] != rid:
                        raise Violation(f"{coid} repeated: {rid} then {again['result']}")
                    continue
            ledger.next_order += 1
            coid = f"c{ledger.next_order}"
            params = {
                "account": "A2",
                "symbol": f"R{ledger.next_order}",
                "side": "buy",
                "qty": "1",
                "price": "1",
                "reserve": True,
                "client_order_id": coid,
            }
            answer = await trader.call("order.validate", params, timeout=30)
            if answer["status"] == "ok" and answer["result"]["decision"] == "accept":
                ledger.reservations[coid] = (params, answer["result"]["reservation_id"])
                ledger.acknowledged += 1


async def administer(
    admin: TestClient, ledger: Ledger, rng: random.Random, acked: asyncio.Event
) -> None:
    with contextlib.suppress(Exception):
        while True:
            if rng.random() < 0.6:
                scope = rng.choice([None, "A2"])
                mode = rng.choice(["normal", "reducing", "halted"])
                params: dict[str, Any] = {
                    "mode": mode,
                    "reason": "" if mode == "normal" else f"drill {rng.randrange(10**6)}",
                }
                if scope is not None:
                    params["account"] = scope
                answer = await admin.call("emergency.set", params, timeout=30)
                if answer["status"] == "ok":
                    view = answer["result"]
                    ledger.see_emergency(view, "an emergency.set answer")
                    ledger.emergency_acked = max(ledger.emergency_acked, view["version"])
                    ledger.acknowledged += 1
                    acked.set()
            else:
                current = await admin.ok("limits.get")
                ledger.see_limits(current, "a limits.get answer")
                change = {"max_order_qty": str(1_000_000 + rng.randrange(10**6))}
                answer = await admin.call(
                    "limits.set", {"version": current["version"], "limits": change}, timeout=30
                )
                if answer["status"] == "ok":
                    ledger.see_limits(answer["result"], "a limits.set answer")
                    ledger.limits_acked = max(ledger.limits_acked, answer["result"]["version"])
                    ledger.acknowledged += 1
                    acked.set()
            await asyncio.sleep(rng.uniform(0, 0.02))


def drain_pushes(admin: TestClient, ledger: Ledger) -> None:
    queue = admin.channel("emergency")
    while not queue.empty():
        ledger.see_emergency(queue.get_nowait()["data"], "an emergency push")


async def one_round(config: Path, ledger: Ledger, rng: random.Random, rnd: int) -> None:
    proc = await GatewayProcess.start(config, timeout=60)
    clients: list[TestClient] = []
    try:
        admin = await TestClient.open(proc.url, "admin-token")
        trader = await TestClient.open(proc.url, "trader-token")
        clients += [admin, trader]
        await check_recovered(admin, trader, ledger, rnd)
        drain_pushes(admin, ledger)
        acked = asyncio.Event()
        workers = [
            asyncio.create_task(stream_positions(trader, ledger, rng)),
            asyncio.create_task(reserve_and_release(trader, ledger, rng)),
            asyncio.create_task(administer(admin, ledger, rng, acked)),
        ]
        if rng.random() < 0.3:
            # Right after an admin change was acknowledged.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await acked.wait()
        else:
            await asyncio.sleep(rng.uniform(0.05, 0.4))
        proc.kill()
        await proc.wait()
        drain_pushes(admin, ledger)
        for worker in workers:
            worker.cancel()
        results = await asyncio.gather(*workers, return_exceptions=True)
        for result in results:
            if isinstance(result, Violation):
                raise result
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
        if proc.proc.returncode is None:
            proc.kill()
            await proc.wait()


async def run_campaign(
    workdir: Path, rounds: int, seed: int, progress: Callable[[str], None] | None = None
) -> Summary:
    """Run ``rounds`` kill -9 rounds; raises ``Violation`` (naming the seed) on a broken promise."""
    rng = random.Random(seed)
    state_dir = workdir / "state"
    config = workdir / "gw.toml"
    config.write_text(CONFIG.format(state_dir=state_dir, snapshot_every=rng.choice((40, 90, 200))))
    ledger = Ledger()
    summary = Summary()
    started = time.monotonic()
    try:
        for rnd in range(rounds):
            await one_round(config, ledger, rng, rnd)
            summary.rounds = rnd + 1
            if progress is not None and (rnd + 1) % 10 == 0:
                progress(
                    f"{rnd + 1}/{rounds} rounds, {ledger.acknowledged} changes acknowledged, "
                    "0 lost, 0 versions reused"
                )
        # One more start checks the last round's kill.
        proc = await GatewayProcess.start(config, timeout=60)
        try:
            admin = await TestClient.open(proc.url, "admin-token")
            trader = await TestClient.open(proc.url, "trader-token")
            await check_recovered(admin, trader, ledger, rounds)
            await admin.close()
            await trader.close()
        finally:
            proc.terminate()
            await proc.wait()
    except Violation as exc:
        raise Violation(f"seed {seed}: {exc}") from None
    summary.acknowledged = ledger.acknowledged
    summary.seconds = time.monotonic() - started
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="crash-campaign-") as tmp:
        try:
            summary = asyncio.run(
                run_campaign(Path(tmp), args.rounds, args.seed, lambda line: print(line))
            )
        except Violation as exc:
            print(f"VIOLATION: {exc}", file=sys.stderr)
            return 1
    print(
        f"seed {args.seed}: {summary.rounds} rounds, {summary.acknowledged} changes "
        f"acknowledged, 0 lost, 0 versions reused, {summary.seconds:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
