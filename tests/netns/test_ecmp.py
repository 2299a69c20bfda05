"""ECMP on this host's real kernel: RouteTable programs a multipath route in a PoP namespace,
real UDP and TCP flows from a client namespace are counted by receivers in three server
namespaces.

    client (10.70.0.2) --- pop (10.70.0.1, 10.71.N.1) --- sN (10.71.N.2, VIP on lo)

Namespaces come from the netns_factory fixture (tests/netns/conftest.py), which removes
them and their processes afterwards, also on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.netns import Netns, veth
from pop import desired
from pop.adapters.dataplane import KernelDataplane
from pop.adapters.routes import DataplaneError, RouteTable, normalize_route
from pop.config import Attributes, Dataplane, Prefix
from pop.desired import DesiredState, EcmpRoute, NextHop

VIP = "203.0.113.10"
UDP_PORT = 5000
TCP_PORT = 5001
SERVERS = 3


# ---------------------------------------------------------------------------------------
# Programs run inside the namespaces.

RECEIVER = r"""
import selectors, socket, sys
vip, udp_port, tcp_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((vip, udp_port))
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind((vip, tcp_port)); t.listen(512)
sel = selectors.DefaultSelector()
sel.register(u, selectors.EVENT_READ); sel.register(t, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        if key.fileobj is u:
            data, (host, port) = u.recvfrom(2048)
            print("udp", host, port, flush=True)
        else:
            c, (host, port) = t.accept()
            print("tcp", host, port, flush=True)
            c.close()
"""

SENDER = r"""
import socket, sys
src, vip = sys.argv[1], sys.argv[2]
udp_port, tcp_port, first, count = map(int, sys.argv[3:7])
failed = 0
for sport in range(first, first + count):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((src, sport))
    u.sendto(b"x", (vip, udp_port)); u.close()
    t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.settimeout(2); t.bind((src, sport))
    try:
        t.connect((vip, tcp_port))
    except OSError:
        failed += 1
    t.close()
print("failed", failed, flush=True)
"""


@dataclass
class Lab:
    pop: Netns
    client: Netns
    servers: list[Netns]
    receivers: list[tuple[Netns, subprocess.Popen[bytes], Path]]


@pytest.fixture
def lab(netns_factory: Callable[[str], Netns], tmp_path: Path) -> Lab:
    pop, client = netns_factory("pop"), netns_factory("cl")
    servers = [netns_factory(f"s{i}") for i in range(SERVERS)]
    veth(pop, "tdpc0", "10.70.0.1/24", client, "eth0", "10.70.0.2/24")
    client.run("ip", "route", "add", "default", "via", "10.70.0.1")
    for i, s in enumerate(servers):
        veth(pop, f"tdps{i}", f"10.71.{i}.1/24", s, "eth0", f"10.71.{i}.2/24")
        s.run("ip", "addr", "add", f"{VIP}/32", "dev", "lo")
        s.run("ip", "route", "add", "10.70.0.0/24", "via", f"10.71.{i}.1")
    pop.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    receivers = []
    for i, s in enumerate(servers):
        log = tmp_path / f"receiver{i}.log"
        proc = s.popen(sys.executable, "-c", RECEIVER, VIP, str(UDP_PORT), str(TCP_PORT), log=log)
        receivers.append((s, proc, log))
    deadline = time.monotonic() + 10
    for _, proc, log in receivers:
        while not (log.exists() and log.read_text().startswith("ready")):
            assert proc.poll() is None, log.read_text() if log.exists() else "receiver died"
            assert time.monotonic() < deadline, "receiver not ready within 10 s"
            time.sleep(0.05)
    return Lab(pop, client, servers, receivers)


def send_flows(lab: Lab, first_port: int, count: int) -> None:
    argv = ("10.70.0.2", VIP, str(UDP_PORT), str(TCP_PORT), str(first_port), str(count))
    out = lab.client.run(sys.executable, "-c", SENDER, *argv, timeout=120).stdout
    assert out.strip() == "failed 0", out


def collect(lab: Lab) -> list[dict[str, set[int]]]:
    """Stop the receivers and return, per server, the source ports seen per protocol."""
    # UDP is fire-and-forget: let the receivers drain their sockets and print before they stop
    # (on a busy machine the last datagrams are still queued when the sender returns)
    deadline = time.monotonic() + 5
    sizes: list[int] = []
    while time.monotonic() < deadline:
        now = [log.stat().st_size for _, _, log in lab.receivers]
        if now == sizes:
            break
        sizes = now
        time.sleep(0.3)
    result = []
    for ns, proc, log in lab.receivers:
        ns.stop(proc)
        seen: dict[str, set[int]] = {"udp": set(), "tcp": set()}
        for line in log.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] in seen:
                seen[parts[0]].add(int(parts[2]))
        result.append(seen)
    lab.receivers.clear()
    return result


def in_range(ports: set[int], first: int, count: int) -> int:
    return sum(1 for p in ports if first <= p < first + count)


def route(*servers: int, weights: dict[int, int] | None = None) -> EcmpRoute:
    w = weights or {}
    return EcmpRoute(f"{VIP}/32", tuple(NextHop(f"10.71.{i}.2", w.get(i, 1)) for i in servers))


# ---------------------------------------------------------------------------------------


def test_ecmp_spreads_flows_and_removal_moves_new_flows_away(lab: Lab) -> None:
    async def program() -> None:
        async with RouteTable(netns=lab.pop.name, hash_policy=1) as rt:
            # A fresh namespace has the kernel's default, L3 hashing, and says so.
            before = await rt.diagnostics()
            assert [p.policy for p in before.hash_policies] == [0, 0] and len(before.warnings) == 2
            await rt.set([route(0, 1, 2)])  # writes the configured policy once
            diag = await rt.diagnostics()
            assert [p.policy for p in diag.hash_policies] == [1, 1]
            assert diag.warnings == ()
            assert diag.owned_routes == 1
            assert await rt.read() == (route(0, 1, 2),)

    asyncio.run(program())
    n = 150
    send_flows(lab, 20000, n)

    async def shrink() -> None:
        async with RouteTable(netns=lab.pop.name) as rt:
            await rt.set([route(0, 1)])
            assert await rt.read() == (route(0, 1),)

    asyncio.run(shrink())
    send_flows(lab, 30000, n)
    seen = collect(lab)

    for proto in ("udp", "tcp"):
        before = [in_range(s[proto], 20000, n) for s in seen]
        after = [in_range(s[proto], 30000, n) for s in seen]
        assert sum(before) == n and sum(after) == n, (proto, before, after)
        # Expected n/3 each; 15% of n is more than 5 standard deviations below that.
        assert min(before) >= 0.15 * n, (proto, before)
        assert after[2] == 0, (proto, after)
        assert min(after[:2]) >= 0.25 * n, (proto, after)


def test_l3_hash_policy_sends_one_client_to_one_server_and_is_reported(lab: Lab) -> None:
    async def program() -> list[str]:
        async with RouteTable(netns=lab.pop.name, hash_policy=0) as rt:
            await rt.apply_hash_policy()
            await rt.set([route(0, 1, 2)])
            return list((await rt.diagnostics()).warnings)

    warnings = asyncio.run(program())
    assert any("net.ipv4.fib_multipath_hash_policy=0" in w for w in warnings), warnings
    n = 60
    send_flows(lab, 20000, n)
    seen = collect(lab)
    counts = sorted(len(s["udp"]) + len(s["tcp"]) for s in seen)
    assert counts == [0, 0, 2 * n], counts


RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE = 0x10, 0x40, 0x100, 0x400
NLMSG_TYPES = {20: "NEWADDR", 21: "DELADDR", 24: "NEWROUTE", 25: "DELROUTE"}


@contextlib.contextmanager
def netlink_events(ns: Netns, groups: int) -> Iterator[list[str]]:
    """Collect the rtnetlink notifications of `ns` sent during the block ("NEWROUTE", ...).

    Subscribed before the block starts and drained after it: unlike `ip monitor` there is
    no start-up race, so an empty list really means the kernel announced nothing."""
    with ns.enter():
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    events: list[str] = []
    try:
        sock.bind((0, groups))
        yield events
        sock.setblocking(False)
        while True:
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                break
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                events.append(NLMSG_TYPES.get(kind, str(kind)))
                offset += (length + 3) & ~3
    finally:
        sock.close()


def foreign_routes(pop: Netns) -> str:
    static = pop.run("ip", "-4", "route", "show", "table", "all", "proto", "static").stdout
    return static + pop.run("ip", "route", "show", "table", "100").stdout


def test_reconcile_idempotent_and_foreign_routes_untouched(lab: Lab) -> None:
    pop = lab.pop
    # Other owners' routes: same table other protocol, and our protocol in another table.
    pop.run("ip", "route", "add", "198.51.100.0/24", "via", "10.71.0.2", "proto", "static")
    pop.run("ip", "route", "add", f"{VIP}/32", "via", "10.71.1.2", "table", "100", "proto", "200")
    foreign_before = foreign_routes(pop)

    async def scenario() -> None:
        desired = [route(0, 1, 2, weights={0: 3}), EcmpRoute("192.0.2.0/24", (NextHop("10.71.2.2"),))]
        async with RouteTable(netns=pop.name) as rt:
            await rt.set(desired)
            assert await rt.read() == (
                EcmpRoute("192.0.2.0/24", (NextHop("10.71.2.2"),)),
                route(0, 1, 2, weights={0: 3}),
            )

        # A new adapter (a restarted engine) adopts the routes: setting the same state
        # sends nothing to the kernel.
        groups = RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
        with netlink_events(pop, groups) as events:
            async with RouteTable(netns=pop.name) as rt:
                await rt.set(list(reversed(desired)))
        assert events == []

        # A change is one replace (one notification), never a delete and an add.
        with netlink_events(pop, groups) as events:
            async with RouteTable(netns=pop.name) as rt:
                await rt.set([route(0, 1), desired[1]])
        assert events == ["NEWROUTE"], events

        async with RouteTable(netns=pop.name) as rt:
            await rt.set([])
            assert await rt.read() == ()

    asyncio.run(scenario())
    foreign_after = foreign_routes(pop)
    assert foreign_after == foreign_before
    assert "198.51.100.0/24" in foreign_after and VIP in foreign_after


def test_kernel_errors_are_dataplane_errors(lab: Lab) -> None:
    pop = lab.pop
    pop.run("ip", "route", "add", "198.51.100.7/32", "via", "10.71.0.2", "proto", "static")

    async def scenario() -> None:
        async with RouteTable(netns=pop.name) as rt:
            with pytest.raises(DataplaneError, match=r"invalid gateway|unreachable"):
                await rt.set([EcmpRoute(f"{VIP}/32", (NextHop("10.99.0.1"), NextHop("10.71.0.2")))])
            with pytest.raises(DataplaneError, match="another owner has this prefix"):
                await rt.set([EcmpRoute("198.51.100.7/32", (NextHop("10.71.1.2"), NextHop("10.71.2.2")))])
            assert await rt.read() == ()

    asyncio.run(scenario())
    assert "198.51.100.7 via 10.71.0.2" in pop.run("ip", "route", "show", "proto", "static").stdout


def test_ipv6_multipath_in_a_table_of_its_own(lab: Lab) -> None:
    pop = lab.pop
    for i in range(SERVERS):
        pop.run("ip", "addr", "add", f"fd00:71:{i}::1/64", "dev", f"tdps{i}", "nodad")
        lab.servers[i].run("ip", "addr", "add", f"fd00:71:{i}::2/64", "dev", "eth0", "nodad")
    prefix = "2001:db8:5::/64"

    def v6(*servers: int) -> EcmpRoute:
        # normalize_route: read() answers in canonical text ("fd00:71::2", not "fd00:71:0::2").
        return normalize_route(
            EcmpRoute(prefix, tuple(NextHop(f"fd00:71:{i}::2") for i in servers), table=1000)
        )

    async def scenario() -> None:
        # Table 1000 does not exist until the first route: reading it is not an error.
        async with RouteTable(netns=pop.name, table=1000) as rt:
            assert await rt.read() == ()
            await rt.set([v6(2, 0, 1)])
            assert await rt.read() == (v6(0, 1, 2),)
            await rt.set([v6(0, 2)])
            assert await rt.read() == (v6(0, 2),)
            await rt.set([v6(1)])
            assert await rt.read() == (v6(1),)
            await rt.set([])
            assert await rt.read() == ()

    asyncio.run(scenario())
    shown = pop.run("ip", "-6", "route", "show", "table", "1000").stdout
    assert "2001:db8:5::" not in shown, shown


UNPRIVILEGED = r"""
import asyncio, sys
from pop.adapters.routes import DataplaneError, RouteTable
from pop.desired import EcmpRoute, NextHop
async def main():
    async with RouteTable(netns=sys.argv[1]) as rt:
        await rt.set([EcmpRoute("203.0.113.10/32", (NextHop("10.71.0.2"), NextHop("10.71.1.2")))])
try:
    asyncio.run(main())
except DataplaneError as exc:
    print("DataplaneError:", exc)
"""


# Root with every capability dropped, not another user: the checkout (and the venv in it) may
# sit where only root can read it (a clone in /root, mode 0700), and what this proves is that
# a missing CAP_SYS_ADMIN / CAP_NET_ADMIN gives a DataplaneError, whoever the user is.
WITHOUT_CAPABILITIES = ("setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all",
                        "--securebits=+noroot,+noroot_locked,+no_setuid_fixup,+no_setuid_fixup_locked", "--")


def test_without_privileges_the_error_is_a_dataplane_error(lab: Lab) -> None:
    # The engine may run without CAP_SYS_ADMIN/CAP_NET_ADMIN (ExaBGP drops to nobody).
    proc = subprocess.run(
        [*WITHOUT_CAPABILITIES, sys.executable, "-c", UNPRIVILEGED, lab.pop.name],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "DataplaneError:" in proc.stdout and "not permitted" in proc.stdout, proc.stdout
    assert "203.0.113.10" not in lab.pop.run("ip", "route", "show").stdout


# ---------------------------------------------------------------------------------------
# The whole data plane (KernelDataplane) in ecmp mode: drift, a reload, diagnostics.

ECMP = Dataplane(mode="ecmp", hash_policy=1)


def anycast(*prefixes: str) -> tuple[Prefix, ...]:
    return tuple(Prefix(p, "self", Attributes(), Attributes()) for p in prefixes)


def test_ecmp_route_drift_is_repaired_and_reported_and_a_reload_adds_a_prefix(lab: Lab) -> None:
    pop = lab.pop
    prefixes = anycast(f"{VIP}/32")
    servers = [f"10.71.{i}.2" for i in range(SERVERS)]
    members = [(s, 1) for s in servers]
    all_three = f"route add {VIP}/32 via 10.71.0.2,10.71.1.2,10.71.2.2"

    async def scenario() -> None:
        dp = KernelDataplane(ECMP, prefixes, netns=pop.name, servers=servers)
        try:
            state = desired.dataplane(prefixes, members, ECMP)
            changes = await dp.set(state)
            assert changes[-1] == all_three, changes
            assert all(c.startswith("sysctl net.ipv") for c in changes[:-1]), changes
            assert await dp.set(state) == ()

            pop.run("ip", "route", "del", f"{VIP}/32", "proto", "200")
            assert await dp.set(state, verify=True) == (all_three,)
            pop.run("ip", "route", "replace", f"{VIP}/32", "via", "10.71.1.2", "proto", "200")
            assert await dp.set(state) == (f"route replace {VIP}/32 via 10.71.0.2,10.71.1.2,10.71.2.2",)
            pop.run("sysctl", "-qw", "net.ipv4.fib_multipath_hash_policy=0")
            assert await dp.set(state, verify=True) == ("sysctl net.ipv4.fib_multipath_hash_policy=1 (was 0)",)

            # a reload adds a prefix: routed by the next set(), the first route untouched
            bigger = anycast(f"{VIP}/32", "192.0.2.0/24")
            dp.reconfigure(ECMP, bigger, servers)
            state = desired.dataplane(bigger, members, ECMP)
            assert await dp.set(state) == ("route add 192.0.2.0/24 via 10.71.0.2,10.71.1.2,10.71.2.2",)
            assert await dp.set(state, verify=True) == ()

            diag = await dp.diagnostics()
            assert json.loads(json.dumps(diag)) == {
                "mode": "ecmp", "hash_policy": {"ipv4": 1, "ipv6": 1}, "l4_hashing": True,
                "owned_routes": 2, "warnings": [], "pin_flows": False,
            }
            # withdrawn: everything pop put there goes
            assert await dp.set(DesiredState()) == ("route delete 192.0.2.0/24", f"route delete {VIP}/32")
        finally:
            await dp.close()

    asyncio.run(scenario())
