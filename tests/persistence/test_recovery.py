"""Recovery through the real journal: damage starts halted, history comes back exactly."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.cli import describe_state_dir
from gateway.config import Limits
from gateway.core.engine import RiskEngine
from gateway.persistence import Store
from protocol.codes import Mode
from protocol.messages import EmergencySet, OrderValidate, PositionUpdate, PriceUpdate
from tests.conftest import ADMIN, VIEWER, GatewayFactory
from tests.statedir import list_live


async def _write_history(make_gateway: GatewayFactory, state_dir: Path, **kwargs: object) -> None:
    gw = await make_gateway(state_dir=state_dir, **kwargs)
    admin = await gw.client(ADMIN)
    for qty in range(1, 41):
        await admin.ok(
            "position.update",
            {"account": "A1", "symbol": f"S{qty % 4}", "qty": str(qty), "price": "10"},
        )
    await gw.close_clients()
    await gw.gateway.stop()


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


async def test_start_when_journal_damaged_mid_file_then_halted_with_alert_and_inspect_names_it(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    # A large snapshot interval keeps every record in the first segment.
    await _write_history(make_gateway, state_dir)
    segment = sorted(state_dir.glob("journal-*.log"))[0]
    for snap in state_dir.glob("snapshot-*.snap"):
        snap.unlink()  # recover from the journal alone, through the damage
    list_live(state_dir)
    middle = segment.stat().st_size // 2
    _flip(segment, middle)

    report = describe_state_dir(state_dir)
    assert report["damage"]["file"] == segment.name
    assert 0 < report["damage"]["offset"] <= middle

    gw = await make_gateway(state_dir=state_dir)
    viewer = await gw.client(VIEWER)
    view = await viewer.ok("emergency.get")
    assert view["mode"] == "halted"
    assert view["actor"] == "gateway"
    assert segment.name in view["reason"]
    assert f"offset {report['damage']['offset']}" in view["reason"]
    await viewer.ok("subscribe", {"channels": ["alerts"]})
    snapshot = await viewer.next_push("alerts")
    critical = [a for a in snapshot["data"]["alerts"] if a["code"] == "PERSISTENCE_FAILURE"]
    assert critical and critical[0]["level"] == "critical"
    state = await viewer.ok("state.get")
    # The state is the prefix before the damage: fewer than the 40 updates, never more.
    positions = state["accounts"]["A1"]["positions"]
    assert all(int(p["qty"]) <= 40 for p in positions.values())

    # The next start meets no damage and stays halted: only an admin reopens.
    await gw.close_clients()
    await gw.gateway.stop()
    again = await make_gateway(state_dir=state_dir)
    admin = await again.client(ADMIN)
    assert (await admin.ok("emergency.get"))["mode"] == "halted"
    assert describe_state_dir(state_dir)["damage"] is None
    assert (await admin.ok("emergency.set", {"mode": "normal", "reason": ""}))["mode"] == "normal"


async def test_start_when_newest_snapshot_unreadable_then_halted_with_state_intact(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    await _write_history(make_gateway, state_dir, persistence={"snapshot_every": 10})
    newest = sorted(state_dir.glob("snapshot-*.snap"))[-1]
    _flip(newest, newest.stat().st_size - 3)
    assert describe_state_dir(state_dir)["damage"]["file"] == newest.name

    gw = await make_gateway(state_dir=state_dir)
    viewer = await gw.client(VIEWER)
    view = await viewer.ok("emergency.get")
    assert (view["mode"], view["actor"]) == ("halted", "gateway")
    assert newest.name in view["reason"]
    # The previous snapshot plus the journal it keeps still give the full state.
    positions = (await viewer.ok("state.get"))["accounts"]["A1"]["positions"]
    assert positions["S0"]["qty"] == "40"
    assert positions["S3"]["qty"] == "39"


# A random history through the real journal and back.
ACCOUNTS = ("A1", "A2")
SYMBOLS = ("X", "Y")
step = st.one_of(
    st.tuples(
        st.just("pos"),
        st.sampled_from(ACCOUNTS),
        st.sampled_from(SYMBOLS),
        st.integers(-20, 20),
        st.sampled_from((90, 100, 110)),
    ),
    st.tuples(
        st.just("order"),
        st.sampled_from(ACCOUNTS),
        st.sampled_from(SYMBOLS),
        st.sampled_from(("buy", "sell")),
        st.integers(1, 8),
        st.booleans(),
    ),
    st.tuples(st.just("px"), st.sampled_from(SYMBOLS), st.sampled_from((95, 100, 105))),
    st.tuples(st.just("mode"), st.sampled_from(tuple(Mode)), st.sampled_from((None, "A1"))),
    st.tuples(st.just("tick"), st.integers(0, 3000)),
)


async def _run_history(
    state_dir: Path, steps: list[tuple[object, ...]], snapshot_every: int
) -> dict[str, object]:
    async with asyncio.TaskGroup() as tasks:
        return await _run_history_in(tasks, state_dir, steps, snapshot_every)


async def _run_history_in(
    tasks: asyncio.TaskGroup, state_dir: Path, steps: list[tuple[object, ...]], snapshot_every: int
) -> dict[str, object]:
    now = [1_000_000]
    limits = Limits.from_mapping({"max_exposure": "5000", "reservation_ttl_ms": 2000})
    manager = RiskEngine(limits=limits, now_ms=now[0])
    store = Store(
        manager,
        state_dir,
        fsync="never",
        snapshot_every=snapshot_every,
        clock=lambda: now[0],
    )
    store.open()
    await store.start(tasks)
    last = 0
    for item in steps:
        kind = item[0]
        if kind == "pos":
            _, account, symbol, qty, price = item
            manager.update_position(
                PositionUpdate(
                    account=account, symbol=symbol, qty=Decimal(qty), price=Decimal(price)
                ),  # type: ignore[arg-type]
                now[0],
            )
        elif kind == "order":
            _, account, symbol, side, qty, reserve = item
            manager.validate(
                OrderValidate(
                    account=account,  # type: ignore[arg-type]
                    symbol=symbol,  # type: ignore[arg-type]
                    side=side,  # type: ignore[arg-type]
                    qty=Decimal(qty),  # type: ignore[arg-type]
                    price=Decimal(100),
                    reserve=bool(reserve),
                ),
                now[0],
            )
        elif kind == "px":
            manager.update_price(PriceUpdate(symbol=item[1], price=Decimal(item[2])), now[0])  # type: ignore[arg-type]
        elif kind == "mode":
            mode, account = item[1], item[2]
            reason = "" if mode is Mode.NORMAL else "drill"
            manager.set_emergency(
                EmergencySet(mode=mode, reason=reason, account=account),  # type: ignore[arg-type]
                "ops",
                now[0],
            )
        else:
            now[0] += int(item[1])  # type: ignore[call-overload]
            manager.expire_reservations(now[0])
        last = store.commit() or last
        manager.drain_events()
    # Synced, not only durable: emergency changes are published once fsynced.
    await store.synced(last)
    manager.drain_events()
    expected = (manager.state_view(), _in_any_alert_order(manager.snapshot()))
    # A crash loses nothing written; close without the final snapshot to
    # recover from the journal (and any periodic snapshot) as a crash would.
    await store.close(snapshot=False)
    # Restarted with the same configuration, as a real restart would be.
    recovered_manager = RiskEngine(limits=limits, now_ms=now[0])
    again = Store(recovered_manager, state_dir, fsync="never", clock=lambda: now[0])
    again.open()
    got = (recovered_manager.state_view(), _in_any_alert_order(recovered_manager.snapshot()))
    total, _per_account = recovered_manager.recompute_exposure()
    assert total == recovered_manager.gross_exposure
    assert again.recovered is not None and again.recovered.damage is None
    await again.start(tasks)
    await again.close(snapshot=False)
    return {"expected": expected, "got": got}


def _in_any_alert_order(snapshot: dict[str, Any]) -> dict[str, Any]:
    """``snapshot`` with its alerts history sorted: an emergency change's alert
    comes back at its record's place in the journal, which may be before an
    alert raised while the change waited for its fsync (gateway.core.history)."""
    history = snapshot["history"]
    alerts = sorted(history["alerts"], key=repr)
    return {**snapshot, "history": {**history, "alerts": alerts}}


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=st.lists(step, min_size=1, max_size=60), snapshot_every=st.sampled_from((3, 7, 1000)))
def test_recovery_when_random_history_then_state_equals_before(
    tmp_path_factory: object, steps: list[tuple[object, ...]], snapshot_every: int
) -> None:
    state_dir = tmp_path_factory.mktemp("history")  # type: ignore[attr-defined]
    result = asyncio.run(_run_history(state_dir, steps, snapshot_every))
    assert result["got"] == result["expected"]
