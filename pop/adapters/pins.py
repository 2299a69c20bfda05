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
is a number from 1 that a server keeps for as long as it is configured (``assign_marks``): a
reload that adds or removes servers leaves every other server's mark, so their pinned flows
stay; a new server gets the lowest free number; a starting engine adopts the marks it finds
in the kernel's map for the same addresses. A PoP with more than ``0xffff`` servers cannot pin.

Contract: ``await pins.set(addresses)`` takes the whole set of pinned server addresses and
reconciles the nftables table (replaced in one transaction when it differs), the rules and
the per-server tables, and leaves everything else alone. It returns the changes made ("pins
add 10.0.1.12", "pins remove 10.0.1.11", and a repair line for a rule, route or nftables
chain that was missing), () when the kernel already held the state. A set equal to the last
one applied in full is not read back (the first call always is); ``verify=True`` reads
everything back anyway and repairs what was removed behind pop's back. ``await pins.set(())``
removes every pin and the nftables table. ``reconfigure(prefixes, servers)`` follows a reload.
``connections()`` counts conntrack entries per pinned server address (from the namespace's
``nf_conntrack`` table); it raises ``DataplaneError`` when the kernel does not show them, so a
drain then ends by its timeout, never early.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from socket import AF_INET, AF_INET6
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pop.adapters.routes import DataplaneError, RouteTable, canonical_address, kernel_error, run_in_netns
from pop.desired import EcmpRoute, NextHop

log = logging.getLogger(__name__)

PIN_BASE = 0x504F0000  # "PO": the high 16 bits of every mark and table id pop uses for pins
PIN_MASK = 0xFFFF0000
PIN_RULE_PRIORITY = 1000
NFT_TABLE = "pop"
_FAMILIES = (("ip", 4), ("ip6", 6))


def is_pin_mark(mark: int) -> bool:
    return mark & PIN_MASK == PIN_BASE and mark & 0xFFFF != 0


def assign_marks(servers: Sequence[str], keep: Mapping[str, int]) -> dict[str, int]:
    """Pure: the mark (and routing table id) of each server. A server in `keep` (the marks
    before a reload, or those found in the kernel at start) keeps its mark; a new one gets
    the lowest free one, so adding or removing a server never re-marks the others."""
    if len(servers) > 0xFFFF:
        raise ValueError(f"{len(servers)} servers: pinning marks have room for 65535")
    kept = {canonical_address(a)[2]: m for a, m in keep.items() if is_pin_mark(m)}
    marks: dict[str, int] = {}
    for address in servers:
        mark = kept.get(canonical_address(address)[2])
        if mark is not None and mark not in marks.values():
            marks[address] = mark
    used = set(marks.values())
    free = (PIN_BASE | n for n in range(1, 0x10000) if PIN_BASE | n not in used)
    for address in servers:
        if address not in marks:
            marks[address] = next(free)
    return marks


def pin_marks(addresses: Sequence[str]) -> dict[str, int]:
    """The marks of a first start with nothing to keep: by position in the configuration."""
    return assign_marks(addresses, {})


