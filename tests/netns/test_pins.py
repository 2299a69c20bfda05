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
import socket
import sys
from collections.abc import Callable, Iterator

import pytest

from lab.netns import Netns, veth
from pop.adapters.pins import PIN_BASE, FlowPins
from pop.adapters.routes import RouteTable
from pop.desired import EcmpRoute, NextHop

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
