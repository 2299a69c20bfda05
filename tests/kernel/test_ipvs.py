"""The IPVS adapter against real IPVS in the microVM (this host's kernel has none), and the
error it gives on a kernel without IPVS (this host)."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest

from lab.microvm import KernelCache, run_pytest_in_vm
from pop.adapters.ipvs import IpvsTable
from pop.adapters.routes import DataplaneError

INNER = "tests/kernel/inner/test_ipvs_inner.py"


def test_ipvs_adapter_on_debian_kernel(microvm: KernelCache) -> None:
    # Emulated (TCG) guest: the inner suite takes about 5-6 minutes.
    result = run_pytest_in_vm([INNER], modules=["ip_vs", "ip_vs_mh", "ip_vs_rr"], timeout=1200)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.output}\n{result.console[-2000:]}"
    assert re.search(r"\b5 passed\b", result.output) and "skipped" not in result.output, result.output


@pytest.mark.skipif(Path("/proc/net/ip_vs").exists(), reason="this kernel has IPVS loaded")
@pytest.mark.skipif(os.environ.get("POP_IN_MICROVM") == "1", reason="host-side test")
def test_without_ipvs_the_adapter_raises_a_dataplane_error() -> None:
    async def scenario() -> None:
        async with IpvsTable(owned=["203.0.113.0/24"]) as ipvs:
            await ipvs.read()

    with pytest.raises(DataplaneError, match=r"no IPVS in this kernel \(module ip_vs not loaded\)"):
        asyncio.run(scenario())
