"""The config file's [limits] on SIGHUP and at a start after an edit."""

from __future__ import annotations

import signal
from pathlib import Path

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
        await admin.close()
    finally:
        proc.terminate()
        assert await proc.wait() == 0
