"""Bytes to typed requests and back: the one trust boundary of the gateway.

``decode`` returns a well-typed ``Request`` or raises ``ProtocolError`` whose
message names the field and what was wrong. ``encode_*`` produce the bytes the
server sends; the gateway never builds a frame any other way.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

import orjson

from protocol.codes import Channel, ErrorCode, Mode
from protocol.errors import ProtocolError, bad_request
from protocol.messages import (
    ClusterForget,
    ClusterGet,
    EmergencyGet,
    EmergencySet,
    HistoryGet,
    LimitsGet,
    LimitsSet,
    OrderValidate,
    Params,
    Ping,
    PositionEntry,
    PositionSnapshot,
    PositionUpdate,
    PriceUpdate,
    Request,
    RequestId,
    ReservationRelease,
    SessionAuth,
    SessionHello,
    StateGet,
    Subscribe,
    Unsubscribe,
    new_order_validate,
    new_position_entry,
    new_position_update,
    new_request,
)
from protocol.values import (
    MAX_DECIMAL_CHARS,
    MAX_INT,
    ZERO,
    JsonNumber,
    decimal_string_match,
    name_match,
    parse_bool,
    parse_decimal,
    parse_int,
    parse_name,
    parse_text,
    show,
)

MAX_ID_CHARS = 64
MAX_SNAPSHOT_POSITIONS = 10_000
_ENVELOPE_KEYS = frozenset({"id", "method", "params"})
_CHANNELS = {c.value: c for c in Channel}
_MODES = {m.value: m for m in Mode}


def _params(
    method: str, raw: object, allowed: tuple[str, ...], required: tuple[str, ...]
) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise bad_request(f"params must be an object, was {show(raw)}")
    for key in raw:
        if key not in allowed:
            expected = ", ".join(allowed) if allowed else "none"
            raise bad_request(
                f"params.{key} is not a parameter of {method} (parameters: {expected})"
            )
    for key in required:
        if key not in raw:
            raise bad_request(f"params.{key} is required for {method}")
    return raw


def _optional_seq(p: Mapping[str, Any]) -> int | None:
    value = p.get("seq")
    return None if value is None else parse_int(value, "params.seq", minimum=0)


def _channels(value: object, field: str) -> tuple[Channel, ...]:
    if not isinstance(value, list) or not value:
        raise bad_request(f"{field} must be a non-empty array of channel names, was {show(value)}")
    result: list[Channel] = []
    for i, name in enumerate(value):
        channel = _CHANNELS.get(name) if isinstance(name, str) else None
        if channel is None:
            raise bad_request(
                f"{field}[{i}] must be one of {', '.join(_CHANNELS)}, was {show(name)}"
            )
        if channel not in result:
            result.append(channel)
    return tuple(result)


def _session_auth(m: str, raw: object) -> SessionAuth:
    p = _params(m, raw, ("token",), ("token",))
    token = p["token"]
    if not isinstance(token, str) or not token or len(token) > 512:
        raise bad_request("params.token must be a non-empty string of at most 512 characters")
    return SessionAuth(token=token)


def _session_hello(m: str, raw: object) -> SessionHello:
    p = _params(m, raw, ("cancel_on_disconnect",), ())
    value = p.get("cancel_on_disconnect", False)
    return SessionHello(cancel_on_disconnect=parse_bool(value, "params.cancel_on_disconnect"))


def _no_params(
    cls: type[Ping] | type[EmergencyGet] | type[LimitsGet] | type[ClusterGet] | type[HistoryGet],
) -> Callable[[str, object], Params]:
    def parse(m: str, raw: object) -> Params:
        _params(m, raw, (), ())
        return cls()

    return parse


def _position_update(m: str, raw: object) -> PositionUpdate:
    p = _params(
        m,
        raw,
        ("account", "symbol", "qty", "price", "seq", "release"),
        ("account", "symbol", "qty", "price"),
    )
    release = p.get("release")
    if release is not None:
        release = parse_text(release, "params.release", max_len=64, allow_empty=False)
    return PositionUpdate(
        account=parse_name(p["account"], "params.account"),
        symbol=parse_name(p["symbol"], "params.symbol"),
        qty=parse_decimal(p["qty"], "params.qty"),
        price=parse_decimal(p["price"], "params.price", positive=True),
        seq=_optional_seq(p),
        release=release,
    )


def _position_snapshot(m: str, raw: object) -> PositionSnapshot:
    p = _params(m, raw, ("account", "positions", "seq"), ("account", "positions"))
    positions = p["positions"]
    if not isinstance(positions, list):
        raise bad_request(f"params.positions must be an array, was {show(positions)}")
    if len(positions) > MAX_SNAPSHOT_POSITIONS:
        raise bad_request(f"params.positions holds more than {MAX_SNAPSHOT_POSITIONS} entries")
    entries: list[PositionEntry] = []
    seen: set[str] = set()
    for i, item in enumerate(positions):
        # The common entry, all correct: checked as the careful path below
        # would check it, without building its messages.
        if type(item) is dict and len(item) == 3:
            symbol = item.get("symbol")
            if type(symbol) is str and name_match(symbol) is not None and symbol not in seen:
                qty = _quick_decimal(item.get("qty"), False)
                price = _quick_decimal(item.get("price"), True)
                if qty is not None and price is not None:
                    seen.add(symbol)
                    entries.append(new_position_entry(symbol, qty, price))
                    continue
        where = f"params.positions[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object, was {show(item)}")
        for key in item:
            if key not in ("symbol", "qty", "price"):
                raise bad_request(
                    f"{where}.{key} is not a field of a position (symbol, qty, price)"
                )
        for key in ("symbol", "qty", "price"):
            if key not in item:
                raise bad_request(f"{where}.{key} is required")
        symbol = parse_name(item["symbol"], f"{where}.symbol")
        if symbol in seen:
            raise bad_request(f"{where}.symbol {symbol} appears twice in the snapshot")
        seen.add(symbol)
        entries.append(
            PositionEntry(
                symbol=symbol,
                qty=parse_decimal(item["qty"], f"{where}.qty"),
                price=parse_decimal(item["price"], f"{where}.price", positive=True),
            )
        )
    return PositionSnapshot(
        account=parse_name(p["account"], "params.account"),
        positions=tuple(entries),
        seq=_optional_seq(p),
    )


def _price_update(m: str, raw: object) -> PriceUpdate:
    p = _params(m, raw, ("symbol", "price"), ("symbol", "price"))
    return PriceUpdate(
        symbol=parse_name(p["symbol"], "params.symbol"),
        price=parse_decimal(p["price"], "params.price", positive=True),
    )


def _order_validate(m: str, raw: object) -> OrderValidate:
    p = _params(
        m,
        raw,
        ("account", "symbol", "side", "qty", "price", "reserve", "client_order_id"),
        ("account", "symbol", "side", "qty", "price"),
    )
    side = p["side"]
    if side != "buy" and side != "sell":
        raise bad_request(f'params.side must be "buy" or "sell", was {show(side)}')
    coid = p.get("client_order_id")
    if coid is not None:
        coid = parse_text(coid, "params.client_order_id", max_len=64, allow_empty=False)
    return OrderValidate(
        account=parse_name(p["account"], "params.account"),
        symbol=parse_name(p["symbol"], "params.symbol"),
        side=side,
        qty=parse_decimal(p["qty"], "params.qty", positive=True),
        price=parse_decimal(p["price"], "params.price", positive=True),
        reserve=parse_bool(p.get("reserve", False), "params.reserve"),
        client_order_id=coid,
    )


def _reservation_release(m: str, raw: object) -> ReservationRelease:
    p = _params(m, raw, ("reservation_id",), ("reservation_id",))
    rid = parse_text(p["reservation_id"], "params.reservation_id", max_len=64, allow_empty=False)
    return ReservationRelease(reservation_id=rid)


def _emergency_set(m: str, raw: object) -> EmergencySet:
    p = _params(m, raw, ("mode", "reason", "account"), ("mode",))
    mode = _MODES.get(p["mode"]) if isinstance(p["mode"], str) else None
    if mode is None:
        raise bad_request(
            f'params.mode must be "normal", "reducing" or "halted", was {show(p["mode"])}'
        )
    reason = p.get("reason", "")
    reason = parse_text(reason, "params.reason", max_len=512)
    if mode is not Mode.NORMAL and not reason.strip():
        raise bad_request(f"params.reason is required (non-empty) to set mode {mode.value}")
    account = p.get("account")
    return EmergencySet(
        mode=mode,
        reason=reason,
        account=None if account is None else parse_name(account, "params.account"),
    )


def _state_get(m: str, raw: object) -> StateGet:
    p = _params(m, raw, ("account",), ())
    account = p.get("account")
    return StateGet(account=None if account is None else parse_name(account, "params.account"))


def _limits_set(m: str, raw: object) -> LimitsSet:
    p = _params(m, raw, ("version", "limits"), ("version", "limits"))
    limits = p["limits"]
    if not isinstance(limits, dict):
        raise bad_request(f"params.limits must be an object, was {show(limits)}")
    return LimitsSet(version=parse_int(p["version"], "params.version", minimum=0), limits=limits)


def _subscribe(m: str, raw: object) -> Subscribe:
    p = _params(m, raw, ("channels", "resume"), ("channels",))
    channels = _channels(p["channels"], "params.channels")
    resume_raw = p.get("resume")
    resume: dict[Channel, int] = {}
    if resume_raw is not None:
        if not isinstance(resume_raw, dict):
            raise bad_request(
                f"params.resume must be an object of channel: seq, was {show(resume_raw)}"
            )
        for name, seq in resume_raw.items():
            channel = _CHANNELS.get(name)
            if channel is None:
                raise bad_request(f"params.resume.{name} is not a channel")
            if channel not in channels:
                raise bad_request(f"params.resume.{name} names a channel not in params.channels")
            resume[channel] = parse_int(seq, f"params.resume.{name}", minimum=0)
    return Subscribe(channels=channels, resume=resume)


def _cluster_forget(m: str, raw: object) -> ClusterForget:
    p = _params(m, raw, ("name",), ("name",))
    return ClusterForget(name=parse_name(p["name"], "params.name"))


def _unsubscribe(m: str, raw: object) -> Unsubscribe:
    p = _params(m, raw, ("channels",), ("channels",))
    return Unsubscribe(channels=_channels(p["channels"], "params.channels"))


PARSERS: dict[str, Callable[[str, object], Params]] = {
    "session.auth": _session_auth,
    "session.hello": _session_hello,
    "ping": _no_params(Ping),
    "position.update": _position_update,
    "position.snapshot": _position_snapshot,
    "price.update": _price_update,
    "order.validate": _order_validate,
    "reservation.release": _reservation_release,
    "emergency.get": _no_params(EmergencyGet),
    "emergency.set": _emergency_set,
    "state.get": _state_get,
    "limits.get": _no_params(LimitsGet),
    "limits.set": _limits_set,
    "subscribe": _subscribe,
    "unsubscribe": _unsubscribe,
    "cluster.get": _no_params(ClusterGet),
    "cluster.forget": _cluster_forget,
    "history.get": _no_params(HistoryGet),
}
METHODS = frozenset(PARSERS)


_ID_TEXT = "an integer or a string of at most 64 characters (digits, for an integer)"


def _request_id(obj: dict[str, Any]) -> RequestId:
    if "id" not in obj:
        raise bad_request(f"id is required ({_ID_TEXT})")
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, int | str):
        raise bad_request(f"id must be {_ID_TEXT}, was {show(rid)}")
    if isinstance(rid, str) and len(rid) > MAX_ID_CHARS:
        raise bad_request(f"id must be at most {MAX_ID_CHARS} characters, was {len(rid)}")
    return rid


_NOT_JSON = object()
# An integer id may have this many digits; a longer integer is kept as a
# JsonNumber (never an int), which no field accepts as an integer.
_MAX_INT_DIGITS = MAX_ID_CHARS


def _exact_int(text: str) -> int | JsonNumber:
    digits = len(text) - (text[0] == "-")
    return int(text) if digits <= _MAX_INT_DIGITS else JsonNumber(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads_exact(frame: bytes | str) -> Any:
    """Read a frame with every number exactly as written: integers as ``int``
    (at most 64 digits, else a ``JsonNumber``), other numbers as ``JsonNumber``.

    For the frames orjson would read lossily (a float, an integer past 64
    bits, ``1e400``); ``_NOT_JSON`` where orjson would refuse the frame for
    something else (NaN, a lone surrogate, bad UTF-8, too deep).
    """
    try:
        text = frame if isinstance(frame, str) else bytes(frame).decode("utf-8")
        obj = json.loads(
            text, parse_int=_exact_int, parse_float=JsonNumber, parse_constant=_no_constant
        )
        _check_text(obj)
    except (ValueError, RecursionError):
        return _NOT_JSON
    return obj


def _check_text(obj: Any) -> None:
    """Raise ``UnicodeEncodeError`` (a ``ValueError``) for a lone surrogate in
    any key or string: orjson refuses those, and nothing could write them."""
    stack = [obj]
    while stack:
        node = stack.pop()
        if type(node) is dict:
            for key, value in node.items():
                key.encode("utf-8")
                stack.append(value)
        elif type(node) is list:
            stack.extend(node)
        elif type(node) is str:
            node.encode("utf-8")


def _holds_float(obj: Any) -> bool:
    """Whether orjson read a number of ``obj`` as a float (which may not be
    the number the frame holds)."""
    stack = [obj]
    while stack:
        node = stack.pop()
        kind = type(node)
        if kind is float:
            return True
        if kind is dict:
            stack.extend(node.values())
        elif kind is list:
            stack.extend(node)
    return False


# Where a key ends: its closing quote, then a colon. Every key of a JSON object
# matches once; a string value can only add matches (an escaped quote followed
# by a colon), never hide a key. So when the parsed tree holds as many keys as
# the frame has matches, no key was repeated (orjson keeps the last silently).
_KEY_END = re.compile(rb'"\s*:')
_KEY_END_TEXT = re.compile(r'"\s*:')
# Without a quote followed by whitespace, the matches are exactly the '":' pairs,
# which bytes.count finds faster than the regex.
_QUOTE_SPACE = re.compile(rb'"\s')


def _count_keys(obj: dict[str, Any]) -> int:
    # Iterative: orjson accepts 1000 levels of nesting, more than Python's recursion.
    count = 0
    stack: list[Any] = [obj]
    pop, push = stack.pop, stack.append
    while stack:
        node = pop()
        if type(node) is dict:
            count += len(node)
            node = node.values()
        for value in node:
            kind = type(value)
            if kind is dict or kind is list:
                push(value)
    return count


def _ignore_number(_text: str) -> int:
    return 0


def _repeats_no_key(frame: bytes | str, keys: int) -> bool:
    """True when the frame, whose parsed objects hold ``keys`` keys, repeats none.

    Every key is followed by a colon outside any string, and no other colon is
    outside a string, so a frame with exactly ``keys`` colons repeats no key: the
    common case, one count. Colons inside string values (``"desk:1"``) only
    add to that count; the key ends are then counted instead.
    """
    if isinstance(frame, str):
        return frame.count(":") == keys or len(_KEY_END_TEXT.findall(frame)) == keys
    if frame.count(b":") == keys:
        return True
    if _QUOTE_SPACE.search(frame) is None:
        return frame.count(b'":') == keys
    return len(_KEY_END.findall(frame)) == keys


def _duplicate_key_error(frame: bytes | str, obj: dict[str, Any]) -> ProtocolError | None:
    """``BAD_REQUEST`` naming the first key an object of the frame repeats, else None.

    Cheap when no key repeats (a count or a scan of the frame and a walk over
    the parsed keys); only a frame whose counts differ is read again, pair by pair.
    """
    if _repeats_no_key(frame, _count_keys(obj)):
        return None
    repeated: list[str] = []

    def keys_of(pairs: list[tuple[str, Any]]) -> list[str]:
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            seen: set[str] = set()
            for key in keys:
                if key in seen:
                    repeated.append(key)
                seen.add(key)
        return keys

    try:
        top_keys = json.loads(
            frame,
            object_pairs_hook=keys_of,
            parse_int=_ignore_number,
            parse_float=_ignore_number,
            parse_constant=_ignore_number,
        )
    except RecursionError:
        return bad_request("frame nests too deeply to be checked for duplicate keys")
    except ValueError:
        return bad_request("frame cannot be checked for duplicate keys")
    if not repeated:
        return None
    error = bad_request(f"duplicate key {show(repeated[0])}")
    if top_keys.count("id") == 1:  # a repeated id is ambiguous: the error's id stays null
        with contextlib.suppress(ProtocolError):
            error.request_id = _request_id(obj)
    return error


# ----------------------------------------------------------------- fast paths
#
# Most frames are well-formed order.validate and position.update requests. For
# those two methods, decode first tries a reader of the all-correct shape only:
# exactly id, method and params; a usable id; no unknown, missing or repeated
# key; every value one the careful parsers above accept as it is. Anything else
# (including every error) gives None, and the careful path reads the frame from
# the start, so results, errors and their order are the careful path's alone.


def _flat_params(frame: bytes | str, obj: dict[str, Any]) -> dict[str, Any] | None:
    """``params`` of an envelope of exactly id, method and params with a usable id,
    in a frame with no more keys than the envelope's and params' own.

    The caller accepts the frame only once every value of params is a scalar:
    then those are all the frame's keys, and the count says none repeats.
    """
    params = obj.get("params")
    rid = obj.get("id")
    if (
        len(obj) != 3
        or type(params) is not dict
        or not (type(rid) is int or (type(rid) is str and len(rid) <= MAX_ID_CHARS))
        or not _repeats_no_key(frame, 3 + len(params))
    ):
        return None
    return params


def _quick_decimal(value: object, positive: bool) -> Decimal | None:
    """What ``parse_decimal`` returns for ``value``, or None where it would refuse it."""
    if type(value) is str:
        if len(value) > MAX_DECIMAL_CHARS or decimal_string_match(value) is None:
            return None
        result = Decimal(value)
        return None if positive and result <= ZERO else result
    if type(value) is int:
        try:
            return parse_decimal(value, "", positive=positive)
        except ProtocolError:
            return None
    return None  # a float may not be the number sent: the careful path reads it


def _fast_order_validate(frame: bytes | str, obj: dict[str, Any]) -> Request | None:
    p = _flat_params(frame, obj)
    if p is None:
        return None
    account = p.get("account")
    symbol = p.get("symbol")
    side = p.get("side")
    reserve = p.get("reserve", False)
    coid = p.get("client_order_id")
    # With five required keys and the optional ones counted, the length leaves
    # no room for an unknown key; a missing one reads as None and fails below.
    if (
        len(p) != 5 + ("reserve" in p) + ("client_order_id" in p)
        or type(account) is not str
        or name_match(account) is None
        or type(symbol) is not str
        or name_match(symbol) is None
        or (side != "buy" and side != "sell")
        or type(reserve) is not bool
        # As parse_text(max_len=64, allow_empty=False) of the careful path.
        or (coid is not None and (type(coid) is not str or len(coid) > 64 or not coid.strip()))
    ):
        return None
    qty = _quick_decimal(p.get("qty"), True)
    price = _quick_decimal(p.get("price"), True)
    if qty is None or price is None:
        return None
    params = new_order_validate(account, symbol, side, qty, price, reserve, coid)
    return new_request(obj["id"], "order.validate", params)


def _fast_position_update(frame: bytes | str, obj: dict[str, Any]) -> Request | None:
    p = _flat_params(frame, obj)
    if p is None:
        return None
    account = p.get("account")
    symbol = p.get("symbol")
    seq = p.get("seq")
    release = p.get("release")
    if (
        len(p) != 4 + ("seq" in p) + ("release" in p)
        or type(account) is not str
        or name_match(account) is None
        or type(symbol) is not str
        or name_match(symbol) is None
        or (seq is not None and (type(seq) is not int or not 0 <= seq <= MAX_INT))
        or (
            release is not None
            and (type(release) is not str or len(release) > 64 or not release.strip())
        )
    ):
        return None
    qty = _quick_decimal(p.get("qty"), False)
    price = _quick_decimal(p.get("price"), True)
    if qty is None or price is None:
        return None
    params = new_position_update(account, symbol, qty, price, seq, release)
    return new_request(obj["id"], "position.update", params)


_FAST_PATHS: dict[str, Callable[[bytes | str, dict[str, Any]], Request | None]] = {
    "order.validate": _fast_order_validate,
    "position.update": _fast_position_update,
}


def _read_json(frame: bytes | str) -> Any:
    try:
        return orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        # Still JSON if orjson refused only a number no double holds (1e400).
        obj = _loads_exact(frame)
        if obj is _NOT_JSON:
            raise ProtocolError(ErrorCode.BAD_JSON, f"frame is not valid JSON: {exc}") from None
        return obj


def decode(frame: bytes | str) -> Request:
    """Parse one frame into a ``Request``.

    Raises ``ProtocolError``: ``BAD_JSON`` when the frame is not JSON (or not
    UTF-8), ``BAD_REQUEST`` when the envelope or a parameter is wrong or an
    object repeats a key (``duplicate key "NAME"``),
    ``UNKNOWN_METHOD`` for a method the protocol does not have. The error's
    ``request_id`` is the frame's id when it was usable, else ``None``.
    """
    obj = _read_json(frame)
    if type(obj) is dict:
        method = obj.get("method")
        fast = _FAST_PATHS.get(method) if type(method) is str else None
        if fast is not None and (request := fast(frame, obj)) is not None:
            return request
    return _decode_object(frame, obj)


def _decode_object(frame: bytes | str, obj: Any) -> Request:
    """The careful path of ``decode``, for the frame's parsed JSON ``obj``."""
    if _holds_float(obj):
        # orjson read a number as a binary float: read every number as written.
        exact = _loads_exact(frame)
        if exact is not _NOT_JSON:
            obj = exact
    if not isinstance(obj, dict):
        raise bad_request(f"a request must be a JSON object, was {show(obj)}")
    duplicate = _duplicate_key_error(frame, obj)
    if duplicate is not None:
        raise duplicate
    rid = _request_id(obj)
    try:
        for key in obj:
            if key not in _ENVELOPE_KEYS:
                raise bad_request(f"{key} is not a field of a request (id, method, params)")
        method = obj.get("method")
        if not isinstance(method, str):
            raise bad_request(f"method must be a string, was {show(method)}")
        parser = PARSERS.get(method)
        if parser is None:
            raise ProtocolError(ErrorCode.UNKNOWN_METHOD, f"unknown method {show(method)}")
        return Request(rid, method, parser(method, obj.get("params")))
    except ProtocolError as exc:
        exc.request_id = rid
        raise


