"""Risk limits: what the pre-trade checks compare against.

``Limits`` is the ``[limits]`` table of the configuration, the ``limits`` object
of the wire protocol (``limits.get`` and ``limits.set``) and of the journal:
``Limits.to_wire`` writes it and ``Limits.from_mapping`` reads it back, from
TOML tables and JSON objects alike. ``LimitsInForce`` is the engine's versioned
copy, with the values derived from it.

Every problem raises ``ConfigError`` whose text is one line naming the dotted
key and what was expected, e.g.::

    limits.max_exposure: expected a decimal string like "1000", got "abc"

The value readers below are shared with ``gateway.config``, so a key is
worded the same way wherever it is read.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Final

from protocol.errors import ProtocolError, bad_request
from protocol.values import format_decimal, parse_decimal, parse_name


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


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise _expected(where, "true or false", value)
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


class LimitsInForce:
    """The limits validations use, their version, and what derives from them.

    ``file`` is the config file's ``[limits]`` as last applied (its wire form),
    the baseline ``file_limits_change`` compares an edited file with.
    """

    __slots__ = ("file", "limits", "texts", "version")

    def __init__(
        self, limits: Limits, version: int = 1, file: dict[str, Any] | None = None
    ) -> None:
        self.version = version
        self.file = file
        self.use(limits)

    def use(self, limits: Limits) -> None:
        """Validate against ``limits`` (the version stays as it is)."""
        self.limits = limits
        #: ``max_account_exposure`` and ``max_exposure`` as decisions report them.
        self.texts = (
            format_decimal(limits.max_account_exposure),
            format_decimal(limits.max_exposure),
        )


#: ``(key, old wire value, new wire value)`` of one limit that changes.
LimitChange = tuple[str, Any, Any]


def limits_change(current: Limits, changes: Mapping[str, Any]) -> Limits | None:
    """``current`` with ``limits.set``'s ``changes``; ``None`` if no value changes.

    Raises ``ProtocolError(BAD_REQUEST)`` naming the key when a value is wrong.
    """
    try:
        new = Limits.from_mapping(changes, where="params.limits", base=current)
    except ConfigError as exc:
        raise bad_request(str(exc)) from None
    except ProtocolError as exc:
        raise bad_request(exc.message) from None
    return None if new.to_wire() == current.to_wire() else new


def file_limits_change(
    current: Limits, baseline: Mapping[str, Any] | None, file_limits: Limits
) -> tuple[Limits, list[LimitChange]] | None:
    """The limits after the config file's ``[limits]`` is applied again.

    Only the keys whose value in the file differs from ``baseline`` (the file
    as last applied) change, per symbol for ``symbols``: a key the file did not
    change keeps its current value, one set by ``limits.set`` included.
    ``None`` when the file is as last applied; else the new limits and, per
    key whose value changes, ``(key, old, new)`` (possibly none: the file
    changed only back to the values in force).
    """
    file_wire = file_limits.to_wire()
    if baseline == file_wire:
        return None
    before = baseline or {}
    changes: dict[str, Any] = {}
    for key, value in file_wire.items():
        if key != "symbols":
            if before.get(key) != value:
                changes[key] = value
            continue
        old_symbols = before.get("symbols") or {}
        edited = {
            symbol: value.get(symbol, {})
            for symbol in sorted(set(old_symbols) | set(value))
            if old_symbols.get(symbol) != value.get(symbol)
        }
        if edited:
            changes["symbols"] = edited
    new = Limits.from_mapping(changes, where="config limits", base=current)
    current_wire = current.to_wire()
    new_wire = new.to_wire()
    changed = [
        (key, current_wire[key], new_wire[key])
        for key in new_wire
        if new_wire[key] != current_wire[key]
    ]
    return new, changed
