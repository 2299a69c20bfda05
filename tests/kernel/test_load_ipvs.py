"""The load signal reaches the real IPVS, inside the microVM (this host's kernel has no IPVS):
CPU burnt in one server lowers its real-server weight as the step table says, and it comes
back after. The scenario is in tests/kernel/inner/test_load_ipvs_inner.py."""

from __future__ import annotations

import re

from lab.microvm import KernelCache, run_pytest_in_vm

INNER = "tests/kernel/inner/test_load_ipvs_inner.py"


def test_the_load_signal_sets_real_ipvs_weights(microvm: KernelCache) -> None:
    # Emulated (TCG) guest: about 1.5 minutes, most of it boot, imports and the engine's start.
    result = run_pytest_in_vm([INNER], modules=["ip_vs", "ip_vs_mh"], timeout=900, extra_args=["-s"])
    passed = result.returncode == 0 and re.search(r"\b2 passed\b", result.output) and "skipped" not in result.output
    assert passed, f"exit {result.returncode}\n{result.output}\n{result.console[-2000:]}"
    measured = [line for line in result.output.splitlines() if line.startswith("MEASURED")]
    print("\n".join([*measured, f"microVM run {result.seconds:.0f}s (inner suite {result.command_seconds:.0f}s)"]))
