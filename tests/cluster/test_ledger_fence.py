"""The credit arithmetic and the fence, pure; and the credit script in Redis
against the statement it implements (``decide_credit``)."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from decimal import Decimal
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.cluster.fence import Fence
from gateway.cluster.ledger import (
    CreditLedger,
    CreditPolicy,
    CreditRequest,
    decide_credit,
    from_units,
    max_units_for,
    to_units_ceil,
)
from gateway.cluster.redis_state import open_redis_state
from gateway.cluster.shared import CreditAnswer
from tests.cluster.redisproc import RedisProcess, require_redis

MS = 1_000_000


class Clock:
    def __init__(self) -> None:
        self.ns = 10 * MS

    def __call__(self) -> int:
        return self.ns


def test_the_fence_closes_s_after_the_send_time_of_the_last_read() -> None:
    clock = Clock()
    fence = Fence(75, name="m1", now=clock)
    assert fence.fenced  # never renewed yet
    fence.renewed(clock.ns)
    clock.ns += 70 * MS
    assert not fence.fenced and fence.remaining_ms() == 5
    fence.renewed(clock.ns - 80 * MS)  # an older read does not move it back
    clock.ns += 6 * MS
    assert fence.fenced
    code, message = fence.rejection()
    assert code == "CLUSTER_UNAVAILABLE" and "76 ms" in message and "75" in message
    fence.renewed(clock.ns)
    assert not fence.fenced
    fence.forget()
    assert fence.fenced and "cluster forget" in fence.rejection()[1]


def test_units_are_exact_and_the_ceiling_rounds_down() -> None:
    assert max_units_for(Decimal("1000000.00009")) == 10_000_000_000
    assert to_units_ceil(Decimal("0.00001")) == 1
    assert from_units(12345) == Decimal("1.2345")


def test_borrow_asks_for_the_order_plus_high_headroom_capped_at_the_limit() -> None:
    ledger = CreditLedger(CreditPolicy(Decimal("0.05"), Decimal("0.10")), 1_000_000)
    request = ledger.plan_borrow(Decimal("60"))
    assert request == CreditRequest("increase", 700_000, 1)
    assert ledger.plan_borrow(Decimal("95")) == CreditRequest("increase", 1_000_000, 2)


def test_a_decrease_is_in_force_before_it_is_sent_and_an_increase_only_after() -> None:
    ledger = CreditLedger(CreditPolicy(Decimal("0.05"), Decimal("0.10")), 1_000_000)
    increase = ledger.plan_borrow(Decimal("50"))
    assert increase is not None and ledger.units == 0
    record = ledger.answered(increase, CreditAnswer(550_000, increase.seq, 1_000_000, 0, ()))
    assert ledger.units == 550_000 and record == {"t": "crd", "u": 550_000, "seq": 1}
    decrease = ledger.plan_give_back(Decimal("0"))
    assert decrease is not None and decrease.kind == "decrease"
    record = ledger.begin_decrease(decrease)
    assert ledger.units == decrease.units == 100_000 and record["u"] == 100_000
    # Its answer changes nothing more (already journaled).
    assert ledger.answered(decrease, CreditAnswer(100_000, decrease.seq, 1_000_000, 0, ())) is None


def test_an_answer_from_a_request_the_member_never_journaled_is_adopted() -> None:
    ledger = CreditLedger(CreditPolicy(Decimal("0.05"), Decimal("0.10")), 1_000_000)
    ledger.recovered({"t": "crd", "u": 200_000, "seq": 4})
    reassert = ledger.reassert()
    assert reassert.seq == 5
    # The shared state had applied seq 6 (sent before a crash, never journaled).
    record = ledger.answered(reassert, CreditAnswer(300_000, 6, 1_000_000, 0, ()))
    assert ledger.units == 300_000 and record == {"t": "crd", "u": 300_000, "seq": 6}
    assert ledger.plan_borrow(Decimal("100")) is not None
    assert ledger.plan_borrow(Decimal("100")).seq > 6  # type: ignore[union-attr]


kinds = st.sampled_from(["increase", "decrease", "reassert"])
requests = st.lists(
    st.tuples(st.integers(0, 2), st.integers(1, 12), st.integers(0, 1500), kinds),
    min_size=1,
    max_size=25,
)


@given(requests)
def test_credits_never_sum_over_the_ceiling_through_increases(
    steps: list[tuple[int, int, int, str]],
) -> None:
    """Increases alone never take the sum over max_units (decreases and
    reasserts store what the member says it holds)."""
    units = [0, 0, 0]
    seqs = [0, 0, 0]
    for member, seq, want, kind in steps:
        if kind != "increase":
            want = min(want, units[member])  # a member only gives back, or re-asserts
        others = sum(units) - units[member]
        units[member], seqs[member] = decide_credit(
            units[member],
            seqs[member],
            others,
            1000,
            False,
            seq,
            want,
            kind,  # type: ignore[arg-type]
        )
        assert sum(units) <= 1000


@settings(max_examples=25, deadline=None)
@given(requests)
def test_the_redis_script_implements_decide_credit(steps: list[tuple[int, int, int, str]]) -> None:
    asyncio.run(_compare(steps))


_REDIS: list[RedisProcess] = []


async def _compare(steps: list[tuple[int, int, int, str]]) -> None:
    require_redis()
    if not _REDIS:
        _REDIS.append(RedisProcess(Path(tempfile.mkdtemp()) / "redis").start())
    server = _REDIS[0]
    state = await open_redis_state(server.url, timeout_ms=2000, prefix=f"t{uuid.uuid4().hex}:")
    try:
        await state.write_document("limits", 0, "{}", max_units=1000)
        units = [0, 0, 0]
        seqs = [0, 0, 0]
        for member, seq, want, kind in steps:
            others = sum(units) - units[member]
            expected = decide_credit(
                units[member],
                seqs[member],
                others,
                1000,
                False,
                seq,
                want,
                kind,  # type: ignore[arg-type]
            )
            answer = await state.credit(f"m{member}", seq, want, kind)  # type: ignore[arg-type]
            assert (answer.units, answer.seq) == expected
            units[member], seqs[member] = expected
            assert answer.total_units == sum(units)
    finally:
        await state.close()


def teardown_module() -> None:
    for server in _REDIS:
        server.stop()
