"""The original embedding API: ``validate_new_position``, ``update_state``,
``is_emergency_mode_active`` and ``recover_state``, in memory and on a state
directory, including the race the original design allowed.
"""

from __future__ import annotations

import asyncio
import shutil
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway.manager import EmergencyManager


class AsyncRiskManager:
    """A pluggable risk manager whose check awaits, as a remote call would."""

    def __init__(self, verdict: bool = True, *, gate: asyncio.Event | None = None) -> None:
        self.verdict = verdict
        self.gate = gate
        self.calls: list[tuple[str, Any, Any]] = []

    async def validate_position(self, symbol: str, size: Any, price: Any) -> bool:
        self.calls.append((symbol, size, price))
        if self.gate is not None:
            await self.gate.wait()
        else:
            await asyncio.sleep(0)
        return self.verdict


class FailingRiskManager:
    async def validate_position(self, symbol: str, size: Any, price: Any) -> bool:
        await asyncio.sleep(0)
        raise RuntimeError("risk service unreachable")


def gross(manager: EmergencyManager) -> str:
    return str(manager.engine.state_view()["gross_exposure"])


# ------------------------------------------------------------- in memory


async def test_validate_new_position_when_within_limit_then_success_and_position_recorded() -> None:
    manager = EmergencyManager({"max_exposure": 1000})
    assert await manager.validate_new_position("BTC-USD", 5, 100) == {"status": "success"}
    assert manager.engine.state_view()["accounts"]["default"]["positions"] == {
        "BTC-USD": {"qty": "5", "price": "100"}
    }
    assert gross(manager) == "500"


async def test_validate_new_position_when_exactly_at_limit_then_success() -> None:
    manager = EmergencyManager({"max_exposure": 1000})
    assert await manager.validate_new_position("BTC-USD", 10, 100) == {"status": "success"}
    assert gross(manager) == "1000"


async def test_validate_new_position_when_over_limit_then_error_with_figures_and_code() -> None:
    manager = EmergencyManager({"max_exposure": 1000})
    assert await manager.validate_new_position("BTC-USD", 5, 100) == {"status": "success"}
    result = await manager.validate_new_position("ETH-USD", 6, 100)
    assert result["status"] == "error"
    assert result["code"] == "MAX_EXPOSURE"
    assert "gross exposure would be 1100, limit 1000" in result["error"]
    assert gross(manager) == "500"  # nothing recorded, nothing held


async def test_validate_new_position_when_size_negative_then_sell_counted_gross() -> None:
    manager = EmergencyManager({"max_exposure": 1000})
    assert await manager.validate_new_position("BTC-USD", -5, 100) == {"status": "success"}
    assert manager.engine.state_view()["accounts"]["default"]["positions"] == {
        "BTC-USD": {"qty": "-5", "price": "100"}
    }
    assert gross(manager) == "500"
    result = await manager.validate_new_position("ETH-USD", -6, 100)
    assert result["code"] == "MAX_EXPOSURE"
    assert "gross exposure would be 1100, limit 1000" in result["error"]


async def test_validate_new_position_when_sell_reduces_long_then_exposure_falls() -> None:
    manager = EmergencyManager({"max_exposure": 1000})
    await manager.validate_new_position("BTC-USD", 8, 100)
    assert await manager.validate_new_position("BTC-USD", -3, 100) == {"status": "success"}
    assert gross(manager) == "500"


async def test_validate_new_position_when_float_size_then_read_exactly() -> None:
    manager = EmergencyManager({"max_exposure": "0.3"})
    assert await manager.validate_new_position("X", 0.1, 1) == {"status": "success"}
    assert await manager.validate_new_position("X", 0.2, 1) == {"status": "success"}
    assert manager.engine.gross_exposure == Decimal("0.3")
    result = await manager.validate_new_position("X", Decimal("0.0001"), 1)
    assert result["code"] == "MAX_EXPOSURE"


@pytest.mark.parametrize(
    ("size", "price", "field"), [(0, 100, "size"), ("abc", 100, "size"), (1, 0, "price")]
)
async def test_validate_new_position_when_size_or_price_invalid_then_bad_request(
    size: Any, price: Any, field: str
) -> None:
    manager = EmergencyManager({"max_exposure": 1000})
    result = await manager.validate_new_position("BTC-USD", size, price)
    assert result["status"] == "error"
    assert result["code"] == "BAD_REQUEST"
    assert result["error"].startswith(field)


async def test_update_state_when_emergency_then_active_and_validations_halted() -> None:
    manager = EmergencyManager({"max_exposure": 1000})
    assert manager.is_emergency_mode_active() is False
    await manager.update_state(True, "exchange outage")
    assert manager.is_emergency_mode_active() is True
    view = manager.engine.emergency_view()
    assert view["mode"] == "halted"
    assert view["reason"] == "exchange outage"
    result = await manager.validate_new_position("BTC-USD", 1, 100)
    assert result == {
        "status": "error",
        "error": "the gateway is halted",
        "code": "EMERGENCY_HALTED",
    }
    assert gross(manager) == "0"


