"""Tier 3 end to end with real daemons: probe agents (`pop probe-agent`) in their own networks,
two PoPs (`pop run`: ExaBGP + engine) with beacons, and an FRR router between them.

    a1 --\\                                /-- p1 (pop1: beacon 203.0.113.1, servers s11 s12)
    a2 ---- r1 (FRR, AS 65000) ----------+
    a3 --/                                \\-- p2 (pop2: beacon 203.0.113.2, servers s21 s22)

Each agent probes both PoPs' beacons (TCP) every 0.5 s and serves signed reports; each PoP
pulls all three every second (quorum 2). The assertions are made at r1's kernel table.
- pop1 cut off from outside (r1 drops the agents' traffic to it, its servers and its BGP
  session stay green): withdrawn by tier 3, and back after the cut is undone and the hold-down;
- every agent's own network broken (they reach no PoP): nothing changes (not competent);
- agents that lie (one replays a report it signed earlier, two sign with the wrong key):
  nothing changes (dropped as duplicate/stale and forged, counted);
- every agent killed: nothing changes (unknown never withdraws).
The catchment map (who answers each agent on the anycast address: each PoP's engine serves
`pop.identity` there, `external.identity_port`) follows a withdrawal.
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
    r1 = frr_factory(r1_ns, "r1", 65000, "192.0.2.100", neighbors, start=False)  # after the links: LINKS_FIRST
    agents_cfg = [{"name": name, "address": agent_address(k)} for k, name in enumerate(AGENTS, 1)]
    pops: dict[str, PopNode] = {}
    for i in (1, 2):
        external = {"enabled": True, "beacons": [f"203.0.113.{i}/32"], "key_file": str(key), "agents": agents_cfg,
                    "quorum": 2, "fall_for": 2, "identity_port": 9191}

        def on_lo(ns: Netns, beacon: str = f"203.0.113.{i}/32") -> None:
            # the PoP answers on the anycast address itself (mode none), and its engine says who
            # it is there (external.identity_port) for the agents' catchment map
            ns.run("ip", "addr", "add", beacon, "dev", "lo")
            ns.run("ip", "addr", "add", ANYCAST, "dev", "lo")

        node, _ = build_pop(i, netns_factory, r1_ns, tmp_path, prepare=on_lo, external=external,
                            pool={"hold_down": HOLD_DOWN})
        node.ns.run("ip", "route", "add", "10.9.0.0/16", "via", f"10.0.{i}.1")
        beacon = TcpService(node.ns, f"203.0.113.{i}", PORT, log=tmp_path / f"beacon{i}.log")
        beacon.start()
        pops[f"pop{i}"] = node
        dumps.append(node)  # their logs are printed if the test fails
    r1.start()
    procs: dict[str, Any] = {}
    for k, name in enumerate(AGENTS, 1):
        ns = netns_factory(name)
        veth(r1_ns, f"r1a{k}", f"10.9.{k}.1/30", ns, "eth0", f"{agent_address(k)}/30")
        ns.run("ip", "route", "add", "default", "via", f"10.9.{k}.1")
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump({
            "name": name, "listen": agent_address(k), "port": 9190, "key_file": str(key),
            "interval": 0.5, "timeout": 0.5, "rise": 2, "fall": 3, "anycast": [ANYCAST.split("/")[0]],
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


def landings(node: PopNode) -> dict[str, str | None]:
    """Per agent, the PoP that answered it on the anycast address (the node's /status catchment)."""
    catchment = (node.status().get("external") or {}).get("catchment", {})
    return {agent: seen.get(ANYCAST.split("/")[0], {}).get("pop") for agent, seen in catchment.items()}


def test_a_pop_cut_off_from_outside_is_withdrawn_by_the_quorum_and_comes_back(fleet: dict[str, Any]) -> None:
    r1, pop1 = fleet["r1"], fleet["pops"]["pop1"]
    with RouteWatcher(r1.ns, ANYCAST) as watch:
        settled(fleet, watch)
        with cut_off(r1, "203.0.113.1") as at:
            left = watch.wait_for(has("10.0.2.2"), timeout=15, since=at)
            print(f"\nMEASURED pop1 cut off from outside -> out of r1's route: {left - at:.2f} s")
            status = pop1.status()
            assert status["state"] == "withdrawn" and status["last_change_by"] == "external", status["reason"]
            # the catchment follows: every agent now lands on pop2 (as seen in pop2's /status)
            deadline = left + 10.0
            while set(landings(fleet["pops"]["pop2"]).values()) != {"pop2"} \
                    or len(landings(fleet["pops"]["pop2"])) != len(AGENTS):
                assert time.monotonic() < deadline, landings(fleet["pops"]["pop2"])
                time.sleep(0.2)
            print(f"MEASURED catchment map shows every agent on pop2: {time.monotonic() - left:.2f} s after the withdraw")
            assert status["external"]["view"] == "unreachable" and status["external"]["unreachable"] == 3
            assert [s["state"] for s in status["servers"]] == ["up", "up"]  # green inside
            undone = time.monotonic()
        back = watch.wait_for(both, timeout=20, since=undone)
        print(f"MEASURED cut undone -> pop1 back at r1: {back - undone:.2f} s (hold-down {HOLD_DOWN:g} s)")
        assert back - undone >= HOLD_DOWN


REPLAY = """
import base64, http.server, sys
body, signature = base64.b64decode(sys.argv[3]), sys.argv[4]
class Replay(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("X-Pop-Signature", signature)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), Replay).serve_forever()
"""
CAPTURE = """
import base64, sys, urllib.request
with urllib.request.urlopen(f"http://{sys.argv[1]}:9190/v1/results", timeout=5) as r:
    print(base64.b64encode(r.read()).decode(), r.headers["X-Pop-Signature"])
"""


def restart_agent(fleet: dict[str, Any], name: str, *argv: str) -> None:
    ns, proc = fleet["agents"][name]
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()
    fleet["agents"][name] = (ns, ns.popen(sys.executable, *argv, log=fleet["tmp"] / f"{name}-2.log"))


def test_monitoring_that_breaks_or_lies_never_withdraws(fleet: dict[str, Any]) -> None:
    r1, tmp = fleet["r1"], fleet["tmp"]
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
        for node in fleet["pops"].values():
            node.wait_status(lambda s: s["external"]["view"] == "reachable", timeout=15)

        # the agents lie: a1 replays a report it signed earlier (one that says pop1 is down would
        # be as harmless), a2 and a3 sign with a key the PoPs do not have
        a1_ns, _ = fleet["agents"]["a1"]
        body, signature = a1_ns.run(sys.executable, "-c", CAPTURE, agent_address(1)).stdout.split()
        restart_agent(fleet, "a1", "-c", REPLAY, agent_address(1), "9190", body, signature)
        wrong = tmp / "wrong.key"
        wrong.write_text("not-the-shared-key-0123456789abcdef\n")
        wrong.chmod(0o600)
        for name in ("a2", "a3"):
            config = tmp / f"{name}.yaml"
            config.write_text(config.read_text().replace(str(tmp / "agents.key"), str(wrong)))
            restart_agent(fleet, name, "-m", "pop", "probe-agent", "-c", str(config))
        for node in fleet["pops"].values():
            status = node.wait_status(lambda s: s["external"]["view"] == "unknown"
                                      and s["external"]["dropped"].get("forged", 0) > 0
                                      and s["external"]["dropped"].get("stale", 0)
                                      + s["external"]["dropped"].get("duplicate", 0) > 0, timeout=20)
            assert status["state"] == "announced", status

        # every agent dies
        for _, proc in fleet["agents"].values():
            os.kill(proc.pid, signal.SIGKILL)
        time.sleep(8.0)  # longer than max_age + fall_for: a wrong reaction would have shown by now
        assert [e for e in watch.events if e.timestamp >= start and not both(e.nexthops)] == [], watch.events
        for node in fleet["pops"].values():
            status = node.status()
            assert status["state"] == "announced" and status["external"]["view"] == "unknown"
            assert status["external"]["dropped"].get("unreachable", 0) > 0
