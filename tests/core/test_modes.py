"""The modes table, and that the engine orders a mode change by it: towards
safety enforced when staged, away from safety only once published."""

from __future__ import annotations

from itertools import permutations

import pytest

from gateway.core.modes import RANK, TRANSITIONS, Enforced, alert_level, transition
from protocol.codes import AlertLevel, Mode
from tests.builders import T0, codes, emergency, engine, order


def test_table_when_read_then_every_change_of_mode_is_listed_once() -> None:
    assert set(TRANSITIONS) == set(permutations(Mode, 2))
    for (before, after), change in TRANSITIONS.items():
        assert (change.before, change.after) == (before, after)
    assert all(transition(mode, mode) is None for mode in Mode)


@pytest.mark.parametrize(("before", "after"), list(permutations(Mode, 2)))
def test_table_when_change_tightens_then_enforced_at_once_else_when_durable(
    before: Mode, after: Mode
) -> None:
    change = transition(before, after)
    assert change is not None
    assert change.towards_safety is (RANK[after] > RANK[before])
    expected = Enforced.AT_ONCE if change.towards_safety else Enforced.WHEN_DURABLE
    assert change.enforced is expected


def test_table_when_alert_level_read_then_it_follows_the_new_mode() -> None:
    levels = {Mode.NORMAL: AlertLevel.INFO, Mode.REDUCING: AlertLevel.WARNING}
    levels[Mode.HALTED] = AlertLevel.CRITICAL
    for before in Mode:
        for after in Mode:
            assert alert_level(before, after) is levels[after]


def test_engine_when_halt_staged_then_enforced_before_published() -> None:
    m = engine()
    m.defer_publication()
    record = m.prepare_emergency(emergency(Mode.HALTED), "ops", T0)
    assert record is not None
    m.stage(record)
    assert m.mode_of(None) is Mode.NORMAL  # not published: not durable yet
    assert m.enforced_mode(None) is Mode.HALTED
    assert m.is_emergency_mode_active()
    assert codes(m.validate(order(), T0)) == ["EMERGENCY_HALTED"]
    assert m.emergency_view()["version"] == 0
    m.publish(record)
    assert m.mode_of(None) is Mode.HALTED
    assert m.emergency_view()["version"] == 1


def test_engine_when_reopening_staged_then_still_halted_until_published() -> None:
    m = engine()
    m.set_emergency(emergency(Mode.HALTED, account="A1"), "ops", T0)
    m.defer_publication()
    record = m.prepare_emergency(emergency(Mode.NORMAL, account="A1"), "ops", T0)
    assert record is not None
    m.stage(record)
    assert m.enforced_mode("A1") is Mode.HALTED
    assert codes(m.validate(order(account="A1"), T0)) == ["ACCOUNT_HALTED"]
    # Staged again: the journal will say normal, so nothing changes.
    assert m.prepare_emergency(emergency(Mode.NORMAL, account="A1"), "ops", T0) is None
    m.publish(record)
    assert m.enforced_mode("A1") is Mode.NORMAL
    assert m.validate(order(account="A1"), T0).accepted


def test_engine_when_staged_out_of_order_then_publish_refuses() -> None:
    m = engine()
    m.defer_publication()
    first = m.prepare_emergency(emergency(Mode.REDUCING), "ops", T0)
    assert first is not None
    m.stage(first)
    second = m.prepare_emergency(emergency(Mode.HALTED), "ops", T0)
    assert second is not None and second["v"] == first["v"] + 1
    m.stage(second)
    with pytest.raises(ValueError, match="out of staging order"):
        m.publish(second)
    assert m.discard_staged() == 2
    assert m.enforced_mode(None) is Mode.NORMAL
