"""The config file's [limits] on SIGHUP and at a start after an edit."""

from __future__ import annotations

import dataclasses
import errno
import logging
import signal
from pathlib import Path

import pytest

from gateway import cli
from gateway.persistence import FileOps, PersistenceError
from tests.conftest import TRADER, GatewayFactory
from tests.gwprocess import GatewayProcess, write_config
from tests.wsclient import TestClient


async def _next_alert(client: TestClient, code: str) -> dict[str, object]:
    while True:
        push = await client.next_push("alerts", timeout=10)
        if push.get("snapshot"):
            continue
        if push["data"]["code"] == code:
            return push["data"]  # type: ignore[no-any-return]


async def test_sighup_when_file_limits_edited_then_applied_as_new_version(tmp_path: Path) -> None:
    config = write_config(tmp_path / "gw.toml", tmp_path / "state")
    proc = await GatewayProcess.start(config)
    try:
        admin = await TestClient.open(proc.url, "admin-token")
        assert (await admin.ok("limits.get"))["version"] == 1
        await admin.ok("emergency.set", {"mode": "halted", "reason": "before reload"})
        await admin.ok("subscribe", {"channels": ["alerts"]})
        config.write_text(
            config.read_text().replace('max_exposure = "1000000000000"', 'max_exposure = "5000"')
        )
        proc.proc.send_signal(signal.SIGHUP)
        alert = await _next_alert(admin, "LIMITS_CHANGED")
        assert "config" in str(alert["message"])
        limits = await admin.ok("limits.get")
        assert limits["version"] == 2
        assert limits["limits"]["max_exposure"] == "5000"
        # A limits change never reopens a halted gateway.
        assert (await admin.ok("emergency.get"))["mode"] == "halted"
        await admin.close()
    finally:
        proc.terminate()
        assert await proc.wait() == 0


async def test_start_when_file_unchanged_then_runtime_limits_kept_and_when_edited_then_file_wins(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "gw.toml", tmp_path / "state")
    proc = await GatewayProcess.start(config)
    try:
        admin = await TestClient.open(proc.url, "admin-token")
        await admin.ok("limits.set", {"version": 1, "limits": {"max_position": "42"}})
        await admin.close()
    finally:
        proc.terminate()
        assert await proc.wait() == 0
    # Same file: the acknowledged runtime change survives the restart.
    proc = await GatewayProcess.start(config)
    try:
        admin = await TestClient.open(proc.url, "admin-token")
        limits = await admin.ok("limits.get")
        assert (limits["version"], limits["limits"]["max_position"]) == (2, "42")
        await admin.close()
    finally:
        proc.terminate()
        assert await proc.wait() == 0
    # Edited file: its limits are applied as a new version at start.
    config.write_text(
        config.read_text().replace('max_exposure = "1000000000000"', 'max_exposure = "7000"')
    )
    proc = await GatewayProcess.start(config)
    try:
        admin = await TestClient.open(proc.url, "admin-token")
        limits = await admin.ok("limits.get")
        assert limits["version"] == 3
        assert limits["limits"]["max_exposure"] == "7000"
        # Editing one key never undoes an admin's change to another.
        assert limits["limits"]["max_position"] == "42"
        await admin.close()
    finally:
        proc.terminate()
        assert await proc.wait() == 0
    log = await proc.stderr_text()
    assert "max_exposure 1000000000000 -> 7000" in log, log
    assert "max_position" not in log.split("max_exposure 1000000000000 -> 7000")[1].split("\n")[0]


async def test_sighup_when_one_key_edited_then_only_it_applies_and_others_are_logged(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "gw.toml", tmp_path / "state")
    proc = await GatewayProcess.start(config)
    try:
        admin = await TestClient.open(proc.url, "admin-token")
        # The admin tightens max_position, then someone edits another key
        # (and a [server] key, which is not applied without a restart).
        await admin.ok("limits.set", {"version": 1, "limits": {"max_position": "3"}})
        await admin.ok("subscribe", {"channels": ["alerts"]})
        text = config.read_text()
        text = text.replace('max_exposure = "1000000000000"', 'max_exposure = "9000"')
        text = text.replace("heartbeat_s = 1", "heartbeat_s = 2")
        config.write_text(text)
        proc.proc.send_signal(signal.SIGHUP)
        await _next_alert(admin, "LIMITS_CHANGED")
        limits = await admin.ok("limits.get")
        assert limits["version"] == 3
        assert limits["limits"]["max_exposure"] == "9000"
        assert limits["limits"]["max_position"] == "3"
        # The same file again changes nothing.
        proc.proc.send_signal(signal.SIGHUP)
        await admin.ok("limits.set", {"version": 3, "limits": {"max_order_qty": "5"}})
        assert (await admin.ok("limits.get"))["version"] == 4
        await admin.close()
    finally:
        proc.terminate()
        assert await proc.wait() == 0
    log = await proc.stderr_text()
    assert "max_exposure 1000000000000 -> 9000" in log, log
    assert "server.heartbeat_s" in log and "not applied" in log, log


async def test_sighup_when_journal_has_failed_then_error_is_logged_not_swallowed(
    make_gateway: GatewayFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = await make_gateway(state_dir=tmp_path / "state")
    trader = await gw.client(TRADER)

    def failing_write(self: FileOps, fd: int, data: bytes | memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileOps, "write", failing_write)
    update = {"account": "A1", "symbol": "X", "qty": "1", "price": "10"}
    assert (await trader.error("position.update", update))["code"] == "UNAVAILABLE"
    path = tmp_path / "gw.toml"
    path.write_text('[limits]\nmax_exposure = "5"\n')
    running = dataclasses.replace(gw.gateway.config, source=path)
    with caplog.at_level(logging.INFO):
        await cli._reload(gw.gateway, running, {})
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "SIGHUP" in r.message]
    assert errors, [r.message for r in caplog.records]
    assert "not applied" in errors[0].message
    await gw.close_clients()
    with pytest.raises(PersistenceError):  # a stop after a failure says so
        await gw.gateway.stop()
