"""The load signal reaches the real IPVS: runs *inside* the microVM (Debian's kernel, real
IPVS), started by tests/kernel/test_load_ipvs.py.

The setup of tests/kernel/inner/test_engine_ipvs_inner.py (the real Engine, KernelDataplane and
L4 checks in the director namespace, IPVS NAT to three server namespaces), with weight 10 on
every server and the load signal of pop.service (pop.adapters.telemetry) on: each server runs
Debian's prometheus-node-exporter on its address, reporting that server's own CPU through
lab.nodeexporter (a cgroup per server, on a cgroup2 hierarchy this test mounts in the guest; each server has
a third of the guest's one CPU).
CPU really burnt in s1's cgroup lowers s1's weight in IPVS as the step table says; s0 and s2
keep 10; after the burn s1 is back to 10.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from lab.nodeexporter import CGROUP_V1, CGROUP_V2, NodeExporter
from pop.engine import Engine
from pop.load import Policy, weighted
from pop.service import _telemetry_load
from tests.kernel.inner.test_engine_ipvs_inner import ADDRESS, NAMES, SLOW, Lab, pop_config, running_lab

pytestmark = pytest.mark.kernel

PERIOD = 3.0  # the emulated guest is 20-40x slower than the host: one scrape round takes a while
WEIGHT = 10


@pytest.fixture(scope="module")
def cgroups() -> Iterator[None]:
    """A cgroup hierarchy for the servers' CPU (the guest's init mounts none)."""
    mounted = False
    if not (CGROUP_V1 / "cpuacct.stat").exists() and not (CGROUP_V2 / "cgroup.controllers").exists():
        subprocess.run(["mount", "-t", "cgroup2", "none", str(CGROUP_V2)], check=True)
        mounted = True
    try:
        yield
    finally:
        if mounted:
            subprocess.run(["umount", str(CGROUP_V2)], check=False)


@pytest.fixture(scope="module")
def lab(cgroups: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, dict[str, NodeExporter]]]:
    if shutil.which("prometheus-node-exporter") is None:
        pytest.fail("prometheus-node-exporter is not installed (.ci/install installs it)")
    base = pop_config()
    config = replace(base, servers=tuple(replace(s, weight=WEIGHT) for s in base.servers),
                     load=Policy(enabled=True, period=PERIOD, timeout=PERIOD / 2))

    def attach(engine: Engine) -> None:
        _telemetry_load(engine)  # what `pop engine` does for load.enabled

    logs = tmp_path_factory.mktemp("load-ipvs")
    exporters: dict[str, NodeExporter] = {}
    with running_lab(logs, config, on_engine=attach) as lab:
        try:
            for name in NAMES:
                # a third of the guest's one emulated CPU per server: the engine, the exporters
                # and the probes take about half of it, so a burn gets about half (measured)
                exporter = exporters[name] = NodeExporter(lab.servers[name], name, ADDRESS[name], 9100,
                                                          logs / name, share=1 / 3)
                exporter.start()
            yield lab, exporters
        finally:
            for exporter in exporters.values():
                exporter.stop()


def ipvs_weights(lab: Lab) -> dict[str, int]:
    table = lab.ipvs()
    udp = {address: weight for address, (weight, _, _) in table.get("udp", {}).items()}
    tcp = {address: weight for address, (weight, _, _) in table.get("tcp", {}).items()}
    assert udp == tcp or not udp or not tcp, table
    return udp


def cpu_of(lab: Lab, name: str) -> float | None:
    def read(engine: Engine) -> float | None:
        assert engine.load_view is not None
        value = engine.load_view().get(name, {}).get("cpu")
        return value if isinstance(value, float) else None

    return lab.engine.call(read)


def test_every_server_starts_at_its_configured_weight_and_is_read(lab: tuple[Lab, dict[str, NodeExporter]]) -> None:
    director, _ = lab
    director.wait_for("announcement", director.engine.speaker.announced, timeout=2 * SLOW)
    director.wait_for("weights 10", lambda: ipvs_weights(director) == {ADDRESS[n]: WEIGHT for n in NAMES},
                      timeout=SLOW)
    director.wait_for("a CPU reading of every server",
                      lambda: all(cpu_of(director, n) is not None for n in NAMES), timeout=SLOW)


def test_cpu_burnt_on_one_server_lowers_its_ipvs_weight_by_the_step_table(
        lab: tuple[Lab, dict[str, NodeExporter]]) -> None:
    director, exporters = lab
    steps = dict(director.engine.config.load.steps)
    s1 = ADDRESS["s1"]

    def engine_view(engine: Engine) -> tuple[float, float | None]:
        assert engine.load_view is not None
        cpu = engine.load_view()["s1"]["cpu"]
        return engine.factors().get(s1, 1.0), cpu if isinstance(cpu, float) else None

    seen: list[object] = []

    def lowered() -> tuple[dict[str, int], float, float | None] | None:
        factor, cpu = director.engine.call(engine_view)
        weights = ipvs_weights(director)
        seen[:] = [factor, cpu, weights, director.engine.call(lambda e: e.load_view() if e.load_view else None)]
        # the kernel holds what the engine's factor says (read again if a period passed in between)
        if factor < 1.0 and weights.get(s1) == weighted(WEIGHT, factor):
            return weights, factor, cpu
        return None

    started = time.monotonic()
    # nice 0: the guest has one emulated CPU, which the engine and the exporters keep busy
    with exporters["s1"].burning(2, nice=0):
        try:
            weights, factor, cpu = director.wait_for("s1's weight lowered in IPVS", lowered, timeout=SLOW)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; engine factor, cpu, IPVS, load view: {seen}") from None
        moved = time.monotonic() - started
        assert factor in steps.values() and cpu is not None and cpu >= min(steps), (factor, cpu)
        assert weights == {ADDRESS["s0"]: WEIGHT, s1: weighted(WEIGHT, factor), ADDRESS["s2"]: WEIGHT}, weights
        print(f"\nMEASURED s1 burnt: IPVS weight {WEIGHT} -> {weights[s1]} in {moved:.1f}s "
              f"(period {PERIOD}s, cpu {cpu:.2f})")
    calmed = time.monotonic()
    director.wait_for("s1 back at its weight",
                      lambda: ipvs_weights(director) == {ADDRESS[n]: WEIGHT for n in NAMES}, timeout=SLOW)
    print(f"MEASURED s1 calm: IPVS weight back to {WEIGHT} in {time.monotonic() - calmed:.1f}s")
