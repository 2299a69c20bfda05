"""VipSet on a real `lo` in a namespace of its own: add, adopt, remove only what is ours."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable

import pytest

from lab.netns import Netns
from pop.adapters.vip import VipSet


def ip(*argv: str) -> str:
    return subprocess.run(["ip", *argv], check=True, capture_output=True, text=True, timeout=30).stdout


@pytest.fixture
def ns(netns_factory: Callable[[str], Netns]) -> str:
    return netns_factory("vip").name


def addresses(ns: str) -> set[str]:
    out = ip("-n", ns, "-o", "addr", "show", "dev", "lo")
    return {line.split()[3] for line in out.splitlines()}


def test_vips_added_adopted_and_removed(ns: str) -> None:
    ip("-n", ns, "addr", "add", "198.51.100.9/32", "dev", "lo")  # an operator's, unmarked

    async def scenario() -> None:
        async with VipSet(netns=ns) as vips:
            await vips.set(["192.0.2.1", "2001:db8::1/128", "198.51.100.9/32"])
            assert await vips.read() == ("192.0.2.1/32", "2001:db8::1/128")
        assert {"192.0.2.1/32", "2001:db8::1/128", "198.51.100.9/32", "127.0.0.1/8"} <= addresses(ns)

        # A restarted adapter recognises its addresses by their mark and changes nothing.
        monitor = await asyncio.create_subprocess_exec(
            "ip", "-n", ns, "monitor", "address", stdout=asyncio.subprocess.PIPE
        )
        await asyncio.sleep(0.3)
        async with VipSet(netns=ns) as vips:
            await vips.set(["2001:db8::1", "192.0.2.1/32", "198.51.100.9"])
        await asyncio.sleep(0.3)
        monitor.terminate()
        out, _ = await monitor.communicate()
        assert out == b""

        # The same monitor sees a real change (so its silence above means something).
        monitor = await asyncio.create_subprocess_exec(
            "ip", "-n", ns, "monitor", "address", stdout=asyncio.subprocess.PIPE
        )
        await asyncio.sleep(0.3)
        async with VipSet(netns=ns) as vips:
            await vips.set([])
            assert await vips.read() == ()
        await asyncio.sleep(0.3)
        monitor.terminate()
        out, _ = await monitor.communicate()
        assert b"Deleted" in out and b"192.0.2.1/32" in out, out
        # the unmarked address and loopback's own stay
        assert addresses(ns) == {"127.0.0.1/8", "::1/128", "198.51.100.9/32"}

    asyncio.run(scenario())


def test_foreign_protocol_mark_is_left_alone(ns: str) -> None:
    async def scenario() -> None:
        async with VipSet(netns=ns, protocol=201) as other:
            await other.set(["192.0.2.7"])
        async with VipSet(netns=ns) as vips:
            await vips.set([])
            assert await vips.read() == ()
        assert "192.0.2.7/32" in addresses(ns)

    asyncio.run(scenario())
