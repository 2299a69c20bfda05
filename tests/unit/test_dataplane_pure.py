"""Pure reconciliation plans of the data-plane adapters: desired state x read-back -> plan."""

from __future__ import annotations

import pytest

from pop.adapters.routes import RoutePlan, normalize_route, plan_routes
from pop.adapters.vip import PresentAddress, VipPlan, plan_vips
from pop.desired import EcmpRoute, NextHop


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
        ([r(V, A, B)], [], RoutePlan(replace=(r(V, A, B),))),
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
            RoutePlan(replace=(r("198.51.100.0/24", A), r(V, A, C)), delete=(r("192.0.2.0/24", B),)),
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
