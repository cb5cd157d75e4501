"""The dashboard's cluster panel, in Chromium, against a 2-member cluster
(real Redis, real member processes) and against a single gateway, where the
panel stays hidden. Skipped as ``test_dashboard`` is without Chromium."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio

from clients.client import GatewayClient
from tests.browser.test_dashboard import _launch, _require_chromium, bounded
from tests.cluster.harness import ADMIN, TRADER, Cluster
from tests.cluster.redisproc import require_redis
from tests.conftest import start_gateway

try:
    from playwright.async_api import Browser, Page, async_playwright, expect
except ImportError:  # pragma: no cover - test_dashboard skips (or fails in CI) first
    pytest.skip("playwright is not installed", allow_module_level=True)

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]


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
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(5000)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    await context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


async def sign_in(page: Page, http: str, token: str) -> None:
    await page.goto(http + "/")
    await page.get_by_label("Access token").fill(token)
    await page.get_by_test_id("login-submit").click()
    await expect(page.get_by_test_id("connection-status")).to_have_attribute("data-state", "live")


async def until_seen(client: GatewayClient, member: str, **want: object) -> None:
    """Until ``cluster.get`` shows ``member`` with the ``want``ed fields."""
    deadline = time.monotonic() + 10
    while True:
        view = await client.cluster()
        found = {m["name"]: m for m in view["members"]}.get(member)
        if found is not None and all(found.get(k) == v for k, v in want.items()):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"cluster.get never showed {member} with {want}: {view}")
        await asyncio.sleep(0.05)


@bounded
async def test_cluster_panel_lists_members_and_refreshes(tmp_path: Path, page: Page) -> None:
    require_redis()
    cluster = Cluster(tmp_path, {"m1": ("A1",), "m2": ("B1",)})
    try:
        await cluster.start()
        m1 = cluster.members["m1"]
        admin = GatewayClient(m1.url, ADMIN, reconnect=False)
        async with admin:
            await admin.update_position("A1", "BTC-USD", 2, 50000)
            await admin.update_position("B1", "ETH-USD", -10, 3000)
            await until_seen(admin, "m1", exposure="100000")
            await until_seen(admin, "m2", exposure="30000", alive=True)

            # The page's timers stand still: it asks cluster.get only after the
            # hello, on an EMERGENCY, and when the clock is moved on.
            await page.clock.install()
            await page.clock.pause_at(datetime.now(UTC) + timedelta(seconds=1))
            await sign_in(page, m1.http, ADMIN)
            panel = page.get_by_test_id("cluster-panel")
            await expect(panel).to_be_visible()
            rows = page.get_by_test_id("cluster-member")
            await expect(rows).to_have_count(2)
            one = page.locator("[data-testid=cluster-member][data-member=m1]")
            two = page.locator("[data-testid=cluster-member][data-member=m2]")
            await expect(one).to_contain_text("this gateway")
            await expect(one).to_contain_text(m1.url)
            await expect(one).to_contain_text("A1")
            await expect(two).to_contain_text("B1")
            await expect(two).to_contain_text(cluster.members["m2"].url)
            await expect(two).to_have_attribute("data-alive", "true")
            await expect(one.get_by_test_id("cluster-exposure")).to_have_text("100,000")
            await expect(two.get_by_test_id("cluster-exposure")).to_have_text("30,000")
            await expect(page.get_by_test_id("cluster-gross")).to_have_text("130,000")
            await expect(one.get_by_test_id("cluster-credit")).not_to_have_text("—")
            summary = page.get_by_test_id("cluster-summary")
            await expect(summary).to_have_text("2 members, all alive")

            # An EMERGENCY push makes the page ask again.
            await admin.update_position("A1", "BTC-USD", 3, 50000)
            await until_seen(admin, "m1", exposure="150000")
            await expect(one.get_by_test_id("cluster-exposure")).to_have_text("100,000")
            await admin.emergency_set("reducing", "desk review", account="A1")
            await expect(one.get_by_test_id("cluster-exposure")).to_have_text("150,000")
            await expect(page.get_by_test_id("cluster-gross")).to_have_text("180,000")

            # So does the periodic refresh (every 2 s).
            await cluster.members["m2"].kill()
            await until_seen(admin, "m2", alive=False)
            await expect(two).to_have_attribute("data-alive", "true")
            await page.clock.run_for(2100)
            await expect(two).to_have_attribute("data-alive", "false")
            await expect(two.get_by_test_id("cluster-alive")).to_have_text("down")
            await expect(summary).to_have_text("2 members, down: m2")

        # A trader sees the members, not the figures.
        await page.get_by_test_id("sign-out").click()
        await sign_in(page, m1.http, TRADER)
        await expect(rows).to_have_count(2)
        await expect(one.get_by_test_id("cluster-credit")).to_have_text("—")
        await expect(page.get_by_test_id("cluster-gross")).to_have_text("—")
        await expect(page.get_by_test_id("cluster-note")).to_contain_text("viewers and admins")
    finally:
        await cluster.stop()


@bounded
async def test_cluster_panel_hidden_without_a_cluster(tmp_path: Path, page: Page) -> None:
    gw = await start_gateway(tmp_path / "single")
    try:
        await sign_in(page, f"http://127.0.0.1:{gw.gateway.port}", ADMIN)
        await expect(page.get_by_test_id("mode-text")).to_have_text("NORMAL")
        await expect(page.get_by_test_id("cluster-panel")).to_be_hidden()
        assert await page.evaluate("window.riskDashboard.cluster()") is None
    finally:
        await gw.stopped()
