"""Typed requests of protocol version 1, one frozen dataclass per method.

``protocol.codec.decode`` builds these from a frame; nothing downstream of the
codec ever sees an unchecked value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from decimal import Decimal
from typing import Any, Literal

from protocol.codes import Channel, Mode

RequestId = int | str
Side = Literal["buy", "sell"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionAuth:
    token: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionHello:
    cancel_on_disconnect: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class PositionUpdate:
    account: str
    symbol: str
    qty: Decimal
    price: Decimal
    seq: int | None = None
    release: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PositionEntry:
    symbol: str
    qty: Decimal
    price: Decimal


@dataclass(frozen=True, slots=True, kw_only=True)
class PositionSnapshot:
    account: str
    positions: tuple[PositionEntry, ...]
    seq: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PriceUpdate:
    symbol: str
    price: Decimal


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderValidate:
    account: str
    symbol: str
    side: Side
    qty: Decimal
    price: Decimal
    reserve: bool = False
    client_order_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ReservationRelease:
    reservation_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class EmergencyGet:
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class EmergencySet:
    mode: Mode
    reason: str
    account: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StateGet:
    account: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsGet:
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsSet:
    version: int
    # Checked key by key by the gateway's limits parser, which owns their meaning.
    limits: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribe:
    channels: tuple[Channel, ...]
    resume: dict[Channel, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Unsubscribe:
    channels: tuple[Channel, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterGet:
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterForget:
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryGet:
    pass


Params = (
    SessionAuth
    | SessionHello
    | Ping
    | PositionUpdate
    | PositionSnapshot
    | PriceUpdate
    | OrderValidate
    | ReservationRelease
    | EmergencyGet
    | EmergencySet
    | StateGet
    | LimitsGet
    | LimitsSet
    | Subscribe
    | Unsubscribe
    | ClusterGet
    | ClusterForget
    | HistoryGet
)


@dataclass(frozen=True, slots=True)
class Request:
    """One decoded request: ``id`` echoed verbatim, ``params`` fully checked."""

    id: RequestId
    method: str
    params: Params


# ------------------------------------------------------------ hot-path builders
#
# The generated ``__init__`` of a frozen dataclass binds keywords and stores
# each field through ``object.__setattr__``; for ``OrderValidate`` that is a
# quarter of decoding a frame. The codec's fast path builds the few types it
# decodes most with the slot setters instead: the same object, for values it has
# already checked. The setters are taken by name, and a class whose fields no
# longer match the names fails at import.


def _slot_setters(cls: type[Any], *names: str) -> tuple[Callable[[object, object], None], ...]:
    """The setters of ``cls``'s slots ``names``, which must be its fields in order."""
    declared = tuple(f.name for f in fields(cls))
    if names != declared:
        raise TypeError(f"{cls.__name__} has fields {declared}, not {names}")
    return tuple(cls.__dict__[name].__set__ for name in names)


_new = object.__new__
(
    _set_order_account,
    _set_order_symbol,
    _set_order_side,
    _set_order_qty,
    _set_order_price,
    _set_order_reserve,
    _set_order_client_order_id,
) = _slot_setters(
    OrderValidate, "account", "symbol", "side", "qty", "price", "reserve", "client_order_id"
)
(
    _set_update_account,
    _set_update_symbol,
    _set_update_qty,
    _set_update_price,
    _set_update_seq,
    _set_update_release,
) = _slot_setters(PositionUpdate, "account", "symbol", "qty", "price", "seq", "release")
_set_request_id, _set_request_method, _set_request_params = _slot_setters(
    Request, "id", "method", "params"
)
_set_entry_symbol, _set_entry_qty, _set_entry_price = _slot_setters(
    PositionEntry, "symbol", "qty", "price"
)


def new_order_validate(
    account: str,
    symbol: str,
    side: Side,
    qty: Decimal,
    price: Decimal,
    reserve: bool,
    client_order_id: str | None,
) -> OrderValidate:
    """``OrderValidate(...)`` of checked values, without the ``__init__`` overhead."""
    params: OrderValidate = _new(OrderValidate)
    _set_order_account(params, account)
    _set_order_symbol(params, symbol)
    _set_order_side(params, side)
    _set_order_qty(params, qty)
    _set_order_price(params, price)
    _set_order_reserve(params, reserve)
    _set_order_client_order_id(params, client_order_id)
    return params


def new_position_update(
    account: str,
    symbol: str,
    qty: Decimal,
    price: Decimal,
    seq: int | None,
    release: str | None,
) -> PositionUpdate:
    """``PositionUpdate(...)`` of checked values, without the ``__init__`` overhead."""
    params: PositionUpdate = _new(PositionUpdate)
    _set_update_account(params, account)
    _set_update_symbol(params, symbol)
    _set_update_qty(params, qty)
    _set_update_price(params, price)
    _set_update_seq(params, seq)
    _set_update_release(params, release)
    return params


def new_position_entry(symbol: str, qty: Decimal, price: Decimal) -> PositionEntry:
    """``PositionEntry(...)`` of checked values, without the ``__init__`` overhead."""
    entry: PositionEntry = _new(PositionEntry)
    _set_entry_symbol(entry, symbol)
    _set_entry_qty(entry, qty)
    _set_entry_price(entry, price)
    return entry


def new_request(request_id: RequestId, method: str, params: Params) -> Request:
    """``Request(...)`` of checked values, without the ``__init__`` overhead."""
    request: Request = _new(Request)
    _set_request_id(request, request_id)
    _set_request_method(request, method)
    _set_request_params(request, params)
    return request
