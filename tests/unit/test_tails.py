"""Latency tails, failure rates and the degraded mark (pop.tails), as tables with time passed in;
and the engine lowering (not removing) a degraded server's weight."""

import asyncio

import pytest

from pop.checks.base import CheckResult
from pop.config import load as load_config
from pop.engine import Engine
from pop.tails import Board, Policy, Tail, Window, percentile, step
from tests.unit.test_engine import Scripted
from tests.unit.test_engine_order import CONFIG_TEXT_NO_HOLD_DOWN, POLICY, FakeDataplane, FakeSpeaker, World
from tests.unit.test_load import assert_refused

OK = CheckResult.success
FAIL = CheckResult.failure("timeout")


@pytest.mark.parametrize(("values", "q", "expected"), [
    ([], 99, None),
    ([5.0], 50, 5.0),
    ([1.0, 2.0, 3.0, 4.0], 50, 2.0),  # nearest rank: ceil(0.5 x 4) = 2nd
    ([float(i) for i in range(1, 101)], 99, 99.0),
    ([float(i) for i in range(1, 101)], 95, 95.0),
    ([float(i) for i in range(1, 11)], 99, 10.0),  # few samples: p99 is the worst
])
def test_percentile_is_nearest_rank(values: list[float], q: float, expected: float | None) -> None:
    assert percentile(values, q) == expected


def test_window_summarises_rtts_and_failures() -> None:
    window = Window(span=10.0, max_samples=100, refresh=0)
    for i in range(1, 11):
        window.add(float(i) * 0.1, OK(i / 1000))
    window.add(1.05, FAIL)
    assert window.summary(1.1) == Tail(11, 1, 0.005, 0.010, 0.010)
    assert window.summary(1.1).failure_rate == pytest.approx(1 / 11)


def test_window_forgets_what_is_older_than_its_span() -> None:
    window = Window(span=10.0, max_samples=100, refresh=0)
    window.add(0.0, FAIL)
    window.add(5.0, OK(0.2))
    assert window.summary(9.9).count == 2
    assert window.summary(10.0) == Tail(1, 0, 0.2, 0.2, 0.2)  # the failure at 0.0 left the window
    assert window.summary(15.0) == Tail(0, 0, None, None, None)


def test_a_success_without_an_rtt_counts_for_the_failure_rate_only() -> None:
    window = Window(span=10.0, max_samples=100, refresh=0)
    window.add(1.0, CheckResult(ok=True))
    window.add(2.0, OK(0.3))
    window.add(3.0, FAIL)
    assert window.summary(3.0) == Tail(3, 1, 0.3, 0.3, 0.3)


def test_window_keeps_at_most_max_samples() -> None:
    window = Window(span=1e9, max_samples=50, refresh=0)
    for i in range(1000):
        window.add(float(i), FAIL if i < 950 else OK(0.001))
    assert window.summary(1000.0) == Tail(50, 0, 0.001, 0.001, 0.001)  # the 50 newest only


MARKS = Policy(p99=0.2, failure_rate=0.1, min_samples=10, recover=0.5)


def tail(count: int = 100, failures: int = 0, p99: float | None = 0.05) -> Tail:
    return Tail(count, failures, p99, p99, p99)


@pytest.mark.parametrize(("before", "tails", "after"), [
    ("", [tail()], ""),
    ("", [tail(p99=0.25)], "p99 250.0 ms > 200.0 ms"),
    ("", [tail(failures=11)], "failure rate 11.0% > 10.0%"),
    ("", [tail(count=9, failures=9)], ""),  # fewer than min_samples decide nothing
    ("", [tail(), tail(p99=0.3)], "p99 300.0 ms > 200.0 ms"),  # any tier marks it
    ("p99", [tail(p99=0.15)], "p99"),  # below the threshold, above threshold x recover: held
    ("p99", [tail(p99=0.09)], ""),  # below threshold x recover: recovered
    ("p99", [tail(p99=0.09, failures=6)], "p99"),  # another tier's measure still above its recover line
    ("p99", [tail(p99=0.09), tail(p99=0.11)], "p99"),  # every tier must be back
    ("p99", [tail(count=0, p99=None)], ""),  # nothing left in the window: nothing holds it
])
def test_degraded_mark_has_hysteresis(before: str, tails: list[Tail], after: str) -> None:
    assert step(before, tails, MARKS) == after


