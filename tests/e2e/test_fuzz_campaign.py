"""Fuzz campaign: no input a client can send gets ``INTERNAL``, a traceback, or
changes anything when it is answered with an error (PROTOCOL sections 3, 4, 7).

- The codec, with hypothesis, on numbers at and past the bounds: a request or
  a ``ProtocolError``, and an accepted decimal is exactly the number sent.
- The manager, with hypothesis, on requests whose values span the whole
  accepted range (32-digit quantities at 32-digit prices beside positions of
  1e-30): only ``ProtocolError``, a request refused changes nothing, and the
  state always survives a snapshot and a replay.
- A seeded mutation fuzzer over a real socket: 20,000 frames made by mutating
  valid requests of every method (bytes flipped, cut and inserted, values
  swapped for nasty ones, keys dropped and added, ids of every kind, binary
  frames, invalid UTF-8) from every role and an unauthenticated connection.
  Every frame gets exactly one answer, never ``INTERNAL``; the gateway logs
  no error; and a frame answered with an error changes nothing, in memory or
  in the journal.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gateway.config import Limits
from gateway.core.engine import RiskEngine
from protocol import codec
from protocol.codes import Mode
from protocol.errors import ProtocolError
from protocol.messages import (
    EmergencySet,
    OrderValidate,
    PositionEntry,
    PositionSnapshot,
    PositionUpdate,
    PriceUpdate,
)
from tests.conftest import ADMIN, FEED, TRADER, VIEWER, GatewayFactory, RunningGateway

T0 = 1_700_000_000_000

# ------------------------------------------------------------------ the codec

DIGITS = st.text("0123456789", min_size=1, max_size=40)
NUMBER_TEXT = st.one_of(
    DIGITS,
    st.builds(lambda a, b: f"{a}.{b}", DIGITS, DIGITS),
    st.builds(lambda a, e: f"{a}e{e}", DIGITS, st.integers(-500, 500)),
    st.builds(lambda a, b, e: f"-{a}.{b}E{e}", DIGITS, DIGITS, st.integers(-60, 60)),
)


@settings(max_examples=600, deadline=None)
@given(number=NUMBER_TEXT, as_string=st.booleans(), field=st.sampled_from(["qty", "price"]))
def test_codec_when_numbers_at_and_past_the_bounds_then_exact_or_refused(
    number: str, as_string: bool, field: str
) -> None:
    value = f'"{number}"' if as_string else number
    params = {"account": "A1", "symbol": "X", "side": "buy", "qty": "1", "price": "1"}
    frame = orjson.dumps({"id": 1, "method": "order.validate", "params": params})
    frame = frame.replace(f'"{field}":"1"'.encode(), f'"{field}":{value}'.encode())
    try:
        request = codec.decode(frame)
    except ProtocolError as exc:
        assert exc.code.value in ("BAD_REQUEST", "BAD_JSON"), exc
        return
    got = getattr(request.params, field)
    assert got == Decimal(number), (number, got)
    assert len(codec.encode_ok(1, {"v": str(got)})) < 200


# ---------------------------------------------------------------- the manager

HUGE = "9" * 32
TINY = "0." + "0" * 29 + "1"
DECIMALS = st.one_of(
    st.sampled_from([HUGE, TINY, "1", "0.5", "12345678901234567.890123456789012", "7"]),
    st.decimals(min_value=-(10**20), max_value=10**20, places=8, allow_nan=False).map(
        lambda d: format(d, "f")
    ),
)
POSITIVE = DECIMALS.filter(lambda text: Decimal(text) > 0)
ACCOUNTS = st.sampled_from(["A1", "A2"])
SYMBOLS = st.sampled_from(["X", "Y", "Z"])


def fingerprint(m: RiskEngine) -> Any:
    return (m.snapshot(), m.state_view(), m.limits_view())


@st.composite
def operations(draw: st.DrawFn, m: RiskEngine) -> Any:
    kind = draw(st.sampled_from(["pos", "snap", "order", "release", "price", "mode", "limits"]))
    live = sorted(m.reservations)
    if kind == "pos":
        release = draw(st.sampled_from([None, "R-unknown", *live]))
        return lambda: m.update_position(
            PositionUpdate(
                account=draw(ACCOUNTS),
                symbol=draw(SYMBOLS),
                qty=Decimal(draw(DECIMALS)),
                price=Decimal(draw(POSITIVE)),
                release=release,
            ),
            T0,
        )
    if kind == "snap":
        entries = draw(st.dictionaries(SYMBOLS, st.tuples(DECIMALS, POSITIVE), max_size=3))
        return lambda: m.snapshot_positions(
            PositionSnapshot(
                account=draw(ACCOUNTS),
                positions=tuple(
                    PositionEntry(symbol=s, qty=Decimal(q), price=Decimal(p))
                    for s, (q, p) in entries.items()
                ),
            ),
            T0,
        )
    if kind == "order":
        return lambda: m.validate(
            OrderValidate(
                account=draw(ACCOUNTS),
                symbol=draw(SYMBOLS),
                side=draw(st.sampled_from(["buy", "sell"])),
                qty=Decimal(draw(POSITIVE)),
                price=Decimal(draw(POSITIVE)),
                reserve=draw(st.booleans()),
                client_order_id=draw(st.sampled_from([None, "c1", "c2"])),
            ),
            T0,
        )
    if kind == "release":
        rid = draw(st.sampled_from(["R-unknown", *live]))
        return lambda: m.release_reservation(rid, "released", T0)
    if kind == "price":
        return lambda: m.update_price(
            PriceUpdate(symbol=draw(SYMBOLS), price=Decimal(draw(POSITIVE))), T0
        )
    if kind == "mode":
        mode = draw(st.sampled_from(list(Mode)))
        return lambda: m.set_emergency(
            EmergencySet(
                mode=mode,
                reason="" if mode is Mode.NORMAL else "fuzz",
                account=draw(st.sampled_from([None, "A1"])),
            ),
            "fuzz",
            T0,
        )
    key = draw(st.sampled_from(["max_exposure", "max_position", "max_order_notional"]))
    version = m.limits_view()["version"] + draw(st.sampled_from([0, 0, 0, 1]))

    def change_limits() -> None:
        record = m.prepare_limits(version, {key: draw(POSITIVE)}, "fuzz", T0)
        if record is not None:
            m.apply_record(record)

    return change_limits


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_manager_when_requests_span_the_accepted_range_then_only_protocol_errors(
    data: st.DataObject,
) -> None:
    m = RiskEngine(
        limits=Limits.from_mapping({"max_exposure": HUGE, "max_account_exposure": HUGE}),
        now_ms=T0,
        max_symbols_per_account=2,
        max_reservations_per_account=3,
    )
    records: list[dict[str, Any]] = []
    for _ in range(data.draw(st.integers(1, 30))):
        operation = data.draw(operations(m))
        before = fingerprint(m)
        try:
            operation()
        except ProtocolError:
            # A request answered with an error changes nothing.
            assert fingerprint(m) == before
            assert not m.drain_records()
        records += m.drain_records()
        m.drain_events()
    # The state survives a snapshot, and the journal's records rebuild it.
    from_snapshot = RiskEngine(limits=Limits(), now_ms=T0)
    from_snapshot.load_snapshot(orjson.loads(orjson.dumps(m.snapshot(), default=str)))
    assert from_snapshot.state_view() == m.state_view()
    from_records = RiskEngine(limits=Limits(), now_ms=T0)
    from_records.replay(records)
    assert from_records.state_view() == m.state_view()


# ------------------------------------------------------ mutations on a socket

FRAMES = 20_000
SEED = 20261202
BASES: dict[str, dict[str, Any]] = {
    "session.auth": {"token": "trader-token"},
    "session.hello": {"cancel_on_disconnect": True},
    "ping": {},
    "position.update": {"account": "A1", "symbol": "S", "qty": "1", "price": "10", "seq": 1},
    "position.snapshot": {
        "account": "A1",
        "positions": [{"symbol": "S", "qty": "1", "price": "10"}],
    },
    "price.update": {"symbol": "S", "price": "10"},
    "order.validate": {
        "account": "A1",
        "symbol": "S",
        "side": "buy",
        "qty": "1",
        "price": "10",
        "reserve": True,
        "client_order_id": "c1",
    },
    "reservation.release": {"reservation_id": "R1"},
    "emergency.get": {},
    "emergency.set": {"mode": "reducing", "reason": "fuzz", "account": "A2"},
    "state.get": {"account": "A1"},
    "limits.get": {},
    "limits.set": {"version": 1, "limits": {"max_order_qty": "100"}},
    "subscribe": {"channels": ["alerts", "exposure"], "resume": {"alerts": 0}},
    "unsubscribe": {"channels": ["exposure"]},
}
NASTY: list[Any] = [
    None,
    True,
    0,
    -1,
    # Integers past 64 bits, written with all their digits.
    orjson.Fragment(str(2**64).encode()),
    orjson.Fragment(str(-(2**70)).encode()),
    orjson.Fragment(str(10**70).encode()),
    1.5,
    -0.0,
    1e300,
    "",
    " ",
    "0",
    "-0",
    "1e5",
    "NaN",
    "Infinity",
    "99999999999999999999999999999999",
    "0.000000000000000000000000000001",
    "1" * 33,
    "x" * 70,
    "\u202e\u0000",
    "A1",
    "R1",
    "*",
    [],
    [1, [2, [3]]],
    {},
    {"a": {"b": {}}},
]
RAW_NUMBERS = [b"1e-400", b"1e400", b"-1e400", b"9" * 80, b"0.10000000000000000001", b"-0"]


def mutate(rng: random.Random, rid: int) -> tuple[bytes, bool]:
    """One mutated request frame, and whether to send it as text."""
    method = rng.choice(sorted(BASES))
    params = dict(BASES[method])
    envelope: dict[str, Any] = {"id": rid, "method": method, "params": params}
    if rng.random() < 0.15:  # a valid request now and then: the state moves on
        return orjson.dumps(envelope), True
    for _ in range(rng.randint(1, 3)):
        roll = rng.random()
        if roll < 0.3 and params:
            params[rng.choice(sorted(params))] = rng.choice(NASTY)
        elif roll < 0.4 and params:
            del params[rng.choice(sorted(params))]
        elif roll < 0.5:
            params[rng.choice(["quantity", "x", "", "id", "qty"])] = rng.choice(NASTY)
        elif roll < 0.6:
            envelope["id"] = rng.choice([*NASTY, rid])
        elif roll < 0.65:
            envelope["method"] = rng.choice([*BASES, "no.such", "", 7, None])
        elif roll < 0.7:
            envelope["params"] = rng.choice(NASTY)
        elif roll < 0.75:
            envelope[rng.choice(["extra", "Method"])] = 1
    frame = orjson.dumps(envelope)
    roll = rng.random()
    if roll < 0.15:  # flip bytes
        data = bytearray(frame)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        frame = bytes(data)
    elif roll < 0.25:  # cut
        cut = rng.randrange(len(frame))
        frame = frame[:cut] + frame[cut + rng.randint(1, 20) :]
    elif roll < 0.32:  # insert
        at = rng.randrange(len(frame))
        junk = rng.choice([rng.randbytes(5), b"\xff\xfe", b"[", b'"', b","])
        frame = frame[:at] + junk + frame[at:]
    elif roll < 0.42:  # a number no binary float holds, in place of a value
        for key in (b'"qty":', b'"price":', b'"id":', b'"version":', b'"seq":'):
            if key in frame:
                start = frame.index(key) + len(key)
                end = start
                while end < len(frame) and frame[end : end + 1] not in (b",", b"}"):
                    end += 1
                frame = frame[:start] + rng.choice(RAW_NUMBERS) + frame[end:]
                break
    elif roll < 0.45:  # deep nesting
        depth = rng.choice([100, 600, 1100])
        frame = frame[:-1] + b',"n":' + b"[" * depth + b"]" * depth + b"}"
    return frame, rng.random() < 0.85


def fingerprint_of(gw: RunningGateway) -> Any:
    manager = gw.manager
    store = gw.gateway.store
    assert store is not None
    return (
        store.last_seq,
        manager.emergency_version,
        manager.limits_version,
        manager.gross_exposure,
        sorted(manager.reservations),
        sorted(manager.reference_prices.items()),
        sorted(manager.accounts),
    )


async def answer_of(ws: ClientConnection) -> dict[str, Any] | None:
    """The next answer (pushes skipped); None when the connection closed."""
    while True:
        try:
            # json, not orjson: an id past 64 bits must come back with its digits.
            message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        except Exception:
            return None
        if "channel" not in message:
            result: dict[str, Any] = message
            return result


async def test_socket_when_20000_mutated_frames_then_no_internal_and_errors_change_nothing(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await make_gateway(
        persistence={"fsync": "never"},
        limits={"reservation_ttl_ms": 3_600_000},
        server={"max_messages_per_second": 1_000_000},
    )
    rng = random.Random(SEED)
    tokens = [ADMIN, TRADER, VIEWER, FEED, None]
    codes: dict[str, int] = {}
    sent = 0
    caplog.set_level(logging.WARNING)
    while sent < FRAMES:
        token = tokens[sent // 500 % len(tokens)]
        headers = {"Authorization": f"Bearer {token}"} if token else None
        ws = await connect(gw.url, additional_headers=headers, compression=None, max_size=None)
        try:
            for _ in range(500):
                frame, text = mutate(rng, sent)
                before = fingerprint_of(gw)
                try:
                    await ws.send(frame, text=text)
                except ConnectionClosed:
                    break  # closed after a wrong session.auth (4001): reconnect
                sent += 1
                answer = await answer_of(ws)
                if answer is None:
                    break  # closed: a wrong session.auth (4001); the next batch reconnects
                status = answer["status"]
                code = "ok" if status == "ok" else answer["error"]["code"]
                codes[code] = codes.get(code, 0) + 1
                assert code != "INTERNAL", (frame[:300], answer)
                expected_id = codec.peek_id(frame)
                if expected_id is not None:
                    assert answer["id"] == expected_id, (frame[:300], answer)
                if status == "error":
                    assert fingerprint_of(gw) == before, (frame[:300], answer)
        finally:
            await ws.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors[:5]]
    print(f"mutation fuzz: {sent} frames, answers by code {dict(sorted(codes.items()))}")
    assert sent >= FRAMES and sum(codes.values()) > FRAMES * 0.95
