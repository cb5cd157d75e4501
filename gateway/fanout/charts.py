"""The last 15 minutes of what the dashboard plots, so that a page opened or
reloaded now (on a phone, say) shows the history, not an empty chart.

Kept from what the fan-out pushes: each exposure push (the account's gross
and limit, the gateway's gross and limit) and each decision. Exposure is kept
as the last value in each 5-second slot, decisions as counts per second
(accept, reject, and the reject reasons' codes). Everything older than the
window is dropped as new entries come, so the memory is bounded by the slots
of the window times the accounts that moved in it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from protocol.values import format_time_ms

WINDOW_MS = 15 * 60 * 1000
EXPOSURE_SLOT_MS = 5000
DECISION_SLOT_MS = 1000


class _Series:
    """``[slot_ms, *values]`` points, one per slot, oldest first."""

    __slots__ = ("points",)

    def __init__(self) -> None:
        self.points: deque[list[Any]] = deque()

    def last_in(self, slot: int) -> list[Any] | None:
        points = self.points
        return points[-1] if points and points[-1][0] == slot else None

    def trim(self, oldest: int) -> None:
        points = self.points
        while points and points[0][0] < oldest:
            points.popleft()


class ChartHistory:
    """Exposure and decision counts over the last ``window_ms``."""

    def __init__(self, window_ms: int = WINDOW_MS) -> None:
        self.window_ms = window_ms
        self._gateway = _Series()
        self._accounts: dict[str, _Series] = {}
        self._decisions = _Series()

    def exposure(self, data: Mapping[str, Any], now_ms: int) -> None:
        """An ``exposure`` push: ``account, gross, limit, global, global_limit``."""
        slot = now_ms - now_ms % EXPOSURE_SLOT_MS
        oldest = now_ms - self.window_ms
        _put(self._gateway, slot, [slot, data["global"], data["global_limit"]], oldest)
        series = self._accounts.get(data["account"])
        if series is None:
            series = self._accounts[data["account"]] = _Series()
        _put(series, slot, [slot, data["gross"], data["limit"]], oldest)

    def decision(self, data: Mapping[str, Any], now_ms: int) -> None:
        """A ``decisions`` entry."""
        slot = now_ms - now_ms % DECISION_SLOT_MS
        series = self._decisions
        point = series.last_in(slot)
        if point is None:
            point = [slot, 0, 0, {}]
            series.points.append(point)
            series.trim(now_ms - self.window_ms)
        if data["decision"] == "accept":
            point[1] += 1
        else:
            point[2] += 1
            reasons: dict[str, int] = point[3]
            for reason in data["reasons"]:
                reasons[reason["code"]] = reasons.get(reason["code"], 0) + 1

    def view(
        self, now_ms: int, *, readable: Callable[[str], bool] | None, decisions: bool
    ) -> dict[str, Any]:
        """The ``history.get`` result: ``readable`` limits the accounts (a
        trader's own); ``decisions`` False leaves the counts out (a trader
        may not see the decisions). Times are as the wire writes them."""
        oldest = now_ms - self.window_ms
        self._gateway.trim(oldest)
        accounts: dict[str, list[list[Any]]] = {}
        for name in sorted(self._accounts):
            series = self._accounts[name]
            series.trim(oldest)
            if not series.points:
                del self._accounts[name]
            elif readable is None or readable(name):
                accounts[name] = _wire(series)
        result: dict[str, Any] = {
            "window_s": self.window_ms // 1000,
            "gateway": _wire(self._gateway),
            "accounts": accounts,
        }
        if decisions:
            self._decisions.trim(oldest)
            result["decisions"] = [
                [format_time_ms(p[0]), p[1], p[2], dict(p[3])] for p in self._decisions.points
            ]
        return result


def _put(series: _Series, slot: int, point: list[Any], oldest: int) -> None:
    if series.last_in(slot) is not None:
        series.points[-1] = point
    else:
        series.points.append(point)
        series.trim(oldest)


def _wire(series: _Series) -> list[list[Any]]:
    return [[format_time_ms(p[0]), *p[1:]] for p in series.points]
