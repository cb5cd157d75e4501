"""Scalar values of the protocol: exact decimals, names, times.

Every parser here takes the field's dotted name so that its error says which
field was wrong and what it held, e.g. ``params.qty must be a positive decimal,
was "-2"``.
"""

from __future__ import annotations

import decimal
import re
from datetime import UTC, datetime
from decimal import Decimal

from protocol.errors import bad_request

# Risk math is +, - and * only (the collar compares |p - r| with collar * r), so
# with enough digits nothing is ever rounded; Inexact traps if that ever changes.
# How many digits are enough: an accepted decimal has at most 32 characters, so
# at most 32 integer and 30 fractional digits. A product of two (an exposure, a
# notional) has at most 64 integer and 60 fractional digits, and sums add no
# fractional digits: a total of N such products needs at most
# 64 + log10(N) + 60 digits. With 1000, a state would need more than 10**800
# positions and reservations to round; more digits cost nothing until they are
# used (about 5 ns an operation between 120 and 1000).
# It is applied locally (``exact``): importing the protocol or the manager does
# not change a host program's decimal arithmetic. Only the gateway server, whose
# decimal arithmetic is all risk math, installs a copy as its context
# (``gateway.manager.install_risk_context``).
RISK_CONTEXT = decimal.Context(
    prec=1000,
    rounding=decimal.ROUND_HALF_EVEN,
    Emin=-999_999,
    Emax=999_999,
    traps=[decimal.InvalidOperation, decimal.Overflow, decimal.Inexact, decimal.DivisionByZero],
)

ZERO = Decimal(0)


def exact() -> decimal.Context:
    """``with localcontext(exact())`` style helper: the context risk math runs in."""
    return RISK_CONTEXT


MAX_DECIMAL_CHARS = 32
_DECIMAL_RE = re.compile(r"-?[0-9]+(\.[0-9]+)?")
_NAME_RE = re.compile(r"[A-Za-z0-9._:/-]{1,64}")
# The codec's fast path tests the common values with these same patterns, and
# leaves any value that fails them to the parsers below (and their errors).
name_match = _NAME_RE.fullmatch
decimal_string_match = _DECIMAL_RE.fullmatch
# Floats at or above 2**53 may not be what the sender wrote (orjson reads big
# integers as floats), so they are refused rather than silently rounded.
_FLOAT_EXACT_LIMIT = 2.0**53


class JsonNumber:
    """A JSON number that is not an integer (``1.5``, ``1e-400``), as written.

    The codec reads a frame holding one with this in its place, so that a
    parser can take its exact decimal value: a binary float could not hold
    ``0.10000000000000000001``, and ``1e-400`` would read as 0.
    """

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JsonNumber) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


#: The largest integer a ``seq``, ``version`` or other count may be: what the
#: journal's JSON can hold as an integer.
MAX_INT = 2**63 - 1


def _show(value: object) -> str:
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:40] + "..."
        return '"' + text + '"'
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def parse_decimal(value: object, field: str, *, positive: bool = False) -> Decimal:
    """Read a protocol decimal: a string ``-?[0-9]+(.[0-9]+)?`` of at most 32
    characters, or a finite JSON number read by its shortest decimal form.

    Raises ``ProtocolError(BAD_REQUEST)`` naming ``field`` when it is not one,
    or (with ``positive``) when it is not greater than zero.
    """
    kind = "a positive decimal" if positive else "a decimal"
    if isinstance(value, str):
        if len(value) > MAX_DECIMAL_CHARS or _DECIMAL_RE.fullmatch(value) is None:
            raise bad_request(f'{field} must be {kind} string like "12.5", was {_show(value)}')
        result = Decimal(value)
    elif isinstance(value, JsonNumber):
        # Exactly as written: the shortest decimal form of the number itself.
        result = Decimal(value.text)
        if not result.is_finite() or _plain_length(result) > MAX_DECIMAL_CHARS:
            raise bad_request(
                f"{field} needs more than {MAX_DECIMAL_CHARS} characters as a decimal, "
                f"was {_show(value)}; send a decimal string of at most "
                f"{MAX_DECIMAL_CHARS} characters"
            )
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"{field} must be {kind}, was {_show(value)}")
    elif isinstance(value, float):
        if value != value:
            raise bad_request(f"{field} must be a finite number, was {_show(value)}")
        # Also infinities: a JSON number too large for a double (1e400) reads as one.
        if abs(value) >= _FLOAT_EXACT_LIMIT:
            raise bad_request(
                f"{field} is too large to read exactly as a JSON number; "
                f"send it as a decimal string, was {_show(value)}"
            )
        result = Decimal(repr(value))
        if len(format(result, "f")) > MAX_DECIMAL_CHARS:
            raise bad_request(f"{field} has more than {MAX_DECIMAL_CHARS} characters")
    else:
        if abs(value) >= 10**MAX_DECIMAL_CHARS:
            raise bad_request(
                f"{field} has more than {MAX_DECIMAL_CHARS} digits, was {_show(value)}"
            )
        result = Decimal(value)
    if positive and result <= ZERO:
        raise bad_request(f"{field} must be {kind}, was {_show(value)}")
    return result


