"""Pure reconciliation plans of the data-plane adapters: desired state x read-back -> plan."""

from __future__ import annotations

from socket import AF_INET, AF_INET6

import pytest

from pop.adapters.ipvs import ServiceEntry, normalize_service, plan_services, sched_flags
from pop.adapters.netlink import (
    IpvsDestRecord,
    IpvsServiceKey,
    IpvsServiceRecord,
    RouteEntry,
    decode_dest,
    decode_route,
    decode_service,
    encode_dest,
    encode_route,
    encode_service,
    genl,
)
from pop.adapters.routes import RoutePlan, normalize_route, plan_routes
from pop.adapters.vip import PresentAddress, VipPlan, plan_vips
from pop.desired import EcmpRoute, NextHop, RealServer, VirtualService


def r(prefix: str, *hops: str | tuple[str, int]) -> EcmpRoute:
    nh = tuple(NextHop(h) if isinstance(h, str) else NextHop(*h) for h in hops)
    return EcmpRoute(prefix, nh)


A, B, C = "10.0.0.1", "10.0.0.2", "10.0.0.3"
V = "203.0.113.1/32"


@pytest.mark.parametrize(
    ("desired", "current", "expected"),
    [
        # nothing to do
        ([], [], RoutePlan()),
        ([r(V, A, B)], [r(V, A, B)], RoutePlan()),
        # order of next hops does not matter
        ([r(V, B, A)], [r(V, A, B)], RoutePlan()),
        # prefix without length equals /32
        ([r("203.0.113.1", A, B)], [r(V, A, B)], RoutePlan()),
        # new route
        ([r(V, A, B)], [], RoutePlan(add=(r(V, A, B),))),
        # a server leaves: one replace, no delete
        ([r(V, A, B)], [r(V, A, B, C)], RoutePlan(replace=(r(V, A, B),))),
        # a weight changes
        ([r(V, (A, 2), B)], [r(V, A, B)], RoutePlan(replace=(r(V, (A, 2), B),))),
        # a single next hop: the kernel forgets its weight, so it is not a difference
        ([r(V, (A, 5))], [r(V, A)], RoutePlan()),
        # no next hops = no route
        ([r(V)], [r(V, A)], RoutePlan(delete=(r(V, A),))),
        ([r(V)], [], RoutePlan()),
        # ours, no longer desired
        ([], [r(V, A, B)], RoutePlan(delete=(r(V, A, B),))),
        # replacements and deletes together, sorted by prefix
        (
            [r("198.51.100.0/24", A), r(V, C, A)],
            [r(V, A), r("192.0.2.0/24", B)],
            RoutePlan(add=(r("198.51.100.0/24", A),), replace=(r(V, A, C),), delete=(r("192.0.2.0/24", B),)),
        ),
        # IPv6, written differently
        (
            [r("2001:db8::1/128", "2001:db8:1::0:1", "2001:db8:1::2")],
            [r("2001:db8::1/128", "2001:db8:1::2", "2001:db8:1::1")],
            RoutePlan(),
        ),
    ],
)
def test_plan_routes(desired: list[EcmpRoute], current: list[EcmpRoute], expected: RoutePlan) -> None:
    assert plan_routes(desired, current) == expected


