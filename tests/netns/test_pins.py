"""Flow pinning (pop.adapters.pins) on this host's real kernel: nftables, conntrack, ip rules.

    client (10.72.0.2) --- pop (10.72.0.1, 10.73.N.1; ECMP route + pins) --- sN (10.73.N.2, VIP on lo)

Each server answers every line on a kept-open TCP connection with its own name, so the client
sees, per connection, which server its packets reach *now*. The negative control first: with
no pins, taking s1 out of the multipath route moves s1's open connections to s2, which resets
them. With pins, the same change leaves them on s1 while every new connection goes to s2
(a quiescent drain in ECMP mode); unpinning s1 (it failed) moves them.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import Callable, Iterator

import pytest

from lab.netns import Netns, veth
from pop import desired
from pop.adapters.dataplane import KernelDataplane
from pop.adapters.pins import PIN_BASE, FlowPins
from pop.adapters.routes import DataplaneError, RouteTable
from pop.config import Attributes, Dataplane, Prefix
from pop.desired import DesiredState, EcmpRoute, NextHop

VIP = "203.0.113.20"
PORT = 7000
SERVERS = ("10.73.1.2", "10.73.2.2")

ECHO = r"""
import socket, sys, threading
name = sys.argv[2].encode()
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[3]))); srv.listen(256)
def serve(c):
    with c:
        while c.recv(64):
            c.sendall(name + b"\n")
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""


class Net:
    def __init__(self, make: Callable[[str], Netns]) -> None:
        self.client, self.pop = make("c"), make("p")
        veth(self.client, "eth0", "10.72.0.2/24", self.pop, "down0", "10.72.0.1/24")
        self.client.run("ip", "route", "add", "default", "via", "10.72.0.1")
        self.pop.run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.fib_multipath_hash_policy=1")
        for n, address in enumerate(SERVERS, 1):
            server = make(f"s{n}")
            veth(self.pop, f"v{n}", f"10.73.{n}.1/24", server, "eth0", f"{address}/24")
            server.run("ip", "addr", "add", f"{VIP}/32", "dev", "lo")
            server.run("ip", "route", "add", "default", "via", f"10.73.{n}.1")
            server.popen(sys.executable, "-c", ECHO, VIP, f"s{n}", str(PORT))
        self.routes = RouteTable(table=254, protocol=200, netns=self.pop.name)
        self.pins = FlowPins([f"{VIP}/32"], list(SERVERS), netns=self.pop.name)
        self.sockets: list[socket.socket] = []  # closed by the fixture

    def route(self, *servers: str) -> None:
        asyncio.run(self.routes.set([EcmpRoute(f"{VIP}/32", tuple(NextHop(s) for s in servers))]))

    def pin(self, *servers: str) -> None:
        asyncio.run(self.pins.set(servers))

    def connect(self, count: int) -> list[socket.socket]:
        conns = []
        for _ in range(count):
            with self.client.enter():
                sock = socket.socket()  # belongs to the client's namespace from here on
            sock.settimeout(2)
            for _attempt in range(20):  # the echo servers may still be starting
                try:
                    sock.connect((VIP, PORT))
                    break
                except OSError:
                    sock.close()
                    with self.client.enter():
                        sock = socket.socket()
                    sock.settimeout(2)
                    asyncio.run(asyncio.sleep(0.1))
            conns.append(sock)
        self.sockets += conns
        return conns


def who(conn: socket.socket) -> str:
    """The server that answers on this connection now, or "reset" when none does."""
    try:
        conn.sendall(b"?\n")
        return conn.recv(64).decode().strip() or "reset"
    except OSError:
        return "reset"


@pytest.fixture
def net(netns_factory: Callable[[str], Netns]) -> Iterator[Net]:
    net = Net(netns_factory)
    yield net
    for sock in net.sockets:
        sock.close()
    asyncio.run(net.pins.close())
    asyncio.run(net.routes.close())


def test_without_pins_a_route_change_moves_open_connections(net: Net) -> None:
    net.route(*SERVERS)
    conns = net.connect(24)
    before = [who(c) for c in conns]
    assert set(before) == {"s1", "s2"}  # L4 hashing spreads them
    net.route(SERVERS[1])
    after = [who(c) for c in conns]
    # s1's connections now reach s2, which knows nothing of them and resets them
    assert all(a == "reset" for b, a in zip(before, after, strict=True) if b == "s1"), (before, after)
    assert all(a == "s2" for b, a in zip(before, after, strict=True) if b == "s2"), (before, after)