# str() of a finite Decimal is already plain (no exponent) for the values risk
# math produces; up to this length its digits also fit RISK_CONTEXT's precision,
# so the fast path of format_decimal gives what normalize() would.
_PLAIN_MAX_CHARS = 100


def format_decimal(value: Decimal) -> str:
    """The wire form of a decimal: plain digits, no exponent, no trailing zeros."""
    if not value:
        return "0"
    text = str(value)
    # Fast path (the common case): "50000", "-2", "1.50". str() writes an
    # exponent ("1E+3", "1E-7") or a word ("Infinity", "NaN") otherwise.
    if len(text) <= _PLAIN_MAX_CHARS and "E" not in text and text[-1] in _DIGITS:
        if "." not in text:
            return text
        return text.rstrip("0").rstrip(".")
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(RISK_CONTEXT), "f")


_DIGITS = frozenset("0123456789")


def parse_name(value: object, field: str) -> str:
    """An account or symbol: 1 to 64 characters of ``A-Z a-z 0-9 . _ : / -``."""
    if not isinstance(value, str) or _NAME_RE.fullmatch(value) is None:
        raise bad_request(
            f"{field} must be 1 to 64 characters of A-Z a-z 0-9 . _ : / -, was {_show(value)}"
        )
    return value


def parse_text(value: object, field: str, *, max_len: int = 512, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise bad_request(f"{field} must be a string, was {_show(value)}")
    if len(value) > max_len:
        raise bad_request(f"{field} must be at most {max_len} characters, was {len(value)}")
    if not allow_empty and not value.strip():
        raise bad_request(f"{field} must not be empty")
    return value


def parse_bool(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise bad_request(f"{field} must be true or false, was {_show(value)}")
    return value


def parse_int(
    value: object, field: str, *, minimum: int | None = None, maximum: int = MAX_INT
) -> int:
    """An integer from ``minimum`` to ``maximum`` (by default ``MAX_INT``, what
    the journal can hold)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{field} must be an integer, was {_show(value)}")
    if minimum is not None and value < minimum:
        raise bad_request(f"{field} must be at least {minimum}, was {_show(value)}")
    if value > maximum:
        raise bad_request(f"{field} must be at most {maximum}, was {_show(value)}")
    return value


def _plain_length(value: Decimal) -> int:
    """How many characters ``value`` takes written out without an exponent and
    without trailing zeros (as the wire has it), worked out from its digits
    and exponent: ``1e999999999`` is never written out to be measured."""
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite
    count = len(digits)
    while count > 1 and digits[count - 1] == 0:
        count -= 1
        exponent += 1
    if count == 1 and digits[0] == 0:
        return 1  # "0"
    if exponent >= 0:
        length = count + exponent
    else:
        fraction = -exponent
        length = max(count - fraction, 1) + 1 + fraction
    return length + sign


def show(value: object) -> str:
    """A short, safe rendering of a client value for an error message."""
    return _show(value)


# (seconds, "YYYY-MM-DDTHH:MM:SS") of the last call: stamps come in bursts within
# one second, and strftime costs several times the rest. One tuple, replaced
# whole, so threads can share it.
_last_second: tuple[int, str] = (0, "1970-01-01T00:00:00")


def format_time_ms(epoch_ms: int) -> str:
    """``2026-11-23T20:11:08.123Z`` from milliseconds since the Unix epoch."""
    global _last_second
    seconds, millis = divmod(epoch_ms, 1000)
    cached, stamp = _last_second
    if seconds != cached:
        stamp = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _last_second = (seconds, stamp)
    return f"{stamp}.{millis:03d}Z"
