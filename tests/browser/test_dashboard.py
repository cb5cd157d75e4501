"""Browser tests of the dashboard (``GET /``), driving Debian's Chromium with Playwright.

The gateway runs in-process (``gw`` / ``make_gateway``) on the same event loop
as Playwright's async API. Without ``/usr/bin/chromium`` (or Playwright) the
tests are skipped, except when ``CI`` is set: there they fail, since CI must
run them.

``python -m tests.browser.test_dashboard`` (from the repository root) rebuilds
``docs/dashboard.png`` from a realistic state; the tests never write it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from protocol.codes import Mode
from tests.conftest import ADMIN, TRADER, TRADER_B, VIEWER, RunningGateway, start_gateway

try:
    from playwright.async_api import (
        Browser,
        Page,
        WebSocket,
        WebSocketRoute,
        async_playwright,
        expect,
    )
except ImportError:  # pragma: no cover - depends on the machine
    if os.environ.get("CI"):
        raise
    pytest.skip("playwright is not installed", allow_module_level=True)

# One event loop for the whole module, so that one browser serves every test
# and the in-process gateways run on the loop that drives Playwright.
pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
TOKEN_KEY = "risk-gateway.token"
TEST_TIMEOUT_S = 45
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"

expect.set_options(timeout=5000)


def bounded(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Fail a test that runs longer than TEST_TIMEOUT_S instead of hanging the run."""

    @functools.wraps(test)
    async def wrapper(*args: Any, **kwargs: Any) -> None:
        async with asyncio.timeout(TEST_TIMEOUT_S):
            await test(*args, **kwargs)

    return wrapper


def _require_chromium() -> None:
    if CHROMIUM.exists():
        return
    message = f"{CHROMIUM} is missing (apt-get install chromium)"
    if os.environ.get("CI"):
        pytest.fail(f"{message}: CI must run the browser tests")
    pytest.skip(message)


async def _launch(playwright: Any) -> Browser:
    browser: Browser = await playwright.chromium.launch(
        executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
    )
    return browser


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    _require_chromium()
    async with async_playwright() as playwright:
        browser = await _launch(playwright)
        try:
            yield browser
        finally:
            await browser.close()


@pytest_asyncio.fixture(loop_scope="module")
async def make_gateway(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[RunningGateway]]]:
    """As in conftest, but on the module's loop (the one Playwright runs on)."""
    running: list[RunningGateway] = []

    async def factory(**kwargs: Any) -> RunningGateway:
        state_dir = kwargs.pop("state_dir", tmp_path / f"state{len(running)}")
        gw = await start_gateway(state_dir, **kwargs)
        running.append(gw)
        return gw

    yield factory
    for gw in running:
        await gw.close_clients()
        await gw.stopped()


@pytest_asyncio.fixture(loop_scope="module")
async def gw(make_gateway: Callable[..., Awaitable[RunningGateway]]) -> RunningGateway:
    return await make_gateway()


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh page; fails the test if the page throws a JavaScript error."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(5000)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    await context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def page_url(gw: RunningGateway) -> str:
    return f"http://127.0.0.1:{gw.gateway.port}/"


async def sign_in(page: Page, gw: RunningGateway, token: str) -> None:
    """Open the dashboard, sign in with ``token`` and wait until it is live."""
    await page.goto(page_url(gw))
    await expect(page.get_by_test_id("login-form")).to_be_visible()
    await page.get_by_label("Access token").fill(token)
    await page.get_by_test_id("login-submit").click()
    await expect(page.get_by_test_id("connection-status")).to_have_attribute("data-state", "live")
    await expect(page.get_by_test_id("login-form")).to_be_hidden()


def record_frames(page: Page) -> list[list[dict[str, Any]]]:
    """Per WebSocket the page opens, the JSON frames it sends."""
    sockets: list[list[dict[str, Any]]] = []

    def opened(ws: WebSocket) -> None:
        frames: list[dict[str, Any]] = []
        sockets.append(frames)
        ws.on("framesent", lambda payload: frames.append(json.loads(payload)))

    page.on("websocket", opened)
    return sockets


