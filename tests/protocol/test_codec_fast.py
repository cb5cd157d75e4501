"""The codec's fast paths: the same results and errors as the careful path.

``decode`` reads well-formed ``order.validate`` and ``position.update`` frames
with a dedicated reader and leaves anything else to the careful path. Whatever
the frame, well-formed or not, ``decode`` must answer exactly what the careful
path alone answers: the same request (same types, same decimal digits), or the
same error code, message and id.
"""

from __future__ import annotations

import json
import re
from dataclasses import FrozenInstanceError, dataclass
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from protocol import codec
from protocol.codec import decode
from protocol.errors import ProtocolError
from protocol.messages import (
    OrderValidate,
    PositionUpdate,
    Request,
    _slot_setters,
    new_order_validate,
    new_position_update,
    new_request,
)


def careful(frame: bytes | str) -> Request:
    """``decode`` without its fast paths."""
    return codec._decode_object(frame, codec._read_json(frame))


def outcome(decoder: Any, frame: bytes | str) -> tuple[Any, ...]:
    try:
        request = decoder(frame)
    except ProtocolError as exc:
        return ("error", exc.code, exc.message, exc.request_id, type(exc.request_id))
    # repr shows every field with its type and a decimal's exact digits and sign.
    return ("ok", repr(request), type(request.id), request)


def assert_same(frame: bytes | str) -> None:
    assert outcome(decode, frame) == outcome(careful, frame), frame


@dataclass(frozen=True)
class Raw:
    """A value spliced into a frame as JSON text, for numbers json.dumps cannot write."""

    text: str


def render(value: Any, separator: str, ensure_ascii: bool, comma: str = ", ") -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, list) and value and isinstance(value[0], tuple):
        # An object as a list of pairs, so that it can repeat a key.
        return (
            "{"
            + comma.join(
                json.dumps(key, ensure_ascii=ensure_ascii)
                + separator
                + render(item, separator, ensure_ascii, comma)
                for key, item in value
            )
            + "}"
        )
    return json.dumps(value, ensure_ascii=ensure_ascii, separators=(comma, separator))


NAMES = st.sampled_from(["A1", "BTC-USD", "desk:1", "a.b_c:d/e-F9", "x" * 64]) | st.from_regex(
    r"[A-Za-z0-9._:/-]{1,64}", fullmatch=True
)
DECIMAL_STRINGS = st.sampled_from(
    ["0", "-0", "0.0", "007", "1.50", "-2", "1" * 32, "1" * 33, "0." + "0" * 29 + "1"]
) | st.from_regex(r"-?[0-9]{1,20}(\.[0-9]{1,12})?", fullmatch=True)
PLAIN_DECIMALS = st.from_regex(r"[1-9][0-9]{0,10}(\.[0-9]{1,8})?", fullmatch=True)
NUMBERS = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(
        [Raw("1e400"), Raw("-1e400"), Raw("9" * 40), Raw("1E2"), Raw("-0.0"), Raw("0.1")]
    )
)
# Mostly plain positive decimals, often the edge cases of either kind.
DECIMALS = st.one_of(PLAIN_DECIMALS, PLAIN_DECIMALS, DECIMAL_STRINGS | NUMBERS)
WRONG = (
    st.none()
    | st.booleans()
    | st.text(alphabet='ab: "\\-.09é', max_size=8)
    | st.sampled_from(["", " ", "buy ", "BUY", "x" * 65, "a b", [], {}, [1], {"v": 1}])
)
TEXTS = st.text(alphabet='ab: "\\\t.-é', max_size=70)
BAD_NAMES = st.sampled_from(["", "a b", "A1!", "ä", "x" * 65, "A1\n", 5, None])
BAD_DECIMALS = st.sampled_from(
    [
        *("-2", "0", "-0", "0.00", "1e5", " 1", "1.", ".5", "+1", "", "1" * 33, "NaN"),
        *(0, -1.5, True, None, Raw("1e400"), Raw("9" * 40), float(2**60)),
    ]
)
BAD_TEXTS = st.sampled_from(["", " ", "\t", "c" * 65, 5, False, []])

