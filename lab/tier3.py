"""Tier 3's scenarios on the running lab, measured where it counts: the routers' kernel tables.

Shared by the lab test (tests/netns/test_lab_tier3.py, one run of each) and the benchmark
(bench/tier3.py, many runs). Every function takes a ``Lab`` that is up, leaves it as it found
it (faults undone, every PoP announced and seen from outside) and returns what it measured.

- ``cut_off(lab, pop)``: the PoP's upstreams drop its service traffic (fault ``cut-off``)
  while it stays healthy inside. Measured: fault -> the PoP's next hop gone from an
  upstream router (all of them cut it off); withdrawal -> the catchment map (as the PoPs' /status show it) puts the
  agent next to the client where the client's own connection lands; undo -> next hop back.
- ``monitoring_fails(lab, scenario)``: one of SCENARIOS (the agents dead, lying, one agent's
  network broken, every agent seeing every PoP down) held for ``HOLD`` seconds; returns the
  announcement changes seen at every router (the goal is 0) and the PoPs' external views.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lab.routewatch import RouteEvent
    from lab.runner import Lab

# seconds a monitoring failure is held: beyond max_age (5) + fall_for (2) + a pull, so that a
# wrong reaction would have reached the routers
HOLD = 9.0
SCENARIOS: dict[str, list[tuple[str, str]]] = {
    "all agents dead": [("agent-kill", "probe1"), ("agent-kill", "probe2"), ("agent-kill", "probe3")],
    "all agents lie": [("agent-replay", "probe1"), ("agent-stale", "probe2"), ("agent-forged", "probe3")],
    "one agent's network broken": [("blackhole", "probe3")],
    "every agent sees every PoP down": [("agent-blind", "probe1"), ("agent-blind", "probe2"),
                                        ("agent-blind", "probe3")],
}
# what each PoP's external view must settle at while the scenario holds
EXPECTED_VIEW = {"all agents dead": "unknown", "all agents lie": "unknown",
                 "one agent's network broken": "reachable", "every agent sees every PoP down": "unknown"}


@dataclass
class CutOff:
    pop: str
    withdrawn: float  # seconds from the cut to the PoP's next hop gone at its upstream
    catchment: float  # seconds from the withdrawal to a catchment map that matches the client
    back: float  # seconds from undoing the cut to the next hop back
    hold_down: float
    landing: str | None  # where the client (and the agent beside it) landed meanwhile
    by: str  # /status last_change_by while withdrawn
    moved: list[str]  # the agents that landed on the PoP before the cut
    servers: list[str] = field(default_factory=list)  # the PoP's servers' states meanwhile


def settled(lab: Lab, timeout: float = 40.0) -> None:
    """Every PoP announced and reachable from outside by every agent."""
    lab.wait_converged(timeout)
    for name in lab.pops:
        lab.pop(name).wait_status(lambda s: (s.get("external") or {}).get("view") == "reachable"
                                  and s["external"]["competent"] == len(lab.agents), timeout=timeout)


def landings(lab: Lab) -> dict[str, str | None]:
    """Per agent, the PoP it lands on via anycast, as the first PoP that answers shows it."""
    for name in lab.pops:
        catchment = (lab.pop_status(name).get("external") or {}).get("catchment") or {}
        if catchment:
            return {agent: next((seen.get("pop") for seen in addresses.values()), None)
                    for agent, addresses in catchment.items()}
    return {}


def beside(lab: Lab, client: str) -> str:
    """The agent behind the same upstream router as ``client``."""
    routers = {router for router, _ in lab.faults.upstreams(client)}
    return next(agent for agent in lab.agents if {r for r, _ in lab.faults.upstreams(agent)} & routers)


def cut_off(lab: Lab, pop: str | None = None, client: str = "client1") -> CutOff:
    """``pop`` None: the PoP the agent beside the client lands on, so that the catchment map
    must show at least that agent move (routers hash flows by address, with a seed per boot)."""
    agent = beside(lab, client)
    # a PoP behind the router the client and the agent share: once it is withdrawn, that router
    # is left with one path and both land on the same PoP (with two, it hashes them apart)
    shared = {router for router, _ in lab.faults.upstreams(client)}
    direct = {p for p in lab.pops if shared & {router for router, _ in lab.faults.upstreams(p)}}
    deadline = time.monotonic() + 20
    landings_at_choice: dict[str, str | None] = {}
    while pop is None:
        landings_at_choice = landings(lab)
        pop = landings_at_choice.get(agent)  # None until the agent's latest answer is in a fresh report
        if pop not in direct:
            pop = None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{agent} does not land on {sorted(direct)}: {landings(lab)}")
            time.sleep(0.1)
    router, _ = lab.faults.upstreams(pop)[0]
    hop = lab.pop_address(router, pop)
    hold_down = lab.spec.pops[pop].config.pool.hold_down
    with lab.watch(router) as watch:
        watch.wait_for(lambda hops: hop in hops, timeout=20)
        # who landed on it before the cut: one read can miss an agent whose last query timed out
        chosen_by = {agent} if pop == landings_at_choice.get(agent) else set()
        moved = sorted(chosen_by | {name for name, on in landings(lab).items() if on == pop})
        fault = lab.faults.apply("cut-off", pop)
        try:
            gone = watch.wait_for(lambda hops: hop not in hops, timeout=30, since=fault.at)
            status = lab.pop_status(pop)
            deadline = gone + 30
            while True:
                # every agent that landed on the PoP has moved, and the agent beside the client
                # lands where the client's own connection does
                now_on, client_lands = landings(lab), lab.ask(client)
                where = now_on.get(agent)
                if where == client_lands and where not in (None, pop) \
                        and all(now_on.get(name) not in (None, pop) for name in moved):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"catchment: {now_on}, {client} on {client_lands}")
                time.sleep(0.1)
            mapped = time.monotonic()
        except BaseException:
            lab.faults.undo(fault)
            settled(lab)  # the next scenario starts from a settled lab, also after a failure
            raise
        undone = lab.faults.undo(fault)
        back = watch.wait_for(lambda hops: hop in hops, timeout=hold_down + 30, since=undone)
    settled(lab)
    return CutOff(pop, gone - fault.at, mapped - gone, back - undone, hold_down, where,
                  str(status.get("last_change_by")), moved, [s["state"] for s in status.get("servers", [])])


@contextmanager
def _watching(lab: Lab) -> Iterator[Callable[[float], list[RouteEvent]]]:
    """Watch the anycast route at every router; yields: the changes since a time."""
    with ExitStack() as stack:
        watches = [stack.enter_context(lab.watch(router)) for router in lab.routers]
        for watch in watches:
            watch.wait_for(bool, timeout=20)
        initial = [watch.nexthops for watch in watches]

        def changes(since: float) -> list[RouteEvent]:
            return [event for watch, first in zip(watches, initial, strict=True) for event in watch.events
                    if event.timestamp >= since and event.nexthops != first]
        yield changes


def monitoring_fails(lab: Lab, scenario: str) -> dict[str, Any]:
    """Hold one monitoring failure; the announcement changes it caused (the goal: none)."""
    expected = EXPECTED_VIEW[scenario]
    with _watching(lab) as changes:
        start = time.monotonic()
        faults = []
        try:
            for kind, target in SCENARIOS[scenario]:
                faults.append(lab.faults.apply(kind, target))
            for name in lab.pops:
                lab.pop(name).wait_status(lambda s: s["external"]["view"] == expected, timeout=20)
            views_at = time.monotonic() - start
            states: set[str] = set()
            end = time.monotonic() + HOLD
            while time.monotonic() < end:
                states |= {str(lab.pop_status(name).get("state")) for name in lab.pops}
                time.sleep(0.25)
            statuses = {name: lab.pop_status(name) for name in lab.pops}
        except BaseException:
            for fault in reversed(faults):
                lab.faults.undo(fault)
            settled(lab)  # the next scenario starts from a settled lab, also after a failure
            raise
        for fault in reversed(faults):
            lab.faults.undo(fault)
        seen = changes(start)
    settled(lab)
    return {"scenario": scenario, "changes": len(seen), "events": seen, "states": sorted(states),
            "view": expected, "view_after": views_at,
            "dropped": {name: s["external"]["dropped"] for name, s in statuses.items()},
            "competent": {name: s["external"]["competent"] for name, s in statuses.items()}}
