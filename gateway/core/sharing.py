"""``Sharing``: what an engine exchanges with others that share its
gateway-wide limit and its modes (``engine.sharing``).

The owner (a cluster member) hands the engine a ``LimitShare`` and keeps it
up to date; it exchanges the modes and the limits as documents (every scope's
mode, or the limits, at a version) and journals the share of the limit it
holds (``crd`` records). The core knows nothing of how they travel.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from gateway.core.context import exact
from gateway.core.controls import Controls
from gateway.core.events import ModeChanged
from gateway.core.records import CreditRecord, EmergencyRecord, LimitsRecord
from gateway.core.share import LimitShare
from gateway.core.state import RiskState
from gateway.core.trading import Trading
from protocol.messages import OrderValidate


class Sharing:
    __slots__ = ("_controls", "_state", "_trading")

    def __init__(self, state: RiskState, controls: Controls, trading: Trading) -> None:
        self._state = state
        self._controls = controls
        self._trading = trading

    # ------------------------------------------------------- the limit

    def share_limit(self, share: LimitShare) -> None:
        """From now on ``max_exposure`` is shared with other engines: orders
        are checked against ``share.allowance``, gateway-wide figures add
        ``share.elsewhere`` (see ``gateway.core.share``). The owner keeps
        ``share`` up to date and calls ``changed`` after each change."""
        self._state.share = share
        self.changed()

    @property
    def share(self) -> LimitShare | None:
        return self._state.share

    def changed(self, now_ms: int | None = None) -> None:
        """``share`` changed: gateway-wide figures and the EMERGENCY document
        follow it. With ``now_ms``, whether the shared state is reachable
        changed too: the EMERGENCY document is pushed again."""
        state = self._state
        share = state.share
        if share is None:
            return
        state.book.elsewhere = share.elsewhere
        if now_ms is not None:
            state.view = None
            if not state.replaying:
                state.events.append(ModeChanged(state.emergency_view(), None, ""))

    @exact
    def exposure_after(self, order: OrderValidate) -> Decimal | None:
        """The engine's gross exposure were ``order`` accepted; None when it
        strictly reduces. Changes nothing: the owner asks for more of the
        limit before the order is checked when it would not fit."""
        return self._trading.exposure_after(order)

    @property
    def credit_record(self) -> CreditRecord | None:
        """The last ``crd`` record applied (journaled or recovered)."""
        return self._state.credit

    def record_credit(self, units: int, seq: int) -> None:
        """Journal the share of the limit this engine now holds (``crd``)."""
        self._state.apply({"t": "crd", "u": units, "seq": seq})

    # --------------------------------------------------- the documents

    def modes_document(self, change: EmergencyRecord | None = None) -> dict[str, Any]:
        """Every scope's mode once the staged changes (and ``change``) are
        published, as engines sharing their modes exchange it."""
        return self._controls.modes_document(change)

    def converge_modes(self, document: Mapping[str, Any]) -> list[EmergencyRecord]:
        """The ``emg`` records that bring the modes to a ``modes_document``
        of a higher version (none otherwise); ``stage`` them next."""
        return self._controls.converge_modes(document)

    def limits_document(self, change: LimitsRecord | None = None) -> dict[str, Any]:
        """The limits (with ``change``), as engines sharing them exchange them."""
        return self._controls.limits_document(change)

    def converge_limits(
        self, document: Mapping[str, Any], *, same_version: bool = False
    ) -> LimitsRecord | None:
        """The ``lim`` record that brings the limits to a ``limits_document``
        of a higher version (None otherwise); ``stage`` it next."""
        return self._controls.converge_limits(document, same_version=same_version)