def peek_method(frame: bytes | str) -> str | None:
    """The frame's method if it is a JSON object with a string ``method``, else
    None (a connection that has not authenticated is answered ``UNAUTHENTICATED``
    for any method but ``session.auth``, known or not)."""
    try:
        obj = _read_json(frame)
    except ProtocolError:
        return None
    method = obj.get("method") if isinstance(obj, dict) else None
    return method if isinstance(method, str) else None


def peek_id(frame: bytes | str) -> RequestId | None:
    """The frame's id if it has a usable one, else None (for refusals before decoding)."""
    try:
        obj = _read_json(frame)
    except ProtocolError:
        return None
    if not isinstance(obj, dict):
        return None
    if type(obj.get("id")) is float:
        obj = _loads_exact(frame)
        if not isinstance(obj, dict):
            return None
    try:
        return _request_id(obj)
    except ProtocolError:
        return None


def encode_ok(request_id: RequestId | None, result: Mapping[str, Any]) -> bytes:
    try:
        return orjson.dumps({"id": request_id, "status": "ok", "result": result})
    except orjson.JSONEncodeError:
        return orjson.dumps({"id": _wide_id(request_id), "status": "ok", "result": result})


def encode_error(
    request_id: RequestId | None,
    code: ErrorCode,
    message: str,
    details: Mapping[str, Any] | None = None,
) -> bytes:
    error: dict[str, Any] = {"code": code.value, "message": message}
    if details:
        error.update(details)
    try:
        return orjson.dumps({"id": request_id, "status": "error", "error": error})
    except orjson.JSONEncodeError:
        return orjson.dumps({"id": _wide_id(request_id), "status": "error", "error": error})


