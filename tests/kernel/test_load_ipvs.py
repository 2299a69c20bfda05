"""The load signal reaches the real IPVS, inside the microVM (this host's kernel has no IPVS):
CPU burnt in one server lowers its real-server weight as the step table says, and it comes
back after. The scenario is in tests/kernel/inner/test_load_ipvs_inner.py."""

from __future__ import annotations

from tests.kernel.suite import InnerRun, InnerSuite

INNER = InnerSuite("tests/kernel/inner/test_load_ipvs_inner.py", modules=("ip_vs", "ip_vs_mh"), tests=2, seconds=45)


def test_the_load_signal_sets_real_ipvs_weights(inner_run: InnerRun) -> None:
    inner_run.check(INNER)

