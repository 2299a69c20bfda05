"""End to end with real daemons: FRR router <- BGP -> ExaBGP + pop engine -> TCP VPN servers.

Every topology lives in namespaces made by the test:

    r1 (FRR, AS 65000) --10.0.1.0/30-- pop1 (AS 65101) --10.1.1.0/30-- s11
                                                        --10.1.2.0/30-- s12
                       --10.0.2.0/30-- pop2 (AS 65102) --10.2.1.0/30-- s21 ...

The assertions are made on r1's kernel routing table (rtnetlink events), i.e. where traffic
is really steered, with pop's default timings.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lab.frr import BgpNeighbor, FrrRouter
from lab.netns import Netns, veth
from lab.popnode import PopNode, TcpService
from lab.routewatch import RouteWatcher

ANYCAST = "198.51.100.1/32"
PORT = 443
AT_ONCE = {"steps": ["withdraw"]}  # a drain ladder of one step (tests/netns/test_drain_ladder.py walks a real one)
NsFactory = Callable[[str], Netns]


def build_pop(index: int, make_ns: NsFactory, router_ns: Netns, tmp_path: Path, servers: int = 2, *,
              prepare: Callable[[Netns], None] | None = None, **overrides: Any) -> tuple[PopNode, list[TcpService]]:
    """PoP `index` with its servers; `prepare(ns)` runs in the PoP's namespace before `pop run`."""
    ns = make_ns(f"p{index}")
    veth(router_ns, f"r1p{index}", f"10.0.{index}.1/30", ns, "up0", f"10.0.{index}.2/30")
    services = []
    server_list = []
    for s in range(1, servers + 1):
        sns = make_ns(f"s{index}{s}")
        veth(ns, f"v{s}", f"10.{index}.{s}.1/30", sns, "eth0", f"10.{index}.{s}.2/30")
        service = TcpService(sns, f"10.{index}.{s}.2", PORT, log=tmp_path / f"s{index}{s}.log")
        service.start()
        services.append(service)
        server_list.append({"name": f"vpn{s}", "address": f"10.{index}.{s}.2"})
    config: dict[str, Any] = {
        "pop": {"name": f"pop{index}", "asn": 65100 + index, "router_id": f"192.0.2.{index}"},
        "neighbors": [{"address": f"10.0.{index}.1", "peer_as": 65000, "local_address": f"10.0.{index}.2"}],
        "prefixes": [{"prefix": ANYCAST, "healthy": {"communities": [f"{65100 + index}:1"]},
                      "degraded": {"med": 500}}],
        "servers": server_list,
        "checks": {"l4": {"port": PORT}},
        **overrides,
    }
    node = PopNode(ns, config, tmp_path / f"pop{index}")
    if prepare is not None:
        prepare(ns)
    node.start()
    return node, services


def router(make_ns: NsFactory, frr_factory: Callable[..., FrrRouter], pops: int) -> FrrRouter:
    """r1 for `pops` PoPs, not started: start it after build_pop made the links (LINKS_FIRST)."""
    ns = make_ns("r1")
    return frr_factory(ns, "r1", 65000, "192.0.2.100",
                       [BgpNeighbor(f"10.0.{i}.2", 65100 + i, hold_time=9) for i in range(1, pops + 1)], start=False)


def has(*hops: str) -> Callable[[frozenset[str]], bool]:
    return lambda nexthops: nexthops == frozenset(hops)


def gone(nexthops: frozenset[str]) -> bool:
    return not nexthops


