"""Reloads in ipvs mode move nothing that stays, inside the microVM (this host's kernel has no
IPVS): (a) nothing changed, (b) a server added, (c) a server removed, (d) a prefix added send
no announce or withdraw for the unchanged prefix, keep every open flow of a remaining server on
that server, and give a new prefix its IPVS services before its announce. The scenario, and
why its BGP side is pop's real speaker on a fake ExaBGP rather than real FRR + ExaBGP, are in
tests/kernel/inner/test_reload_ipvs_inner.py."""

from __future__ import annotations

import re

from lab.microvm import KernelCache, run_pytest_in_vm

INNER = "tests/kernel/inner/test_reload_ipvs_inner.py"


def test_reloads_in_ipvs_mode_send_nothing_for_the_unchanged_prefix_and_keep_open_flows(microvm: KernelCache) -> None:
    # Emulated (TCG) guest: about 1-1.5 minutes, half of it boot and imports.
    result = run_pytest_in_vm([INNER], modules=["ip_vs", "ip_vs_mh"], timeout=600, extra_args=["-s"])
    assert result.returncode == 0, f"exit {result.returncode}\n{result.output}\n{result.console[-2000:]}"
    assert re.search(r"\b5 passed\b", result.output) and "skipped" not in result.output, result.output
    print(f"microVM run {result.seconds:.0f}s (inner suite {result.command_seconds:.0f}s)")
