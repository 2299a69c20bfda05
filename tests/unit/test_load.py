"""Load-following weights, as tables; and the engine folding a reading into IPVS weights."""

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from pop import telemetry
from pop.adapters.telemetry import NodeExporterLoad
from pop.config import ConfigError
from pop.config import load as load_config
from pop.engine import Engine
from pop.load import connection_factors, smooth, step_factor, telemetry_factors, weighted
from tests.unit.test_engine import Scripted
from tests.unit.test_engine_order import CONFIG_TEXT_NO_HOLD_DOWN, POLICY, FakeDataplane, FakeSpeaker, World


@pytest.mark.parametrize(("connections", "weights", "expected"), [
    ({}, {"a": 1, "b": 1}, {"a": 1.0, "b": 1.0}),  # idle pool: nobody is busy
    ({"a": 10, "b": 10}, {"a": 1, "b": 1}, {"a": 1.0, "b": 1.0}),  # even load
    ({"a": 30, "b": 10}, {"a": 1, "b": 1}, {"a": 20 / 30, "b": 1.0}),  # a carries 1.5x the mean
    ({"a": 30, "b": 10}, {"a": 3, "b": 1}, {"a": 1.0, "b": 1.0}),  # per unit of weight: even
    ({"a": 1000}, dict.fromkeys("abcde", 1), {"a": 0.25, "b": 1.0, "c": 1.0, "d": 1.0, "e": 1.0}),  # mean/load 0.2: floor
    ({"a": 5}, {"a": 1, "z": 0}, {"a": 1.0}),  # weight 0 (drained) is not part of the pool
])
def test_connection_factors(connections: dict[str, int], weights: dict[str, int], expected: dict[str, float]) -> None:
    assert connection_factors(connections, weights) == pytest.approx(expected)


def test_smoothing_and_weights() -> None:
    assert smooth({"a": 1.0}, {"a": 0.5, "b": 0.4}) == pytest.approx({"a": 0.85, "b": 0.4})
    assert (weighted(10, 0.25), weighted(1, 0.25), weighted(4, 1.0)) == (2, 1, 4)


def test_engine_follows_the_load_signal_in_ipvs_weights() -> None:
    async def main() -> None:
        world = World()
        readings = [{"10.0.2.1": 1.0, "10.0.2.2": 0.25}]

        async def signal() -> dict[str, float]:
            return readings[0]

        config = load_config(CONFIG_TEXT_NO_HOLD_DOWN.replace("{name: b, address: 10.0.2.2}",
                                                              "{name: b, address: 10.0.2.2, weight: 8}"))
        engine = Engine(config, FakeSpeaker(world), {n: [(Scripted(), POLICY)] for n in ("a", "b")},
                        dataplane=FakeDataplane(world), load_signal=signal)
        engine.observe_load(readings[0])  # a first reading is taken as it is
        engine.reevaluate()
        reals = {r.address: r.weight for r in engine.desired_state.services[0].reals} \
            if engine.desired_state.services else {}
        assert reals == {}  # nothing is in the pool before the servers rose
        for name in ("a", "b"):
            engine.observe(name, "tcp", Scripted().result)
        reals = {r.address: r.weight for r in engine.desired_state.services[0].reals}
        assert reals == {"10.0.2.1": 1, "10.0.2.2": 2}  # 8 x 0.25

    asyncio.run(main())


# --- the servers' own telemetry: the step table, the CPU from node-exporter, fail-open -----

STEPS = ((0.75, 0.8), (0.85, 0.5))  # the default: -20 % at 75 % CPU, -50 % at 85 %


@pytest.mark.parametrize(("cpu", "previous", "expected"), [
    (0.10, 1.0, 1.0),
    (0.749, 1.0, 1.0),
    (0.75, 1.0, 0.8),
    (0.84, 1.0, 0.8),
    (0.85, 1.0, 0.5),
    (1.00, 0.8, 0.5),
    (0.72, 0.8, 0.8),  # within the margin below 75 %: held on the step it reached
    (0.69, 0.8, 1.0),  # past the margin: back to the configured weight
    (0.81, 0.5, 0.5),  # held on -50 % down to 80 %
    (0.79, 0.5, 0.8),  # ... and then one step down, not two
    (0.72, 1.0, 1.0),  # the margin holds a step, it never raises one
])
def test_step_factor_follows_the_table_with_a_margin(cpu: float, previous: float, expected: float) -> None:
    assert step_factor(cpu, STEPS, previous, margin=0.05) == expected


def test_telemetry_factors_are_floored_and_fail_open() -> None:
    factors = telemetry_factors({"a": 0.9, "b": None, "c": 0.1}, {}, ((0.5, 0.1),), floor=0.25, margin=0.0)
    assert factors == {"a": 0.25, "b": 1.0, "c": 1.0}  # b's exporter did not answer: its configured weight
    assert weighted(1, 0.25) == 1  # a healthy server is never taken to zero


