"""Tier 3 end to end with real daemons: probe agents (`pop probe-agent`) in their own networks,
two PoPs (`pop run`: ExaBGP + engine) with beacons, and an FRR router between them.

    a1 --\\                                /-- p1 (pop1: beacon 203.0.113.1, servers s11 s12)
    a2 ---- r1 (FRR, AS 65000) ----------+
    a3 --/                                \\-- p2 (pop2: beacon 203.0.113.2, servers s21 s22)

Each agent probes both PoPs' beacons (TCP) every 0.5 s and serves signed reports; each PoP
pulls all three every second (quorum 2). The assertions are made at r1's kernel table.
- pop1 cut off from outside (r1 drops the agents' traffic to it, its servers and its BGP
  session stay green): withdrawn by tier 3, and back after the cut is undone and the hold-down;
- every agent killed: nothing changes (unknown never withdraws);
- every agent's own network broken (they reach no PoP): nothing changes (not competent).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab.frr import BgpNeighbor, FrrRouter
from lab.netns import Netns, veth
from lab.popnode import PopNode, TcpService
from lab.routewatch import RouteWatcher
from tests.netns.test_pop_frr import ANYCAST, PORT, build_pop, dumps, has

__all__ = ["dumps"]  # the fixture that prints the PoPs' logs when a test fails

NsFactory = Callable[[str], Netns]
AGENTS = ("a1", "a2", "a3")
HOLD_DOWN = 1.0


def agent_address(k: int) -> str:
    return f"10.9.{k}.2"


@pytest.fixture
def fleet(netns_factory: NsFactory, frr_factory: Callable[..., FrrRouter], tmp_path: Path,
          dumps: list[PopNode]) -> Iterator[dict[str, Any]]:
    key = tmp_path / "agents.key"
    key.write_text("lab-only-shared-key-0123456789abcdef\n")
    key.chmod(0o600)
    r1_ns = netns_factory("r1")
    neighbors = [BgpNeighbor(f"10.0.{i}.2", 65100 + i, hold_time=9) for i in (1, 2)]
    r1 = frr_factory(r1_ns, "r1", 65000, "192.0.2.100", neighbors)
    agents_cfg = [{"name": name, "address": agent_address(k)} for k, name in enumerate(AGENTS, 1)]
    pops: dict[str, PopNode] = {}
    for i in (1, 2):
        external = {"enabled": True, "beacons": [f"203.0.113.{i}/32"], "key_file": str(key), "agents": agents_cfg,
                    "quorum": 2, "fall_for": 2}
        node, _ = build_pop(i, netns_factory, r1_ns, tmp_path, external=external, pool={"hold_down": HOLD_DOWN})
        node.ns.run("ip", "addr", "add", f"203.0.113.{i}/32", "dev", "lo")
        node.ns.run("ip", "route", "add", "10.9.0.0/16", "via", f"10.0.{i}.1")
        beacon = TcpService(node.ns, f"203.0.113.{i}", PORT, log=tmp_path / f"beacon{i}.log")
        beacon.start()
        pops[f"pop{i}"] = node
        dumps.append(node)  # their logs are printed if the test fails
    procs: dict[str, Any] = {}
    for k, name in enumerate(AGENTS, 1):
        ns = netns_factory(name)
        veth(r1_ns, f"r1a{k}", f"10.9.{k}.1/30", ns, "eth0", f"{agent_address(k)}/30")
        ns.run("ip", "route", "add", "default", "via", f"10.9.{k}.1")
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump({
            "name": name, "listen": agent_address(k), "port": 9190, "key_file": str(key),
            "interval": 0.5, "timeout": 0.5, "rise": 2, "fall": 3,
            "pops": [{"name": f"pop{i}", "address": f"203.0.113.{i}", "tcp_port": PORT} for i in (1, 2)]}))
        procs[name] = (ns, ns.popen(sys.executable, "-m", "pop", "probe-agent", "-c", str(config),
                                    log=tmp_path / f"{name}.log"))
    try:
        yield {"r1": r1, "pops": pops, "agents": procs, "tmp": tmp_path}
    finally:
        for _ns, proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


def both(nexthops: frozenset[str]) -> bool:
    return nexthops == frozenset({"10.0.1.2", "10.0.2.2"})


def settled(fleet: dict[str, Any], watch: RouteWatcher) -> None:
    watch.wait_for(both, timeout=40)
    for node in fleet["pops"].values():
        node.wait_status(lambda s: (s.get("external") or {}).get("view") == "reachable"
                         and s["external"]["competent"] == 3, timeout=20)


@contextlib.contextmanager
def cut_off(r1: FrrRouter, address: str) -> Iterator[float]:
    """r1 drops the agents' traffic to and from one PoP; BGP and the PoP's own checks stay up."""
    r1.ns.run("nft", "-f", "-", input=(
        "table inet tier3cut {\n  chain cut {\n    type filter hook forward priority 0; policy accept;\n"
        f"    ip saddr 10.9.0.0/16 ip daddr {address} drop\n    ip daddr 10.9.0.0/16 ip saddr {address} drop\n"
        "  }\n}\n"))
    try:
        yield time.monotonic()
    finally:
        r1.ns.run("nft", "delete", "table", "inet", "tier3cut")


def test_a_pop_cut_off_from_outside_is_withdrawn_by_the_quorum_and_comes_back(fleet: dict[str, Any]) -> None:
    r1, pop1 = fleet["r1"], fleet["pops"]["pop1"]
    with RouteWatcher(r1.ns, ANYCAST) as watch:
        settled(fleet, watch)
        with cut_off(r1, "203.0.113.1") as at:
            left = watch.wait_for(has("10.0.2.2"), timeout=15, since=at)
            print(f"\nMEASURED pop1 cut off from outside -> out of r1's route: {left - at:.2f} s")
            status = pop1.status()
            assert status["state"] == "withdrawn" and status["last_change_by"] == "external", status["reason"]
            assert status["external"]["view"] == "unreachable" and status["external"]["unreachable"] == 3
            assert [s["state"] for s in status["servers"]] == ["up", "up"]  # green inside
            undone = time.monotonic()
        back = watch.wait_for(both, timeout=20, since=undone)
        print(f"MEASURED cut undone -> pop1 back at r1: {back - undone:.2f} s (hold-down {HOLD_DOWN:g} s)")
        assert back - undone >= HOLD_DOWN


def test_dead_agents_or_agents_that_reach_nothing_never_withdraw(fleet: dict[str, Any]) -> None:
    r1 = fleet["r1"]
    with RouteWatcher(r1.ns, ANYCAST) as watch:
        settled(fleet, watch)
        start = time.monotonic()
        # every agent's own network breaks: they reach no PoP, so none of them counts
        for k in range(1, len(AGENTS) + 1):
            r1.ns.run("ip", "link", "set", f"r1a{k}", "down")
        for node in fleet["pops"].values():
            node.wait_status(lambda s: s["external"]["view"] == "unknown", timeout=15)
        for k in range(1, len(AGENTS) + 1):
            r1.ns.run("ip", "link", "set", f"r1a{k}", "up")
        # every agent dies
        for _, proc in fleet["agents"].values():
            os.kill(proc.pid, signal.SIGKILL)
        time.sleep(8.0)  # longer than max_age + fall_for: a wrong reaction would have shown
        assert [e for e in watch.events if e.timestamp >= start and not both(e.nexthops)] == [], watch.events
        for node in fleet["pops"].values():
            status = node.status()
            assert status["state"] == "announced" and status["external"]["view"] == "unknown"
            assert status["external"]["dropped"].get("unreachable", 0) > 0
