"""``riskctl bench --cluster``: a cluster of members on one Redis against a
single gateway, in the same run.

It starts, on 127.0.0.1 with a temporary directory, a Redis server
(``redis-server``, ``appendonly yes``, ``appendfsync always``), a single
gateway and three members (each owning one account), and measures:

1. ``latency``: ``order.validate`` round trips one at a time on a member and
   on the single gateway, in alternating blocks; p50 and p99 and their ratio
   (the hot path does not touch Redis).
2. ``fanout``: an ``emergency.set`` on one member until the last of the
   subscribers spread over the three members received the push, measured
   from the request; median and worst of the changes.
3. ``throughput``: acknowledged ``position.update``s and pipelined
   validations per second, with two members loaded against one, each
   member's load from its own client process; the ratio, and the CPU each
   process used (from ``/proc``), which says where the time goes.
4. ``room``: with ``max_exposure`` L, two members holding a little exposure
   and one filling up: the room left when the first order was rejected for
   ``MAX_EXPOSURE``, against the design's bound (N - 1) x credit_high x L.

Like ``riskctl bench`` it imports no ``gateway``: it speaks the wire
protocol, and the members are ``python -m gateway serve`` processes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from clients.bench import (
    _CHILDREN,
    ADMIN_TOKEN,
    ORDER,
    POSITION,
    Conn,
    Progress,
    Server,
    SubscriberGroup,
    alternate_latency,
    median,
    paired_ratios,
    start_server,
)

CREDIT_HIGH = Decimal("0.10")
#: The biggest max_exposure a cluster counts exactly (credit units of 0.0001 below 2**53).
BIG = "900000000000"
ROOM_LIMIT = Decimal("1000000")
ROOM_ORDER = Decimal("10000")

CONFIG = """\
[server]
host = "127.0.0.1"
port = {port}
max_messages_per_second = 1000000000
max_connections = 100000
max_connections_per_ip = 100000

[persistence]
state_dir = "{state_dir}"
fsync = "always"

[limits]
max_exposure = "{big}"
max_account_exposure = "{big}"
max_position = "1000000000000"
max_order_qty = "1000000000000"
max_order_notional = "{big}"
max_orders_per_second = 1000000000
reservation_ttl_ms = 3600000

