"""``riskctl``: operate a risk gateway from a terminal.

    riskctl state [--account A] [--json]
    riskctl emergency halted|reducing|normal --reason TEXT [--account A] [--json]
    riskctl emergency show [--json]
    riskctl limits get [--json]
    riskctl limits set KEY=VALUE ... [--version N] [--json]
    riskctl watch [--once] [--alerts N]
    riskctl replay FILE [--speed X | --max] [--window N] [--json] [--expect FILE]
                        [--record-decisions FILE]
    riskctl record --out FILE (--live --duration S | --state-dir DIR)
    riskctl cluster [--json]
    riskctl cluster forget NAME [--json]
    riskctl bench [--quick] [--json] [--sections LIST]

Every command takes ``--url`` (default ``$RISKGW_URL`` or
``ws://127.0.0.1:8765/v1/ws``), ``--token`` (default ``$RISKGW_TOKEN``) and
``--timeout`` (seconds to wait for an answer, default 10).

Against a cluster, ``--url`` may be given several times or as a comma
separated list (``$RISKGW_URL`` too): the first member that answers is used,
and requests for an account go to the member that owns it (``state
--account``, ``replay``), as ``GatewayClient`` routes them.

Exit status: 0 done; 1 the gateway refused, could not be reached, or (replay
``--expect``) decisions differ; 2 a usage error (missing token, bad argument,
bad replay file). Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import decimal
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from clients.bench import add_arguments as add_bench_arguments
from clients.bench import command as bench_command
from clients.client import AuthenticationError, GatewayClient, GatewayError, Push
from clients.replay import (
    Outcome,
    ReplayAborted,
    ReplayFileError,
    ReplayReport,
    compare,
    load_expectations,
    load_requests,
    replay,
    summarize,
    write_decisions,
)
from protocol.codes import Channel, Mode

DEFAULT_URL = "ws://127.0.0.1:8765/v1/ws"
MAX_DIFFERENCES_SHOWN = 20
MODE_STYLES = {
    Mode.NORMAL.value: "bold green",
    Mode.REDUCING.value: "bold black on yellow",
    Mode.HALTED.value: "bold white on red",
}
LEVEL_STYLES = {"critical": "bold red", "warning": "yellow", "info": "cyan"}
# Display arithmetic only (utilisation, notional): never risk math.
_DISPLAY = decimal.Context(prec=28, traps=[])


class UsageError(Exception):
    """A mistake in the command line: exit 2 with this message."""


@dataclass(slots=True)
class Context:
    urls: list[str]
    token: str
    timeout: float
    out: Console
    err: Console

    def client(self, **kwargs: Any) -> GatewayClient:
        url: str | list[str] = self.urls[0] if len(self.urls) == 1 else self.urls
        return GatewayClient(url, self.token, request_timeout=self.timeout, **kwargs)

    def json(self, value: Any) -> None:
        self.out.file.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")
        self.out.file.flush()


# ----------------------------------------------------------------- parsing


def _common(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--url",
        action="append",
        default=default,
        help=f"gateway URL (default $RISKGW_URL or {DEFAULT_URL}); for a cluster, "
        "repeat it or give a comma separated list of members",
    )
    parser.add_argument("--token", default=default, help="bearer token (default $RISKGW_TOKEN)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=argparse.SUPPRESS if suppress else 10.0,
        help="seconds to wait for the gateway (default 10)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="riskctl",
        description=(
            "Operate a risk gateway: state, emergency switch, limits, watch, replay, cluster."
        ),
        epilog="Exit status: 0 done, 1 refused/unreachable/differences, 2 usage error.",
    )
    _common(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _common(common, suppress=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    state = sub.add_parser("state", parents=[common], help="emergency, accounts, exposure")
    state.add_argument("--account", help="only this account")
    state.add_argument("--json", action="store_true", help="print the raw STATE object")

    emergency = sub.add_parser("emergency", parents=[common], help="set or show the emergency mode")
    emergency.add_argument(
        "action",
        nargs="?",
        default="show",
        choices=("halted", "reducing", "normal", "show", "get"),
        help="the mode to set, or show (get) the current one (the default)",
    )
    emergency.add_argument("--reason", help="why (required except for normal)")
    emergency.add_argument("--account", help="set this account's own mode only")
    emergency.add_argument("--json", action="store_true", help="print the EMERGENCY object")

    limits = sub.add_parser("limits", parents=[common], help="show or change the limits")
    limits_sub = limits.add_subparsers(dest="limits_command", required=True, metavar="ACTION")
    limits_get = limits_sub.add_parser("get", parents=[common], help="show the limits")
    limits_get.add_argument("--json", action="store_true", help="print {version, limits}")
    limits_set = limits_sub.add_parser("set", parents=[common], help="change limits (admin)")
    limits_set.add_argument(
        "changes",
        nargs="+",
        metavar="KEY=VALUE",
        help="e.g. max_exposure=500000, restricted_symbols=X,Y, symbols.BTC-USD.max_position=5",
    )
    limits_set.add_argument(
        "--version", type=int, help="the version being changed (default: the current one)"
    )
    limits_set.add_argument("--json", action="store_true", help="print {version, limits}")

    watch = sub.add_parser("watch", parents=[common], help="live view (Ctrl-C to quit)")
    watch.add_argument("--once", action="store_true", help="render one frame and exit")
    watch.add_argument("--alerts", type=int, default=10, help="alerts shown (default 10)")

    rep = sub.add_parser("replay", parents=[common], help="send an NDJSON request file")
    rep.add_argument("file", type=Path, help="NDJSON, one request per line")
    pace = rep.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=float, default=1.0, help="scale the t of each line")
    pace.add_argument("--max", action="store_true", help="as fast as --window allows")
    rep.add_argument("--window", type=int, default=64, help="requests in flight (default 64)")
    rep.add_argument("--json", action="store_true", help="print one JSON summary object")
    rep.add_argument("--expect", type=Path, help="NDJSON {id, decision} to compare with")
    rep.add_argument(
        "--record-decisions", type=Path, metavar="FILE", help="write {id, decision, reasons}"
    )

    rec = sub.add_parser("record", parents=[common], help="record decisions as a replay file")
    rec.add_argument("--out", type=Path, required=True, help="replay file to write")
    source = rec.add_mutually_exclusive_group(required=True)
    source.add_argument("--state-dir", type=Path, help="a gateway state directory")
    source.add_argument("--live", action="store_true", help="the decisions channel, live")
    rec.add_argument("--duration", type=float, help="seconds to record (with --live)")

    cluster = sub.add_parser("cluster", parents=[common], help="show or forget cluster members")
    cluster.add_argument(
        "action",
        nargs="?",
        choices=("show", "forget"),
        default="show",
        help="show the members (default), or forget one (admin)",
    )
    cluster.add_argument("name", nargs="?", help="the member to forget")
    cluster.add_argument("--json", action="store_true", help="print the raw answer")

    bench = sub.add_parser("bench", help="benchmark a local gateway against an echo baseline")
    add_bench_arguments(bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``riskctl`` command; returns the exit status."""
    try:
        status = _main(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, as Python's
        # documentation recommends, without a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return status


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage and the error
        return exc.code if isinstance(exc.code, int) else 2
    err = Console(file=sys.stderr, highlight=False)
    try:
        return _run(args, err)
    except UsageError as exc:
        return _fail(f"riskctl: {exc}", 2)
    except ReplayFileError as exc:
        return _fail(f"riskctl: {exc}", 2)
    except KeyboardInterrupt:
        if args.command == "watch":
            return 0
        return _fail("riskctl: interrupted", 130)
    except AuthenticationError as exc:
        return _fail(f"riskctl: {exc.message}", 1)
    except GatewayError as exc:
        return _fail(f"riskctl: the gateway answered {exc.code}: {exc.message}", 1)
    except ReplayAborted as exc:
        return _fail(f"riskctl: replay aborted: {exc}", 1)
    except TimeoutError as exc:
        detail = str(exc) or f"no answer from the gateway within {args.timeout:g} s"
        return _fail(f"riskctl: {detail}", 1)
    except ConnectionError as exc:
        return _fail(f"riskctl: {exc}", 1)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"riskctl: {where}{exc.strerror or exc}", 1)