@pytest.fixture
def dumps(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """On failure, print the logs of every PoP the test registered."""
    nodes: list[PopNode] = []
    yield nodes
    report = getattr(request.node, "rep_call", None)
    if report is None or report.failed:
        for node in nodes:
            print(f"--- {node.name} log ---\n{node.log_tail(80)}")


@dataclass
class OnePop:
    router: FrrRouter
    watch: RouteWatcher
    pop: PopNode
    services: list[TcpService]


@pytest.fixture
def one_pop(netns_factory: NsFactory, frr_factory: Callable[..., FrrRouter], tmp_path: Path,
            dumps: list[PopNode]) -> Iterator[Callable[..., OnePop]]:
    """r1 + pop1 with two servers, announced at r1 (the route watcher already running)."""
    with contextlib.ExitStack() as stack:
        def make(**overrides: Any) -> OnePop:
            r1 = router(netns_factory, frr_factory, 1)
            watch = stack.enter_context(RouteWatcher(r1.ns, ANYCAST))
            pop, services = build_pop(1, netns_factory, r1.ns, tmp_path, **overrides)
            r1.start()
            dumps.append(pop)
            watch.wait_for(has("10.0.1.2"), timeout=30)
            return OnePop(r1, watch, pop, services)

        yield make


def test_announce_withdraw_recover_single_pop(netns_factory: NsFactory, frr_factory: Callable[..., FrrRouter],
                                              tmp_path: Path, dumps: list[PopNode]) -> None:
    r1 = router(netns_factory, frr_factory, 1)
    with RouteWatcher(r1.ns, ANYCAST) as watch:
        pop, (s1, s2) = build_pop(1, netns_factory, r1.ns, tmp_path)
        r1.start()
        dumps.append(pop)
        watch.wait_for(has("10.0.1.2"), timeout=30)
        route = r1.bgp_routes(ANYCAST)
        assert "65101:1" in str(route), route  # the configured community arrived
        assert pop.status()["state"] == "announced"

        # one of two servers dies: 1/2 is not below the low watermark 0.5, the PoP stays (degraded)
        s1.stop()
        status = pop.wait_status(lambda s: s["servers"][0]["state"] == "down", timeout=5)
        assert status["state"] == "degraded" and status["servers"][0]["decided_by"] == "tcp"
        # the reason follows the pool (it said "2/2 healthy, servers up" here before); the change stays
        assert status["reason"] == "1/2 healthy, degraded: not below low watermark 0.5", status["reason"]
        assert status["last_change_reason"] == "2/2 healthy, servers up"
        assert watch.nexthops == frozenset({"10.0.1.2"})
        assert "500" in str(r1.bgp_routes(ANYCAST))  # degraded MED

        # the last server dies: the route leaves the router's kernel table
        killed = time.monotonic()
        s2.stop()
        withdrawn = watch.wait_for(gone, timeout=10, since=killed)
        detection = withdrawn - killed
        print(f"\nMEASURED last-server-stops -> route-gone-at-router: {detection * 1000:.0f} ms")
        assert detection < 2.0
        status = pop.status()
        assert status["state"] == "withdrawn"
        assert status["last_change_reason"] == "0/2 healthy, below low watermark 0.5"
        assert status["events"][0]["kind"] == "verdict" and status["events"][0]["to"] == "withdrawn"

        # both come back: re-announced only after the hold-down (5 s by default)
        back = time.monotonic()
        s1.start()
        s2.start()
        returned = watch.wait_for(has("10.0.1.2"), timeout=15, since=back)
        print(f"MEASURED servers-back -> route-back-at-router: {(returned - back) * 1000:.0f} ms (hold-down 5 s)")
        assert 5.0 <= returned - back < 7.0


def test_two_pops_ecmp_and_only_the_failed_pop_leaves(netns_factory: NsFactory,
                                                      frr_factory: Callable[..., FrrRouter], tmp_path: Path,
                                                      dumps: list[PopNode]) -> None:
    r1 = router(netns_factory, frr_factory, 2)
    with RouteWatcher(r1.ns, ANYCAST) as watch:
        pop1, _ = build_pop(1, netns_factory, r1.ns, tmp_path)
        pop2, services2 = build_pop(2, netns_factory, r1.ns, tmp_path)
        r1.start()
        dumps.extend([pop1, pop2])
        watch.wait_for(has("10.0.1.2", "10.0.2.2"), timeout=30)
        killed = time.monotonic()
        for service in services2:
            service.stop()
        at = watch.wait_for(has("10.0.1.2"), timeout=10, since=killed)
        print(f"\nMEASURED pop2 servers die -> ECMP set shrinks to pop1: {(at - killed) * 1000:.0f} ms")
        # nothing else happened at the router in between: pop1's next hop never left
        assert all("10.0.1.2" in e.nexthops for e in watch.events if e.timestamp >= killed)


def test_engine_killed_with_its_servers_does_not_leave_the_route(one_pop: Callable[..., OnePop]) -> None:
    """ExaBGP keeps what a dead engine announced; the respawned engine must withdraw it at once
    (its one probe round finds the servers dead, so it adopts nothing)."""
    lab = one_pop()
    pop, services, watch = lab.pop, lab.services, lab.watch
    old_pid = pop.engine_pid()
    killed = time.monotonic()
    pop.kill_engine()
    for service in services:
        service.stop()
    at = watch.wait_for(gone, timeout=10, since=killed)
    print(f"\nMEASURED engine SIGKILL + servers dead -> route gone: {(at - killed) * 1000:.0f} ms")
    # a new engine runs (ExaBGP respawned it) and keeps the PoP withdrawn
    status = pop.wait_status(lambda s: s["uptime_seconds"] > 1.0, timeout=10)
    assert pop.engine_pid() != old_pid
    assert status["state"] == "withdrawn" and watch.nexthops == frozenset()


def test_engine_killed_with_healthy_servers_keeps_the_route_and_exabgp_death_withdraws(
        one_pop: Callable[..., OnePop]) -> None:
    """A crash of the engine alone is no reason to pull a healthy PoP out of the routers: the
    respawned engine adopts what ExaBGP still announces (pop.handover) after one probe round."""
    lab = one_pop()
    pop, watch, r1 = lab.pop, lab.watch, lab.router
    pop.wait_status(lambda s: s["state"] == "announced", timeout=10)
    updates = r1.updates_received("10.0.1.2")
    first = time.monotonic()
    for _ in range(3):  # ExaBGP respawns its process at most 5 times in 64 s
        old = pop.engine_pid()
        pop.kill_engine()
        status = pop.wait_status(lambda s: s["state"] == "announced" and s["uptime_seconds"] > 0.5, timeout=15)
        assert pop.engine_pid() != old
        assert "adopted the previous engine's announcement" in status["last_change_reason"]
    time.sleep(1.0)  # room for a late withdraw or re-announce to show
    assert [e for e in watch.events if e.timestamp >= first] == [], "the router saw the route change"
    assert r1.updates_received("10.0.1.2") == updates, "ExaBGP sent UPDATEs for an unchanged route"
    assert watch.nexthops == frozenset({"10.0.1.2"})
    # ExaBGP itself dies: the BGP session closes and the router drops the route at once
    killed = time.monotonic()
    os.kill(pop.exabgp_pid(), 9)
    at = watch.wait_for(gone, timeout=10, since=killed)
    print(f"\nMEASURED ExaBGP SIGKILL -> route gone: {(at - killed) * 1000:.0f} ms")


def test_a_hung_engine_is_killed_by_the_watchdog_and_the_route_withdrawn(one_pop: Callable[..., OnePop]) -> None:
    """ExaBGP notices an API process that dies, not one that hangs: `pop run`'s watchdog does."""
    lab = one_pop(exabgp={"watchdog": 2})
    pop, services, watch = lab.pop, lab.services, lab.watch
    hung = pop.engine_pid()
    os.kill(hung, signal.SIGSTOP)  # the event loop stops; the process and its pipes stay
    stopped = time.monotonic()
    try:
        for service in services:
            service.stop()  # the servers die while nobody checks them
        at = watch.wait_for(gone, timeout=15, since=stopped)
        print(f"\nMEASURED engine hung (watchdog 2 s) + servers dead -> route gone: {at - stopped:.2f} s")
        assert at - stopped >= 2.0  # not before the watchdog's limit
        status = pop.wait_status(lambda s: s["uptime_seconds"] > 0.5, timeout=10)
        assert pop.engine_pid() != hung and status["state"] == "withdrawn"
        assert "watchdog.engine_hung" in pop.log_tail(80)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung, signal.SIGCONT)


