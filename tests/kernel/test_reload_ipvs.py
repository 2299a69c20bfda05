"""Reloads in ipvs mode move nothing that stays, inside the microVM (this host's kernel has no
IPVS): (a) nothing changed, (b) a server added, (c) a server removed, (d) a prefix added send
no announce or withdraw for the unchanged prefix, keep every open flow of a remaining server on
that server, and give a new prefix its IPVS services before its announce. The scenario, and
why its BGP side is pop's real speaker on a fake ExaBGP rather than real FRR + ExaBGP, are in
tests/kernel/inner/test_reload_ipvs_inner.py."""

from __future__ import annotations

from tests.kernel.suite import InnerRun, InnerSuite

INNER = InnerSuite("tests/kernel/inner/test_reload_ipvs_inner.py", modules=("ip_vs", "ip_vs_mh"), tests=5, seconds=30)


def test_reloads_in_ipvs_mode_send_nothing_for_the_unchanged_prefix_and_keep_open_flows(inner_run: InnerRun) -> None:
    inner_run.check(INNER)