def _fail(message: str, status: int) -> int:
    print(message, file=sys.stderr, flush=True)
    return status


def _run(args: argparse.Namespace, err: Console) -> int:
    if args.command == "bench":  # starts its own gateway: no --url or --token
        return bench_command(args)
    if args.command == "record" and args.state_dir is not None:
        return _fail("use: risk-gateway record STATE_DIR --out FILE", 2)
    if args.timeout <= 0:
        raise UsageError("--timeout must be greater than 0")
    urls = parse_urls(args.url or [os.environ.get("RISKGW_URL") or DEFAULT_URL])
    token = args.token or os.environ.get("RISKGW_TOKEN")
    if not token:
        raise UsageError(
            "no token: pass --token TOKEN or set RISKGW_TOKEN "
            "(the gateway prints its tokens on its first start)"
        )
    ctx = Context(urls=urls, token=token, timeout=args.timeout, out=Console(), err=err)
    command: Callable[[argparse.Namespace, Context], Awaitable[int]]
    if args.command == "state":
        command = _state
    elif args.command == "emergency":
        command = _emergency
    elif args.command == "limits":
        command = _limits_get if args.limits_command == "get" else _limits_set
    elif args.command == "watch":
        command = _watch
    elif args.command == "replay":
        command = _replay
    elif args.command == "cluster":
        command = _cluster_forget if args.action == "forget" else _cluster_show
    else:
        command = _record
    return asyncio.run(command(args, ctx))