def test_board_marks_a_slow_server_and_clears_it_with_time() -> None:
    board = Board(Policy(window=10.0, p99=0.1, min_samples=5, recover=0.5), ["a", "b"])
    moved = [board.observe("a", "tcp", OK(0.3), float(t)) for t in range(5)]
    assert moved == [False] * 4 + [True]
    assert board.degraded["a"].startswith("p99 300.0 ms") and board.degraded["b"] == ""
    assert board.factors({"a": "10.0.0.1", "b": "10.0.0.2"}) == {"10.0.0.1": 0.5}
    assert [board.observe("a", "tcp", OK(0.01), 10.0 + t) for t in range(5)] == [False] * 4 + [True]
    assert board.degraded["a"] == ""
    assert not board.observe("gone", "tcp", OK(0.01), 20.0)  # a server no longer configured


def test_board_without_thresholds_only_measures() -> None:
    board = Board(Policy(window=10.0), ["a"])
    assert not any(board.observe("a", "tcp", FAIL, float(t)) for t in range(100))
    assert board.of("a", 99.0)["tcp"].failures == 10  # the last 10 s


def test_a_reload_keeps_the_windows() -> None:
    old = Board(Policy(p99=0.1, min_samples=1), ["a", "b"])
    old.observe("a", "tcp", OK(0.5), 0.0)
    new = Board(Policy(p99=0.1, min_samples=1), ["a", "c"], old)
    assert new.of("a", 1.0)["tcp"].count == 1 and new.degraded["a"]
    assert set(new.windows) == {"a", "c"}


@pytest.mark.parametrize(("text", "problem"), [
    ("tails: {degraded: {p99_ms: 0}}", "tails.degraded.p99_ms: 0 is out of range"),
    ("tails: {degraded: {failure_rate: 2}}", "tails.degraded.failure_rate: 2 is out of range"),
    ("tails: {degraded: {weight: 50}}", "tails.degraded: names no threshold"),
    ("tails: {degraded: {p99_ms: 200, weight: 0}}", "tails.degraded.weight: 0 is out of range"),
    ("tails: {window: 0.1}", "tails.window: 0.1 is out of range"),
    ("tails: {max_samples: 20, degraded: {p99_ms: 5, min_samples: 50}}",
     "tails.degraded.min_samples: 50 is out of range"),
    ("tails: {degrade: {}}", "tails.degrade: unknown key (did you mean 'degraded'?)"),
])
def test_tails_config_errors_name_the_key(text: str, problem: str) -> None:
    assert_refused(CONFIG_TEXT_NO_HOLD_DOWN + text, problem)