async def test_update_state_when_false_then_reopened() -> None:
    manager = EmergencyManager({"max_exposure": 1000})
    await manager.update_state(True, "outage")
    await manager.update_state(False, "")
    assert manager.is_emergency_mode_active() is False
    assert await manager.validate_new_position("BTC-USD", 1, 100) == {"status": "success"}
    assert manager.engine.emergency_view()["version"] == 2


async def test_update_state_when_emergency_without_reason_then_value_error() -> None:
    manager = EmergencyManager({"max_exposure": 1000})
    with pytest.raises(ValueError, match="reason"):
        await manager.update_state(True, "  ")
    assert manager.is_emergency_mode_active() is False


async def test_update_state_when_repeated_then_version_unchanged() -> None:
    manager = EmergencyManager({"max_exposure": 1000})
    await manager.update_state(True, "outage")
    await manager.update_state(True, "another outage")
    assert manager.engine.emergency_view()["version"] == 1
    assert manager.engine.emergency_view()["reason"] == "outage"


# ------------------------------------------------------------------ race


async def test_validate_new_position_when_five_concurrent_and_room_for_one_then_one_success() -> (
    None
):
    gate = asyncio.Event()
    checker = AsyncRiskManager(gate=gate)
    manager = EmergencyManager({"max_exposure": 1000}, risk_manager=checker)
    tasks = [
        asyncio.create_task(manager.validate_new_position("BTC-USD", 600, 1)) for _ in range(5)
    ]
    # Let every call reach its check while the first one waits on the risk manager.
    for _ in range(20):
        await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert [r["status"] for r in results].count("success") == 1
    assert [r.get("code") for r in results if r["status"] == "error"] == ["MAX_EXPOSURE"] * 4
    assert len(checker.calls) == 1
    assert gross(manager) == "600"


async def test_validate_new_position_when_concurrent_with_yielding_checker_then_limit_holds() -> (
    None
):
    manager = EmergencyManager({"max_exposure": 1000}, risk_manager=AsyncRiskManager())
    results = await asyncio.gather(
        *(manager.validate_new_position("BTC-USD", 300, 1) for _ in range(5))
    )
    assert [r["status"] for r in results].count("success") == 3
    assert gross(manager) == "900"


async def test_validate_new_position_when_risk_manager_says_no_then_reservation_released() -> None:
    checker = AsyncRiskManager(verdict=False)
    manager = EmergencyManager({"max_exposure": 1000}, risk_manager=checker)
    result = await manager.validate_new_position("BTC-USD", 6, 100)
    assert result["status"] == "error"
    assert result["code"] == "CUSTOM_RULE"
    assert checker.calls == [("BTC-USD", Decimal(6), Decimal(100))]
    assert gross(manager) == "0"
    assert manager.engine.reservations == {}
    checker.verdict = True
    assert await manager.validate_new_position("BTC-USD", 10, 100) == {"status": "success"}


async def test_validate_new_position_when_sync_risk_manager_says_no_then_released() -> None:
    class SyncChecker:
        def validate_position(self, symbol: str, size: Any, price: Any) -> bool:
            return False

    manager = EmergencyManager({"max_exposure": 1000, "risk_manager": SyncChecker()})
    assert (await manager.validate_new_position("BTC-USD", 6, 100))["code"] == "CUSTOM_RULE"
    assert gross(manager) == "0"


async def test_validate_new_position_when_risk_manager_raises_then_error_and_released() -> None:
    manager = EmergencyManager({"max_exposure": 1000}, risk_manager=FailingRiskManager())
    with pytest.raises(RuntimeError, match="unreachable"):
        await manager.validate_new_position("BTC-USD", 6, 100)
    assert gross(manager) == "0"
    assert manager.engine.reservations == {}


async def test_validate_new_position_when_cancelled_while_checking_then_released() -> None:
    gate = asyncio.Event()
    manager = EmergencyManager({"max_exposure": 1000}, risk_manager=AsyncRiskManager(gate=gate))
    task = asyncio.create_task(manager.validate_new_position("BTC-USD", 6, 100))
    for _ in range(5):
        await asyncio.sleep(0)
    assert gross(manager) == "600"  # held while the risk manager thinks
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gross(manager) == "0"


# --------------------------------------------------------- state directory


def state_config(path: Path) -> dict[str, Any]:
    return {"emergency_state_file": str(path), "max_exposure": 1000}


