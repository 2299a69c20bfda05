"""The SYN probe (pop.checks.syn) against real listeners in a namespace: the same evidence as a
connect (open, refused, silent, ICMP unreachable), from one raw socket that reads only its own
answers."""

from __future__ import annotations

import asyncio
import heapq
import socket

import pytest

from lab.popnode import TcpService
from pop.checks import syn, tcpwire
from pop.checks.syn import SynCheck
from tests.netns.test_l4_netns import NsFactory, pair, probe_in

DROP = "add table inet t; add chain inet t in { type filter hook input priority 0; policy drop; }"


def test_syn_open_refused_dropped_and_rejected(netns_factory: NsFactory) -> None:
    pop, server = pair(netns_factory)
    service = TcpService(server, "10.7.0.2", 443)
    service.start()
    # the first SYN on a fresh link may wait for ARP; hysteresis absorbs that in production
    results = [probe_in(pop, lambda: SynCheck("10.7.0.2", 443, timeout=1.0).probe()) for _ in range(2)]
    assert results[-1].ok and results[-1].latency is not None and results[-1].latency < 0.5, results
    service.stop()
    refused = probe_in(pop, lambda: SynCheck("10.7.0.2", 443, timeout=0.5).probe())
    assert (refused.ok, refused.error, refused.definitive) == (False, "refused", True), refused
    server.run("nft", DROP)
    check = SynCheck("10.7.0.2", 443, timeout=0.3)
    silent = probe_in(pop, check.probe)
    assert (silent.ok, silent.error, silent.definitive) == (False, "timeout", False), silent
    assert check._fixed is None  # after silence the source address is asked again
    server.run("nft", "flush chain inet t in; add rule inet t in tcp dport 443 reject with icmpx admin-prohibited")
    rejected = probe_in(pop, lambda: SynCheck("10.7.0.2", 443, timeout=0.5).probe())
    assert (rejected.ok, rejected.error, rejected.definitive) == (False, "unreachable", True), rejected


def test_many_servers_answered_at_once_each_get_their_own_answer(netns_factory: NsFactory) -> None:
    """Probes of one prober in flight together are told apart: a listening port and a closed one
    on the same server, and the same port probed twice at once."""
    pop, server = pair(netns_factory)
    service = TcpService(server, "10.7.0.2", 443)
    service.start()
    probe_in(pop, lambda: SynCheck("10.7.0.2", 443, timeout=1.0).probe())  # ARP

    async def together() -> list[str]:
        checks = [SynCheck("10.7.0.2", 443, 0.5), SynCheck("10.7.0.2", 444, 0.5)] * 8
        results = await asyncio.gather(*(c.probe() for c in checks))
        return ["ok" if r.ok else r.error for r in results]

    answers = probe_in(pop, together)
    service.stop()
    assert answers == ["ok", "refused"] * 8


def test_the_raw_socket_reads_only_tcp_to_the_probes_source_ports(netns_factory: NsFactory) -> None:
    """Other TCP traffic of the host never reaches user space through the prober's socket."""
    pop, _ = pair(netns_factory)
    with pop.enter():
        holders, base = syn._hold_ports()
        raw = syn._raw(socket.IPPROTO_TCP, tcpwire.tcp_filter(base, base + syn.PORTS - 1))
        try:
            with socket.socket() as listener:
                listener.bind(("127.0.0.1", 0))
                listener.listen(4)
                with socket.create_connection(listener.getsockname(), timeout=1):
                    pass  # a whole handshake and its teardown, none of it to our ports
            raw.settimeout(0.2)
            try:
                stray = raw.recv(256)
            except TimeoutError:
                stray = b""
            assert stray == b""
            source = bytes([127, 0, 0, 1])
            raw.sendto(tcpwire.syn(source, source, base, 9, 77), ("127.0.0.1", 0))  # nothing listens on 9
            answer = tcpwire.read_tcp(raw.recv(256))
            assert answer == tcpwire.Answer(tcpwire.Key(source, 9, base, 78), "rst")
        finally:
            raw.close()
            for holder in holders:
                holder.close()


def test_an_answered_probe_keeps_the_source_when_its_deadline_passes(monkeypatch: pytest.MonkeyPatch,
                                                                      netns_factory: NsFactory) -> None:
    """The deadline of a probe that was answered does nothing: the next probe of the server
    reuses the source address (and the checksum's fixed part) instead of asking the routing
    again, which costs a socket, a connect, a getsockname and a close per probe. Only silence
    makes the next probe ask again (test_syn_open_refused_dropped_and_rejected)."""
    pop, server = pair(netns_factory)
    service = TcpService(server, "10.7.0.2", 443)
    service.start()
    probe_in(pop, lambda: SynCheck("10.7.0.2", 443, timeout=1.0).probe())  # ARP
    asked: list[str] = []
    real = syn._source_for

    def counted(host: str) -> bytes:
        asked.append(host)
        return real(host)

    monkeypatch.setattr(syn, "_source_for", counted)
    check = SynCheck("10.7.0.2", 443, timeout=1.0)

    async def probe_past_deadlines() -> list[bool]:
        results = []
        for _ in range(3):
            results.append((await check.probe()).ok)
            # the deadline of every probe sent comes (not waited for: the heap is served now)
            deadlines = syn._probers.get().deadlines
            while deadlines.heap:
                heapq.heappop(deadlines.heap)[2]()
        return results

    results = probe_in(pop, probe_past_deadlines)
    service.stop()
    assert results == [True, True, True], results
    assert asked == ["10.7.0.2"], f"the routing was asked {len(asked)} times for 3 answered probes"
