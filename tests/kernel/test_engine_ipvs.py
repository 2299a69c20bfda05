"""The engine drives a real IPVS end to end, inside the microVM (this host's kernel has no
IPVS): real L4 checks, the real KernelDataplane, real UDP and TCP flows from a client
namespace through the director into server namespaces. The scenario is in
tests/kernel/inner/test_engine_ipvs_inner.py: every server takes new flows; a dead server
leaves IPVS; a drained server keeps its flows and leaves once they are gone; an undrained and a
restarted server come back; after an operator drain (withdraw) a server that dies during the
`withdraw_dwell` leaves IPVS at once while the others serve until the teardown (issue 8, defect
13); the withdraw comes before the data plane is torn down, `withdraw_dwell` later. BGP goes to
pop's real ExaBGP speaker on a fake ExaBGP that acknowledges every command."""

from __future__ import annotations

from tests.kernel.suite import InnerRun, InnerSuite

INNER = InnerSuite("tests/kernel/inner/test_engine_ipvs_inner.py", modules=("ip_vs", "ip_vs_mh"), tests=6, seconds=70)


def test_engine_drives_ipvs_with_real_traffic(inner_run: InnerRun) -> None:
    inner_run.check(INNER)

