"""The pool and the server-drain machine, as tables (pure; time is an argument)."""

from __future__ import annotations

import pytest

from pop import drains, pool
from pop.drains import ServerDrain
from pop.hysteresis import ServerHealth, State

UP = ServerHealth(State.UP, "", "all tiers up")
FALLING = ServerHealth(State.FALLING, "tcp", "timeout 1/3")
DOWN = ServerHealth(State.DOWN, "tcp", "refused")
INIT = ServerHealth(State.INIT, "tcp", "no result yet")
SERVERS = (pool.Server("a", "10.0.0.1", 1), pool.Server("b", "10.0.0.2", 4))
DRAINING = ServerDrain(since=0.0)
DRAINED = ServerDrain(since=0.0, done=True, reason="drained: connections gone")


@pytest.mark.parametrize(("a", "b", "drain_b", "healthy", "settled", "members"), [
    (UP, UP, None, 2, True, (("10.0.0.1", 1), ("10.0.0.2", 4))),
    (UP, FALLING, None, 2, True, (("10.0.0.1", 1), ("10.0.0.2", 4))),  # falling is still in the pool
    (UP, DOWN, None, 1, True, (("10.0.0.1", 1),)),
    (UP, INIT, None, 1, False, (("10.0.0.1", 1),)),
    (UP, UP, DRAINING, 1, True, (("10.0.0.1", 1), ("10.0.0.2", 0))),  # quiescent: weight 0, not counted
    (UP, UP, DRAINED, 1, True, (("10.0.0.1", 1),)),
    (UP, DOWN, DRAINING, 1, True, (("10.0.0.1", 1),)),  # a dead server leaves even while draining
])
def test_one_definition_of_the_pool(a: ServerHealth, b: ServerHealth, drain_b: ServerDrain | None, *,
                                    healthy: int, settled: bool, members: tuple[tuple[str, int], ...]) -> None:
    health = {"a": a, "b": b}
    drain = {"b": drain_b} if drain_b else {}
    view = pool.view(SERVERS, health, drain)
    assert (view.healthy, view.total, view.settled) == (healthy, 2, settled)
    assert pool.members(SERVERS, health, drain, {}) == members
    assert pool.in_pool(b, drain_b) == (healthy == 2)


def test_load_factors_scale_weights_but_never_to_zero() -> None:
    assert pool.members(SERVERS, {"a": UP, "b": UP}, {}, {"10.0.0.2": 0.25, "10.0.0.1": 0.01}) == (
        ("10.0.0.1", 1), ("10.0.0.2", 1))
    assert pool.load_weights(SERVERS, {"a": UP, "b": DOWN}, {}) == {"10.0.0.1": 1}


@pytest.mark.parametrize(("mode", "pins", "done"), [("ipvs", False, False), ("ecmp", True, False),
                                                      ("ecmp", False, True), ("none", False, True)])
def test_start_is_quiescent_only_where_the_data_plane_has_weight_zero(mode: str, pins: bool, done: bool) -> None:
    drain = drains.start(mode, pins, 5.0)
    assert (drain.since, drain.done) == (5.0, done)


@pytest.mark.parametrize(("connections", "now", "finished"), [
    ({"10.0.0.2": 3}, 10.0, []),
    ({}, 10.0, [("b", "connections gone")]),
    ({"10.0.0.2": 3}, 60.0, [("b", "drain_timeout passed with 3 connections")]),
])
def test_finish(connections: dict[str, int], now: float, finished: list[tuple[str, str]]) -> None:
    current = {"b": DRAINING, "a": DRAINED}
    new, done = drains.finish(current, {"a": "10.0.0.1", "b": "10.0.0.2"}, connections, timeout=60.0, now=now)
    assert done == finished
    assert new["a"] is DRAINED
    assert new["b"].done == bool(finished)
    assert drains.pending(new.values()) == (not finished)


def test_a_new_server_rising_for_the_first_time_does_not_degrade_the_pop() -> None:
    from pop.checks.base import CheckResult
    from pop.hysteresis import TierState

    rising = TierState(State.RISING, streak=1, successes=1)
    fell = TierState(State.RISING, streak=1, successes=3, failures=1)
    health = {"a": UP, "b": ServerHealth(State.RISING, "tcp", "ok 1/3")}
    assert not pool.degraded(health, {"a": {"tcp": TierState(State.UP)}, "b": {"tcp": rising}})
    assert not pool.degraded(health, {"a": {"tcp": TierState(State.UP)},
                                      "b": {"tcp": TierState(State.UP, successes=3), "wireguard": rising}})
    assert pool.degraded(health, {"a": {"tcp": TierState(State.UP)}, "b": {"tcp": fell}})
    assert pool.degraded({"a": UP, "b": DOWN}, {"b": {"tcp": TierState(State.DOWN, last=CheckResult(ok=False),
                                                                        failures=1)}})
