"""The engine drives the kernel data plane (ECMP mode) end to end, with real traffic.

    client --10.9.0.0/30-- r1 (FRR) --10.0.1.0/30-- pop1 (pop run, dataplane: ecmp) --+-- s1 (VIP on lo)
                                                                                       +-- s2 (VIP on lo)

pop1 announces 198.51.100.1/32 to r1 and programs a multipath route for it via the healthy
servers (its own table slice, protocol 200). Each server holds the VIP on lo and answers
TCP :8080 on it with its own name. Flows from the client spread over both servers; when s1
dies, the engine takes it out of the route and every new flow lands on s2. A route changed
behind pop's back is repaired by the next read-back; an operator drain withdraws first and
removes the route `withdraw_dwell` later.
"""

from __future__ import annotations

import collections
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lab.frr import BgpNeighbor, FrrRouter
from lab.netns import Netns, veth
from lab.popnode import PopNode, TcpService
from lab.routewatch import RouteWatcher, read_nexthops

VIP = "198.51.100.1"
NsFactory = Callable[[str], Netns]
WHOAMI = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 8080))
s.listen(256)
while True:
    c, _ = s.accept()
    c.sendall(sys.argv[2].encode())
    c.close()
"""
CLIENT = """
import socket, sys
answers = []
for _ in range(int(sys.argv[2])):
    try:
        s = socket.create_connection((sys.argv[1], 8080), timeout=1)
        answers.append(s.recv(16).decode() or "-")
        s.close()
    except OSError:
        answers.append("-")
print(" ".join(answers))
"""


def flows(client: Netns, count: int) -> collections.Counter[str]:
    out = client.run(sys.executable, "-c", CLIENT, VIP, str(count), timeout=60).stdout.split()
    return collections.Counter(out)


def test_ecmp_mode_spreads_flows_and_drops_a_dead_server(netns_factory: NsFactory,
                                                          frr_factory: Callable[..., FrrRouter],
                                                          tmp_path: Path) -> None:
    r1 = frr_factory(netns_factory("r1"), "r1", 65000, "192.0.2.100", [BgpNeighbor("10.0.1.2", 65101, hold_time=9)],
                     start=False)
    client = netns_factory("c")
    veth(client, "eth0", "10.9.0.2/30", r1.ns, "cl", "10.9.0.1/30")
    client.run("ip", "route", "add", "default", "via", "10.9.0.1")
    pop_ns = netns_factory("p1")
    veth(r1.ns, "r1p1", "10.0.1.1/30", pop_ns, "up0", "10.0.1.2/30")
    r1.start()  # after its links: LINKS_FIRST
    pop_ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    pop_ns.run("ip", "route", "add", "10.9.0.0/30", "via", "10.0.1.1")
    services = {}
    for s in (1, 2):
        sns = netns_factory(f"s{s}")
        veth(pop_ns, f"v{s}", f"10.1.{s}.1/30", sns, "eth0", f"10.1.{s}.2/30")
        sns.run("ip", "addr", "add", f"{VIP}/32", "dev", "lo")
        sns.run("ip", "route", "add", "default", "via", f"10.1.{s}.1")
        health = TcpService(sns, f"10.1.{s}.2", 443)
        health.start()
        whoami = sns.popen(sys.executable, "-c", WHOAMI, VIP, f"s{s}")
        services[s] = (sns, health, whoami)
    pop = PopNode(pop_ns, {
        "pop": {"name": "pop1", "asn": 65101, "router_id": "192.0.2.1"},
        "neighbors": [{"address": "10.0.1.1", "peer_as": 65000, "local_address": "10.0.1.2"}],
        "prefixes": [f"{VIP}/32"],
        "servers": [{"name": "s1", "address": "10.1.1.2"}, {"name": "s2", "address": "10.1.2.2"}],
        "checks": {"l4": {"port": 443}},
        "dataplane": {"mode": "ecmp", "hash_policy": 1, "withdraw_dwell": 0.5, "verify_interval": 0.5},
        "drain": {"steps": ["withdraw"]},  # the drain below is about the dwell after the withdraw
    }, tmp_path / "pop1")
    pop.start()
    try:
        with RouteWatcher(r1.ns, f"{VIP}/32") as at_router, RouteWatcher(pop_ns, f"{VIP}/32") as at_pop:
            at_pop.wait_for(lambda hops: hops == frozenset({"10.1.1.2", "10.1.2.2"}), timeout=30)
            at_router.wait_for(lambda hops: hops == frozenset({"10.0.1.2"}), timeout=30)
            route = pop_ns.run("ip", "route", "show", f"{VIP}/32").stdout
            assert "proto 200" in route, route  # marked as pop's own
            assert pop_ns.run("sysctl", "-n", "net.ipv4.fib_multipath_hash_policy").stdout.strip() == "1"
            spread = flows(client, 60)
            assert spread["s1"] >= 10 and spread["s2"] >= 10, spread  # L4 hashing spreads one client's flows
            # the kernel's own view, read back every 2 s: the policy pop set
            status = pop.wait_status(lambda s: (s["dataplane"]["diagnostics"] or {}).get("hash_policy", {})
                                     .get("ipv4") == 1, timeout=5)
            assert status["dataplane"]["diagnostics"]["l4_hashing"] is True

            # drift: somebody deletes pop's route, then narrows it to one server; read-back repairs both
            both = frozenset({"10.1.1.2", "10.1.2.2"})
            for damage in (("ip", "route", "del", f"{VIP}/32"),
                           ("ip", "route", "replace", f"{VIP}/32", "via", "10.1.1.2", "proto", "200")):
                repairs = pop.status()["apply"]["repairs"]
                pop_ns.run(*damage)
                broken = time.monotonic()
                at = at_pop.wait_for(lambda hops: hops == both, timeout=10, since=broken)
                print(f"\nMEASURED {damage[2]} behind pop's back -> repaired: {(at - broken) * 1000:.0f} ms")
                assert pop.wait_status(lambda s, n=repairs: s["apply"]["repairs"] > n, timeout=5)["apply"]["ok"]
            assert "dataplane.repaired" in pop.log_tail(200)
            assert at_router.nexthops == frozenset({"10.0.1.2"})  # BGP never moved

            # s1 dies: it leaves the multipath route, the PoP stays announced, new flows all go to s2
            _, health, whoami = services[1]
            health.stop()
            services[1][0].stop(whoami)
            killed = time.monotonic()
            at = at_pop.wait_for(lambda hops: hops == frozenset({"10.1.2.2"}), timeout=10, since=killed)
            print(f"\nMEASURED server dies -> leaves the PoP's multipath route: {(at - killed) * 1000:.0f} ms")
            assert flows(client, 30) == collections.Counter({"s2": 30})
            assert at_router.nexthops == frozenset({"10.0.1.2"})

            # an operator drain with s2 alive: BGP withdraws first; the route toward s2 stays for the
            # dwell (traffic still on its way is delivered), then goes
            pop.post("/drain")
            gone = at_router.wait_for(lambda hops: not hops, timeout=10, since=time.monotonic())
            torn = at_pop.wait_for(lambda hops: not hops, timeout=10, since=gone)
            assert torn - gone >= 0.4, (gone, torn)
            assert read_nexthops(pop_ns, f"{VIP}/32") == frozenset()
    finally:
        pop.stop()
