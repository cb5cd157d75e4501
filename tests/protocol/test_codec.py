"""The codec: every way a frame can be wrong, and the frames the server writes.

PROTOCOL sections 2, 3, 4 and 7: ``decode`` returns a typed ``Request`` or raises
``ProtocolError`` with the right error code, the frame's id when it was usable,
and a message that names the field.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import (
    METHODS,
    decode,
    encode_error,
    encode_ok,
    encode_push,
    encode_request,
)
from protocol.codes import Channel, ErrorCode, Mode
from protocol.errors import ProtocolError
from protocol.messages import (
    EmergencySet,
    LimitsSet,
    OrderValidate,
    Ping,
    PositionSnapshot,
    PositionUpdate,
    Request,
    SessionHello,
    StateGet,
    Subscribe,
    Unsubscribe,
)

ORDER: dict[str, Any] = {
    "account": "A1",
    "symbol": "BTC-USD",
    "side": "buy",
    "qty": "2",
    "price": "50000",
}


def frame(method: str, params: Any = None, *, rid: Any = 7) -> bytes:
    obj: dict[str, Any] = {"id": rid, "method": method}
    if params is not None:
        obj["params"] = params
    return orjson.dumps(obj)


def order_frame_raw(qty_json: str) -> bytes:
    """An order.validate frame whose qty is spliced in as raw JSON text."""
    return (
        '{"id": 7, "method": "order.validate", "params": {"account": "A1", '
        '"symbol": "BTC-USD", "side": "buy", "price": "1", "qty": ' + qty_json + "}}"
    ).encode()


def fails(data: bytes | str) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(data)
    return info.value


def order_with(**changes: Any) -> bytes:
    return frame("order.validate", {**ORDER, **changes})


# ------------------------------------------------------------------ envelope


@pytest.mark.parametrize(
    "data", [b"", b"not json", b'{"id": 1,', b"\xff\xfe", b'{"id": 1} trailing', "\ud800"]
)
def test_decode_when_frame_is_not_json_then_bad_json_with_null_id(data: bytes | str) -> None:
    error = fails(data)
    assert error.code is ErrorCode.BAD_JSON
    assert error.request_id is None
    assert "JSON" in error.message


def test_decode_when_frame_uses_nan_literal_then_bad_json() -> None:
    error = fails(order_frame_raw("NaN"))
    assert error.code is ErrorCode.BAD_JSON
    assert error.request_id is None


@pytest.mark.parametrize("data", [b"[1, 2]", b'"ping"', b"42", b"null", b"true"])
def test_decode_when_frame_is_not_an_object_then_bad_request_with_null_id(data: bytes) -> None:
    error = fails(data)
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.request_id is None
    assert "must be a JSON object" in error.message


def test_decode_when_id_is_missing_then_bad_request_with_null_id() -> None:
    error = fails(b'{"method": "ping"}')
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.request_id is None
    assert "id is required" in error.message


@pytest.mark.parametrize(
    ("rid", "shown"),
    [(True, "true"), (False, "false"), (1.5, "1.5"), ({}, "an object"), ([1], "an array")],
)
def test_decode_when_id_has_wrong_type_then_bad_request_with_null_id(rid: Any, shown: str) -> None:
    error = fails(frame("ping", rid=rid))
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.request_id is None
    assert error.message.startswith("id must be an integer or a string")
    assert error.message.endswith(f"was {shown}")


def test_decode_when_id_is_null_then_bad_request_with_null_id() -> None:
    error = fails(b'{"id": null, "method": "ping"}')
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.request_id is None


def test_decode_when_id_string_is_65_chars_then_bad_request_with_null_id() -> None:
    error = fails(frame("ping", rid="x" * 65))
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.request_id is None
    assert error.message == "id must be at most 64 characters, was 65"


@pytest.mark.parametrize("rid", ["x" * 64, "", "7", 0, -3, 2**63 - 1])
def test_decode_when_id_is_valid_then_echoed_verbatim(rid: int | str) -> None:
    request = decode(frame("ping", rid=rid))
    assert request.id == rid
    assert type(request.id) is type(rid)


def test_decode_when_top_level_key_is_unknown_then_bad_request_naming_it() -> None:
    error = fails(b'{"id": 3, "method": "ping", "parms": {}}')
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.request_id == 3
    assert error.message.startswith("parms is not a field of a request")


def test_decode_when_method_is_unknown_then_unknown_method_with_id_kept() -> None:
    error = fails(frame("order.submit", {}, rid="abc"))
    assert error.code is ErrorCode.UNKNOWN_METHOD
    assert error.request_id == "abc"
    assert "order.submit" in error.message


@pytest.mark.parametrize("method", [None, 5, ["ping"]])
def test_decode_when_method_is_missing_or_not_a_string_then_bad_request_with_id(
    method: Any,
) -> None:
    obj: dict[str, Any] = {"id": 9}
    if method is not None:
        obj["method"] = method
    error = fails(orjson.dumps(obj))
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.request_id == 9
    assert error.message.startswith("method must be a string")


def test_decode_when_params_is_not_an_object_then_bad_request() -> None:
    error = fails(frame("order.validate", [1, 2]))
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.request_id == 7
    assert error.message == "params must be an object, was an array"


def test_decode_when_params_omitted_for_method_without_params_then_ok() -> None:
    assert decode(b'{"id": 1, "method": "ping"}') == Request(1, "ping", Ping())
    assert decode(b'{"id": 1, "method": "ping", "params": {}}').params == Ping()


def test_decode_when_method_without_params_gets_one_then_bad_request_naming_it() -> None:
    error = fails(frame("ping", {"x": 1}))
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.message.startswith("params.x is not a parameter of ping")


def test_decode_when_frame_is_str_or_bytes_then_same_request() -> None:
    data = frame("order.validate", ORDER)
    assert decode(data) == decode(data.decode())


# ------------------------------------------------------------------ params


def test_decode_when_params_key_is_misspelt_then_bad_request_naming_it() -> None:
    params = {k: v for k, v in ORDER.items() if k != "qty"}
    params["quantity"] = "2"
    error = fails(frame("order.validate", params))
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.request_id == 7
    assert error.message.startswith("params.quantity is not a parameter of order.validate")


def test_decode_when_params_has_extra_key_besides_valid_ones_then_bad_request() -> None:
    error = fails(order_with(quantity="2"))
    assert error.code is ErrorCode.BAD_REQUEST
    assert "params.quantity" in error.message


@pytest.mark.parametrize("missing", ["account", "symbol", "side", "qty", "price"])
def test_decode_when_required_param_is_missing_then_bad_request_naming_it(missing: str) -> None:
    params = {k: v for k, v in ORDER.items() if k != missing}
    error = fails(frame("order.validate", params))
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.request_id == 7
    assert error.message == f"params.{missing} is required for order.validate"


def test_decode_when_order_is_valid_then_typed_request_with_exact_decimals() -> None:
    request = decode(
        frame("order.validate", {**ORDER, "reserve": True, "client_order_id": "c-1"}, rid="r1")
    )
    assert request == Request(
        "r1",
        "order.validate",
        OrderValidate(
            account="A1",
            symbol="BTC-USD",
            side="buy",
            qty=Decimal("2"),
            price=Decimal("50000"),
            reserve=True,
            client_order_id="c-1",
        ),
    )


@pytest.mark.parametrize(
    ("qty", "expected"),
    [
        ('"-2"', 'params.qty must be a positive decimal, was "-2"'),
        ('"0"', 'params.qty must be a positive decimal, was "0"'),
        ("0", "params.qty must be a positive decimal, was 0"),
        ("-1.5", "params.qty must be a positive decimal, was -1.5"),
        ('"abc"', 'params.qty must be a positive decimal string like "12.5", was "abc"'),
        ('"1e5"', 'params.qty must be a positive decimal string like "12.5", was "1e5"'),
        ('" 1"', 'params.qty must be a positive decimal string like "12.5", was " 1"'),
        ('"1."', 'params.qty must be a positive decimal string like "12.5", was "1."'),
        ('".5"', 'params.qty must be a positive decimal string like "12.5", was ".5"'),
        ('"+1"', 'params.qty must be a positive decimal string like "12.5", was "+1"'),
        ('""', 'params.qty must be a positive decimal string like "12.5", was ""'),
        ("true", "params.qty must be a positive decimal, was true"),
        ("null", "params.qty must be a positive decimal, was null"),
        ("[1]", "params.qty must be a positive decimal, was an array"),
        ('{"v": 1}', "params.qty must be a positive decimal, was an object"),
    ],
)
def test_decode_when_qty_is_invalid_then_bad_request_with_message_naming_qty(
    qty: str, expected: str
) -> None:
    error = fails(order_frame_raw(qty))
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.request_id == 7
    assert error.message == expected


def test_decode_when_qty_string_has_33_chars_then_bad_request() -> None:
    qty = "1" * 33
    error = fails(order_with(qty=qty))
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.message.startswith("params.qty must be a positive decimal string")
    # 32 characters is the most a decimal string may have.
    assert decode(order_with(qty="1" * 32)).params.qty == Decimal("1" * 32)  # type: ignore[union-attr]
    assert decode(order_with(qty="0." + "1" * 30)).params.qty == Decimal("0." + "1" * 30)  # type: ignore[union-attr]


def test_decode_when_qty_is_1e400_then_bad_request_naming_qty_with_id_kept() -> None:
    error = fails(order_frame_raw("1e400"))
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.request_id == 7
    assert error.message.startswith("params.qty ")
    assert "decimal string" in error.message


def test_decode_when_id_is_1e400_then_bad_request_with_null_id() -> None:
    error = fails(b'{"id": 1e400, "method": "ping"}')
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.request_id is None
    assert error.message.startswith("id must be an integer or a string")


def test_decode_when_frame_with_huge_number_also_has_lone_surrogate_then_bad_json() -> None:
    error = fails(b'{"id": 1, "method": "ping", "x": [1e400, "\\ud800"]}')
    assert error.code is ErrorCode.BAD_JSON
    assert error.request_id is None


def test_decode_when_qty_is_10000_digit_integer_then_bad_request_naming_qty() -> None:
    error = fails(order_frame_raw("9" * 10_000))
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.request_id == 7
    assert error.message.startswith("params.qty ")
    assert len(error.message) < 300


def test_decode_when_qty_is_a_20_digit_json_number_then_read_with_all_its_digits() -> None:
    # Read as written, never through a binary float.
    qty = decode(order_frame_raw("12345678901234567891.0")).params.qty  # type: ignore[union-attr]
    assert qty == Decimal("12345678901234567891")
    qty = decode(order_frame_raw("12345678901234567891")).params.qty  # type: ignore[union-attr]
    assert qty == Decimal("12345678901234567891")


@pytest.mark.parametrize(
    "number",
    ["1e-400", "1e-31", "1e40", "0.1000000000000000000000000000000001", "1" * 33 + ".5"],
)
def test_decode_when_json_number_needs_more_than_32_characters_then_refused_not_rounded(
    number: str,
) -> None:
    error = fails(order_frame_raw(number))
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.request_id == 7
    assert error.message.startswith("params.qty ")
    assert "32" in error.message


def test_decode_when_json_number_has_digits_no_double_holds_then_read_exactly() -> None:
    qty = decode(order_frame_raw("0.10000000000000000001")).params.qty  # type: ignore[union-attr]
    assert qty == Decimal("0.10000000000000000001")


@pytest.mark.parametrize("digits", [20, 40, 64])
def test_id_when_integer_of_up_to_64_digits_then_echoed_with_the_same_digits(digits: int) -> None:
    rid = int("9" * digits)
    request = decode(b'{"id": ' + str(rid).encode() + b', "method": "ping"}')
    assert request.id == rid
    assert encode_ok(request.id, {}).startswith(b'{"id":' + str(rid).encode() + b",")
    error = fails(b'{"id": -' + str(rid).encode() + b', "method": "no.such"}')
    assert error.request_id == -rid
    answer = encode_error(error.request_id, error.code, error.message)
    assert answer.startswith(b'{"id":-' + str(rid).encode() + b",")


def test_id_when_integer_of_65_digits_then_bad_request_with_null_id() -> None:
    error = fails(b'{"id": ' + b"9" * 65 + b', "method": "ping"}')
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.request_id is None
    assert "64" in error.message


def test_seq_when_past_64_bits_then_bad_request_showing_the_digits() -> None:
    huge = str(2**70)
    raw = (
        '{"id": 7, "method": "position.update", "params": {"account": "A1", '
        '"symbol": "X", "qty": "1", "price": "1", "seq": ' + huge + "}}"
    )
    error = fails(raw)
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.message.startswith("params.seq must be at most")
    assert huge[:20] in error.message and "e+" not in error.message


@pytest.mark.parametrize("digits", [33, 40])
def test_decode_when_qty_is_integer_with_too_many_digits_then_bad_request(digits: int) -> None:
    error = fails(order_frame_raw("1" * digits))
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.message.startswith("params.qty ")


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        ("0.1", Decimal("0.1")),
        ("0.3", Decimal("0.3")),
        ("2.675", Decimal("2.675")),
        ("12", Decimal("12")),
        ("1E2", Decimal("100")),
        ("1.5e-3", Decimal("0.0015")),
        ("9007199254740991", Decimal("9007199254740991")),
    ],
)
def test_decode_when_qty_is_json_number_then_read_by_shortest_decimal_form(
    number: str, expected: Decimal
) -> None:
    qty = decode(order_frame_raw(number)).params.qty  # type: ignore[union-attr]
    assert qty == expected
    assert isinstance(qty, Decimal)


def test_decode_when_qty_is_0_1_then_exactly_one_tenth_not_the_nearest_float() -> None:
    qty = decode(order_frame_raw("0.1")).params.qty  # type: ignore[union-attr]
    assert qty == Decimal("0.1")
    assert qty != Decimal.from_float(0.1)


def test_decode_when_numbers_are_decimal_then_sum_is_exact() -> None:
    a = decode(order_frame_raw("0.1")).params.qty  # type: ignore[union-attr]
    b = decode(order_frame_raw("0.2")).params.qty  # type: ignore[union-attr]
    assert a + b == Decimal("0.3")


@pytest.mark.parametrize("price", ["0", "-1", 0, "x"])
def test_decode_when_price_is_not_positive_decimal_then_bad_request_naming_price(
    price: Any,
) -> None:
    error = fails(order_with(price=price))
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.message.startswith("params.price must be a positive decimal")


@pytest.mark.parametrize("field", ["account", "symbol"])
@pytest.mark.parametrize("value", ["", "A 1", "A1!", "ä", "x" * 65, 5, None, "A1\n"])
def test_decode_when_name_is_invalid_then_bad_request_naming_field(field: str, value: Any) -> None:
    error = fails(order_with(**{field: value}))
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.request_id == 7
    assert error.message.startswith(
        f"params.{field} must be 1 to 64 characters of A-Z a-z 0-9 . _ : / -, was "
    )


@pytest.mark.parametrize("value", ["x" * 64, "a.b_c:d/e-F9", "BTC-USD"])
def test_decode_when_name_uses_allowed_characters_then_accepted(value: str) -> None:
    assert decode(order_with(symbol=value)).params.symbol == value  # type: ignore[union-attr]


@pytest.mark.parametrize("side", ["BUY", "Sell", "long", "", None, 1])
def test_decode_when_side_is_not_buy_or_sell_then_bad_request_naming_side(side: Any) -> None:
    error = fails(order_with(side=side))
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.message.startswith('params.side must be "buy" or "sell", was ')


@pytest.mark.parametrize("side", ["buy", "sell"])
def test_decode_when_side_is_valid_then_kept(side: str) -> None:
    assert decode(order_with(side=side)).params.side == side  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("changes", "prefix"),
    [
        ({"reserve": "yes"}, 'params.reserve must be true or false, was "yes"'),
        ({"reserve": 1}, "params.reserve must be true or false, was 1"),
        ({"client_order_id": ""}, "params.client_order_id must not be empty"),
        ({"client_order_id": "c" * 65}, "params.client_order_id must be at most 64 characters"),
        ({"client_order_id": 5}, "params.client_order_id must be a string, was 5"),
    ],
)
def test_decode_when_optional_order_param_is_invalid_then_bad_request_naming_it(
    changes: dict[str, Any], prefix: str
) -> None:
    error = fails(order_with(**changes))
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.message.startswith(prefix)


# ------------------------------------------------------------- other methods


def test_decode_when_position_update_then_signed_qty_and_optional_fields() -> None:
    params = {"account": "A1", "symbol": "ETH", "qty": "-3.5", "price": 10, "seq": 4}
    request = decode(frame("position.update", {**params, "release": "R1"}))
    assert request.params == PositionUpdate(
        account="A1", symbol="ETH", qty=Decimal("-3.5"), price=Decimal(10), seq=4, release="R1"
    )
    flat = decode(frame("position.update", {**params, "qty": "0"}))
    assert flat.params.qty == Decimal(0)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("changes", "prefix"),
    [
        ({"price": "0"}, "params.price must be a positive decimal"),
        ({"seq": -1}, "params.seq must be at least 0, was -1"),
        ({"seq": "1"}, 'params.seq must be an integer, was "1"'),
        ({"seq": 1.0}, "params.seq must be an integer, was 1.0"),
        ({"release": ""}, "params.release must not be empty"),
    ],
)
def test_decode_when_position_update_param_is_invalid_then_bad_request_naming_it(
    changes: dict[str, Any], prefix: str
) -> None:
    params = {"account": "A1", "symbol": "ETH", "qty": "1", "price": "10", **changes}
    error = fails(frame("position.update", params))
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.message.startswith(prefix)


def test_decode_when_position_snapshot_then_entries_in_order() -> None:
    positions = [
        {"symbol": "A", "qty": "1", "price": "2"},
        {"symbol": "B", "qty": "-1", "price": "3"},
    ]
    request = decode(frame("position.snapshot", {"account": "A1", "positions": positions}))
    assert isinstance(request.params, PositionSnapshot)
    assert [(e.symbol, e.qty, e.price) for e in request.params.positions] == [
        ("A", Decimal(1), Decimal(2)),
        ("B", Decimal(-1), Decimal(3)),
    ]
    empty = decode(frame("position.snapshot", {"account": "A1", "positions": []}))
    assert empty.params.positions == ()  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("positions", "prefix"),
    [
        ({"symbol": "A"}, "params.positions must be an array"),
        ([5], "params.positions[0] must be an object"),
        ([{"symbol": "A", "qty": "1"}], "params.positions[0].price is required"),
        (
            [{"symbol": "A", "qty": "1", "price": "1", "px": 1}],
            "params.positions[0].px is not a field of a position",
        ),
        (
            [{"symbol": "A", "qty": "1", "price": "1"}, {"symbol": "B", "qty": "x", "price": "1"}],
            "params.positions[1].qty must be a decimal",
        ),
        (
            [{"symbol": "A", "qty": "1", "price": "1"}, {"symbol": "A", "qty": "2", "price": "1"}],
            "params.positions[1].symbol A appears twice",
        ),
    ],
)
def test_decode_when_position_snapshot_entry_is_invalid_then_bad_request_naming_it(
    positions: Any, prefix: str
) -> None:
    error = fails(frame("position.snapshot", {"account": "A1", "positions": positions}))
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.message.startswith(prefix)


@pytest.mark.parametrize("mode", ["reducing", "halted"])
@pytest.mark.parametrize("reason", [None, "", "   "])
def test_decode_when_emergency_set_without_reason_then_bad_request(
    mode: str, reason: str | None
) -> None:
    params: dict[str, Any] = {"mode": mode}
    if reason is not None:
        params["reason"] = reason
    error = fails(frame("emergency.set", params))
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.message == f"params.reason is required (non-empty) to set mode {mode}"


def test_decode_when_emergency_set_normal_without_reason_then_ok() -> None:
    request = decode(frame("emergency.set", {"mode": "normal"}))
    assert request.params == EmergencySet(mode=Mode.NORMAL, reason="", account=None)


def test_decode_when_emergency_set_with_account_then_account_kept() -> None:
    request = decode(frame("emergency.set", {"mode": "halted", "reason": "desk", "account": "A7"}))
    assert request.params == EmergencySet(mode=Mode.HALTED, reason="desk", account="A7")


@pytest.mark.parametrize("mode", ["HALTED", "stop", "", None, 2])
def test_decode_when_mode_is_unknown_then_bad_request_naming_mode(mode: Any) -> None:
    error = fails(frame("emergency.set", {"mode": mode, "reason": "x"}))
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.message.startswith('params.mode must be "normal", "reducing" or "halted", was ')


def test_decode_when_emergency_set_account_is_invalid_then_bad_request_naming_it() -> None:
    error = fails(frame("emergency.set", {"mode": "halted", "reason": "x", "account": "a b"}))
    assert error.message.startswith("params.account must be 1 to 64 characters")


def test_decode_when_subscribe_then_channels_deduplicated_and_resume_kept() -> None:
    request = decode(
        frame(
            "subscribe",
            {"channels": ["alerts", "exposure", "alerts"], "resume": {"alerts": 41}},
        )
    )
    assert request.params == Subscribe(
        channels=(Channel.ALERTS, Channel.EXPOSURE), resume={Channel.ALERTS: 41}
    )


@pytest.mark.parametrize(
    ("params", "prefix"),
    [
        ({"channels": []}, "params.channels must be a non-empty array of channel names"),
        ({"channels": "alerts"}, "params.channels must be a non-empty array of channel names"),
        ({"channels": ["alerts", "trades"]}, "params.channels[1] must be one of "),
        ({"channels": [1]}, "params.channels[0] must be one of "),
        ({"channels": ["alerts"], "resume": [1]}, "params.resume must be an object"),
        (
            {"channels": ["alerts"], "resume": {"trades": 1}},
            "params.resume.trades is not a channel",
        ),
        (
            {"channels": ["alerts"], "resume": {"exposure": 1}},
            "params.resume.exposure names a channel not in params.channels",
        ),
        (
            {"channels": ["alerts"], "resume": {"alerts": -1}},
            "params.resume.alerts must be at least 0",
        ),
        (
            {"channels": ["alerts"], "resume": {"alerts": "1"}},
            "params.resume.alerts must be an integer",
        ),
        ({"resume": {}}, "params.channels is required for subscribe"),
    ],
)
def test_decode_when_subscribe_params_are_invalid_then_bad_request_naming_field(
    params: dict[str, Any], prefix: str
) -> None:
    error = fails(frame("subscribe", params))
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.message.startswith(prefix)


def test_decode_when_unsubscribe_then_channels() -> None:
    request = decode(frame("unsubscribe", {"channels": ["decisions"]}))
    assert request.params == Unsubscribe(channels=(Channel.DECISIONS,))
    assert fails(frame("unsubscribe", {"channels": ["nope"]})).message.startswith(
        "params.channels[0] must be one of"
    )


def test_decode_when_limits_set_then_version_and_raw_limits() -> None:
    request = decode(frame("limits.set", {"version": 3, "limits": {"max_exposure": "5"}}))
    assert request.params == LimitsSet(version=3, limits={"max_exposure": "5"})
    assert fails(frame("limits.set", {"version": 3, "limits": []})).message.startswith(
        "params.limits must be an object"
    )
    assert fails(frame("limits.set", {"version": True, "limits": {}})).message.startswith(
        "params.version must be an integer"
    )


def test_decode_when_session_hello_and_state_get_then_optional_params() -> None:
    assert decode(frame("session.hello")).params == SessionHello(cancel_on_disconnect=False)
    hello = decode(frame("session.hello", {"cancel_on_disconnect": True}))
    assert hello.params == SessionHello(cancel_on_disconnect=True)
    assert fails(frame("session.hello", {"cancel_on_disconnect": "y"})).message.startswith(
        "params.cancel_on_disconnect must be true or false"
    )
    assert decode(frame("state.get")).params == StateGet(account=None)
    assert decode(frame("state.get", {"account": "A1"})).params == StateGet(account="A1")


@pytest.mark.parametrize("token", ["", 5, "t" * 513])
def test_decode_when_auth_token_is_invalid_then_bad_request_naming_token(token: Any) -> None:
    error = fails(frame("session.auth", {"token": token}))
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.message.startswith("params.token must be a non-empty string")


def test_decode_when_reservation_release_id_missing_or_empty_then_bad_request() -> None:
    assert fails(frame("reservation.release", {})).message == (
        "params.reservation_id is required for reservation.release"
    )
    assert fails(frame("reservation.release", {"reservation_id": ""})).message == (
        "params.reservation_id must not be empty"
    )


@pytest.mark.parametrize("method", sorted(METHODS))
def test_decode_when_method_is_in_the_protocol_then_never_unknown_method(method: str) -> None:
    try:
        request = decode(frame(method, {}))
    except ProtocolError as exc:
        assert exc.code is ErrorCode.BAD_REQUEST
        assert "is required for " + method in exc.message
    else:
        assert request.method == method


# -------------------------------------------------------------------- encode


def test_encode_ok_when_result_then_id_status_result() -> None:
    result = {"decision": "accept", "exposure": {"account": "500", "global": "0.1"}}
    assert orjson.loads(encode_ok(7, result)) == {"id": 7, "status": "ok", "result": result}
    assert orjson.loads(encode_ok("a", {})) == {"id": "a", "status": "ok", "result": {}}


def test_encode_error_when_code_then_code_string_and_message() -> None:
    data = orjson.loads(encode_error(None, ErrorCode.BAD_JSON, "frame is not valid JSON"))
    assert data == {
        "id": None,
        "status": "error",
        "error": {"code": "BAD_JSON", "message": "frame is not valid JSON"},
    }


def test_encode_error_when_decode_failed_then_frame_carries_the_error_id() -> None:
    error = fails(frame("order.validate", {**ORDER, "qty": "-2"}, rid="q-1"))
    data = orjson.loads(encode_error(error.request_id, error.code, error.message))  # type: ignore[arg-type]
    assert data == {
        "id": "q-1",
        "status": "error",
        "error": {
            "code": "BAD_REQUEST",
            "message": 'params.qty must be a positive decimal, was "-2"',
        },
    }


def test_encode_push_when_event_snapshot_or_heartbeat_then_shapes() -> None:
    assert orjson.loads(encode_push("alerts", 42, {"code": "X"})) == {
        "channel": "alerts",
        "seq": 42,
        "data": {"code": "X"},
    }
    assert orjson.loads(encode_push("alerts", 41, {"alerts": []}, snapshot=True)) == {
        "channel": "alerts",
        "seq": 41,
        "snapshot": True,
        "data": {"alerts": []},
    }
    heartbeat = orjson.loads(encode_push("heartbeat", None, {"ts": "t"}))
    assert heartbeat == {"channel": "heartbeat", "data": {"ts": "t"}}


def test_encode_when_manager_results_hold_decimals_then_they_are_strings() -> None:
    from gateway.core.engine import RiskEngine
    from gateway.core.limits import Limits

    limits = Limits.from_mapping({"max_exposure": "1000", "max_account_exposure": "1000"})
    manager = RiskEngine(limits=limits, now_ms=0)
    update = decode(
        frame("position.update", {"account": "A1", "symbol": "X", "qty": 0.1, "price": "3"})
    ).params
    assert isinstance(update, PositionUpdate)
    result = orjson.loads(encode_ok(1, manager.update_position(update, 0)))["result"]
    assert result == {
        "account": "A1",
        "symbol": "X",
        "qty": "0.1",
        "price": "3",
        "exposure": "0.3",
    }
    order = decode(order_with(qty="2", price="3")).params
    assert isinstance(order, OrderValidate)
    decision = orjson.loads(encode_ok(2, manager.validate(order, 0).to_wire()))["result"]
    assert decision["exposure"] == {
        "account": "0.3",
        "account_limit": "1000",
        "global": "0.3",
        "global_limit": "1000",
    }


def test_encode_request_when_params_then_decode_reads_it_back() -> None:
    data = encode_request(5, "order.validate", ORDER)
    assert decode(data).params == OrderValidate(
        account="A1", symbol="BTC-USD", side="buy", qty=Decimal(2), price=Decimal(50000)
    )
    assert orjson.loads(encode_request("p", "ping")) == {"id": "p", "method": "ping"}


# ---------------------------------------------------------------------- fuzz

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=70)
    | st.sampled_from(["buy", "sell", "normal", "halted", "alerts", "1", "-2", "0.1", "A1"])
)
KEYS = st.sampled_from(
    [
        *ORDER,
        "id",
        "method",
        "params",
        "reserve",
        "client_order_id",
        "seq",
        "release",
        "positions",
        "mode",
        "reason",
        "channels",
        "resume",
        "version",
        "limits",
        "token",
        "reservation_id",
        "cancel_on_disconnect",
    ]
) | st.text(max_size=8)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=8,
)
REQUESTS = st.fixed_dictionaries(
    {
        "id": JSON_SCALARS,
        "method": st.sampled_from(sorted(METHODS)) | st.text(max_size=12),
        "params": st.none() | st.dictionaries(KEYS, JSON_VALUES, max_size=6),
    }
)


def _decode_is_total(data: bytes | str) -> None:
    try:
        request = decode(data)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert exc.message
        # Whatever decode kept as the id can be written back in an error frame.
        encode_error(exc.request_id, exc.code, exc.message)  # type: ignore[arg-type]
    else:
        assert isinstance(request, Request)
        assert request.method in METHODS


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(JSON_VALUES, REQUESTS))
def test_decode_when_given_any_json_value_then_request_or_protocol_error(value: Any) -> None:
    _decode_is_total(json.dumps(value))


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=200))
def test_decode_when_given_any_bytes_then_request_or_protocol_error(data: bytes) -> None:
    _decode_is_total(data)


@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=200))
def test_decode_when_given_any_text_then_request_or_protocol_error(data: str) -> None:
    _decode_is_total(data)


def test_decode_when_params_key_repeated_then_bad_request_naming_it() -> None:
    # orjson keeps the last of two values silently; a risk system must not guess.
    data = order_frame_raw('"1", "qty": "100"')
    error = fails(data)
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.request_id == 7
    assert "qty" in error.message


def test_decode_when_id_repeated_then_bad_request_with_null_id() -> None:
    error = fails(b'{"id": 1, "id": 2, "method": "ping"}')
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.request_id is None


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("reservation_ttl_ms", 10**30),
        ("reservation_ttl_ms", 2**63 - 1),
        ("max_orders_per_second", 2**64),
    ],
)
def test_limits_when_integer_too_large_to_keep_then_bad_request_naming_the_key(
    key: str, value: int
) -> None:
    from gateway.config import ConfigError, Limits

    raw = b'{"id": 3, "method": "limits.set", "params": {"version": 1, "limits": {"'
    raw += key.encode() + b'": ' + str(value).encode() + b"}}}"
    request = decode(raw)
    with pytest.raises(ConfigError) as info:
        Limits.from_mapping(request.params.limits, where="params.limits")  # type: ignore[union-attr]
    assert f"params.limits.{key}" in str(info.value)
