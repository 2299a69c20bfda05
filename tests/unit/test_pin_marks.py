"""Pure parts of flow pinning and of the data plane's change report: marks that survive a
reload, the kernel's nftables table read back, and the one-line changes."""

from __future__ import annotations

import json

import pytest

from pop.adapters.ipvs import IpvsOp, ServiceEntry
from pop.adapters.pins import PIN_BASE, NftTable, _summary, assign_marks, collapse, parse_nft
from pop.desired import RealServer, VirtualService

A, B, C = "10.0.1.1", "10.0.1.2", "10.0.1.3"


@pytest.mark.parametrize(("servers", "keep", "expected"), [
    ((A, B), {}, {A: 1, B: 2}),  # first start: by position
    ((C, A, B), {A: 1, B: 2}, {A: 1, B: 2, C: 3}),  # a server inserted first: the others keep theirs
    ((B,), {A: 1, B: 2}, {B: 2}),  # one removed: the other keeps its mark
    ((C, B), {A: 1, B: 2}, {B: 2, C: 1}),  # a freed mark is reused by the next new server
    ((A, B), {A: 2, B: 2}, {A: 2, B: 1}),  # a mark found twice is kept once
    ((A,), {A: 0x12345678}, {A: 1}),  # not a pin mark: not adopted
])
def test_assign_marks(servers: tuple[str, ...], keep: dict[str, int], expected: dict[str, int]) -> None:
    assert assign_marks(servers, {a: PIN_BASE | m if m < 0x10000 else m for a, m in keep.items()}) == {
        a: PIN_BASE | m for a, m in expected.items()}


def test_assign_marks_matches_addresses_in_canonical_form() -> None:
    assert assign_marks(["2001:db8:0::1"], {"2001:db8::1": PIN_BASE | 7}) == {"2001:db8:0::1": PIN_BASE | 7}


# `nft -j list ruleset` (nftables 1.0.6) after render_nft(["203.0.113.20/32", "203.0.113.21/32",
# "2001:db8::/64"], {"10.73.1.2": PIN_BASE | 1, "fd00::2": PIN_BASE | 2}): the two /32s come back as one /31.
LISTING = json.dumps({"nftables": [{"metainfo": {"version": "1.0.6"}}, *json.loads(r"""
[{"table": {"family": "ip", "name": "pop", "handle": 2}}, {"map": {"family": "ip", "name": "pins", "table": "pop", "type": "ipv4_addr", "handle": 3, "map": "mark", "elem": [["10.73.1.2", 1347354625]]}}, {"chain": {"family": "ip", "table": "pop", "name": "restore", "handle": 1, "type": "filter", "hook": "prerouting", "prio": -150, "policy": "accept"}}, {"chain": {"family": "ip", "table": "pop", "name": "pin", "handle": 2, "type": "filter", "hook": "postrouting", "prio": -150, "policy": "accept"}}, {"rule": {"family": "ip", "table": "pop", "chain": "restore", "handle": 5, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"set": [{"prefix": {"addr": "203.0.113.20", "len": 31}}]}}}, {"match": {"op": "==", "left": {"ct": {"key": "mark"}}, "right": {"prefix": {"addr": 1347354624, "len": 16}}}}, {"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"ct": {"key": "mark"}}}}]}}, {"rule": {"family": "ip", "table": "pop", "chain": "pin", "handle": 7, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"set": [{"prefix": {"addr": "203.0.113.20", "len": 31}}]}}}, {"match": {"op": "==", "left": {"ct": {"key": "mark"}}, "right": 0}}, {"mangle": {"key": {"ct": {"key": "mark"}}, "value": {"map": {"key": {"rt": {"key": "nexthop", "family": "ip"}}, "data": "@pins"}}}}]}}, {"table": {"family": "ip6", "name": "pop", "handle": 4}}, {"map": {"family": "ip6", "name": "pins", "table": "pop", "type": "ipv6_addr", "handle": 3, "map": "mark", "elem": [["fd00::2", 1347354626]]}}, {"chain": {"family": "ip6", "table": "pop", "name": "restore", "handle": 1, "type": "filter", "hook": "prerouting", "prio": -150, "policy": "accept"}}, {"chain": {"family": "ip6", "table": "pop", "name": "pin", "handle": 2, "type": "filter", "hook": "postrouting", "prio": -150, "policy": "accept"}}, {"rule": {"family": "ip6", "table": "pop", "chain": "restore", "handle": 4, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "daddr"}}, "right": {"prefix": {"addr": "2001:db8::", "len": 64}}}}, {"match": {"op": "==", "left": {"ct": {"key": "mark"}}, "right": {"prefix": {"addr": 1347354624, "len": 16}}}}, {"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"ct": {"key": "mark"}}}}]}}, {"rule": {"family": "ip6", "table": "pop", "chain": "pin", "handle": 5, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "daddr"}}, "right": {"prefix": {"addr": "2001:db8::", "len": 64}}}}, {"match": {"op": "==", "left": {"ct": {"key": "mark"}}, "right": 0}}, {"mangle": {"key": {"ct": {"key": "mark"}}, "value": {"map": {"key": {"rt": {"key": "nexthop", "family": "ip6"}}, "data": "@pins"}}}}]}}]
""")]})


