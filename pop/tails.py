"""Latency tails and failure rates per server and tier, and the degraded mark. Pure.

Every probe result of a server's tier goes into that tier's `Window`: the outcomes and RTTs
of the last `window` seconds (time-bounded) and at most `max_samples` of them (fixed
memory: a server probed fast while it changes cannot grow it). `Window.summary(now)` gives
p50/p95/p99 of the successful probes' RTTs (nearest rank) and the failure rate.

A server is *degraded* while one of its tiers passes a configured threshold (p99 or failure
rate) on at least `min_samples` results; it stops being degraded only when every tier is
back below `recover` times each threshold (hysteresis: a p99 hovering at the threshold does
not flap the weight). A degraded server stays in the pool with its weight scaled by
`weight_factor`: slow is not down.

Time is an argument everywhere: the tests pass it in.
"""

from __future__ import annotations

import array
import bisect
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from pop.checks.base import CheckResult


@dataclass(frozen=True, slots=True)
class Policy:
    """`tails:` in pop.yaml (pop/config_tails.py)."""

    window: float = 60.0  # seconds of results kept per server and tier
    max_samples: int = 600  # and never more than this many
    p99: float | None = None  # seconds: degraded above this p99 (None: no latency threshold)
    failure_rate: float | None = None  # 0..1: degraded above this (None: no failure threshold)
    min_samples: int = 20  # fewer results in the window decide nothing
    recover: float = 0.8  # back below threshold x recover on every tier to stop being degraded
    weight_factor: float = 0.5  # a degraded server's weight is scaled by this

    @property
    def marks(self) -> bool:
        return self.p99 is not None or self.failure_rate is not None


@dataclass(frozen=True, slots=True)
class Tail:
    """One window's summary."""

    count: int
    failures: int
    p50: float | None  # seconds; None without a successful probe
    p95: float | None
    p99: float | None

    @property
    def failure_rate(self) -> float:
        return self.failures / self.count if self.count else 0.0


