"""``risk-gateway``: serve a gateway, inspect a state directory, replay a journal."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from gateway import tokenfile
from gateway.auth import TokenStore, ensure_default_tokens
from gateway.cluster.member import ClusterStartError
from gateway.config import (
    ConfigError,
    GatewayConfig,
    PersistenceConfig,
    load_config,
    unapplied_changes,
    with_overrides,
)
from gateway.core.context import install_risk_context
from gateway.core.engine import RiskEngine
from gateway.core.limits import Limits
from gateway.net.server import CannotListen, Gateway, replace_tokens, running_gateway
from gateway.persistence import PersistenceError, StateDirLocked, inspect_state_dir, rebuild
from gateway.rules import Rule, load_rules
from protocol.values import format_decimal

log = logging.getLogger("gateway")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.Formatter.converter = __import__("time").gmtime
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("websockets").setLevel(logging.WARNING)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="risk-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", type=Path, help="TOML config file (default: embedded defaults)")
    serve.add_argument("--host", help="address to bind (overrides server.host)")
    serve.add_argument("--port", type=int, help="port to bind, 0 for any (overrides server.port)")
    serve.add_argument("--state-dir", type=Path, help="state directory (overrides persistence)")
    serve.add_argument("--log-format", choices=("text", "json"), default="text")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    inspect = sub.add_parser("inspect", help="show what a state directory holds (read-only)")
    inspect.add_argument("state_dir", type=Path)
    inspect.add_argument("--json", action="store_true", help="one JSON object for scripts")
    replay = sub.add_parser(
        "replay", help="what-if: re-run the journal's validations against other limits"
    )
    replay.add_argument("state_dir", type=Path)
    replay.add_argument("--config", type=Path, required=True, help="config with the limits to try")
    replay.add_argument("--json", action="store_true", help="one JSON object for scripts")
    record = sub.add_parser("record", help="write the journal's trading flow as a replay file")
    record.add_argument("state_dir", type=Path)
    record.add_argument("--out", type=Path, required=True, help="NDJSON file to write")
    record.add_argument(
        "--decisions", type=Path, help="also write the recorded decisions (for riskctl --expect)"
    )
    tokens = sub.add_parser(
        "tokens", help="list, add, rotate or revoke the state directory's tokens (then SIGHUP)"
    )
    tokens.add_argument(
        "--state-dir", type=Path, default=PersistenceConfig().state_dir, help="state directory"
    )
    actions = tokens.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="name, role and accounts of every token")
    add = actions.add_parser("add", help="a new token (printed once)")
    add.add_argument("name")
    add.add_argument("--role", required=True, help="admin, viewer, feed or trader")
    add.add_argument("--accounts", default="", help='a trader\'s accounts: A1,A2 or "*"')
    rotate = actions.add_parser("rotate", help="a new token for NAME (printed once)")
    rotate.add_argument("name")
    revoke = actions.add_parser("revoke", help="remove NAME's token")
    revoke.add_argument("name")
    return parser


def tokens_command(args: argparse.Namespace) -> int:
    """``risk-gateway tokens``: 0 done, 2 refused (one line naming why)."""
    state_dir: Path = args.state_dir
    try:
        if args.action == "list":
            for token in tokenfile.load(state_dir):
                reach = ",".join(token.accounts) or "-"
                print(f"{token.name}\t{token.role.value}\t{reach}")
            return 0
        if args.action == "add":
            accounts = [a.strip() for a in args.accounts.split(",") if a.strip()]
            plain = tokenfile.add(state_dir, args.name, args.role, accounts)
        elif args.action == "rotate":
            plain = tokenfile.rotate(state_dir, args.name)
        else:
            tokenfile.revoke(state_dir, args.name)
            print(f"revoked {args.name}; send SIGHUP to the running gateway to apply it")
            return 0
    except tokenfile.TokenFileError as exc:
        print(f"risk-gateway: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"risk-gateway: {state_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"{args.name} {plain}")
    print(
        "shown once: only its SHA-256 is stored; send SIGHUP to the running gateway to apply it",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        status = _main(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, as Python's
        # documentation recommends, without a traceback.
        quiet_stdout()
        return 1
    return status


def quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush cannot fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve_command(args)
    if args.command == "tokens":
        return tokens_command(args)
    if args.command == "inspect":
        return inspect_command(args.state_dir, as_json=args.json)
    if args.command == "replay":
        return replay_command(args.state_dir, args.config, as_json=args.json)
    if args.command == "record":
        return record_command(args.state_dir, args.out, args.decisions)
    return 2


# --------------------------------------------------------------------- serve


def serve_command(args: argparse.Namespace) -> int:
    setup_logging(args.log_format, args.log_level)
    overrides = {"host": args.host, "port": args.port, "state_dir": args.state_dir}
    try:
        config = with_overrides(load_config(args.config), **overrides)
        # Desk rules are imported before the risk context is installed, so
        # nothing a rule module does to the decimal context at import stays.
        rules = load_rules(config.rules)
    except (ConfigError, ValueError) as exc:
        print(f"risk-gateway: {exc}", file=sys.stderr)
        return 2
    install_risk_context()  # before the loop, so every task inherits it
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a Linux dependency
        runner = asyncio.run
    try:
        return int(runner(_serve(config, rules, overrides)))
    except KeyboardInterrupt:  # pragma: no cover - Ctrl-C before the handler is set
        return 0


async def _serve(config: GatewayConfig, rules: tuple[Rule, ...], overrides: dict[str, Any]) -> int:
    state_dir = config.persistence.state_dir
    try:
        if config.tokens:
            tokens = TokenStore(config.tokens)
            printed: dict[str, str] | None = None
        else:
            token_configs, printed = ensure_default_tokens(state_dir)
            tokens = TokenStore(token_configs)
    except (ConfigError, ValueError) as exc:
        print(f"risk-gateway: {exc}", file=sys.stderr)
        return 2
    try:
        async with contextlib.AsyncExitStack() as stack:
            try:
                gateway = await stack.enter_async_context(running_gateway(config, tokens, rules))
            except StateDirLocked as exc:
                print(f"risk-gateway: {exc}", file=sys.stderr)
                return 1
            except ClusterStartError as exc:
                print(f"risk-gateway: {exc}", file=sys.stderr)
                return 2
            except CannotListen as exc:
                print(f"risk-gateway: {exc}", file=sys.stderr)
                return 2
            except (OSError, PersistenceError) as exc:
                # Read-only, no permission, not a directory, no space: one line, exit 2.
                print(
                    f"risk-gateway: cannot open the state directory {state_dir}: "
                    f"{_why(exc, state_dir)}",
                    file=sys.stderr,
                )
                return 2
            _started(gateway, config, printed)
            async with asyncio.TaskGroup() as reloads:
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, stop.set)
                loop.add_signal_handler(
                    signal.SIGHUP,
                    lambda: reloads.create_task(_reload(gateway, config, overrides)),
                )
                try:
                    await stop.wait()
                finally:
                    loop.remove_signal_handler(signal.SIGHUP)
            log.info("shutting down")
            await gateway.stop()
    except PersistenceError as exc:
        # Changes after the failure were never acknowledged; recovery starts from disk.
        log.critical("stopped after a persistence failure (exit 1): %s", exc)
        return 1
    log.info("stopped cleanly")
    return 0


def _started(gateway: Gateway, config: GatewayConfig, printed: dict[str, str] | None) -> None:
    """Say how the start went: the recovery, first-start tokens, where it listens."""
    store = gateway.store
    recovered = store.recovered
    assert recovered is not None
    log.info(
        "recovered %d records (snapshot seq %d) in %.3f s; mode %s",
        store.replayed,
        recovered.snapshot_seq,
        store.recovery_seconds,
        gateway.engine.gateway_mode.mode.value,
    )
    state_dir = config.persistence.state_dir
    if printed:
        print(
            "First start: one token per role (stored only as SHA-256 in "
            f"{state_dir / 'tokens.toml'}; shown once):"
        )
        for role, token in printed.items():
            print(f"  {role:7} {token}")
    http_url = f"http://{gateway.host}:{gateway.port}/"
    print(f"risk-gateway listening on {gateway.url} (dashboard {http_url})", flush=True)
    log.info(
        "listening on %s, state in %s, fsync %s", gateway.url, state_dir, config.persistence.fsync
    )


def _why(error: BaseException, state_dir: Path) -> str:
    """What kept the state directory from opening, in a few words."""
    if state_dir.exists() and not state_dir.is_dir():
        return "it is not a directory"
    cause = error.__cause__ if isinstance(error, PersistenceError) else error
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror + (f" ({cause.filename})" if cause.filename else "")
    return str(error)


async def _reload_tokens(gateway: Gateway, state_dir: Path) -> None:
    try:
        store = TokenStore(tokenfile.load(state_dir))
    except (tokenfile.TokenFileError, ValueError) as exc:
        log.error("SIGHUP: keeping the current tokens: %s", exc)
        return
    closed = await replace_tokens(gateway, store)
    log.warning(
        "SIGHUP: %d token(s) from %s in force; %d connection(s) of revoked or rotated "
        "tokens closed",
        len(store),
        tokenfile.path_of(state_dir),
        closed,
    )


async def _reload(gateway: Gateway, config: GatewayConfig, overrides: dict[str, Any]) -> None:
    """SIGHUP: apply the keys of the file's [limits] that changed; name every
    other changed key, which only a restart applies; never fail silently.
    Without ``[[tokens]]`` in the config, the state directory's tokens file is
    read again too (``risk-gateway tokens``)."""
    if not config.tokens:
        await _reload_tokens(gateway, config.persistence.state_dir)
    if config.source is None:
        log.warning("SIGHUP: no config file to re-read")
        return
    try:
        fresh = with_overrides(load_config(config.source), **overrides)
    except ConfigError as exc:
        log.error("SIGHUP: keeping the current limits: %s", exc)
        return
    for key in unapplied_changes(config, fresh):
        log.warning("SIGHUP: %s changed in %s; not applied until a restart", key, config.source)
    try:
        if await gateway.service.admin.reload_limits(fresh.limits, actor="config"):
            log.warning("SIGHUP: limits from %s applied", config.source)
        else:
            log.info("SIGHUP: limits unchanged")
    except PersistenceError as exc:
        log.error(
            "SIGHUP: limits from %s not applied, the journal has failed: %s", config.source, exc
        )
    except Exception:
        log.exception("SIGHUP: limits from %s not applied", config.source)


# ------------------------------------------------------------------- inspect


def describe_state_dir(state_dir: Path) -> dict[str, Any]:
    """What ``inspect`` reports: the journal's view plus the state it rebuilds."""
    report = inspect_state_dir(state_dir)
    report.pop("snapshot_payload", None)
    report.pop("tail_payloads", None)
    now_ms = time.time_ns() // 1_000_000
    manager = RiskEngine(limits=Limits(), now_ms=now_ms)
    # As a start would rebuild it: a snapshot or record that cannot be applied
    # is damage too (named), never a traceback.
    recovered, _replayed = rebuild(manager, state_dir, repair=False, now_ms=now_ms)
    if recovered.damage is not None and report.get("damage") is None:
        report["damage"] = recovered.damage.as_dict()
    report["emergency"] = manager.emergency_view()
    report["accounts"] = len(manager.accounts)
    report["positions"] = sum(
        1 for book in manager.accounts.values() for sym in book.positions.values() if sym.reported
    )
    report["reservations"] = len(manager.reservations)
    report["gross_exposure"] = format_decimal(manager.gross_exposure)  # as the wire does
    report["limits_version"] = manager.limits_version
    return report