def test_parse_nft_reads_the_map_and_checks_the_chains() -> None:
    tables = parse_nft(LISTING)
    assert tables == {
        "ip": NftTable({"10.73.1.2": PIN_BASE | 1}, collapse(["203.0.113.20/32", "203.0.113.21/32"]), True),
        "ip6": NftTable({"fd00::2": PIN_BASE | 2}, frozenset({"2001:db8::/64"}), True),
    }


def test_parse_nft_a_flushed_chain_is_not_intact_and_other_tables_are_ignored() -> None:
    objects = json.loads(LISTING)["nftables"]
    flushed = [o for o in objects if not ("rule" in o and o["rule"]["chain"] == "pin" and o["rule"]["family"] == "ip")]
    other = {"table": {"family": "inet", "name": "filter", "handle": 9}}
    tables = parse_nft(json.dumps({"nftables": [*flushed, other]}))
    assert not tables["ip"].intact and tables["ip"].elements == {"10.73.1.2": PIN_BASE | 1}
    assert tables["ip6"].intact and set(tables) == {"ip", "ip6"}
    assert parse_nft(json.dumps({"nftables": [other]})) == {}


def test_summary_one_line_per_server_and_the_repairs_not_part_of_one() -> None:
    before = {"ip": NftTable({A: PIN_BASE | 1, B: PIN_BASE | 2}, frozenset(), True)}
    changes = [(PIN_BASE | 3, "pins rule add fwmark 0x504f0003 family 2"),
               (PIN_BASE | 2, "pins rule delete fwmark 0x504f0002"),
               (PIN_BASE | 1, "pins route add 192.0.2.1/32 table 0x504f0001 via 10.0.1.1"),
               (None, "pins nft repair table ip pop")]
    assert _summary(changes, before, {A: PIN_BASE | 1, C: PIN_BASE | 3}) == (
        f"pins add {C}", f"pins remove {B}",
        "pins route add 192.0.2.1/32 table 0x504f0001 via 10.0.1.1", "pins nft repair table ip pop")


@pytest.mark.parametrize(("kind", "real", "expected"), [
    ("add-service", None, "ipvs add-service udp/192.0.2.1:51820 mh"),
    ("del-service", None, "ipvs del-service udp/192.0.2.1:51820"),
    ("add-real", RealServer("10.0.1.12", 51820), "ipvs add-real udp/192.0.2.1:51820 10.0.1.12"),
    ("edit-real", RealServer("10.0.1.12", 51820, 0), "ipvs edit-real udp/192.0.2.1:51820 10.0.1.12 weight 0"),
    ("del-real", RealServer("10.0.1.12", 51821, 0), "ipvs del-real udp/192.0.2.1:51820 10.0.1.12 port 51821"),
])
def test_ipvs_change_lines(kind: str, real: RealServer | None, expected: str) -> None:
    entry = ServiceEntry(VirtualService("udp", "192.0.2.1", 51820))
    assert IpvsOp(kind, entry, real).change() == expected


def test_ipvs_change_line_brackets_ipv6() -> None:
    entry = ServiceEntry(VirtualService("tcp", "2001:db8::1", 443))
    assert IpvsOp("add-service", entry).change() == "ipvs add-service tcp/[2001:db8::1]:443 mh"
