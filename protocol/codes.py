"""Error codes, reason codes, close codes and modes of protocol version 1.

These strings are the contract: clients match on them, so they never change
meaning. See docs/protocol.md sections 6 and 7.
"""

from __future__ import annotations

from enum import StrEnum

PROTOCOL_VERSION = 1


class ErrorCode(StrEnum):
    """Why a request failed (the ``error.code`` of a response)."""

    BAD_JSON = "BAD_JSON"
    BAD_REQUEST = "BAD_REQUEST"
    UNKNOWN_METHOD = "UNKNOWN_METHOD"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    FORBIDDEN = "FORBIDDEN"
    NOT_FOUND = "NOT_FOUND"
    CONFLICT = "CONFLICT"
    RATE_LIMITED = "RATE_LIMITED"
    UNAVAILABLE = "UNAVAILABLE"
    WRONG_GATEWAY = "WRONG_GATEWAY"
    INTERNAL = "INTERNAL"


class Reason(StrEnum):
    """Why an order was rejected (the ``code`` of each entry of ``reasons``)."""

    EMERGENCY_HALTED = "EMERGENCY_HALTED"
    ACCOUNT_HALTED = "ACCOUNT_HALTED"
    REDUCE_ONLY = "REDUCE_ONLY"
    MAX_EXPOSURE = "MAX_EXPOSURE"
    MAX_ACCOUNT_EXPOSURE = "MAX_ACCOUNT_EXPOSURE"
    MAX_POSITION = "MAX_POSITION"
    MAX_ORDER_QTY = "MAX_ORDER_QTY"
    MAX_ORDER_NOTIONAL = "MAX_ORDER_NOTIONAL"
    PRICE_COLLAR = "PRICE_COLLAR"
    RESTRICTED_SYMBOL = "RESTRICTED_SYMBOL"
    RATE_LIMITED = "RATE_LIMITED"
    STALE_POSITIONS = "STALE_POSITIONS"
    CUSTOM_RULE = "CUSTOM_RULE"
    CLUSTER_UNAVAILABLE = "CLUSTER_UNAVAILABLE"


class Mode(StrEnum):
    """Emergency modes, from least to most restrictive."""

    NORMAL = "normal"
    REDUCING = "reducing"
    HALTED = "halted"


class Role(StrEnum):
    TRADER = "trader"
    VIEWER = "viewer"
    FEED = "feed"
    ADMIN = "admin"


class AlertCode(StrEnum):
    EMERGENCY_CHANGED = "EMERGENCY_CHANGED"
    EXPOSURE_BREACH = "EXPOSURE_BREACH"
    EXPOSURE_WARNING = "EXPOSURE_WARNING"
    POSITION_SEQ_GAP = "POSITION_SEQ_GAP"
    CLIENT_DISCONNECTED = "CLIENT_DISCONNECTED"
    SLOW_CONSUMER = "SLOW_CONSUMER"
    PERSISTENCE_FAILURE = "PERSISTENCE_FAILURE"
    LIMITS_CHANGED = "LIMITS_CHANGED"
    RECOVERY_DAMAGE = "RECOVERY_DAMAGE"
    CLUSTER_UNAVAILABLE = "CLUSTER_UNAVAILABLE"


class AlertLevel(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class CloseCode:
    """WebSocket close codes the gateway uses (PROTOCOL section 7)."""

    GOING_AWAY = 1001
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    AUTH_FAILED = 4001
    SLOW_CONSUMER = 4003
    TOO_MANY_MESSAGES = 4008


class Channel(StrEnum):
    EMERGENCY = "emergency"
    ALERTS = "alerts"
    EXPOSURE = "exposure"
    DECISIONS = "decisions"
    HEARTBEAT = "heartbeat"
