"""The fleet guard: a false signal must not withdraw every PoP at once. Pure.

The worst anycast outages were every site withdrawing together on one false signal (Meta's DNS
in October 2021, 1.1.1.1 on 2025-07-14). So each PoP knows, from its own BGP sessions, which
other PoPs announce its anycast prefixes, and a withdrawal that would leave fewer than
`min_pops` of them becomes a de-preference (AS-path prepend and GRACEFUL_SHUTDOWN 65535:0):
traffic moves to any PoP that still announces normally, but the prefix stays reachable.

How PoPs recognise each other: every PoP of a fleet (`fleet.id`) marks its announcements with
the large community ``TAG:1:ID`` ("PoP ID announces"), and while it is on its way out also
``TAG:2:ID`` ("PoP ID is leaving"); TAG is the fleet's own ASN (`fleet.tag`). The view is
complete when the routers send every path they hold (ADD-PATH, RFC 7911; the lab does); with
only best paths a PoP sees a subset, which makes the guard hold more often, never less.

The guard only softens a withdrawal caused by health (pool, tier 3, dampening) of a PoP that
has announced since it started and whose servers still answer at tier 1. A PoP whose servers
are dead at tier 1 is *hard down*: announcing it would only blackhole, so it withdraws at once,
as without the guard. An operator's drain is never held.

The protocol, the same in every PoP, so that PoPs failing at the same moment agree:

1. A PoP that must withdraw first *leaves*: it stays announced de-preferenced, with the
   leaving tag, for `pace` seconds (so every other PoP sees it leave before it is gone).
2. Then it withdraws unless the fleet would be short: per prefix, the other PoPs that announce
   it and are not leaving are the ones that *stay*; if fewer than `min_pops` stay, the leaving
   PoPs with the lowest ids (this one included) fill the gap and are *held*: announced,
   de-preferenced, until enough PoPs stay again.
3. A PoP does not withdraw within `pace` seconds of another PoP disappearing (the fleet-wide
   pace), and a withdrawn PoP comes back de-preferenced if the fleet becomes short.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

PRESENT = 1  # TAG:1:ID, on every announcement of PoP ID
LEAVING = 2  # TAG:2:ID, while PoP ID is de-preferenced by the guard


@dataclass(frozen=True, slots=True)
class Policy:
    id: int = 0  # this PoP's number in the fleet; 0: not in a fleet (no tags, no guard)
    tag: int = 0  # the fleet's ASN: the global administrator of its large communities
    min_pops: int = 0  # PoPs that must keep announcing each prefix; 0: the guard is off
    pace: float = 10.0  # seconds a leaving PoP stays visible, and after another PoP leaves
    prepend: int = 3  # AS-path prepends while held

    @property
    def guarding(self) -> bool:
        return self.id > 0 and self.min_pops > 0


def tags(policy: Policy, leaving: bool) -> tuple[str, ...]:
    """The large communities this PoP puts on its announcements."""
    if policy.id <= 0:
        return ()
    marks = [f"{policy.tag}:{PRESENT}:{policy.id}"]
    if leaving:
        marks.append(f"{policy.tag}:{LEAVING}:{policy.id}")
    return tuple(marks)


@dataclass(frozen=True, slots=True)
class Sighting:
    """What one received path says about the fleet: the PoPs it carries, and which leave."""

    present: frozenset[int] = frozenset()
    leaving: frozenset[int] = frozenset()


def sighting(large_communities: Iterable[tuple[int, int, int]], tag: int) -> Sighting | None:
    """The fleet's marks among a path's large communities, or None if it carries none."""
    present, leaving = set(), set()
    for admin, function, pop in large_communities:
        if admin != tag or pop <= 0:
            continue
        if function == PRESENT:
            present.add(pop)
        elif function == LEAVING:
            leaving.add(pop)
    if not present:
        return None
    return Sighting(frozenset(present), frozenset(leaving & present))


@dataclass(frozen=True, slots=True)
class View:
    """Per anycast prefix, the other PoPs seen announcing it, and those of them leaving."""

    pops: Mapping[str, frozenset[int]] = field(default_factory=dict)
    leaving: Mapping[str, frozenset[int]] = field(default_factory=dict)

    def others(self) -> frozenset[int]:
        return frozenset().union(*self.pops.values())


def view(paths: Iterable[tuple[str, Sighting]], me: int) -> View:
    """Fold every received path (prefix, sighting) into one view, without this PoP itself."""
    pops: dict[str, set[int]] = {}
    leaving: dict[str, set[int]] = {}
    for prefix, seen in paths:
        pops.setdefault(prefix, set()).update(seen.present - {me})
        leaving.setdefault(prefix, set()).update(seen.leaving - {me})
    return View({p: frozenset(s) for p, s in pops.items()},
                {p: frozenset(leaving[p] & pops[p]) for p in pops})


# the guard's phases
NONE = ""  # the verdict announces (or the guard is off): nothing to do
LEAVING_PHASE = "leaving"  # de-preferenced, visible as leaving, until the pace has passed
HELD = "held"  # de-preferenced because the fleet would be short without this PoP
LEFT = "left"  # withdrawn


@dataclass(frozen=True, slots=True)
class Guard:
    phase: str = NONE
    since: float | None = None  # when the PoP began leaving
    reason: str = ""
    others: frozenset[int] = frozenset()  # the other PoPs seen at the last step
    departed_at: float | None = None  # when another PoP last disappeared from the view
    holds: int = 0  # times the guard began holding a PoP the verdict withdrew

    @property
    def holding(self) -> bool:
        """Whether the PoP is announced (de-preferenced) although the verdict withdraws it."""
        return self.phase in (LEAVING_PHASE, HELD)


def step(current: Guard, policy: Policy, fleet: View, prefixes: Iterable[str], now: float, *,
         withdraw: bool, eligible: bool, hard_down: bool, announced: bool = True) -> Guard:
    """The guard's next state.

    ``withdraw``: the verdict withdraws the PoP for its health (not an operator's drain).
    ``eligible``: the PoP has announced since the engine started (the guard keeps PoPs in; it
    never brings in one that has not passed its checks). ``hard_down``: no server answers at
    tier 1. ``announced``: the prefixes are on the wire now (a PoP already withdrawn does not
    start leaving: it is gone). Call on every verdict and every change of the view, and at `due()`.
    """
    others = fleet.others()
    departed_at = now if current.others - others else current.departed_at
    base = replace(current, others=others, departed_at=departed_at)
    if not policy.guarding or not withdraw or not eligible:  # nothing to keep in, nothing to say
        return replace(base, phase=NONE, since=None, reason="")
    if hard_down:
        return replace(base, phase=LEFT, since=None, reason="fleet guard does not hold: hard down, no server "
                                                            "answers at tier 1 (announcing would only blackhole)")
    short = _short(policy, fleet, prefixes)
    if short:
        holds = current.holds + (current.phase != HELD)
        since = current.since if current.holding else now
        return replace(base, phase=HELD, since=since, holds=holds,
                       reason=f"fleet guard: de-preferenced instead of withdrawn: {short}")
    if current.phase == NONE and not announced:
        return replace(base, phase=LEFT, since=None, reason="fleet guard: withdrawn, enough PoPs stay")
    if current.phase == NONE:
        return replace(base, phase=LEAVING_PHASE, since=now,
                       reason=f"fleet guard: leaving, de-preferenced for {policy.pace:g}s before the withdrawal")
    if current.phase == LEFT:
        return base
    release = _release(base, policy)
    if now < release:
        paced = base.departed_at is not None and base.departed_at + policy.pace >= release
        why = (f"another PoP left less than {policy.pace:g}s ago: the fleet-wide pace" if paced
               else f"leaving stays visible for {policy.pace:g}s")
        return replace(base, phase=LEAVING_PHASE,
                       reason=f"fleet guard: de-preferenced, withdrawal in {release - now:.1f}s ({why})")
    return replace(base, phase=LEFT, since=None, reason="fleet guard: enough PoPs stay, withdrawn")


def _release(guard: Guard, policy: Policy) -> float:
    times = [t + policy.pace for t in (guard.since, guard.departed_at) if t is not None]
    return max(times, default=0.0)


def _short(policy: Policy, fleet: View, prefixes: Iterable[str]) -> str:
    """Why this PoP must stay, or "": per prefix, the PoPs that stay; if fewer than min_pops,
    the leaving PoPs with the lowest ids (this one among them) make up the difference."""
    reasons = []
    for prefix in prefixes:
        present = fleet.pops.get(prefix, frozenset())
        leaving = fleet.leaving.get(prefix, frozenset()) & present
        staying = len(present - leaving)
        needed = policy.min_pops - staying
        if needed > 0 and policy.id in sorted(leaving | {policy.id})[:needed]:
            reasons.append(f"{prefix}: {staying} other PoP(s) stay of min_pops {policy.min_pops}"
                           + (f", {len(leaving)} other(s) leaving" if leaving else ""))
    return "; ".join(reasons)


def due(current: Guard, policy: Policy) -> float | None:
    """When the guard must be asked again (a leaving PoP's withdrawal time)."""
    if current.phase != LEAVING_PHASE:
        return None
    return _release(current, policy)


def summary(current: Guard, policy: Policy, fleet: View, now: float) -> dict[str, object]:
    """The guard and the view for /v1/status."""
    release = due(current, policy)
    return {
        "id": policy.id,
        "min_pops": policy.min_pops,
        "pace": policy.pace,
        "guarding": policy.guarding,
        "phase": current.phase or "none",
        "holding": current.holding,
        "reason": current.reason,
        "since": current.since,
        "withdraw_in": None if release is None else max(0.0, release - now),
        "holds": current.holds,
        "announcing": {p: sorted(s) for p, s in sorted(fleet.pops.items())},
        "leaving": {p: sorted(s) for p, s in sorted(fleet.leaving.items()) if s},
    }
