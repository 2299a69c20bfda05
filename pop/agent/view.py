"""Each PoP's reachability as this agent sees it, and the report that says so. Pure.

Every check of a PoP (tcp to an address behind its beacon, the WireGuard handshake there)
keeps one hysteresis TierState (pop.hysteresis.step with the agent's rise/fall). Checks are
grouped by target: `tcp` and `wireguard` form the one target of the short form, `vpn11.tcp`
and `vpn11.wireguard` the target `vpn11`. The PoP is *reachable* while, for at least one
target, every check is UP or merely FALLING (pop.hysteresis.combine, the rule a server's tiers
follow inside a PoP): one dead server behind the beacon is not an unreachable PoP. One lost
probe does not flip the opinion, and a PoP that was never seen rise is unreachable. `streak`
counts the results folded since the opinion last changed, `since` is when it changed (agent
wall clock; the first opinion dates from the agent's start).

`report()` builds the JSON object of docs/probe-agent.md (exactly the fields pop.external
parses, which refuses unknown ones); `encode()` gives the bytes that are signed and served.
The agent is *healthy* while it reaches at least one PoP (`healthy()`, GET /healthz): an agent
that reaches none is evidence about its own network. The report carries that as its PoPs'
reachable flags, from which each PoP judges the agent's competence (docs/decisions.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from pop.checks.base import CheckResult
from pop.hysteresis import Policy, TierState, combine, step

VERSION = 1


@dataclass(frozen=True, slots=True)
class PopView:
    tiers: Mapping[str, TierState]  # check name -> its state; replaced, never mutated
    since: float
    reachable: bool = False
    streak: int = 0


@dataclass(frozen=True, slots=True)
class Landing:
    """Who answered an anycast address the last time the agent asked."""

    at: float  # agent wall clock
    pop: str | None = None
    server: str | None = None
    rtt: float | None = None  # seconds
    error: str | None = None


def start(checks: Iterable[str], now: float) -> PopView:
    return PopView({name: TierState(since=now) for name in checks}, since=now)


def fold(view: PopView, check: str, result: CheckResult, policy: Policy, now: float) -> PopView:
    """One check result folded into the PoP's view."""
    tiers = {**view.tiers, check: step(view.tiers.get(check, TierState(since=now)), result, policy, now)}
    reachable = any(combine(group).in_pool for group in _targets(tiers).values())
    if reachable == view.reachable:
        return replace(view, tiers=tiers, streak=view.streak + 1)
    return PopView(tiers, since=now, reachable=reachable, streak=1)


def _targets(tiers: Mapping[str, TierState]) -> dict[str, dict[str, TierState]]:
    """The checks grouped by target: the part of the name before the last dot."""
    groups: dict[str, dict[str, TierState]] = {}
    for name, tier in tiers.items():
        groups.setdefault(name.rpartition(".")[0], {})[name] = tier
    return groups


def healthy(views: Mapping[str, PopView]) -> bool:
    return any(view.reachable for view in views.values())


def report(agent: str, boot_id: str, sequence: int, now: float, *, views: Mapping[str, PopView],
           landings: Mapping[str, Landing]) -> dict[str, Any]:
    return {
        "version": VERSION,
        "agent": agent,
        "boot_id": boot_id,
        "sequence": sequence,
        "generated_at": now,
        "pops": {name: _pop(view) for name, view in views.items()},
        "anycast": {address: {"pop": landing.pop, "server": landing.server, "rtt_ms": _ms(landing.rtt),
                              "at": landing.at, "error": landing.error}
                    for address, landing in landings.items()},
    }


def encode(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def _pop(view: PopView) -> dict[str, Any]:
    checks = {name: _check(tier.last) for name, tier in view.tiers.items()}
    # the PoP's round trip: the best TCP connect among its targets that answered
    rtts = [c["rtt_ms"] for name, c in checks.items() if name.rpartition(".")[2] == "tcp" and c["rtt_ms"] is not None]
    return {"reachable": view.reachable, "streak": view.streak,
            "rtt_ms": min(rtts) if rtts else None, "since": view.since, "checks": checks}


def _check(last: CheckResult | None) -> dict[str, Any]:
    if last is None:
        return {"ok": False, "rtt_ms": None, "error": "no result yet"}
    return {"ok": last.ok, "rtt_ms": _ms(last.latency) if last.ok else None, "error": last.error or None}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
