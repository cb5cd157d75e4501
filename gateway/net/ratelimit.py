"""The per-connection frame-rate limit (docs/protocol.md, section 2).

A connection may send ``limit`` frames per one-second window; each frame
beyond that is answered ``RATE_LIMITED``, and a connection that keeps going
over the limit for two seconds is closed 4008. A window starts with the
first frame at least a second after the current window started (windows
are not aligned to the clock, and a silence opens no window).

A frame over the limit closes the connection when every window since one
that started at least 2 s earlier was over the limit too. Windows are opened
only by frames: a silence between two windows over the limit does not count
as a window under it.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

__all__ = ["FrameRateLimiter", "Verdict"]

#: The length of a counting window (s).
WINDOW_S = 1.0
#: How long a connection may stay over the limit before it is closed (s).
CLOSE_AFTER_S = 2.0


class Verdict(enum.Enum):
    """What the read loop does with a frame."""

    #: Handle the frame.
    ALLOW = "allow"
    #: Answer it ``RATE_LIMITED`` without handling it.
    REFUSE = "refuse"
    #: Close the connection with 4008 (``TOO_MANY_MESSAGES``).
    CLOSE = "close"


class FrameRateLimiter:
    """Counts one connection's frames; ``check`` once per frame read.

    ``clock`` is monotonic seconds (``time.monotonic`` unless a test pins it).
    """

    __slots__ = ("_clock", "_count", "_over_since", "_window_start", "limit")

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        #: Frames allowed per window.
        self.limit = limit
        self._clock = clock
        self._window_start: float | None = None
        self._count = 0
        # Start of the first of the consecutive windows over the limit.
        self._over_since: float | None = None

    def check(self) -> Verdict:
        """Count one frame just read and say what to do with it.

        A refused frame counts too: a client that keeps sending while
        refused stays over the limit.
        """
        now = self._clock()
        start = self._window_start
        if start is None or now - start >= WINDOW_S:
            if start is not None and self._count > self.limit:
                if self._over_since is None:
                    self._over_since = start
            else:
                self._over_since = None
            self._window_start = now
            self._count = 0
        self._count += 1
        if self._count <= self.limit:
            return Verdict.ALLOW
        if self._over_since is not None and now - self._over_since >= CLOSE_AFTER_S:
            return Verdict.CLOSE
        return Verdict.REFUSE
