"""The PoP drain ladder (RFC 8326): how a PoP leaves service without dropping clients. Pure.

A drain walks the configured steps (pop.config_model.DrainStep), each held for its dwell,
and the steps add up: the MED stays raised while the AS path is prepended, and so on. The
last step withdraws (the verdict's drain: pop.verdict.drain). Every kind of drain walks the
same ladder: an operator's (`POST /drain`), maintenance (a drain with `until`, which ends by
itself), and the disable file.

    start --dwell--> step 1 --dwell--> ... --> withdraw --undrain / until--> (none)

- It finishes early, straight to the withdraw, once the PoP's traffic is gone where the data
  plane can tell (``connections`` is 0: IPVS or pinned-flow counts; None when unknown), or
  when the PoP is not announced anyway (the pool withdrew it; nothing is left to move).
- Steps are scheduled from the drain's start (step k is due at start + the dwells before it),
  not from when the engine got round to it: a late wake-up does not push the rest back.
- Undrain and the end of a maintenance are the engine's: the attributes go at once; a PoP
  that reached the withdraw comes back through the verdict's hold-down.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from pop.config_model import DrainStep

GRACEFUL_SHUTDOWN = "65535:0"  # RFC 8326
OPERATOR = "operator"
MAINTENANCE = "maintenance"
DISABLE_FILE = "disable-file"


class DrainHeld(Exception):
    """An undrain refused: the disable file still drains the PoP."""


@dataclass(frozen=True, slots=True)
class PopDrain:
    """A PoP drain in progress; times are on the engine's clock."""

    since: float  # when the drain started
    step: int  # index of the step in force
    step_since: float  # when that step was due (its scheduled time)
    reason: str  # who and why, for /status and the verdict
    source: str = OPERATOR  # OPERATOR | MAINTENANCE | DISABLE_FILE
    until: float | None = None  # maintenance: ends by itself then
    early: str = ""  # why the ladder skipped to the withdraw, if it did


@dataclass(frozen=True, slots=True)
class Effect:
    """What the steps so far do to every announcement."""

    med: int | None = None
    prepend: int = 0
    graceful_shutdown: bool = False


NO_DRAIN = Effect()


def start(steps: tuple[DrainStep, ...], now: float, reason: str, *, source: str = OPERATOR,
          until: float | None = None, announced: bool = True) -> PopDrain:
    """A new drain at its first step; a PoP that announces nothing goes straight to the withdraw."""
    if not announced:
        return PopDrain(now, len(steps) - 1, now, reason, source, until, "not announced when the drain began")
    return advance(PopDrain(now, 0, now, reason, source, until), steps, now, None, announced=True)


def advance(drain: PopDrain, steps: tuple[DrainStep, ...], now: float, connections: int | None, *,
            announced: bool) -> PopDrain:
    """The step in force at ``now``."""
    last = len(steps) - 1
    if drain.step >= last:
        return drain
    if not announced:
        return replace(drain, step=last, step_since=now, early="the PoP was withdrawn during the drain")
    if connections == 0:
        return replace(drain, step=last, step_since=now, early="no connections left on the data plane")
    step, since = drain.step, drain.step_since
    while step < last and now >= since + steps[step].dwell:
        since += steps[step].dwell
        step += 1
    return drain if step == drain.step else replace(drain, step=step, step_since=since)


def fit(drain: PopDrain, steps: tuple[DrainStep, ...]) -> PopDrain:
    """A drain on a ladder that may have changed (a reload, a restored file): a step past the
    end is the withdraw."""
    last = len(steps) - 1
    return drain if drain.step <= last else replace(drain, step=last)


def withdrawn(drain: PopDrain, steps: tuple[DrainStep, ...]) -> bool:
    return drain.step >= len(steps) - 1


def expired(drain: PopDrain, now: float) -> bool:
    """A maintenance whose time is up."""
    return drain.until is not None and now >= drain.until


def due(drain: PopDrain, steps: tuple[DrainStep, ...]) -> float | None:
    """When the drain next changes by itself: the next step, or the end of a maintenance."""
    times = [drain.until]
    if not withdrawn(drain, steps):
        times.append(drain.step_since + steps[drain.step].dwell)
    return min((t for t in times if t is not None), default=None)


def effect(drain: PopDrain | None, steps: tuple[DrainStep, ...]) -> Effect:
    """The cumulative effect of the steps taken so far (none without a drain)."""
    if drain is None:
        return NO_DRAIN
    result = NO_DRAIN
    for step in steps[:drain.step + 1]:
        if step.kind == "med":
            result = replace(result, med=step.value)
        elif step.kind == "prepend":
            result = replace(result, prepend=step.value)
        elif step.kind == "graceful_shutdown":
            result = replace(result, graceful_shutdown=True)
    return result


def describe(step: DrainStep) -> str:
    if step.kind == "med":
        return f"med {step.value}"
    if step.kind == "prepend":
        return f"prepend {step.value}"
    if step.kind == "graceful_shutdown":
        return f"graceful_shutdown ({GRACEFUL_SHUTDOWN})"
    return "withdraw"


def view(drain: PopDrain | None, steps: tuple[DrainStep, ...], now: float, wall: float) -> dict[str, Any] | None:
    """The ladder for /status: the step in force, the next one and when, who/why/until."""
    if drain is None:
        return None
    nxt = None if withdrawn(drain, steps) else steps[drain.step + 1]
    next_at = None if nxt is None else drain.step_since + steps[drain.step].dwell
    return {
        "source": drain.source,
        "reason": drain.reason,
        "step": drain.step + 1,
        "steps": len(steps),
        "current": describe(steps[drain.step]),
        "step_since_seconds": round(now - drain.step_since, 3),
        "next": None if nxt is None else describe(nxt),
        "next_in_seconds": None if next_at is None else round(max(0.0, next_at - now), 3),
        "ladder": [describe(s) + ("" if s.kind == "withdraw" else f" for {s.dwell:g}s") for s in steps],
        "since_seconds": round(now - drain.since, 3),
        "until": None if drain.until is None else round(wall + drain.until - now, 3),
        "until_in_seconds": None if drain.until is None else round(max(0.0, drain.until - now), 3),
        "finished_early": drain.early or None,
    }