@pytest.mark.parametrize(
    ("route", "error"),
    [
        (r("203.0.113.1/24", A), "host bits"),
        (r(V, A, A), "listed twice"),
        (r(V, (A, 0), B), "weight 0"),
        (r(V, (A, 257), B), "weight 257"),
        (r(V, "2001:db8::1", B), "not IPv4"),
        (r(V, "not-an-address"), "does not appear to be"),
    ],
)
def test_normalize_route_rejects(route: EcmpRoute, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        normalize_route(route)


def test_duplicate_desired_prefix_rejected() -> None:
    with pytest.raises(ValueError, match="desired twice"):
        plan_routes([r(V, A), r("203.0.113.1", B)], [])


def test_normalize_sorts_next_hops_numerically() -> None:
    got = normalize_route(r(V, "10.0.0.10", "10.0.0.9", "10.0.0.100"))
    assert [h.address for h in got.nexthops] == ["10.0.0.9", "10.0.0.10", "10.0.0.100"]


# ---------------------------------------------------------------------------------------
# VIPs on lo

OURS = 200


def pa(address: str, protocol: int = OURS) -> PresentAddress:
    return PresentAddress(address, protocol)


@pytest.mark.parametrize(
    ("desired", "present", "expected"),
    [
        ([], [], VipPlan()),
        # loopback's own addresses are never ours
        ([], [pa("127.0.0.1/8", 1), pa("::1/128", 1)], VipPlan()),
        (["192.0.2.1"], [pa("127.0.0.1/8", 1)], VipPlan(add=("192.0.2.1/32",))),
        (["192.0.2.1/32"], [pa("192.0.2.1/32")], VipPlan()),
        # adopted: already there without our mark, left alone while desired ...
        (["192.0.2.1/32"], [pa("192.0.2.1/32", 0)], VipPlan()),
        # ... and not removed when it stops being desired
        ([], [pa("192.0.2.1/32", 0)], VipPlan()),
        # ours, no longer desired
        (
            [],
            [pa("192.0.2.1/32"), pa("2001:db8::1/128")],
            VipPlan(delete=("192.0.2.1/32", "2001:db8::1/128")),
        ),
        # another protocol's mark is not ours
        ([], [pa("192.0.2.1/32", 201)], VipPlan()),
        # a different prefix length is a different address on lo
        (["192.0.2.1/24"], [pa("192.0.2.1/32")], VipPlan(add=("192.0.2.1/24",), delete=("192.0.2.1/32",))),
        (["2001:DB8:0::1"], [], VipPlan(add=("2001:db8::1/128",))),
    ],
)
def test_plan_vips(desired: list[str], present: list[PresentAddress], expected: VipPlan) -> None:
    assert plan_vips(desired, present, OURS) == expected


# ---------------------------------------------------------------------------------------
# IPVS services


def vs(*reals: tuple[str, int] | tuple[str, int, int], fwd: str = "nat", sched: str = "mh") -> VirtualService:
    return VirtualService("udp", "203.0.113.1", 51820, sched, fwd, tuple(RealServer(*x) for x in reals))


def ops(
    desired: list[VirtualService], current: list[VirtualService], flags: tuple[int, int] = (0, 0)
) -> list[str]:
    plan = plan_services(
        [ServiceEntry(s, flags[0]) for s in desired], [ServiceEntry(s, flags[1]) for s in current]
    )
    return [str(op) for op in plan]


S = "udp 203.0.113.1:51820"


@pytest.mark.parametrize(
    ("desired", "current", "expected"),
    [
        ([], [], []),
        ([vs(("10.0.0.1", 51820))], [vs(("10.0.0.1", 51820))], []),
        # real server order does not matter
        ([vs(("10.0.0.2", 1), ("10.0.0.1", 1))], [vs(("10.0.0.1", 1), ("10.0.0.2", 1))], []),
        # new service: the service first, then its reals
        (
            [vs(("10.0.0.2", 1), ("10.0.0.1", 1))],
            [],
            [
                f"add-service {S} mh flags=0x0",
                f"add-real {S} 10.0.0.1:1 w1 nat",
                f"add-real {S} 10.0.0.2:1 w1 nat",
            ],
        ),
        # a membership change: additions before removals
        (
            [vs(("10.0.0.1", 1), ("10.0.0.3", 1))],
            [vs(("10.0.0.1", 1), ("10.0.0.2", 1))],
            [f"add-real {S} 10.0.0.3:1 w1 nat", f"del-real {S} 10.0.0.2:1 w1 nat"],
        ),
        # quiescent drain = weight 0, an edit in place
        (
            [vs(("10.0.0.1", 1), ("10.0.0.2", 1, 0))],
            [vs(("10.0.0.1", 1), ("10.0.0.2", 1))],
            [f"edit-real {S} 10.0.0.2:1 w0 nat"],
        ),
        # a different port is a different real server
        (
            [vs(("10.0.0.1", 2))],
            [vs(("10.0.0.1", 1))],
            [f"add-real {S} 10.0.0.1:2 w1 nat", f"del-real {S} 10.0.0.1:1 w1 nat"],
        ),
        # scheduler change: edited, real servers kept
        ([vs(("10.0.0.1", 1), sched="rr")], [vs(("10.0.0.1", 1))], [f"edit-service {S} rr flags=0x0"]),
        # forwarding method change: every real server edited
        (
            [vs(("10.0.0.1", 51820), fwd="dr")],
            [vs(("10.0.0.1", 51820))],
            [f"edit-real {S} 10.0.0.1:51820 w1 dr"],
        ),
        # dr with port 0 means the service's port
        ([vs(("10.0.0.1", 0), fwd="dr")], [vs(("10.0.0.1", 51820), fwd="dr")], []),
        # ours, no longer desired
        ([], [vs(("10.0.0.1", 1))], [f"del-service {S} mh flags=0x0"]),
    ],
)
def test_plan_services(
    desired: list[VirtualService], current: list[VirtualService], expected: list[str]
) -> None:
    assert ops(desired, current) == expected


def test_plan_services_flag_change_is_an_edit() -> None:
    assert ops([vs()], [vs()], flags=(0x10, 0)) == [f"edit-service {S} mh flags=0x10"]


@pytest.mark.parametrize(
    ("service", "error"),
    [
        (VirtualService("sctp", "203.0.113.1", 1), "protocol"),
        (VirtualService("udp", "203.0.113.1", 1, forward="masq"), "forward"),
        (VirtualService("udp", "203.0.113.1", 0), "port 0"),
        (vs(("10.0.0.1", 1), ("10.0.0.1", 1)), "listed twice"),
        (vs(("10.0.0.1", 1), fwd="dr"), "cannot change the port"),
        (vs(("2001:db8::1", 51820), fwd="tunnel"), "address family"),
        (vs(("10.0.0.1", 1, 70000)), "weight 70000"),
    ],
)
def test_normalize_service_rejects(service: VirtualService, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        normalize_service(service)


def test_sched_flags() -> None:
    assert sched_flags(["mh-port", "mh-fallback"]) == 0x18
    # each flag applies to its own scheduler only
    assert sched_flags(["mh-port", "sh-fallback"], "mh") == 0x10
    assert sched_flags(["mh-fallback"], "rr") == 0
    with pytest.raises(ValueError, match="mh-prot"):
        sched_flags(["mh-prot"])


# ---------------------------------------------------------------------------------------
# The rtnetlink route codec (what RouteTable sends is what it can read back)


@pytest.mark.parametrize(
    ("family", "prefix", "table", "gateways"),
    [
        (AF_INET, "203.0.113.1/32", 254, [("10.0.0.1", 1)]),
        (AF_INET, "203.0.113.0/24", 100, [("10.0.0.1", 1), ("10.0.0.2", 256), ("10.0.0.3", 7)]),
        (AF_INET, "0.0.0.0/0", 70000, [("10.0.0.1", 2), ("10.0.0.2", 1)]),  # table > 255
        (AF_INET6, "2001:db8::/64", 254, [("fd00::1", 1), ("fd00::2", 3)]),
        (AF_INET, "203.0.113.1/32", 254, []),  # a delete request
    ],
)
def test_route_codec_round_trip(
    family: int, prefix: str, table: int, gateways: list[tuple[str, int]]
) -> None:
    entry = decode_route(memoryview(encode_route(family, prefix, table, 200, gateways)))
    assert entry == RouteEntry(family, prefix, 200, table, 0, tuple(gateways))


def test_route_codec_refuses_what_the_kernel_could_not_dump_back() -> None:
    encode_route(
        AF_INET, "203.0.113.1/32", 254, 200, [(f"10.0.{i // 256}.{i % 256}", 1) for i in range(2000)]
    )
    with pytest.raises(ValueError, match="at most 2000 for IPv4"):
        encode_route(
            AF_INET, "203.0.113.1/32", 254, 200, [(f"10.0.{i // 256}.{i % 256}", 1) for i in range(2001)]
        )


@pytest.mark.parametrize(
    "key",
    [
        IpvsServiceKey(AF_INET, 17, "203.0.113.1", 51820),
        IpvsServiceKey(AF_INET6, 6, "2001:db8::1", 443),
    ],
)
def test_ipvs_codec_round_trip(key: IpvsServiceKey) -> None:
    service = decode_service(memoryview(genl(1, encode_service(key, "mh", 0x18, 0x38))))
    assert service == IpvsServiceRecord(key, "mh", 0x18)
    real = "10.0.0.7" if key.family == AF_INET else "fd00::7"
    dest = decode_dest(memoryview(genl(5, encode_dest(key, real, 1194, 0, 3))), key.family)
    assert dest == IpvsDestRecord(real, 1194, 0, 3, 0, 0, 0)


# --- flow pins (ecmp with pin_flows) ---------------------------------------------------------


def test_pins_follow_the_pool_including_drained_servers() -> None:
    from pop.config import Dataplane, load
    from pop.desired import dataplane

    prefixes = load("""
pop: {name: t1, asn: 65101, router_id: 192.0.2.1}
neighbors: [{address: 10.0.0.1, peer_as: 65000}]
prefixes: [198.51.100.1/32]
servers: [{name: a, address: 10.0.2.1}]
""").prefixes
    pool = [("10.0.2.1", 1), ("10.0.2.2", 0)]  # the second is being drained
    state = dataplane(prefixes, pool, Dataplane(mode="ecmp", pin_flows=True))
    assert [h.address for h in state.routes[0].nexthops] == ["10.0.2.1"]  # no new flows to it
    assert state.pins == ("10.0.2.1", "10.0.2.2")  # but its flows stay
    assert dataplane(prefixes, pool, Dataplane(mode="ecmp")).pins == ()


def test_pin_marks_and_the_nftables_script() -> None:
    from pop.adapters.pins import PIN_BASE, count_marks, pin_marks, render_nft

    marks = pin_marks(["10.0.2.1", "2001:db8::2", "10.0.2.3"])
    assert marks == {"10.0.2.1": PIN_BASE | 1, "2001:db8::2": PIN_BASE | 2, "10.0.2.3": PIN_BASE | 3}
    script = render_nft(["198.51.100.1/32"], {"10.0.2.1": marks["10.0.2.1"]})
    # create-then-delete makes the replacement one transaction whether or not the table existed
    assert script.startswith("table ip pop {}\ndelete table ip pop\ntable ip pop {\n")
    assert "elements = { 10.0.2.1 : 0x504f0001 }" in script
    assert "ip daddr { 198.51.100.1/32 } ct mark 0 ct mark set rt ip nexthop map @pins" in script
    assert "table ip6 pop {}\ndelete table ip6 pop\n" in script and "table ip6 pop {\n" not in script
    assert render_nft((), {}) == "table ip pop {}\ndelete table ip pop\ntable ip6 pop {}\ndelete table ip6 pop\n"
    text = ("ipv4 2 tcp 6 431999 ESTABLISHED src=10.72.0.2 dst=203.0.113.20 mark=1347354625 use=1\n"
            "ipv4 2 udp 17 29 src=10.72.0.2 dst=203.0.113.20 mark=0 use=1\n")
    assert count_marks(text, [PIN_BASE | 1, PIN_BASE | 2]) == {PIN_BASE | 1: 1, PIN_BASE | 2: 0}
