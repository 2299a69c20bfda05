"""Reloads in ipvs mode move nothing that stays: runs *inside* the microVM (Debian's kernel, real
IPVS), started by tests/kernel/test_reload_ipvs.py. Issue 8, "What to build" item 4, ipvs mode.

The setup of tests/kernel/inner/test_engine_ipvs_inner.py (the real Engine, KernelDataplane and
L4 checks in the director namespace; real UDP and TCP flows from 64 client addresses through
IPVS NAT), with a fourth server namespace s3 that answers from the start but is not configured
yet. The engine is reloaded the way SIGHUP does it (pop.service: `Engine.reload` with the new
configuration and its checks) with (a) nothing changed, (b) s3 added, (c) s1 removed, (d) a
second VIP added. After each, for the first VIP: no announce or withdraw command at all, every
open UDP and TCP flow of a server that stays still reaches that same server (IPVS keeps the
connections of the reals that remain), and IPVS holds what the new configuration says.

BGP here is pop's real ExaBgpSpeaker writing to a fake ExaBGP that acknowledges every command
(`FakeExaBgp`): the commands counted are exactly what ExaBGP would be told to send its peers.
Not real FRR + ExaBGP in the guest: both are Python/C daemons whose start-up alone costs tens of
seconds in the emulated guest (one CPU, 20-40x slower), for nothing ipvs-specific; the BGP side
of a reload is independent of the data-plane mode, and is proven with real ExaBGP and FRR
(UPDATEs counted at the router) in ecmp mode by tests/netns/test_lab_reload.py. What only the
microVM can show is the kernel side, and that is checked against the real IPVS.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Sequence

import pytest

from pop.engine import Engine
from tests.kernel.inner.test_engine_ipvs_inner import (
    ADDRESS,
    NAMES,
    VIP,
    Lab,
    ask,
    new_flows,
    open_flows,
    pop_config,
    running_lab,
    spread,
)
from tests.kernel.inner.test_ipvs_inner import CLIENT_IPS

pytestmark = pytest.mark.kernel

VIP2 = "203.0.113.31"
ALL = (*NAMES, "s3")
KEPT = {"udp": (socket.SOCK_DGRAM, 40000), "tcp": (socket.SOCK_STREAM, 41000)}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    # IPVS's default UDP idle timeout (300 s): the kept UDP flows must outlive the scenario
    with running_lab(tmp_path_factory.mktemp("reload-ipvs"), pop_config(), names=ALL, udp_timeout=300) as lab:
        yield lab


def probe_counts(engine: Engine) -> dict[tuple[str, str], int]:
    return {(server, tier): state.successes + state.failures
            for server, tiers in engine.tiers.items() for tier, state in tiers.items()}


def reload(lab: Lab, servers: Sequence[str], vips: Sequence[str], settled: Callable[[], bool]) -> int:
    """Reload as SIGHUP does; wait until IPVS is `settled`, then until every configured server
    has been probed twice more and the applier has made a pass since (a "nothing sent" from an
    applier that never ran after the reload would prove nothing). Returns how many announce or
    withdraw commands for the first VIP went to ExaBGP meanwhile."""
    since = len(lab.engine.exabgp.commands)
    before = lab.engine.call(probe_counts)
    passes = lab.engine.speaker.passes
    lab.engine.reload(pop_config(servers, vips))
    lab.wait_for("IPVS as the new configuration says", settled)
    lab.wait_for("two probe rounds of every server and an applier pass after the reload",
                 lambda: lab.engine.speaker.passes > passes and all(
                     count >= before.get(key, 0) + 2 for key, count in lab.engine.call(probe_counts).items()))
    return lab.engine.exabgp.count(f"{VIP}/32", since)


def reals_at_weight_1(lab: Lab, vip: str, servers: Sequence[str]) -> Callable[[], bool]:
    """A probe: both of `vip`'s services have exactly `servers`, each at weight 1."""
    def settled() -> bool:
        table = lab.ipvs(vip)
        return set(table) == {"udp", "tcp"} and all(
            {a: r[0] for a, r in reals.items()} == {ADDRESS[n]: 1 for n in servers} for reals in table.values())
    return settled


