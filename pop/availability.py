"""Availability: the PoP's announce history, and what it says against the SLO. Pure.

The history is a sequence of marks, each one the PoP's state from its time on (wall-clock
seconds) until the next mark: announced, or withdrawn with the class of its cause:

- ``pool``: the servers (too few healthy, or the hold-down after they came back);
- ``external``: tier 3, users outside cannot reach the PoP;
- ``operator``: a drain (planned maintenance);
- ``engine``: the engine was not running (stopped, crashed, restarting) or had just started
  and not yet announced. While no engine runs nobody knows what the routers hold, so that
  time is *unknown*, and counted as down: availability is what we can vouch for.

Over a window (rolling 24 h, 30 d) ending at ``now``, ``window()`` adds the seconds in each
state. Time before the first mark (a PoP younger than the window) is not observed and counts
neither way. Two ratios come out (docs/decisions.md):

- ``ratio``: announced / (observed - operator). Planned maintenance is not an outage: an
  operator drain neither counts against the error budget nor for it. This is the SLO's ratio.
- ``raw_ratio``: announced / observed, the share of time users could reach the PoP at all.

The error budget is ``(1 - slo) * (observed - operator)`` seconds; ``budget_remaining`` is the
share of it not yet spent by unplanned downtime (pool, external, engine); negative once overspent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DAY = 86400.0
WINDOWS: Mapping[str, float] = {"24h": DAY, "30d": 30 * DAY}
KEEP = 30 * DAY  # history older than the longest window is compacted away
CAUSES = ("pool", "external", "operator", "engine")
UNPLANNED = ("pool", "external", "engine")


@dataclass(frozen=True, slots=True)
class Mark:
    """From ``at`` on, the PoP is announced (cause "") or withdrawn because of ``cause``."""

    at: float
    announced: bool
    cause: str = ""

    @property
    def state(self) -> tuple[bool, str]:
        return self.announced, self.cause


def to_line(mark: Mark) -> str:
    return json.dumps({"t": round(mark.at, 3), "announced": mark.announced, "cause": mark.cause},
                      separators=(",", ":")) + "\n"


def parse_line(line: str) -> Mark:
    """One line of the history file; ValueError naming the problem if it is not a mark."""
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    at, announced, cause = data.get("t"), data.get("announced"), data.get("cause")
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
        raise ValueError("t: must be a time in seconds")
    if not isinstance(announced, bool):
        raise ValueError("announced: must be true or false")
    if announced and cause != "":
        raise ValueError("cause: must be empty while announced")
    if not announced and cause not in CAUSES:
        raise ValueError(f"cause: must be one of {', '.join(CAUSES)}")
    return Mark(float(at), announced, str(cause))


def parse(text: str) -> tuple[list[Mark], list[tuple[int, str]]]:
    """The marks in ``text`` in time order, and (line number, problem) for every line that is not one."""
    marks: list[Mark] = []
    problems: list[tuple[int, str]] = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            marks.append(parse_line(line))
        except (ValueError, RecursionError) as exc:
            problems.append((number, str(exc)[:100]))
    # the wall clock may have been stepped back between two marks: time order, stable
    marks.sort(key=lambda m: m.at)
    return marks, problems


def changed(history: Sequence[Mark], mark: Mark) -> bool:
    """Whether ``mark`` says something new after ``history`` (else there is nothing to record)."""
    return not history or history[-1].state != mark.state


def cause(*, announced: bool, wanted: bool, drained: bool, decided_by: str) -> str:
    """The class of a withdrawal ("" while announced): ``announced`` is what the BGP session
    holds, the rest is the verdict (``wanted``: it says announce)."""
    if announced:
        return ""
    if drained or decided_by == "operator":
        return "operator"
    if wanted:
        return "engine"  # decided, not (yet) made true: the applier waits or retries
    if decided_by in ("pool", "external"):
        return decided_by
    return "engine"  # started, nothing decided yet


def compact(history: Sequence[Mark], now: float, keep: float = KEEP) -> list[Mark]:
    """The marks still needed ``keep`` seconds back from ``now``: the state at the cut-off (the
    last older mark, moved to the cut-off) and everything after it."""
    cutoff = now - keep
    older = [m for m in history if m.at <= cutoff]
    newer = [m for m in history if m.at > cutoff]
    return ([Mark(cutoff, older[-1].announced, older[-1].cause)] if older else []) + newer


@dataclass(frozen=True, slots=True)
class Window:
    name: str
    seconds: float  # the window's length
    slo: float
    observed: float  # seconds of it with history
    announced: float
    down: Mapping[str, float]  # withdrawn seconds per cause

    @property
    def eligible(self) -> float:
        """The seconds the SLO is about: observed, minus planned maintenance."""
        return self.observed - self.down["operator"]

    @property
    def ratio(self) -> float | None:
        return self.announced / self.eligible if self.eligible > 0 else None

    @property
    def raw_ratio(self) -> float | None:
        return self.announced / self.observed if self.observed > 0 else None

    @property
    def budget(self) -> float:
        """Seconds of unplanned downtime the SLO allows over what was observed."""
        return (1.0 - self.slo) * self.eligible

    @property
    def budget_spent(self) -> float:
        return sum(self.down[c] for c in UNPLANNED)

    @property
    def budget_remaining(self) -> float:
        """The share of the budget left: 1 untouched, 0 spent, below 0 overspent."""
        if self.budget <= 0:
            return 1.0
        return 1.0 - self.budget_spent / self.budget


def window(history: Sequence[Mark], now: float, name: str, seconds: float, slo: float) -> Window:
    """Seconds announced and withdrawn (per cause) between ``now - seconds`` and ``now``; the
    last mark's state lasts until ``now``."""
    start = now - seconds
    down = dict.fromkeys(CAUSES, 0.0)
    announced = observed = 0.0
    for index, mark in enumerate(history):
        end = history[index + 1].at if index + 1 < len(history) else now
        length = min(end, now) - max(mark.at, start)
        if length <= 0:
            continue
        observed += length
        if mark.announced:
            announced += length
        else:
            down[mark.cause] += length
    return Window(name, seconds, slo, observed, announced, down)


def report(history: Sequence[Mark], now: float, slo: float) -> dict[str, Any]:
    """The ``availability`` section of /v1/status."""
    return {"slo": slo, "windows": {name: to_dict(window(history, now, name, seconds, slo))
                                    for name, seconds in WINDOWS.items()}}


def to_dict(w: Window) -> dict[str, Any]:
    def ratio(value: float | None) -> float | None:
        return None if value is None else round(value, 6)

    return {"ratio": ratio(w.ratio), "raw_ratio": ratio(w.raw_ratio),
            "error_budget_remaining": round(w.budget_remaining, 4),
            "error_budget_seconds": round(w.budget, 1), "error_budget_spent_seconds": round(w.budget_spent, 1),
            "observed_seconds": round(w.observed, 1), "announced_seconds": round(w.announced, 1),
            "withdrawn_seconds": {c: round(s, 1) for c, s in w.down.items()}}
