"""The fleet guard in the lab (pop.fleet), against the real FRR routers, ExaBGP and servers.

The routers send every path they hold (ADD-PATH), so each PoP sees from its own session which
other PoPs announce the anycast prefix (their large community 64496:1:<id>). The lab runs with
the guard off (min_pops 0); this test turns it on in all three PoPs by a reload, then:

1. every PoP's tier-2 check fails at the same moment (wireguard-go stopped on every server:
   the shape of a probe key rotated wrongly everywhere). Without the guard all three PoPs
   withdraw and the anycast prefix is gone. With min_pops 2: each PoP leaves de-preferenced,
   the two with the lowest ids (pop1, pop2) stay held, pop3 withdraws after the pace, the
   routers keep a route all along and the client still connects;
2. then pop1's servers really die (TCP refused too): pop1 withdraws at once, as without the
   guard, and pop3 comes back de-preferenced, so that two PoPs announce again.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from lab.runner import Lab
from tests.netns.conftest import running_lab
from tests.netns.test_lab_runner import ANYCAST, hops, needs

__all__ = ["needs"]

POPS = ("pop1", "pop2", "pop3")
PACE = 3.0


@pytest.fixture(scope="module")
def lab(needs: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab("tfg", tmp_path_factory) as running:
        yield running


def states(lab: Lab) -> dict[str, str]:
    return {name: lab.pop_status(name).get("state", "unreachable") for name in POPS}


def wait_states(lab: Lab, want: dict[str, str], timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (seen := states(lab)) == want:
            return time.monotonic()
        time.sleep(0.1)
    raise AssertionError(f"PoP states {seen}, wanted {want}\n{lab.log_tails(20)}")


def test_every_pop_sees_the_others_through_its_sessions(lab: Lab) -> None:
    """The lab has converged when every router forwards to its own PoPs; the paths of the PoPs
    behind the other router (pop1 for pop2, through r1 and r2) may arrive a moment later."""
    converged = lab.wait_converged(timeout=30)
    want = {name: {ANYCAST: [i for i in (1, 2, 3) if i != index]} for index, name in enumerate(POPS, start=1)}
    deadline, fleets = converged + 10, dict[str, Any]()
    while time.monotonic() < deadline:
        fleets = {name: lab.pop_status(name)["fleet"] for name in POPS}
        if all(fleets[name]["announcing"] == want[name] for name in POPS):
            break
        time.sleep(0.05)
    print(f"\nMEASURED every PoP sees the other two {time.monotonic() - converged:.2f} s after the routers converged")
    for index, name in enumerate(POPS, start=1):
        assert fleets[name]["id"] == index and not fleets[name]["guarding"]
        assert fleets[name]["announcing"] == want[name], (
            name, fleets[name], lab.router("r2").vtysh(f"show bgp ipv4 unicast {ANYCAST}"), lab.log_tails(20))


def test_an_engine_exabgp_respawns_learns_the_fleet_again(lab: Lab) -> None:
    """ExaBGP hands a new engine no routes it received before: the engine asks the routers to
    send them again (route refresh), or it would see no other PoP until they change."""
    lab.wait_converged(timeout=30)
    fault = lab.faults.apply("engine-kill", "pop1")
    try:
        status = lab.pop("pop1").wait_status(lambda s: s["fleet"]["announcing"].get(ANYCAST) == [2, 3], timeout=10)
        print(f"\nMEASURED a respawned engine sees the other PoPs again {status['uptime_seconds']:.1f} s after "
              f"its start")
    finally:
        lab.faults.undo(fault)


def test_without_the_guard_every_pop_failing_tier2_at_once_withdraws_the_prefix_everywhere(lab: Lab) -> None:
    """The scenario the guard is for, with the guard off: the prefix leaves the routers."""
    lab.wait_converged(timeout=30)
    try:
        with lab.watch("r1") as r1:
            faults = [lab.faults.apply("wireguard-down", name) for name in POPS]
            at = r1.wait_for(lambda h: not h, timeout=20, since=faults[0].at)
            print(f"\nMEASURED without the guard: every PoP's tier 2 broken -> r1 has no route to the anycast "
                  f"prefix after {at - faults[0].at:.1f} s")
            wait_states(lab, dict.fromkeys(POPS, "withdrawn"), timeout=10)
            assert lab.ask("client1") is None
    finally:
        lab.faults.clear()
    lab.wait_converged(timeout=40)


def test_every_pop_failing_tier2_at_once_keeps_min_pops_announced_and_a_dead_pop_still_withdraws(lab: Lab) -> None:
    lab.wait_converged(timeout=30)
    for name in POPS:
        lab.pop(name).set_fleet(min_pops=2, pace=PACE)
    try:
        with lab.watch("r1") as r1:
            began = time.monotonic()
            faults = [lab.faults.apply("wireguard-down", name) for name in POPS]
            spread = faults[-1].at - faults[0].began
            settled = wait_states(lab, {"pop1": "guarded", "pop2": "guarded", "pop3": "withdrawn"}, timeout=30)
            print(f"\nMEASURED every PoP's tier 2 broken within {spread * 1000:.0f} ms -> pop1 and pop2 held "
                  f"de-preferenced, pop3 withdrawn: {settled - began:.1f} s after the first fault")
            # the routers never lost the prefix: r1 always had a next hop
            gone = [e for e in r1.events if e.timestamp >= began and not e.nexthops]
            assert not gone, gone
            assert lab.router("r1").kernel_nexthops(ANYCAST), "r1 has no route to the anycast prefix"
            assert lab.ask("client1") in {"pop1", "pop2"}, "the client no longer connects"
            shown = lab.pop_status("pop1")
            assert shown["fleet"]["holding"] and shown["fleet"]["phase"] == "held"
            announced = shown["bgp"]["announced"][0]
            assert announced["as_path_prepend"] >= 3 and "65535:0" in announced["communities"]
            assert "64496:2:1" in announced["large_communities"]
            assert "0 other PoP(s) stay of min_pops 2" in shown["fleet"]["reason"]
            events = [e["to"] for e in shown["events"] if e["kind"] == "fleet"]  # newest first
            # held at once, or after leaving for a moment: whether the others' leaving marks
            # arrived before this PoP's own verdict
            assert events[0] == "held" and set(events[1:2]) <= {"leaving"}, events

            # pop1's servers die for real: it is hard down and withdraws at once
            dead = lab.faults.apply("server-down", "pop1")
            at = r1.wait_for(lambda h: lab.pop_address("r1", "pop1") not in h, timeout=10, since=dead.at)
            print(f"MEASURED pop1's servers dead while held -> pop1 gone from r1: {(at - dead.at) * 1000:.0f} ms")
            back = wait_states(lab, {"pop1": "withdrawn", "pop2": "guarded", "pop3": "guarded"}, timeout=15)
            print(f"MEASURED -> pop3 back, de-preferenced, so that two PoPs announce: {back - dead.at:.1f} s")
            assert r1.nexthops, "r1 lost the anycast prefix"
            assert lab.ask("client1") in {"pop2", "pop3"}
    finally:
        lab.faults.clear()
        for name in POPS:
            lab.pop(name).set_fleet(min_pops=0)
    lab.wait_converged(timeout=40)
    assert lab.router("r1").kernel_nexthops(ANYCAST) == hops(lab, "r1", "pop1", "pop3")


def test_a_reload_removing_a_prefix_the_fleet_cannot_spare_is_refused_and_changes_nothing(lab: Lab) -> None:
    lab.wait_converged(timeout=30)
    node, r1 = lab.pop("pop1"), lab.router("r1")
    peer = lab.pop_address("r1", "pop1")
    original = node.config_path.read_text()
    updates = r1.updates_received(peer)
    try:
        document = yaml.safe_load(original)
        document["fleet"]["min_pops"] = 3  # two other PoPs announce the prefix: not enough
        document["prefixes"][0]["prefix"] = "198.51.100.2/32"
        node.config_path.write_text(yaml.safe_dump(document, sort_keys=False))
        refused = lab.pop_status("pop1")["reloads"]["refused"]
        assert node.proc is not None
        node.proc.send_signal(signal.SIGHUP)
        node.wait_status(lambda s: s["reloads"]["refused"] == refused + 1, timeout=15)
        assert f"it removes {ANYCAST}, which only 2 other PoP(s) announce (fleet.min_pops 3)" in node.log_tail(40)
        status = lab.pop_status("pop1")
        assert status["state"] == "announced" and status["fleet"]["min_pops"] == 0
        assert [a["prefix"] for a in status["bgp"]["announced"]] == [ANYCAST]
        assert r1.updates_received(peer) == updates  # not one UPDATE
        assert lab.router("r1").kernel_nexthops(ANYCAST) == hops(lab, "r1", "pop1", "pop3")
    finally:
        node.config_path.write_text(original)
