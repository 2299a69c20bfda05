"""The lab of containerlab.yml in namespaces, with every fault kind, against the real daemons.

One lab (3 FRR routers, 3 PoPs running `pop run`, 6 VPN servers with wireguard-go, a client
and 3 probe agents) is shared by the module; after each test every fault is undone and the lab
must converge again before the next test starts. Assertions are made where traffic is really
steered (the routers' kernel tables, through rtnetlink) and on the data path (which PoP
answers the client's TCP connection to the anycast address).

    client1, probe2 - r1 (AS65000) ----- r2 (AS65010) - probe1
                      |      \\        /     |
                    pop1       pop3 --      pop2       (each PoP with two VPN servers)
    r1 and r2 - r3 (AS65020) - probe3                  (a transit without PoPs)

The first two tests drive the CLI (`python -m lab up/status/fault/down`) on their own lab and
prove that `down` leaves nothing behind, after a clean run and after the supervisor was killed.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.faults import FaultError
from lab.frr import BGPD, ZEBRA
from lab.netns import Netns
from lab.runner import REPO, Lab, new_prefix
from lab.state import lab_resources, pid_alive, read_state, sweep
from pop import config as pop_config

TOPOLOGY = REPO / "containerlab.yml"
ANYCAST = "198.51.100.1/32"


def _missing() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("wireguard-go", "wireguard-go"),
                          ("wg", "wireguard-tools"), ("vtysh", "frr"), ("ss", "iproute2")):
        if shutil.which(tool) is None:
            missing.append(f"{tool} ({package})")
    missing += [f"{path} (frr)" for path in (ZEBRA, BGPD) if not os.access(path, os.X_OK)]
    if not Path("/dev/net/tun").exists():
        missing.append("/dev/net/tun (for wireguard-go)")
    if not (Path(sys.executable).parent / "exabgp").exists():
        missing.append("exabgp in the venv (pip install -e .)")
    return missing


@pytest.fixture(scope="module")
def needs() -> None:
    if missing := _missing():
        pytest.skip("the lab needs " + ", ".join(missing))


# --- the CLI, and nothing left behind -----------------------------------------------------------


def cli(state: Path, *args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lab", "--state", str(state), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)


def lab_pids(namespaces: list[str]) -> list[int]:
    pids: list[int] = []
    for name in namespaces:
        out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False).stdout
        pids += [int(tok) for tok in out.split()]
    return pids


def traces(state_dir: Path, state: dict, pids: list[int]) -> list[str]:
    left = list(lab_resources(state["prefix"], state["wg_ifnames"]))
    left += [f"process {pid}" for pid in pids if pid_alive(pid)]
    left += [f"file {path}" for path in [state_dir] if path.exists()]
    return left


@pytest.fixture
def state_dir(needs: None, tmp_path: Path) -> Iterator[Path]:
    """The CLI lab's state directory; whatever the test did, its lab is swept afterwards.

    A supervised lab outlives the test process by design, so a test that fails before its own
    `down` would leave namespaces and daemons behind without this.
    """
    state_dir = tmp_path / "st"
    yield state_dir
    sweep(state_dir)


def test_cli_up_status_fault_down_leaves_nothing(state_dir: Path) -> None:
    up = cli(state_dir, "up")
    assert up.returncode == 0, up.stdout + up.stderr
    state = read_state(state_dir)
    assert state is not None and state["ready"] and pid_alive(state["owner_pid"])
    print(f"\nMEASURED `python -m lab up` bring-up to converged routes: {state['bringup_seconds']:.1f} s "
          f"(phases {state['phases']})")
    pids = lab_pids(state["namespaces"])
    assert len(pids) >= 2 * 2 + 3 * 2 + 6 * 2  # zebra+bgpd, pop run+ExaBGP, TCP+wireguard-go at least

    status = cli(state_dir, "status")
    assert status.returncode == 0, status.stderr
    assert "r1       198.51.100.1/32    via 10.0.1.2 (pop1), 10.0.3.2 (pop3)" in status.stdout
    assert "pop2     announced" in status.stdout
    # pop1 (ecmp) is answered by one of its servers, which status names
    assert re.search(r"client1  -> (pop3|pop1 \(server vpn1[12]\))\n", status.stdout), status.stdout
    assert re.search(r"probe1   -> pop[23]\n", status.stdout), status.stdout

    # a fault through the supervisor, with its timestamp, and its undo
    fault = cli(state_dir, "fault", "blackhole", "client1:eth1")
    assert fault.returncode == 0 and fault.stdout.startswith("fault #1 blackhole client1:eth1 at="), fault
    assert "fault #1" in cli(state_dir, "fault", "list").stdout
    assert "undone=" in cli(state_dir, "fault", "undo", "1").stdout
    bad = cli(state_dir, "fault", "server-down", "r1")
    assert bad.returncode != 0 and "neither a vpn nor a pop node" in bad.stderr

    down = cli(state_dir, "down")
    assert down.returncode == 0, down.stderr
    assert traces(state_dir, state, pids) == []


def test_down_after_the_supervisor_was_killed_leaves_nothing(state_dir: Path) -> None:
    up = cli(state_dir, "up")
    assert up.returncode == 0, up.stdout + up.stderr
    state = read_state(state_dir)
    assert state is not None
    pids = lab_pids(state["namespaces"])
    os.kill(state["owner_pid"], signal.SIGKILL)
    time.sleep(0.2)
    assert any(pid_alive(pid) for pid in pids)  # the daemons outlive a crashed supervisor ...
    assert "does not answer" in cli(state_dir, "status").stderr
    down = cli(state_dir, "down")
    assert down.returncode == 0, down.stderr
    assert traces(state_dir, state, pids) == []  # ... until `down` sweeps them by the recorded prefix


# --- the shared lab -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(needs: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab.from_file(TOPOLOGY, prefix=new_prefix("tlr"), statedir=tmp_path_factory.mktemp("lab") / "state")
    try:
        seconds = lab.up()
        print(f"\nMEASURED in-process bring-up to converged routes: {seconds:.1f} s (phases {lab.phases})")
        yield lab
    finally:
        lab.down()


@pytest.fixture
def fresh(lab: Lab, request: pytest.FixtureRequest) -> Iterator[Lab]:
    """The shared lab, converged; afterwards every fault is undone and the lab converges again."""
    lab.wait_converged(timeout=30)
    try:
        yield lab
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(lab.log_tails(30))
        lab.faults.clear()
        lab.wait_converged(timeout=40)


def hops(lab: Lab, router: str, *pops: str) -> frozenset[str]:
    return frozenset(lab.pop_address(router, pop) for pop in pops)


def other_of(pop: str) -> str:
    return {"pop1": "pop3", "pop3": "pop1"}[pop]


def test_client_reaches_a_pop_through_its_upstream(fresh: Lab) -> None:
    lab = fresh
    assert lab.router("r1").kernel_nexthops(ANYCAST) == hops(lab, "r1", "pop1", "pop3")
    assert lab.router("r2").kernel_nexthops(ANYCAST) == hops(lab, "r2", "pop2", "pop3")
    assert lab.ask("client1") in {"pop1", "pop3"}  # r1's ECMP set
    assert lab.ask("probe1") in {"pop2", "pop3"}  # r2's
    status = lab.status()
    assert {p.pop: p.state for p in status.pops} == {"pop1": "announced", "pop2": "announced", "pop3": "announced"}
    assert {r.router: {n for _, n in r.nexthops} for r in status.routes} == {"r1": {"pop1", "pop3"},
                                                                              "r2": {"pop2", "pop3"},
                                                                              "r3": {"r1", "r2"}}
    # the routers hash by address only: every node's flows land where its last one did
    assert {node: pop for node, pop, _ in status.answers} == {
        node: lab.ask(node) for node in ("client1", "probe1", "probe2", "probe3")}
    for _, pop, who in status.answers:  # pop1 (ecmp) is answered by its servers, the others themselves
        assert who in ({"vpn11", "vpn12"} if pop == "pop1" else {pop}), status.answers


def landed(lab: Lab, count: int = 40) -> collections.Counter[str | None]:
    """Which nodes answer ``count`` new TCP connections from client1 to the anycast address."""
    return collections.Counter(lab.ask_node("client1") for _ in range(count))


def client_to_pop1(lab: Lab) -> None:
    """r1 hashes by address only, so all of client1's flows go to one PoP: make it pop1."""
    lab.faults.apply("server-down", "pop3")
    lab.wait_answer("client1", lambda who: who == "pop1", timeout=10)


