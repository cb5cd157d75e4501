"""The gateway's configuration: a TOML file read into frozen dataclasses.

``load_config`` reads the file described in docs/protocol.md section 8 and
returns a ``GatewayConfig``; ``load_config(None)`` gives the defaults. Every key
is optional, and every key the gateway does not know is an error: a misspelt
``max_exposre`` must not leave the real limit at its default.

Every problem raises ``ConfigError`` whose text is one line naming the file, the
dotted key and what was expected, e.g.::

    gw.toml: limits.max_exposure: expected a decimal string like "1000", got "abc"

``[limits]`` is read by ``Limits.from_mapping`` (``gateway.core.limits``, the
risk engine's own type, re-exported here with ``ConfigError``), with the same
value readers as every other key, so every key is worded the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, Literal, get_args

from gateway.core.limits import (
    ConfigError,
    EffectiveLimits,
    Limits,
    SymbolLimits,
    _array,
    _expected,
    _int,
    _key,
    _name,
    _reject_unknown,
    _show,
    _table,
)
from protocol.codes import Role
from protocol.errors import ProtocolError
from protocol.values import ZERO, parse_decimal

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

__all__ = [
    "ClusterConfig",
    "ConfigError",
    "EffectiveLimits",
    "FsyncPolicy",
    "GatewayConfig",
    "Limits",
    "PersistenceConfig",
    "ServerConfig",
    "SymbolLimits",
    "TokenConfig",
    "load_config",
    "load_token_file",
    "unapplied_changes",
    "with_overrides",
]


FsyncPolicy = Literal["always", "interval", "never"]
_FSYNC_POLICIES: Final[tuple[str, ...]] = get_args(FsyncPolicy)


# --- the configuration objects ----------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """``[server]``: where the gateway listens and what one connection may do."""

    host: str = "127.0.0.1"
    port: int = 8765
    max_message_bytes: int = 65536
    max_messages_per_second: int = 50000
    max_queued_bytes: int = 1048576
    max_connections: int = 10000
    max_connections_per_ip: int = 1000
    #: Connections not authenticated yet (a handshake in progress, or an open
    #: socket waiting for ``session.auth``); beyond, HTTP 503.
    max_unauthenticated: int = 1000
    auth_timeout_s: float = 5.0
    #: A connection over ``max_queued_bytes`` is closed 4003 only once none of
    #: its output was taken for this long.
    slow_consumer_ms: int = 1000
    #: Symbols one account may hold positions or reservations in.
    max_symbols_per_account: int = 100000
    #: Live reservations one account may hold.
    max_reservations_per_account: int = 100000
    heartbeat_s: float = 1.0
    #: Origins allowed besides the gateway's own ``http://HOST:PORT``, which the
    #: server always allows.
    allowed_origins: tuple[str, ...] = ()
    #: Proxies (addresses or networks) whose ``X-Forwarded-For`` names the
    #: client, for the per-IP cap and the logs; the header is ignored from others.
    trusted_proxies: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class PersistenceConfig:
    """``[persistence]``: where state is journaled and how hard it is fsynced.

    A relative ``state_dir`` is kept as given, so it is relative to the
    current directory of the process.
    """

    state_dir: Path = Path("gateway-state")
    fsync: FsyncPolicy = "always"
    fsync_interval_ms: int = 100
    snapshot_every: int = 100000


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenConfig:
    """One ``[[tokens]]`` entry: who a bearer token belongs to.

    Only the SHA-256 of the token is kept (lowercase hex); a plain ``token`` in
    the file is hashed when it is read. ``accounts`` is non-empty for a trader
    (``"*"`` means every account) and ``()`` for viewers and admins, whose
    reach does not depend on it.
    """

    name: str
    role: Role
    accounts: tuple[str, ...] = ()
    # Kept out of repr: a digest of a weak token can be brute-forced offline.
    token_sha256: str = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterConfig:
    """``[cluster]`` (protocol section 10): this gateway is one member of a
    cluster sharing one Redis. Absent: a single gateway."""

    redis_url: str
    #: This member's name, unique in the cluster (it prefixes reservation ids).
    name: str
    #: The accounts this member owns.
    accounts: tuple[str, ...]
    #: How clients reach this member (named in ``WRONG_GATEWAY`` and ``cluster.get``).
    public_url: str
    #: S: past this long without an answer from Redis the member fences itself.
    max_staleness_ms: int = 75
    #: Local credit headroom as fractions of ``max_exposure``.
    credit_low: Decimal = Decimal("0.05")
    credit_high: Decimal = Decimal("0.10")
    #: How long one call to Redis may take before it counts as unanswered.
    redis_timeout_ms: int = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    """The whole configuration. ``source`` is the file it came from, if any."""

    server: ServerConfig = field(default_factory=ServerConfig)
    persistence: PersistenceConfig = field(default_factory=PersistenceConfig)
    limits: Limits = field(default_factory=Limits)
    tokens: tuple[TokenConfig, ...] = ()
    #: Extra pre-trade checks, each ``"package.module:callable"``. Only the shape
    #: is checked here; importing them is the rule chain's job.
    rules: tuple[str, ...] = ()
    cluster: ClusterConfig | None = None
    source: Path | None = None


# --- loading -----------------------------------------------------------------


def load_config(path: Path | None) -> GatewayConfig:
    """Read the TOML file at ``path``; ``None`` gives every default and no tokens.

    Raises ``ConfigError`` (one line, starting with the file name) when the
    file cannot be read, is not valid TOML, or holds an unknown key or a bad
    value.
    """
    if path is None:
        return GatewayConfig()
    data = _read_toml(path)
    try:
        return _parse_gateway(data, source=path)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def with_overrides(
    cfg: GatewayConfig,
    *,
    host: str | None = None,
    port: int | None = None,
    state_dir: Path | None = None,
) -> GatewayConfig:
    """``cfg`` with the command line's ``--host``, ``--port`` and ``--state-dir``
    applied; ``None`` leaves a value as it is. Raises ``ConfigError`` for an
    empty host or a port outside 0..65535."""
    server = cfg.server
    if host is not None:
        server = dataclasses.replace(server, host=_host(host, "--host"))
    if port is not None:
        server = dataclasses.replace(server, port=_int(port, "--port", minimum=0, maximum=65535))
    persistence = cfg.persistence
    if state_dir is not None:
        persistence = dataclasses.replace(persistence, state_dir=Path(state_dir))
    return dataclasses.replace(cfg, server=server, persistence=persistence)


def unapplied_changes(running: GatewayConfig, fresh: GatewayConfig) -> list[str]:
    """The dotted keys that differ between ``running`` and ``fresh`` outside
    ``[limits]``: what a reload (SIGHUP) reads but applies only at the next
    start (``[server]``, ``[persistence]``, ``[[tokens]]``, ``rules``)."""
    keys: list[str] = []
    for section in ("server", "persistence"):
        old, new = getattr(running, section), getattr(fresh, section)
        keys += [
            f"{section}.{item.name}"
            for item in dataclasses.fields(old)
            if getattr(old, item.name) != getattr(new, item.name)
        ]
    if running.tokens != fresh.tokens:
        keys.append("tokens")
    if running.rules != fresh.rules:
        keys.append("rules")
    if running.cluster != fresh.cluster:
        keys.append("cluster")
    return keys


def load_token_file(path: Path) -> tuple[TokenConfig, ...]:
    """Read a tokens file: ``[[tokens]]`` entries with ``token_sha256`` only
    (a plain ``token`` is refused, since such a file must never hold one).

    Raises ``ConfigError`` (one line, starting with the file name), also when
    the file holds no token at all, since a gateway nobody can log into is
    never what was meant.
    """
    data = _read_toml(path)
    try:
        _reject_unknown(data, frozenset({"tokens"}), "")
        tokens = _parse_tokens(data.get("tokens", []), "tokens", allow_plain=False)
        if not tokens:
            raise ConfigError("tokens: missing (the file holds no token)")
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return tokens


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the file: {error.strerror or error}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from None


_TOP_KEYS: Final = frozenset({"server", "persistence", "limits", "tokens", "rules", "cluster"})


def _parse_gateway(data: Mapping[str, Any], *, source: Path) -> GatewayConfig:
    _reject_unknown(data, _TOP_KEYS, "")
    return GatewayConfig(
        server=_parse_server(data.get("server", {}), "server"),
        persistence=_parse_persistence(data.get("persistence", {}), "persistence"),
        limits=Limits.from_mapping(data.get("limits", {}), where="limits"),
        tokens=_parse_tokens(data.get("tokens", []), "tokens", allow_plain=True),
        rules=_parse_rules(data.get("rules", []), "rules"),
        cluster=None if "cluster" not in data else _parse_cluster(data["cluster"], "cluster"),
        source=source,
    )


_SERVER_INT_RANGES: Final[Mapping[str, tuple[int, int | None]]] = {
    "port": (0, 65535),
    "max_message_bytes": (1, None),
    "max_messages_per_second": (1, None),
    "max_queued_bytes": (1, None),
    "max_connections": (1, None),
    "max_connections_per_ip": (1, None),
    "max_unauthenticated": (1, None),
    "slow_consumer_ms": (1, None),
    "max_symbols_per_account": (1, None),
    "max_reservations_per_account": (1, None),
}
_SERVER_KEYS: Final = frozenset(_SERVER_INT_RANGES) | {
    "host",
    "auth_timeout_s",
    "heartbeat_s",
    "allowed_origins",
    "trusted_proxies",
}
# What a browser sends in Origin: scheme://host[:port], never a path or a
# trailing slash. An entry with one would silently never match.
_ORIGIN_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s?#]+")


def _parse_server(value: object, where: str) -> ServerConfig:
    table = _table(value, where)
    _reject_unknown(table, _SERVER_KEYS, where)
    values: dict[str, Any] = {}
    for key, item in table.items():
        key_where = _key(where, key)
        if key in _SERVER_INT_RANGES:
            low, high = _SERVER_INT_RANGES[key]
            values[key] = _int(item, key_where, minimum=low, maximum=high)
        elif key == "host":
            values[key] = _host(item, key_where)
        elif key in ("auth_timeout_s", "heartbeat_s"):
            values[key] = _seconds(item, key_where)
        elif key == "trusted_proxies":
            networks = []
            for index, entry in enumerate(_array(item, key_where)):
                try:
                    networks.append(ipaddress.ip_network(str(entry), strict=False))
                except ValueError:
                    raise _expected(
                        f"{key_where}[{index}]",
                        'an IP address or network like "10.0.0.5" or "10.0.0.0/24"',
                        entry,
                    ) from None
                if not isinstance(entry, str):
                    raise _expected(f"{key_where}[{index}]", "a string", entry)
            values[key] = tuple(networks)
        else:  # "allowed_origins"
            origins = []
            for index, origin in enumerate(_array(item, key_where)):
                if not isinstance(origin, str) or _ORIGIN_RE.fullmatch(origin) is None:
                    raise _expected(
                        f"{key_where}[{index}]",
                        'an origin like "https://desk.example.com" (scheme://host[:port], no path)',
                        origin,
                    )
                origins.append(origin)
            values[key] = tuple(origins)
    return ServerConfig(**values)


_PERSISTENCE_KEYS: Final = frozenset({"state_dir", "fsync", "fsync_interval_ms", "snapshot_every"})


def _parse_persistence(value: object, where: str) -> PersistenceConfig:
    table = _table(value, where)
    _reject_unknown(table, _PERSISTENCE_KEYS, where)
    values: dict[str, Any] = {}
    for key, item in table.items():
        key_where = _key(where, key)
        if key == "state_dir":
            if not isinstance(item, str) or not item:
                raise _expected(key_where, "a non-empty path string", item)
            values[key] = Path(item)
        elif key == "fsync":
            if item not in _FSYNC_POLICIES:
                raise _expected(key_where, _one_of(_FSYNC_POLICIES), item)
            values[key] = item
        else:  # "fsync_interval_ms", "snapshot_every"
            values[key] = _int(item, key_where, minimum=1)
    return PersistenceConfig(**values)


_CLUSTER_KEYS: Final = frozenset(
    {
        "redis_url",
        "name",
        "accounts",
        "public_url",
        "max_staleness_ms",
        "credit_low",
        "credit_high",
        "redis_timeout_ms",
    }
)
_MEMBER_NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,32}")


def _parse_cluster(value: object, where: str) -> ClusterConfig:
    table = _table(value, where)
    _reject_unknown(table, _CLUSTER_KEYS, where)
    for key in ("redis_url", "name", "accounts", "public_url"):
        if key not in table:
            raise ConfigError(f"{_key(where, key)}: missing (required in [cluster])")
    redis_url = table["redis_url"]
    if not isinstance(redis_url, str) or not redis_url.startswith(
        ("redis://", "rediss://", "unix://")
    ):
        raise _expected(
            _key(where, "redis_url"), 'a Redis URL like "redis://127.0.0.1:6379/0"', redis_url
        )
    name = table["name"]
    if not isinstance(name, str) or _MEMBER_NAME_RE.fullmatch(name) is None:
        raise _expected(_key(where, "name"), "1 to 32 characters of A-Z a-z 0-9 . _ -", name)
    public_url = table["public_url"]
    if not isinstance(public_url, str) or not public_url.startswith(("ws://", "wss://")):
        raise _expected(
            _key(where, "public_url"), 'a WebSocket URL like "ws://10.0.0.1:8765/v1/ws"', public_url
        )
    accounts_where = _key(where, "accounts")
    accounts: list[str] = []
    for index, account in enumerate(_array(table["accounts"], accounts_where)):
        item = _name(account, f"{accounts_where}[{index}]", "an account")
        if item in accounts:
            raise ConfigError(f"{accounts_where}[{index}]: account {item} is listed twice")
        accounts.append(item)
    values: dict[str, Any] = {}
    for key in ("max_staleness_ms", "redis_timeout_ms"):
        if key in table:
            values[key] = _int(table[key], _key(where, key), minimum=1, maximum=600_000)
    for key in ("credit_low", "credit_high"):
        if key in table:
            item = table[key]
            try:
                fraction = parse_decimal(item, _key(where, key))
            except ProtocolError:
                fraction = None
            if fraction is None or not (ZERO <= fraction <= 1):
                raise _expected(_key(where, key), 'a decimal string from "0" to "1"', item)
            values[key] = fraction
    cluster = ClusterConfig(
        redis_url=redis_url,
        name=name,
        accounts=tuple(accounts),
        public_url=public_url,
        **values,
    )
    if cluster.credit_low > cluster.credit_high:
        raise ConfigError(
            f"{_key(where, 'credit_low')}: {cluster.credit_low} is above credit_high "
            f"{cluster.credit_high}"
        )
    return cluster


_TOKEN_KEYS: Final = frozenset({"name", "role", "accounts", "token", "token_sha256"})
_SHA256_RE: Final = re.compile(r"[0-9a-fA-F]{64}")
_ROLES: Final[tuple[str, ...]] = tuple(role.value for role in Role)


def _parse_tokens(value: object, where: str, *, allow_plain: bool) -> tuple[TokenConfig, ...]:
    """Read ``[[tokens]]``. Token values never appear in an error message."""
    entries = _array(value, where, what="an array of tables ([[tokens]])")
    tokens: list[TokenConfig] = []
    names: dict[str, str] = {}
    digests: dict[str, str] = {}
    for index, entry in enumerate(entries):
        entry_where = f"{where}[{index}]"
        table = _table(entry, entry_where)
        _reject_unknown(table, _TOKEN_KEYS, entry_where)
        if not allow_plain and "token" in table:
            raise ConfigError(f"{entry_where}.token: not allowed here, only token_sha256")

        if "name" not in table:
            raise ConfigError(f"{entry_where}.name: missing (every token needs a name)")
        name = _name(table["name"], f"{entry_where}.name", "a name")
        if name in names:
            raise ConfigError(
                f"{entry_where}.name: expected a unique name, got {_show(name)}"
                f" (also {names[name]})"
            )
        names[name] = entry_where

        role_value = table.get("role")
        if role_value not in _ROLES:
            if role_value is None:
                raise ConfigError(f"{entry_where}.role: missing ({_one_of(_ROLES)})")
            raise _expected(f"{entry_where}.role", _one_of(_ROLES), role_value)
        role = Role(role_value)

        accounts = _parse_accounts(table.get("accounts"), f"{entry_where}.accounts", role)
        digest = _token_digest(table, entry_where, allow_plain=allow_plain)
        if digest in digests:
            key = "token" if "token" in table else "token_sha256"
            raise ConfigError(
                f"{entry_where}.{key}: expected a token no other entry uses,"
                f" got the same token as {digests[digest]}"
            )
        digests[digest] = entry_where
        tokens.append(TokenConfig(name=name, role=role, accounts=accounts, token_sha256=digest))
    return tuple(tokens)


def _parse_accounts(value: object, where: str, role: Role) -> tuple[str, ...]:
    if value is None:
        if role is Role.TRADER:
            raise ConfigError(f'{where}: missing (a trader needs its accounts, or ["*"] for all)')
        return ()
    accounts = _array(value, where)
    parsed = []
    for index, account in enumerate(accounts):
        item_where = f"{where}[{index}]"
        parsed.append("*" if account == "*" else _name(account, item_where, 'an account or "*"'))
    if role is not Role.TRADER:
        # Viewers read every account and admins reach every account: a list
        # here could only mislead, so nothing downstream sees it.
        return ()
    if not parsed:
        raise _expected(where, 'a non-empty array of accounts (or ["*"] for all)', value)
    return tuple(dict.fromkeys(parsed))


def _token_digest(table: Mapping[str, Any], where: str, *, allow_plain: bool) -> str:
    has_plain = "token" in table
    has_digest = "token_sha256" in table
    if has_plain and has_digest:
        raise ConfigError(f"{where}: expected exactly one of token or token_sha256, got both")
    if has_digest:
        digest = table["token_sha256"]
        if not isinstance(digest, str) or _SHA256_RE.fullmatch(digest) is None:
            # Not shown: a plain token pasted into the wrong key must not leak.
            raise ConfigError(
                f"{where}.token_sha256: expected 64 hexadecimal digits,"
                f" got {_describe_secret(digest)}"
            )
        return digest.lower()
    if has_plain:
        token = table["token"]
        if not isinstance(token, str) or not token:
            raise ConfigError(
                f"{where}.token: expected a non-empty string, got {_describe_secret(token)}"
            )
        return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
    wanted = "token or token_sha256" if allow_plain else "token_sha256"
    raise ConfigError(f"{where}: missing {wanted}")


_RULE_RE: Final = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
)


def _parse_rules(value: object, where: str) -> tuple[str, ...]:
    rules = []
    for index, rule in enumerate(_array(value, where)):
        if not isinstance(rule, str) or _RULE_RE.fullmatch(rule) is None:
            raise _expected(f"{where}[{index}]", '"package.module:callable"', rule)
        rules.append(rule)
    return tuple(rules)


# --- value readers (those Limits shares are in gateway.core.limits) -----------


def _describe_secret(value: object) -> str:
    if isinstance(value, str):
        return f"a string of {len(value)} characters" if value else "an empty string"
    return _show(value)


def _one_of(choices: Iterable[str]) -> str:
    return "one of " + ", ".join(json.dumps(choice) for choice in choices)


def _seconds(value: object, where: str) -> float:
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    ):
        return float(value)
    raise _expected(where, "a positive number of seconds", value)


def _host(value: object, where: str) -> str:
    if not isinstance(value, str) or not value or value != value.strip():
        raise _expected(where, 'a host name or address like "127.0.0.1"', value)
    return value