def test_a_beacon_stays_announced_while_the_pop_is_withdrawn_and_while_its_engine_is_dead(
        one_pop: Callable[..., OnePop]) -> None:
    """Tier 3's agents must reach a withdrawn PoP to see it come back: its beacon prefix is
    ExaBGP's own static route, never health-gated, whatever the engine says or whether it runs."""
    beacon = "203.0.113.1/32"
    lab = one_pop(external={"beacons": [beacon]})
    pop, services, watch = lab.pop, lab.services, lab.watch
    with RouteWatcher(lab.router.ns, beacon) as at_beacon:
        at_beacon.wait_for(has("10.0.1.2"), timeout=10)
        for service in services:
            service.stop()
        watch.wait_for(gone, timeout=10, since=time.monotonic())  # the anycast prefix is withdrawn ...
        hung = pop.engine_pid()
        os.kill(hung, signal.SIGSTOP)  # ... and the engine stops answering anything
        try:
            time.sleep(1.0)
            assert at_beacon.nexthops == frozenset({"10.0.1.2"})
            assert [e for e in at_beacon.events if not e.nexthops] == [], at_beacon.events  # never left
        finally:
            os.kill(hung, signal.SIGCONT)


def test_drain_withdraws_and_undrain_returns_after_hold_down(one_pop: Callable[..., OnePop]) -> None:
    lab = one_pop(pool={"hold_down": 1.0}, drain=AT_ONCE)
    pop, watch = lab.pop, lab.watch
    drained = time.monotonic()
    assert pop.post("/drain")["drained"] is True
    watch.wait_for(gone, timeout=5, since=drained)
    time.sleep(1.5)
    assert watch.nexthops == frozenset() and pop.status()["state"] == "drained"
    pop.post("/undrain")
    watch.wait_for(has("10.0.1.2"), timeout=5, since=time.monotonic())