def parse_urls(values: Sequence[str]) -> list[str]:
    """``--url`` values (each possibly a comma separated list) as one list, in order."""
    urls: list[str] = []
    for value in values:
        for url in value.split(","):
            url = url.strip()
            if url and url not in urls:
                urls.append(url)
    if not urls:
        raise UsageError("--url is empty")
    return urls


# ---------------------------------------------------------------- rendering


def _dec(text: Any) -> Decimal | None:
    try:
        value = Decimal(str(text))
    except (decimal.InvalidOperation, ValueError):
        return None
    return value if value.is_finite() else None


def _plain(value: Decimal) -> str:
    value = _DISPLAY.plus(value)
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(_DISPLAY), "f")


def _utilisation(gross: Any, limit: Any) -> Decimal | None:
    g, lim = _dec(gross), _dec(limit)
    if g is None or lim is None or lim <= 0:
        return None
    return _DISPLAY.multiply(_DISPLAY.divide(g, lim), Decimal(100))


def _utilisation_cell(gross: Any, limit: Any) -> RenderableType:
    pct = _utilisation(gross, limit)
    if pct is None:
        return Text("-")
    style = "green" if pct < 80 else "yellow" if pct <= 100 else "bold red"
    bar = ProgressBar(
        total=100.0, completed=float(min(pct, Decimal(100))), width=20, complete_style=style
    )
    grid = Table.grid(padding=(0, 1))
    grid.add_row(bar, Text(f"{pct.quantize(Decimal('0.1'), context=_DISPLAY)}%", style=style))
    return grid


def _since(stamp: Any) -> str:
    if not isinstance(stamp, str):
        return "-"
    try:
        at = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        return stamp
    age = (datetime.now(UTC) - at).total_seconds()
    if age < 0:
        return stamp
    if age < 120:
        ago = f"{age:.0f} s ago"
    elif age < 7200:
        ago = f"{age / 60:.0f} min ago"
    else:
        ago = f"{age / 3600:.1f} h ago"
    return f"{stamp} ({ago})"


def _clock_time(stamp: Any) -> str:
    """``20:11:08.123`` of a protocol time (the date is rarely news in a live view)."""
    if isinstance(stamp, str) and len(stamp) == 24 and stamp[10] == "T":
        return stamp[11:23]
    return str(stamp or "")


def render_emergency(view: dict[str, Any] | None, *, note: str | None = None) -> Panel:
    """The emergency banner: mode in its colour, reason, actor, since, account modes."""
    if view is None:
        return Panel(Text("no emergency state yet"), title="emergency")
    mode = str(view.get("mode", "?"))
    style = MODE_STYLES.get(mode, "bold")
    text = Text()
    text.append(f" {mode.upper()} ", style=style)
    reason = view.get("reason") or ""
    if reason:
        text.append(f"  {reason}")
    text.append(f"\nby {view.get('actor', '?')} since {_since(view.get('since'))}")
    text.append(f"  (version {view.get('version', '?')})", style="dim")
    accounts = view.get("accounts") or {}
    for account, state in sorted(accounts.items()):
        account_mode = str(state.get("mode", "?"))
        text.append(f"\naccount {account}: ")
        text.append(f" {account_mode.upper()} ", style=MODE_STYLES.get(account_mode, "bold"))
        text.append(f"  {state.get('reason') or ''}  by {state.get('actor', '?')}")
        text.append(f" since {state.get('since', '-')}", style="dim")
    if note:
        text.append(f"\n{note}", style="bold red")
    border = {"normal": "green", "reducing": "yellow", "halted": "red"}.get(mode, "white")
    return Panel(text, title="emergency", border_style=border, expand=True)


