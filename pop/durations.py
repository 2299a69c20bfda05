"""How long probes take, per tier: the counts behind pop_check_duration_seconds. Pure.

Every probe that returns (successes, failures and timeouts alike) is counted in the bucket
its duration falls in; the buckets cover 1 ms (a TCP connect on the LAN) to 5 s (a check's
longest timeout). Cost per probe: one bisect and two additions.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True, slots=True)
class Durations:
    counts: tuple[int, ...]  # per bucket (le BUCKETS[i]), then one for +Inf; not cumulative
    total: float  # seconds, summed

    @property
    def cumulative(self) -> list[tuple[str, int]]:
        return cumulative(BUCKETS, self.counts)


def cumulative(buckets: Sequence[float], counts: Sequence[int]) -> list[tuple[str, int]]:
    """(le, count) pairs as Prometheus wants them, +Inf last, from per-bucket counts."""
    pairs, running = [], 0
    for bound, count in zip((*(f"{b:g}" for b in buckets), "+Inf"), counts, strict=True):
        running += count
        pairs.append((bound, running))
    return pairs


class DurationBook:
    def __init__(self) -> None:
        self._counts: dict[str, list[int]] = {}
        self._totals: dict[str, float] = {}

    def observe(self, tier: str, seconds: float) -> None:
        counts = self._counts.get(tier)
        if counts is None:  # not setdefault(): that would build the list on every probe
            counts = self._counts[tier] = [0] * (len(BUCKETS) + 1)
        counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self._totals[tier] = self._totals.get(tier, 0.0) + seconds

    def snapshot(self) -> Mapping[str, Durations]:
        return {tier: Durations(tuple(counts), self._totals[tier]) for tier, counts in self._counts.items()}