def inspect_command(state_dir: Path, *, as_json: bool) -> int:
    if not state_dir.is_dir():
        print(f"risk-gateway: {state_dir} is not a directory", file=sys.stderr)
        return 2
    report = describe_state_dir(state_dir)
    if as_json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _print_report(report)
    return 1 if report.get("damage") else 0


def _seq_range(first: int | None, last: int | None) -> str:
    """``seq 3..9``, or ``no records`` (never ``None..None``)."""
    if first is None or last is None or last < first:
        return "no records"
    return f"seq {first}..{last}"


def _print_report(report: dict[str, Any]) -> None:
    out = sys.stdout.write
    out(f"state directory  {report['state_dir']}\n")
    manifest = report.get("manifest")
    if manifest is None:
        out("manifest         none\n")
    else:
        out(
            f"manifest         {len(manifest['snapshots'])} snapshot(s), "
            f"{len(manifest['segments'])} segment(s) live\n"
        )
    for name in report.get("missing", []):
        out(f"MISSING          {name} (listed in the manifest)\n")
    for name in report.get("unlisted", []):
        out(f"unlisted         {name} (left by an interrupted step; cleared at the next start)\n")
    for snap in report.get("snapshots", []):
        status = "ok" if snap.get("valid") else f"UNREADABLE: {snap.get('error')}"
        out(f"snapshot         {snap['file']} seq {snap['seq']} ({snap['bytes']} bytes) {status}\n")
    if not report.get("snapshots"):
        out("snapshot         none\n")
    for seg in report.get("segments", []):
        out(
            f"journal segment  {seg['file']} {_seq_range(seg['first_seq'], seg['last_seq'])} "
            f"({seg['records']} records, {seg['bytes']} bytes)\n"
        )
    out(
        f"records          {report.get('records')} "
        f"({_seq_range(report.get('first_seq'), report.get('last_seq'))})\n"
    )
    emergency = report["emergency"]
    out(
        f"emergency        {emergency['mode']} (version {emergency['version']}, by "
        f"{emergency['actor']}: {emergency['reason'] or '-'})\n"
    )
    for account, state in emergency.get("accounts", {}).items():
        out(f"  account {account}: {state['mode']} by {state['actor']}: {state['reason']}\n")
    out(
        f"accounts         {report['accounts']}, positions {report['positions']}, "
        f"reservations {report['reservations']}, gross exposure {report['gross_exposure']}\n"
    )
    out(f"limits version   {report['limits_version']}\n")
    damage = report.get("damage")
    if damage:
        out(f"DAMAGE           {damage['file']} at offset {damage['offset']}: {damage['detail']}\n")
    else:
        out("damage           none\n")
    torn = report.get("torn_tail")
    if torn:
        out(
            f"torn tail        {torn['file']} at offset {torn['offset']}: {torn['detail']} "
            "(dropped at next start)\n"
        )


