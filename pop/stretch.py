"""Holding the probe schedule under load: how late probes start, and how far to stretch. Pure.

Every probe's start is compared with the time it was due; `Lateness` counts those delays in
buckets, cumulatively (pop_probe_lateness_seconds) and per window. Once a window is over,
`stretch(current, window)` says by how much every interval should be multiplied: when the
*median* probe of a window starts more than BEHIND late *and* the event loop's thread was
busy (on the CPU) for more than BUSY of the window, the engine cannot run all the probes it
owes, so every server's interval grows by the same factor (fair: nobody is left unprobed
while others keep their pace). Late probes from an idle engine mean a machine busy with
other things; stretching would only slow detection down, so that does not stretch. A busy
neighbour makes a few probes late and moves the p99, not the median. Once the median is
back under CAUGHT_UP, or the loop has room again (under IDLE), the factor shrinks step by
step to 1.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from pop import durations

BEHIND = 0.020  # median lateness of a window that means the engine cannot keep up (issue 12's p99 goal)
CAUGHT_UP = 0.005  # median lateness under which the schedule may tighten again
BUSY = 0.7  # share of the window the event loop's thread spent on the CPU: it has no room left
IDLE = 0.4  # room enough to tighten the schedule again
GROW = 1.25
SHRINK = 1.2
MAX_STRETCH = 10.0
WINDOW = 1.0  # seconds of probe starts judged together
SPREAD = 100  # servers of a tier whose first probes start within one fast interval; more spread further

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True, slots=True)
class Window:
    """The probe starts of one window: how many, and their lateness quantiles (upper bounds)."""

    probes: int
    p50: float
    p99: float
    busy: float = 0.0  # share of the window the event loop's thread spent on the CPU


class Lateness:
    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # since start, per bucket, +Inf last
        self.total = 0.0
        self._window = [0] * (len(BUCKETS) + 1)

    def observe(self, seconds: float) -> None:
        index = bisect.bisect_left(BUCKETS, seconds)
        self.counts[index] += 1
        self._window[index] += 1
        self.total += seconds

    def close_window(self, busy: float) -> Window:
        """The window since the last call, which starts the next one; `busy` as measured over it."""
        counts, self._window = self._window, [0] * (len(BUCKETS) + 1)
        probes = sum(counts)
        return Window(probes, _quantile(counts, probes, 0.5), _quantile(counts, probes, 0.99), busy)


def _quantile(counts: list[int], probes: int, q: float) -> float:
    """The bucket bound under which a share q of the probes started (+Inf: the last bound doubled)."""
    if probes == 0:
        return 0.0
    running = 0
    for index, count in enumerate(counts):
        running += count
        if running >= q * probes:
            return BUCKETS[index] if index < len(BUCKETS) else BUCKETS[-1] * 2
    raise AssertionError("unreachable: the counts sum to probes")


def stretch(current: float, window: Window) -> float:
    """The factor on every interval after this window (1.0: the configured schedule)."""
    if window.probes == 0:
        return current
    if window.p50 > BEHIND and window.busy > BUSY:
        return min(MAX_STRETCH, current * GROW)
    if (window.p50 <= CAUGHT_UP or window.busy < IDLE) and current > 1.0:
        return max(1.0, current / SHRINK)
    return current


def first_spread(servers: int, interval: float, fast_interval: float) -> float:
    """Over how many seconds the first probes of a tier's `servers` start.

    At the start every server is INIT and probes at the fast pace until it has risen. A few
    servers may all do that at once; a thousand would demand four times the steady rate of
    probes (twenty times for WireGuard) and rise in one burst, each rise a decision of its
    own. Beyond SPREAD servers the first probes spread further, up to one interval: the
    demand at the start stays near the steady one, and the rise takes at most one interval
    longer.
    """
    return min(interval, max(fast_interval, fast_interval * servers / SPREAD))


@dataclass(frozen=True, slots=True)
class Schedule:
    """How the probe schedule holds, for /status and /metrics."""

    stretch: float  # the factor on every interval (1.0: as configured)
    window: Window  # the last full window of probe starts
    counts: tuple[int, ...]  # lateness since start, per bucket (le BUCKETS[i]), +Inf last; not cumulative
    total: float  # seconds of lateness, summed

    @property
    def behind(self) -> bool:
        return self.stretch > 1.0

    @property
    def cumulative(self) -> list[tuple[str, int]]:
        return durations.cumulative(BUCKETS, self.counts)
