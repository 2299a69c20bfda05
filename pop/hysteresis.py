"""Per-server hysteresis: check results in, a server state with its evidence out.

Pure. Each check tier of each server keeps one `TierState`; `step()` folds one CheckResult
into it. A server's overall state combines its tiers (`combine()`): it is in the pool only
while every tier is UP or merely FALLING, and it comes back only when every tier has risen.

    INIT --ok--> RISING --ok x rise--> UP --fail--> FALLING --fail x fall--> DOWN
      \\--fail-------------------------------------------------------------> DOWN
    FALLING --ok--> UP          RISING --fail--> DOWN          DOWN --ok--> RISING

Silence (timeout) may be packet loss, so FALLING needs `fall` failures in a row before DOWN.
A definitive failure (TCP RST, ICMP unreachable, a response that fails validation) cannot be
produced by loss, so `fall_definitive` of them within the streak suffice.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Protocol

from pop.checks.base import CheckResult


class State(enum.Enum):
    INIT = "init"
    RISING = "rising"
    UP = "up"
    FALLING = "falling"
    DOWN = "down"
    DISABLED = "disabled"


class Timing(Protocol):
    """What a check's configuration says about its pace and its counts."""

    @property
    def rise(self) -> int: ...
    @property
    def fall(self) -> int: ...
    @property
    def fall_definitive(self) -> int: ...
    @property
    def interval(self) -> float: ...
    @property
    def fast_interval(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Policy:
    rise: int
    fall: int
    fall_definitive: int
    interval: float
    fast_interval: float

    @classmethod
    def of(cls, timing: Timing) -> Policy:
        return cls(timing.rise, timing.fall, timing.fall_definitive, timing.interval, timing.fast_interval)


@dataclass(frozen=True, slots=True)
class TierState:
    state: State = State.INIT
    streak: int = 0  # consecutive results pushing toward the next state
    definitive: int = 0  # definitive failures within the current failure streak
    since: float = 0.0  # when `state` was entered
    reason: str = "no result yet"
    last: CheckResult | None = None
    successes: int = 0  # lifetime counters, for /status and metrics
    failures: int = 0


def step(current: TierState, result: CheckResult, policy: Policy, now: float) -> TierState:
    """Fold one check result into a tier's state."""
    # the constructor, not dataclasses.replace(): this runs for every probe (5,000 a second
    # with 1,000 servers), and replace() costs four times as much
    counted = TierState(current.state, current.streak, current.definitive, current.since, current.reason, result,
                        current.successes + result.ok, current.failures + (not result.ok))
    state = current.state
    if state is State.DISABLED:
        return counted
    if result.ok:
        if state in (State.UP, State.FALLING):
            return _enter(counted, State.UP, now, "ok") if state is State.FALLING else counted
        streak = current.streak + 1 if state is State.RISING else 1
        if streak >= policy.rise:
            return _enter(counted, State.UP, now, f"rose after {streak} ok")
        return _enter(counted, State.RISING, now, f"ok {streak}/{policy.rise}", streak=streak,
                      keep_since=state is State.RISING)
    why = _failure_text(result)
    if state in (State.INIT, State.RISING, State.DOWN):
        if state is State.DOWN:
            return replace(counted, reason=why)
        return _enter(counted, State.DOWN, now, why)
    streak = current.streak + 1 if state is State.FALLING else 1
    definitive = (current.definitive if state is State.FALLING else 0) + result.definitive
    if streak >= policy.fall:
        return _enter(counted, State.DOWN, now, f"{why}; fell after {streak} failures")
    if definitive >= policy.fall_definitive:
        return _enter(counted, State.DOWN, now, f"{why}; fell after {definitive} definitive failures")
    return _enter(counted, State.FALLING, now, f"{why} {streak}/{policy.fall}", streak=streak,
                  definitive=definitive, keep_since=state is State.FALLING)


def _enter(current: TierState, state: State, now: float, reason: str, *, streak: int = 0, definitive: int = 0,
           keep_since: bool = False) -> TierState:
    return replace(current, state=state, streak=streak, definitive=definitive, reason=reason,
                   since=current.since if keep_since else now)


def _failure_text(result: CheckResult) -> str:
    return f"{result.error}: {result.detail}" if result.detail else result.error or "failed"


_CHANGING = (State.INIT, State.RISING, State.FALLING)


def interval(tier: TierState, policy: Policy, server_tiers: Iterable[TierState] = ()) -> float:
    """Probe faster while a state is changing, so that both rise and fall complete quickly.

    ``server_tiers`` are all tiers of the same server: while any of them changes, every tier
    probes at its fast pace. A server coming back is seen by the fast tier first (its TCP
    port answers again); the slow tier then confirms at its fast pace instead of waiting out
    its stable interval, so recovery is not held up by the slowest schedule.
    """
    if tier.state in _CHANGING or any(other.state in _CHANGING for other in server_tiers):
        return policy.fast_interval
    return policy.interval


@dataclass(frozen=True, slots=True)
class ServerHealth:
    """The combination of one server's tiers."""

    state: State
    tier: str  # the tier that decided (empty when every tier agrees on UP)
    reason: str

    @property
    def in_pool(self) -> bool:
        return self.state in (State.UP, State.FALLING)


# worst first: the first tier found in the worst state decides
_SEVERITY = (State.DISABLED, State.DOWN, State.INIT, State.RISING, State.FALLING, State.UP)


def combine(tiers: dict[str, TierState], enabled: bool = True) -> ServerHealth:
    if not enabled:
        return ServerHealth(State.DISABLED, "", "disabled by configuration")
    if not tiers:
        return ServerHealth(State.INIT, "", "no checks configured")
    for severity in _SEVERITY:
        for name, tier in tiers.items():
            if tier.state is severity:
                if severity is State.UP:
                    return ServerHealth(State.UP, "", "all tiers up")
                return ServerHealth(severity, name, tier.reason)
    raise AssertionError("unreachable: every State is in _SEVERITY")


def seed(result: CheckResult, now: float) -> TierState:
    """A tier's state from one probe taken at engine start, when the engine adopts the routes
    its predecessor left announced: the previous engine had this tier risen moments ago, so
    one good answer confirms it (UP), and one failure takes it DOWN at once."""
    if result.ok:
        return TierState(State.UP, since=now, reason="ok at engine start (adopted)", last=result, successes=1)
    return TierState(State.DOWN, since=now, reason=f"{_failure_text(result)} at engine start", last=result,
                     failures=1)