def subscribes(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f.get("params", {}) for f in frames if f.get("method") == "subscribe"]


# ------------------------------------------------------------------ sign-in


@bounded
async def test_admin_signs_in_and_out(gw: RunningGateway, page: Page) -> None:
    await sign_in(page, gw, ADMIN)
    await expect(page.get_by_test_id("identity")).to_contain_text("admin (admin)")
    await expect(page.get_by_test_id("mode-text")).to_have_text("NORMAL")
    await expect(page.get_by_test_id("emergency-banner")).to_have_attribute("data-mode", "normal")
    await expect(page.get_by_test_id("mode-version")).to_have_text("0")
    await expect(page.get_by_test_id("mode-controls")).to_be_visible()
    await expect(page.get_by_test_id("decisions-panel")).to_be_visible()
    assert await page.evaluate(f"sessionStorage.getItem('{TOKEN_KEY}')") == ADMIN

    # A reload keeps the session of this tab: no form, straight back to live.
    await page.reload()
    await expect(page.get_by_test_id("connection-status")).to_have_attribute("data-state", "live")
    await expect(page.get_by_test_id("login-form")).to_be_hidden()

    await page.get_by_test_id("sign-out").click()
    await expect(page.get_by_test_id("login-form")).to_be_visible()
    await expect(page.get_by_test_id("emergency-banner")).to_be_hidden()
    assert await page.evaluate(f"sessionStorage.getItem('{TOKEN_KEY}')") is None


@bounded
async def test_wrong_token_shows_error_and_stays_on_form(gw: RunningGateway, page: Page) -> None:
    await page.goto(page_url(gw))
    await page.get_by_label("Access token").fill("not-a-token")
    await page.get_by_test_id("login-submit").click()
    error = page.get_by_test_id("login-error")
    await expect(error).to_be_visible()
    await expect(error).to_contain_text("invalid token")
    await expect(page.get_by_test_id("login-form")).to_be_visible()
    await expect(page.get_by_test_id("emergency-banner")).to_be_hidden()
    await expect(page.get_by_test_id("identity")).to_be_hidden()
    assert await page.evaluate(f"sessionStorage.getItem('{TOKEN_KEY}')") is None
    # Still usable: the right token then signs in.
    await page.get_by_label("Access token").fill(VIEWER)
    await page.get_by_test_id("login-submit").click()
    await expect(page.get_by_test_id("connection-status")).to_have_attribute("data-state", "live")
    await expect(page.get_by_test_id("login-error")).to_be_hidden()


@bounded
async def test_viewer_and_trader_see_no_mode_controls(gw: RunningGateway, page: Page) -> None:
    await sign_in(page, gw, VIEWER)
    await expect(page.get_by_test_id("identity")).to_contain_text("viewer")
    await expect(page.get_by_test_id("mode-text")).to_have_text("NORMAL")
    await expect(page.get_by_test_id("mode-controls")).to_be_hidden()
    await expect(page.get_by_test_id("mode-apply")).to_be_hidden()
    await expect(page.get_by_test_id("decisions-panel")).to_be_visible()

    await page.get_by_test_id("sign-out").click()
    await page.get_by_label("Access token").fill(TRADER)
    await page.get_by_test_id("login-submit").click()
    await expect(page.get_by_test_id("connection-status")).to_have_attribute("data-state", "live")
    await expect(page.get_by_test_id("identity")).to_contain_text("desk-1 (trader)")
    await expect(page.get_by_test_id("mode-controls")).to_be_hidden()
    # Traders may not read decisions; their own accounts are listed in exposure.
    await expect(page.get_by_test_id("decisions-panel")).to_be_hidden()
    await expect(page.get_by_test_id("exposure-row")).to_have_count(2)


# --------------------------------------------------------------- emergency


