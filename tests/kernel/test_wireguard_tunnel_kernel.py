"""Through the tunnel against the kernel's WireGuard module, in the microVM (this host has none).

Runs tests/kernel/inner/test_wg_tunnel_kernel_inner.py in Debian's kernel with the
`wireguard` module loaded: the wireguard-go tunnel tests' expectations, against the kernel.
"""

from __future__ import annotations

import re

from lab.microvm import KernelCache, run_pytest_in_vm


def test_tunnel_check_against_kernel_wireguard(microvm: KernelCache) -> None:
    result = run_pytest_in_vm(["tests/kernel/inner/test_wg_tunnel_kernel_inner.py"], modules=["wireguard"],
                              timeout=600)
    assert result.returncode == 0, (
        f"exit {result.returncode}\n{result.output}\n--- console ---\n{result.console[-3000:]}"
    )
    passed = re.search(r"\b(\d+) passed\b", result.output)
    assert passed and int(passed.group(1)) >= 8, result.output
    assert "skipped" not in result.output, result.output
    print(f"microVM run {result.seconds:.0f} s: {passed.group(0)} against kernel WireGuard")
