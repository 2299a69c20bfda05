"""IPVS through `IpvsTable`, on a real IPVS: runs *inside* the microVM (Debian's kernel),
started by tests/kernel/test_ipvs.py (tests/kernel/conftest.py skips it elsewhere). In
the guest, a missing IPVS is a failure, not a skip.

Inside the VM, one director namespace holds the VIP on lo and the IPVS services; a client
namespace with 64 source addresses sends real UDP and TCP flows; three server namespaces
answer every packet with their name, so the client learns which real server got each flow.

    client (10.80.0.2, .10-.73) --- director (VIP on lo, IPVS NAT) --- sN (10.81.N.2)
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.netns import Netns, cleanup_prefix, veth
from pop.adapters.dataplane import KernelDataplane
from pop.adapters.ipvs import IpvsTable, normalize_service, service_key
from pop.adapters.routes import DataplaneError
from pop.adapters.vip import VipSet
from pop.config import Attributes, Dataplane, Prefix, ServicePort
from pop.desired import DesiredState, RealServer, VirtualService
from pop.desired import dataplane as desired_dataplane

pytestmark = pytest.mark.kernel

VIP = "203.0.113.20"
OWNED = ["203.0.113.0/24"]
UDP_PORT = 51820
TCP_PORT = 1194
SERVERS = 3
CLIENT_IPS = [f"10.80.0.{10 + i}" for i in range(64)]


def _require_ipvs() -> None:
    if Path("/proc/net/ip_vs").exists():
        return
    reason = "needs IPVS (kernel module ip_vs); runs inside the microVM via tests/kernel/test_ipvs.py"
    if os.environ.get("POP_IN_MICROVM") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


SERVER = r"""
import selectors, socket, sys
name, udp_port, tcp_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", udp_port))
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", tcp_port)); t.listen(512)
sel = selectors.DefaultSelector()
sel.register(u, selectors.EVENT_READ, "udp"); sel.register(t, selectors.EVENT_READ, "listen")
while True:
    for key, _ in sel.select():
        if key.data == "udp":
            data, peer = u.recvfrom(2048)
            u.sendto(name.encode(), peer)
        elif key.data == "listen":
            c, _ = t.accept()
            sel.register(c, selectors.EVENT_READ, "conn")
        else:
            c = key.fileobj
            try:
                data = c.recv(2048)
            except OSError:
                data = b""
            if data:
                c.sendall(name.encode())
            else:
                sel.unregister(c); c.close()
"""

# Reads one JSON command per line, answers one JSON line: {"ip:port": "sN" | null}.
AGENT = r"""
import json, select, socket, sys, time
vip, udp_port, tcp_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tcp = {}
def udp(flows):
    socks = {}
    for ip, port in flows:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, port)); s.sendto(b"ping", (vip, udp_port)); socks[s] = f"{ip}:{port}"
    answers = {v: None for v in socks.values()}
    deadline = time.monotonic() + 5
    pending = set(socks)
    while pending and time.monotonic() < deadline:
        ready, _, _ = select.select(list(pending), [], [], 0.2)
        for s in ready:
            answers[socks[s]] = s.recv(64).decode(); pending.discard(s)
    for s in socks: s.close()
    return answers
def ask(conn):
    conn.sendall(b"ping")
    return conn.recv(64).decode() or None
def tcp_open(flows):
    answers = {}
    for ip, port in flows:
        c = socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        c.settimeout(5); c.bind((ip, port))
        try:
            c.connect((vip, tcp_port)); answers[f"{ip}:{port}"] = ask(c); tcp[f"{ip}:{port}"] = c
        except OSError:
            answers[f"{ip}:{port}"] = None; c.close()
    return answers
def tcp_again():
    answers = {}
    for key, c in tcp.items():
        try:
            answers[key] = ask(c)
        except OSError:
            answers[key] = None
    return answers
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "udp": out = udp(cmd["flows"])
    elif cmd["op"] == "tcp_open": out = tcp_open(cmd["flows"])
    elif cmd["op"] == "tcp_again": out = tcp_again()
    else: out = {}
    print(json.dumps(out), flush=True)