@bounded
async def test_banner_turns_halted_within_one_second(gw: RunningGateway, page: Page) -> None:
    await sign_in(page, gw, ADMIN)
    await expect(page.get_by_test_id("mode-text")).to_have_text("NORMAL")
    admin = await gw.client(ADMIN)
    await admin.ok("emergency.set", {"mode": "halted", "reason": "exchange outage"})
    await expect(page.get_by_test_id("mode-text")).to_have_text("HALTED", timeout=1000)
    banner = page.get_by_test_id("emergency-banner")
    await expect(banner).to_have_attribute("data-mode", "halted", timeout=1000)
    await expect(banner).to_contain_class("mode-halted")
    await expect(page.get_by_test_id("mode-reason")).to_have_text("exchange outage")
    await expect(page.get_by_test_id("mode-actor")).to_have_text("admin")
    await expect(page.get_by_test_id("mode-version")).to_have_text("1")

    await admin.ok("emergency.set", {"mode": "reducing", "reason": "desk review", "account": "A7"})
    account = page.locator("[data-testid=account-mode][data-account=A7]")
    await expect(account).to_have_attribute("data-mode", "reducing", timeout=1000)
    await expect(account).to_contain_text("desk review")


@bounded
async def test_admin_halts_gateway_from_the_page(gw: RunningGateway, page: Page) -> None:
    await sign_in(page, gw, ADMIN)
    controls = page.get_by_test_id("mode-controls")
    dialog = page.get_by_test_id("confirm-dialog")
    await controls.get_by_label("New mode").select_option("halted")

    # No reason: refused in the page, nothing sent, no dialog.
    await page.get_by_test_id("mode-apply").click()
    await expect(page.get_by_test_id("mode-message")).to_contain_text("reason is required")
    await expect(dialog).to_be_hidden()

    # Cancel in the confirmation: nothing sent.
    await controls.get_by_label("Reason").fill("venue outage, stop all flow")
    await page.get_by_test_id("mode-apply").click()
    await expect(dialog).to_be_visible()
    await page.get_by_test_id("confirm-cancel").click()
    await expect(dialog).to_be_hidden()
    assert gw.manager.gateway_mode.mode is Mode.NORMAL

    await page.get_by_test_id("mode-apply").click()
    await expect(dialog).to_be_visible()
    await expect(page.get_by_test_id("confirm-text")).to_contain_text("HALTED")
    assert gw.manager.gateway_mode.mode is Mode.NORMAL  # not before the confirmation
    await page.get_by_test_id("confirm-button").click()
    await expect(dialog).to_be_hidden()
    await expect(page.get_by_test_id("mode-text")).to_have_text("HALTED")
    await expect(page.get_by_test_id("mode-message")).to_contain_text("set to halted")
    assert gw.manager.gateway_mode.mode is Mode.HALTED

    viewer = await gw.client(VIEWER)
    emergency = await viewer.ok("emergency.get")
    assert emergency["mode"] == "halted"
    assert emergency["actor"] == "admin"
    assert emergency["reason"] == "venue outage, stop all flow"


@bounded
async def test_refused_change_shows_the_server_error(gw: RunningGateway, page: Page) -> None:
    await sign_in(page, gw, ADMIN)
    controls = page.get_by_test_id("mode-controls")
    await controls.get_by_label("Scope").select_option("account")
    await controls.get_by_label("Account").fill("no spaces allowed")
    await controls.get_by_label("New mode").select_option("reducing")
    await controls.get_by_label("Reason").fill("limit review")
    await page.get_by_test_id("mode-apply").click()
    await page.get_by_test_id("confirm-button").click()
    message = page.get_by_test_id("mode-message")
    await expect(message).to_contain_text("Refused by the gateway (BAD_REQUEST)")
    await expect(message).to_contain_text("account")
    await expect(message).to_have_attribute("role", "alert")
    assert gw.manager.emergency_view()["accounts"] == {}

    # A valid account then works, and shows in the account modes.
    await controls.get_by_label("Account").fill("A2")
    await page.get_by_test_id("mode-apply").click()
    await page.get_by_test_id("confirm-button").click()
    await expect(message).to_contain_text("Account A2 set to reducing")
    row = page.locator("[data-testid=account-mode][data-account=A2]")
    await expect(row).to_have_attribute("data-mode", "reducing")
    assert gw.manager.mode_of("A2") is Mode.REDUCING