def test_engine_lowers_a_slow_servers_weight_but_keeps_it_in_the_pool() -> None:
    async def main() -> None:
        world = World()
        config = load_config(CONFIG_TEXT_NO_HOLD_DOWN.replace("{name: b, address: 10.0.2.2}",
                                                              "{name: b, address: 10.0.2.2, weight: 10}")
                             + "tails: {window: 30, degraded: {p99_ms: 100, min_samples: 4, weight: 40}}\n")
        now = [0.0]
        engine = Engine(config, FakeSpeaker(world), {n: [(Scripted(), POLICY)] for n in ("a", "b")},
                        dataplane=FakeDataplane(world), clock=lambda: now[0])

        def weights() -> dict[str, int]:
            return {r.address: r.weight for r in engine.desired_state.services[0].reals}

        for t in range(3):
            now[0] = float(t)
            engine.observe("a", "tcp", OK(0.001))
            engine.observe("b", "tcp", OK(0.5 if t else 0.001))
        assert weights() == {"10.0.2.1": 1, "10.0.2.2": 10}  # slow, but fewer than min_samples results
        now[0] = 3.0
        engine.observe("b", "tcp", OK(0.5))
        assert weights() == {"10.0.2.1": 1, "10.0.2.2": 4}  # 10 x 40 %: slow, not down
        assert engine.health["b"].in_pool and engine.events[-1].kind == "tails"
        snap = engine.snapshot()
        b = next(s for s in snap.servers if s.name == "b")
        assert b.degraded.startswith("p99 500.0 ms") and b.factor == 0.4 and b.tails["tcp"].count == 4
        now[0] = 40.0  # the slow probes left the window
        for _ in range(3):
            engine.observe("b", "tcp", OK(0.001))
        assert weights() == {"10.0.2.1": 1, "10.0.2.2": 10}

    asyncio.run(main())


def test_status_and_metrics_show_the_tails() -> None:
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from pop.metrics import PopCollector
    from pop.status import servers_json

    config = load_config(CONFIG_TEXT_NO_HOLD_DOWN + "tails: {degraded: {failure_rate: 0.3, min_samples: 2}}\n")
    now = [0.0]
    engine = Engine(config, FakeSpeaker(World()), {n: [(Scripted(), POLICY)] for n in ("a", "b")},
                    clock=lambda: now[0])
    for result in (OK(0.002), OK(0.004), FAIL, FAIL):
        now[0] += 1
        engine.observe("a", "tcp", result)
    snap = engine.snapshot()
    a = servers_json(snap)[0]
    assert a["tails"] == {"tcp": {"count": 4, "failures": 2, "failure_rate": 0.5, "p50_ms": 2.0, "p95_ms": 4.0,
                                  "p99_ms": 4.0}}
    # marked at the third result (1 of 3 failed), and it keeps that reason
    assert a["degraded"] == "failure rate 33.3% > 30.0%" and a["load_factor"] == 0.5 and a["load"] is None
    registry = CollectorRegistry()
    registry.register(PopCollector(lambda: snap, lambda _: "announced"))
    text = generate_latest(registry).decode()
    assert 'pop_check_rtt_percentile_seconds{percentile="99",pop="t1",server="a",tier="tcp"} 0.004' in text
    assert 'pop_check_failure_ratio{pop="t1",server="a",tier="tcp"} 0.5' in text
    assert 'pop_server_degraded{pop="t1",server="a"} 1.0' in text
    assert 'pop_server_weight_factor_ratio{pop="t1",server="a"} 0.5' in text


def test_a_summary_is_reused_for_refresh_seconds() -> None:
    window = Window(span=10.0, max_samples=100, refresh=1.0)
    window.add(0.0, OK(0.1))
    assert window.summary(0.0).count == 1
    window.add(0.5, FAIL)
    assert window.summary(0.9).count == 1  # not sorted again within the second
    assert window.summary(1.0) == Tail(2, 1, 0.1, 0.1, 0.1)


def test_the_ring_wraps_and_expires_across_the_wrap() -> None:
    window = Window(span=5.0, max_samples=4, refresh=0)
    for t in range(10):  # 0..9, every third a failure; the ring of 4 wraps twice
        window.add(float(t), OK(t / 1000) if t % 3 else FAIL)
    assert window.summary(9.0) == Tail(4, 2, 0.007, 0.008, 0.008)  # 6 (failed), 7, 8, 9 (failed)
    assert window.summary(12.5) == Tail(2, 1, 0.008, 0.008, 0.008)  # 8 and 9: the expiry crossed the wrap
    window.add(13.0, FAIL)
    assert window.summary(13.0) == Tail(2, 2, None, None, None)  # 9 and 13, both failed