def test_control_without_the_right_token_is_refused_and_the_pop_stays_announced(
        one_pop: Callable[..., OnePop]) -> None:
    """Anyone on the host could POST /drain and withdraw a healthy PoP (issue 10)."""
    lab = one_pop()
    pop, watch = lab.pop, lab.watch
    pop.wait_status(lambda s: s["state"] == "announced", timeout=10)
    since = time.monotonic()
    attempts = [(path, headers) for path in ("/drain", "/servers/vpn1/drain")
                for headers in ({}, {"Authorization": "Bearer wrong-token-but-long-enough"})]
    for path, headers in attempts:
        code, answer = pop.request(path, method="POST", headers=headers)
        assert code == 401, (path, headers, code, answer)
    time.sleep(1.0)  # room for a withdraw to reach the router, had one been sent
    assert [e for e in watch.events if e.timestamp >= since] == [], watch.events
    assert watch.nexthops == frozenset({"10.0.1.2"}) and "65101:1" in str(lab.router.bgp_routes(ANYCAST))
    status = pop.status()
    assert status["state"] == "announced" and status["servers"][0]["drain"] is None
    assert [(a["action"], a["target"], a["status"]) for a in status["audit"]][:4] == [
        ("drain-server", "vpn1", 401), ("drain-server", "vpn1", 401), ("drain", "pop1", 401), ("drain", "pop1", 401)]


def test_a_token_file_others_can_read_is_refused_on_reload_and_a_new_token_takes_over_on_reload(
        one_pop: Callable[..., OnePop]) -> None:
    lab = one_pop(pool={"hold_down": 0.5})
    pop = lab.pop
    assert pop.proc is not None
    key = Path(pop.config["control"]["token_file"])
    old = key.read_text().strip()

    def ask(token: str) -> int:
        return pop.request("/undrain", method="POST", headers={"Authorization": f"Bearer {token}"})[0]

    key.chmod(0o644)
    pop.proc.send_signal(signal.SIGHUP)
    wait_log(pop, "control.token_file")
    assert "reload.rejected" in pop.log_tail(80) and ask(old) == 200  # the running engine kept its token
    key.chmod(0o600)
    key.write_text("the-new-token-0123456789\n")
    pop.proc.send_signal(signal.SIGHUP)
    wait_log(pop, "engine.reloaded")
    assert ask(old) == 401 and ask("the-new-token-0123456789") == 200


def wait_log(pop: PopNode, text: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in pop.log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} not in the log:\n{pop.log_tail()}"
        time.sleep(0.05)


def test_a_drain_survives_the_engine_dying(one_pop: Callable[..., OnePop]) -> None:
    """A respawned engine that forgot the drain would announce the PoP mid-maintenance."""
    lab = one_pop(pool={"hold_down": 1.0}, drain=AT_ONCE)
    pop, watch = lab.pop, lab.watch
    drained = time.monotonic()
    pop.post("/drain")
    pop.post("/servers/vpn2/drain")
    watch.wait_for(gone, timeout=5, since=drained)
    old = pop.engine_pid()
    pop.kill_engine()
    status = pop.wait_status(lambda s: s["uptime_seconds"] > 2.0, timeout=15)  # servers long risen
    assert pop.engine_pid() != old
    assert status["state"] == "drained" and watch.nexthops == frozenset()
    assert {s["name"]: (s["drain"] or {}).get("state") for s in status["servers"]} == {"vpn1": None,
                                                                                      "vpn2": "drained"}
    assert "drains.restored" in pop.log_tail(80)
    pop.post("/undrain")
    pop.post("/servers/vpn2/undrain")  # 1 of 2 servers is below the high watermark: both must serve
    watch.wait_for(has("10.0.1.2"), timeout=10, since=time.monotonic())


