"""A gateway-wide limit shared with other engines.

A lone engine checks ``max_exposure`` against its own gross exposure. When
several engines share one ``max_exposure`` (a cluster, protocol section 10),
each may use only its ``allowance`` of it (its credit), and the gateway-wide
figures it shows add what the others last published (``elsewhere``). Whoever
owns the engine keeps a ``LimitShare`` up to date; the engine only reads it,
except ``breach``, which it sets instead of changing the shared mode itself.

Nothing here knows how the share is kept: the core stays pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from protocol.values import ZERO


@dataclass(slots=True, kw_only=True)
class LimitShare:
    #: Who this engine is among those sharing the limit (named in messages).
    name: str
    #: The most gross exposure this engine may hold (its credit).
    allowance: Decimal = ZERO
    #: The gross exposure the others last published.
    elsewhere: Decimal = ZERO
    #: Set: the shared state cannot be trusted; every order is rejected
    #: (``CLUSTER_UNAVAILABLE``) with this message.
    unavailable: str | None = None
    #: Set: orders that add exposure are rejected (``CLUSTER_UNAVAILABLE``)
    #: with this message; those that strictly reduce pass.
    adding_blocked: str | None = None
    #: Whether the shared state is reachable, and since when it is not (ms),
    #: for the EMERGENCY document.
    reachable: bool = True
    unreachable_since_ms: int | None = None
    #: Set by the engine when the shared total crossed ``max_exposure`` and
    #: the limits ask for ``auto_reduce_on_breach``: the reason for the
    #: shared gateway-wide ``reducing`` mode the owner should set.
    breach: str | None = None