async def test_recover_state_when_halted_before_close_then_still_halted_with_reason(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    first = EmergencyManager(state_config(state))
    await first.recover_state()
    assert await first.validate_new_position("BTC-USD", 3, 100) == {"status": "success"}
    await first.update_state(True, "outage")
    await first.close()

    second = EmergencyManager(state_config(state))
    await second.recover_state()
    try:
        assert second.is_emergency_mode_active() is True
        view = second.engine.emergency_view()
        assert view["reason"] == "outage"
        assert view["mode"] == "halted"
        assert view["actor"] == "library"
        assert second.engine.state_view()["accounts"]["default"]["positions"] == {
            "BTC-USD": {"qty": "3", "price": "100"}
        }
        assert (await second.validate_new_position("BTC-USD", 1, 100))["code"] == (
            "EMERGENCY_HALTED"
        )
        await second.update_state(False, "")
    finally:
        await second.close()

    third = EmergencyManager(state_config(state))
    async with third:
        assert third.is_emergency_mode_active() is False
        assert gross(third) == "300"


async def test_validate_new_position_when_state_dir_not_recovered_yet_then_recovers_first(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    first = EmergencyManager(state_config(state))
    await first.update_state(True, "outage")
    await first.close()
    second = EmergencyManager(state_config(state))
    try:
        # No recover_state() call: the manager must not decide on unread state.
        assert (await second.validate_new_position("BTC-USD", 1, 100))["code"] == (
            "EMERGENCY_HALTED"
        )
    finally:
        await second.close()


async def test_recover_state_when_state_dir_missing_then_starts_normal(tmp_path: Path) -> None:
    manager = EmergencyManager(state_config(tmp_path / "does-not-exist"))
    await manager.recover_state()
    try:
        assert manager.is_emergency_mode_active() is False
        assert await manager.validate_new_position("BTC-USD", 1, 100) == {"status": "success"}
    finally:
        await manager.close()


async def write_history(state: Path) -> EmergencyManager:
    """A manager on ``state`` that has journaled several records and is still open."""
    manager = EmergencyManager(state_config(state))
    await manager.recover_state()
    for size in (1, 2, -1, 3):
        assert await manager.validate_new_position("BTC-USD", size, 100) == {"status": "success"}
    await manager.update_state(True, "first outage")
    await manager.update_state(False, "")
    return manager


def crash_image(state: Path, target: Path) -> Path:
    """The state directory as a crash would leave it: no closing snapshot."""
    shutil.copytree(state, target, ignore=shutil.ignore_patterns("LOCK"))
    journals = sorted(target.glob("journal-*.log"))
    assert len(journals) == 1
    return journals[0]


async def test_recover_state_when_journal_middle_record_corrupted_then_starts_halted(
    tmp_path: Path,
) -> None:
    live = await write_history(tmp_path / "live")
    try:
        journal = crash_image(tmp_path / "live", tmp_path / "crashed")
    finally:
        await live.close()
    data = bytearray(journal.read_bytes())
    data[len(data) // 2] ^= 0xFF
    journal.write_bytes(bytes(data))

    manager = EmergencyManager(state_config(tmp_path / "crashed"))
    await manager.recover_state()
    try:
        assert manager.is_emergency_mode_active() is True
        view = manager.engine.emergency_view()
        assert view["mode"] == "halted"
        assert view["actor"] == "gateway"
        assert journal.name in view["reason"]
        assert (await manager.validate_new_position("BTC-USD", 1, 100))["code"] == (
            "EMERGENCY_HALTED"
        )
    finally:
        await manager.close()

    # It never silently reopens: the next start is halted too.
    again = EmergencyManager(state_config(tmp_path / "crashed"))
    async with again:
        assert again.is_emergency_mode_active() is True


async def test_recover_state_when_crash_image_intact_then_same_state(tmp_path: Path) -> None:
    live = await write_history(tmp_path / "live")
    try:
        crash_image(tmp_path / "live", tmp_path / "crashed")
        expected = live.engine.state_view()
    finally:
        await live.close()
    manager = EmergencyManager(state_config(tmp_path / "crashed"))
    async with manager:
        assert manager.is_emergency_mode_active() is False
        assert manager.engine.state_view()["accounts"] == expected["accounts"]
        assert manager.engine.emergency_view()["version"] == expected["emergency"]["version"]


async def test_recover_state_when_last_record_torn_then_dropped_and_not_halted_by_damage(
    tmp_path: Path,
) -> None:
    live = await write_history(tmp_path / "live")
    try:
        journal = crash_image(tmp_path / "live", tmp_path / "crashed")
    finally:
        await live.close()
    # The last record is the reopening; a crash mid-write cuts it short.
    journal.write_bytes(journal.read_bytes()[:-3])
    manager = EmergencyManager(state_config(tmp_path / "crashed"))
    async with manager:
        view = manager.engine.emergency_view()
        assert view["mode"] == "halted"
        assert view["reason"] == "first outage"  # the state before the torn record
        assert view["actor"] == "library"
        assert gross(manager) == "500"


async def test_validate_new_position_when_called_many_times_then_nothing_piles_up_in_memory() -> (
    None
):
    # The library has no fan-out: the events a gateway would push must not
    # accumulate for the life of the process (a decision event per call).
    manager = EmergencyManager({"max_exposure": 1_000_000})
    for _ in range(50):
        await manager.validate_new_position("BTC-USD", 1, 100)
        await manager.validate_new_position("BTC-USD", -1, 100)
    await manager.update_state(True, "drill")
    assert manager.engine.drain_events() == []
    assert manager.engine.drain_records() == []
