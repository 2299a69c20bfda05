"""Restart without a withdrawal (BGP graceful restart), against a real FRR and ExaBGP.

r1 (FRR 8.4, a graceful-restart helper by default) peers with pop1 (`exabgp.graceful_restart`
set). The assertions are made on r1's kernel route for the anycast prefix (rtnetlink events).
"""

# ruff: noqa: F811 (the tests take the imported fixtures as arguments)
from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from lab.routewatch import RouteEvent

# the fixtures of test_pop_frr (r1 + pop1 with two servers), imported so that pytest finds them
from tests.netns.test_pop_frr import OnePop, dumps, gone, one_pop  # noqa: F401

RESTART_TIME = 5
GRACEFUL = {"exabgp": {"graceful_restart": RESTART_TIME}}
POP1 = "10.0.1.2"


def sessions_established(lab: OnePop) -> int:
    data = lab.router.vtysh_json(f"show bgp neighbors {POP1} json")
    return int(data[POP1]["connectionsEstablished"])


def new_engine(lab: OnePop, old: int, timeout: float = 20) -> dict[str, Any]:
    """The /status of the engine that replaced ``old``, once it has run half a second."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if lab.pop.engine_pid() != old:
                return lab.pop.wait_status(lambda s: s["uptime_seconds"] > 0.5, timeout=deadline - time.monotonic())
        except (OSError, ValueError):
            pass  # between two engines
        time.sleep(0.05)
    raise TimeoutError(f"no engine replaced {old}\n{lab.pop.log_tail()}")


def test_planned_restart_with_healthy_servers_changes_nothing_at_the_router(
        one_pop: Callable[..., OnePop]) -> None:
    lab = one_pop(**GRACEFUL)
    pop, watch = lab.pop, lab.watch
    pop.wait_status(lambda s: s["state"] == "announced", timeout=15)
    assert "graceful" in str(lab.router.vtysh_json(f"show bgp neighbors {POP1} json")[POP1]).lower()
    sessions = sessions_established(lab)
    for _ in range(2):  # the second restart adopts what the first one's engine announced
        old_engine, old_exabgp = pop.engine_pid(), pop.exabgp_pid()
        sent = pop.restart()
        status = new_engine(lab, old_engine)
        assert status["state"] == "announced" and pop.exabgp_pid() != old_exabgp
        assert "adopted the previous engine's announcement" in status["last_change_reason"], status
        time.sleep(1.0)  # room for a late withdraw or stale-route flush to reach r1's kernel
        events: list[RouteEvent] = [e for e in watch.events if e.timestamp >= sent]
        assert events == [], f"r1's route changed during a planned restart: {events}"
    assert sessions_established(lab) == sessions + 2  # the sessions really were new ones
    path = lab.router.bgp_routes("198.51.100.1/32")["paths"][0]
    assert not path.get("stale"), path  # refreshed by the new session before its End-of-RIB
    assert watch.nexthops == frozenset({POP1})


def test_unplanned_death_with_the_servers_leaves_the_router_within_the_restart_time(
        one_pop: Callable[..., OnePop]) -> None:
    """SIGKILL of `pop run` and ExaBGP with dead servers: no NOTIFICATION, no planned handover.
    r1 keeps the route as stale for the restart time, then drops it."""
    lab = one_pop(**GRACEFUL)
    pop, watch = lab.pop, lab.watch
    pop.wait_status(lambda s: s["state"] == "announced", timeout=15)
    assert pop.proc is not None
    exabgp = pop.exabgp_pid()
    killed = time.monotonic()
    pop.proc.send_signal(signal.SIGKILL)
    os.kill(exabgp, signal.SIGKILL)
    for service in lab.services:
        service.stop()
    at = watch.wait_for(gone, timeout=RESTART_TIME + 10, since=killed)
    print(f"\nMEASURED pop run + ExaBGP SIGKILL, servers dead -> route gone at r1: {at - killed:.2f} s "
          f"(restart time {RESTART_TIME} s)")
    assert at - killed <= RESTART_TIME + 1.0
    pop.stop()


def test_a_stop_with_graceful_restart_still_withdraws_at_once(one_pop: Callable[..., OnePop]) -> None:
    """SIGTERM means stop: the engine withdraws before ExaBGP closes the session without a
    NOTIFICATION, so r1 does not keep a stale route for the restart time."""
    lab = one_pop(**GRACEFUL)
    pop, watch = lab.pop, lab.watch
    pop.wait_status(lambda s: s["state"] == "announced", timeout=15)
    stopped = time.monotonic()
    assert pop.stop() == 0
    at = watch.wait_for(gone, timeout=RESTART_TIME + 10, since=stopped)
    print(f"\nMEASURED SIGTERM with graceful restart -> route gone at r1: {at - stopped:.2f} s")
    assert at - stopped < 2.0


def test_planned_restart_with_dead_servers_withdraws_once_the_new_engine_probed(
        one_pop: Callable[..., OnePop]) -> None:
    lab = one_pop(**GRACEFUL)
    pop, watch = lab.pop, lab.watch
    pop.wait_status(lambda s: s["state"] == "announced", timeout=15)
    old = pop.engine_pid()
    sent = pop.restart()
    for service in lab.services:
        service.stop()
    at = watch.wait_for(gone, timeout=RESTART_TIME + 10, since=sent)
    status = new_engine(lab, old)
    print(f"\nMEASURED planned restart, servers dead -> route gone at r1: {at - sent:.2f} s")
    assert status["state"] == "withdrawn"
    assert at - sent < RESTART_TIME


def test_restart_without_graceful_restart_is_refused_and_changes_nothing(one_pop: Callable[..., OnePop]) -> None:
    lab = one_pop()
    pop, watch = lab.pop, lab.watch
    pop.wait_status(lambda s: s["state"] == "announced", timeout=15)
    engine, exabgp = pop.engine_pid(), pop.exabgp_pid()
    sent = pop.restart()
    deadline = time.monotonic() + 10
    while "restart.refused" not in pop.log.read_text():
        assert time.monotonic() < deadline, pop.log_tail()
        time.sleep(0.05)
    assert (pop.engine_pid(), pop.exabgp_pid()) == (engine, exabgp)
    assert [e for e in watch.events if e.timestamp >= sent] == []
    assert watch.nexthops == frozenset({POP1})
