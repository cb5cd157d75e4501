"""``riskctl bench``: measure a real gateway against a plain websockets echo server.

One run starts, as subprocesses on 127.0.0.1 port 0 with a temporary state
directory and config, the gateway (``python -m gateway serve``) and the
baseline (``python -m clients.echo``: the same transport settings and the same
JSON work at the edges, no risk logic). This process is the load generator
(a raw websockets client, no compression, orjson), so servers and client run
on different cores. Sections (docs/benchmarks.md says what each one means):

1. ``latency``: ``order.validate`` round trips one at a time; p50/p99/p99.9
   for gateway and echo and their ratios.
2. ``pipelined``: 64 validations in flight on one connection; req/s and ratio.
3. ``updates``: acknowledged ``position.update``/s under fsync always,
   interval and never (a gateway each), with fsyncs/s from ``/metrics``.
4. ``scaling``: validation p50 with 10 open positions and with 100,000.
5. ``fanout``: time from an ``emergency.set`` response to the last of 1,000
   subscribers' receipt, validation p99 during a storm of emergency
   changes (20 a second, and flat out) against p99 without one, and the
   heartbeat interval the subscribers saw against ``server.heartbeat_s``.
6. ``recovery``: ``Store.open()`` of a state directory holding 1,000,000
   journal records, in a fresh process (``python -m gateway.benchtools``).
7. ``memory``: gateway RSS per idle authenticated connection.

Figures are medians over repeats; each ratio is the median of the ratios of
back-to-back gateway and echo measurements. ``--json`` prints one object on
stdout; progress goes to stderr. ``--quick`` is a short run with small counts
(used by the test suite; its figures are not meaningful against the targets).

This module imports no ``gateway``: the load generator speaks the wire
protocol only. Section 6 needs the gateway's persistence to write a journal
and time its recovery, so it runs ``python -m gateway.benchtools`` as
subprocesses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import orjson
from rich.console import Console
from rich.table import Table
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

ADMIN_TOKEN: Final = "bench-admin-token"
SECTIONS: Final = (
    "latency",
    "pipelined",
    "updates",
    "scaling",
    "fanout",
    "recovery",
    "memory",
    "snapshots",
)
FSYNC_MODES: Final = ("always", "interval", "never")
START_TIMEOUT_S: Final = 120.0
HELPER_TIMEOUT_S: Final = 600.0

# The order every validation section sends: an accepted buy against a long
# position of 2 at the same price (exposure 100000 -> 150000, far below limits).
POSITION: Final = {"account": "A1", "symbol": "BTC-USD", "qty": "2", "price": "50000"}
ORDER: Final = {"account": "A1", "symbol": "BTC-USD", "side": "buy", "qty": "1", "price": "50000"}
# During emergency changes the gateway toggles between normal and reducing: a
# sell that strictly reduces the long position is accepted in both modes, so
# the storm changes nothing but the load around the validation.
REDUCING_ORDER: Final = {**ORDER, "side": "sell"}
# Section 5's storm: emergency changes at this rate (one every 50 ms; an
# operator changes modes a few times a day). The flat-out storm (each change
# sent as soon as the previous one is answered) is measured as well.
STORM_CHANGES_PER_S: Final = 20.0
#: Section 5's subscriber processes time stamp the heartbeats of this many of
#: their connections (spread over the group): intervals, not arrival order,
#: are measured, so a sample tells as much as all of them.
HEARTBEAT_SAMPLE: Final = 16

CONFIG: Final = """\
[server]
host = "127.0.0.1"
port = 0
max_messages_per_second = 1000000000
max_connections = 100000
max_connections_per_ip = 100000

[persistence]
state_dir = "{state_dir}"
fsync = "{fsync}"

[limits]
max_exposure = "1000000000000000000"
max_account_exposure = "1000000000000000000"
max_position = "1000000000000"
max_order_qty = "1000000000000"
max_order_notional = "1000000000000000"
max_orders_per_second = 1000000000

[[tokens]]
name = "bench-admin"
role = "admin"
token = "{token}"
"""


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much each section does (full run, or ``--quick``)."""

    repeats: int
    latency_n: int
    warmup_n: int
    pipelined_n: int
    in_flight: int
    updates_n: int
    update_connections: int
    scaling_positions: int
    scaling_n: int
    subscribers: int
    subscriber_procs: int
    changes: int
    storm_n: int
    recovery_records: int
    recovery_repeats: int
    idle_connections: int
    snapshot_positions: int
    snapshot_n: int
    flood_n: int


FULL: Final = Sizes(
    repeats=3,
    latency_n=20_000,
    warmup_n=2_000,
    pipelined_n=20_000,
    in_flight=64,
    updates_n=20_000,
    update_connections=4,
    scaling_positions=100_000,
    scaling_n=5_000,
    subscribers=1_000,
    subscriber_procs=1,
    changes=10,
    storm_n=2_000,
    recovery_records=1_000_000,
    recovery_repeats=3,
    idle_connections=1_000,
    snapshot_positions=900,
    snapshot_n=50,
    flood_n=2_000,
)
#: Sections 1 and 2 alternate between the gateway and the echo in blocks of
#: this many requests, so both see the same spells of a shared machine.
BLOCK_N: Final = 1_000
PIPELINED_BLOCK_N: Final = 5_000

QUICK: Final = Sizes(
    repeats=1,
    latency_n=500,
    warmup_n=100,
    pipelined_n=1_000,
    in_flight=64,
    updates_n=1_000,
    update_connections=2,
    scaling_positions=2_000,
    scaling_n=300,
    subscribers=50,
    subscriber_procs=1,
    changes=3,
    storm_n=300,
    recovery_records=10_000,
    recovery_repeats=1,
    idle_connections=50,
    snapshot_positions=900,
    snapshot_n=5,
    flood_n=200,
)


