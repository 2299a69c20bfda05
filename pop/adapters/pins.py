"""Flow pinning for ECMP mode: a flow stays on the server it started on.

A multipath route hashes every packet afresh, so when the set of next hops changes, a share
of the *existing* flows hashes onto another server (a quarter to a half with hash-threshold)
and their tunnels break; and a route cannot carry weight 0, so a server cannot be drained
gently. Pinning records, per flow, the server the route chose, and routes the flow's later
packets there for as long as that server is pinned:

- nftables, table ``pop`` (families ip and ip6, owned entirely by pop): in postrouting, the
  first packet of a flow to an anycast prefix gets conntrack mark ``PIN_BASE | n``, looked up
  from the route's next hop (``rt ip nexthop``) in the map ``pins`` of pinned servers; in
  prerouting, a packet whose flow carries such a mark gets it as its firewall mark;
- one ip rule per pinned server, ``fwmark M lookup M`` (priority ``PIN_RULE_PRIORITY``,
  rtnetlink protocol ``protocol``), and in table ``M`` a route for each anycast prefix via
  that server only (``RouteTable``).

A server in the pool or being drained is pinned; one that failed is not: its rule and route
go, its flows fall through to the multipath route and rehash onto the healthy servers. ``n``
is the server's position in the configuration (from 1), so marks survive restarts; a PoP
with more than ``0xffff`` servers cannot pin.

Contract: ``await pins.set(addresses)`` takes the whole set of pinned server addresses and
reconciles the nftables table (replaced in one transaction), the rules and the per-server
tables, and leaves everything else alone; a set equal to the last one applied in full sends
nothing (the first call always reconciles, adopting what an earlier engine left).
``await pins.set(())`` removes every pin and the nftables table. ``connections()`` counts
conntrack entries per pinned server address (from the namespace's ``nf_conntrack`` table);
it raises ``DataplaneError`` when the kernel does not show them, so a drain then ends by its
timeout, never early.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Iterable, Mapping, Sequence
from socket import AF_INET, AF_INET6

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pop.adapters.routes import DataplaneError, RouteTable, kernel_error, run_in_netns
from pop.desired import EcmpRoute, NextHop

log = logging.getLogger(__name__)

PIN_BASE = 0x504F0000  # "PO": the high 16 bits of every mark and table id pop uses for pins
PIN_MASK = 0xFFFF0000
PIN_RULE_PRIORITY = 1000
NFT_TABLE = "pop"


def pin_marks(addresses: Sequence[str]) -> dict[str, int]:
    """The mark (and routing table id) of each server, by its position in the configuration."""
    if len(addresses) > 0xFFFF:
        raise ValueError(f"{len(addresses)} servers: pinning marks have room for 65535")
    return {address: PIN_BASE | (index + 1) for index, address in enumerate(addresses)}


def render_nft(prefixes: Sequence[str], pinned: Mapping[str, int]) -> str:
    """The nftables script that replaces table ``pop`` in one transaction (empty: removes it)."""
    lines: list[str] = []
    for family, nft_family, addr_type, version in (("ip", "ip", "ipv4_addr", 4), ("ip6", "ip6", "ipv6_addr", 6)):
        nets = [p for p in prefixes if ipaddress.ip_network(p).version == version]
        lines += [f"table {nft_family} {NFT_TABLE} {{}}", f"delete table {nft_family} {NFT_TABLE}"]
        if not nets:
            continue
        elements = ", ".join(f"{a} : {m:#010x}" for a, m in sorted(pinned.items())
                             if ipaddress.ip_address(a).version == version)
        daddr = "{ " + ", ".join(nets) + " }"
        lines += [
            f"table {nft_family} {NFT_TABLE} {{",
            f"  map pins {{ type {addr_type} : mark;" + (f" elements = {{ {elements} }};" if elements else "") + " }",
            "  chain restore { type filter hook prerouting priority mangle; policy accept;",
            f"    {family} daddr {daddr} ct mark and {PIN_MASK:#010x} == {PIN_BASE:#010x} meta mark set ct mark; }}",
            "  chain pin { type filter hook postrouting priority mangle; policy accept;",
            f"    {family} daddr {daddr} ct mark 0 ct mark set rt {family} nexthop map @pins; }}",
            "}",
        ]
    return "\n".join(lines) + "\n"


def count_marks(conntrack_text: str, marks: Iterable[int]) -> dict[int, int]:
    """Entries per mark in the text of /proc/net/nf_conntrack."""
    counts = dict.fromkeys(marks, 0)
    for line in conntrack_text.splitlines():
        for word in line.split():
            if word.startswith("mark="):
                mark = int(word[5:])
                if mark in counts:
                    counts[mark] += 1
                break
    return counts


class FlowPins:
    def __init__(self, prefixes: Sequence[str], servers: Sequence[str], *, protocol: int = 200,
                 netns: str | None = None) -> None:
        self.prefixes = tuple(prefixes)
        self.marks = pin_marks(servers)
        self.protocol = protocol
        self.netns = netns
        self._applied: dict[str, int] | None = None  # what the last complete set() left; None: not yet
        self._tables = {mark: RouteTable(table=mark, protocol=protocol, netns=netns) for mark in self.marks.values()}

    async def set(self, addresses: Iterable[str]) -> None:
        pinned = {a: self.marks[a] for a in addresses}
        if pinned == self._applied:
            return  # the first call always reconciles (adopts what an earlier engine left)
        self._applied = None  # until this pass completes: a failure is retried in full
        if pinned:
            # routes and rules before the marks that use them; removals the other way round
            await self._set_routes(pinned)
            await run_in_netns(self.netns, lambda: self._set_rules(frozenset(pinned.values())))
            await self._set_nft(pinned)
        else:
            await self._set_nft({})
            await run_in_netns(self.netns, lambda: self._set_rules(frozenset()))
            await self._set_routes({})
        self._applied = pinned

    async def _set_nft(self, pinned: Mapping[str, int]) -> None:
        script = render_nft(self.prefixes if pinned else (), pinned)
        argv = ["nft", "-f", "-"]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate(script.encode())
        if proc.returncode != 0:
            raise DataplaneError("nft replace table pop (flow pins)", err.decode(errors="replace").strip())
        log.info("pins.nft servers=%s", ",".join(sorted(pinned)) or "-")

    def _set_rules(self, wanted: frozenset[int]) -> None:
        with IPRoute() as ipr:
            for family in (AF_INET, AF_INET6):
                present = set()
                for rule in ipr.get_rules(family=family):
                    mark = rule.get_attr("FRA_FWMARK")
                    if rule.get_attr("FRA_PROTOCOL") != self.protocol or mark is None or mark & PIN_MASK != PIN_BASE:
                        continue
                    if mark in wanted and rule.get_attr("FRA_TABLE") == mark:
                        present.add(mark)
                        continue
                    self._rule(ipr, "del", family, mark, rule.get_attr("FRA_PRIORITY"))
                for mark in sorted(wanted - present):
                    self._rule(ipr, "add", family, mark, PIN_RULE_PRIORITY)

    def _rule(self, ipr: IPRoute, verb: str, family: int, mark: int, priority: int | None) -> None:
        try:
            ipr.rule(verb, family=family, table=mark, priority=priority, fwmark=mark, fwmask=0xFFFFFFFF,
                     protocol=self.protocol)
        except NetlinkError as exc:
            raise kernel_error(f"{verb} rule fwmark {mark:#x} lookup {mark}", exc) from exc
        log.info("pins.rule %s fwmark=%#x family=%d", verb, mark, family)

    async def _set_routes(self, pinned: Mapping[str, int]) -> None:
        by_mark = {m: a for a, m in pinned.items()}
        for mark, table in self._tables.items():
            address = by_mark.get(mark)
            version = ipaddress.ip_address(address).version if address else None
            routes = [EcmpRoute(p, (NextHop(address),), mark, self.protocol) for p in self.prefixes
                      if address is not None and ipaddress.ip_network(p).version == version]
            await table.set(routes)

    async def connections(self) -> dict[str, int]:
        def read() -> str:
            # the calling thread's namespace: /proc/net would be the process's
            with open("/proc/thread-self/net/nf_conntrack") as handle:
                return handle.read()

        try:
            text = await run_in_netns(self.netns, read)
        except OSError as exc:
            raise DataplaneError("read conntrack (flow pins)", str(exc)) from exc
        counts = count_marks(text, self.marks.values())
        return {address: counts[mark] for address, mark in self.marks.items()}

    async def close(self) -> None:
        for table in self._tables.values():
            await table.close()

