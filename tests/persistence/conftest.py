"""Fixtures for the persistence tests, which run on ``tmp_path`` without a gateway."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest


@pytest.fixture
async def tasks() -> AsyncIterator[asyncio.TaskGroup]:
    """The TaskGroup a test starts its journals in.

    Leaving it after the test checks what a journal's owner relies on: once
    every journal is closed, its writer task ends (within 10 s), without an
    error escaping into the group.
    """
    group = asyncio.TaskGroup()
    await group.__aenter__()
    yield group
    async with asyncio.timeout(10):
        await group.__aexit__(None, None, None)
