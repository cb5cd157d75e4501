"""The engine's state rendered for the wire (docs/protocol.md).

Each view is a plain dict, named by a ``TypedDict``, ready for the codec:
decimals are strings (``format_decimal``), times ISO 8601 (``format_time_ms``),
keys in the order the protocol shows them. The engine builds them; the
server, the fan-out and the embedded API only pass them on.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal, NotRequired, TypedDict, cast

from protocol.values import format_decimal, format_time_ms

if TYPE_CHECKING:
    from gateway.core.book import AccountBook
    from gateway.core.limits import Limits
    from gateway.core.modes import Modes, ModeState
    from gateway.core.share import LimitShare


class ModeView(TypedDict):
    mode: str
    reason: str
    actor: str
    since: str


class EmergencyView(ModeView):
    """The EMERGENCY object: the gateway-wide mode, its version, and every
    account whose mode is not normal."""

    version: int
    accounts: dict[str, ModeView]
    #: In a cluster: whether this member reaches the shared state.
    cluster: NotRequired[ClusterReach]


class ClusterReach(TypedDict):
    reachable: bool
    since: str | None


class LimitsView(TypedDict):
    version: int
    limits: dict[str, Any]


class PositionView(TypedDict):
    qty: str
    price: str


class AccountView(TypedDict):
    positions: dict[str, PositionView]
    gross_exposure: str
    reserved_exposure: str
    stale: bool


class StateView(TypedDict):
    """The STATE object."""

    emergency: EmergencyView
    accounts: dict[str, AccountView]
    gross_exposure: str
    limits_version: int


#: A DECISION's ``exposure``: the account's and the gateway's gross exposure
#: after the decision, and the limits they are held to.
ExposureSummary = TypedDict(
    "ExposureSummary",
    {"account": str, "account_limit": str, "global": str, "global_limit": str},
)
#: One entry of the ``exposure`` channel.
ExposureView = TypedDict(
    "ExposureView",
    {"account": str, "gross": str, "limit": str, "global": str, "global_limit": str},
)


class ReasonView(TypedDict):
    code: str
    message: str


class DecisionView(TypedDict):
    """The DECISION object (``Decision.to_wire``)."""

    decision: Literal["accept", "reject"]
    reasons: list[ReasonView]
    reservation_id: str | None
    expires_at: str | None
    exposure: ExposureSummary | None
    emergency_version: int | None
    limits_version: int | None


class DecisionPush(DecisionView):
    """A ``decisions`` channel entry: the DECISION and the order it is about."""

    account: str
    symbol: str
    side: str
    qty: str
    price: str
    ts: str


class AlertView(TypedDict):
    level: str
    code: str
    message: str
    account: NotRequired[str]
    symbol: NotRequired[str]
    ts: str


class PositionResult(TypedDict):
    """The result of ``position.update``."""

    account: str
    symbol: str
    qty: str
    price: str
    exposure: str
    released: NotRequired[bool]


class PositionEntryView(TypedDict):
    symbol: str
    qty: str
    price: str


class PositionsResult(TypedDict):
    """The result of ``position.snapshot``."""

    account: str
    positions: list[PositionEntryView]
    exposure: str


class PriceResult(TypedDict):
    """The result of ``price.update``."""

    symbol: str
    price: str


def mode_view(state: ModeState) -> ModeView:
    return {
        "mode": state.mode.value,
        "reason": state.reason,
        "actor": state.actor,
        "since": format_time_ms(state.since_ms),
    }


def emergency_view(modes: Modes, share: LimitShare | None = None) -> EmergencyView:
    """The whole EMERGENCY document of ``modes`` (with ``share``: whether the
    shared state is reachable)."""
    gateway = modes.gateway
    view: EmergencyView = {
        "mode": gateway.mode.value,
        "reason": gateway.reason,
        "actor": gateway.actor,
        "since": format_time_ms(gateway.since_ms),
        "version": modes.version,
        "accounts": {a: mode_view(s) for a, s in sorted(modes.accounts.items())},
    }
    if share is not None:
        since = share.unreachable_since_ms
        view["cluster"] = {
            "reachable": share.reachable,
            "since": None if share.reachable or since is None else format_time_ms(since),
        }
    return view


def filter_emergency(view: EmergencyView, readable: Callable[[str], bool]) -> EmergencyView:
    """An EMERGENCY document whose ``accounts`` lists only the readable ones
    (``view`` itself when it lists no other)."""
    accounts = view["accounts"]
    if all(readable(account) for account in accounts):
        return view
    filtered = view.copy()
    filtered["accounts"] = {a: s for a, s in accounts.items() if readable(a)}
    return filtered


def account_view(book: AccountBook) -> AccountView:
    """One account of the STATE object: the positions reported, not the
    symbols only reservations hold."""
    return {
        "positions": {
            symbol: {"qty": format_decimal(sym.qty), "price": format_decimal(sym.mark)}
            for symbol, sym in sorted(book.positions.items())
            if sym.reported and sym.mark is not None
        },
        "gross_exposure": format_decimal(book.gross),
        "reserved_exposure": format_decimal(book.reserved),
        "stale": book.stale,
    }


def limits_view(version: int, limits: Limits) -> LimitsView:
    return {"version": version, "limits": limits.to_wire()}


def exposure_view(
    account: str, gross: Decimal, gateway_gross: Decimal, limit_texts: tuple[str, str]
) -> ExposureView:
    """An ``exposure`` channel entry; ``limit_texts``: the account's and the
    gateway's limit, formatted."""
    return {
        "account": account,
        "gross": format_decimal(gross),
        "limit": limit_texts[0],
        "global": format_decimal(gateway_gross),
        "global_limit": limit_texts[1],
    }


def alert_view(
    level: str,
    code: str,
    message: str,
    now_ms: int,
    account: str | None = None,
    symbol: str | None = None,
) -> AlertView:
    # Built as a plain dict: the protocol puts ts after the optional keys.
    alert = {"level": level, "code": code, "message": message}
    if account is not None:
        alert["account"] = account
    if symbol is not None:
        alert["symbol"] = symbol
    alert["ts"] = format_time_ms(now_ms)
    return cast(AlertView, alert)


def positions_view(account: str, wire: list[list[str]], exposure: str) -> PositionsResult:
    return {
        "account": account,
        "positions": [{"symbol": e[0], "qty": e[1], "price": e[2]} for e in wire],
        "exposure": exposure,
    }
