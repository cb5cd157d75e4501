"""The MANIFEST: which snapshot and segments are live (PROTOCOL section 9).

A live file that is missing is damage (start halted, naming it), so deleting
the newest segment never silently loses what it held. Files it does not list
are leftovers of a step a crash interrupted.
"""

from __future__ import annotations

from pathlib import Path

from gateway.cli import describe_state_dir
from gateway.persistence import MANIFEST_NAME, recover
from tests.conftest import ADMIN, TRADER, GatewayFactory, RunningGateway


async def acknowledged_history(make_gateway: GatewayFactory, state_dir: Path) -> int:
    """Acknowledged position updates across several segments; returns the last qty."""
    gw = await make_gateway(state_dir=state_dir, persistence={"snapshot_every": 40})
    trader = await gw.client(TRADER)
    for qty in range(1, 101):
        await trader.ok(
            "position.update", {"account": "A1", "symbol": "X", "qty": str(qty), "price": "1"}
        )
    await gw.close_clients()
    # A crash, not a clean stop: no final snapshot.
    # The store first, without its final snapshot; then the rest of the
    # gateway (closing a closed store again does nothing).
    await gw.gateway.store.close(snapshot=False)
    await gw.gateway.stop()
    return 100


async def halted_reason(gw: RunningGateway) -> str:
    admin = await gw.client(ADMIN)
    view = await admin.ok("emergency.get")
    assert view["mode"] == "halted", view
    return str(view["reason"])


async def test_newest_segment_when_deleted_then_start_halted_naming_it(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    await acknowledged_history(make_gateway, state_dir)
    newest = max(state_dir.glob("journal-*.log"))
    assert recover(state_dir, repair=False).records, "the newest segment holds records"
    newest.unlink()

    report = describe_state_dir(state_dir)
    assert report["damage"]["file"] == newest.name
    assert "missing" in report["damage"]["detail"]
    gw = await make_gateway(state_dir=state_dir)
    assert newest.name in await halted_reason(gw)


async def test_manifest_when_deleted_then_everything_recovered_and_start_halted(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    last = await acknowledged_history(make_gateway, state_dir)
    (state_dir / MANIFEST_NAME).unlink()

    gw = await make_gateway(state_dir=state_dir)
    assert MANIFEST_NAME in await halted_reason(gw)
    admin = await gw.client(ADMIN)
    state = await admin.ok("state.get")
    assert state["accounts"]["A1"]["positions"]["X"]["qty"] == str(last)
    # The start wrote a MANIFEST again: the next one is clean (and still halted).
    await gw.close_clients()
    await gw.gateway.stop()
    assert describe_state_dir(state_dir)["damage"] is None


async def test_manifest_when_corrupted_then_damage_naming_it(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    await acknowledged_history(make_gateway, state_dir)
    path = state_dir / MANIFEST_NAME
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01
    path.write_bytes(bytes(data))
    rec = recover(state_dir, repair=False)
    assert rec.damage is not None and rec.damage.file == MANIFEST_NAME


async def test_unlisted_segment_when_newer_and_holding_records_then_damage(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    await acknowledged_history(make_gateway, state_dir)
    newest = max(state_dir.glob("journal-*.log"))
    stranger = state_dir / "journal-00000000000000099999.log"
    stranger.write_bytes(newest.read_bytes())
    rec = recover(state_dir, repair=False)
    assert rec.damage is not None and rec.damage.file == stranger.name


async def test_unlisted_retired_segment_when_left_by_a_crash_then_set_aside_not_damage(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    # A snapshot retired a segment and the MANIFEST stopped listing it, but a
    # crash came before the file was removed.
    state_dir = tmp_path / "state"
    await acknowledged_history(make_gateway, state_dir)
    segments = sorted(state_dir.glob("journal-*.log"))
    oldest = segments[0]
    retired = state_dir / "journal-00000000000000000000.log"
    retired.write_bytes(oldest.read_bytes())
    before = recover(state_dir, repair=False)
    assert before.damage is None

    rec = recover(state_dir)

    assert rec.damage is None and rec.records == before.records
    assert not retired.exists()
    assert list(state_dir.glob(retired.name + ".unlisted-*"))