def test_sighup_reload_never_flaps_and_a_broken_file_changes_nothing(
        netns_factory: NsFactory, frr_factory: Callable[..., FrrRouter], tmp_path: Path,
        dumps: list[PopNode]) -> None:
    import signal

    import yaml

    r1 = router(netns_factory, frr_factory, 1)
    with RouteWatcher(r1.ns, ANYCAST) as watch:
        pop, _ = build_pop(1, netns_factory, r1.ns, tmp_path)
        r1.start()
        dumps.append(pop)
        watch.wait_for(has("10.0.1.2"), timeout=30)
        pop.wait_status(lambda s: s["state"] == "announced", timeout=10)
        settled = time.monotonic()
        assert pop.proc is not None

        # a broken file: rejected whole, the running engine and its route untouched
        good = pop.config_path.read_text()
        pop.config_path.write_text(good.replace("peer_as: 65000", "peer_as: banana"))
        pop.proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert "reload.rejected" in pop.log.read_text()
        assert pop.status()["state"] == "announced"

        # a good change: new community on the prefix, a third (dead) server; no withdrawal
        config = yaml.safe_load(good)
        config["prefixes"][0]["healthy"]["communities"] = ["65101:2"]
        config["servers"].append({"name": "vpn3", "address": "10.1.9.9"})
        config["pool"] = {"low_watermark": 0.3}
        pop.config_path.write_text(yaml.safe_dump(config))
        pop.proc.send_signal(signal.SIGHUP)
        status = pop.wait_status(lambda s: len(s["servers"]) == 3 and s["servers"][2]["state"] == "down", timeout=10)
        assert status["servers"][0]["state"] == "up"  # kept its state across the reload
        assert status["state"] == "degraded"  # 2/3 up; announced with the degraded attributes
        time.sleep(1.0)
        assert "500" in str(r1.bgp_routes(ANYCAST))
        assert all(event.nexthops for event in watch.events if event.timestamp >= settled), watch.events


def test_flap_dampening_keeps_a_flapping_pop_out_and_brings_it_back(one_pop: Callable[..., OnePop]) -> None:
    """With dampening on (suppress at the third quick withdrawal, reuse after ~8 s of quiet), real
    servers flapping: after the third withdrawal the PoP stays out of r1's table although its
    servers are back, and returns by itself once the figure has decayed."""
    lab = one_pop(pool={"hold_down": 0.5}, dampening={"enabled": True, "penalty": 1000, "suppress": 2200,
                                                      "reuse": 1500, "half_life": 10, "max_suppress": 60})
    for _ in range(3):
        lab.watch.wait_for(has("10.0.1.2"), timeout=15)
        lost = time.monotonic()
        for service in lab.services:
            service.stop()
        lab.watch.wait_for(gone, timeout=10, since=lost)
        for service in lab.services:
            service.start()
    back = time.monotonic()
    # its servers are up and its hold-down has passed: only dampening holds it
    status = lab.pop.wait_status(lambda s: (s.get("dampening") or {}).get("suppressed") is True
                                 and all(server["state"] == "up" for server in s["servers"])
                                 and "the pool would announce" in s["reason"], timeout=10)
    assert status["state"] == "withdrawn" and "suppressed by flap dampening: 3 flaps" in status["reason"]
    assert lab.watch.nexthops == frozenset()  # healthy inside, kept out by dampening
    returned = lab.watch.wait_for(has("10.0.1.2"), timeout=30, since=back)
    print(f"\nMEASURED third flap -> back at r1 after dampening: {returned - back:.1f} s "
          f"(figure {status['dampening']['figure']:.0f} -> reuse 1500, half-life 10 s)")
    assert returned - back >= 2.0
    assert lab.pop.status()["dampening"]["suppressed"] is False
