"""wsio's tests run on both event loops: asyncio's (the tests' default) and
uvloop's, which ``risk-gateway serve`` runs on (its transports are not
asyncio's, and wsio relies on their flow control). Other tests here run on
asyncio's alone."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop

_BOTH_LOOPS = frozenset({"test_wsio.py"})


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.path.name in _BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}