# Per method: key -> (valid values, values just wrong, required).
Shape = dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any], bool]]
SHAPES: dict[str, Shape] = {
    "order.validate": {
        "account": (NAMES, BAD_NAMES, True),
        "symbol": (NAMES, BAD_NAMES, True),
        "side": (st.sampled_from(["buy", "sell"]), st.sampled_from(["BUY", "Sell", "", 1]), True),
        "qty": (DECIMALS, BAD_DECIMALS, True),
        "price": (DECIMALS, BAD_DECIMALS, True),
        "reserve": (st.booleans(), st.sampled_from(["yes", 1, 0, None]), False),
        "client_order_id": (st.none() | TEXTS, BAD_TEXTS, False),
    },
    "position.update": {
        "account": (NAMES, BAD_NAMES, True),
        "symbol": (NAMES, BAD_NAMES, True),
        "qty": (DECIMALS, BAD_DECIMALS, True),
        "price": (DECIMALS, BAD_DECIMALS, True),
        "seq": (
            st.none() | st.integers(min_value=0, max_value=2**64 - 1),
            st.sampled_from([-1, -(2**63), "1", 1.0, True, Raw("1e400")]),
            False,
        ),
        "release": (st.none() | TEXTS, BAD_TEXTS, False),
    },
}
IDS = (
    st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.text(max_size=66)
    | st.sampled_from([True, 1.5, None, [1], {}, Raw("1e400")])
)
SEPARATORS = st.sampled_from([":", ": ", " : ", "\n:\t"])


FAULTS = ("missing", "wrong", "unknown", "repeated", "id", "params", "no envelope key", "parms")


@st.composite
def frames(draw: st.DrawFn) -> bytes | str:
    """Frames of the fast-path methods: well-formed, or with one fault (rarely more)."""
    method = draw(st.sampled_from(sorted(SHAPES)))
    shape = SHAPES[method]
    # A value just wrong is the fault with most variants: it is drawn most.
    first = st.sampled_from(("wrong", "wrong", "wrong", *FAULTS))
    faults = {draw(first)} if draw(st.booleans()) else set()
    # Hypothesis favours boundary draws; a seeded Random keeps second faults rare.
    rng = draw(st.randoms(use_true_random=True))
    faults |= {fault for fault in FAULTS if rng.random() < 0.01}
    spoilt = draw(st.sampled_from(sorted(shape)))

    params: list[tuple[str, Any]] = []
    for key, (valid, bad, required) in shape.items():
        if (key == spoilt and "missing" in faults) or (not required and draw(st.booleans())):
            continue
        if key == spoilt and "wrong" in faults:
            params.append((key, draw(st.one_of(bad, bad, WRONG))))
        else:
            params.append((key, draw(valid)))
    if "unknown" in faults:
        key = draw(st.sampled_from(["quantity", "id", "", "seq", "reserve"]))
        params.insert(draw(st.integers(0, len(params))), (key, draw(WRONG)))
    if params and "repeated" in faults:
        key = draw(st.sampled_from([key for key, _ in params]))
        params.insert(draw(st.integers(0, len(params))), (key, draw(WRONG | NAMES)))
    envelope: list[tuple[str, Any]] = [
        ("id", draw(IDS) if "id" in faults else draw(st.integers(0, 10**6) | st.text(max_size=8))),
        ("method", method),
        ("params", draw(WRONG) if "params" in faults else params),
    ]
    if "no envelope key" in faults:
        envelope.pop(draw(st.integers(0, 2)))
    if "parms" in faults:
        envelope.insert(draw(st.integers(0, len(envelope))), ("parms", {}))
    comma = draw(st.sampled_from([",", ", "]))
    text = render(envelope, draw(SEPARATORS), draw(st.booleans()), comma)
    return text.encode() if draw(st.booleans()) else text


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames())
def test_decode_when_any_frame_of_a_fast_method_then_same_outcome_as_careful_path(
    frame: bytes | str,
) -> None:
    assert_same(frame)
    obj = codec._read_json(frame)
    fast = codec._FAST_PATHS.get(obj.get("method")) if isinstance(obj, dict) else None
    taken = fast is not None and fast(frame, obj) is not None
    event("fast path" if taken else "careful path")
    # The fast path declines only frames that the careful path refuses, frames
    # whose string values look like key ends (``"symbol": ":"``) to the count,
    # and numbers with a fraction or an exponent (read exactly by the careful path).
    if (
        not taken
        and codec._repeats_no_key(frame, codec._count_keys(obj))
        and not codec._holds_float(obj)
    ):
        with pytest.raises(ProtocolError):
            careful(frame)


