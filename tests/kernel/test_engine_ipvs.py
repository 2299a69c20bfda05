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

import re

from lab.microvm import KernelCache, run_pytest_in_vm

INNER = "tests/kernel/inner/test_engine_ipvs_inner.py"


def test_engine_drives_ipvs_with_real_traffic(microvm: KernelCache) -> None:
    # Emulated (TCG) guest: 1.5-2.5 minutes, a third of it imports and IPVS expiring the drained server's
    # flows, 12 s the long dwell.
    result = run_pytest_in_vm([INNER], modules=["ip_vs", "ip_vs_mh"], timeout=900, extra_args=["-s"])
    assert result.returncode == 0, f"exit {result.returncode}\n{result.output}\n{result.console[-2000:]}"
    assert re.search(r"\b6 passed\b", result.output) and "skipped" not in result.output, result.output
    for line in result.output.splitlines():
        if line.startswith("MEASURED"):
            print(line)
    print(f"microVM run {result.seconds:.0f}s (inner suite {result.command_seconds:.0f}s)")
