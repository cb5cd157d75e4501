"""The per-connection frame-rate limiter, on a pinned clock."""

from __future__ import annotations

import random

import pytest

from gateway.net.ratelimit import FrameRateLimiter, Verdict

ALLOW, REFUSE, CLOSE = Verdict.ALLOW, Verdict.REFUSE, Verdict.CLOSE


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def burst(limiter: FrameRateLimiter, clock: Clock, at: float, frames: int) -> list[Verdict]:
    """``frames`` frames read at ``at`` seconds."""
    clock.now = at
    return [limiter.check() for _ in range(frames)]


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_check_when_under_the_limit_then_every_frame_allowed(clock: Clock) -> None:
    limiter = FrameRateLimiter(3, clock)
    for second in range(10):
        assert burst(limiter, clock, 1000 + second, 3) == [ALLOW] * 3


def test_check_when_over_the_limit_in_a_window_then_the_rest_refused(clock: Clock) -> None:
    limiter = FrameRateLimiter(3, clock)
    assert burst(limiter, clock, 1000.0, 5) == [ALLOW] * 3 + [REFUSE] * 2
    assert burst(limiter, clock, 1000.9, 1) == [REFUSE]  # the same window
    assert burst(limiter, clock, 1001.0, 3) == [ALLOW] * 3  # a new window


def test_check_when_window_starts_then_at_the_first_frame_not_on_the_clock(clock: Clock) -> None:
    limiter = FrameRateLimiter(2, clock)
    assert burst(limiter, clock, 1000.5, 2) == [ALLOW] * 2
    # 1001.2 is on the next whole second but in the window opened at 1000.5.
    assert burst(limiter, clock, 1001.2, 1) == [REFUSE]
    assert burst(limiter, clock, 1001.5, 2) == [ALLOW] * 2


def test_check_when_over_the_limit_for_two_seconds_then_close(clock: Clock) -> None:
    limiter = FrameRateLimiter(2, clock)
    assert burst(limiter, clock, 1000.0, 3) == [ALLOW, ALLOW, REFUSE]
    assert burst(limiter, clock, 1001.0, 3) == [ALLOW, ALLOW, REFUSE]  # over for 1 s
    assert burst(limiter, clock, 1002.0, 3) == [ALLOW, ALLOW, CLOSE]  # over for 2 s


def test_check_when_refused_frames_keep_coming_then_they_count(clock: Clock) -> None:
    limiter = FrameRateLimiter(2, clock)
    assert burst(limiter, clock, 1000.0, 2) == [ALLOW, ALLOW]
    clock.now = 1000.9
    assert limiter.check() is REFUSE  # only this one over the limit: still over
    assert burst(limiter, clock, 1001.0, 3) == [ALLOW, ALLOW, REFUSE]
    assert burst(limiter, clock, 1002.0, 3) == [ALLOW, ALLOW, CLOSE]


def test_check_when_a_window_under_the_limit_comes_between_then_counting_restarts(
    clock: Clock,
) -> None:
    limiter = FrameRateLimiter(2, clock)
    assert burst(limiter, clock, 1000.0, 3)[-1] is REFUSE
    assert burst(limiter, clock, 1001.0, 3)[-1] is REFUSE
    assert burst(limiter, clock, 1002.0, 2) == [ALLOW, ALLOW]  # under: the run ends
    assert burst(limiter, clock, 1003.0, 3)[-1] is REFUSE
    assert burst(limiter, clock, 1004.0, 3)[-1] is REFUSE  # over for 1 s only
    assert burst(limiter, clock, 1005.0, 3)[-1] is CLOSE


def test_check_when_silence_between_windows_over_the_limit_then_no_window_under_it(
    clock: Clock,
) -> None:
    # Windows are opened by frames: a silence is not a window under the limit.
    limiter = FrameRateLimiter(2, clock)
    assert burst(limiter, clock, 1000.0, 3)[-1] is REFUSE
    assert burst(limiter, clock, 1010.0, 3) == [ALLOW, ALLOW, CLOSE]


def test_check_when_over_within_two_seconds_of_the_first_window_then_refused_not_closed(
    clock: Clock,
) -> None:
    limiter = FrameRateLimiter(2, clock)
    assert burst(limiter, clock, 1000.0, 3)[-1] is REFUSE
    assert burst(limiter, clock, 1001.5, 3)[-1] is REFUSE  # 1.5 s since the first
    assert burst(limiter, clock, 1001.99, 1) == [REFUSE]  # 1.99 s, same window
    assert burst(limiter, clock, 1002.5, 3)[-1] is CLOSE  # the next window, 2.5 s


class ReadLoopRule:
    """The rule as the read loop applied it inline before the limiter existed
    (its session fields and statements, verbatim), to hold the two equal."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.window_start = 0.0
        self.window_count = 0
        self.over_since: float | None = None

    def check(self, now: float) -> Verdict:
        limit = self.limit
        if now - self.window_start >= 1.0:
            if self.window_count > limit:
                if self.over_since is None:
                    self.over_since = self.window_start
            else:
                self.over_since = None
            self.window_start = now
            self.window_count = 0
        self.window_count += 1
        if self.window_count > limit:
            if self.over_since is not None and now - self.over_since >= 2.0:
                return CLOSE
            return REFUSE
        return ALLOW


@pytest.mark.parametrize("seed", range(20))
def test_check_when_random_traffic_then_same_verdicts_as_the_read_loop_rule(seed: int) -> None:
    rng = random.Random(seed)
    limit = rng.randint(1, 5)
    clock = Clock(rng.uniform(1, 10_000))
    limiter, reference = FrameRateLimiter(limit, clock), ReadLoopRule(limit)
    for _ in range(2000):
        clock.now += rng.choice([0.0, 0.0, 0.01, rng.uniform(0, 0.5), rng.uniform(0, 3)])
        verdict = limiter.check()
        assert verdict is reference.check(clock.now)
        if verdict is CLOSE:  # the connection is gone: start another
            limiter, reference = FrameRateLimiter(limit, clock), ReadLoopRule(limit)