# ------------------------------------------------------------ alerts, exposure


@bounded
async def test_alerts_feed_shows_emergency_changed(gw: RunningGateway, page: Page) -> None:
    admin = await gw.client(ADMIN)
    # Before the page connects: it arrives in the alerts snapshot.
    await admin.ok("emergency.set", {"mode": "reducing", "reason": "desk review"})
    await sign_in(page, gw, VIEWER)
    items = page.get_by_test_id("alert-item")
    await expect(items).to_have_count(1)
    await expect(items.first).to_have_attribute("data-code", "EMERGENCY_CHANGED")
    await expect(items.first).to_contain_text("reducing")

    # After: as a live event, newest first, coloured by level.
    await admin.ok("emergency.set", {"mode": "halted", "reason": "exchange outage"})
    await expect(items).to_have_count(2)
    first = items.first
    await expect(first).to_have_attribute("data-code", "EMERGENCY_CHANGED")
    await expect(first).to_have_attribute("data-level", "critical")
    await expect(first).to_contain_class("level-critical")
    await expect(first).to_contain_text("exchange outage")
    await expect(items.nth(1)).to_have_attribute("data-level", "warning")

    await page.get_by_test_id("alert-filter").select_option("critical")
    await expect(items).to_have_count(1)
    await page.get_by_test_id("alert-filter").select_option("info")
    await expect(items).to_have_count(2)


@bounded
async def test_exposure_rows_after_position_update(make_gateway: Any, page: Page) -> None:
    gw = await make_gateway(limits={"max_exposure": "1000000", "max_account_exposure": "400000"})
    await sign_in(page, gw, ADMIN)
    await expect(page.get_by_test_id("exposure-row")).to_have_count(0)
    trader = await gw.client(TRADER)
    await trader.ok(
        "position.update", {"account": "A1", "symbol": "BTC-USD", "qty": "2", "price": "50000"}
    )
    row = page.locator("[data-testid=exposure-row][data-account=A1]")
    await expect(row).to_be_visible()
    await expect(row.get_by_test_id("exposure-gross")).to_have_text("100,000")
    await expect(row.get_by_test_id("exposure-limit")).to_have_text("400,000")
    await expect(row.get_by_test_id("exposure-pct")).to_have_text("25%")
    await expect(page.get_by_test_id("exposure-global-gross")).to_have_text("100,000")
    await expect(page.get_by_test_id("exposure-global-limit")).to_have_text("1,000,000")

    other = await gw.client(TRADER_B)
    await other.ok(
        "position.update", {"account": "B1", "symbol": "ETH-USD", "qty": "-100", "price": "3000"}
    )
    await expect(page.get_by_test_id("exposure-row")).to_have_count(2)
    b1 = page.locator("[data-testid=exposure-row][data-account=B1]")
    await expect(b1.get_by_test_id("exposure-pct")).to_have_text("75%")
    await expect(page.get_by_test_id("exposure-global-gross")).to_have_text("400,000")
    # Accounts in order; the A1 row was updated in place, not duplicated.
    accounts = await page.get_by_test_id("exposure-row").evaluate_all(
        "rows => rows.map(r => r.dataset.account)"
    )
    assert accounts == ["A1", "B1"]


# --------------------------------------------------------- seq and reconnects