def assert_kept_flows_stay(lab: Lab, remaining: Sequence[str]) -> None:
    """Every kept flow that reached a server in `remaining` still reaches that server."""
    checked = 0
    for proto in KEPT:
        now = ask({key: sock for key, sock in lab.kept[proto].items() if lab.reached[key] in remaining})
        moved = {key: (lab.reached[key], server) for key, server in now.items() if server != lab.reached[key]}
        assert not moved, f"{proto} flows moved or lost (was, now): {moved}"
        checked += len(now)
    assert checked >= len(CLIENT_IPS), f"only {checked} kept flows on {remaining}"


# --- the scenario, in order -------------------------------------------------------------------


def test_announced_once_with_open_flows_on_every_server(lab: Lab) -> None:
    lab.wait_for("announcement", lab.engine.speaker.announced, timeout=120)
    lab.wait_for("s0-s2 in both services", reals_at_weight_1(lab, VIP, NAMES))
    # the counter counts: the first announce is one command (one neighbor)
    assert lab.engine.exabgp.count(f"{VIP}/32") == 1, lab.engine.exabgp.commands
    for proto, (kind, port) in KEPT.items():
        lab.kept[proto] = open_flows(lab.client, kind, port)
        reached = ask(lab.kept[proto])
        lab.reached |= reached
        counts = spread(reached)
        assert None not in counts and all(counts[n] >= 7 for n in NAMES), counts


def test_a_reload_with_nothing_changed_sends_nothing_and_moves_no_flow(lab: Lab) -> None:
    assert reload(lab, NAMES, [VIP], reals_at_weight_1(lab, VIP, NAMES)) == 0, lab.engine.exabgp.commands
    assert_kept_flows_stay(lab, NAMES)


def test_a_server_added_takes_new_flows_and_moves_no_open_one(lab: Lab) -> None:
    assert reload(lab, ALL, [VIP], reals_at_weight_1(lab, VIP, ALL)) == 0, lab.engine.exabgp.commands
    assert_kept_flows_stay(lab, NAMES)
    counts = spread(new_flows(lab.client, socket.SOCK_DGRAM, 42000))
    assert None not in counts and counts["s3"] >= 5, counts


def test_a_server_removed_leaves_ipvs_and_the_others_keep_their_flows(lab: Lab) -> None:
    remaining = ("s0", "s2", "s3")
    assert reload(lab, remaining, [VIP], reals_at_weight_1(lab, VIP, remaining)) == 0, lab.engine.exabgp.commands
    assert_kept_flows_stay(lab, remaining)
    counts = spread(new_flows(lab.client, socket.SOCK_STREAM, 43000))  # s1 still answers: only IPVS keeps it out
    assert None not in counts and counts["s1"] == 0, counts


def test_a_prefix_added_gets_its_services_before_its_announce_and_moves_nothing_else(lab: Lab) -> None:
    remaining = ("s0", "s2", "s3")
    since = len(lab.engine.exabgp.commands)
    assert reload(lab, remaining, [VIP, VIP2], reals_at_weight_1(lab, VIP2, remaining)) == 0, lab.engine.exabgp.commands
    # the witness in front of the speaker saw VIP2's VIP and services in the kernel at its announce
    announced = [c for c in lab.engine.exabgp.commands[since:] if f" route {VIP2}/32 " in c]
    assert len(announced) == 1 and " announce " in announced[0], announced
    assert_kept_flows_stay(lab, remaining)
    assert reals_at_weight_1(lab, VIP, remaining)()
    for kind, port in ((socket.SOCK_DGRAM, 44000), (socket.SOCK_STREAM, 45000)):
        counts = spread(new_flows(lab.client, kind, port, VIP2))
        assert None not in counts and counts["s1"] == 0 and all(counts[n] >= 5 for n in remaining), counts