@pytest.mark.parametrize(
    "frame",
    [
        b'{"id":1,"method":"order.validate","params":{"account":"A1","symbol":"BTC-USD",'
        b'"side":"buy","qty":"2","price":"50000"}}',
        '{"id": "r-1", "method": "order.validate", "params": {"account": "A1", "symbol": "X",'
        ' "side": "sell", "qty": 2, "price": "0.1", "reserve": true, "client_order_id": "c:1"}}',
        b'{"params":{"symbol":"ETH","qty":"-3.5","price":10,"account":"desk:1","seq":4,'
        b'"release":"R1"},"method":"position.update","id":7}',
        b'{"id": 2, "method": "position.update", "params": {"account": "A1", "symbol": "ETH",'
        b' "qty": "0", "price": "1", "seq": null, "release": null}}',
    ],
)
def test_fast_path_when_frame_is_well_formed_then_it_decodes_it(frame: bytes | str) -> None:
    obj = orjson.loads(frame)
    request = codec._FAST_PATHS[obj["method"]](frame, obj)
    assert request is not None
    assert repr(request) == repr(careful(frame))


# Strings rich in the characters the key counting looks at.
TRICKY = st.text(alphabet='":\\ \t\nab{}[],é', max_size=10)
TREES = st.recursive(
    st.none() | st.integers() | TRICKY,
    lambda children: (
        st.lists(children, max_size=3)
        | st.lists(st.tuples(TRICKY | st.sampled_from(["a", "qty"]), children), max_size=3)
    ),
    max_leaves=10,
)
_KEY_END_TEXT = re.compile(r'"\s*:')


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tree=st.lists(st.tuples(TRICKY, TREES), max_size=4),
    separator=SEPARATORS,
    ensure_ascii=st.booleans(),
)
def test_repeats_no_key_when_any_object_then_agrees_with_counting_key_ends(
    tree: list[tuple[str, Any]], separator: str, ensure_ascii: bool
) -> None:
    text = render(tree, separator, ensure_ascii) if tree else "{}"
    obj = json.loads(text)
    keys = codec._count_keys(obj)
    by_key_ends = len(_KEY_END_TEXT.findall(text)) == keys
    assert codec._repeats_no_key(text, keys) == by_key_ends
    assert codec._repeats_no_key(text.encode(), keys) == by_key_ends


# ----------------------------------------------------------------- builders


def test_builders_when_given_values_then_same_objects_as_the_constructors() -> None:
    order = new_order_validate("A1", "X", "sell", Decimal("1.50"), Decimal(2), True, "c")
    assert order == OrderValidate(
        account="A1",
        symbol="X",
        side="sell",
        qty=Decimal("1.50"),
        price=Decimal(2),
        reserve=True,
        client_order_id="c",
    )
    update = new_position_update("A1", "X", Decimal("-1"), Decimal(3), None, "R")
    assert update == PositionUpdate(
        account="A1", symbol="X", qty=Decimal(-1), price=Decimal(3), release="R"
    )
    request = new_request("r", "order.validate", order)
    assert request == Request("r", "order.validate", order)
    assert hash(request) == hash(Request("r", "order.validate", order))
    with pytest.raises(FrozenInstanceError):
        order.qty = Decimal(5)  # type: ignore[misc]


def test_slot_setters_when_names_differ_from_the_fields_then_type_error() -> None:
    with pytest.raises(TypeError, match="PositionUpdate has fields"):
        _slot_setters(PositionUpdate, "account", "symbol", "price", "qty", "seq", "release")