# ---------------------------------------------------------- replay, record


def replay_command(state_dir: Path, config_path: Path, *, as_json: bool) -> int:
    from gateway.whatif import what_if

    if not state_dir.is_dir():
        print(f"risk-gateway: {state_dir} is not a directory", file=sys.stderr)
        return 2
    try:
        config = load_config(config_path)
        rules = load_rules(config.rules)
    except (ConfigError, ValueError) as exc:
        print(f"risk-gateway: {exc}", file=sys.stderr)
        return 2
    result = what_if(state_dir, config.limits, rules)
    if as_json:
        sys.stdout.write(orjson.dumps(result.to_json(), option=orjson.OPT_INDENT_2).decode())
        sys.stdout.write("\n")
        return 0
    span = (
        f"journal seq {result.first_seq}..{result.last_seq}"
        if result.first_seq is not None
        else "an empty journal"
    )
    print(
        f"{result.validations} validations in {span} re-run against {config_path}: "
        f"{len(result.changed)} decisions would change"
    )
    for change in result.changed[:200]:
        print("  " + change.describe())
    if len(result.changed) > 200:
        print(f"  ... and {len(result.changed) - 200} more (use --json for all)")
    return 0


def record_command(state_dir: Path, out: Path, decisions_out: Path | None) -> int:
    from gateway.whatif import decisions, record

    if not state_dir.is_dir():
        print(f"risk-gateway: {state_dir} is not a directory", file=sys.stderr)
        return 2
    try:
        lines = record(state_dir, out)
        if decisions_out is not None:
            with decisions_out.open("wb") as handle:
                for line in decisions(state_dir):
                    handle.write(orjson.dumps(line) + b"\n")
    except OSError as exc:
        print(f"risk-gateway: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {lines} requests to {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
