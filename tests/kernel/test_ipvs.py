"""The IPVS adapter against real IPVS in the microVM (this host's kernel has none), and the
error it gives on a kernel without IPVS (this host)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from pop.adapters.ipvs import IpvsTable
from pop.adapters.routes import DataplaneError
from tests.kernel.suite import InnerRun, InnerSuite

INNER = InnerSuite("tests/kernel/inner/test_ipvs_inner.py", modules=("ip_vs", "ip_vs_mh", "ip_vs_rr"), tests=5, seconds=150)


def test_ipvs_adapter_on_debian_kernel(inner_run: InnerRun) -> None:
    inner_run.check(INNER)


@pytest.mark.skipif(Path("/proc/net/ip_vs").exists(), reason="this kernel has IPVS loaded")
@pytest.mark.skipif(os.environ.get("POP_IN_MICROVM") == "1", reason="host-side test")
def test_without_ipvs_the_adapter_raises_a_dataplane_error() -> None:
    async def scenario() -> None:
        async with IpvsTable(owned=["203.0.113.0/24"]) as ipvs:
            await ipvs.read()

    with pytest.raises(DataplaneError, match=r"no IPVS in this kernel \(module ip_vs not loaded\)"):
        asyncio.run(scenario())
