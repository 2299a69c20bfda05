"""Flap dampening at the origin: a PoP that keeps flapping stays withdrawn for a while. Pure.

RFC 2439's shape, applied where the flaps start. Every withdrawal the health of the PoP causes
(the pool or tier 3; never an operator's drain) adds `penalty` to a figure of merit that decays
exponentially with `half_life`. Once it exceeds `suppress`, the PoP is *suppressed*: it may
stay announced while it is (dampening never withdraws), but it is not announced again until the
figure has decayed below `reuse`, and never longer than `max_suppress` after the suppression
began. Time is passed in; the state is an immutable value the engine keeps.

Why at the origin, and why these numbers (docs/decisions.md): a PoP whose health flaps makes
every router on the Internet recompute, and remote routers that dampen (RFC 2439, RFC 7196)
may suppress the prefix for up to an hour, which hides this PoP long after it is well. Better
to step aside at once, while the other PoPs serve, and come back when it has been quiet. The
routers' defaults (penalty 1000 per flap, half-life 15 min, reuse 750, suppress 2000, max 60
min) are tuned for route flaps seen from afar, where a third flap already suppresses. At the
origin the hold-down has absorbed the fast flaps before any withdrawal counts, so pop's
defaults wait for a fourth withdrawal close together (suppress 3000), forgive three times
faster (half-life 5 min: from 3000 to the reuse level 750 in 10 min) and never hold a PoP
longer than 30 min. It is off unless `dampening.enabled`: an operator chooses to keep a
flapping PoP out rather than have it tried again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class Policy:
    enabled: bool = True
    penalty: float = 1000.0  # added per withdrawal caused by health
    suppress: float = 3000.0  # above this, the PoP is not announced again ...
    reuse: float = 750.0  # ... until the figure decays below this
    half_life: float = 300.0  # seconds
    max_suppress: float = 1800.0  # seconds: suppression never lasts longer


@dataclass(frozen=True, slots=True)
class Damping:
    figure: float = 0.0  # as of `at`
    at: float = 0.0
    suppressed_since: float | None = None
    flaps: int = 0


def figure(state: Damping, now: float, policy: Policy) -> float:
    """The figure of merit decayed to `now`."""
    if state.figure <= 0.0:
        return 0.0
    return state.figure * math.pow(0.5, max(0.0, now - state.at) / policy.half_life)


def flap(state: Damping, now: float, policy: Policy) -> Damping:
    """A withdrawal caused by health: charge the penalty; suppress above the threshold."""
    if not policy.enabled:
        return state
    value = figure(state, now, policy) + policy.penalty
    since = state.suppressed_since
    if since is None and value > policy.suppress:
        since = now
    return Damping(value, now, since, state.flaps + 1)


def step(state: Damping, now: float, policy: Policy) -> Damping:
    """Lift a suppression whose figure decayed below `reuse`, or that lasted `max_suppress`."""
    if state.suppressed_since is None:
        return state
    if figure(state, now, policy) < policy.reuse or now - state.suppressed_since >= policy.max_suppress:
        return replace(state, figure=figure(state, now, policy), at=now, suppressed_since=None)
    return state


def reusable_at(state: Damping, policy: Policy) -> float | None:
    """When a suppression ends by itself (the engine wakes then), None when not suppressed."""
    if state.suppressed_since is None:
        return None
    decayed = state.at + policy.half_life * math.log2(state.figure / policy.reuse) if state.figure > policy.reuse \
        else state.at
    return min(decayed, state.suppressed_since + policy.max_suppress)


def reason(state: Damping, now: float, policy: Policy) -> str:
    """The verdict's reason while suppressed, "" otherwise."""
    if state.suppressed_since is None:
        return ""
    until = reusable_at(state, policy)
    left = 0.0 if until is None else max(0.0, until - now)
    return (f"suppressed by flap dampening: {state.flaps} flaps, figure {figure(state, now, policy):.0f} "
            f"above reuse {policy.reuse:g}, announced again in {left:.0f}s at the latest")


def view(state: Damping, now: float, policy: Policy) -> dict[str, object] | None:
    """For /v1/status and metrics; None when dampening is off."""
    if not policy.enabled:
        return None
    until = reusable_at(state, policy)
    return {"figure": round(figure(state, now, policy), 1), "flaps": state.flaps,
            "suppressed": state.suppressed_since is not None,
            "reusable_in_seconds": None if until is None else round(max(0.0, until - now), 1),
            "suppress": policy.suppress, "reuse": policy.reuse, "half_life": policy.half_life}