@bounded
async def test_reconnects_and_resumes_after_a_dropped_connection(
    gw: RunningGateway, page: Page
) -> None:
    sockets = record_frames(page)
    await sign_in(page, gw, ADMIN)
    assert len(gw.gateway.sessions) == 1  # the page's own connection
    [session] = gw.gateway.sessions.values()
    seqs = await page.evaluate("window.riskDashboard.seqs()")

    # Drop it, and change state while the page is away (the first retry
    # waits at least 250 ms).
    admin = await gw.client(ADMIN)
    await session.ws.close(1012, "going away for a moment")
    await admin.ok("emergency.set", {"mode": "reducing", "reason": "while you were away"})

    await expect(page.get_by_test_id("mode-text")).to_have_text("REDUCING")
    await expect(page.get_by_test_id("connection-status")).to_have_attribute("data-state", "live")
    await expect(page.get_by_test_id("alert-item")).to_have_count(1)
    assert len(sockets) == 2
    [resubscribe] = subscribes(sockets[1])
    assert resubscribe["resume"] == {ch: seqs[ch] for ch in ("alerts", "exposure", "decisions")}
    after = await page.evaluate("window.riskDashboard.seqs()")
    assert after["alerts"] == seqs["alerts"] + 1  # the missed event, replayed
    assert await page.evaluate("window.riskDashboard.resyncs()") == 0


@bounded
async def test_shows_disconnected_then_recovers_when_the_gateway_returns(
    make_gateway: Any, page: Page, tmp_path: Path
) -> None:
    state_dir = tmp_path / "restarting"
    first = await make_gateway(state_dir=state_dir)
    port = first.gateway.port
    sockets = record_frames(page)
    await sign_in(page, first, ADMIN)
    await first.gateway.stop()

    status = page.get_by_test_id("connection-status")
    await expect(status).to_have_attribute("data-state", "disconnected")
    await expect(status).to_contain_text("reconnecting")
    stale = page.get_by_test_id("banner-stale")
    await expect(stale).to_be_visible()
    await expect(stale).to_contain_text("Disconnected — reconnecting")

    second = await make_gateway(state_dir=state_dir, server={"port": port})
    admin = await second.client(ADMIN)
    await admin.ok("emergency.set", {"mode": "halted", "reason": "restarted halted"})
    await expect(page.get_by_test_id("mode-text")).to_have_text("HALTED", timeout=15000)
    await expect(status).to_have_attribute("data-state", "live")
    await expect(stale).to_be_hidden()
    # A new epoch: seqs restarted, so snapshots are asked for, not a resume.
    last = subscribes(sockets[-1])
    assert last and "resume" not in last[0]