def _wide_id(request_id: RequestId | None) -> object:
    """An integer id past 64 bits, written with its digits (orjson writes at
    most 64-bit integers); any other id as it is (the error was elsewhere)."""
    if type(request_id) is int:
        return orjson.Fragment(str(request_id).encode())
    return request_id


def encode_push(
    channel: str, seq: int | None, data: Mapping[str, Any], *, snapshot: bool = False
) -> bytes:
    """A push frame. ``seq`` is None only for ``heartbeat``."""
    if seq is None:
        return orjson.dumps({"channel": channel, "data": data})
    if snapshot:
        return orjson.dumps({"channel": channel, "seq": seq, "snapshot": True, "data": data})
    return orjson.dumps({"channel": channel, "seq": seq, "data": data})


def decode_message(frame: bytes | str) -> dict[str, Any]:
    """Client side: parse a response or push into a dict (no checking beyond JSON)."""
    obj = orjson.loads(frame)
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_JSON, "server message is not a JSON object")
    return obj


def encode_request(
    request_id: RequestId, method: str, params: Mapping[str, Any] | None = None
) -> bytes:
    """Client side: one request frame."""
    if params is None:
        return orjson.dumps({"id": request_id, "method": method})
    return orjson.dumps({"id": request_id, "method": method, "params": params})
