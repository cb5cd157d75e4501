"""Live reservations: what an accepted ``reserve: true`` validation holds.

A reservation counts in its symbol's ``B`` or ``S`` (``gateway.core.book``)
until it is released, filled (a position update naming it), expired or
dropped with its connection. ``Reservations`` is the index: by id, by the
account's ``client_order_id``, and by expiry.
"""

from __future__ import annotations

import heapq
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, cast

from gateway.core.events import Decision
from gateway.core.views import DecisionView
from protocol.codes import ErrorCode
from protocol.errors import ProtocolError
from protocol.messages import OrderValidate
from protocol.values import format_decimal as fmt
from protocol.values import format_time_ms


@dataclass(frozen=True, slots=True, kw_only=True)
class Reservation:
    id: str
    account: str
    symbol: str
    side: str
    qty: Decimal
    price: Decimal
    expires_ms: int
    client_order_id: str | None
    cancel_on_disconnect: bool
    connection: int | None  # live connection that owns it (not persisted)
    #: The accept decision, answered again (with current exposure) on an
    #: idempotent retry; its ``exposure`` is None.
    decision: Decision

    def to_snapshot(self) -> dict[str, Any]:
        """The reservation as a snapshot holds it (``Reservations.load`` reads it)."""
        return {
            "rid": self.id,
            "a": self.account,
            "s": self.symbol,
            "side": self.side,
            "q": self.qty,
            "p": self.price,
            "exp": self.expires_ms,
            "coid": self.client_order_id,
            "cod": self.cancel_on_disconnect,
            "decision": self.decision.to_wire(),
        }


def accepted_reservation(
    reservation_id: str,
    expires_ms: int,
    emergency_version: int | None,
    limits_version: int | None,
) -> Decision:
    """The accept decision of a reservation recovered from its ``dec`` record."""
    return Decision(
        {
            "decision": "accept",
            "reasons": [],
            "reservation_id": reservation_id,
            "expires_at": format_time_ms(expires_ms),
            "exposure": None,
            "emergency_version": emergency_version,
            "limits_version": limits_version,
        }
    )


def decision_from_snapshot(data: Mapping[str, Any]) -> Decision:
    """A reservation's accept decision as ``Reservation.to_snapshot`` wrote it
    (its DECISION object, answered again as it was)."""
    return Decision(cast(DecisionView, dict(data)))


class Reservations:
    """The live reservations, by id, by ``(account, client_order_id)`` and by expiry."""

    __slots__ = ("by_client_order", "expiry", "live")

    def __init__(self) -> None:
        self.live: dict[str, Reservation] = {}
        self.by_client_order: dict[tuple[str, str], str] = {}
        #: ``(expires_ms, id)``, soonest first; entries of reservations gone
        #: since are skipped when they come up.
        self.expiry: list[tuple[int, str]] = []

    def __contains__(self, reservation_id: object) -> bool:
        return reservation_id in self.live

    def clear(self) -> None:
        self.live.clear()
        self.by_client_order.clear()
        self.expiry.clear()

    def add(self, res: Reservation) -> None:
        self.live[res.id] = res
        if res.client_order_id is not None:
            self.by_client_order[(res.account, res.client_order_id)] = res.id
        heapq.heappush(self.expiry, (res.expires_ms, res.id))

    def remove(self, res: Reservation) -> None:
        del self.live[res.id]
        if res.client_order_id is not None:
            self.by_client_order.pop((res.account, res.client_order_id), None)

    def replace(self, res: Reservation) -> None:
        """Swap in a changed copy of a live reservation (same id, same expiry)."""
        self.live[res.id] = res

    def due(self, now_ms: int) -> Iterator[str]:
        """The ids of live reservations whose time is up at ``now_ms``, soonest
        first. The caller releases each before asking for the next."""
        heap = self.expiry
        while heap and heap[0][0] <= now_ms:
            expires, rid = heapq.heappop(heap)
            res = self.live.get(rid)
            if res is not None and res.expires_ms == expires:
                yield rid


def require_same_order(live: Reservation, order: OrderValidate) -> None:
    """A repeat of a live ``client_order_id`` must be the same order; any other
    order under that id is refused (``CONFLICT`` naming the field), since it
    would be answered with a decision made for another order."""
    differs: tuple[str, str, str] | None = None
    if order.symbol != live.symbol:
        differs = ("symbol", order.symbol, live.symbol)
    elif order.side != live.side:
        differs = ("side", order.side, live.side)
    elif order.qty != live.qty:
        differs = ("qty", fmt(order.qty), fmt(live.qty))
    elif order.price != live.price:
        differs = ("price", fmt(order.price), fmt(live.price))
    elif not order.reserve:
        differs = ("reserve", "false", "true")
    if differs is not None:
        name, given, held = differs
        raise ProtocolError(
            ErrorCode.CONFLICT,
            f"params.client_order_id {live.client_order_id} belongs to live reservation "
            f"{live.id} of another order: params.{name} is {given}, the reserved order's "
            f"is {held}; use a new client_order_id",
        )


def random_reservation_id() -> str:
    """``R`` and 16 random hex digits: ids tell nothing about other accounts'
    reservations (how many, or which one comes next)."""
    return "R" + secrets.token_hex(8)
