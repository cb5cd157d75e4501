"""Typed requests of protocol version 1, one frozen dataclass per method.

``protocol.codec.decode`` builds these from a frame; nothing downstream of the
codec ever sees an unchecked value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
)


@dataclass(frozen=True, slots=True)
class Request:
    """One decoded request: ``id`` echoed verbatim, ``params`` fully checked."""

    id: RequestId
    method: str
    params: Params
