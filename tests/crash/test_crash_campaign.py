"""kill -9 campaign in the suite: 40 rounds of a mixed load, 0 acknowledged
changes lost, 0 versions reused (see ``tests/crash/crash_campaign.py``; run it for
longer with ``python -m tests.crash.crash_campaign --rounds 500``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.crash.crash_campaign import run_campaign

pytestmark = pytest.mark.crash

ROUNDS = 40
SEED = 20261202


async def test_kill9_campaign_when_mixed_load_then_nothing_acknowledged_lost_no_version_reused(
    tmp_path: Path,
) -> None:
    summary = await run_campaign(tmp_path, ROUNDS, SEED)
    assert summary.rounds == ROUNDS
    # The load must mean something: thousands of acknowledged changes.
    assert summary.acknowledged > ROUNDS * 20, summary
    print(
        f"kill -9 campaign: {summary.rounds} rounds, {summary.acknowledged} acknowledged, "
        "0 lost, 0 versions reused"
    )