def test_ecmp_pop_spreads_flows_over_its_servers_and_a_failed_server_loses_them(fresh: Lab) -> None:
    lab = fresh
    assert lab.spec.pops["pop1"].config.dataplane.mode == "ecmp"
    vpn11, vpn12 = lab.spec.vpns["vpn11"].address, lab.spec.vpns["vpn12"].address
    client_to_pop1(lab)
    assert set(landed(lab)) == {"vpn11", "vpn12"}  # pop1's L4 hashing spreads one client's flows
    held = lab.hold("client1", 24)
    try:
        before = [lab.where(sock) for sock in held]
        assert set(before) == {"vpn11", "vpn12"}
        with lab.watch("pop1") as watch:
            fault = lab.faults.apply("server-down", "vpn11")  # its who-am-I keeps answering, if asked
            at = watch.wait_for(lambda h: h == {vpn12}, timeout=10, since=fault.at)
            print(f"\nMEASURED vpn11 refuses -> out of pop1's multipath route: {(at - fault.at) * 1000:.0f} ms")
            assert landed(lab) == {"vpn12": 40}  # every new flow leaves the failed server
            # vpn11's open flows are unpinned and move too: vpn12 resets them; vpn12's stay
            after = [lab.where(sock) for sock in held]
            assert after == [None if b == "vpn11" else "vpn12" for b in before], (before, after)
            assert lab.pop_status("pop1")["state"] == "degraded"  # 1 of 2 is not below the low mark
            assert lab.pop_address("r1", "pop1") in lab.router("r1").kernel_nexthops(ANYCAST)
            back = lab.faults.undo(fault)
            watch.wait_for(lambda h: h == {vpn11, vpn12}, timeout=15, since=back)
    finally:
        for sock in held:
            sock.close()
    assert set(landed(lab)) == {"vpn11", "vpn12"}


