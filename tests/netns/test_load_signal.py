"""The load signal in the lab: real CPU burnt on one of pop1's servers moves that server's
weight in the kernel's multipath route as the step table says, within two load periods, and
back after the burn.

pop1 (lab/nodes/pop1/pop.yaml) reads each server's prometheus-node-exporter every 2 s with
the default steps (-20 % at 75 % CPU, -50 % at 85 %); its servers have weight 10. Each server's
exporter reports that server's own CPU (lab/nodeexporter.py: the server's cgroup, as lxcfs
would; each server has half a CPU); the burn is two busy loops in vpn11's namespace and cgroup.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator

import pytest

from lab.runner import Lab
from pop.load import step_factor, weighted
from tests.netns.conftest import running_lab
from tests.netns.test_lab_runner import needs

__all__ = ["needs"]

ANYCAST = "198.51.100.1/32"
VPN11, VPN12 = "10.1.1.2", "10.1.2.2"


@pytest.fixture(scope="module")
def lab(needs: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if shutil.which("prometheus-node-exporter") is None:
        pytest.skip("needs Debian's prometheus-node-exporter (.ci/install installs it)")
    with running_lab("tld", tmp_path_factory) as lab:
        yield lab


def route_weights(lab: Lab) -> dict[str, int]:
    """The kernel's multipath route for the anycast address in pop1: weight per server address."""
    table = lab.spec.pops["pop1"].config.dataplane.table
    out = lab.ns("pop1").run("ip", "-j", "route", "show", "table", str(table), ANYCAST).stdout
    routes = json.loads(out or "[]")
    if not routes:
        return {}
    hops = routes[0].get("nexthops") or [{"gateway": routes[0].get("gateway"), "weight": 1}]
    return {hop["gateway"]: int(hop.get("weight", 1)) for hop in hops}


def wait_weights(lab: Lab, predicate: Callable[[dict[str, int]], bool], timeout: float) -> tuple[float, dict[str, int]]:
    """The first moment the route's weights pass ``predicate`` (monotonic time, weights)."""
    deadline = time.monotonic() + timeout
    while True:
        weights = route_weights(lab)
        if predicate(weights):
            return time.monotonic(), weights
        assert time.monotonic() < deadline, f"route weights still {weights} after {timeout} s"
        time.sleep(0.05)


def server_load(lab: Lab, server: str) -> dict[str, object]:
    status = lab.pop_status("pop1")
    entry = next(s for s in status["servers"] if s["name"] == server)
    return {"factor": entry["load_factor"], **(entry["load"] or {})}


def test_cpu_burnt_on_one_server_moves_its_route_weight_by_the_step_table(lab: Lab) -> None:
    config = lab.spec.pops["pop1"].config
    period, steps = config.load.period, config.load.steps
    # idle servers: the configured weights, and the exporters answer
    wait_weights(lab, lambda w: w == {VPN11: 10, VPN12: 10}, timeout=4 * period)
    deadline = time.monotonic() + 3 * period
    while server_load(lab, "vpn11").get("cpu") is None:
        assert time.monotonic() < deadline, f"pop1 reads no CPU from vpn11: {server_load(lab, 'vpn11')}"
        time.sleep(0.1)

    exporter = lab.exporters["vpn11"]
    started = time.monotonic()
    exporter.burn(2)
    try:
        # the last step (-50 % at 85 %) within two periods; vpn12 untouched
        reached, weights = wait_weights(lab, lambda w: w.get(VPN11) == 5, timeout=4 * period)
        shed = reached - started
        assert weights == {VPN11: 5, VPN12: 10}
        seen = server_load(lab, "vpn11")
        cpu = seen["cpu"]
        assert isinstance(cpu, float) and cpu >= 0.85, seen
        assert weighted(10, step_factor(cpu, steps)) == 5 and seen["factor"] == 0.5
        assert shed <= 2 * period + 0.5, f"weight 5 only {shed:.2f} s after the burn began (period {period} s)"
        print(f"\nload.shed vpn11 weight 10 -> 5 in {shed:.2f} s (period {period} s), cpu {cpu:.2f}")
    finally:
        exporter.unburn()
    calmed = time.monotonic()
    back, weights = wait_weights(lab, lambda w: w.get(VPN11) == 10, timeout=6 * period)
    assert weights == {VPN11: 10, VPN12: 10}
    print(f"load.back vpn11 weight 5 -> 10 in {back - calmed:.2f} s")
    # a fall is smoothed (by half a period) and a step is left only 5 points below it: back
    # within three periods
    assert back - calmed <= 3 * period + 0.5


def test_an_exporter_that_stops_answering_leaves_the_configured_weight(lab: Lab) -> None:
    exporter = lab.exporters["vpn12"]
    period = lab.spec.pops["pop1"].config.load.period
    exporter.burn(2)
    try:
        wait_weights(lab, lambda w: w.get(VPN12) == 5, timeout=4 * period)
        assert exporter.exporter is not None
        lab.ns("vpn12").stop(exporter.exporter)  # the exporter dies while its server is busy
        _, weights = wait_weights(lab, lambda w: w.get(VPN12) == 10, timeout=3 * period)
        assert weights == {VPN11: 10, VPN12: 10}  # fail-open: not the last reading, the configured weight
        assert server_load(lab, "vpn12")["error"]
    finally:
        exporter.unburn()
        exporter.stop()
        exporter.start()
