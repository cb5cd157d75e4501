"""Pre-trade checks, one small function each.

A rule looks at an ``OrderCheck`` (everything about the order and the book,
computed once per validation by the engine) and returns ``None`` when the
order passes, or a ``(code, message)`` pair when it fails. The engine runs
every rule and lists every failure, so a rule must not stop the others.

To add a check, write a function of this shape and either append it to
``DEFAULT_RULES`` (a gateway-wide rule) or pass it to ``RiskEngine`` (or the
embedded ``EmergencyManager``) as ``rules=[...]`` / name it in the config's
``rules = ["module:callable"]`` (a desk's own rule, loaded by
``gateway.rules``; see docs/rules.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from gateway.core.limits import EffectiveLimits, Limits
from gateway.core.share import LimitShare
from protocol.codes import Mode, Reason
from protocol.values import format_decimal as fmt


@dataclass(slots=True, kw_only=True)
class OrderCheck:
    """One order and the book around it, as the rules see it (read-only by contract)."""

    account: str
    symbol: str
    side: str
    qty: Decimal
    price: Decimal
    position: Decimal  # p: the account's signed position in the symbol
    reserved_buy: Decimal  # B: live reserved buy quantity
    reserved_sell: Decimal  # S: live reserved sell quantity
    worst_after: Decimal  # w': worst-case |position| after the order
    account_exposure_after: Decimal
    gateway_exposure_after: Decimal
    reduces: bool  # strictly reduces |p| without crossing zero, same-side reservations counted
    gateway_mode: Mode
    account_mode: Mode
    limits: Limits
    symbol_limits: EffectiveLimits
    reference_price: Decimal | None
    orders_last_second: int  # validations of this account in the last second, this one included
    stale: bool
    share: LimitShare | None = None  # set when max_exposure is shared with other engines


RuleResult = tuple[str, str] | None
Rule = Callable[[OrderCheck], RuleResult]


def emergency_halted(c: OrderCheck) -> RuleResult:
    if c.gateway_mode is Mode.HALTED:
        return Reason.EMERGENCY_HALTED, "the gateway is halted"
    return None


def account_halted(c: OrderCheck) -> RuleResult:
    if c.account_mode is Mode.HALTED:
        return Reason.ACCOUNT_HALTED, f"account {c.account} is halted"
    return None


def reduce_only(c: OrderCheck) -> RuleResult:
    if c.reduces:
        return None
    if c.gateway_mode is Mode.REDUCING:
        scope = "the gateway is"
    elif c.account_mode is Mode.REDUCING:
        scope = f"account {c.account} is"
    else:
        return None
    pending = c.reserved_buy if c.side == "buy" else c.reserved_sell
    return (
        Reason.REDUCE_ONLY,
        f"{scope} reducing: {c.side} {fmt(c.qty)} with {fmt(pending)} pending on the same side "
        f"does not strictly reduce position {fmt(c.position)}",
    )


def max_exposure(c: OrderCheck) -> RuleResult:
    share = c.share
    if share is not None:
        if not c.reduces and c.gateway_exposure_after > share.allowance:
            return (
                Reason.MAX_EXPOSURE,
                f"gross exposure on member {share.name} would be "
                f"{fmt(c.gateway_exposure_after)}, its credit {fmt(share.allowance)}; "
                f"cluster gross exposure would be {fmt(c.gateway_exposure_after + share.elsewhere)}"
                f", limit {fmt(c.limits.max_exposure)}",
            )
        return None
    if not c.reduces and c.gateway_exposure_after > c.limits.max_exposure:
        return (
            Reason.MAX_EXPOSURE,
            f"gross exposure would be {fmt(c.gateway_exposure_after)}, "
            f"limit {fmt(c.limits.max_exposure)}",
        )
    return None


def max_account_exposure(c: OrderCheck) -> RuleResult:
    if not c.reduces and c.account_exposure_after > c.limits.max_account_exposure:
        return (
            Reason.MAX_ACCOUNT_EXPOSURE,
            f"account {c.account} gross exposure would be {fmt(c.account_exposure_after)}, "
            f"limit {fmt(c.limits.max_account_exposure)}",
        )
    return None


def max_position(c: OrderCheck) -> RuleResult:
    limit = c.symbol_limits.max_position
    if not c.reduces and c.worst_after > limit:
        return (
            Reason.MAX_POSITION,
            f"position would be {fmt(c.worst_after)}, limit {fmt(limit)}",
        )
    return None


def max_order_qty(c: OrderCheck) -> RuleResult:
    limit = c.symbol_limits.max_order_qty
    if c.qty > limit:
        return Reason.MAX_ORDER_QTY, f"order quantity {fmt(c.qty)}, limit {fmt(limit)}"
    return None


def max_order_notional(c: OrderCheck) -> RuleResult:
    limit = c.symbol_limits.max_order_notional
    notional = c.qty * c.price
    if notional > limit:
        return Reason.MAX_ORDER_NOTIONAL, f"order notional {fmt(notional)}, limit {fmt(limit)}"
    return None


def price_collar(c: OrderCheck) -> RuleResult:
    ref = c.reference_price
    if ref is None:
        return None
    collar = c.symbol_limits.price_collar
    # |price - r| / r > collar, without a division so the math stays exact.
    if abs(c.price - ref) > collar * ref:
        return (
            Reason.PRICE_COLLAR,
            f"price {fmt(c.price)} is more than {fmt(collar * 100)}% from reference {fmt(ref)}",
        )
    return None


def restricted_symbol(c: OrderCheck) -> RuleResult:
    if c.symbol in c.limits.restricted_symbols:
        return Reason.RESTRICTED_SYMBOL, f"symbol {c.symbol} is restricted"
    return None


def rate_limited(c: OrderCheck) -> RuleResult:
    limit = c.limits.max_orders_per_second
    if c.orders_last_second > limit:
        return (
            Reason.RATE_LIMITED,
            f"account {c.account} sent {c.orders_last_second} validations in the last second, "
            f"limit {limit}",
        )
    return None


def stale_positions(c: OrderCheck) -> RuleResult:
    if c.stale:
        return (
            Reason.STALE_POSITIONS,
            f"positions of account {c.account} are stale after a sequence gap; "
            "send position.snapshot",
        )
    return None


def shared_state(c: OrderCheck) -> RuleResult:
    share = c.share
    if share is None:
        return None
    if share.unavailable is not None:
        return Reason.CLUSTER_UNAVAILABLE, share.unavailable
    if share.adding_blocked is not None and not c.reduces:
        return Reason.CLUSTER_UNAVAILABLE, share.adding_blocked
    return None


DEFAULT_RULES: tuple[Rule, ...] = (
    emergency_halted,
    account_halted,
    reduce_only,
    max_exposure,
    max_account_exposure,
    max_position,
    max_order_qty,
    max_order_notional,
    price_collar,
    restricted_symbol,
    rate_limited,
    stale_positions,
    shared_state,
)
