"""Tier-1 checks against real peers in namespaces: ICMP echo needs a raw socket (root),
and unreachable/blackholed targets need a network the test owns."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from lab.netns import Netns, veth
from lab.popnode import TcpService
from pop.checks.l4 import IcmpCheck, TcpCheck

NsFactory = Callable[[str], Netns]
T = TypeVar("T")


def probe_in(ns: Netns, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run one probe (or any coroutine) on an event loop in a thread that lives in `ns`."""
    out: list[T] = []

    def worker() -> None:
        with ns.enter():
            out.append(asyncio.run(make()))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=10)
    assert out, "probe did not finish"
    return out[0]


def pair(netns_factory: NsFactory) -> tuple[Netns, Netns]:
    pop = netns_factory("pop")
    server = netns_factory("srv")
    veth(pop, "v0", "10.7.0.1/29", server, "eth0", "10.7.0.2/29")
    veth(pop, "v6", "fd00:7::1/64", server, "eth6", "fd00:7::2/64")
    return pop, server


def test_icmp_echo_v4_and_v6(netns_factory: NsFactory) -> None:
    pop, _ = pair(netns_factory)
    for address in ("10.7.0.2", "fd00:7::2"):
        # the very first packet on a fresh link can be lost to neighbour discovery (the kernel
        # re-solicits only after 1 s), exactly what hysteresis absorbs in production
        results = [probe_in(pop, lambda a=address: IcmpCheck(a, timeout=1.0).probe()) for _ in range(3)]
        assert results[-1].ok and results[-1].latency is not None and results[-1].latency < 0.5, (address, results)


def test_icmp_silence_is_timeout(netns_factory: NsFactory) -> None:
    pop, server = pair(netns_factory)
    server.run("nft", "add table inet t; add chain inet t in { type filter hook input priority 0; policy drop; }")
    result = probe_in(pop, lambda: IcmpCheck("10.7.0.2", timeout=0.3).probe())
    assert (result.ok, result.error, result.definitive) == (False, "timeout", False)


def test_tcp_against_real_server_refused_blackholed_and_unreachable(netns_factory: NsFactory) -> None:
    pop, server = pair(netns_factory)
    service = TcpService(server, "10.7.0.2", 443)
    service.start()
    assert probe_in(pop, lambda: TcpCheck("10.7.0.2", 443, timeout=0.5).probe()).ok
    service.stop()
    refused = probe_in(pop, lambda: TcpCheck("10.7.0.2", 443, timeout=0.5).probe())
    assert (refused.error, refused.definitive) == ("refused", True)
    server.run("nft", "add table inet t; add chain inet t in { type filter hook input priority 0; policy drop; }")
    silent = probe_in(pop, lambda: TcpCheck("10.7.0.2", 443, timeout=0.3).probe())
    assert (silent.error, silent.definitive) == ("timeout", False)
    # an ICMP admin-prohibited reject is definitive: loss does not produce it
    server.run("nft", "flush chain inet t in; add rule inet t in tcp dport 443 reject with icmpx admin-prohibited")
    rejected = probe_in(pop, lambda: TcpCheck("10.7.0.2", 443, timeout=0.5).probe())
    assert not rejected.ok and rejected.definitive, rejected