def render_nft(prefixes: Sequence[str], pinned: Mapping[str, int]) -> str:
    """The nftables script that replaces table ``pop`` in one transaction (empty: removes it)."""
    lines: list[str] = []
    for family, version in _FAMILIES:
        nets = [p for p in prefixes if ipaddress.ip_network(p).version == version]
        lines += [f"table {family} {NFT_TABLE} {{}}", f"delete table {family} {NFT_TABLE}"]
        if not nets:
            continue
        elements = ", ".join(f"{a} : {m:#010x}" for a, m in sorted(pinned.items())
                             if ipaddress.ip_address(a).version == version)
        addr_type = "ipv4_addr" if version == 4 else "ipv6_addr"
        daddr = "{ " + ", ".join(nets) + " }"
        lines += [
            f"table {family} {NFT_TABLE} {{",
            f"  map pins {{ type {addr_type} : mark;" + (f" elements = {{ {elements} }};" if elements else "") + " }",
            "  chain restore { type filter hook prerouting priority mangle; policy accept;",
            f"    {family} daddr {daddr} ct mark and {PIN_MASK:#010x} == {PIN_BASE:#010x} meta mark set ct mark; }}",
            "  chain pin { type filter hook postrouting priority mangle; policy accept;",
            f"    {family} daddr {daddr} ct mark 0 ct mark set rt {family} nexthop map @pins; }}",
            "}",
        ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class NftTable:
    """What the kernel holds of one family's table ``pop``, as far as pinning needs it."""

    elements: dict[str, int] = field(default_factory=dict)  # the map ``pins``: address -> mark
    prefixes: frozenset[str] = frozenset()  # the destinations the rules match, if both agree
    intact: bool = False  # both chains hooked, one rule each, the pin rule using @pins


def parse_nft(listing: str) -> dict[str, NftTable]:
    """Pure: the tables ``pop`` in the output of ``nft -j list ruleset``, by family."""
    objects = json.loads(listing).get("nftables", [])
    mine = [o for o in objects if any(v.get("table", v.get("name")) == NFT_TABLE
                                      for k, v in o.items() if k in ("table", "map", "chain", "rule"))]
    result: dict[str, NftTable] = {}
    for family, _ in _FAMILIES:
        of = [o for o in mine if next(iter(o.values())).get("family") == family]
        if not any("table" in o for o in of):
            continue
        elements: dict[str, int] = {}
        for o in of:
            if "map" in o and o["map"].get("name") == "pins":
                for address, mark in o["map"].get("elem", []):
                    elements[canonical_address(address)[2]] = int(mark)
        hooks = {o["chain"].get("name"): o["chain"].get("hook") for o in of if "chain" in o}
        rules: dict[str, list[Any]] = {}
        for o in of:
            if "rule" in o:
                rules.setdefault(o["rule"].get("chain"), []).append(o["rule"].get("expr", []))
        daddrs = {chain: _daddr(exprs[0]) for chain, exprs in rules.items() if len(exprs) == 1}
        intact = (hooks == {"restore": "prerouting", "pin": "postrouting"}
                  and set(daddrs) == {"restore", "pin"} and daddrs["restore"] == daddrs["pin"]
                  and '"@pins"' in json.dumps(rules["pin"]))
        result[family] = NftTable(elements, daddrs["pin"] if intact else frozenset(), intact)
    return result


def _daddr(exprs: list[Any]) -> frozenset[str]:
    for expr in exprs:
        match = expr.get("match", {}) if isinstance(expr, dict) else {}
        if match.get("left", {}).get("payload", {}).get("field") == "daddr":
            return collapse(_networks(match.get("right")))
    return frozenset()


def _networks(value: Any) -> list[str]:
    if isinstance(value, str):
        return [str(ipaddress.ip_network(value))]
    if isinstance(value, dict) and "prefix" in value:
        return [str(ipaddress.ip_network(f"{value['prefix']['addr']}/{value['prefix']['len']}"))]
    if isinstance(value, dict) and "range" in value:
        first, last = (ipaddress.ip_address(a) for a in value["range"])
        return [str(n) for n in ipaddress.summarize_address_range(first, last)]
    if isinstance(value, dict) and "set" in value:
        return [n for item in value["set"] for n in _networks(item)]
    return []


def collapse(prefixes: Iterable[str]) -> frozenset[str]:
    """The same addresses as `prefixes`, in the fewest prefixes: nftables merges adjacent
    elements of a set (two /32s are listed as one /31)."""
    nets = [ipaddress.ip_network(p) for p in prefixes]
    # one family per call (callers split them); typeshed wants one network type statically
    return frozenset(str(n) for n in ipaddress.collapse_addresses(nets))  # type: ignore[type-var]


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
                 netns: str | None = None, marks: Mapping[str, int] | None = None) -> None:
        """``marks``: those of an adapter this one replaces (a reload); without them the first
        set() adopts the marks in the kernel's map."""
        self.prefixes = tuple(str(ipaddress.ip_network(p)) for p in prefixes)
        self.servers = tuple(servers)
        self.protocol = protocol
        self.netns = netns
        self.marks: dict[str, int] = assign_marks(self.servers, marks) if marks is not None else {}
        self._adopted = marks is not None
        self._applied: dict[str, int] | None = None  # what the last complete set() left; None: not yet
        self._tables: dict[int, RouteTable] = {}

    def reconfigure(self, prefixes: Sequence[str], servers: Sequence[str]) -> None:
        """A reload: the servers that stay keep their marks; the next set() reconciles in full."""
        self.prefixes = tuple(str(ipaddress.ip_network(p)) for p in prefixes)
        self.servers = tuple(servers)
        if self._adopted:
            self.marks = assign_marks(self.servers, self.marks)
        self._applied = None

    async def _adopt(self) -> dict[str, NftTable]:
        """Read the kernel's tables; the first time, take the marks found there."""
        tables = await self._read_nft()
        if not self._adopted:
            found = {a: m for t in tables.values() for a, m in t.elements.items()}
            self.marks = assign_marks(self.servers, found)
            self._adopted = True
        return tables

    async def read(self) -> tuple[str, ...]:
        """The pinned server addresses in the kernel's map."""
        return tuple(sorted(a for t in (await self._read_nft()).values() for a in t.elements))

    async def set(self, addresses: Iterable[str], *, verify: bool = False) -> tuple[str, ...]:
        wanted = tuple(addresses)
        if not verify and self._applied is not None and {a: self.marks.get(a) for a in wanted} == self._applied:
            return ()  # the first call always reconciles (adopts what an earlier engine left)
        self._applied = None  # until this pass completes: a failure is retried in full
        tables = await self._adopt()
        try:
            pinned = {a: self.marks[a] for a in wanted}
        except KeyError as exc:
            raise DataplaneError("pin flows", f"server {exc.args[0]} is not configured") from exc
        changes: list[tuple[int | None, str]] = []
        if pinned:
            # routes and rules before the marks that use them; removals the other way round
            changes += await self._set_routes(pinned)
            rules, stale = await run_in_netns(self.netns, lambda: self._set_rules(frozenset(pinned.values())))
            changes += rules
            changes += await self._set_nft(pinned, tables)
            changes += await self._clear_tables(stale)
        else:
            changes += await self._set_nft({}, tables)
            rules, stale = await run_in_netns(self.netns, lambda: self._set_rules(frozenset()))
            changes += rules
            changes += await self._set_routes({}, stale)
        self._applied = pinned
        return _summary(changes, tables, pinned)

    async def _read_nft(self) -> dict[str, NftTable]:
        out = await self._nft(["-j", "list", "ruleset"], b"", "nft list ruleset (flow pins)")
        try:
            return parse_nft(out)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataplaneError("nft list ruleset (flow pins)", f"unexpected JSON: {exc!r}") from exc

    async def _nft(self, args: list[str], stdin: bytes, operation: str) -> str:
        argv = ["nft", *args]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate(stdin)
        except OSError as exc:
            raise kernel_error(operation, exc) from exc
        if proc.returncode != 0:
            raise DataplaneError(operation, err.decode(errors="replace").strip())
        return out.decode(errors="replace")

    async def _set_nft(self, pinned: Mapping[str, int], tables: Mapping[str, NftTable]) -> list[tuple[int | None, str]]:
        want: dict[str, NftTable] = {}
        for family, version in _FAMILIES:
            nets = collapse(p for p in self.prefixes if ipaddress.ip_network(p).version == version)
            if pinned and nets:
                elements = {canonical_address(a)[2]: m for a, m in pinned.items()
                            if ipaddress.ip_address(a).version == version}
                want[family] = NftTable(elements, nets, True)
        if tables == want:
            return []
        await self._nft(["-f", "-"], render_nft(self.prefixes if pinned else (), pinned).encode(),
                        "nft replace table pop (flow pins)")
        log.info("pins.nft servers=%s", ",".join(sorted(pinned)) or "-")
        # which servers the map gained or lost is reported by _summary; this is the rest
        broken = [f for f, t in tables.items() if not t.intact or (f in want and t.prefixes != want[f].prefixes)]
        return [(None, f"pins nft repair table {f} {NFT_TABLE}") for f in broken if f in want]

    def _set_rules(self, wanted: frozenset[int]) -> tuple[list[tuple[int | None, str]], frozenset[int]]:
        """Reconcile the rules; returns the changes and the pin marks of rules it deleted."""
        changes: list[tuple[int | None, str]] = []
        stale: set[int] = set()
        try:
            ipr = IPRoute()
        except (OSError, NetlinkError) as exc:
            raise kernel_error("open rtnetlink (flow pin rules)", exc) from exc
        with ipr:
            for family in (AF_INET, AF_INET6):
                present = set()
                try:
                    rules = list(ipr.get_rules(family=family))
                except (OSError, NetlinkError) as exc:
                    raise kernel_error("dump rules (flow pins)", exc) from exc
                for rule in rules:
                    mark = rule.get_attr("FRA_FWMARK")
                    if rule.get_attr("FRA_PROTOCOL") != self.protocol or mark is None or mark & PIN_MASK != PIN_BASE:
                        continue
                    if mark in wanted and rule.get_attr("FRA_TABLE") == mark:
                        present.add(mark)
                        continue
                    self._rule(ipr, "del", family, mark, rule.get_attr("FRA_PRIORITY"))
                    changes.append((mark, f"pins rule delete fwmark {mark:#x}"))
                    stale.add(mark)
                for mark in sorted(wanted - present):
                    self._rule(ipr, "add", family, mark, PIN_RULE_PRIORITY)
                    changes.append((mark, f"pins rule add fwmark {mark:#x} family {family}"))
        return changes, frozenset(stale - wanted)

    def _rule(self, ipr: IPRoute, verb: str, family: int, mark: int, priority: int | None) -> None:
        try:
            ipr.rule(verb, family=family, table=mark, priority=priority, fwmark=mark, fwmask=0xFFFFFFFF,
                     protocol=self.protocol)
        except (OSError, NetlinkError) as exc:
            raise kernel_error(f"{verb} rule fwmark {mark:#x} lookup {mark}", exc) from exc
        log.info("pins.rule %s fwmark=%#x family=%d", verb, mark, family)

    def _table(self, mark: int) -> RouteTable:
        if mark not in self._tables:
            self._tables[mark] = RouteTable(table=mark, protocol=self.protocol, netns=self.netns)
        return self._tables[mark]

    async def _set_routes(self, pinned: Mapping[str, int], stale: Iterable[int] = ()) -> list[tuple[int | None, str]]:
        """Each pinned server's table holds the prefixes via that server; every other table
        this adapter knows of (or that a stale rule named) is emptied and forgotten."""
        changes: list[tuple[int | None, str]] = []
        by_mark = {m: a for a, m in pinned.items()}
        for mark in sorted({*self._tables, *by_mark, *self.marks.values(), *stale}):
            address = by_mark.get(mark)
            version = ipaddress.ip_address(address).version if address else None
            routes = [EcmpRoute(p, (NextHop(address),), mark, self.protocol) for p in self.prefixes
                      if address is not None and ipaddress.ip_network(p).version == version]
            changes += [(mark, f"pins {c}") for c in await self._table(mark).set(routes)]
            if address is None and mark not in self.marks.values():
                await self._tables.pop(mark).close()
        return changes

    async def _clear_tables(self, marks: Iterable[int]) -> list[tuple[int | None, str]]:
        changes: list[tuple[int | None, str]] = []
        for mark in sorted(marks):
            changes += [(mark, f"pins {c}") for c in await self._table(mark).set([])]
            if mark not in self.marks.values():
                await self._tables.pop(mark).close()
        return changes

    async def connections(self) -> dict[str, int]:
        if not self._adopted:
            await self._adopt()

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
        self._tables.clear()


def _summary(changes: Sequence[tuple[int | None, str]], before: Mapping[str, NftTable],
             pinned: Mapping[str, int]) -> tuple[str, ...]:
    """One line per server pinned or unpinned (from the kernel's map before and after), plus
    every change that is not part of one: a rule, a route or a chain put back."""
    had = {a: m for t in before.values() for a, m in t.elements.items()}
    now = {canonical_address(a)[2]: m for a, m in pinned.items()}
    added = sorted((a for a in now if had.get(a) != now[a]), key=lambda a: canonical_address(a)[1])
    removed = sorted((a for a in had if a not in now), key=lambda a: canonical_address(a)[1])
    covered = {now[a] for a in added} | {had[a] for a in removed}
    lines = [f"pins add {a}" for a in added] + [f"pins remove {a}" for a in removed]
    return tuple(lines + [text for mark, text in changes if mark is None or mark not in covered])