"""


@dataclass
class Vm:
    director: Netns
    client: Netns
    servers: list[Netns]
    agent: subprocess.Popen[str]

    def ask(self, op: str, flows: list[tuple[str, int]] | None = None) -> dict[str, str | None]:
        assert self.agent.stdin is not None and self.agent.stdout is not None
        self.agent.stdin.write(json.dumps({"op": op, "flows": flows or []}) + "\n")
        self.agent.stdin.flush()
        line = self.agent.stdout.readline()
        assert line, "client agent died"
        answer: dict[str, str | None] = json.loads(line)
        return answer


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[Vm]:
    _require_ipvs()
    prefix = f"tdpk{os.getpid() % 100000}"
    made: list[Netns] = []
    agent: subprocess.Popen[str] | None = None
    try:
        director, client = Netns(f"{prefix}d"), Netns(f"{prefix}c")
        made += [director, client]
        servers = [Netns(f"{prefix}s{i}") for i in range(SERVERS)]
        made += servers
        veth(client, "eth0", "10.80.0.2/24", director, "cl0", "10.80.0.1/24")
        for ip in CLIENT_IPS:
            client.run("ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        client.run("ip", "route", "add", "default", "via", "10.80.0.1")
        director.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        for i, s in enumerate(servers):
            veth(director, f"sv{i}", f"10.81.{i}.1/24", s, "eth0", f"10.81.{i}.2/24")
            s.run("ip", "route", "add", "default", "via", f"10.81.{i}.1")
            s.popen(
                sys.executable,
                "-c",
                SERVER,
                f"s{i}",
                str(UDP_PORT),
                str(TCP_PORT),
                log=tmp_path / f"s{i}.log",
            )
        agent = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                client.name,
                sys.executable,
                "-c",
                AGENT,
                VIP,
                str(UDP_PORT),
                str(TCP_PORT),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

        async def vip() -> None:
            async with VipSet(netns=director.name) as vips:
                await vips.set([f"{VIP}/32"])

        asyncio.run(vip())
        time.sleep(0.5)  # let the servers bind
        yield Vm(director, client, servers, agent)
    finally:
        if agent is not None:
            agent.kill()
            agent.communicate()
        for ns in reversed(made):
            ns.close()
        cleanup_prefix(prefix)


def service(protocol: str, port: int, weights: dict[int, int], forward: str = "nat") -> VirtualService:
    reals = tuple(RealServer(f"10.81.{i}.2", port, w) for i, w in sorted(weights.items()))
    return VirtualService(protocol, VIP, port, "mh", forward, reals)


def desired(weights: dict[int, int]) -> list[VirtualService]:
    return [service("udp", UDP_PORT, weights), service("tcp", TCP_PORT, weights)]


def expected(services: list[VirtualService]) -> tuple[VirtualService, ...]:
    """What read() answers for `services`: canonical, in service-key order."""
    return tuple(sorted((normalize_service(s) for s in services), key=service_key))


def flows(port: int, ips: list[str] = CLIENT_IPS) -> list[tuple[str, int]]:
    return [(ip, port) for ip in ips]


def ipvsadm(ns: Netns) -> str:
    return ns.run("ipvsadm", "-Ln").stdout


# ---------------------------------------------------------------------------------------


def test_nat_spread_quiescent_drain_and_removal(vm: Vm) -> None:
    ns = vm.director.name

    async def program(weights: dict[int, int]) -> tuple[VirtualService, ...]:
        async with IpvsTable(owned=OWNED, netns=ns) as ipvs:
            await ipvs.set(desired(weights))
            return await ipvs.read()

    got = asyncio.run(program({0: 1, 1: 1, 2: 1}))
    assert got == expected(desired({0: 1, 1: 1, 2: 1}))

    udp_a = vm.ask("udp", flows(20000))
    tcp_a = vm.ask("tcp_open", flows(21000))
    for answers in (udp_a, tcp_a):
        counts = Counter(answers.values())
        assert None not in counts, answers
        # mh over 64 client addresses: about 21 each; 10% of 64 is more than 4 sd below.
        assert all(counts[f"s{i}"] >= 7 for i in range(SERVERS)), counts
    drained_udp = [k for k, v in udp_a.items() if v == "s2"]
    drained_tcp = [k for k, v in tcp_a.items() if v == "s2"]

    # Quiescent drain: s2 keeps its connections, gets no new ones.
    asyncio.run(program({0: 1, 1: 1, 2: 0}))

    async def loads() -> dict[str, int]:
        async with IpvsTable(owned=OWNED, netns=ns) as ipvs:
            return {f"{x.protocol}/{x.real.address}": x.connections for x in await ipvs.loads()}

    load = asyncio.run(loads())
    assert load["tcp/10.81.2.2"] == len(drained_tcp) > 0, load
    assert load["udp/10.81.2.2"] == len(drained_udp) > 0, load
    assert vm.ask("udp", flows(20000)) == udp_a  # the same UDP flows stay where they were
    assert vm.ask("tcp_again") == tcp_a  # established TCP connections too
    udp_b = vm.ask("udp", flows(22000))
    tcp_b = vm.ask("tcp_open", flows(23000))
    for answers in (udp_b, tcp_b):
        counts = Counter(answers.values())
        assert None not in counts and counts["s2"] == 0, counts
        assert counts["s0"] > 0 and counts["s1"] > 0, counts

    # Removal: s2 leaves the table; new flows keep going to s0 and s1 only.
    got = asyncio.run(program({0: 1, 1: 1}))
    assert [len(s.reals) for s in got] == [2, 2]
    udp_c = vm.ask("udp", flows(24000))
    counts = Counter(udp_c.values())
    assert None not in counts and counts["s2"] == 0 and counts["s0"] > 0 and counts["s1"] > 0, counts


def test_adoption_after_restart_and_foreign_services_untouched(vm: Vm) -> None:
    ns = vm.director
    # Another owner's services: outside the owned prefix.
    ns.run("ipvsadm", "-A", "-t", "198.51.100.1:80", "-s", "rr")
    ns.run("ipvsadm", "-a", "-t", "198.51.100.1:80", "-r", "10.81.0.2:80", "-m")
    want = desired({0: 1, 1: 2, 2: 0})

    async def first() -> None:
        async with IpvsTable(owned=OWNED, netns=ns.name, flags=["mh-fallback", "mh-port"]) as ipvs:
            await ipvs.set(want)

    asyncio.run(first())
    vm.ask("udp", flows(25000, CLIENT_IPS[:8]))
    before = ipvsadm(ns)
    assert "198.51.100.1:80 rr" in before and "mh-port" in before, before

    async def restarted() -> None:
        # A new adapter (the engine restarted) reads the kernel and finds nothing to do.
        async with IpvsTable(owned=OWNED, netns=ns.name, flags=["mh-fallback", "mh-port"]) as ipvs:
            assert await ipvs.plan(list(reversed(want))) == ()
            await ipvs.set(want)
            assert await ipvs.read() == expected(want)

    asyncio.run(restarted())
    assert ipvsadm(ns) == before  # weights, flags and connection counts untouched
    conns = ns.run("cat", "/proc/net/ip_vs_conn").stdout
    assert len(conns.splitlines()) > 8, conns  # the connections survived too

    async def clear() -> None:
        async with IpvsTable(owned=OWNED, netns=ns.name) as ipvs:
            await ipvs.set([])
            assert await ipvs.read() == ()

    asyncio.run(clear())
    after = ipvsadm(ns)
    assert "198.51.100.1:80 rr" in after and "10.81.0.2:80" in after and VIP not in after, after


def test_dr_tunnel_ipv6_programming_and_edits(vm: Vm) -> None:
    ns = vm.director
    dr = VirtualService(
        "udp", VIP, UDP_PORT, "mh", "dr", (RealServer("10.81.0.2", 0), RealServer("10.81.1.2", 0, 3))
    )
    tun = VirtualService("tcp", "203.0.113.21", 443, "mh", "tunnel", (RealServer("10.81.2.2", 443),))
    v6 = VirtualService("udp", "2001:db8::20", UDP_PORT, "mh", "dr", (RealServer("fd00::2", UDP_PORT),))

    async def scenario() -> None:
        async with IpvsTable(owned=[*OWNED, "2001:db8::/64"], netns=ns.name, flags=["mh-fallback"]) as ipvs:
            await ipvs.set([dr, tun, v6])
            assert await ipvs.read() == expected([dr, tun, v6])
            text = ipvsadm(ns)
            assert "Route" in text and "Tunnel" in text and "[2001:db8::20]:51820 mh (mh-fallback)" in text, (
                text
            )
            # Forwarding method and scheduler are edited in place.
            dr_tun = VirtualService(dr.protocol, dr.address, dr.port, "rr", "tunnel", dr.reals)
            ops = [str(op) for op in await ipvs.plan([dr_tun, tun, v6])]
            assert [op.split()[0] for op in ops] == ["edit-service", "edit-real", "edit-real"], ops
            await ipvs.set([dr_tun, tun, v6])
            assert await ipvs.plan([dr_tun, tun, v6]) == ()
            await ipvs.set([])

    asyncio.run(scenario())


def test_kernel_errors_are_dataplane_errors(vm: Vm) -> None:
    async def scenario() -> None:
        async with IpvsTable(owned=OWNED, netns=vm.director.name) as ipvs:
            bad = VirtualService("udp", VIP, UDP_PORT, "nosuch", "nat", (RealServer("10.81.0.2", UDP_PORT),))
            with pytest.raises(DataplaneError, match="module ip_vs_nosuch"):
                await ipvs.set([bad])
            with pytest.raises(ValueError, match="outside the owned prefixes"):
                await ipvs.set([VirtualService("udp", "198.51.100.9", 1)])
            assert await ipvs.read() == ()

    asyncio.run(scenario())


def test_dataplane_reload_adds_and_removes_a_prefix_and_repairs_deleted_services(vm: Vm) -> None:
    ns = vm.director
    config = Dataplane(mode="ipvs", forward="nat", services=(ServicePort("udp", UDP_PORT),))
    servers = [f"10.81.{i}.2" for i in range(SERVERS)]
    one = (Prefix(f"{VIP}/32", "self", Attributes(), Attributes()),)
    two = (*one, Prefix("203.0.113.21/32", "self", Attributes(), Attributes()))
    udp = f"udp/{VIP}:{UDP_PORT}"

    def state(prefixes: tuple[Prefix, ...], *members: int) -> DesiredState:
        return desired_dataplane(prefixes, [(servers[i], 1) for i in members], config)

    async def scenario() -> None:
        dp = KernelDataplane(config, one, netns=ns.name, servers=servers)
        try:
            # the fixture's VIP (same protocol mark) is adopted, not re-added
            assert await dp.set(state(one, 0, 1)) == (
                f"ipvs add-service {udp} mh", f"ipvs add-real {udp} 10.81.0.2", f"ipvs add-real {udp} 10.81.1.2")
            assert await dp.set(state(one, 0, 1)) == ()

            ns.run("ipvsadm", "-D", "-u", f"{VIP}:{UDP_PORT}")
            assert await dp.set(state(one, 0, 1), verify=True) == (
                f"ipvs add-service {udp} mh", f"ipvs add-real {udp} 10.81.0.2", f"ipvs add-real {udp} 10.81.1.2")
            ns.run("ipvsadm", "-d", "-u", f"{VIP}:{UDP_PORT}", "-r", f"10.81.1.2:{UDP_PORT}")
            assert await dp.set(state(one, 0, 1), verify=True) == (f"ipvs add-real {udp} 10.81.1.2",)
            answers = vm.ask("udp", flows(26000, CLIENT_IPS[:16]))
            assert set(answers.values()) == {"s0", "s1"}, answers

            # a reload adds a prefix (and a server): no ValueError, the new service appears
            dp.reconfigure(config, two, servers)
            new = f"udp/203.0.113.21:{UDP_PORT}"
            assert await dp.set(state(two, 0, 1, 2)) == (
                "vip add 203.0.113.21/32", f"ipvs add-service {new} mh",
                f"ipvs add-real {udp} 10.81.2.2", f"ipvs add-real {new} 10.81.0.2",
                f"ipvs add-real {new} 10.81.1.2", f"ipvs add-real {new} 10.81.2.2")
            # and removes it again: its service and VIP go, the first one's stay
            dp.reconfigure(config, one, servers)
            assert await dp.set(state(one, 0, 1, 2)) == ("vip delete 203.0.113.21/32", f"ipvs del-service {new}")
            assert "203.0.113.21" not in ipvsadm(ns) and f"{VIP}:{UDP_PORT}" in ipvsadm(ns)
            assert await dp.set(state(one, 0, 1, 2), verify=True) == ()
            await dp.set(DesiredState())
        finally:
            await dp.close()

    asyncio.run(scenario())