def test_pinned_connections_stay_through_a_drain_and_move_when_unpinned(net: Net) -> None:
    net.route(*SERVERS)
    net.pin(*SERVERS)
    conns = net.connect(24)
    before = [who(c) for c in conns]
    assert set(before) == {"s1", "s2"}
    on_s1 = before.count("s1")
    assert asyncio.run(net.pins.connections())[SERVERS[0]] >= on_s1  # conntrack carries s1's mark

    # drain s1: out of the route, still pinned. Its open connections stay, new ones avoid it.
    net.route(SERVERS[1])
    assert [who(c) for c in conns] == before
    assert {who(c) for c in net.connect(16)} == {"s2"}

    # s1 failed: unpinned. Its connections fall through to the route and are reset by s2.
    net.pin(SERVERS[1])
    after = [who(c) for c in conns]
    assert after == ["reset" if b == "s1" else "s2" for b in before], (before, after)

    # no pins at all: pop's nftables table and rules are gone, nothing else was touched
    net.pin()
    assert "table ip pop" not in net.pop.run("nft", "list", "tables").stdout
    rules = net.pop.run("ip", "rule").stdout
    assert f"{PIN_BASE | 1:#x}" not in rules and "lookup main" in rules


def test_pins_are_idempotent_and_adopted_by_a_new_adapter(net: Net) -> None:
    net.route(*SERVERS)
    net.pin(*SERVERS)
    ruleset = net.pop.run("nft", "list", "ruleset").stdout
    rules = net.pop.run("ip", "rule").stdout
    again = FlowPins([f"{VIP}/32"], list(SERVERS), netns=net.pop.name)  # a restarted engine
    asyncio.run(again.set(SERVERS))
    asyncio.run(again.close())
    assert net.pop.run("nft", "list", "ruleset").stdout == ruleset
    assert net.pop.run("ip", "rule").stdout == rules
    assert rules.count("fwmark") == 2



# ---------------------------------------------------------------------------------------
# The whole data plane (KernelDataplane) in ecmp mode with pins: reloads and drift.

CONFIG = Dataplane(mode="ecmp", pin_flows=True)
PREFIXES = (Prefix(f"{VIP}/32", "self", Attributes(), Attributes()),)


def pool(*servers: str) -> DesiredState:
    return desired.dataplane(PREFIXES, [(s, 1) for s in servers], CONFIG)


class Plane:
    """Data planes in the PoP namespace as the engine builds them, driven from one event loop
    for the whole test, as in the engine (the VIP adapter's socket belongs to its loop)."""

    def __init__(self, net: Net) -> None:
        self.net = net
        self.runner = asyncio.Runner()
        self.made: list[KernelDataplane] = []

    def make(self, *servers: str) -> KernelDataplane:
        self.made.append(KernelDataplane(CONFIG, PREFIXES, netns=self.net.pop.name, servers=servers))
        return self.made[-1]

    def set(self, dp: KernelDataplane, *servers: str, verify: bool = False) -> tuple[str, ...]:
        return self.runner.run(dp.set(pool(*servers), verify=verify))

    def close(self) -> None:
        for dp in self.made:
            self.runner.run(dp.close())
        self.runner.close()


@pytest.fixture
def plane(net: Net) -> Iterator[Plane]:
    plane = Plane(net)
    yield plane
    plane.close()


def pin_map(ns: Netns) -> dict[str, int]:
    out = ns.run("nft", "-j", "list", "map", "ip", "pop", "pins").stdout
    maps = [o["map"] for o in json.loads(out)["nftables"] if "map" in o]
    return {address: mark for address, mark in maps[0].get("elem", [])}


def test_reload_adding_a_server_pins_it_and_moves_no_other_flow(net: Net, plane: Plane) -> None:
    s1, s2 = SERVERS
    dp = plane.make(s2)
    assert plane.set(dp, s2) == (f"pins add {s2}", f"route add {VIP}/32 via {s2}")
    s2_mark = pin_map(net.pop)[s2]
    conns = net.connect(8)
    assert {who(c) for c in conns} == {"s2"}

    # the reload lists s1 *before* s2: by position s2 would be re-marked, its flows unpinned
    dp.reconfigure(CONFIG, PREFIXES, (s1, s2))
    changes = plane.set(dp, s1, s2)
    assert changes == (f"pins add {s1}", f"route replace {VIP}/32 via {s1},{s2}"), changes
    assert pin_map(net.pop) == {s2: s2_mark, s1: pin_map(net.pop)[s1]} and pin_map(net.pop)[s1] != s2_mark
    assert [who(c) for c in conns] == ["s2"] * 8  # the open flows did not move
    assert {who(c) for c in net.connect(24)} == {"s1", "s2"}
    assert plane.runner.run(dp.connections())[s1] > 0  # s1's new flows carry s1's pin mark
    assert plane.set(dp, s1, s2) == ()