def render_state(state: dict[str, Any], width: int | None = None) -> Group:
    """The STATE object as a table, or, when the table is wider than
    ``width`` columns, one figure per line: a figure is never cut."""
    table = Table(title="accounts", expand=False)
    for name, justify in (
        ("account", "left"),
        ("symbol", "left"),
        ("qty", "right"),
        ("mark", "right"),
        ("notional", "right"),
        ("gross exposure", "right"),
        ("reserved", "right"),
        ("stale", "center"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    accounts = state.get("accounts") or {}
    for account, book in sorted(accounts.items()):
        positions = book.get("positions") or {}
        stale = Text("STALE", style="bold red") if book.get("stale") else Text("")
        first = True
        rows = sorted(positions.items()) or [("-", {})]
        for symbol, pos in rows:
            qty, mark = _dec(pos.get("qty")), _dec(pos.get("price"))
            notional = (
                _plain(_DISPLAY.multiply(abs(qty), mark))
                if qty is not None and mark is not None
                else ""
            )
            table.add_row(
                account if first else "",
                symbol,
                str(pos.get("qty", "")),
                str(pos.get("price", "")),
                notional,
                str(book.get("gross_exposure", "")) if first else "",
                str(book.get("reserved_exposure", "")) if first else "",
                stale if first else "",
            )
            first = False
    footer = Text(
        f"gateway gross exposure {state.get('gross_exposure', '?')}, "
        f"limits version {state.get('limits_version', '?')}"
    )
    parts: list[RenderableType] = [render_emergency(state.get("emergency"))]
    if accounts and width is not None:
        measured = Console(width=10_000).measure(table).maximum
        if measured > width:
            parts.append(_stacked_accounts(accounts))
            parts.append(footer)
            return Group(*parts)
    parts.append(table if accounts else Text("no accounts", style="dim"))
    parts.append(footer)
    return Group(*parts)


def _stacked_accounts(accounts: dict[str, Any]) -> Text:
    """The accounts one figure per line, for a terminal too narrow for the table."""
    text = Text()
    for account, book in sorted(accounts.items()):
        text.append(f"account {account}", style="bold")
        if book.get("stale"):
            text.append("  STALE", style="bold red")
        text.append("\n")
        text.append(f"  gross exposure {book.get('gross_exposure', '')}\n")
        text.append(f"  reserved       {book.get('reserved_exposure', '')}\n")
        for symbol, pos in sorted((book.get("positions") or {}).items()):
            qty, mark = _dec(pos.get("qty")), _dec(pos.get("price"))
            text.append(f"  {symbol}\n", style="bold")
            text.append(f"    qty      {pos.get('qty', '')}\n")
            text.append(f"    mark     {pos.get('price', '')}\n")
            if qty is not None and mark is not None:
                text.append(f"    notional {_plain(_DISPLAY.multiply(abs(qty), mark))}\n")
    return text


def render_limits(view: dict[str, Any]) -> Table:
    table = Table(title=f"limits (version {view.get('version', '?')})")
    table.add_column("key")
    table.add_column("value", justify="right")
    limits = view.get("limits") or {}
    for key, value in limits.items():
        if key == "symbols":
            continue
        if isinstance(value, list):
            shown = ", ".join(str(v) for v in value) or "-"
        elif isinstance(value, bool):
            shown = "true" if value else "false"
        else:
            shown = str(value)
        table.add_row(key, shown)
    for symbol, overrides in sorted((limits.get("symbols") or {}).items()):
        for key, value in sorted(overrides.items()):
            table.add_row(f"symbols.{symbol}.{key}", str(value))
    return table


# ----------------------------------------------------------------- commands


async def _state(args: argparse.Namespace, ctx: Context) -> int:
    async with ctx.client(reconnect=False) as client:
        state = await client.state(args.account)
    if args.json:
        ctx.json(state)
    else:
        ctx.out.print(render_state(state, ctx.out.width))
    return 0


async def _emergency(args: argparse.Namespace, ctx: Context) -> int:
    action = args.action
    if action in ("show", "get"):
        if args.reason is not None or args.account is not None:
            raise UsageError("--reason and --account are for setting a mode, not for show")
        async with ctx.client(reconnect=False) as client:
            view = await client.emergency_get()
    else:
        reason = (args.reason or "").strip()
        if action != Mode.NORMAL.value and not reason:
            raise UsageError(
                f"--reason is required to set {action} (it is recorded with your name)"
            )
        async with ctx.client(reconnect=False) as client:
            view = await client.emergency_set(action, reason, account=args.account)
    if args.json:
        ctx.json(view)
    else:
        ctx.out.print(render_emergency(view))
    return 0


async def _limits_get(args: argparse.Namespace, ctx: Context) -> int:
    async with ctx.client(reconnect=False) as client:
        view = await client.limits_get()
    if args.json:
        ctx.json(view)
    else:
        ctx.out.print(render_limits(view))
    return 0


def parse_limit_changes(changes: Sequence[str], current: dict[str, Any]) -> dict[str, Any]:
    """``KEY=VALUE`` arguments to a ``limits.set`` object, typed like ``current``.

    Decimal limits stay strings (exact), integers become ints, booleans accept
    true/false/yes/no/1/0, ``restricted_symbols`` takes a comma list (empty for
    none), ``symbols.SYMBOL.KEY=VALUE`` changes one per-symbol override (the
    symbol's other overrides are kept) and ``symbols.SYMBOL=`` drops them all.
    Unknown keys are passed on: the gateway names them in its refusal.
    """
    out: dict[str, Any] = {}
    symbols: dict[str, dict[str, Any]] = {}
    current_symbols: dict[str, Any] = current.get("symbols") or {}
    for change in changes:
        key, sep, value = change.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"{change!r} is not KEY=VALUE")
        if key.startswith("symbols."):
            _, _, rest = key.partition(".")
            symbol, dot, sym_key = rest.rpartition(".")
            if not dot:
                symbol, sym_key = rest, ""
            if not symbol:
                raise UsageError(f"{key!r}: expected symbols.SYMBOL.KEY=VALUE")
            entry = symbols.setdefault(symbol, dict(current_symbols.get(symbol) or {}))
            if not sym_key:
                if value.strip():
                    raise UsageError(f"{key}= takes no value: it drops the symbol's overrides")
                entry.clear()
            elif value.strip():
                entry[sym_key] = value.strip()
            else:
                entry.pop(sym_key, None)
            continue
        out[key] = _typed(key, value.strip(), current.get(key))
    if symbols:
        out["symbols"] = symbols
    return out


def _typed(key: str, value: str, like: Any) -> Any:
    if isinstance(like, bool):
        lowered = value.lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
        raise UsageError(f"{key} takes true or false, not {value!r}")
    if isinstance(like, int):
        try:
            return int(value)
        except ValueError:
            raise UsageError(f"{key} takes an integer, not {value!r}") from None
    if isinstance(like, list):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


async def _limits_set(args: argparse.Namespace, ctx: Context) -> int:
    async with ctx.client(reconnect=False) as client:
        current = await client.limits_get()
        changes = parse_limit_changes(args.changes, current.get("limits") or {})
        version = args.version if args.version is not None else current["version"]
        view = await client.limits_set(version, changes)
    if args.json:
        ctx.json(view)
    else:
        ctx.out.print(render_limits(view))
    return 0


# -------------------------------------------------------------------- watch


@dataclass(slots=True)
class WatchView:
    """What ``watch`` shows, kept from the pushes."""

    alerts: deque[dict[str, Any]]
    emergency: dict[str, Any] | None = None
    exposure: dict[str, dict[str, Any]] = field(default_factory=dict)
    global_gross: str | None = None
    global_limit: str | None = None
    snapshots: set[str] = field(default_factory=set)
    connected: bool = True
    heartbeat_at: float | None = None
    #: The client's last log message (a reconnect attempt, a seq gap), shown
    #: in the view rather than written over it.
    client_note: str | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def on_push(self, push: Push) -> None:
        data = push.data
        if push.channel == Channel.EMERGENCY.value:
            self.emergency = data
        elif push.channel == Channel.ALERTS.value:
            if push.snapshot:
                self.alerts.clear()
                self.alerts.extend(a for a in data.get("alerts", []) if isinstance(a, dict))
            else:
                self.alerts.append(data)
        elif push.channel == Channel.EXPOSURE.value:
            if push.snapshot:
                accounts = data.get("accounts") or {}
                self.exposure = {k: v for k, v in accounts.items() if isinstance(v, dict)}
            elif isinstance(data.get("account"), str):
                self.exposure[data["account"]] = data
            self.global_gross = data.get("global", self.global_gross)
            self.global_limit = data.get("global_limit", self.global_limit)
        elif push.channel == Channel.HEARTBEAT.value:
            self.heartbeat_at = time.monotonic()
        if push.snapshot:
            self.snapshots.add(push.channel)
            if {Channel.EMERGENCY.value, Channel.ALERTS.value, Channel.EXPOSURE.value} <= (
                self.snapshots
            ):
                self.ready.set()
        self.changed.set()

    def on_connection(self, connected: bool) -> None:
        self.connected = connected
        if connected:
            self.client_note = None  # what it said was about the outage
        self.changed.set()

    def on_client_log(self, message: str) -> None:
        self.client_note = message
        self.changed.set()

    def render(self, *, live: bool = True) -> Group:
        note = None if self.connected else "DISCONNECTED: reconnecting..."
        banner = render_emergency(self.emergency, note=note)
        alerts = Table(title="last alerts", expand=True)
        alerts.add_column("time (UTC)", no_wrap=True)
        alerts.add_column("level", no_wrap=True)
        alerts.add_column("code", no_wrap=True)
        alerts.add_column("account", no_wrap=True)
        alerts.add_column("message", ratio=1)
        for alert in reversed(self.alerts):
            level = str(alert.get("level", ""))
            alerts.add_row(
                _clock_time(alert.get("ts")),
                Text(level, style=LEVEL_STYLES.get(level, "")),
                str(alert.get("code", "")),
                str(alert.get("account", "")),
                str(alert.get("message", "")),
            )
        exposure = Table(title="exposure", expand=True)
        exposure.add_column("account")
        exposure.add_column("gross", justify="right")
        exposure.add_column("limit", justify="right")
        exposure.add_column("utilisation")
        for account, entry in sorted(self.exposure.items()):
            gross, limit = entry.get("gross"), entry.get("limit")
            exposure.add_row(account, str(gross), str(limit), _utilisation_cell(gross, limit))
        if self.global_gross is not None:
            exposure.add_row(
                Text("gateway", style="bold"),
                str(self.global_gross),
                str(self.global_limit),
                _utilisation_cell(self.global_gross, self.global_limit),
            )
        beat = (
            "no heartbeat yet"
            if self.heartbeat_at is None
            else f"last heartbeat {time.monotonic() - self.heartbeat_at:.0f} s ago"
        )
        if not live:
            return Group(banner, alerts, exposure)
        footer = Text(f"{beat}; Ctrl-C to quit", style="dim")
        if self.client_note is not None:
            footer.append(f"\nclient: {self.client_note}")
        return Group(banner, alerts, exposure, footer)


class _IntoView(logging.Handler):
    """The client's log records, as one line in the ``watch`` view."""

    def __init__(self, view: WatchView) -> None:
        super().__init__(logging.INFO)
        self.view = view

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage().splitlines()[0]
        except Exception:  # a bad format string must not end the watch
            message = str(record.msg)
        self.view.on_client_log(f"{record.levelname.lower()}: {message}")


@contextlib.contextmanager
def _client_logs_into(view: WatchView) -> Iterator[None]:
    """While the view is live, the client's log lines (reconnects, seq gaps)
    go into it: written to the terminal, they would scroll over the view."""
    logger = logging.getLogger("clients")
    handler = _IntoView(view)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


async def _watch(args: argparse.Namespace, ctx: Context) -> int:
    if args.alerts < 0:
        raise UsageError("--alerts must be 0 or more")
    view = WatchView(alerts=deque(maxlen=args.alerts))
    client = ctx.client(subscribe=[Channel.ALERTS.value, Channel.EXPOSURE.value])
    for channel in Channel:
        client.on(channel.value, view.on_push)
    client.on_connection_change(view.on_connection)
    async with client:
        if args.once:
            async with asyncio.timeout(ctx.timeout):
                await view.ready.wait()
            ctx.out.print(view.render(live=False))
            return 0
        with (
            _client_logs_into(view),
            Live(view.render(), console=ctx.out, refresh_per_second=4) as live,
        ):
            while True:
                try:
                    async with asyncio.timeout(1.0):
                        await view.changed.wait()
                except TimeoutError:
                    pass  # redraw anyway: ages and heartbeat move on
                view.changed.clear()
                if client.failure is not None:
                    raise client.failure
                live.update(view.render())


# ------------------------------------------------------------------- replay


def _print_report(ctx: Context, report: ReplayReport, path: Path) -> None:
    table = Table(title=f"replay of {path}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("count", justify="right")
    rate = report.sent / report.elapsed_s if report.elapsed_s > 0 else 0.0
    table.add_row("sent", str(report.sent))
    table.add_row("ok", str(report.ok))
    for code, count in sorted(report.errors.items()):
        table.add_row(Text(f"error {code}", style="red"), str(count))
    for decision in ("accept", "reject"):
        table.add_row(decision, str(report.decisions.get(decision, 0)))
    for code, count in sorted(report.reasons.items()):
        table.add_row(f"  reason {code}", str(count))
    latency = report.latency()
    table.add_row(
        "latency p50 / p99 / max", f"{latency['p50']} / {latency['p99']} / {latency['max']} ms"
    )
    table.add_row("elapsed", f"{report.elapsed_s:.3f} s ({rate:.0f} requests/s)")
    ctx.out.print(table)


#: Answers that refuse the replay itself rather than judge a request.
REFUSALS = frozenset({"FORBIDDEN", "UNAUTHENTICATED", "RATE_LIMITED", "UNAVAILABLE"})


async def _replay(args: argparse.Namespace, ctx: Context) -> int:
    if args.window < 1:
        raise UsageError("--window must be at least 1")
    if not args.max and args.speed <= 0:
        raise UsageError("--speed must be greater than 0")
    requests = load_requests(args.file)
    expected = load_expectations(args.expect) if args.expect is not None else None
    show_progress = not args.json and ctx.err.is_terminal
    progress = Progress(
        TextColumn("replay"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=ctx.err,
        disable=not show_progress,
        transient=True,
    )
    task = progress.add_task("replay", total=len(requests))

    def advance(_outcome: Outcome) -> None:
        progress.advance(task)

    async with ctx.client(reconnect=False) as client:
        started = time.perf_counter()
        with progress:
            outcomes = await replay(
                client,
                requests,
                speed=None if args.max else args.speed,
                window=args.window,
                on_outcome=advance,
            )
        elapsed = time.perf_counter() - started
    report = summarize(outcomes, elapsed)
    if args.record_decisions is not None:
        with args.record_decisions.open("wb") as handle:
            write_decisions(outcomes, handle)
    if args.json:
        ctx.out.file.write(orjson.dumps(report.to_json()).decode() + "\n")
        ctx.out.file.flush()
    else:
        _print_report(ctx, report, args.file)
    refused = {code: n for code, n in report.errors.items() if code in REFUSALS}
    if refused:
        # The gateway refused the replay itself: the run did not test what
        # it meant to (a request's own BAD_REQUEST and every decision are
        # results, reported above).
        counts = ", ".join(f"{n} {code}" for code, n in sorted(refused.items()))
        print(
            f"riskctl: the gateway refused {sum(refused.values())} of {len(requests)} "
            f"request(s) ({counts}): the replay did not test what it meant to",
            file=sys.stderr,
            flush=True,
        )
        return 1
    if expected is None:
        return 0
    differences = compare(outcomes, expected)
    if not differences:
        if not args.json:
            ctx.out.print(f"all {len(expected)} expected decisions match")
        return 0
    lines = [f"riskctl: {len(differences)} decision(s) differ from {args.expect}:"]
    lines += [f"  {line}" for line in differences[:MAX_DIFFERENCES_SHOWN]]
    if len(differences) > MAX_DIFFERENCES_SHOWN:
        lines.append(f"  ... and {len(differences) - MAX_DIFFERENCES_SHOWN} more")
    print("\n".join(lines), file=sys.stderr, flush=True)
    return 1


# ------------------------------------------------------------------ cluster

#: Sums of exposures are exact (they are shown, not rounded for display).
_EXACT = decimal.Context(prec=200, traps=[])


def cluster_gross(view: dict[str, Any]) -> str | None:
    """The cluster-wide gross exposure: the sum of the members' published
    exposures (None when no member shows one, e.g. a trader's view)."""
    total: Decimal | None = None
    for member in view.get("members") or ():
        value = _dec(member.get("exposure")) if isinstance(member, dict) else None
        if value is not None:
            total = value if total is None else _EXACT.add(total, value)
    return None if total is None else format(total, "f")


def render_cluster(view: dict[str, Any]) -> Group:
    this = view.get("name")
    table = Table(title=f"cluster members (answered by {this})", expand=False)
    for name, justify in (
        ("member", "left"),
        ("url", "left"),
        ("accounts", "left"),
        ("alive", "center"),
        ("credit", "right"),
        ("exposure", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    members = [m for m in view.get("members") or () if isinstance(m, dict)]
    for member in members:
        name = str(member.get("name", "?"))
        alive = member.get("alive")
        table.add_row(
            Text(name, style="bold") if name == this else name,
            str(member.get("url", "")),
            ", ".join(str(a) for a in member.get("accounts") or ()) or "-",
            Text("yes", style="green") if alive else Text("NO", style="bold red"),
            str(member.get("credit") if member.get("credit") is not None else "-"),
            str(member.get("exposure") if member.get("exposure") is not None else "-"),
        )
    gross = cluster_gross(view)
    down = [str(m.get("name")) for m in members if not m.get("alive")]
    footer = Text(f"cluster gross exposure {gross if gross is not None else '-'}")
    footer.append(f" ({len(members)} member(s)", style="dim")
    footer.append(f", not alive: {', '.join(down)}" if down else "", style="bold red")
    footer.append(")", style="dim")
    return Group(table, footer)


async def _cluster_show(args: argparse.Namespace, ctx: Context) -> int:
    if args.name is not None:
        raise UsageError(f"unexpected {args.name!r}: use 'cluster' or 'cluster forget NAME'")
    async with ctx.client(reconnect=False, discover=False) as client:
        view = await client.cluster()
    if args.json:
        ctx.json({**view, "gross": cluster_gross(view)})
    else:
        ctx.out.print(render_cluster(view))
    return 0


async def _cluster_forget(args: argparse.Namespace, ctx: Context) -> int:
    if not args.name:
        raise UsageError("cluster forget needs the member's NAME")
    async with ctx.client(reconnect=False, discover=False) as client:
        result = await client.cluster_forget(args.name)
    if args.json:
        ctx.json(result)
    else:
        ctx.out.print(
            f"member {result.get('forgotten', args.name)} forgotten: its credit went back "
            "to the pool and its accounts may be claimed by another member"
        )
    return 0


# ------------------------------------------------------------------- record


def _ts_ms(stamp: Any) -> int | None:
    if not isinstance(stamp, str):
        return None
    try:
        at = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        return None
    return int(at.timestamp() * 1000)


def decision_to_request(data: dict[str, Any], rid: int, t_ms: int) -> dict[str, Any]:
    """The ``order.validate`` replay line of a ``decisions`` push."""
    params: dict[str, Any] = {
        key: data[key] for key in ("account", "symbol", "side", "qty", "price")
    }
    if data.get("reservation_id") is not None:
        params["reserve"] = True
    return {"id": rid, "method": "order.validate", "params": params, "t": t_ms}


async def _record(args: argparse.Namespace, ctx: Context) -> int:
    if not args.live:
        raise UsageError("record needs --live --duration S (or --state-dir DIR)")
    if args.duration is None or args.duration <= 0:
        raise UsageError("--live needs --duration SECONDS (greater than 0)")
    loop = asyncio.get_running_loop()
    client = ctx.client(subscribe=[Channel.DECISIONS.value])
    stream = client.pushes(Channel.DECISIONS.value)
    count = 0
    async with client:
        start = loop.time()
        first: tuple[int, int] | None = None  # (t of the first decision, its server ts)
        last_t = 0
        with args.out.open("wb") as handle:
            try:
                async with asyncio.timeout(args.duration):
                    async for push in stream:
                        if push.snapshot:
                            continue  # earlier decisions, not part of this recording
                        arrived = round((loop.time() - start) * 1000)
                        ts = _ts_ms(push.data.get("ts"))
                        if first is None or ts is None:
                            t = arrived
                            if ts is not None:
                                first = (arrived, ts)
                        else:
                            # Server spacing between decisions is exact; arrival is not.
                            t = first[0] + ts - first[1]
                        last_t = t = max(t, last_t)
                        count += 1
                        try:
                            line = decision_to_request(push.data, count, t)
                        except KeyError as exc:
                            count -= 1
                            ctx.err.print(f"riskctl: skipped a decision without {exc}")
                            continue
                        handle.write(orjson.dumps(line) + b"\n")
                        handle.flush()
            except TimeoutError:
                pass
    print(f"recorded {count} decision(s) to {args.out}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
