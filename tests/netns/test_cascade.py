"""The cascade end to end: a VPN server whose WireGuard daemon dies while its TCP port still
answers ("alive but useless") leaves the pool, and when it was the last one the PoP withdraws.

    r1 (FRR) --- pop1 (pop run, tiers tcp + wireguard) --- vpn1: TCP :443 + wireguard-go :51820
                                                      \\-- vpn2: TCP :443 + wireguard-go :51820
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lab.frr import BgpNeighbor, FrrRouter
from lab.netns import Netns, veth
from lab.popnode import PopNode, TcpService
from lab.routewatch import RouteWatcher
from lab.wgserver import WireGuardServer, keypair, write_key

ANYCAST = "198.51.100.1/32"
NsFactory = Callable[[str], Netns]


@pytest.fixture
def wireguard_go() -> None:
    missing = [tool for tool in ("wireguard-go", "wg") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {' and '.join(missing)} (apt-get install wireguard-go wireguard-tools)")
    if not Path("/dev/net/tun").exists():
        pytest.skip("needs /dev/net/tun for wireguard-go")


def test_alive_but_useless_server_leaves_the_pool(wireguard_go: None, netns_factory: NsFactory,
                                                   frr_factory: Callable[..., FrrRouter], tmp_path: Path) -> None:
    r1 = frr_factory(netns_factory("r1"), "r1", 65000, "192.0.2.100", [BgpNeighbor("10.0.1.2", 65101, hold_time=9)],
                     start=False)
    pop_ns = netns_factory("p1")
    veth(r1.ns, "r1p1", "10.0.1.1/30", pop_ns, "up0", "10.0.1.2/30")
    r1.start()  # after its link: LINKS_FIRST
    probe_private, probe_public = keypair()
    probe_key = write_key(tmp_path / "probe.key", probe_private)
    token = secrets.token_hex(3)
    wg_servers: list[WireGuardServer] = []
    servers = []
    try:
        for s in (1, 2):
            sns = netns_factory(f"s{s}")
            veth(pop_ns, f"v{s}", f"10.1.{s}.1/30", sns, "eth0", f"10.1.{s}.2/30")
            TcpService(sns, f"10.1.{s}.2", 443).start()
            wg = WireGuardServer(sns, f"tc{token}{s}", tmp_path / f"wg{s}")
            wg.add_peer(probe_public)
            wg.start()
            wg_servers.append(wg)
            servers.append({"name": f"vpn{s}", "address": f"10.1.{s}.2",
                            "wireguard": {"public_key": wg.public_key}})
        pop = PopNode(pop_ns, {
            "pop": {"name": "pop1", "asn": 65101, "router_id": "192.0.2.1"},
            "neighbors": [{"address": "10.0.1.1", "peer_as": 65000, "local_address": "10.0.1.2"}],
            "prefixes": [ANYCAST],
            "servers": servers,
            "checks": {"wireguard": {"enabled": True, "probe_key_file": str(probe_key)}},
        }, tmp_path / "pop1")
        pop.start()
        with RouteWatcher(r1.ns, ANYCAST) as watch:
            try:
                watch.wait_for(lambda hops: hops == frozenset({"10.0.1.2"}), timeout=30)
                status = pop.status()
                assert {name for s in status["servers"] for name in s["tiers"]} == {"tcp", "wireguard"}
                assert all(s["tiers"]["wireguard"]["last"]["ok"] for s in status["servers"])

                # vpn1's WireGuard daemon dies; its TCP port still answers
                wg_servers[0].stop()
                status = pop.wait_status(lambda s: s["servers"][0]["state"] == "down", timeout=10)
                vpn1 = status["servers"][0]
                assert vpn1["decided_by"] == "wireguard" and vpn1["tiers"]["tcp"]["state"] == "up"
                assert vpn1["tiers"]["wireguard"]["last"]["error"] == "icmp-unreachable"
                assert status["state"] == "degraded" and watch.nexthops == frozenset({"10.0.1.2"})

                # the last WireGuard daemon dies: the PoP withdraws although every TCP port answers
                killed = time.monotonic()
                wg_servers[1].stop()
                gone = watch.wait_for(lambda hops: not hops, timeout=10, since=killed)
                print(f"\nMEASURED last WireGuard daemon stops -> route gone: {(gone - killed) * 1000:.0f} ms")
                status = pop.status()
                assert status["state"] == "withdrawn"
                assert all(s["tiers"]["tcp"]["state"] == "up" for s in status["servers"])

                # back only when both tiers have risen again (and after the hold-down)
                wg_servers[0].start()
                wg_servers[1].start()
                watch.wait_for(lambda hops: hops == frozenset({"10.0.1.2"}), timeout=20, since=time.monotonic())
            finally:
                pop.stop()
                print(pop.log_tail(30))
    finally:
        for wg in wg_servers:
            wg.stop()