def test_a_drained_server_of_the_ecmp_pop_keeps_its_flows_and_gets_no_new_ones(fresh: Lab) -> None:
    lab = fresh
    assert lab.spec.pops["pop1"].config.dataplane.pin_flows
    vpn11, vpn12 = lab.spec.vpns["vpn11"].address, lab.spec.vpns["vpn12"].address
    client_to_pop1(lab)
    held = lab.hold("client1", 24)
    try:
        before = [lab.where(sock) for sock in held]
        assert set(before) == {"vpn11", "vpn12"}
        with lab.watch("pop1") as watch:
            since = time.monotonic()
            answer = lab.pop("pop1").post("/servers/vpn12/drain")
            watch.wait_for(lambda h: h == {vpn11}, timeout=10, since=since)
            assert answer["drain"]["state"] == "draining"
            assert landed(lab) == {"vpn11": 40}  # no new flow reaches the drained server ...
            assert [lab.where(sock) for sock in held] == before  # ... and every open one stays
            status = lab.pop_status("pop1")
            vpn12_status = next(s for s in status["servers"] if s["name"] == "vpn12")
            assert vpn12_status["drain"]["state"] == "draining"  # pinned flows are still there
            # maintenance is not ill health: the PoP keeps its healthy attributes
            assert status["state"] == "announced"
            lab.pop("pop1").post("/servers/vpn12/undrain")
            watch.wait_for(lambda h: h == {vpn11, vpn12}, timeout=10, since=time.monotonic() - 0.5)
    finally:
        lab.pop("pop1").post("/servers/vpn12/undrain")
        for sock in held:
            sock.close()
    assert set(landed(lab)) == {"vpn11", "vpn12"}


