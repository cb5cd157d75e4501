"""The network tests run on both event loops: asyncio's (the tests' default)
and uvloop's, which ``risk-gateway serve`` runs on (its transports are not
asyncio's, and wsio relies on their flow control)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