EXPORTED = """# HELP node_cpu_seconds_total Seconds the CPUs spent in each mode.
# TYPE node_cpu_seconds_total counter
node_cpu_seconds_total{cpu="0",mode="idle"} 100
node_cpu_seconds_total{cpu="0",mode="iowait"} 10
node_cpu_seconds_total{cpu="0",mode="user"} 50
node_cpu_seconds_total{cpu="1",mode="idle"} 200
node_cpu_seconds_total{cpu="1",mode="system"} 40
node_cpu_guest_seconds_total{cpu="0",mode="user"} 999
wireguard_latest_handshake_seconds{interface="wg0",public_key="x"} 1.7e9
wireguard_latest_handshake_seconds{interface="wg0",public_key="y"} 1.7e9
"""


def test_parse_sums_the_cpus_per_mode() -> None:
    scrape = telemetry.parse(EXPORTED, at=1.0)
    assert scrape.cpu == {"idle": 300.0, "iowait": 10.0, "user": 50.0, "system": 40.0}
    assert (scrape.cpus, scrape.wireguard_peers) == (2, 2)


def test_parse_refuses_an_answer_without_cpu_counters() -> None:
    with pytest.raises(telemetry.ParseError, match="no node_cpu_seconds_total"):
        telemetry.parse("node_load1 0.5\n", at=0.0)


def cpu_scrape(at: float, idle: float, user: float) -> telemetry.Scrape:
    return telemetry.Scrape(at, {"idle": idle, "user": user}, 1)


@pytest.mark.parametrize(("before", "after", "expected"), [
    (cpu_scrape(0, 100, 0), cpu_scrape(1, 101, 0), 0.0),
    (cpu_scrape(0, 100, 0), cpu_scrape(1, 100.25, 0.75), 0.75),
    (cpu_scrape(0, 100, 0), cpu_scrape(1, 100, 2), 1.0),
    (cpu_scrape(0, 100, 50), cpu_scrape(1, 1, 1), None),  # counters went back: the server rebooted
    (cpu_scrape(0, 100, 50), cpu_scrape(1, 100, 50), None),  # no time passed on the server
])
def test_busy_between_two_scrapes(before: telemetry.Scrape, after: telemetry.Scrape,
                                  expected: float | None) -> None:
    assert telemetry.busy(before, after) == (None if expected is None else pytest.approx(expected))


def test_fold_takes_a_rise_at_once_smooths_a_fall_and_forgets_on_failure() -> None:
    reading = telemetry.fold(telemetry.Reading(), cpu_scrape(0, 0, 0), "", alpha=0.5)
    assert reading.cpu is None  # one scrape is no rate
    reading = telemetry.fold(reading, cpu_scrape(1, 0, 1), "", alpha=0.5)
    assert (reading.cpu, reading.raw) == (1.0, 1.0)  # the first rate is taken as it is
    reading = telemetry.fold(reading, cpu_scrape(2, 1, 1), "", alpha=0.5)
    assert (reading.cpu, reading.raw) == (0.5, 0.0)  # a fall is smoothed
    reading = telemetry.fold(reading, cpu_scrape(3, 1.1, 1.9), "", alpha=0.5)
    assert reading.cpu == pytest.approx(0.9)  # a rise is taken at once
    reading = telemetry.fold(reading, None, "connection refused", alpha=0.5)
    assert (reading.cpu, reading.error) == (None, "connection refused")


@pytest.mark.parametrize(("text", "problem"), [
    ("load: {enabled: true, steps: [{cpu: 80, weight: 50}, {cpu: 70, weight: 40}]}",
     "load.steps[1].cpu: 70 must be above the previous step's 80"),
    ("load: {enabled: true, steps: [{cpu: 70, weight: 50}, {cpu: 80, weight: 60}]}",
     "load.steps[1].weight: 60 is above the previous step's 50"),
    ("load: {enabled: true, steps: [{cpu: 70}]}", "load.steps[0].weight: is required"),
    ("load: {enabled: true, floor: 0}", "load.floor: 0 is out of range"),
    ("load: {enabled: true, period: 0.1}", "load.period: 0.1 is out of range"),
    ("load: {enabled: true, path: metrics}", "load.path: 'metrics' must start with '/'"),
    ("load: {enabled: true, port: 0}", "load.port: 0 is out of range"),
    ("load: {enable: true}", "load.enable: unknown key (did you mean 'enabled'?)"),
])
def test_load_config_errors_name_the_key(text: str, problem: str) -> None:
    assert_refused(CONFIG_TEXT_NO_HOLD_DOWN + text, problem)


