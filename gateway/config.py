"""The gateway's configuration: a TOML file read into frozen dataclasses.

``load_config`` reads the file described in docs/protocol.md section 8 and
returns a ``GatewayConfig``; ``load_config(None)`` gives the defaults. Every key
is optional, and every key the gateway does not know is an error: a misspelt
``max_exposre`` must not leave the real limit at its default.

Every problem raises ``ConfigError`` whose text is one line naming the file, the
dotted key and what was expected, e.g.::

    gw.toml: limits.max_exposure: expected a decimal string like "1000", got "abc"

``Limits`` is also the ``limits`` object of the wire protocol (``limits.get`` and
``limits.set``) and of the journal: ``Limits.to_wire`` writes it and
``Limits.from_mapping`` reads it back, from TOML tables and JSON objects alike.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, get_args

from protocol.codes import Role
from protocol.errors import ProtocolError
from protocol.values import format_decimal, parse_decimal, parse_name

__all__ = [
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


class ConfigError(Exception):
    """The configuration (a file, a ``limits`` object, a tokens file) is invalid.

    ``str(error)`` is always a single line, ``[FILE: ]KEY: expected WHAT, got
    VALUE`` or ``[FILE: ]KEY: unknown key``, fit to print as is. It never holds a
    token.
    """

    def __init__(self, message: str) -> None:
        # One line whatever a value or a parser message held, so it can go
        # straight into a log line or a wire error.
        super().__init__(" ".join(message.splitlines()))


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
class SymbolLimits:
    """``[limits.symbols.SYMBOL]``: overrides of the global limits for one
    symbol. ``None`` means "use the global value"."""

    max_position: Decimal | None = None
    max_order_qty: Decimal | None = None
    max_order_notional: Decimal | None = None
    price_collar: Decimal | None = None

    def is_empty(self) -> bool:
        """True when nothing is overridden."""
        return all(getattr(self, name) is None for name in _SYMBOL_KEYS)

    def to_wire(self) -> dict[str, str]:
        """The overridden keys only, decimals as strings."""
        result: dict[str, str] = {}
        for name in _SYMBOL_KEYS:
            value = getattr(self, name)
            if value is not None:
                result[name] = format_decimal(value)
        return result


@dataclass(frozen=True, slots=True, kw_only=True)
class EffectiveLimits:
    """The per-symbol limits in force for one symbol: its override where it
    has one, else the global value."""

    max_position: Decimal
    max_order_qty: Decimal
    max_order_notional: Decimal
    price_collar: Decimal


_SYMBOL_KEYS: Final = ("max_position", "max_order_qty", "max_order_notional", "price_collar")
# Every decimal limit must be > 0, except the collar, where 0 is meaningful
# (the order price must equal the reference price).
_NON_NEGATIVE_KEYS: Final = frozenset({"price_collar"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """``[limits]``: the risk limits of docs/protocol.md section 6.

    Invariants the caller can rely on (``from_mapping`` enforces them):
    every decimal limit is > 0 except ``price_collar``, which is >= 0;
    ``max_orders_per_second`` and ``reservation_ttl_ms`` are >= 1; symbol names
    are valid protocol names and no override in ``symbols`` is empty.

    ``symbols`` is read-only. Use ``for_symbol`` to get the limits that apply to
    one symbol.
    """

    max_exposure: Decimal = Decimal("1000000")
    max_account_exposure: Decimal = Decimal("1000000")
    max_position: Decimal = Decimal("1000000")
    max_order_qty: Decimal = Decimal("1000000")
    max_order_notional: Decimal = Decimal("1000000")
    price_collar: Decimal = Decimal("0.10")
    max_orders_per_second: int = 1000
    restricted_symbols: frozenset[str] = frozenset()
    reservation_ttl_ms: int = 5000
    auto_reduce_on_breach: bool = True
    # A mapping proxy is not hashable, so it is left out of the hash; equal
    # objects still hash equal.
    symbols: Mapping[str, SymbolLimits] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    _global_effective: EffectiveLimits = field(init=False, repr=False, compare=False)
    _effective: Mapping[str, EffectiveLimits] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Copy, so that whoever built the dict cannot change limits behind us.
        symbols = MappingProxyType(dict(self.symbols))
        object.__setattr__(self, "symbols", symbols)
        object.__setattr__(self, "restricted_symbols", frozenset(self.restricted_symbols))
        default = EffectiveLimits(
            max_position=self.max_position,
            max_order_qty=self.max_order_qty,
            max_order_notional=self.max_order_notional,
            price_collar=self.price_collar,
        )
        # for_symbol is on the hot path of every validation: resolve the
        # overrides once here so that it is a single dict lookup.
        effective = {
            symbol: EffectiveLimits(
                max_position=_first(override.max_position, default.max_position),
                max_order_qty=_first(override.max_order_qty, default.max_order_qty),
                max_order_notional=_first(override.max_order_notional, default.max_order_notional),
                price_collar=_first(override.price_collar, default.price_collar),
            )
            for symbol, override in symbols.items()
        }
        object.__setattr__(self, "_global_effective", default)
        object.__setattr__(self, "_effective", effective)

    def for_symbol(self, symbol: str) -> EffectiveLimits:
        """The ``max_position``, ``max_order_qty``, ``max_order_notional`` and
        ``price_collar`` in force for ``symbol``. Constant time."""
        return self._effective.get(symbol, self._global_effective)

    def to_wire(self) -> dict[str, Any]:
        """The ``limits`` object of the wire protocol and of the journal.

        Decimals are strings, ``restricted_symbols`` a sorted list, ``symbols``
        ``{SYMBOL: {key: "decimal", ...}}`` with only the overridden keys.
        ``Limits.from_mapping(limits.to_wire()) == limits``.
        """
        return {
            "max_exposure": format_decimal(self.max_exposure),
            "max_account_exposure": format_decimal(self.max_account_exposure),
            "max_position": format_decimal(self.max_position),
            "max_order_qty": format_decimal(self.max_order_qty),
            "max_order_notional": format_decimal(self.max_order_notional),
            "price_collar": format_decimal(self.price_collar),
            "max_orders_per_second": self.max_orders_per_second,
            "restricted_symbols": sorted(self.restricted_symbols),
            "reservation_ttl_ms": self.reservation_ttl_ms,
            "auto_reduce_on_breach": self.auto_reduce_on_breach,
            "symbols": {symbol: self.symbols[symbol].to_wire() for symbol in sorted(self.symbols)},
        }

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], *, where: str = "limits", base: Limits | None = None
    ) -> Limits:
        """Read a ``[limits]`` table or a ``limits`` JSON object.

        Keys that are absent keep the value of ``base`` (the defaults when
        ``base`` is None), so ``limits.set`` can send only what changes.
        Decimals may be strings or numbers (a number is read by its shortest
        decimal form, so ``0.1`` is exactly 0.1).

        ``symbols`` is merged per symbol: each symbol it names gets exactly the
        override given (keys left out fall back to the global value, not to the
        base's override), a symbol named with an empty table loses its override,
        and symbols it does not name keep the base's override.
        ``restricted_symbols``, when given, replaces the whole set.

        Raises ``ConfigError`` whose message starts with ``WHERE.KEY:`` (no file
        name; ``load_config`` adds it).
        """
        table = _table(data, where)
        _reject_unknown(table, _LIMITS_KEYS, where)
        start = base if base is not None else cls()
        changes: dict[str, Any] = {}
        for key, value in table.items():
            key_where = _key(where, key)
            if key in _DECIMAL_LIMIT_KEYS:
                changes[key] = _limit_decimal(value, key_where, key)
            elif key in _INT_LIMIT_MAXIMA:
                changes[key] = _int(value, key_where, minimum=1, maximum=_INT_LIMIT_MAXIMA[key])
            elif key == "auto_reduce_on_breach":
                changes[key] = _bool(value, key_where)
            elif key == "restricted_symbols":
                changes[key] = frozenset(
                    _name(item, f"{key_where}[{index}]", "a symbol")
                    for index, item in enumerate(_array(value, key_where))
                )
            else:  # "symbols"
                symbols = dict(start.symbols)
                for symbol, override in _parse_symbols(value, key_where).items():
                    if override.is_empty():
                        symbols.pop(symbol, None)
                    else:
                        symbols[symbol] = override
                changes[key] = symbols
        return dataclasses.replace(start, **changes)


# Integer limits and their largest values: every limit is journaled, and a
# reservation's expiry must stay a date (a year is far beyond any order).
_INT_LIMIT_MAXIMA: Final = {
    "max_orders_per_second": 1_000_000_000,
    "reservation_ttl_ms": 365 * 24 * 3600 * 1000,
}
_DECIMAL_LIMIT_KEYS: Final = frozenset(
    {
        "max_exposure",
        "max_account_exposure",
        "max_position",
        "max_order_qty",
        "max_order_notional",
        "price_collar",
    }
)
_LIMITS_KEYS: Final = _DECIMAL_LIMIT_KEYS | {
    "max_orders_per_second",
    "restricted_symbols",
    "reservation_ttl_ms",
    "auto_reduce_on_breach",
    "symbols",
}


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
class GatewayConfig:
    """The whole configuration. ``source`` is the file it came from, if any."""

    server: ServerConfig = field(default_factory=ServerConfig)
    persistence: PersistenceConfig = field(default_factory=PersistenceConfig)
    limits: Limits = field(default_factory=Limits)
    tokens: tuple[TokenConfig, ...] = ()
    #: Extra pre-trade checks, each ``"package.module:callable"``. Only the shape
    #: is checked here; importing them is the rule chain's job.
    rules: tuple[str, ...] = ()
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


_TOP_KEYS: Final = frozenset({"server", "persistence", "limits", "tokens", "rules"})


def _parse_gateway(data: Mapping[str, Any], *, source: Path) -> GatewayConfig:
    _reject_unknown(data, _TOP_KEYS, "")
    return GatewayConfig(
        server=_parse_server(data.get("server", {}), "server"),
        persistence=_parse_persistence(data.get("persistence", {}), "persistence"),
        limits=Limits.from_mapping(data.get("limits", {}), where="limits"),
        tokens=_parse_tokens(data.get("tokens", []), "tokens", allow_plain=True),
        rules=_parse_rules(data.get("rules", []), "rules"),
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


def _parse_symbols(value: object, where: str) -> dict[str, SymbolLimits]:
    table = _table(value, where)
    result: dict[str, SymbolLimits] = {}
    for symbol, override in table.items():
        symbol_where = _key(where, symbol)
        _name(symbol, symbol_where, "a symbol")
        override_table = _table(override, symbol_where)
        _reject_unknown(override_table, frozenset(_SYMBOL_KEYS), symbol_where)
        result[symbol] = SymbolLimits(
            **{
                key: _limit_decimal(item, _key(symbol_where, key), key)
                for key, item in override_table.items()
            }
        )
    return result


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


# --- value readers: each raises ConfigError naming the dotted key --------------


def _expected(where: str, what: str, value: object) -> ConfigError:
    return ConfigError(f"{where}: expected {what}, got {_show(value)}")


def _show(value: object) -> str:
    """A short one-line rendering of a configuration value."""
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:40] + "..."
        return json.dumps(text, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array" if value else "an empty array"
    if isinstance(value, datetime.datetime):
        return "a date-time"
    if isinstance(value, datetime.date):
        return "a date"
    if isinstance(value, datetime.time):
        return "a time"
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _describe_secret(value: object) -> str:
    if isinstance(value, str):
        return f"a string of {len(value)} characters" if value else "an empty string"
    return _show(value)


def _one_of(choices: Iterable[str]) -> str:
    return "one of " + ", ".join(json.dumps(choice) for choice in choices)


_BARE_KEY_RE: Final = re.compile(r"[A-Za-z0-9_-]+")


def _key(where: str, key: str) -> str:
    """The dotted TOML path of ``key`` inside ``where``, quoting it if TOML must."""
    shown = key if _BARE_KEY_RE.fullmatch(key) else json.dumps(key, ensure_ascii=False)
    return f"{where}.{shown}" if where else shown


def _reject_unknown(table: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{_key(where, key)}: unknown key")


def _table(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _expected(where, "a table", value)
    return value


def _array(value: object, where: str, *, what: str = "an array") -> list[Any] | tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise _expected(where, what, value)
    return value


def _int(value: object, where: str, *, minimum: int, maximum: int | None = None) -> int:
    # bool is an int to Python, never to a config file.
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= minimum
        and (maximum is None or value <= maximum)
    ):
        return value
    if maximum is not None:
        what = f"an integer from {minimum} to {maximum}"
    elif minimum == 1:
        what = "a positive integer"
    else:
        what = f"an integer of at least {minimum}"
    raise _expected(where, what, value)


def _seconds(value: object, where: str) -> float:
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    ):
        return float(value)
    raise _expected(where, "a positive number of seconds", value)


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise _expected(where, "true or false", value)
    return value


def _host(value: object, where: str) -> str:
    if not isinstance(value, str) or not value or value != value.strip():
        raise _expected(where, 'a host name or address like "127.0.0.1"', value)
    return value


def _name(value: object, where: str, what: str) -> str:
    try:
        return parse_name(value, where)
    except ProtocolError:
        raise _expected(
            where, f"{what} of 1 to 64 characters of A-Z a-z 0-9 . _ : / -", value
        ) from None


def _limit_decimal(value: object, where: str, key: str) -> Decimal:
    example = "0.10" if key in _NON_NEGATIVE_KEYS else "1000"
    try:
        result = parse_decimal(value, where)
    except ProtocolError:
        raise _expected(where, f'a decimal string like "{example}"', value) from None
    if key in _NON_NEGATIVE_KEYS:
        if result < 0:
            raise _expected(where, "a value of at least 0", value)
        # "-0" would otherwise be kept with its sign.
        return result if result else Decimal(0)
    if result <= 0:
        raise _expected(where, "a value greater than 0", value)
    return result


def _first(override: Decimal | None, default: Decimal) -> Decimal:
    return default if override is None else override
