"""What ExaBGP tells the engine about its sessions, with real peers: BIRD 2 and FRR.

    r1 (BIRD or FRR, AS 65000) --10.0.1.0/30-- pop1 (`pop run`: ExaBGP + engine, AS 65101) -- s11, s12

- BIRD sends End-of-RIB after its table; ExaBGP passes it on as an `update` without routes.
  The engine must see it as such, not count it as a message it could not read.
- ExaBGP reports a session change only when it happens: an engine it respawns must ask for
  the sessions' state, or /status shows `unknown` for sessions that are up.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.frr import FrrRouter
from lab.netns import Netns
from lab.popnode import PopNode
from tests.netns.test_pop_frr import ANYCAST, build_pop, router

PEER = "10.0.1.1"
NsFactory = Callable[[str], Netns]
BIRD_CONFIG = """
log stderr all;
router id 192.0.2.100;
protocol device {}
protocol static { ipv4; route 203.0.113.0/24 blackhole; }
protocol bgp pop1 {
    local 10.0.1.1 as 65000;
    neighbor 10.0.1.2 as 65101;
    hold time 9;
    connect retry time 1;
    ipv4 { import all; export all; };
}
"""


class Bird:
    """BIRD 2 in a namespace, a foreground child of the test, with its own socket and config."""

    def __init__(self, ns: Netns, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.ns = ns
        self.socket = workdir / "bird.ctl"
        config = workdir / "bird.conf"
        config.write_text(BIRD_CONFIG)
        self.proc = ns.popen("bird", "-f", "-s", str(self.socket), "-c", str(config), log=workdir / "bird.log")

    def show_route(self, prefix: str) -> str:
        return self.ns.run("birdc", "-s", str(self.socket), "show", "route", prefix, check=False).stdout

    def stop(self) -> None:
        self.ns.stop(self.proc)


@pytest.fixture
def bird_factory(tmp_path: Path) -> Iterator[Callable[[Netns], Bird]]:
    if shutil.which("bird") is None or shutil.which("birdc") is None:
        pytest.skip("BIRD tests need bird and birdc (apt-get install bird2)")
    started: list[Bird] = []

    def make(ns: Netns) -> Bird:
        bird = Bird(ns, tmp_path / f"bird-{ns.name}")
        started.append(bird)
        return bird

    try:
        yield make
    finally:
        for bird in started:
            bird.stop()


@pytest.fixture
def pops(tmp_path: Path) -> Iterator[list[PopNode]]:
    """The PoPs a test started: stopped after it, their logs printed when it failed."""
    nodes: list[PopNode] = []
    try:
        yield nodes
    finally:
        for node in nodes:
            print(f"--- {node.name} log ---\n{node.log_tail(80)}")
            node.stop()


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.05)
    raise TimeoutError(f"not within {timeout}s: {what}")


def engine_pid(pop: PopNode) -> int | None:
    try:
        return pop.engine_pid()
    except (OSError, ValueError):  # not written yet
        return None


def session_up(status: dict[str, Any]) -> bool:
    return bool(status["bgp"]["sessions"].get(PEER) == "up")


def test_bird_end_of_rib_is_seen_and_not_counted_unparsed(netns_factory: NsFactory, tmp_path: Path,
                                                           bird_factory: Callable[[Netns], Bird],
                                                           pops: list[PopNode]) -> None:
    r1 = netns_factory("r1")
    bird = bird_factory(r1)
    pop, _ = build_pop(1, netns_factory, r1, tmp_path)
    pops.append(pop)
    pop.wait_status(session_up, timeout=30)
    # pop's route reaches BIRD: the PoP works with BIRD as its upstream
    wait_for(lambda: ANYCAST in bird.show_route(ANYCAST), timeout=15, what=f"{ANYCAST} at BIRD")
    wait_for(lambda: f"bgp.end_of_rib peer={PEER} family=ipv4 unicast" in pop.log.read_text(), timeout=10,
             what="the engine logs BIRD's End-of-RIB")
    assert pop.status()["bgp"]["exabgp_unparsed_messages"] == 0
    assert "bgp.unparsed" not in pop.log.read_text()


def test_a_respawned_engine_shows_the_established_session_up(netns_factory: NsFactory,
                                                             frr_factory: Callable[..., FrrRouter],
                                                             tmp_path: Path, pops: list[PopNode]) -> None:
    r1 = router(netns_factory, frr_factory, 1)
    pop, _ = build_pop(1, netns_factory, r1.ns, tmp_path)
    r1.start()
    pops.append(pop)
    pop.wait_status(session_up, timeout=30)
    killed = pop.kill_engine()
    # ExaBGP respawns the engine; the session stays up, so ExaBGP reports no change of it
    wait_for(lambda: engine_pid(pop) not in {None, killed}, timeout=10, what="a respawned engine")
    first = pop.wait_status(lambda s: True, timeout=10)
    answered = time.monotonic()
    status = pop.wait_status(session_up, timeout=2)
    print(f"\nMEASURED new engine's first /status ({first['bgp']['sessions']}) -> session up: "
          f"{time.monotonic() - answered:.2f} s")
    assert status["bgp"]["exabgp_unparsed_messages"] == 0