def test_reload_removing_a_server_unpins_it_and_leaves_the_other(net: Net,
                                                                 plane: Plane) -> None:
    s1, s2 = SERVERS
    dp = plane.make(s1, s2)
    plane.set(dp, s1, s2)
    s2_mark = pin_map(net.pop)[s2]
    on_s2 = [c for c in net.connect(24) if who(c) == "s2"]
    assert on_s2

    dp.reconfigure(CONFIG, PREFIXES, (s2,))
    changes = plane.set(dp, s2)
    assert changes == (f"pins remove {s1}", f"route replace {VIP}/32 via {s2}"), changes
    assert pin_map(net.pop) == {s2: s2_mark}
    assert net.pop.run("ip", "rule").stdout.count("fwmark") == 1
    assert net.pop.run("ip", "route", "show", "table", str(PIN_BASE | 1)).stdout == ""  # s1's table emptied
    assert {who(c) for c in on_s2} == {"s2"}


def test_a_new_engine_adopts_the_marks_in_the_kernel(net: Net, plane: Plane) -> None:
    s1, s2 = SERVERS
    plane.set(plane.make(s2), s2)  # s2 got the first mark
    restarted = plane.make(s1, s2)  # by position s1 would take it
    assert plane.set(restarted, s1, s2) == (f"pins add {s1}", f"route replace {VIP}/32 via {s1},{s2}")
    assert pin_map(net.pop) == {s2: PIN_BASE | 1, s1: PIN_BASE | 2}


def test_pin_drift_is_repaired_on_verify_and_reported(net: Net, plane: Plane) -> None:
    s1, s2 = SERVERS
    dp = plane.make(s1, s2)
    plane.set(dp, s1, s2)
    assert plane.set(dp, s1, s2, verify=True) == ()
    rules = sorted(net.pop.run("ip", "rule").stdout.splitlines())  # equal priorities: insertion order
    ruleset = net.pop.run("nft", "list", "table", "ip", "pop").stdout
    table1 = net.pop.run("ip", "route", "show", "table", str(PIN_BASE | 1)).stdout

    net.pop.run("ip", "rule", "del", "fwmark", hex(PIN_BASE | 1), "table", str(PIN_BASE | 1))
    assert plane.set(dp, s1, s2) == ()  # unchanged desired state: no read-back
    changes = plane.set(dp, s1, s2, verify=True)
    assert changes == (f"pins rule add fwmark {PIN_BASE | 1:#x} family 2",), changes
    assert sorted(net.pop.run("ip", "rule").stdout.splitlines()) == rules

    net.pop.run("ip", "route", "flush", "table", str(PIN_BASE | 2))
    changes = plane.set(dp, s1, s2, verify=True)
    assert changes == (f"pins route add {VIP}/32 table {PIN_BASE | 2:#x} via {s2}",), changes

    net.pop.run("nft", "flush", "chain", "ip", "pop", "pin")
    assert plane.set(dp, s1, s2, verify=True) == ("pins nft repair table ip pop",)
    assert net.pop.run("nft", "list", "table", "ip", "pop").stdout == ruleset

    net.pop.run("nft", "delete", "table", "ip", "pop")
    assert plane.set(dp, s1, s2, verify=True) == (f"pins add {s1}", f"pins add {s2}")
    assert net.pop.run("nft", "list", "table", "ip", "pop").stdout == ruleset
    assert net.pop.run("ip", "route", "show", "table", str(PIN_BASE | 1)).stdout == table1
    assert plane.set(dp, s1, s2, verify=True) == ()


def test_pinning_an_unconfigured_server_is_a_dataplane_error(net: Net,
                                                             plane: Plane) -> None:
    dp = plane.make(SERVERS[0])
    with pytest.raises(DataplaneError, match=r"pin flows: server 10\.73\.2\.2 is not configured"):
        plane.set(dp, *SERVERS)
