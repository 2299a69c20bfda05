"""Through the tunnel against the kernel's WireGuard module, in the microVM (this host has none).

Runs tests/kernel/inner/test_wg_tunnel_kernel_inner.py in Debian's kernel with the
`wireguard` module loaded: the wireguard-go tunnel tests' expectations, against the kernel.
"""

from __future__ import annotations

from tests.kernel.suite import InnerRun, InnerSuite

INNER = InnerSuite("tests/kernel/inner/test_wg_tunnel_kernel_inner.py", modules=("wireguard",), tests=8, seconds=40)


def test_tunnel_check_against_kernel_wireguard(inner_run: InnerRun) -> None:
    inner_run.check(INNER)