def test_server_down_moves_the_client_to_another_pop_and_back(fresh: Lab) -> None:
    lab = fresh
    first = lab.ask("client1")
    assert first in {"pop1", "pop3"}
    second = other_of(first)
    with lab.watch("r1") as watch:
        fault = lab.faults.apply("server-down", first)
        at = watch.wait_for(lambda h: h == hops(lab, "r1", second), timeout=10, since=fault.at)
        print(f"\nMEASURED {first}'s servers refuse -> r1 forwards only to {second}: {(at - fault.at) * 1000:.0f} ms")
        assert lab.ask("client1") == second
        assert lab.pop_status(first)["state"] == "withdrawn"

        # the second PoP behind r1 fails too: r1 now forwards through r2, to pop2
        fault2 = lab.faults.apply("server-down", second)
        watch.wait_for(lambda h: h == {"10.0.0.2"}, timeout=10, since=fault2.at)
        assert lab.nexthop_nodes(watch.nexthops) == {"r2"}
        # r2 may still forward to pop3 for a moment: the withdraw reaches each upstream separately
        lab.wait_answer("client1", lambda who: who == "pop2", timeout=5)

        back = lab.faults.undo(fault)
        at = watch.wait_for(lambda h: h == hops(lab, "r1", first), timeout=15, since=back)
        assert at - back >= 5.0  # the default hold-down
        assert lab.ask("client1") == first


def test_wireguard_down_withdraws_although_tcp_answers(fresh: Lab) -> None:
    lab = fresh
    with lab.watch("r2") as watch:
        fault = lab.faults.apply("wireguard-down", "pop2")
        watch.wait_for(lambda h: h == hops(lab, "r2", "pop3"), timeout=15, since=fault.at)
        status = lab.pop_status("pop2")
        assert status["state"] == "withdrawn"
        assert all(s["tiers"]["tcp"]["state"] == "up" and s["decided_by"] == "wireguard" for s in status["servers"])
        assert lab.ask("probe1") == "pop3"


def test_blackholed_check_path_withdraws_and_link_blackhole_cuts_the_data_path(fresh: Lab) -> None:
    lab = fresh
    with lab.watch("r1") as watch:
        fault = lab.faults.apply("blackhole", "pop1")  # every interface toward pop1's servers
        at = watch.wait_for(lambda h: h == hops(lab, "r1", "pop3"), timeout=10, since=fault.at)
        print(f"\nMEASURED pop1's check path blackholed -> withdrawn at r1: {(at - fault.at) * 1000:.0f} ms")
        servers = lab.pop_status("pop1")["servers"]
        assert {s["tiers"]["tcp"]["last"]["error"] for s in servers} == {"timeout"}
    assert lab.ask("client1") == "pop3"
    cut = lab.faults.apply("blackhole", "r1:eth4")  # r1's end of the client's link
    assert lab.ask("client1", timeout=0.5) is None
    lab.faults.undo(cut)
    assert lab.ask("client1") == "pop3"


def _udp_delivery(sender: Netns, receiver: Netns, address: str, count: int = 2000) -> float:
    """The fraction of ``count`` datagrams from ``sender`` that reach ``address`` in ``receiver``."""
    with receiver.enter():
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sender.enter():
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with rx, tx:
        rx.bind((address, 0))
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        for i in range(count):
            tx.sendto(i.to_bytes(4, "big"), rx.getsockname())  # loss must be silent: no EPERM
            if i % 200 == 199:
                time.sleep(0.002)  # stay clear of any queue limit: only nftables may drop
        rx.settimeout(0.3)
        received = set()
        try:
            while True:
                received.add(rx.recv(16))
        except TimeoutError:
            pass
    return len(received) / count