@bounded
async def test_seq_gap_takes_a_fresh_snapshot(make_gateway: Any, page: Page) -> None:
    # A slow heartbeat, so that the next event is what reveals the gap.
    gw = await make_gateway(server={"heartbeat_s": 30})
    dropped: list[dict[str, Any]] = []
    sent: list[dict[str, Any]] = []

    def route(ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()

        def from_page(message: str | bytes) -> None:
            sent.append(json.loads(message))
            server.send(message)

        def from_server(message: str | bytes) -> None:
            push = json.loads(message)
            if push.get("channel") == "alerts" and "snapshot" not in push and not dropped:
                dropped.append(push)  # lost on the way
                return
            ws.send(message)

        ws.on_message(from_page)
        server.on_message(from_server)

    await page.route_web_socket("**/v1/ws", route)
    await sign_in(page, gw, ADMIN)
    admin = await gw.client(ADMIN)
    await admin.ok("emergency.set", {"mode": "reducing", "reason": "first"})
    await expect(page.get_by_test_id("mode-text")).to_have_text("REDUCING")
    items = page.get_by_test_id("alert-item")
    await expect(items).to_have_count(0)  # its alert was lost: nothing shows it yet
    assert dropped

    await admin.ok("emergency.set", {"mode": "halted", "reason": "second"})
    # seq 2 after 0: re-subscribed without resume, and the snapshot has both.
    await expect(items).to_have_count(2)
    await expect(items.first).to_contain_text("second")
    assert {"channels": ["alerts"]} in [f.get("params") for f in sent]
    assert await page.evaluate("window.riskDashboard.resyncs()") == 1


@bounded
async def test_heartbeat_reveals_a_lost_last_event(make_gateway: Any, page: Page) -> None:
    gw = await make_gateway(server={"heartbeat_s": 0.2})
    dropped: list[dict[str, Any]] = []

    def route(ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()

        def from_server(message: str | bytes) -> None:
            push = json.loads(message)
            if push.get("channel") == "alerts" and "snapshot" not in push and not dropped:
                dropped.append(push)
                return
            ws.send(message)

        server.on_message(from_server)

    await page.route_web_socket("**/v1/ws", route)
    await sign_in(page, gw, ADMIN)
    admin = await gw.client(ADMIN)
    await admin.ok("emergency.set", {"mode": "reducing", "reason": "only event"})
    # No later event: the heartbeat's seqs show the loss, a snapshot repairs it.
    items = page.get_by_test_id("alert-item")
    await expect(items).to_have_count(1, timeout=3000)
    assert dropped
    assert await page.evaluate("window.riskDashboard.resyncs()") == 1


@bounded
async def test_silence_marks_the_view_stale(make_gateway: Any, page: Page) -> None:
    gw = await make_gateway(server={"heartbeat_s": 0.2})
    mute = asyncio.Event()

    def route(ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()

        def from_server(message: str | bytes) -> None:
            if not mute.is_set():
                ws.send(message)

        server.on_message(from_server)

    await page.route_web_socket("**/v1/ws", route)
    await sign_in(page, gw, ADMIN)
    status = page.get_by_test_id("connection-status")
    await expect(status).to_have_attribute("data-state", "live")
    mute.set()  # 3 x 0.2 s without a frame
    await expect(status).to_have_attribute("data-state", "stale", timeout=3000)
    await expect(status).to_contain_text("Stale")
    await expect(page.get_by_test_id("banner-stale")).to_contain_text("no heartbeat")
    mute.clear()
    await expect(status).to_have_attribute("data-state", "live", timeout=3000)
    await expect(page.get_by_test_id("banner-stale")).to_be_hidden()


# -------------------------------------------------------------- screenshot


async def make_screenshot(path: Path = SCREENSHOT) -> None:
    """Render a realistic state (positions, a reducing gateway, alerts) to ``path``."""
    with tempfile.TemporaryDirectory() as state:
        gw = await start_gateway(
            Path(state),
            limits={"max_exposure": "2000000", "max_account_exposure": "600000"},
        )
        try:
            await _stage(gw)
            async with async_playwright() as playwright:
                browser = await _launch(playwright)
                try:
                    context = await browser.new_context(
                        viewport={"width": 1440, "height": 980}, device_scale_factor=1
                    )
                    page = await context.new_page()
                    await sign_in(page, gw, ADMIN)
                    await expect(page.get_by_test_id("exposure-row")).to_have_count(3)
                    await page.screenshot(path=str(path), full_page=True)
                finally:
                    await browser.close()
        finally:
            await gw.close_clients()
            await gw.stopped()


async def _stage(gw: RunningGateway) -> None:
    desk1 = await gw.client(TRADER)
    desk2 = await gw.client(TRADER_B)
    admin = await gw.client(ADMIN)
    for trader, account, symbol, qty, price in [
        (desk1, "A1", "BTC-USD", "6", "64250"),
        (desk1, "A1", "ETH-USD", "-40", "3120.5"),
        (desk1, "A2", "SOL-USD", "1500", "142.35"),
        (desk2, "B1", "BTC-USD", "3", "64260"),
    ]:
        await trader.ok(
            "position.update", {"account": account, "symbol": symbol, "qty": qty, "price": price}
        )
    await desk1.ok(
        "position.update",
        {"account": "A2", "symbol": "SOL-USD", "qty": "1500", "price": "142.35", "seq": 10},
    )
    await desk1.ok(
        "position.update",
        {"account": "A2", "symbol": "SOL-USD", "qty": "1480", "price": "142.40", "seq": 12},
    )
    await desk1.ok(
        "position.snapshot",
        {"account": "A2", "positions": [{"symbol": "SOL-USD", "qty": "1480", "price": "142.40"}]},
    )
    await admin.ok(
        "emergency.set",
        {"mode": "halted", "reason": "Reconciliation break with prime broker", "account": "B1"},
    )
    await admin.ok(
        "emergency.set",
        {"mode": "reducing", "reason": "Venue connectivity degraded: reduce risk only"},
    )
    for account, side, qty, price in [
        ("A1", "sell", "2", "64200"),
        ("A1", "buy", "1", "64300"),
        ("A2", "sell", "200", "142.30"),
    ]:
        await desk1.ok(
            "order.validate",
            {
                "account": account,
                "symbol": "BTC-USD" if account == "A1" else "SOL-USD",
                "side": side,
                "qty": qty,
                "price": price,
            },
        )
    await desk2.ok(
        "order.validate",
        {"account": "B1", "symbol": "BTC-USD", "side": "sell", "qty": "1", "price": "64250"},
    )


if __name__ == "__main__":
    if not CHROMIUM.exists():
        sys.exit(f"{CHROMIUM} is missing")
    asyncio.run(make_screenshot())
    print(f"wrote {SCREENSHOT}")


async def test_exposure_table_shows_the_effective_mode(make_gateway: Any, page: Page) -> None:
    """The gateway's halted wins over an account's normal; an account's own
    stricter mode wins over a looser gateway mode."""
    gw = await make_gateway()
    await sign_in(page, gw, ADMIN)
    trader = await gw.client(TRADER)
    await trader.ok(
        "position.update", {"account": "A1", "symbol": "BTC-USD", "qty": "1", "price": "50000"}
    )
    mode = page.locator("[data-testid=exposure-row][data-account=A1]").get_by_test_id(
        "exposure-mode"
    )
    await expect(mode).to_have_text("normal")
    admin = await gw.client(ADMIN)
    await admin.ok("emergency.set", {"mode": "halted", "reason": "venue down"})
    await expect(mode).to_have_text("halted", timeout=2000)
    await admin.ok("emergency.set", {"mode": "reducing", "reason": "desk", "account": "A1"})
    await expect(mode).to_have_text("halted")  # the gateway's halt is stricter
    await admin.ok("emergency.set", {"mode": "normal", "reason": "venue back"})
    await expect(mode).to_have_text("reducing", timeout=2000)


async def _busy_gateway(make_gateway: Any) -> RunningGateway:
    """A gateway with many alerts and decisions, and a long reason."""
    gw = await make_gateway()
    admin = await gw.client(ADMIN)
    trader = await gw.client(TRADER)
    for n in range(40):
        mode = "halted" if n % 2 == 0 else "normal"
        await admin.ok("emergency.set", {"mode": mode, "reason": f"drill number {n}"})
    order = {"account": "A1", "symbol": "BTC-USD", "side": "buy", "price": "50000"}
    for n in range(120):
        await trader.ok("order.validate", {**order, "qty": "1" if n % 3 else "999999999"})
    await admin.ok(
        "emergency.set",
        {"mode": "halted", "reason": "exchange outage on every venue " * 4, "account": None},
    )
    return gw


@pytest.mark.parametrize("viewport", [(1400, 900), (390, 844)])
async def test_the_page_fits_the_screen(
    make_gateway: Any, browser: Browser, viewport: tuple[int, int], tmp_path: Path
) -> None:
    """One screen tall at 1400x900 (lists scroll inside their panels); nothing
    wider than a phone at 390 px, the banner's text inside it."""
    gw = await _busy_gateway(make_gateway)
    width, height = viewport
    context = await browser.new_context(viewport={"width": width, "height": height})
    page = await context.new_page()
    try:
        await sign_in(page, gw, ADMIN)
        await expect(page.get_by_test_id("alerts-list").locator("li")).not_to_have_count(0)
        await expect(page.get_by_test_id("decisions-list").locator("tr")).not_to_have_count(0)
        sizes = await page.evaluate(
            """() => {
                const root = document.documentElement;
                const banner = document.querySelector('[data-testid=emergency-banner]');
                const overflowing = [...banner.querySelectorAll('*')].filter(
                    e => e.scrollWidth > e.clientWidth + 1
                        && getComputedStyle(e).overflowX !== 'hidden'
                ).map(e => e.id || e.className);
                return {scrollWidth: root.scrollWidth, innerWidth: window.innerWidth,
                        scrollHeight: root.scrollHeight, overflowing,
                        bannerWidth: banner.scrollWidth, bannerBox: banner.clientWidth};
            }"""
        )
        assert sizes["scrollWidth"] <= sizes["innerWidth"], sizes
        assert sizes["bannerWidth"] <= sizes["bannerBox"] + 1 and not sizes["overflowing"], sizes
        if width >= 1400:
            assert sizes["scrollHeight"] <= height, sizes
        await page.wait_for_function("() => window.RiskCharts.summary().drawn >= 2")
        # DASHBOARD_SHOTS=docs keeps the screenshots (docs/dashboard-*.png).
        shots = Path(os.environ.get("DASHBOARD_SHOTS", tmp_path))
        name = f"dashboard-{width}x{height}.png"
        await page.screenshot(path=str(shots / name), full_page=width < 1400)
    finally:
        await context.close()


async def test_charts_plot_exposure_utilisation_and_decisions(
    make_gateway: Any, page: Page
) -> None:
    gw = await make_gateway(limits={"max_exposure": "1000000", "max_account_exposure": "400000"})
    await sign_in(page, gw, ADMIN)
    trader = await gw.client(TRADER)
    await trader.ok(
        "position.update", {"account": "A1", "symbol": "BTC-USD", "qty": "2", "price": "50000"}
    )
    order = {"account": "A1", "symbol": "BTC-USD", "side": "buy", "price": "50000"}
    for n in range(6):
        await trader.ok("order.validate", {**order, "qty": "1" if n % 2 else "999999999"})
    await expect(page.locator("#charts-panel .uplot canvas")).to_have_count(3, timeout=5000)
    summary = await page.evaluate("() => window.RiskCharts.summary()")
    assert summary["accounts"] == ["A1"] and summary["exposurePoints"] >= 1, summary
    assert summary["accepts"] == 3 and summary["rejects"] == 3, summary
    reason = page.locator("[data-testid=top-reason]").first
    await expect(reason).to_have_attribute("data-code", re.compile(r"MAX_\w+"))
    # The vendored library is served by the gateway itself (no CDN).
    scripts = await page.evaluate("() => [...document.scripts].map(s => new URL(s.src).host)")
    assert set(scripts) == {gw.url.split("/")[2]}
    # A reload (a phone's tab coming back) starts with the last 15 minutes
    # the gateway kept, counted once: more decisions than the decisions
    # snapshot holds (100), so only the gateway's history can have them all.
    for n in range(6, 120):
        await trader.ok("order.validate", {**order, "qty": "1" if n % 2 else "999999999"})
    await page.wait_for_function("() => window.RiskCharts.summary().rejects === 60")
    await page.reload()
    await expect(page.locator("#charts-panel .uplot canvas")).to_have_count(3, timeout=5000)
    await page.wait_for_function("() => window.RiskCharts.summary().rejects >= 50")
    again = await page.evaluate("() => window.RiskCharts.summary()")
    assert again["accounts"] == ["A1"] and again["exposurePoints"] >= 1, again
    assert again["accepts"] == 60 and again["rejects"] == 60, again
    await expect(reason).to_have_attribute("data-code", re.compile(r"MAX_\w+"))
