"""Journal records: the one schema that live changes, replay, what-if and the
benchmark share.

Every state change of the engine is one record. Records are plain dicts on the
wire and on disk (JSON objects, keys in the order built here, decimals as
strings, times in milliseconds since the epoch); the ``TypedDict`` of each
type names its keys. Record types:

``pos``    a position update (``rel``: the reservation its fill replaces)
``psnap``  every position of one account
``px``     a reference price
``dec``    a validation's decision (``rid``: the reservation it made; ``m``:
           the reasons' messages, when rejected)
``rel``    a reservation released (``why``: released, expired, disconnect, ...)
``emg``    an emergency mode change (``a`` None: gateway-wide)
``lim``    a limits change (``file``: the config file's limits it came from)
``cod``    cancel-on-disconnect set or cleared for live reservations
``alr``    an alert that no other record implies (an emergency or limits
           change, or a position seq gap, raises its alert again in replay)
``crd``    the share of a shared max_exposure granted to this engine (a
           cluster member's credit: ``u`` units of ``CREDIT_UNIT``, ``seq``)
``boot``   written by earlier versions; applies as nothing

Reading a record back is the engine's ``apply_record`` and ``replay``: a
record the engine never writes raises ``RecordNotApplied`` there.
"""

from __future__ import annotations

from typing import Any, Final, Literal, NotRequired, TypedDict

RECORD_TYPES: Final = frozenset(
    {"pos", "psnap", "px", "dec", "rel", "emg", "lim", "cod", "alr", "crd", "boot"}
)
#: Record types published only once durable (see ``gateway.core.modes``).
STAGED_TYPES: Final = frozenset({"emg", "lim"})


class PositionRecord(TypedDict):
    t: Literal["pos"]
    a: str
    s: str
    q: str
    p: str
    ts: int
    seq: NotRequired[int]
    rel: NotRequired[str]


class PositionSnapshotRecord(TypedDict):
    t: Literal["psnap"]
    a: str
    #: ``[symbol, qty, price]`` per position.
    pos: list[list[str]]
    ts: int
    seq: NotRequired[int]


class PriceRecord(TypedDict):
    t: Literal["px"]
    s: str
    p: str
    ts: int


class DecisionRecord(TypedDict):
    t: Literal["dec"]
    a: str
    s: str
    side: str
    q: str
    p: str
    d: str
    #: The codes of the failed checks.
    r: list[str]
    ts: int
    #: The versions of the EMERGENCY document and of the limits it was made
    #: under (always written since the decisions history; before, only with
    #: a reservation).
    ev: NotRequired[int]
    lv: NotRequired[int]
    #: Their messages, in the same order (only when rejected).
    m: NotRequired[list[str]]
    #: The DECISION's exposure figures: the account's and the gateway's
    #: gross (their limits are those of version ``lv``).
    x: NotRequired[list[str]]
    reserve: NotRequired[bool]
    coid: NotRequired[str]
    rid: NotRequired[str]
    #: The reservation's expiry (ms).
    exp: NotRequired[int]
    cod: NotRequired[bool]


class AlertRecord(TypedDict):
    t: Literal["alr"]
    #: Level, code and message, as on the wire.
    lvl: str
    c: str
    m: str
    ts: int
    a: NotRequired[str]
    s: NotRequired[str]
    #: About a connection: staff only, never shown to a trader.
    staff: NotRequired[bool]


class CreditRecord(TypedDict):
    t: Literal["crd"]
    #: Credit units (integers; see ``gateway.cluster.ledger``).
    u: int
    seq: int


class ReleaseRecord(TypedDict):
    t: Literal["rel"]
    id: str
    why: str
    ts: int


class EmergencyRecord(TypedDict):
    t: Literal["emg"]
    a: str | None
    m: str
    r: str
    by: str
    at: int
    v: int


class LimitsRecord(TypedDict):
    t: Literal["lim"]
    v: int
    #: ``Limits.to_wire()``.
    limits: dict[str, Any]
    by: str
    at: int
    file: NotRequired[dict[str, Any] | None]


class CancelOnDisconnectRecord(TypedDict):
    t: Literal["cod"]
    ids: list[str]
    on: bool
    ts: int


Record = (
    PositionRecord
    | PositionSnapshotRecord
    | PriceRecord
    | DecisionRecord
    | ReleaseRecord
    | EmergencyRecord
    | LimitsRecord
    | CancelOnDisconnectRecord
    | AlertRecord
    | CreditRecord
)
StagedRecord = EmergencyRecord | LimitsRecord


def emergency_record(
    account: str | None, mode: str, reason: str, actor: str, at_ms: int, version: int
) -> EmergencyRecord:
    """An ``emg`` record: ``account``'s mode (``None``: gateway-wide) set by ``actor``."""
    return {
        "t": "emg",
        "a": account,
        "m": mode,
        "r": reason,
        "by": actor,
        "at": at_ms,
        "v": version,
    }


def release_record(reservation_id: str, why: str, ts_ms: int) -> ReleaseRecord:
    """A ``rel`` record: reservation ``reservation_id`` released, and why."""
    return {"t": "rel", "id": reservation_id, "why": why, "ts": ts_ms}


class RecordNotApplied(Exception):
    """A journal record or snapshot could not be applied (``replay``,
    ``load_snapshot``): it holds something the engine never writes. The
    message says what; the engine's state is undefined afterwards."""

    def __init__(self, cause: BaseException) -> None:
        text = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
        super().__init__(text if len(text) <= 200 else text[:200] + "...")
