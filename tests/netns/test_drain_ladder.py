"""The RFC 8326 drain ladder seen at a real FRR router, with two PoPs (real ExaBGP + engine) behind it.

    r1 (FRR, AS 65000) --10.0.1.0/30-- pop1 (AS 65101) -- s11, s12
                       --10.0.2.0/30-- pop2 (AS 65102) -- s21, s22

r1 honours GRACEFUL_SHUTDOWN as operators configure it (lab.frr: a route-map on received
routes sets local-preference 0 on 65535:0) and compares MED across neighbouring ASes
(`bgp always-compare-med`: the PoPs have their own ASNs, docs/operations.md). pop1 drains
with a short ladder; each step must reach r1 in order and within 1 s of its scheduled time,
and r1's kernel route must leave pop1 (the client's traffic goes to pop2) before the withdraw.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lab.frr import BgpNeighbor, FrrRouter
from lab.netns import Netns
from lab.popnode import PopNode
from lab.routewatch import RouteWatcher
from tests.netns.test_pop_frr import ANYCAST, build_pop, dumps, has

__all__ = ["dumps"]  # the fixture that prints the PoPs' logs when a test fails

NsFactory = Callable[[str], Netns]
DWELL = 3.0
LADDER = {"steps": [{"med": 1000, "dwell": DWELL}, {"prepend": 2, "dwell": DWELL},
                    {"graceful_shutdown": True, "dwell": DWELL}, "withdraw"]}
POP1 = "10.0.1.2"
POP2 = "10.0.2.2"


def pop1_path(r1: FrrRouter) -> dict[str, Any] | None:
    """pop1's path to the anycast prefix in r1's BGP table, or None once it is withdrawn."""
    for path in r1.bgp_routes(ANYCAST).get("paths", []):
        if path.get("peer", {}).get("peerId") == POP1:
            return dict(path)
    return None


def steps_seen(path: dict[str, Any] | None) -> set[str]:
    if path is None:
        return {"withdraw"}
    seen = set()
    if path.get("metric", 0) >= 1000:  # FRR's JSON calls the MED "metric"
        seen.add("med")
    if path.get("aspath", {}).get("length", 1) >= 3:  # 65101 plus two prepends
        seen.add("prepend")
    # FRR prints the well-known community by name, and local-pref as locPrf (8.4) or localpref
    community = set(path.get("community", {}).get("string", "").split())
    if community & {"65535:0", "graceful-shutdown", "gshut"} and _local_pref(path) == 0:
        seen.add("graceful_shutdown")
    return seen


def _local_pref(path: dict[str, Any]) -> object:
    return path.get("locPrf", path.get("localpref"))


def test_each_drain_step_reaches_the_router_on_time_and_traffic_leaves_before_the_withdraw(
        netns_factory: NsFactory, frr_factory: Callable[..., FrrRouter], tmp_path: Path,
        dumps: list[PopNode]) -> None:
    ns = netns_factory("r1")
    r1 = frr_factory(ns, "r1", 65000, "192.0.2.100",
                     [BgpNeighbor(f"10.0.{i}.2", 65100 + i, hold_time=9) for i in (1, 2)],
                     graceful_shutdown_in=True, extra_config="router bgp 65000\n bgp always-compare-med",
                     start=False)  # started once the links to the PoPs exist (LINKS_FIRST)
    with RouteWatcher(ns, ANYCAST) as watch:
        pop1, _ = build_pop(1, netns_factory, ns, tmp_path, drain=LADDER, pool={"hold_down": 1.0})
        pop2, _ = build_pop(2, netns_factory, ns, tmp_path)
        r1.start()
        dumps.extend([pop1, pop2])
        watch.wait_for(has(POP1, POP2), timeout=30)
        assert steps_seen(pop1_path(r1)) == set(), pop1_path(r1)

        started = time.monotonic()
        answer = pop1.post("/drain", reason="ladder test", who="netns")
        posted = time.monotonic() - started
        assert answer["state"] == "draining" and answer["ladder"]["current"] == "med 1000", answer
        scheduled = {"med": 0.0, "prepend": DWELL, "graceful_shutdown": 2 * DWELL, "withdraw": 3 * DWELL}
        arrived: dict[str, float] = {}
        local_pref: dict[str, object] = {}
        last: dict[str, Any] | None = None  # pop1's last path seen, for a failure's message
        polls = 0
        while len(arrived) < len(scheduled) and time.monotonic() - started < 4 * DWELL + 3:
            path = pop1_path(r1)
            last = path or last
            polls += 1
            now = time.monotonic() - started
            for step in steps_seen(path) - set(arrived):
                arrived[step] = now
                local_pref[step] = None if path is None else _local_pref(path)
            time.sleep(0.02)
        moved = next((e.timestamp - started for e in watch.events
                      if e.timestamp >= started and e.nexthops == frozenset({POP2})), None)

        poll = (time.monotonic() - started - posted) / max(polls, 1)
        # conservative: from before the request (the ladder starts when the engine has it) to
        # the end of the vtysh poll that first showed the step
        print(f"\nMEASURED POST /drain answered after {posted:.2f} s; r1 polled every {poll * 1000:.0f} ms")
        for step, at in scheduled.items():
            seen = arrived.get(step)
            print(f"MEASURED drain step {step:<17} scheduled +{at:4.1f} s, at the router "
                  + ("never" if seen is None else f"+{seen:5.2f} s (late {seen - at:+.2f} s)")
                  + (f", local-pref {local_pref[step]}" if step == "graceful_shutdown" and step in local_pref else ""))
        print("MEASURED r1's kernel route leaves pop1 (traffic to pop2) at "
              + ("never" if moved is None else f"+{moved:.2f} s"))
        assert set(arrived) == set(scheduled), (arrived, last and last.get("community"), pop1.log_tail(40))
        order = sorted(arrived, key=arrived.__getitem__)
        assert order == ["med", "prepend", "graceful_shutdown", "withdraw"], arrived
        for step, at in scheduled.items():
            assert 0.0 <= arrived[step] - at < 1.0, (step, arrived[step], at)
        # the client's traffic left pop1 at the MED step, long before the withdraw
        assert moved is not None and moved < 1.0 and moved < arrived["withdraw"], (moved, watch.events)
        status = pop1.status()
        assert status["state"] == "drained" and status["ladder"]["current"] == "withdraw"

        # undrain: pop1 comes back after the hold-down, without the drain's attributes
        back = time.monotonic()
        pop1.post("/undrain", who="netns")
        at = watch.wait_for(has(POP1, POP2), timeout=10, since=back)
        print(f"MEASURED undrain -> pop1 back in r1's ECMP set: {at - back:.2f} s (hold-down 1 s)")
        assert 1.0 <= at - back < 3.0
        assert steps_seen(pop1_path(r1)) == set(), pop1_path(r1)
        assert pop1.status()["ladder"] is None