def test_loss_drops_the_asked_share_each_way(fresh: Lab) -> None:
    lab = fresh
    client, r1 = lab.ns("client1"), lab.ns("r1")
    assert _udp_delivery(client, r1, "10.9.1.1") == 1.0
    fault = lab.faults.apply("loss", "client1:eth1", percent=30)
    up, down = _udp_delivery(client, r1, "10.9.1.1"), _udp_delivery(r1, client, "10.9.1.2")
    # 2000 datagrams at p=0.3: the standard deviation of the share is about 0.01
    assert 0.65 < up < 0.75 and 0.65 < down < 0.75, (up, down)
    lab.faults.undo(fault)
    assert _udp_delivery(client, r1, "10.9.1.1") == 1.0


def test_ten_percent_loss_on_the_check_path_withdraws_nothing(fresh: Lab) -> None:
    lab = fresh
    with lab.watch("r1") as watch:
        fault = lab.faults.apply("loss", "pop1", percent=10)
        time.sleep(6)
        lab.faults.undo(fault)
        assert [e for e in watch.events if e.timestamp > fault.at] == []
    # one server may have wobbled (a WireGuard probe lost three times running: ~1% per run),
    # but never the PoP's verdict
    assert lab.pop_status("pop1")["state"] in {"announced", "degraded"}


def test_restart_pop_with_changed_config_and_back(fresh: Lab) -> None:
    lab = fresh
    with pytest.raises(pop_config.ConfigError, match=r"checks\.l4\.rise: must be an integer"):
        lab.restart_pop("pop2", {"checks": {"l4": {"rise": "often"}}})
    assert lab.pop("pop2").proc is not None and lab.pop("pop2").proc.poll() is None  # left running
    lab.restart_pop("pop2", {"checks": {"wireguard": {"enabled": False}}})
    status = lab.pop("pop2").wait_status(lambda s: s["state"] == "announced", timeout=30)
    assert {tier for s in status["servers"] for tier in s["tiers"]} == {"tcp"}
    lab.restart_pop("pop2")
    status = lab.pop("pop2").wait_status(lambda s: s["state"] == "announced", timeout=30)
    assert {tier for s in status["servers"] for tier in s["tiers"]} == {"tcp", "wireguard"}