EMPTY = Tail(0, 0, None, None, None)


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of an ascending list."""
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


REFRESH = 1.0  # seconds a window's summary is reused: percentiles of 1,000 servers' windows cost CPU


class Window:
    """The results of one server's one tier over the last `span` seconds, at most `max_samples`.

    A ring of two arrays of doubles (16 bytes a result: 1,000 servers probed every 0.2 s keep
    ~7 MB, where tuples would take ~40 MB), grown up to `max_samples` as results come. The
    summary is computed at most once per `refresh` seconds (a sort of the window), so neither
    the degraded mark nor /v1/status sorts on every probe result.
    """

    __slots__ = ("_at", "_cached", "_cached_at", "_count", "_rtt", "_start", "max_samples", "refresh", "span")

    def __init__(self, span: float, max_samples: int, refresh: float = REFRESH) -> None:
        self.span, self.max_samples, self.refresh = span, max_samples, refresh
        self._at = array.array("d")  # when
        self._rtt = array.array("d")  # the RTT; _FAILED or _NO_RTT (a success without a measured RTT)
        self._start = 0  # index of the oldest result
        self._count = 0
        self._cached: Tail | None = None
        self._cached_at = -math.inf

    def add(self, now: float, result: CheckResult) -> None:
        value = _FAILED if not result.ok else _NO_RTT if result.latency is None else result.latency
        size = len(self._at)
        if size < self.max_samples:  # still growing: the ring has not wrapped, the next slot is the end
            self._at.append(now)
            self._rtt.append(value)
            self._count += 1
        else:
            slot = (self._start + self._count) % size
            self._at[slot], self._rtt[slot] = now, value
            if self._count == size:
                self._start = (self._start + 1) % size  # full: the oldest result is overwritten
            else:
                self._count += 1
        self._expire(now)

    def _expire(self, now: float) -> None:
        size = len(self._at)
        while self._count and self._at[self._start] <= now - self.span:
            self._start = (self._start + 1) % size
            self._count -= 1

    def summary(self, now: float) -> Tail:
        if self._cached is not None and now - self._cached_at < self.refresh:
            return self._cached
        self._expire(now)
        end = self._start + self._count
        values = self._rtt[self._start:end] + self._rtt[:max(0, end - len(self._rtt))]
        ordered = sorted(values)  # no RTT (-1) first, failures (inf) last: C speed, no Python loop
        low, high = bisect.bisect_left(ordered, 0.0), bisect.bisect_left(ordered, math.inf)
        rtts = ordered[low:high]
        self._cached = Tail(self._count, len(ordered) - high, percentile(rtts, 50), percentile(rtts, 95),
                            percentile(rtts, 99))
        self._cached_at = now
        return self._cached


_FAILED = math.inf
_NO_RTT = -1.0


def passes(tail: Tail, policy: Policy, scale: float = 1.0) -> str:
    """Which threshold (times `scale`) the tail passes, or "" for none (or too few results)."""
    if tail.count < policy.min_samples:
        return ""
    if policy.p99 is not None and tail.p99 is not None and tail.p99 > policy.p99 * scale:
        return f"p99 {tail.p99 * 1000:.1f} ms > {policy.p99 * scale * 1000:.1f} ms"
    if policy.failure_rate is not None and tail.failure_rate > policy.failure_rate * scale:
        return f"failure rate {tail.failure_rate:.1%} > {policy.failure_rate * scale:.1%}"
    return ""


def step(degraded: str, tails: Iterable[Tail], policy: Policy) -> str:
    """The server's degraded mark after its tiers' tails: the reason, or "" when not degraded.

    Not degraded: any tier passing a threshold marks it. Degraded: it stays (keeping its
    reason) while any tier still passes threshold x recover."""
    tails = tuple(tails)
    if not degraded:
        return next((why for t in tails if (why := passes(t, policy))), "")
    if any(passes(t, policy, policy.recover) for t in tails):
        return degraded
    return ""


class Board:
    """Every server's tier windows and degraded marks (the engine folds results in)."""

    def __init__(self, policy: Policy, servers: Iterable[str], previous: Board | None = None) -> None:
        self.policy = policy
        names = tuple(servers)
        self.windows: dict[str, dict[str, Window]] = {name: {} for name in names}
        self.degraded: dict[str, str] = dict.fromkeys(names, "")
        if previous is not None and (previous.policy.window, previous.policy.max_samples) == \
                (policy.window, policy.max_samples):
            for name in names:
                self.windows[name] = previous.windows.get(name, {})
                self.degraded[name] = previous.degraded.get(name, "")

    def observe(self, server: str, tier: str, result: CheckResult, now: float) -> bool:
        """Fold one result in; True when the server's degraded mark changed."""
        tiers = self.windows.get(server)
        if tiers is None:
            return False
        window = tiers.get(tier)
        if window is None:
            window = tiers[tier] = Window(self.policy.window, self.policy.max_samples)
        window.add(now, result)
        if not self.policy.marks:
            return False
        before = self.degraded[server]
        after = self.degraded[server] = step(before, (w.summary(now) for w in tiers.values()), self.policy)
        return bool(before) != bool(after)

    def factors(self, addresses: Mapping[str, str]) -> dict[str, float]:
        """The weight factor of every degraded server, by address (``addresses``: name -> address)."""
        return {addresses[name]: self.policy.weight_factor for name, why in self.degraded.items()
                if why and name in addresses}

    def of(self, server: str, now: float) -> Mapping[str, Tail]:
        """The server's tails as of `now`, each worked out when it is first read (Later)."""
        return Later(dict(self.windows.get(server, {})), now)


class Later(Mapping[str, Tail]):
    """A server's tier tails, each a sort of its window, worked out when first read: a snapshot
    of 1,000 servers holds 2,000 windows, and sorting them all at once held the event loop for
    ~30 ms; the status is built a slice of servers at a time, and so are their tails. A window
    read later also counts the results that arrived since `now` (a status build's moments)."""

    __slots__ = ("_done", "_now", "_windows")

    def __init__(self, windows: dict[str, Window], now: float) -> None:
        self._windows, self._now = windows, now
        self._done: dict[str, Tail] = {}

    def __getitem__(self, tier: str) -> Tail:
        tail = self._done.get(tier)
        if tail is None:
            tail = self._done[tier] = self._windows[tier].summary(self._now)
        return tail

    def __iter__(self) -> Iterator[str]:
        return iter(self._windows)

    def __len__(self) -> int:
        return len(self._windows)