[[tokens]]
name = "bench-admin"
role = "admin"
token = "{token}"
{cluster}"""

CLUSTER = """
[cluster]
redis_url = "{redis_url}"
name = "{name}"
accounts = ["{account}"]
public_url = "ws://127.0.0.1:{port}/v1/ws"
"""


@dataclass(frozen=True, slots=True)
class ClusterSizes:
    latency_n: int
    block_n: int
    repeats: int
    subscribers: int
    changes: int
    load_n: int


FULL = ClusterSizes(
    latency_n=10_000, block_n=1_000, repeats=3, subscribers=1_000, changes=20, load_n=20_000
)
QUICK = ClusterSizes(latency_n=400, block_n=200, repeats=1, subscribers=30, changes=3, load_n=600)


def redis_server() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Lab:
    """Redis, one single gateway and three members, all stopped by PID."""

    def __init__(self, workdir: Path, progress: Progress) -> None:
        self.workdir = workdir
        self.progress = progress
        self.redis: asyncio.subprocess.Process | None = None
        self.redis_port = _free_port()
        self.single: Server | None = None
        self.members: dict[str, Server] = {}

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    async def start(self) -> None:
        binary = redis_server()
        assert binary is not None
        data = self.workdir / "redis"
        data.mkdir()
        self.redis = await asyncio.create_subprocess_exec(
            *[
                binary,
                *("--port", str(self.redis_port), "--bind", "127.0.0.1"),
                *("--dir", str(data), "--appendonly", "yes", "--appendfsync", "always"),
                *("--save", "", "--logfile", str(data / "redis.log")),
            ],
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        _CHILDREN.add(self.redis.pid)
        for _ in range(500):
            try:
                socket.create_connection(("127.0.0.1", self.redis_port), timeout=0.2).close()
                break
            except OSError:
                await asyncio.sleep(0.02)
        self.single = await self._gateway("single", None, "A1")
        for name, account in (("m1", "A1"), ("m2", "B1"), ("m3", "C1")):
            self.members[name] = await self._gateway(name, name, account)
        self.progress(f"  Redis, a single gateway and {len(self.members)} members started")

    async def _gateway(self, label: str, member: str | None, account: str) -> Server:
        port = _free_port()
        cluster = ""
        if member is not None:
            cluster = CLUSTER.format(
                redis_url=self.redis_url, name=member, account=account, port=port
            )
        config = self.workdir / f"{label}.toml"
        config.write_text(
            CONFIG.format(
                port=port,
                state_dir=self.workdir / f"state-{label}",
                big=BIG,
                token=ADMIN_TOKEN,
                cluster=cluster,
            )
        )
        return await start_server(
            label,
            ["-m", "gateway", "serve", "--config", str(config)],
            "risk-gateway listening on ",
            self.workdir / f"{label}.log",
        )

    async def stop(self) -> None:
        for server in [*self.members.values(), *([self.single] if self.single else [])]:
            await server.stop()
        if self.redis is not None:
            self.redis.terminate()
            await self.redis.wait()
            _CHILDREN.discard(self.redis.pid)


# ------------------------------------------------------------------ sections


async def section_latency(lab: Lab, sizes: ClusterSizes) -> dict[str, Any]:
    assert lab.single is not None
    single, member = await Conn.open(lab.single.url), await Conn.open(lab.members["m1"].url)
    try:
        for conn in (single, member):
            await conn.ok("position.update", POSITION)
            await conn.round_trips(conn.frames("order.validate", ORDER, sizes.block_n))
        member_runs: list[dict[str, float]] = []
        single_runs: list[dict[str, float]] = []
        failures = 0
        for repeat in range(sizes.repeats):
            member_run, single_run, failed = await alternate_latency(
                member, single, sizes.latency_n, sizes.block_n
            )
            member_runs.append(member_run)
            single_runs.append(single_run)
            failures += failed
            lab.progress(
                f"  repeat {repeat + 1}: p50 member {member_runs[-1]['p50']:.0f} us, "
                f"single {single_runs[-1]['p50']:.0f} us"
            )
    finally:
        await single.close()
        await member.close()
    ratios = paired_ratios(member_runs, single_runs)
    return {
        "n": sizes.latency_n,
        "repeats": sizes.repeats,
        "member_p50_us": median([r["p50"] for r in member_runs]),
        "member_p99_us": median([r["p99"] for r in member_runs]),
        "single_p50_us": median([r["p50"] for r in single_runs]),
        "single_p99_us": median([r["p99"] for r in single_runs]),
        "ratio_p50": ratios["p50"],
        "ratio_p99": ratios["p99"],
        "failures": failures,
    }


async def section_fanout(lab: Lab, sizes: ClusterSizes) -> dict[str, Any]:
    members = list(lab.members.values())
    admin = await Conn.open(members[0].url)
    groups: list[SubscriberGroup] = []
    try:
        counts = [
            sizes.subscribers // 3 + (1 if i < sizes.subscribers % 3 else 0) for i in range(3)
        ]
        groups = list(
            await asyncio.gather(
                *(SubscriberGroup.start(m.url, n) for m, n in zip(members, counts, strict=True))
            )
        )
        lab.progress(f"  {sizes.subscribers} subscribers on {len(members)} members")
        sent_at: dict[int, int] = {}
        mode = "normal"
        for _ in range(sizes.changes):
            mode = "reducing" if mode == "normal" else "normal"
            started = time.monotonic_ns()
            view = await admin.ok("emergency.set", {"mode": mode, "reason": "bench"})
            sent_at[view["version"]] = started
            await asyncio.sleep(0.25)
        if mode != "normal":
            await admin.ok("emergency.set", {"mode": "normal", "reason": "bench"})
        await asyncio.sleep(0.5)
        merged: dict[int, tuple[int, int]] = {}
        for group in groups:
            for version, (count, last) in (await group.report()).items():
                seen, latest = merged.get(version, (0, 0))
                merged[version] = (seen + count, max(latest, last))
        after_request = []
        missing = 0
        for version, started in sent_at.items():
            count, last = merged.get(version, (0, 0))
            missing += sizes.subscribers - count
            if count:
                after_request.append((last - started) / 1e6)
    finally:
        for group in groups:
            await group.stop()
        await admin.close()
    lab.progress(
        f"  last subscriber {median(after_request):.1f} ms after the request "
        f"(worst {max(after_request):.1f} ms)"
    )
    return {
        "subscribers": sizes.subscribers,
        "members": len(members),
        "changes": sizes.changes,
        "last_receipt_median_ms": median(after_request),
        "last_receipt_worst_ms": max(after_request),
        "missing_receipts": missing,
    }


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


async def _load(
    members: Sequence[Server], kind: str, n: int, redis_pid: int
) -> tuple[float, dict[str, float]]:
    """Each member loaded by a client process of its own; (requests/s of all
    together, CPU share per process)."""
    procs = []
    for server, account in zip(members, ("A1", "B1"), strict=False):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "clients.bench_cluster",
            "load",
            server.url,
            account,
            kind,
            str(n),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        _CHILDREN.add(proc.pid)
        procs.append(proc)
    for proc in procs:
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        if not line.startswith(b"ready"):
            raise RuntimeError(f"load process failed: {line!r}")
    watched = {f"member {s.name}": s.pid for s in members} | {"redis": redis_pid}
    before = {name: _cpu_ticks(pid) for name, pid in watched.items()}
    started = time.perf_counter()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
    total = 0
    client_cpu: dict[str, float] = {}
    for server, proc in zip(members, procs, strict=True):
        assert proc.stdout is not None
        count, cpu_s = (await proc.stdout.readline()).decode().split()
        total += int(count)
        client_cpu[f"client of {server.name}"] = float(cpu_s)
    elapsed = time.perf_counter() - started
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = {
        name: (_cpu_ticks(pid) - before[name]) / ticks / elapsed for name, pid in watched.items()
    } | {name: seconds / elapsed for name, seconds in client_cpu.items()}
    for proc in procs:
        await proc.wait()
        _CHILDREN.discard(proc.pid)
    return total / elapsed, cpu


async def section_throughput(lab: Lab, sizes: ClusterSizes) -> dict[str, Any]:
    members = [lab.members["m1"], lab.members["m2"]]
    assert lab.redis is not None
    redis_pid = lab.redis.pid
    report: dict[str, Any] = {"cpus": os.cpu_count(), "n_per_member": sizes.load_n}
    for kind in ("updates", "validations"):
        one: list[float] = []
        two: list[float] = []
        cpu_two: dict[str, float] = {}
        for _ in range(sizes.repeats):
            rate, _cpu = await _load(members[:1], kind, sizes.load_n, redis_pid)
            one.append(rate)
            rate, cpu_two = await _load(members, kind, sizes.load_n, redis_pid)
            two.append(rate)
        ratio = median([b / a for a, b in zip(one, two, strict=True)])
        lab.progress(
            f"  {kind}: 1 member {median(one):.0f}/s, 2 members {median(two):.0f}/s "
            f"(x{ratio:.2f}); CPU "
            + ", ".join(f"{name} {share:.0%}" for name, share in cpu_two.items())
        )
        report[kind] = {
            "one_member_per_s": median(one),
            "two_members_per_s": median(two),
            "ratio": ratio,
            "cpu_share_two_members": cpu_two,
            "cpu_total_two_members": sum(cpu_two.values()),
        }
    return report


async def section_room(lab: Lab) -> dict[str, Any]:
    admin = await Conn.open(lab.members["m1"].url)
    conns = {name: await Conn.open(server.url) for name, server in lab.members.items()}
    try:
        limits = await admin.ok("limits.get", {})
        await admin.ok(
            "limits.set",
            {
                "version": limits["version"],
                "limits": {
                    "max_exposure": str(ROOM_LIMIT),
                    "max_account_exposure": str(ROOM_LIMIT),
                    "max_order_notional": str(ROOM_LIMIT),
                },
            },
        )
        for conn, account in ((conns["m1"], "A1"), (conns["m2"], "B1"), (conns["m3"], "C1")):
            # Earlier sections left positions: start each account flat.
            await conn.ok("position.update", {**POSITION, "account": account, "qty": "0"})
        await asyncio.sleep(0.5)  # the members give back what they no longer need
        order = {"symbol": "BTC-USD", "side": "buy", "price": "50000", "reserve": True}
        qty = str(ROOM_ORDER / 50000)
        held = Decimal(0)
        for conn, account in ((conns["m2"], "B1"), (conns["m3"], "C1")):
            decision = await conn.ok("order.validate", {**order, "account": account, "qty": qty})
            assert decision["decision"] == "accept", decision
            held += ROOM_ORDER
        await asyncio.sleep(0.5)  # their headroom settles
        rejected_at = None
        for _ in range(int(ROOM_LIMIT / ROOM_ORDER) + 1):
            decision = await conns["m1"].ok(
                "order.validate", {**order, "account": "A1", "qty": qty}
            )
            if decision["decision"] != "accept":
                codes = [r["code"] for r in decision["reasons"]]
                assert codes == ["MAX_EXPOSURE"], decision
                rejected_at = held
                break
            held += ROOM_ORDER
        seen = await admin.ok("cluster.get", {})
    finally:
        for conn in conns.values():
            await conn.close()
        await admin.close()
    assert rejected_at is not None
    room = ROOM_LIMIT - rejected_at
    bound = ((len(lab.members) - 1) * CREDIT_HIGH * ROOM_LIMIT).quantize(Decimal(1))
    lab.progress(
        f"  first MAX_EXPOSURE with {room} of {ROOM_LIMIT} free "
        f"(orders of {ROOM_ORDER}); the design's bound {bound} (+ one order)"
    )
    return {
        "limit": str(ROOM_LIMIT),
        "order": str(ROOM_ORDER),
        "held_at_first_reject": str(rejected_at),
        "room_lost": str(room),
        "bound": str(bound),
        "within_bound": room < bound + ROOM_ORDER,
        "credits": {m["name"]: m["credit"] for m in seen["members"]},
    }


async def run_cluster_bench(sizes: ClusterSizes, progress: Progress) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="riskgw-cluster-bench-") as scratch:
        lab = Lab(Path(scratch), progress)
        try:
            await lab.start()
            report: dict[str, Any] = {"cpus": os.cpu_count()}
            progress("1/4 validation latency: member against single gateway")
            report["latency"] = await section_latency(lab, sizes)
            progress("2/4 emergency change to every member's subscribers")
            report["fanout"] = await section_fanout(lab, sizes)
            progress("3/4 throughput: 2 members against 1")
            report["throughput"] = await section_throughput(lab, sizes)
            progress("4/4 room lost to idle credit near the limit")
            report["room"] = await section_room(lab)
        finally:
            await lab.stop()
    return report


def render(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(figure, value, target) rows."""
    lat, fan, thr, room = (report[k] for k in ("latency", "fanout", "throughput", "room"))
    return [
        (
            "validation p50 member / single",
            f"{lat['member_p50_us']:.0f} / {lat['single_p50_us']:.0f} us (x{lat['ratio_p50']:.2f})",
            "<= x1.1",
        ),
        (
            "validation p99 member / single",
            f"{lat['member_p99_us']:.0f} / {lat['single_p99_us']:.0f} us (x{lat['ratio_p99']:.2f})",
            "<= x1.1",
        ),
        (
            f"emergency to last of {fan['subscribers']} subscribers on {fan['members']} members",
            f"median {fan['last_receipt_median_ms']:.1f} ms, worst "
            f"{fan['last_receipt_worst_ms']:.1f} ms ({fan['changes']} changes)",
            "<= 100 ms",
        ),
        *(
            (
                f"{kind} /s, 2 members against 1",
                f"{thr[kind]['two_members_per_s']:.0f} / {thr[kind]['one_member_per_s']:.0f} "
                f"(x{thr[kind]['ratio']:.2f}); CPU in use {thr[kind]['cpu_total_two_members']:.2f}"
                f" of {thr['cpus']} cores",
                ">= x1.6",
            )
            for kind in ("updates", "validations")
        ),
        (
            "room lost near the limit",
            f"{room['room_lost']} of {room['limit']} (orders of {room['order']})",
            f"<= {room['bound']} + one order",
        ),
    ]


# ------------------------------------------------------------ load helper


async def _load_main(url: str, account: str, kind: str, n: int) -> int:
    conn = await Conn.open(url)
    if kind == "updates":
        frames = [
            orjson.dumps(
                {
                    "id": i + 1,
                    "method": "position.update",
                    "params": {**POSITION, "account": account, "qty": str(i % 7 + 1)},
                }
            )
            for i in range(n)
        ]
    else:
        await conn.ok("position.update", {**POSITION, "account": account})
        frames = conn.frames("order.validate", {**ORDER, "account": account}, n)
    await conn.pipelined(frames[: min(200, n)], 64)  # warm up
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await asyncio.to_thread(sys.stdin.readline)
    cpu_before = os.times()
    _elapsed, failures = await conn.pipelined(frames, 64)
    cpu_after = os.times()
    cpu_s = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    sys.stdout.write(f"{n - failures} {cpu_s:.4f}\n")
    sys.stdout.flush()
    await conn.close()
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["load"]:
        url, account, kind, count = sys.argv[2:6]
        sys.exit(asyncio.run(_load_main(url, account, kind, int(count))))
    print("usage: python -m clients.bench_cluster load URL ACCOUNT KIND N", file=sys.stderr)
    sys.exit(2)