# --------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (q in 0..1)."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(q * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def latency_summary(samples_ns: Sequence[int]) -> dict[str, float]:
    """p50, p99, p99.9 and mean in microseconds."""
    ordered = sorted(samples_ns)
    return {
        "p50": percentile(ordered, 0.50) / 1000,
        "p99": percentile(ordered, 0.99) / 1000,
        "p999": percentile(ordered, 0.999) / 1000,
        "mean": statistics.fmean(ordered) / 1000,
    }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def median_summary(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    return {key: median([run[key] for run in runs]) for key in runs[0]}


def paired_ratios(
    gateway: Sequence[dict[str, float]], echo: Sequence[dict[str, float]]
) -> dict[str, float]:
    """Per key, the median over repeats of gateway / echo measured back to back."""
    return {
        key: median([g[key] / e[key] for g, e in zip(gateway, echo, strict=True)])
        for key in gateway[0]
    }


# ---------------------------------------------------------------- processes


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
    return soft


def rss_kib(pid: int) -> int:
    """VmRSS of a process from /proc, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Server:
    """A server subprocess whose URL comes from its start-up line on stdout."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, url: str, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.url = url
        self.log = log
        assert proc.stdout is not None
        # Keep reading stdout so the child never blocks on a full pipe.
        self._drain = asyncio.create_task(_drain(proc.stdout))

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def http_base(self) -> str:
        return "http://" + self.url.split("://", 1)[1].split("/", 1)[0]

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(60):
                    await self.proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        _CHILDREN.discard(self.proc.pid)
        self._drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._drain


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


async def start_server(
    name: str, argv: Sequence[str], ready_prefix: str, log: Path, *, cwd: Path | None = None
) -> Server:
    """Start ``python ARGV`` and wait for the line ``READY_PREFIX URL ...`` on stdout."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
            stdin=asyncio.subprocess.DEVNULL,
            env=env,
            cwd=cwd,
        )
    assert proc.stdout is not None
    _CHILDREN.add(proc.pid)
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            while True:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    await proc.wait()
                    tail = (await asyncio.to_thread(log.read_bytes))[-2000:].decode(
                        errors="replace"
                    )
                    raise RuntimeError(
                        f"{name} exited ({proc.returncode}) before listening:\n{tail}"
                    )
                if line.startswith(ready_prefix):
                    url = line[len(ready_prefix) :].split()[0]
                    return Server(name, proc, url, log)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        _CHILDREN.discard(proc.pid)
        raise


# Every server and helper process started, so that an interrupted run can end
# them (by their ids) after its event loop is gone.
_CHILDREN: set[int] = set()


def _end_children() -> None:
    for pid in list(_CHILDREN):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        _CHILDREN.discard(pid)


async def http_get(url: str) -> str:
    def get() -> str:
        with urllib.request.urlopen(url, timeout=30) as response:
            body: bytes = response.read()
            return body.decode()

    return await asyncio.to_thread(get)


async def journal_fsyncs(server: Server) -> float:
    """``riskgw_journal_fsyncs`` from the gateway's /metrics."""
    text = await http_get(server.http_base + "/metrics")
    for line in text.splitlines():
        if line.startswith("riskgw_journal_fsyncs "):
            return float(line.split()[1])
    raise RuntimeError("riskgw_journal_fsyncs missing from /metrics")


# ------------------------------------------------------------------- client


class Conn:
    """One benchmark connection (websockets asyncio client, no compression)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._next_id = 1

    @classmethod
    async def open(cls, url: str, token: str = ADMIN_TOKEN) -> Conn:
        ws = await connect(
            url,
            additional_headers={"Authorization": f"Bearer {token}"},
            compression=None,
            max_size=None,
            open_timeout=60,
        )
        return cls(ws)

    def frames(self, method: str, params: dict[str, Any], n: int) -> list[bytes]:
        """``n`` request frames with fresh ids (built before any timing starts)."""
        first = self._next_id
        self._next_id += n
        dumps = orjson.dumps
        return [
            dumps({"id": rid, "method": method, "params": params})
            for rid in range(first, first + n)
        ]

    async def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """One request; returns the response envelope (pushes are skipped)."""
        (frame,) = self.frames(method, params, 1)
        await self.ws.send(frame, text=True)
        while True:
            obj = orjson.loads(await self.ws.recv(decode=False))
            if "id" in obj:
                result: dict[str, Any] = obj
                return result

    async def ok(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        response = await self.call(method, params)
        if response.get("status") != "ok":
            raise RuntimeError(f"{method} failed: {response}")
        result: dict[str, Any] = response["result"]
        return result

    async def round_trips(self, frames: Sequence[bytes]) -> tuple[list[int], int]:
        """Send each frame and wait for its answer; (latencies in ns, failures).

        A failure is an error response or a decision other than accept.
        """
        send, recv, loads = self.ws.send, self.ws.recv, orjson.loads
        clock = time.perf_counter_ns
        latencies: list[int] = []
        failures = 0
        for frame in frames:
            started = clock()
            await send(frame, text=True)
            while True:
                obj = loads(await recv(decode=False))
                if "id" in obj:
                    break
            latencies.append(clock() - started)
            if obj["status"] != "ok" or obj["result"].get("decision", "accept") != "accept":
                failures += 1
        return latencies, failures

    async def pipelined(self, frames: Sequence[bytes], window: int) -> tuple[float, int]:
        """Keep ``window`` requests in flight; (seconds for all answers, failures)."""
        send, recv, loads = self.ws.send, self.ws.recv, orjson.loads
        total = len(frames)
        started = time.perf_counter()
        sent = min(window, total)
        for frame in frames[:sent]:
            await send(frame, text=True)
        answered = failures = 0
        while answered < total:
            obj = loads(await recv(decode=False))
            if "id" not in obj:
                continue
            answered += 1
            if obj["status"] != "ok":
                failures += 1
            if sent < total:
                await send(frames[sent], text=True)
                sent += 1
        return time.perf_counter() - started, failures

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self.ws.close()


@contextlib.contextmanager
def no_gc() -> Any:
    """The load generator's own garbage collector stays out of the timings."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# -------------------------------------------------------------------- bench


Progress = Callable[[str], None]


@dataclass
class Bench:
    """One run: sizes, a scratch directory, the servers it started."""

    sizes: Sizes
    workdir: Path
    progress: Progress
    servers: list[Server] = field(default_factory=list)
    _count: int = 0

    async def gateway(self, fsync: str = "always") -> Server:
        self._count += 1
        base = self.workdir / f"gateway-{self._count}-{fsync}"
        base.mkdir()
        config = base / "gateway.toml"
        config.write_text(CONFIG.format(state_dir=base / "state", fsync=fsync, token=ADMIN_TOKEN))
        server = await start_server(
            f"gateway ({fsync})",
            ["-m", "gateway", "serve", "--config", str(config)],
            "risk-gateway listening on ",
            base / "gateway.log",
        )
        self.servers.append(server)
        return server

    async def echo(self) -> Server:
        self._count += 1
        server = await start_server(
            "echo",
            ["-m", "clients.echo", "--port", "0"],
            "echo listening on ",
            self.workdir / f"echo-{self._count}.log",
        )
        self.servers.append(server)
        return server

    async def stop(self, server: Server) -> None:
        await server.stop()
        if server in self.servers:
            self.servers.remove(server)

    async def stop_all(self) -> None:
        for server in list(self.servers):
            await self.stop(server)


async def _prepare_validations(conn: Conn) -> None:
    await conn.ok("position.update", POSITION)


async def alternate_latency(
    first: Conn, second: Conn, n: int, block: int
) -> tuple[dict[str, float], dict[str, float], int]:
    """``n`` validations one at a time on each connection, in blocks that
    alternate between them, and so does which goes first, so a noisy spell
    of the machine hits both. Returns each one's latency summary and the
    failures."""
    sides: list[tuple[Conn, list[bytes], list[int]]] = [
        (conn, conn.frames("order.validate", ORDER, n), []) for conn in (first, second)
    ]
    failures = 0
    with no_gc():
        for index, start in enumerate(range(0, n, block)):
            for conn, frames, samples in sides[:: 1 if index % 2 == 0 else -1]:
                got, failed = await conn.round_trips(frames[start : start + block])
                samples.extend(got)
                failures += failed
    return latency_summary(sides[0][2]), latency_summary(sides[1][2]), failures


async def section_latency(bench: Bench, gateway: Server, echo: Server) -> dict[str, Any]:
    sizes = bench.sizes
    gw, ec = await Conn.open(gateway.url), await Conn.open(echo.url)
    try:
        await _prepare_validations(gw)
        for conn in (gw, ec):
            await conn.round_trips(conn.frames("order.validate", ORDER, sizes.warmup_n))
        gw_runs: list[dict[str, float]] = []
        echo_runs: list[dict[str, float]] = []
        failures = 0
        block = min(BLOCK_N, sizes.latency_n)
        for repeat in range(sizes.repeats):
            gw_run, echo_run, failed = await alternate_latency(gw, ec, sizes.latency_n, block)
            gw_runs.append(gw_run)
            echo_runs.append(echo_run)
            failures += failed
            bench.progress(
                f"  repeat {repeat + 1}: p50 gateway {gw_runs[-1]['p50']:.0f} us, "
                f"echo {echo_runs[-1]['p50']:.0f} us"
            )
    finally:
        await gw.close()
        await ec.close()
    return {
        "n": sizes.latency_n,
        "repeats": sizes.repeats,
        "gateway_us": median_summary(gw_runs),
        "echo_us": median_summary(echo_runs),
        "ratio": paired_ratios(gw_runs, echo_runs),
        "failures": failures,
    }


async def section_pipelined(bench: Bench, gateway: Server, echo: Server) -> dict[str, Any]:
    sizes = bench.sizes
    gw, ec = await Conn.open(gateway.url), await Conn.open(echo.url)
    try:
        await _prepare_validations(gw)
        for conn in (gw, ec):
            await conn.pipelined(conn.frames("order.validate", ORDER, sizes.warmup_n), 64)
        gw_rates: list[float] = []
        echo_rates: list[float] = []
        failures = 0
        block = min(PIPELINED_BLOCK_N, sizes.pipelined_n)
        for repeat in range(sizes.repeats):
            sides = [
                (conn, conn.frames("order.validate", ORDER, sizes.pipelined_n), [0.0])
                for conn in (gw, ec)
            ]
            with no_gc():
                for index, start in enumerate(range(0, sizes.pipelined_n, block)):
                    for conn, frames, seconds in sides[:: 1 if index % 2 == 0 else -1]:
                        took, failed = await conn.pipelined(
                            frames[start : start + block], sizes.in_flight
                        )
                        seconds[0] += took
                        failures += failed
            gw_rates.append(sizes.pipelined_n / sides[0][2][0])
            echo_rates.append(sizes.pipelined_n / sides[1][2][0])
            bench.progress(
                f"  repeat {repeat + 1}: gateway {gw_rates[-1]:,.0f} req/s, "
                f"echo {echo_rates[-1]:,.0f} req/s"
            )
    finally:
        await gw.close()
        await ec.close()
    return {
        "n": sizes.pipelined_n,
        "in_flight": sizes.in_flight,
        "repeats": sizes.repeats,
        "gateway_rps": median(gw_rates),
        "echo_rps": median(echo_rates),
        "ratio": median([g / e for g, e in zip(gw_rates, echo_rates, strict=True)]),
        "failures": failures,
    }


def _update_frames(
    conn: Conn, account: str, n: int, symbols: int, *, offset: int = 0, prefix: str = "S"
) -> list[bytes]:
    """``n`` position updates of ``account``, cycling over ``symbols`` symbols."""
    frames = []
    first = conn._next_id
    conn._next_id += n
    dumps = orjson.dumps
    for i in range(n):
        params = {
            "account": account,
            "symbol": f"{prefix}{(offset + i) % symbols}",
            "qty": str((offset + i) % 7 + 1),
            "price": "100",
        }
        frames.append(dumps({"id": first + i, "method": "position.update", "params": params}))
    return frames


async def _pipelined_many(
    conns: Sequence[Conn], frame_sets: Sequence[Sequence[bytes]], window: int
) -> tuple[float, int]:
    started = time.perf_counter()
    results = await asyncio.gather(
        *(conn.pipelined(frames, window) for conn, frames in zip(conns, frame_sets, strict=True))
    )
    return time.perf_counter() - started, sum(failed for _, failed in results)


async def section_updates(bench: Bench) -> dict[str, Any]:
    sizes = bench.sizes
    out: dict[str, Any] = {
        "connections": sizes.update_connections,
        "in_flight_per_connection": sizes.in_flight,
        "n": sizes.updates_n,
        "repeats": sizes.repeats,
    }
    for mode in FSYNC_MODES:
        gateway = await bench.gateway(mode)
        conns = [await Conn.open(gateway.url) for _ in range(sizes.update_connections)]
        try:
            per_conn = max(1, sizes.updates_n // len(conns))
            warm = [
                _update_frames(c, f"U{i}", max(1, sizes.warmup_n // len(conns)), 100)
                for i, c in enumerate(conns)
            ]
            await _pipelined_many(conns, warm, sizes.in_flight)
            rates: list[float] = []
            fsync_rates: list[float] = []
            failures = 0
            for repeat in range(sizes.repeats):
                frame_sets = [
                    _update_frames(c, f"U{i}", per_conn, 100, offset=repeat * per_conn)
                    for i, c in enumerate(conns)
                ]
                before = await journal_fsyncs(gateway)
                with no_gc():
                    seconds, failed = await _pipelined_many(conns, frame_sets, sizes.in_flight)
                after = await journal_fsyncs(gateway)
                failures += failed
                rates.append(per_conn * len(conns) / seconds)
                fsync_rates.append((after - before) / seconds)
            bench.progress(
                f"  fsync {mode}: {median(rates):,.0f} updates/s, "
                f"{median(fsync_rates):,.0f} fsyncs/s"
            )
        finally:
            for conn in conns:
                await conn.close()
            await bench.stop(gateway)
        out[mode] = {
            "updates_per_s": median(rates),
            "fsyncs_per_s": median(fsync_rates),
            "failures": failures,
        }
    return out


async def section_scaling(bench: Bench) -> dict[str, Any]:
    """Two gateways side by side, one with 10 positions and one with 100,000, measured
    in alternation so that a noisy spell of the machine hits both alike."""
    sizes = bench.sizes
    small_gw = await bench.gateway("never")
    large_gw = await bench.gateway("never")
    small, large = await Conn.open(small_gw.url), await Conn.open(large_gw.url)
    loaders = [await Conn.open(large_gw.url) for _ in range(4)]
    try:
        # Ten open positions: BTC-USD and nine more of the same account.
        for conn in (small, large):
            await _prepare_validations(conn)
            for i in range(9):
                await conn.ok(
                    "position.update",
                    {"account": "A1", "symbol": f"S{i}", "qty": "1", "price": "100"},
                )
        # The rest of the large gateway's positions over four accounts (A1
        # included), pipelined.
        remaining = sizes.scaling_positions - 10
        share = remaining // len(loaders)
        frame_sets = []
        for i, loader in enumerate(loaders):
            count = share if i < len(loaders) - 1 else remaining - share * (len(loaders) - 1)
            frame_sets.append(_update_frames(loader, f"A{i + 1}", count, count, prefix="L"))
        started = time.perf_counter()
        _, failures = await _pipelined_many(loaders, frame_sets, sizes.in_flight)
        load_seconds = time.perf_counter() - started
        state = await large.ok("state.get", {"account": "A1"})
        a1_positions = len(state["accounts"]["A1"]["positions"])
        bench.progress(
            f"  loaded {remaining:,} positions in {load_seconds:.1f} s "
            f"(A1 now holds {a1_positions:,})"
        )
        for conn in (small, large):
            await conn.round_trips(conn.frames("order.validate", ORDER, sizes.warmup_n))
        runs: dict[str, list[dict[str, float]]] = {"small": [], "large": []}
        for repeat in range(sizes.repeats):
            for name, conn in (("small", small), ("large", large)):
                frames = conn.frames("order.validate", ORDER, sizes.scaling_n)
                with no_gc():
                    samples, failed = await conn.round_trips(frames)
                failures += failed
                runs[name].append(latency_summary(samples))
            bench.progress(
                f"  repeat {repeat + 1}: p50 {runs['large'][-1]['p50']:.0f} us with "
                f"{sizes.scaling_positions:,} positions, {runs['small'][-1]['p50']:.0f} us with 10"
            )
    finally:
        for c in (small, large, *loaders):
            await c.close()
        await bench.stop(small_gw)
        await bench.stop(large_gw)
    small_summary, large_summary = median_summary(runs["small"]), median_summary(runs["large"])
    return {
        "n": sizes.scaling_n,
        "repeats": sizes.repeats,
        "positions_small": 10,
        "positions_large": sizes.scaling_positions,
        "p50_us_small": small_summary["p50"],
        "p50_us_large": large_summary["p50"],
        "p99_us_small": small_summary["p99"],
        "p99_us_large": large_summary["p99"],
        "ratio": paired_ratios(runs["large"], runs["small"])["p50"],
        "load_updates_per_s": remaining / load_seconds,
        "failures": failures,
    }


class SubscriberGroup:
    """A helper process holding many raw subscriber connections (see ``_subscribers``)."""

    def __init__(self, proc: asyncio.subprocess.Process, count: int) -> None:
        self.proc = proc
        self.count = count

    @classmethod
    async def start(cls, url: str, count: int) -> SubscriberGroup:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "clients.bench",
            "subscribers",
            url,
            ADMIN_TOKEN,
            str(count),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        _CHILDREN.add(proc.pid)
        group = cls(proc, count)
        line = await group._line(deadline_s=START_TIMEOUT_S)
        if not line.startswith("ready"):
            raise RuntimeError(f"subscriber process failed to connect: {line!r}")
        return group

    async def _line(self, *, deadline_s: float) -> str:
        assert self.proc.stdout is not None
        async with asyncio.timeout(deadline_s):
            return (await self.proc.stdout.readline()).decode().strip()

    async def _report(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"report\n")
        await self.proc.stdin.drain()
        data: dict[str, Any] = orjson.loads(await self._line(deadline_s=60))
        return data

    async def report(self) -> dict[int, tuple[int, int]]:
        """Per emergency version: (subscribers that received it, last receipt ns)."""
        data = await self._report()
        return {int(v): (count, last) for v, (count, last) in data["receipts"].items()}

    async def heartbeat_intervals_ns(self) -> list[int]:
        """Intervals between consecutive heartbeats at the sampled connections, ns."""
        data = await self._report()
        return [int(ns) for ns in data["heartbeat_intervals_ns"]]

    async def stop(self) -> None:
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(Exception):
                self.proc.stdin.write(b"quit\n")
                await self.proc.stdin.drain()
            try:
                async with asyncio.timeout(30):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        _CHILDREN.discard(self.proc.pid)


async def start_subscribers(url: str, total: int, procs: int) -> list[SubscriberGroup]:
    counts = [total // procs + (1 if i < total % procs else 0) for i in range(procs)]
    return list(await asyncio.gather(*(SubscriberGroup.start(url, n) for n in counts if n > 0)))


async def heartbeat_intervals_ms(groups: Sequence[SubscriberGroup], period_s: float) -> list[float]:
    """Every heartbeat interval the groups' sampled connections saw so far, in ms.

    A short run may end before a second heartbeat: then wait for one more
    period, a few times, before giving up.
    """
    for _ in range(5):
        intervals = [ns / 1e6 for group in groups for ns in await group.heartbeat_intervals_ns()]
        if intervals:
            return intervals
        await asyncio.sleep(period_s)
    raise RuntimeError("no two heartbeats reached a subscriber")


async def section_fanout(bench: Bench) -> dict[str, Any]:
    sizes = bench.sizes
    gateway = await bench.gateway("always")
    # The admin connects first, so it is not favoured by being last in any queue.
    admin = await Conn.open(gateway.url)
    validator = await Conn.open(gateway.url)
    groups: list[SubscriberGroup] = []
    try:
        heartbeat_s = float((await admin.ok("session.hello", {}))["heartbeat_s"])
        await _prepare_validations(validator)
        groups = await start_subscribers(gateway.url, sizes.subscribers, sizes.subscriber_procs)
        bench.progress(f"  {sizes.subscribers} subscribers connected and authenticated")
        # 1. One change at a time: response -> last subscriber's receipt.
        sent_at: dict[int, int] = {}
        answered_at: dict[int, int] = {}
        mode = "normal"
        for _ in range(sizes.changes):
            mode = "reducing" if mode == "normal" else "normal"
            started = time.monotonic_ns()
            view = await admin.ok("emergency.set", {"mode": mode, "reason": "bench"})
            answered = time.monotonic_ns()
            sent_at[view["version"]] = started
            answered_at[view["version"]] = answered
            await asyncio.sleep(0.25)
        if mode != "normal":
            await admin.ok("emergency.set", {"mode": "normal", "reason": "bench"})
        await asyncio.sleep(0.5)
        merged: dict[int, tuple[int, int]] = {}
        for group in groups:
            for version, (count, last) in (await group.report()).items():
                seen, latest = merged.get(version, (0, 0))
                merged[version] = (seen + count, max(latest, last))
        after_response: list[float] = []
        after_request: list[float] = []
        missing = 0
        for version, answered in answered_at.items():
            count, last = merged.get(version, (0, 0))
            missing += sizes.subscribers - count
            if count:
                after_response.append((last - answered) / 1e6)
                after_request.append((last - sent_at[version]) / 1e6)
        bench.progress(
            f"  last subscriber {median(after_response):.1f} ms after the response "
            f"({median(after_request):.1f} ms after the request)"
        )
        # 2. Validation p99 without, then during, a paced storm and a flat-out
        # storm of emergency changes.
        quiet: list[float] = []
        storm: list[float] = []
        flat_out: list[float] = []
        quiet_p50: list[float] = []
        storm_p50: list[float] = []
        changes_per_s: list[float] = []
        flat_out_per_s: list[float] = []
        failures = 0
        await validator.round_trips(validator.frames("order.validate", REDUCING_ORDER, 200))

        async def during(rate: float | None) -> tuple[dict[str, float], float]:
            nonlocal failures
            stop = asyncio.Event()
            toggler = asyncio.create_task(_storm(admin, stop, rate))
            await asyncio.sleep(0.05)
            frames = validator.frames("order.validate", REDUCING_ORDER, sizes.storm_n)
            started_s = time.perf_counter()
            with no_gc():
                samples, failed = await validator.round_trips(frames)
            stop.set()
            toggled = await toggler
            failures += failed
            await asyncio.sleep(0.5)
            return latency_summary(samples), toggled / (time.perf_counter() - started_s)

        for _ in range(sizes.repeats):
            frames = validator.frames("order.validate", REDUCING_ORDER, sizes.storm_n)
            with no_gc():
                samples, failed = await validator.round_trips(frames)
            failures += failed
            summary = latency_summary(samples)
            quiet.append(summary["p99"])
            quiet_p50.append(summary["p50"])
            summary, rate = await during(STORM_CHANGES_PER_S)
            storm.append(summary["p99"])
            storm_p50.append(summary["p50"])
            changes_per_s.append(rate)
            summary, rate = await during(None)
            flat_out.append(summary["p99"])
            flat_out_per_s.append(rate)
            bench.progress(
                f"  p99 quiet {quiet[-1]:.0f} us, during {changes_per_s[-1]:.0f} "
                f"changes/s {storm[-1]:.0f} us, flat out ({flat_out_per_s[-1]:.0f} "
                f"changes/s) {flat_out[-1]:.0f} us"
            )
        # 3. The heartbeat period the subscribers saw, over all of the above.
        beats = sorted(await heartbeat_intervals_ms(groups, heartbeat_s))
        bench.progress(
            f"  heartbeat every {median(beats):.0f} ms at the subscribers "
            f"(server.heartbeat_s {heartbeat_s:g}; longest {beats[-1]:.0f} ms)"
        )
    finally:
        for group in groups:
            await group.stop()
        await admin.close()
        await validator.close()
        await bench.stop(gateway)
    return {
        "subscribers": sizes.subscribers,
        "changes": sizes.changes,
        "last_receipt_after_response_ms": median(after_response),
        "last_receipt_after_request_ms": median(after_request),
        "missing_receipts": missing,
        "n": sizes.storm_n,
        "repeats": sizes.repeats,
        "p50_us_quiet": median(quiet_p50),
        "p50_us_storm": median(storm_p50),
        "p99_us_quiet": median(quiet),
        "p99_us_storm": median(storm),
        "ratio": median([s / q for s, q in zip(storm, quiet, strict=True)]),
        "storm_changes_per_s": median(changes_per_s),
        "p99_us_flat_out": median(flat_out),
        "ratio_flat_out": median([s / q for s, q in zip(flat_out, quiet, strict=True)]),
        "flat_out_changes_per_s": median(flat_out_per_s),
        "heartbeat_s": heartbeat_s,
        "heartbeat_intervals": len(beats),
        "heartbeat_interval_ms": median(beats),
        "heartbeat_interval_max_ms": beats[-1],
        "heartbeat_ratio": median(beats) / (heartbeat_s * 1000),
        "failures": failures,
    }


async def _storm(admin: Conn, stop: asyncio.Event, rate: float | None) -> int:
    """Toggle reducing/normal ``rate`` times a second (None: each change as soon
    as the previous one is answered); the number of changes."""
    loop = asyncio.get_running_loop()
    changes = 0
    due = loop.time()
    while not stop.is_set():
        mode = "reducing" if changes % 2 == 0 else "normal"
        await admin.ok("emergency.set", {"mode": mode, "reason": "bench storm"})
        changes += 1
        if rate is not None:
            due += 1 / rate
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, due - loop.time()))
    if changes % 2:
        await admin.ok("emergency.set", {"mode": "normal", "reason": "bench storm"})
    return changes


async def _recovery_helper(*args: str) -> dict[str, Any]:
    """Run ``python -m gateway.benchtools ARGS`` and return the JSON of its last line.

    A subprocess, not an import: the bench speaks the wire protocol only, and
    the recovery is timed in a fresh process.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.benchtools",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _CHILDREN.add(proc.pid)
    async with asyncio.timeout(HELPER_TIMEOUT_S):
        out, err = await proc.communicate()
    _CHILDREN.discard(proc.pid)
    if proc.returncode != 0:
        raise RuntimeError(f"bench helper {args[0]} failed: {err.decode()[-2000:]}")
    result: dict[str, Any] = orjson.loads(out.splitlines()[-1])
    return result


async def section_recovery(bench: Bench) -> dict[str, Any]:
    sizes = bench.sizes
    state_dir = bench.workdir / "recovery-state"
    state_dir.mkdir()
    written = await _recovery_helper("journal", str(state_dir), str(sizes.recovery_records))
    bench.progress(
        f"  wrote {sizes.recovery_records:,} records "
        f"({written['bytes'] / 2**20:.0f} MiB) in {written['seconds']:.1f} s"
    )
    runs = []
    for _ in range(sizes.recovery_repeats):
        result = await _recovery_helper("recover", str(state_dir))
        if result["replayed"] != sizes.recovery_records:
            raise RuntimeError(f"recovery replayed {result['replayed']} records")
        runs.append(result)
        bench.progress(
            f"  Store.open(): {result['seconds']:.2f} s "
            f"(recover {result['recover_seconds']:.2f} s + replay {result['replay_seconds']:.2f} s)"
        )
    return {
        "records": sizes.recovery_records,
        "journal_bytes": written["bytes"],
        "repeats": sizes.recovery_repeats,
        "seconds": median([r["seconds"] for r in runs]),
        "read_seconds": median([r["recover_seconds"] for r in runs]),
        "replay_seconds": median([r["replay_seconds"] for r in runs]),
        "positions": runs[0]["positions"],
    }


def _snapshot_params(account: str, positions: int) -> dict[str, Any]:
    return {
        "account": account,
        "positions": [{"symbol": f"S{i}", "qty": "2", "price": "50000"} for i in range(positions)],
    }


async def section_snapshots(bench: Bench) -> dict[str, Any]:
    """What a position.snapshot costs per position, against a position.update,
    and how long another connection waits while one floods the gateway with them.

    One gateway (fsync always). A snapshot of ``snapshot_positions`` positions is
    timed one at a time; as many position updates are timed pipelined
    (``in_flight``), the way a client streams them. Then another connection's
    validations are timed one at a time, quiet and while a third connection
    keeps 16 snapshots in flight.
    """
    sizes = bench.sizes
    count = sizes.snapshot_positions
    gateway = await bench.gateway("always")
    feeder, other, flooder = [await Conn.open(gateway.url) for _ in range(3)]
    try:
        await _prepare_validations(other)
        snapshot = _snapshot_params("SNAP", count)
        await feeder.ok("position.snapshot", snapshot)  # warm-up
        with no_gc():
            took: list[int] = []
            for frame in feeder.frames("position.snapshot", snapshot, sizes.snapshot_n):
                got, failed = await feeder.round_trips([frame])
                if failed:
                    raise RuntimeError("a position.snapshot failed")
                took.extend(got)
            updates: list[float] = []
            for repeat in range(sizes.repeats):
                frames = _update_frames(feeder, f"UP{repeat}", count, 100)
                seconds, failed = await feeder.pipelined(frames, sizes.in_flight)
                if failed:
                    raise RuntimeError("a position.update failed")
                updates.append(seconds / count)
        snapshot_us = median(took) / 1000
        update_us = median(updates) * 1e6
        bench.progress(
            f"  snapshot of {count}: {snapshot_us / 1000:.1f} ms, "
            f"{snapshot_us / count:.1f} us per position; update {update_us:.1f} us"
        )
        order_frames = other.frames("order.validate", ORDER, sizes.flood_n)
        with no_gc():
            quiet, failures = await other.round_trips(order_frames)
        stop = asyncio.Event()
        flood_frames = flooder.frames("position.snapshot", _snapshot_params("FLOOD", count), 1)

        async def flood() -> None:
            while not stop.is_set():
                await flooder.pipelined(flood_frames * 16, 16)

        flooding = asyncio.create_task(flood())
        try:
            order_frames = other.frames("order.validate", ORDER, sizes.flood_n)
            with no_gc():
                flooded, failed = await other.round_trips(order_frames)
            failures += failed
        finally:
            stop.set()
            await flooding
        quiet_summary = latency_summary(quiet)
        flood_summary = latency_summary(flooded)
        bench.progress(
            f"  another connection's validate p99: {quiet_summary['p99']:.0f} us quiet, "
            f"{flood_summary['p99']:.0f} us under the flood"
        )
    finally:
        for conn in (feeder, other, flooder):
            await conn.close()
        await bench.stop(gateway)
    return {
        "positions": count,
        "n": sizes.snapshot_n,
        "snapshot_ms": snapshot_us / 1000,
        "snapshot_us_per_position": snapshot_us / count,
        "update_us": update_us,
        "per_position_ratio": snapshot_us / count / update_us,
        "p50_us_quiet": quiet_summary["p50"],
        "p99_us_quiet": quiet_summary["p99"],
        "p50_us_flood": flood_summary["p50"],
        "p99_us_flood": flood_summary["p99"],
        "flood_p99_in_snapshots": flood_summary["p99"] / snapshot_us,
        "failures": failures,
    }


async def section_memory(bench: Bench) -> dict[str, Any]:
    sizes = bench.sizes
    gateway = await bench.gateway("always")
    conn = await Conn.open(gateway.url)
    group: SubscriberGroup | None = None
    try:
        await _prepare_validations(conn)
        await conn.round_trips(conn.frames("order.validate", ORDER, sizes.warmup_n))
        await asyncio.sleep(0.5)
        before = rss_kib(gateway.pid)
        group = (await start_subscribers(gateway.url, sizes.idle_connections, 1))[0]
        await asyncio.sleep(1.0)
        after = rss_kib(gateway.pid)
    finally:
        if group is not None:
            await group.stop()
        await conn.close()
        await bench.stop(gateway)
    per = (after - before) / sizes.idle_connections
    bench.progress(f"  {per:.1f} KiB per idle connection ({before:,} -> {after:,} KiB)")
    return {
        "connections": sizes.idle_connections,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_connection": per,
    }


# ------------------------------------------------------------ targets, table


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    section: str
    value: float
    limit: float
    higher_is_better: bool
    unit: str

    @property
    def holds(self) -> bool:
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "section": self.section,
            "value": self.value,
            "target": ("<= " if not self.higher_is_better else ">= ") + _num(self.limit),
            "holds": self.holds,
        }


def targets(report: dict[str, Any]) -> list[Target]:
    out: list[Target] = []
    if "latency" in report:
        ratio = report["latency"]["ratio"]
        out.append(Target("validation p50 gateway/echo", "latency", ratio["p50"], 1.3, False, "x"))
        out.append(Target("validation p99 gateway/echo", "latency", ratio["p99"], 1.5, False, "x"))
    if "pipelined" in report:
        out.append(
            Target(
                "pipelined throughput gateway/echo",
                "pipelined",
                report["pipelined"]["ratio"],
                0.6,
                True,
                "x",
            )
        )
    if "updates" in report:
        out.append(
            Target(
                "acked position updates/s, fsync always",
                "updates",
                report["updates"]["always"]["updates_per_s"],
                30_000,
                True,
                "/s",
            )
        )
    if "scaling" in report:
        out.append(
            Target(
                "p50 with 100k positions / with 10",
                "scaling",
                report["scaling"]["ratio"],
                1.10,
                False,
                "x",
            )
        )
    if "fanout" in report:
        fanout = report["fanout"]
        out.append(
            Target(
                "last subscriber after emergency.set response",
                "fanout",
                fanout["last_receipt_after_response_ms"],
                50,
                False,
                "ms",
            )
        )
        out.append(Target("validation p99 storm/quiet", "fanout", fanout["ratio"], 3, False, "x"))
    if "recovery" in report:
        out.append(
            Target(
                "recovery of the journal", "recovery", report["recovery"]["seconds"], 5, False, "s"
            )
        )
    if "snapshots" in report:
        snaps = report["snapshots"]
        out.append(
            Target(
                "position.snapshot per position / position.update",
                "snapshots",
                snaps["per_position_ratio"],
                1.0,
                False,
                "x",
            )
        )
        out.append(
            Target(
                "validate p99 under a snapshot flood, in snapshots",
                "snapshots",
                snaps["flood_p99_in_snapshots"],
                4.0,
                False,
                "x",
            )
        )
    if "memory" in report:
        out.append(
            Target(
                "memory per idle connection",
                "memory",
                report["memory"]["kib_per_connection"],
                50,
                False,
                "KiB",
            )
        )
    return out


def _num(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


Row = tuple[str, str, str, str, str, str]
COLUMNS: Final = ("figure", "gateway", "baseline", "ratio", "target", "holds")


def table_rows(report: dict[str, Any]) -> list[Row]:
    """One row per figure: (figure, gateway, baseline, ratio, target, holds).

    The baseline is the echo server for sections 1 and 2, the gateway with 10
    positions for section 4 and without a storm for section 5.
    """
    verdicts = {t.name: t for t in targets(report)}

    def verdict(name: str) -> tuple[str, str]:
        target = verdicts.get(name)
        if target is None:
            return "", ""
        sign = ">=" if target.higher_is_better else "<="
        unit = target.unit if target.unit == "x" else " " + target.unit
        return f"{sign} {_num(target.limit)}{unit}", "yes" if target.holds else "NO"

    rows: list[Row] = []
    if "latency" in report:
        lat = report["latency"]
        names = {"p50": "validation p50 gateway/echo", "p99": "validation p99 gateway/echo"}
        for key, label in (("p50", "p50"), ("p99", "p99"), ("p999", "p99.9")):
            rows.append(
                (
                    f"1. validate round trip {label}, us (vs echo)",
                    _num(lat["gateway_us"][key]),
                    _num(lat["echo_us"][key]),
                    f"{lat['ratio'][key]:.2f}x",
                    *verdict(names.get(key, "")),
                )
            )
    if "pipelined" in report:
        pipe = report["pipelined"]
        rows.append(
            (
                f"2. pipelined validate, {pipe['in_flight']} in flight, req/s (vs echo)",
                _num(pipe["gateway_rps"]),
                _num(pipe["echo_rps"]),
                f"{pipe['ratio']:.2f}x",
                *verdict("pipelined throughput gateway/echo"),
            )
        )
    if "updates" in report:
        for mode in FSYNC_MODES:
            entry = report["updates"][mode]
            target, holds = (
                verdict("acked position updates/s, fsync always") if mode == "always" else ("", "")
            )
            rows.append(
                (
                    f"3. acked position.update/s, fsync {mode} "
                    f"({entry['fsyncs_per_s']:,.0f} fsync/s)",
                    _num(entry["updates_per_s"]),
                    "",
                    "",
                    target,
                    holds,
                )
            )
    if "scaling" in report:
        scaling = report["scaling"]
        rows.append(
            (
                f"4. validate p50, us, {scaling['positions_large']:,} positions (vs 10)",
                _num(scaling["p50_us_large"]),
                _num(scaling["p50_us_small"]),
                f"{scaling['ratio']:.2f}x",
                *verdict("p50 with 100k positions / with 10"),
            )
        )
    if "fanout" in report:
        fanout = report["fanout"]
        rows.append(
            (
                f"5. last of {fanout['subscribers']:,} subscribers after the emergency.set "
                "response, ms",
                _num(fanout["last_receipt_after_response_ms"]),
                "",
                "",
                *verdict("last subscriber after emergency.set response"),
            )
        )
        rows.append(
            (
                f"5. validate p99, us, during a storm of {fanout['storm_changes_per_s']:.0f} "
                "changes/s (vs none)",
                _num(fanout["p99_us_storm"]),
                _num(fanout["p99_us_quiet"]),
                f"{fanout['ratio']:.2f}x",
                *verdict("validation p99 storm/quiet"),
            )
        )
        if "p50_us_storm" in fanout:
            rows.append(
                (
                    "5. validate p50, us, during the same storm (vs none)",
                    _num(fanout["p50_us_storm"]),
                    _num(fanout["p50_us_quiet"]),
                    f"{fanout['p50_us_storm'] / fanout['p50_us_quiet']:.2f}x",
                    "",
                    "",
                )
            )
        if "p99_us_flat_out" in fanout:
            rows.append(
                (
                    "5. validate p99, us, during a flat-out storm of "
                    f"{fanout['flat_out_changes_per_s']:.0f} changes/s (vs none)",
                    _num(fanout["p99_us_flat_out"]),
                    _num(fanout["p99_us_quiet"]),
                    f"{fanout['ratio_flat_out']:.2f}x",
                    "",
                    "",
                )
            )
        if "heartbeat_interval_ms" in fanout:
            rows.append(
                (
                    "5. heartbeat interval at the subscribers, ms, median (vs server.heartbeat_s)",
                    _num(fanout["heartbeat_interval_ms"]),
                    _num(fanout["heartbeat_s"] * 1000),
                    f"{fanout['heartbeat_ratio']:.2f}x",
                    "",
                    "",
                )
            )
    if "recovery" in report:
        recovery = report["recovery"]
        rows.append(
            (
                f"6. Store.open() of {recovery['records']:,} journal records, s",
                f"{recovery['seconds']:.2f}",
                "",
                "",
                *verdict("recovery of the journal"),
            )
        )
    if "memory" in report:
        memory = report["memory"]
        rows.append(
            (
                f"7. RSS per idle connection, {memory['connections']:,} open, KiB",
                f"{memory['kib_per_connection']:.1f}",
                "",
                "",
                *verdict("memory per idle connection"),
            )
        )
    if "snapshots" in report:
        snaps = report["snapshots"]
        rows.append(
            (
                f"8. position.snapshot of {snaps['positions']:,}, us per position "
                "(vs a pipelined position.update)",
                _num(snaps["snapshot_us_per_position"]),
                _num(snaps["update_us"]),
                f"{snaps['per_position_ratio']:.2f}x",
                *verdict("position.snapshot per position / position.update"),
            )
        )
        rows.append(
            (
                "8. another connection's validate p99, us, under a flood of them "
                f"(vs one snapshot, {snaps['snapshot_ms']:.1f} ms)",
                _num(snaps["p99_us_flood"]),
                _num(snaps["snapshot_ms"] * 1000),
                f"{snaps['flood_p99_in_snapshots']:.2f}x",
                *verdict("validate p99 under a snapshot flood, in snapshots"),
            )
        )
    return rows


def render_table(report: dict[str, Any]) -> Table:
    """The figures, their targets and whether they hold, as a rich table."""
    table = Table(title=f"riskctl bench ({report['mode']} run)")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "figure" else "right")
    for row in table_rows(report):
        holds = {"yes": "[green]yes[/]", "NO": "[bold red]NO[/]"}.get(row[5], "")
        table.add_row(*row[:5], holds)
    return table


def render_markdown(report: dict[str, Any]) -> str:
    """The same table as Markdown (for docs/benchmarks.md)."""
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 2) + [":---:"]) + "|",
    ]
    lines.extend("| " + " | ".join(row) + " |" for row in table_rows(report))
    return "\n".join(lines) + "\n"


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("websockets", "orjson", "uvloop"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[package] = version(package)
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        **versions,
    }


async def run_bench(
    sizes: Sizes, sections: Sequence[str], progress: Progress, *, keep: Path | None = None
) -> dict[str, Any]:
    """Run the chosen sections; returns the report (see docs/benchmarks.md)."""
    raise_open_files_limit()
    workdir = Path(tempfile.mkdtemp(prefix="riskgw-bench-"))
    bench = Bench(sizes=sizes, workdir=workdir, progress=progress)
    report: dict[str, Any] = {
        "mode": "quick" if sizes == QUICK else "full",
        "machine": machine(),
        "sizes": {name: getattr(sizes, name) for name in sizes.__dataclass_fields__},
    }
    started = time.perf_counter()
    try:
        steps: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = []
        gateway_echo: list[Server] = []

        async def servers() -> tuple[Server, Server]:
            if not gateway_echo:
                gateway_echo.extend([await bench.gateway("always"), await bench.echo()])
            return gateway_echo[0], gateway_echo[1]

        async def latency() -> dict[str, Any]:
            return await section_latency(bench, *(await servers()))

        async def pipelined() -> dict[str, Any]:
            return await section_pipelined(bench, *(await servers()))

        runners: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
            "latency": latency,
            "pipelined": pipelined,
            "updates": lambda: section_updates(bench),
            "scaling": lambda: section_scaling(bench),
            "fanout": lambda: section_fanout(bench),
            "recovery": lambda: section_recovery(bench),
            "memory": lambda: section_memory(bench),
            "snapshots": lambda: section_snapshots(bench),
        }
        steps = [(name, runners[name]) for name in SECTIONS if name in sections]
        for number, (name, step) in enumerate(steps, 1):
            progress(f"[{number}/{len(steps)}] {name}")
            section_started = time.perf_counter()
            report[name] = await step()
            report[name]["seconds_taken"] = time.perf_counter() - section_started
            if name == "pipelined" or ("pipelined" not in sections and name == "latency"):
                for server in gateway_echo:
                    await bench.stop(server)
                gateway_echo.clear()
    finally:
        await bench.stop_all()
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            shutil.copytree(workdir, keep, dirs_exist_ok=True)
            shutil.rmtree(workdir, ignore_errors=True)
    report["seconds"] = time.perf_counter() - started
    report["targets"] = [t.to_json() for t in targets(report)]
    return report


# ---------------------------------------------------------------- riskctl


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``riskctl bench`` options."""
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument(
        "--quick", action="store_true", help="a short run with small counts (for tests)"
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--keep", type=Path, help="copy the scratch directory (configs, logs) here afterwards"
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="measure a cluster of members on Redis against a single gateway instead",
    )
    parser.add_argument(
        "--markdown", action="store_true", help="print the table as Markdown instead"
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="FILE",
        help="render the table of a saved --json report instead of running",
    )


def command(args: argparse.Namespace) -> int:
    """Run ``riskctl bench``; returns the exit status."""
    err = Console(file=sys.stderr, highlight=False)
    if getattr(args, "cluster", False):
        return _cluster_command(args, err)
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        err.print(f"riskctl: unknown bench section(s) {', '.join(unknown)}", markup=False)
        return 2
    sizes = QUICK if args.quick else FULL
    if args.from_json is not None:
        saved: dict[str, Any] = orjson.loads(args.from_json.read_bytes())
        _print_report(saved, as_json=args.json, as_markdown=args.markdown)
        return 0

    def progress(message: str) -> None:
        err.print(message, markup=False)

    report = _run(run_bench(sizes, sections, progress, keep=args.keep))
    _print_report(report, as_json=args.json, as_markdown=args.markdown)
    return 0


def _run(coroutine: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """Run a benchmark on uvloop (the gateway's loop too); a SIGTERM or an
    error still stops every child process it started."""
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        try:
            import uvloop

            return uvloop.run(coroutine)
        except ImportError:  # pragma: no cover - uvloop is a Linux dependency
            return asyncio.run(coroutine)
    finally:
        _end_children()  # only what an interrupted run left behind


def _cluster_command(args: argparse.Namespace, err: Console) -> int:
    """``riskctl bench --cluster`` (``clients.bench_cluster``)."""
    from clients import bench_cluster

    if bench_cluster.redis_server() is None:
        err.print(
            "riskctl: bench --cluster needs redis-server (apt-get install redis-server)",
            markup=False,
        )
        return 2
    sizes = bench_cluster.QUICK if args.quick else bench_cluster.FULL

    def progress(message: str) -> None:
        err.print(message, markup=False)

    report = _run(bench_cluster.run_cluster_bench(sizes, progress))
    if args.json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    table = Table(title="riskctl bench --cluster")
    for column in ("figure", "measured", "target"):
        table.add_column(column, overflow="fold")
    for row in bench_cluster.render(report):
        table.add_row(*row)
    Console().print(table)
    return 0


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _print_report(report: dict[str, Any], *, as_json: bool, as_markdown: bool) -> None:
    if as_json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif as_markdown:
        sys.stdout.write(render_markdown(report))
    else:
        out = Console()
        out.print(render_table(report))
        info = report["machine"]
        out.print(
            f"{info['nproc']} CPUs ({info['cpu']}), Python {info['python']}; "
            f"run took {report['seconds']:.0f} s",
            markup=False,
        )


# ---------------------------------------------------- helper subprocesses


class _Subscriber(asyncio.Protocol):
    """One raw subscriber: the websockets sans-I/O client on an asyncio Protocol.

    No task per connection: a receipt costs one ``data_received`` call, so the
    time stamp of the last receipt measures the gateway rather than the client.
    """

    def __init__(
        self,
        url: str,
        token: str,
        receipts: dict[int, list[int]],
        ready: asyncio.Future[None],
        heartbeats: list[int] | None = None,
    ) -> None:
        self.protocol = ClientProtocol(parse_uri(url), max_size=None)
        self.token = token
        self.receipts = receipts
        self.ready = ready
        #: Receipt times of heartbeats (monotonic ns), if this one samples them.
        self.heartbeats = heartbeats
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; same interface.
        self.transport = cast(asyncio.Transport, transport)
        request = self.protocol.connect()
        request.headers["Authorization"] = f"Bearer {self.token}"
        self.protocol.send_request(request)
        self._flush()

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        protocol = self.protocol
        protocol.receive_data(data)
        for event in protocol.events_received():
            if isinstance(event, Frame):
                payload = bytes(event.data)
                if event.opcode is Opcode.TEXT and payload.startswith(b'{"channel":"emergency"'):
                    version = orjson.loads(payload)["data"]["version"]
                    entry = self.receipts.get(version)
                    if entry is None:
                        self.receipts[version] = [1, now]
                    else:
                        entry[0] += 1
                        if now > entry[1]:
                            entry[1] = now
                    if not self.ready.done():
                        self.ready.set_result(None)
                elif self.heartbeats is not None and payload.startswith(b'{"channel":"heartbeat"'):
                    self.heartbeats.append(now)
            elif (
                isinstance(event, Response)
                and protocol.handshake_exc is not None
                and not self.ready.done()
            ):
                self.ready.set_exception(protocol.handshake_exc)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost: {exc}"))

    def _flush(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for chunk in self.protocol.data_to_send():
            if chunk:
                transport.write(chunk)
            else:
                transport.close()


async def _subscribers(url: str, token: str, count: int) -> int:
    """Hold ``count`` authenticated connections; answer ``report`` / ``quit`` on stdin.

    ``report`` prints the emergency receipts and, for a sample of
    ``HEARTBEAT_SAMPLE`` connections spread over the group, the intervals
    between consecutive heartbeats (ns) since they connected.
    """
    raise_open_files_limit()
    loop = asyncio.get_running_loop()
    uri = parse_uri(url)
    receipts: dict[int, list[int]] = {}
    transports: list[asyncio.BaseTransport] = []
    gate = asyncio.Semaphore(64)
    step = max(1, count // HEARTBEAT_SAMPLE)
    sampled: list[list[int]] = []

    async def open_one(index: int) -> None:
        heartbeats: list[int] | None = None
        if index % step == 0 and len(sampled) < HEARTBEAT_SAMPLE:
            heartbeats = []
            sampled.append(heartbeats)
        async with gate:
            ready: asyncio.Future[None] = loop.create_future()
            transport, _ = await loop.create_connection(
                lambda: _Subscriber(url, token, receipts, ready, heartbeats), uri.host, uri.port
            )
            transports.append(transport)
            async with asyncio.timeout(60):
                await ready

    await asyncio.gather(*(open_one(index) for index in range(count)))
    print(f"ready {count}", flush=True)
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        command = line.strip()
        if command == "report":
            intervals = [b - a for beats in sampled for a, b in itertools.pairwise(beats)]
            data = {
                "receipts": {str(v): entry for v, entry in receipts.items()},
                "heartbeat_intervals_ns": intervals,
            }
            print(orjson.dumps(data).decode(), flush=True)
        elif command == "quit" or not line:
            break
    for transport in transports:
        transport.close()
    await asyncio.sleep(0.1)
    return 0


def _helper_main(argv: Sequence[str]) -> int:
    """``python -m clients.bench subscribers URL TOKEN COUNT`` (used by the bench)."""
    if not argv:
        print(_helper_main.__doc__, file=sys.stderr)
        return 2
    name, rest = argv[0], list(argv[1:])
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    if name == "subscribers":
        url, token, count = rest
        return int(runner(_subscribers(url, token, int(count))))
    print(f"unknown helper {name}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_helper_main(sys.argv[1:]))