def assert_refused(text: str, problem: str) -> None:
    """The loader refuses ``text`` with a problem line containing ``problem``."""
    with pytest.raises(ConfigError) as caught:
        load_config(text)
    assert any(problem in p for p in caught.value.problems), caught.value.problems


def test_load_signal_needs_weights_to_set_and_only_one_signal() -> None:
    assert_refused(CONFIG_TEXT_NO_HOLD_DOWN.replace("mode: ipvs", "mode: none") + "load: {enabled: true}",
                   "load.enabled: the load signal sets data-plane weights")
    assert_refused(CONFIG_TEXT_NO_HOLD_DOWN.replace("mode: ipvs", "mode: ipvs, load_weights: true")
                   + "load: {enabled: true}", "load.enabled: dataplane.load_weights")


# --- against a real prometheus-node-exporter on 127.0.0.1, reading a /proc/stat the test writes ---

EXPORTER = shutil.which("prometheus-node-exporter")


class Exporter:
    """prometheus-node-exporter (Debian's) with only its cpu collector, over a procfs the test owns."""

    def __init__(self, tmp: Path) -> None:
        self.procfs = tmp / "proc"
        self.procfs.mkdir()
        self.ticks = {"user": 0, "idle": 0}
        self.write()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        assert EXPORTER is not None
        self.proc = subprocess.Popen([EXPORTER, f"--web.listen-address=127.0.0.1:{self.port}",
                                      f"--path.procfs={self.procfs}", "--collector.disable-defaults",
                                      "--collector.cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            assert self.proc.poll() is None and time.monotonic() < deadline, "the exporter did not start"
            time.sleep(0.02)

    def run(self, seconds: float, busy: float) -> None:
        """`seconds` of one CPU pass, `busy` of it in user mode (USER_HZ = 100 ticks a second)."""
        self.ticks["user"] += round(seconds * busy * 100)
        self.ticks["idle"] += round(seconds * (1 - busy) * 100)
        self.write()

    def write(self) -> None:
        line = f"{self.ticks['user']} 0 0 {self.ticks['idle']} 0 0 0 0 0 0"
        (self.procfs / "stat").write_text(f"cpu  {line}\ncpu0 {line}\nbtime 1700000000\n")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.mark.skipif(EXPORTER is None, reason="needs Debian's prometheus-node-exporter (.ci/install)")
def test_a_real_node_exporter_moves_the_weights_by_the_step_table(tmp_path: Path) -> None:
    exporter = Exporter(tmp_path)
    config = load_config(f"""
pop: {{name: t1, asn: 65101, router_id: 192.0.2.1}}
neighbors: [{{address: 10.0.0.1, peer_as: 65000}}]
prefixes: [198.51.100.1/32]
servers: [{{name: a, address: 127.0.0.1, weight: 10}}, {{name: b, address: 127.0.0.2, weight: 10}}]
dataplane: {{mode: ipvs}}
load: {{enabled: true, port: {exporter.port}, timeout: 0.5}}
""")
    now = [0.0]
    signal = NodeExporterLoad(lambda: config, clock=lambda: now[0])

    async def read(busy: float) -> dict[str, int]:
        exporter.run(10.0, busy)
        factors = await signal()
        return {address: weighted(10, factor) for address, factor in factors.items()}

    async def main() -> list[dict[str, int]]:
        return [await read(busy) for busy in (0.0, 0.5, 0.8, 0.9, 0.6, 0.1)]

    try:
        seen = asyncio.run(main())
    finally:
        exporter.stop()
    # b (127.0.0.2) has no exporter: it keeps its configured weight throughout (fail-open)
    assert seen == [{"127.0.0.1": 10, "127.0.0.2": 10}, {"127.0.0.1": 10, "127.0.0.2": 10},
                    {"127.0.0.1": 8, "127.0.0.2": 10}, {"127.0.0.1": 5, "127.0.0.2": 10},
                    {"127.0.0.1": 8, "127.0.0.2": 10},  # 0.9 -> 0.6 smoothed by half: 0.75
                    {"127.0.0.1": 10, "127.0.0.2": 10}]
    view = signal.view()
    assert view["a"]["cpu"] == pytest.approx(0.425) and view["a"]["error"] is None
    assert view["b"]["cpu"] is None and "127.0.0.2" in str(view["b"]["error"])


def test_a_load_signal_turned_off_by_a_reload_hands_back_the_configured_weights() -> None:
    config = load_config(CONFIG_TEXT_NO_HOLD_DOWN + "load: {enabled: false}")
    signal = NodeExporterLoad(lambda: config)
    signal.factors = {"10.0.2.1": 0.5}
    assert asyncio.run(signal()) == {} and signal.view() == {}
