"""ECMP on this host's real kernel: RouteTable programs a multipath route in a PoP namespace,
real UDP and TCP flows from a client namespace are counted by receivers in three server
namespaces.

    client (10.70.0.2) --- pop (10.70.0.1, 10.71.N.1) --- sN (10.71.N.2, VIP on lo)

Only namespaces created here are touched (prefix "tdp"); everything is removed afterwards.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

pytestmark = pytest.mark.netns

VIP = "203.0.113.10"
UDP_PORT = 5000
TCP_PORT = 5001
SERVERS = 3

if os.geteuid() != 0:
    pytest.skip("needs root (network namespaces)", allow_module_level=True)
if shutil.which("ip") is None:
    pytest.skip("needs iproute2 `ip`", allow_module_level=True)

from pop.adapters.routes import DataplaneError, RouteTable  # noqa: E402
from pop.desired import EcmpRoute, NextHop  # noqa: E402

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


# ---------------------------------------------------------------------------------------
# Minimal private namespace helpers (to be replaced by lab.netns once it is committed).


@dataclass
class NS:
    name: str

    def run(self, *argv: str, check: bool = True) -> str:
        proc = subprocess.run(
            ["ip", "netns", "exec", self.name, *argv], check=False, capture_output=True, text=True, timeout=60
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{self.name}: {' '.join(argv)}: {proc.stderr.strip()}")
        return proc.stdout

    def popen(self, *argv: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["ip", "netns", "exec", self.name, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=30)


@dataclass
class Lab:
    pop: NS
    client: NS
    servers: list[NS]
    receivers: list[subprocess.Popen[str]]

    def server_addr(self, i: int) -> str:
        return f"10.71.{i}.2"


@pytest.fixture
def lab() -> Iterator[Lab]:
    prefix = f"tdp{os.getpid() % 100000}"
    names = [f"{prefix}pop", f"{prefix}cl"] + [f"{prefix}s{i}" for i in range(SERVERS)]
    procs: list[subprocess.Popen[str]] = []
    try:
        for n in names:
            _ip("netns", "add", n)
            _ip("-n", n, "link", "set", "lo", "up")
        pop, client, servers = NS(names[0]), NS(names[1]), [NS(n) for n in names[2:]]
        _ip("link", "add", "tdpc0", "netns", pop.name, "type", "veth", "peer", "eth0", "netns", client.name)
        _ip("-n", pop.name, "addr", "add", "10.70.0.1/24", "dev", "tdpc0")
        _ip("-n", pop.name, "link", "set", "tdpc0", "up")
        _ip("-n", client.name, "addr", "add", "10.70.0.2/24", "dev", "eth0")
        _ip("-n", client.name, "link", "set", "eth0", "up")
        _ip("-n", client.name, "route", "add", "default", "via", "10.70.0.1")
        for i, s in enumerate(servers):
            _ip("link", "add", f"tdps{i}", "netns", pop.name, "type", "veth", "peer", "eth0", "netns", s.name)
            _ip("-n", pop.name, "addr", "add", f"10.71.{i}.1/24", "dev", f"tdps{i}")
            _ip("-n", pop.name, "link", "set", f"tdps{i}", "up")
            _ip("-n", s.name, "addr", "add", f"10.71.{i}.2/24", "dev", "eth0")
            _ip("-n", s.name, "link", "set", "eth0", "up")
            _ip("-n", s.name, "addr", "add", f"{VIP}/32", "dev", "lo")
            _ip("-n", s.name, "route", "add", "10.70.0.0/24", "via", f"10.71.{i}.1")
        pop.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        for s in servers:
            p = s.popen(sys.executable, "-c", RECEIVER, VIP, str(UDP_PORT), str(TCP_PORT))
            procs.append(p)
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line.strip() == "ready", (line, p.stderr.read() if p.poll() is not None else "")
        yield Lab(pop, client, servers, procs)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
        for n in names:
            subprocess.run(["ip", "netns", "del", n], capture_output=True, check=False)


def send_flows(lab: Lab, first_port: int, count: int) -> None:
    out = lab.client.run(
        sys.executable,
        "-c",
        SENDER,
        "10.70.0.2",
        VIP,
        str(UDP_PORT),
        str(TCP_PORT),
        str(first_port),
        str(count),
    )
    assert out.strip() == "failed 0", out


def collect(lab: Lab) -> list[dict[str, set[int]]]:
    """Stop the receivers and return, per server, the source ports seen per protocol."""
    result = []
    for p in lab.receivers:
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=10)
        seen: dict[str, set[int]] = {"udp": set(), "tcp": set()}
        for line in out.splitlines():
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
            await rt.apply_hash_policy()
            diag = await rt.diagnostics()
            assert [p.policy for p in diag.hash_policies] == [1, 1]
            assert diag.warnings == ()
            await rt.set([route(0, 1, 2)])
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


def _monitor(lab: Lab) -> subprocess.Popen[str]:
    proc = lab.pop.popen("ip", "monitor", "route")
    time.sleep(0.3)  # let it subscribe before anything happens
    return proc


def _monitor_output(proc: subprocess.Popen[str]) -> str:
    time.sleep(0.3)
    proc.terminate()
    out, _ = proc.communicate(timeout=5)
    return out


def test_reconcile_idempotent_and_foreign_routes_untouched(lab: Lab) -> None:
    pop = lab.pop
    # Other owners' routes: same table other protocol, and our protocol in another table.
    _ip("-n", pop.name, "route", "add", "198.51.100.0/24", "via", "10.71.0.2", "proto", "static")
    _ip("-n", pop.name, "route", "add", f"{VIP}/32", "via", "10.71.1.2", "table", "100", "proto", "200")
    foreign_before = pop.run("ip", "route", "show", "table", "all", "proto", "static") + pop.run(
        "ip", "route", "show", "table", "100"
    )

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
        mon = _monitor(lab)
        async with RouteTable(netns=pop.name) as rt:
            await rt.set(list(reversed(desired)))
        assert _monitor_output(mon) == ""

        # Positive control for the monitor, and a change is one replace, never a delete.
        mon = _monitor(lab)
        async with RouteTable(netns=pop.name) as rt:
            await rt.set([route(0, 1), desired[1]])
        out = _monitor_output(mon)
        assert VIP in out and "Deleted" not in out, out

        async with RouteTable(netns=pop.name) as rt:
            await rt.set([])
            assert await rt.read() == ()

    asyncio.run(scenario())
    foreign_after = pop.run("ip", "route", "show", "table", "all", "proto", "static") + pop.run(
        "ip", "route", "show", "table", "100"
    )
    assert foreign_after == foreign_before
    assert "198.51.100.0/24" in foreign_after and VIP in foreign_after


def test_kernel_errors_are_dataplane_errors(lab: Lab) -> None:
    pop = lab.pop
    _ip("-n", pop.name, "route", "add", "198.51.100.7/32", "via", "10.71.0.2", "proto", "static")

    async def scenario() -> None:
        async with RouteTable(netns=pop.name) as rt:
            with pytest.raises(DataplaneError, match=r"invalid gateway|unreachable"):
                await rt.set([EcmpRoute(f"{VIP}/32", (NextHop("10.99.0.1"), NextHop("10.71.0.2")))])
            with pytest.raises(DataplaneError, match="another owner"):
                await rt.set([EcmpRoute("198.51.100.7/32", (NextHop("10.71.1.2"), NextHop("10.71.2.2")))])
            assert await rt.read() == ()

    asyncio.run(scenario())
    assert "198.51.100.7 via 10.71.0.2" in pop.run("ip", "route", "show", "proto", "static")
