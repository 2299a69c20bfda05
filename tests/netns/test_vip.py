"""VipSet on a real `lo` in a namespace of its own: add, adopt, remove only what is ours."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from lab.netns import Netns
from pop import desired
from pop.adapters.dataplane import KernelDataplane
from pop.adapters.vip import VipSet
from pop.config import Attributes, Dataplane, Prefix
from tests.netns.test_ecmp import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR, netlink_events


@pytest.fixture
def ns(netns_factory: Callable[[str], Netns]) -> Netns:
    return netns_factory("vip")


def addresses(ns: Netns) -> set[str]:
    out = ns.run("ip", "-o", "addr", "show", "dev", "lo").stdout
    return {line.split()[3] for line in out.splitlines()}


def test_vips_added_adopted_and_removed(ns: Netns) -> None:
    ns.run("ip", "addr", "add", "198.51.100.9/32", "dev", "lo")  # an operator's, unmarked

    async def scenario() -> None:
        async with VipSet(netns=ns.name) as vips:
            await vips.set(["192.0.2.1", "2001:db8::1/128", "198.51.100.9/32"])
            assert await vips.read() == ("192.0.2.1/32", "2001:db8::1/128")
        assert {"192.0.2.1/32", "2001:db8::1/128", "198.51.100.9/32", "127.0.0.1/8"} <= addresses(ns)

        # A restarted adapter recognises its addresses by their mark and changes nothing.
        with netlink_events(ns, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR) as events:
            async with VipSet(netns=ns.name) as vips:
                await vips.set(["2001:db8::1", "192.0.2.1/32", "198.51.100.9"])
        assert events == []

        with netlink_events(ns, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR) as events:
            async with VipSet(netns=ns.name) as vips:
                await vips.set([])
                assert await vips.read() == ()
        assert sorted(events) == ["DELADDR", "DELADDR"], events
        # the unmarked address and loopback's own stay
        assert addresses(ns) == {"127.0.0.1/8", "::1/128", "198.51.100.9/32"}

    asyncio.run(scenario())


def test_foreign_protocol_mark_is_left_alone(ns: Netns) -> None:
    async def scenario() -> None:
        async with VipSet(netns=ns.name, protocol=201) as other:
            await other.set(["192.0.2.7"])
        async with VipSet(netns=ns.name) as vips:
            await vips.set([])
            assert await vips.read() == ()
        assert "192.0.2.7/32" in addresses(ns)

    asyncio.run(scenario())


def test_a_vip_deleted_behind_pops_back_is_put_back_and_reported(ns: Netns) -> None:
    config = Dataplane(mode="none", vip=True)
    prefixes = (Prefix("192.0.2.1/32", "self", Attributes(), Attributes()),)
    state = desired.dataplane(prefixes, [("10.0.0.2", 1)], config)

    async def scenario() -> None:
        dp = KernelDataplane(config, prefixes, netns=ns.name)
        try:
            assert await dp.set(state) == ("vip add 192.0.2.1/32",)
            assert await dp.set(state) == ()
            ns.run("ip", "addr", "del", "192.0.2.1/32", "dev", "lo")
            assert await dp.set(state, verify=True) == ("vip add 192.0.2.1/32",)
            assert "192.0.2.1/32" in addresses(ns)
            assert await dp.set(state, verify=True) == ()
            assert await dp.diagnostics() == {"mode": "none"}
        finally:
            await dp.close()

    asyncio.run(scenario())
