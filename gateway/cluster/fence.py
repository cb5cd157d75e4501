"""The fence: "reachable or fenced", on a monotonic clock.

Each completed read of the shared state renews the member's freshness from
the moment the read was *sent* (the answer says the shared state was as read
at some instant after that, never before). A member whose freshness is more
than ``S`` (``max_staleness_ms``) old is fenced: it rejects every order. No
clock is compared across machines: only this process' monotonic clock.

A forgotten member (removed by an admin) stays fenced until it is restarted.
"""

from __future__ import annotations

import time
from collections.abc import Callable

_NS_PER_MS = 1_000_000


class Fence:
    """One member's fence. ``now`` is a monotonic clock in nanoseconds."""

    __slots__ = ("_fresh", "_limit_ns", "_now", "forgotten", "max_staleness_ms", "name")

    def __init__(
        self,
        max_staleness_ms: int,
        *,
        name: str,
        now: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.max_staleness_ms = max_staleness_ms
        self.name = name
        self._limit_ns = max_staleness_ms * _NS_PER_MS
        self._now = now
        #: Send time of the latest completed read (None: never renewed).
        self._fresh: int | None = None
        self.forgotten = False

    def renewed(self, sent_ns: int) -> None:
        """A read of the shared state sent at ``sent_ns`` completed."""
        fresh = self._fresh
        if fresh is None or sent_ns > fresh:
            self._fresh = sent_ns

    def forget(self) -> None:
        """The member was removed from the cluster: fenced for good."""
        self.forgotten = True

    @property
    def fenced(self) -> bool:
        fresh = self._fresh
        return self.forgotten or fresh is None or self._now() - fresh > self._limit_ns

    def stale_ms(self) -> int:
        """Milliseconds since the send time of the latest completed read."""
        fresh = self._fresh
        if fresh is None:
            return 0
        return (self._now() - fresh) // _NS_PER_MS

    def remaining_ms(self) -> int:
        """Milliseconds until the member fences itself (0 or less: fenced)."""
        fresh = self._fresh
        if fresh is None or self.forgotten:
            return 0
        return -(-(fresh + self._limit_ns - self._now()) // _NS_PER_MS)

    def rejection(self) -> tuple[str, str]:
        """The reason code and message of an order rejected while fenced."""
        if self.forgotten:
            return (
                "CLUSTER_UNAVAILABLE",
                f"member {self.name} was removed from the cluster (cluster forget); "
                "restart it to join again",
            )
        if self._fresh is None:
            return (
                "CLUSTER_UNAVAILABLE",
                f"member {self.name} has not reached the shared state yet",
            )
        return (
            "CLUSTER_UNAVAILABLE",
            f"member {self.name} has not reached the shared state for {self.stale_ms()} ms "
            f"(max_staleness_ms {self.max_staleness_ms})",
        )
