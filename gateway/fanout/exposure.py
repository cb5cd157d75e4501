"""When an account's exposure is pushed: at most once per window, ending on the final state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ExposureCoalescer"]


class ExposureCoalescer:
    """At most one exposure push per account every ``window_ms``.

    The first change after a quiet window is pushed at once; a change inside
    the window is pushed at the window's end, with the values at send time,
    so the last push always shows the final state. A push that would repeat
    the last one pushed for the account is skipped. Pure bookkeeping: the
    caller reads the clock and pushes.
    """

    __slots__ = ("_due", "_sent", "_sent_ms", "window_ms")

    def __init__(self, window_ms: int) -> None:
        self.window_ms = window_ms
        self._sent_ms: dict[str, int] = {}
        self._sent: dict[str, Mapping[str, Any]] = {}
        # account -> when its coalesced push is due (ms)
        self._due: dict[str, int] = {}

    def is_scheduled(self, account: str) -> bool:
        """True when a push for ``account`` already waits for its window's end
        (it will read the values at send time)."""
        return account in self._due

    def schedule(self, account: str, now_ms: int) -> bool:
        """``account`` changed at ``now_ms``: True when its push is now due at
        the end of the current window; False to push it at once."""
        sent = self._sent_ms.get(account)
        if sent is None or not 0 <= now_ms - sent < self.window_ms:
            return False
        self._due[account] = sent + self.window_ms
        return True

    def take_due(self, now_ms: int) -> list[str]:
        """The accounts whose push is due at ``now_ms``, no longer scheduled."""
        due = [account for account, at in self._due.items() if at <= now_ms]
        for account in due:
            del self._due[account]
        return due

    def next_due(self) -> int | None:
        """When the next scheduled push is due (ms), None when none is."""
        return min(self._due.values(), default=None)

    def last_due(self) -> int | None:
        """When the last scheduled push is due (ms), None when none is."""
        return max(self._due.values(), default=None)

    def record(self, account: str, data: Mapping[str, Any], now_ms: int) -> bool:
        """Record a push of ``data`` for ``account`` at ``now_ms``; False (and
        nothing recorded) when the last push already showed exactly that."""
        if self._sent.get(account) == data:
            return False
        self._sent[account] = data
        self._sent_ms[account] = now_ms
        return True
