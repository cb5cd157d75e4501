"""Hostile input: every frame is answered with an error, and nothing changes.

Duplicated keys are refused by the codec (orjson alone would keep the last one
silently). Then a storm of more than 10,000 hostile frames over five
concurrent connections to a live gateway: each frame gets exactly one error
response with the code the codec (or the role check) predicts, the
connections stay open, and the state is what it was before.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect

from protocol.codec import decode
from protocol.codes import ErrorCode
from protocol.errors import ProtocolError
from protocol.values import show
from tests.conftest import ADMIN, TRADER, TRADER_B, VIEWER, GatewayFactory

ORDER = {"account": "A1", "symbol": "BTC-USD", "side": "buy", "qty": "2", "price": "50000"}


def refused(frame: bytes | str) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(frame)
    return info.value


# ----------------------------------------------------------- duplicate keys


@pytest.mark.parametrize(
    ("frame", "key", "request_id"),
    [
        ('{"id": 1, "method": "ping", "method": "ping"}', "method", 1),
        ('{"id": 1, "id": 2, "method": "ping"}', "id", None),
        ('{"id": "a", "method": "ping", "params": null, "params": {}}', "params", "a"),
        (
            '{"id": 3, "method": "order.validate", "params": {"account": "A1", "symbol": "X",'
            ' "side": "buy", "qty": "1", "qty": "1000", "price": "1"}}',
            "qty",
            3,
        ),
        # The same key spelt two ways is still the same key.
        (
            '{"id": 4, "method": "state.get", "params": {"account": "A1", "acco\\u0075nt": "A2"}}',
            "account",
            4,
        ),
        # Whitespace before the colon.
        ('{"id" : 5 , "method" : "ping" , "method"\n:\t"ping"}', "method", 5),
        # Deep inside: a position entry, a limits table.
        (
            '{"id": 6, "method": "position.snapshot", "params": {"account": "A1", "positions":'
            ' [{"symbol": "X", "qty": "1", "price": "1", "price": "2"}]}}',
            "price",
            6,
        ),
        (
            '{"id": 7, "method": "limits.set", "params": {"version": 1, "limits":'
            ' {"symbols": {"X": {"max_position": "1", "max_position": "9"}}}}}',
            "max_position",
            7,
        ),
        # A string value full of escaped quotes and colons cannot hide a duplicate.
        ('{"id": 8, "method": "ping", "params": {"a": "\\":\\" :", "a": 1}}', "a", 8),
        # Only a repeated top-level id makes the id ambiguous.
        ('{"id": 9, "method": "ping", "params": {"id": 1, "id": 2}}', "id", 9),
        # An id that is not usable: the error then has a null id.
        ('{"id": true, "method": "ping", "method": "x"}', "method", None),
    ],
)
def test_decode_when_a_key_is_repeated_then_bad_request_naming_it(
    frame: str, key: str, request_id: Any
) -> None:
    for form in (frame, frame.encode()):
        error = refused(form)
        assert error.code is ErrorCode.BAD_REQUEST
        assert error.message == f"duplicate key {show(key)}"
        assert error.request_id == request_id


@pytest.mark.parametrize(
    "frame",
    [
        # Escaped quotes followed by colons inside strings are not keys.
        '{"id": "x\\":", "method": "ping"}',
        '{"id": 1, "method": "state.get", "params": {"account": "A\\" : \\":"}}',
        '{"id" : 1 , "method" :\n"ping"}',
        '{"id": 1, "method": "ping", "params": {}}',
    ],
)
def test_decode_when_no_key_is_repeated_then_no_duplicate_error(frame: str) -> None:
    for form in (frame, frame.encode()):
        try:
            decode(form)
        except ProtocolError as exc:
            assert not exc.message.startswith("duplicate key"), exc.message


def test_decode_when_1000_levels_deep_then_refused_without_crashing() -> None:
    deep = '{"id": 1, "method": "ping", "params": {"a": ' + '{"a": ' * 999 + "1" + "}" * 1000 + "}"
    assert refused(deep).code is ErrorCode.BAD_REQUEST
    # With a string that forces the slow duplicate check, at the same depth.
    tricky = deep.replace('"a": 1', '"a": "\\":"')
    assert refused(tricky).code is ErrorCode.BAD_REQUEST
    arrays = '{"id": 1, "method": "ping", "params": ' + "[" * 1000 + "]" * 1000 + "}"
    assert refused(arrays).code is ErrorCode.BAD_REQUEST
    # Deeper than the JSON reader goes: not JSON, but still an answer.
    assert refused("[" * 30_000 + "]" * 30_000).code is ErrorCode.BAD_JSON


# Strings rich in the characters the key counting looks at.
TRICKY_TEXT = st.text(alphabet='":\\ \t\nab{}[],é', max_size=10)
KEYS = st.one_of(st.sampled_from(["id", "method", "params", "qty", "account"]), TRICKY_TEXT)
VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | TRICKY_TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(KEYS, children, max_size=3),
    max_leaves=10,
)
SEPARATORS = st.sampled_from([":", ": ", " : ", "\n:\t", "\r\n:"])


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    params=st.dictionaries(KEYS, VALUES, min_size=1, max_size=5),
    again=VALUES,
    separator=SEPARATORS,
    ensure_ascii=st.booleans(),
    data=st.data(),
)
def test_decode_when_any_params_repeat_a_key_then_bad_request_naming_it(
    params: dict[str, Any],
    again: Any,
    separator: str,
    ensure_ascii: bool,
    data: st.DataObject,
) -> None:
    key = data.draw(st.sampled_from(sorted(params)))
    pairs = [
        json.dumps(k, ensure_ascii=ensure_ascii)
        + separator
        + json.dumps(v, ensure_ascii=ensure_ascii)
        for k, v in params.items()
    ]
    position = data.draw(st.integers(min_value=0, max_value=len(pairs)))
    pairs.insert(
        position,
        json.dumps(key, ensure_ascii=ensure_ascii)
        + separator
        + json.dumps(again, ensure_ascii=ensure_ascii),
    )
    frame = '{"id": 7, "method": "order.validate", "params": {' + ", ".join(pairs) + "}}"
    for form in (frame, frame.encode()):
        error = refused(form)
        assert (error.code, error.message) == (ErrorCode.BAD_REQUEST, f"duplicate key {show(key)}")
        assert error.request_id == 7


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    value=st.dictionaries(KEYS, VALUES, max_size=5),
    separator=SEPARATORS,
    indent=st.none() | st.integers(min_value=0, max_value=2),
    ensure_ascii=st.booleans(),
)
def test_decode_when_no_key_repeats_then_never_a_duplicate_error(
    value: dict[str, Any], separator: str, indent: int | None, ensure_ascii: bool
) -> None:
    for request in ({"id": 1, "method": "ping", "params": value}, {**value, "id": 2}):
        frame = json.dumps(
            request, separators=(", ", separator), indent=indent, ensure_ascii=ensure_ascii
        )
        for form in (frame, frame.encode()):
            try:
                decode(form)
            except ProtocolError as exc:
                assert "duplicate key" not in exc.message, (frame, exc.message)


# -------------------------------------------------------------- the storm

ALLOWED = {"BAD_JSON", "BAD_REQUEST", "UNKNOWN_METHOD", "FORBIDDEN"}
CONNECTIONS = 5
FRAMES_PER_CONNECTION = 2_100
BIG = "A" * 65_536  # 64 KiB: under max_message_bytes (128 KiB) in this test
HUGE_INT = "9" * 10_000

BASES: dict[str, dict[str, Any]] = {
    "session.auth": {"token": "x"},
    "session.hello": {"cancel_on_disconnect": True},
    "position.update": {
        "account": "A1",
        "symbol": "S",
        "qty": "1",
        "price": "1",
        "seq": 1,
        "release": "r",
    },
    "position.snapshot": {
        "account": "A1",
        "positions": [{"symbol": "S", "qty": "1", "price": "1"}],
        "seq": 1,
    },
    "price.update": {"symbol": "S", "price": "1"},
    "order.validate": {**ORDER, "reserve": True, "client_order_id": "c"},
    "reservation.release": {"reservation_id": "r"},
    "emergency.set": {"mode": "halted", "reason": "x", "account": "A1"},
    "state.get": {"account": "A1"},
    "limits.set": {"version": 1, "limits": {}},
    "subscribe": {"channels": ["alerts"], "resume": {"alerts": 0}},
    "unsubscribe": {"channels": ["alerts"]},
}
NAME_WRONG = [1, True, 1.5, [], {}, "", "bad name", "A" * 65, None, BIG]
DECIMAL_WRONG = [True, "abc", "1e5", "", [], {}, "1" * 33, "NaN", None, BIG, "0x10"]
WRONG: dict[str, list[Any]] = {
    "token": [1, "", "x" * 513, [], {}, True, None],
    "cancel_on_disconnect": ["true", 1, [], {}, 0.0],
    "account": NAME_WRONG,
    "symbol": NAME_WRONG,
    "qty": DECIMAL_WRONG,
    "price": [*DECIMAL_WRONG, "0", "-1", 0, -5],
    "seq": [-1, 1.5, "1", True, [], {}],
    "release": [1, "", [], {}, "x" * 65, True],
    "positions": [
        {},
        "x",
        1,
        [1],
        [{"symbol": 1, "qty": "1", "price": "1"}],
        [{"symbol": "S"}],
        [{"symbol": "S", "qty": "1", "price": "1", "x": 1}],
        None,
    ],
    "side": ["BUY", 1, True, [], {}, "", None],
    "reserve": ["true", 1, [], {}, 0],
    "client_order_id": [1, "", [], {}, "x" * 65, True],
    "reservation_id": [1, "", [], {}, "x" * 65, True, None],
    "mode": ["HALTED", 1, True, [], {}, "", None],
    "reason": [1, [], {}, "x" * 513, True],
    "version": [-1, 1.5, "1", True, [], {}, None],
    "limits": [[], "x", 1, True, None],
    "channels": [[], "alerts", ["nope"], [1], {}, None, True],
    "resume": [[], {"nope": 1}, {"alerts": -1}, {"alerts": "x"}, "x", 1],
}


@dataclass(frozen=True, slots=True)
class Hostile:
    data: bytes
    text: bool  # sent as a text frame (else binary)
    code: str  # the error code it must get
    request_id: Any  # the id the error must carry


def request(rid: Any, method: Any, params: Any = None) -> bytes:
    frame: dict[str, Any] = {"id": rid, "method": method}
    if params is not None:
        frame["params"] = params
    return orjson.dumps(frame)


def wrong_type_frames() -> list[bytes]:
    """Every parameter of every method, with values of the wrong type or shape."""
    frames = []
    for method, base in BASES.items():
        for param in base:
            for value in WRONG[param]:
                frame = request(len(frames), method, {**base, param: value})
                try:
                    decode(frame)
                except ProtocolError:
                    frames.append(frame)
                else:  # null for an optional parameter means "not given"
                    assert value is None, (method, param, value)
        for params in ([], "x", 1, True, {"unknown_param": 1}):
            frames.append(request(len(frames), method, params))
    return frames


def fixed_frames() -> list[bytes]:
    """One of each kind of hostile frame (parse failures of every sort)."""
    frames: list[bytes | str] = [
        # Deep nesting.
        '{"id": 1, "method": "ping", "params": ' + "[" * 1000 + "]" * 1000 + "}",
        '{"id": 2, "method": "ping", "params": ' + '{"a": ' * 1000 + "1" + "}" * 1000 + "}",
        '{"id": 3, "method": "ping", "params": {"a": ' + '{"a": ' * 999 + '"\\":"' + "}" * 1001,
        "[" * 30_000 + "]" * 30_000,
        '{"id": ' + "[" * 1000 + "]" * 1000 + ', "method": "ping"}',
        # Numbers no double can hold.
        '{"id": 4, "method": "order.validate", "params": {"account": "A1", "symbol": "X",'
        ' "side": "buy", "qty": 1e400, "price": "1"}}',
        '{"id": 5, "method": "position.update", "params": {"account": "A1", "symbol": "X",'
        ' "qty": -1e400, "price": "1"}}',
        '{"id": 1e400, "method": "ping"}',
        '{"id": 6, "method": "order.validate", "params": {"account": "A1", "symbol": "X",'
        f' "side": "buy", "qty": {HUGE_INT}, "price": "1"}}}}',
        '{"id": ' + HUGE_INT + ', "method": "ping"}',
        '{"id": 7, "method": "limits.set", "params": {"version": ' + HUGE_INT + ', "limits": {}}}',
        '{"id": 8, "method": "position.update", "params": {"account": "A1", "symbol": "X",'
        ' "qty": "1", "price": "1", "seq": -' + HUGE_INT + "}}",
        # NaN and infinities are not JSON.
        '{"id": 9, "method": "order.validate", "params": {"account": "A1", "symbol": "X",'
        ' "side": "buy", "qty": NaN, "price": "1"}}',
        '{"id": 10, "method": "price.update", "params": {"symbol": "X", "price": Infinity}}',
        '{"id": -Infinity, "method": "ping"}',
        '{"id": NaN, "method": "ping"}',
        # Ids that are not ids.
        *(
            request(rid, "ping")
            for rid in (True, False, 1.5, -0.0, {}, [], None, {"id": 1}, [1], "x" * 65, BIG)
        ),
        b'{"method": "ping"}',
        # 64 KiB strings everywhere.
        request(11, BIG),
        request(12, "order.validate", {**ORDER, "account": BIG}),
        request(13, "order.validate", {**ORDER, "symbol": BIG}),
        request(14, "order.validate", {**ORDER, "qty": BIG}),
        request(15, "order.validate", {**ORDER, "client_order_id": BIG}),
        request(16, "order.validate", {**ORDER, BIG: 1}),
        request(17, "session.auth", {"token": BIG}),
        request(18, "emergency.set", {"mode": "halted", "reason": BIG}),
        orjson.dumps({"id": 19, "method": "ping", BIG: 1}),
        # Duplicated keys.
        '{"id": 20, "method": "ping", "method": "ping"}',
        '{"id": 21, "id": 21, "method": "ping"}',
        '{"id": 22, "method": "order.validate", "params": {"account": "A1", "symbol": "X",'
        ' "side": "buy", "side": "sell", "qty": "1", "price": "1"}}',
        '{"id": 23, "method": "state.get", "params": {"account": "A1", "acco\\u0075nt": "A2"}}',
        '{"id": 24, "method" : "ping", "params": {}, "params" : {}}',
        # Not objects.
        b"[]",
        b'"ping"',
        b"1",
        b"null",
        b"",
        b"   ",
        # Truncated and malformed JSON.
        b'{"id": 25, "method": "ping"',
        b'{"id": 26, "method": "ping",}',
        b"{'id': 27, 'method': 'ping'}",
        b'{"id": 28 "method": "ping"}',
        b'\xef\xbb\xbf{"id": 29, "method": "ping"}',  # a BOM
        b'{"id": 30, "method": "ping"}{"id": 31, "method": "ping"}',
        b'{"id": 32, "method": "\\ud800"}',  # a lone surrogate
        b"\x00" * 16,
    ]
    return [f.encode() if isinstance(f, str) else f for f in frames]


def unknown_methods(rng: random.Random) -> list[bytes]:
    names: list[Any] = [
        "",
        "ORDER.VALIDATE",
        "order.validate ",
        " ping",
        "__proto__",
        "constructor",
        "session.auth\x00",
        "order.validatE",
        "a" * 64,
        1,
        True,
        None,
        [],
        {},
    ]
    names += ["".join(rng.choices("abcdefgh.", k=rng.randint(1, 20))) for _ in range(20)]
    return [request(i, name) for i, name in enumerate(names)]


def forbidden_frames(token: str) -> list[bytes]:
    """Well-formed requests this caller may not make: refused by role, not by parsing."""
    a1_update = {"account": "A1", "symbol": "S", "qty": "5", "price": "10"}
    if token == VIEWER:
        return [
            request(1, "position.update", a1_update),
            request(2, "order.validate", ORDER),
            request(3, "price.update", {"symbol": "S", "price": "1"}),
            request(4, "reservation.release", {"reservation_id": "r"}),
            request(5, "emergency.set", {"mode": "halted", "reason": "storm"}),
            request(6, "limits.set", {"version": 1, "limits": {"max_exposure": "1"}}),
            request(7, "position.snapshot", {"account": "A1", "positions": []}),
        ]
    other = "A1" if token == TRADER_B else "B1"
    return [
        request(1, "position.update", {**a1_update, "account": other}),
        request(2, "order.validate", {**ORDER, "account": other, "reserve": True}),
        request(3, "position.snapshot", {"account": other, "positions": []}),
        request(4, "state.get", {"account": other}),
        request(5, "emergency.set", {"mode": "halted", "reason": "storm"}),
        request(6, "limits.set", {"version": 1, "limits": {"max_exposure": "1"}}),
    ]


def expected(frame: bytes, text: bool) -> Hostile:
    """What the codec says about a frame that must not parse."""
    try:
        decode(frame)
    except ProtocolError as exc:
        return Hostile(frame, text, exc.code.value, exc.request_id)
    raise AssertionError(f"not hostile: {frame[:200]!r}")


def storm_frames(token: str, seed: int) -> list[Hostile]:
    rng = random.Random(seed)
    parsing = fixed_frames() + wrong_type_frames() + unknown_methods(rng)
    pool = [expected(frame, text=True) for frame in parsing]
    pool += [expected(frame, text=False) for frame in parsing[::7]]
    pool += [
        Hostile(frame, True, "FORBIDDEN", orjson.loads(frame)["id"])
        for frame in forbidden_frames(token)
    ]
    frames = list(pool)
    while len(frames) < FRAMES_PER_CONNECTION:
        kind = rng.random()
        if kind < 0.2:
            # Random garbage, in text and binary frames alike.
            garbage = rng.randbytes(rng.randint(1, 512))
            frames.append(expected(garbage, text=rng.random() < 0.5))
        elif kind < 0.3:
            # Invalid UTF-8 inside an otherwise fine request.
            bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
            frame = b'{"id": 1, "method": "ping", "params": {"x": "' + bad + b'"}}'
            frames.append(expected(frame, text=rng.random() < 0.5))
        else:
            frames.append(rng.choice(pool))
    rng.shuffle(frames)
    return frames


async def run_storm(url: str, token: str, frames: list[Hostile]) -> list[dict[str, Any]]:
    """Send every frame on one connection; return the responses, in order."""
    ws = await connect(
        url, additional_headers={"Authorization": f"Bearer {token}"}, compression=None
    )
    responses: list[dict[str, Any]] = []

    async def read(count: int) -> None:
        while len(responses) < count:
            message = orjson.loads(await ws.recv())
            if "channel" not in message:  # pushes (emergency, heartbeat) are not answers
                responses.append(message)

    try:
        reader = asyncio.create_task(read(len(frames)))
        for frame in frames:
            await ws.send(frame.data, text=frame.text)
        await reader
        # Exactly one answer per frame: the next answer is the ping's.
        await ws.send(orjson.dumps({"id": "after-storm", "method": "ping"}))
        await read(len(frames) + 1)
        assert ws.close_code is None
        return responses
    finally:
        await ws.close()


async def test_storm_when_10000_hostile_frames_on_5_connections_then_all_answered_state_unchanged(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(
        server={"max_message_bytes": 131_072}, limits={"reservation_ttl_ms": 3_600_000}
    )
    admin = await gw.client(ADMIN)
    await admin.ok("position.update", {"account": "A1", "symbol": "S", "qty": "3", "price": "10"})
    await admin.ok("position.update", {"account": "B1", "symbol": "T", "qty": "-2", "price": "5"})
    await admin.ok("order.validate", {**ORDER, "reserve": True, "client_order_id": "keep"})
    before = await admin.ok("state.get")
    limits_before = await admin.ok("limits.get")

    tokens = [TRADER, TRADER, TRADER_B, VIEWER, TRADER]
    plans = [storm_frames(token, seed) for seed, token in enumerate(tokens)]
    assert sum(len(plan) for plan in plans) >= 10_000
    async with asyncio.timeout(240):
        results = await asyncio.gather(
            *(run_storm(gw.url, token, plan) for token, plan in zip(tokens, plans, strict=True))
        )

    for plan, responses in zip(plans, results, strict=True):
        answers, last = responses[:-1], responses[-1]
        assert len(answers) == len(plan)
        for i, (frame, response) in enumerate(zip(plan, answers, strict=True)):
            assert response["status"] == "error", (i, frame.data[:120], response)
            code = response["error"]["code"]
            assert code in ALLOWED, (i, frame.data[:120], response)
            assert code == frame.code, (i, frame.data[:120], response)
            assert response["id"] == frame.request_id, (i, frame.data[:120], response)
        assert last["id"] == "after-storm" and last["status"] == "ok"

    # Nothing changed, and the gateway still decides.
    assert await admin.ok("state.get") == before
    assert await admin.ok("limits.get") == limits_before
    trader = await gw.client(TRADER)
    decision = await trader.ok("order.validate", ORDER)
    assert decision["decision"] == "accept"
    assert await admin.ok("state.get") == before
