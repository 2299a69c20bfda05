"""The handshake check against the kernel's WireGuard module, in the microVM (this host has none).

Runs tests/kernel/inner/test_wg_kernel_inner.py in Debian's kernel with the `wireguard`
module loaded: the wireguard-go test suite's expectations, against the kernel responder.
"""

from __future__ import annotations

from tests.kernel.suite import InnerRun, InnerSuite

INNER = InnerSuite("tests/kernel/inner/test_wg_kernel_inner.py", modules=("wireguard",), tests=12, seconds=45)


def test_handshake_check_against_kernel_wireguard(inner_run: InnerRun) -> None:
    inner_run.check(INNER)

