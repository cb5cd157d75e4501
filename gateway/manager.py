"""The seed's import path: ``from gateway.manager import EmergencyManager``.

``EmergencyManager`` (the original async library API) lives in
``gateway.embedded``, over the risk core ``gateway.core.engine.RiskEngine``.
"""

from __future__ import annotations

from gateway.embedded import EmergencyManager

__all__ = ["EmergencyManager"]