def test_flapping_servers_follow_the_schedule_and_stop_on_undo(fresh: Lab) -> None:
    lab = fresh
    with lab.watch("r2") as watch:
        fault = lab.faults.apply("flap", "pop2", period=2.0, down=1.0)
        time.sleep(5.5)
        stopped = lab.faults.undo(fault)
        kinds = [kind for _, kind in fault.transitions]
        assert kinds[:6] == ["down", "up"] * 3 and kinds[-1] == "up"
        for k, (when, kind) in enumerate(fault.transitions[:-1]):
            due = fault.at + (k // 2) * 2.0 + (1.0 if kind == "up" else 0.0)
            # a transition is recorded once it is complete (stopping and starting wireguard-go
            # and the TCP service takes a while on a loaded machine), but lateness never
            # accumulates: each one is due on the schedule from its origin (fault.at)
            assert -0.05 < when - due < (1.0 if kind == "down" else 1.5), (k, kind, when - due)
        # pop2 left r2's table while its servers were down, and no transition came after the undo
        assert any(lab.pop_address("r2", "pop2") not in e.nexthops for e in watch.events)
        assert fault.transitions[-1][0] <= stopped
        assert lab.vpn("vpn21").tcp.proc is not None and lab.vpn("vpn21").tcp.proc.poll() is None


@pytest.mark.parametrize(("kind", "pop", "router", "other"), [
    ("exabgp-kill", "pop2", "r2", "pop3"),  # the session dies with ExaBGP
    ("pop-stop", "pop1", "r1", "pop3"),  # `pop run` stopped: withdraws, then closes the session
])
def test_pop_process_stopped_leaves_the_router_and_restart_brings_it_back(
        fresh: Lab, kind: str, pop: str, router: str, other: str) -> None:
    lab = fresh
    with lab.watch(router) as watch:
        fault = lab.faults.apply(kind, pop)
        at = watch.wait_for(lambda h: h == hops(lab, router, other), timeout=10, since=fault.began)
        print(f"\nMEASURED {kind} {pop} -> route off {router}: {(at - fault.began) * 1000:.0f} ms")
        behind = {"r1": "client1", "r2": "probe1"}[router]
        assert lab.pop_status(pop) == {} and lab.ask(behind) == other
        if kind == "exabgp-kill":
            assert not pid_alive(int(fault.params["pid"]))
        back = lab.faults.undo(fault)
        watch.wait_for(lambda h: h == hops(lab, router, pop, other), timeout=30, since=back)


def test_engine_killed_with_healthy_servers_is_respawned_and_keeps_the_route(fresh: Lab) -> None:
    lab = fresh
    with lab.watch("r2") as watch:
        fault = lab.faults.apply("engine-kill", "pop3")
        lab.faults.undo(fault)  # returns once ExaBGP's new engine answers /status
        assert lab.pop("pop3").engine_pid() != fault.params["pid"]
        # the new engine adopts what ExaBGP still announces once one probe round found the
        # servers alive (pop.handover), instead of withdrawing first
        status = lab.pop("pop3").wait_status(lambda s: s["state"] == "announced", timeout=15)
        assert "adopted the previous engine's announcement" in status["last_change_reason"]
        pop3 = lab.pop_address("r2", "pop3")
        assert all(pop3 in e.nexthops for e in watch.events if e.timestamp >= fault.began), watch.events
        assert watch.nexthops == hops(lab, "r2", "pop2", "pop3")


def test_router_restart_cuts_and_restores_the_probe_path(fresh: Lab) -> None:
    lab = fresh
    with lab.watch("r2") as watch:
        fault = lab.faults.apply("router-down", "r2")
        watch.wait_for(lambda h: not h, timeout=5, since=fault.began)  # zebra took its routes along
        assert lab.ask("probe1", timeout=0.5) is None
        back = lab.faults.undo(fault)
        watch.wait_for(lambda h: h == hops(lab, "r2", "pop2", "pop3"), timeout=30, since=back)
    # the replies of pop3 (whose default route is via r1) need r1 to relearn probe1's network
    who, at = lab.wait_answer("probe1", timeout=15)
    assert who in {"pop2", "pop3"}
    print(f"\nMEASURED r2 restarted -> probe1 reaches {who} again: {at - back:.1f} s")


def test_fault_targets_are_checked(fresh: Lab) -> None:
    lab = fresh
    for kind, target, params, message in (
            ("server-down", "r1", {}, "neither a vpn nor a pop node"),
            ("wireguard-down", "client1", {}, "neither a vpn nor a pop node"),
            ("exabgp-kill", "vpn11", {}, "not a pop node"),
            ("router-down", "pop1", {}, "not a router node"),
            ("loss", "client1", {"percent": 5}, "name a link end"),
            ("blackhole", "r1:eth9", {}, "no link has this end"),
            ("loss", "pop1", {"percent": 150}, "whole number 1..100"),
            ("flap", "pop1", {"period": 1, "down": 2}, "0 < down"),
            ("server-down", "pop1", {"percent": 5}, "no parameter percent"),
            ("meteor", "pop1", {}, "unknown fault kind")):
        with pytest.raises(FaultError, match=message):
            lab.faults.apply(kind, target, **params)
    assert lab.faults.active() == []
    assert all(lab.pop_status(pop)["state"] == "announced" for pop in ("pop1", "pop2", "pop3"))
