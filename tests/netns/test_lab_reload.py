"""SIGHUP reloads of the lab's ECMP PoP (pop1: flows pinned to their servers), counted at the
router: a reload sends no BGP UPDATE for a prefix it does not change, and open flows stay on
their servers. IPVS mode gets the same reloads in the microVM (tests/kernel).

Each step edits pop1's pop.yaml, sends SIGHUP to `pop run` and waits for the engine's
"reloaded" event; then it compares r1's UPDATE counter for pop1's session (FRR's
messageStats), r1's kernel route for the anycast prefix, pop1's own multipath route, and
where each held connection from client1 is answered.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import yaml

from lab.runner import Lab
from tests.netns.test_lab_runner import ANYCAST, client_to_pop1, fresh, lab, needs

__all__ = ["fresh", "lab", "needs"]  # the shared lab fixtures, one lab for this module

NEW_PREFIX = "198.51.100.2/32"


def reloads(node: Any) -> int:
    return sum(1 for e in node.status()["events"] if e["to"] == "reloaded")


def reload(lab: Lab, change: Callable[[dict[str, Any]], None]) -> float:
    """Edit pop1's YAML, SIGHUP `pop run`, return once the engine has taken it."""
    node = lab.pop("pop1")
    document = yaml.safe_load(node.config_path.read_text())
    change(document)
    node.config_path.write_text(yaml.safe_dump(document, sort_keys=False))
    before = reloads(node)
    assert node.proc is not None
    node.proc.send_signal(signal.SIGHUP)
    node.wait_status(lambda s: sum(1 for e in s["events"] if e["to"] == "reloaded") > before, timeout=15)
    return time.monotonic()


def test_reloads_send_no_update_for_unchanged_prefixes_and_keep_open_flows(fresh: Lab) -> None:
    lab = fresh
    node, r1 = lab.pop("pop1"), lab.router("r1")
    peer = lab.pop_address("r1", "pop1")
    vpn11, vpn12 = lab.spec.vpns["vpn11"].address, lab.spec.vpns["vpn12"].address
    original = node.config_path.read_text()
    client_to_pop1(lab)
    held = lab.hold("client1", 24)
    try:
        before = [lab.where(sock) for sock in held]
        assert set(before) == {"vpn11", "vpn12"}
        with lab.watch("r1") as at_r1, lab.watch("pop1") as at_pop1:
            start = time.monotonic()
            updates = r1.updates_received(peer)

            # (a) nothing changed
            reload(lab, lambda doc: None)
            time.sleep(1.0)  # room for a late UPDATE to arrive
            assert r1.updates_received(peer) == updates, "(a) an unchanged reload sent UPDATEs"
            assert [lab.where(sock) for sock in held] == before

            # (c) a server removed: it leaves pop1's route, the prefix's attributes stay
            done = reload(lab, lambda doc: doc["servers"].pop())
            at_pop1.wait_for(lambda h: h == {vpn11}, timeout=10, since=done - 1.0)
            time.sleep(1.0)
            assert r1.updates_received(peer) == updates, "(c) removing a server sent UPDATEs"
            after = [lab.where(sock) for sock in held]
            assert [a for a, b in zip(after, before, strict=True) if b == "vpn11"] == \
                [b for b in before if b == "vpn11"], "(c) flows of the remaining server moved"

            # (b) the server added back: it rises and rejoins, still no UPDATE
            survivors = [sock for sock, b in zip(held, before, strict=True) if b == "vpn11"]
            done = reload(lab, lambda doc: doc["servers"].append(
                yaml.safe_load(original)["servers"][1]))
            at_pop1.wait_for(lambda h: h == {vpn11, vpn12}, timeout=15, since=done - 1.0)
            time.sleep(1.0)
            assert r1.updates_received(peer) == updates, "(b) adding a server sent UPDATEs"
            assert {lab.where(sock) for sock in survivors} == {"vpn11"}, "(b) open flows moved"

            # (d) a prefix added: UPDATEs for it alone, the anycast route untouched
            done = reload(lab, lambda doc: doc["prefixes"].append({"prefix": NEW_PREFIX}))
            deadline = time.monotonic() + 10
            while peer not in r1.kernel_nexthops(NEW_PREFIX):
                assert time.monotonic() < deadline, f"(d) {NEW_PREFIX} never reached r1"
                time.sleep(0.1)
            assert r1.updates_received(peer) > updates
            assert {lab.where(sock) for sock in survivors} == {"vpn11"}, "(d) open flows moved"
            status = node.status()
            assert status["state"] == "announced" and status["apply"]["ok"], status["apply"]
            assert {r["prefix"] for r in status["dataplane"]["routes"]} == {ANYCAST, NEW_PREFIX}

            # through every step, r1's route for the anycast prefix kept pop1
            assert all(peer in e.nexthops for e in at_r1.events if e.timestamp >= start), at_r1.events
    finally:
        for sock in held:
            sock.close()
        node.config_path.write_text(original)
        assert node.proc is not None
        node.proc.send_signal(signal.SIGHUP)
        node.wait_status(lambda s: {r["prefix"] for r in s["dataplane"]["routes"]} == {ANYCAST}, timeout=15)
