"""The per-server state machine, as tables."""

import pytest

from pop.checks.base import CheckResult
from pop.hysteresis import Policy, ServerHealth, State, TierState, combine, interval, step

POLICY = Policy(rise=3, fall=4, fall_definitive=2, interval=1.0, fast_interval=0.1)
OK = CheckResult.success(0.001)
SILENT = CheckResult.failure("timeout")
REFUSED = CheckResult.failure("refused", definitive=True)


@pytest.mark.parametrize(("state", "streak", "definitive", "result", "expected"), [
    # from INIT: one ok starts rising, one failure is down (it was never up)
    (State.INIT, 0, 0, OK, (State.RISING, 1)),
    (State.INIT, 0, 0, SILENT, (State.DOWN, 0)),
    (State.INIT, 0, 0, REFUSED, (State.DOWN, 0)),
    # rising needs `rise` successes in a row; any failure sends it back down
    (State.RISING, 1, 0, OK, (State.RISING, 2)),
    (State.RISING, 2, 0, OK, (State.UP, 0)),
    (State.RISING, 2, 0, SILENT, (State.DOWN, 0)),
    # up: a failure starts falling; success keeps it up
    (State.UP, 0, 0, OK, (State.UP, 0)),
    (State.UP, 0, 0, SILENT, (State.FALLING, 1)),
    (State.UP, 0, 0, REFUSED, (State.FALLING, 1)),
    # falling: silence needs `fall` in a row, definitive failures only `fall_definitive`
    (State.FALLING, 1, 0, SILENT, (State.FALLING, 2)),
    (State.FALLING, 3, 0, SILENT, (State.DOWN, 0)),
    (State.FALLING, 1, 1, REFUSED, (State.DOWN, 0)),
    (State.FALLING, 1, 0, REFUSED, (State.FALLING, 2)),
    (State.FALLING, 2, 1, SILENT, (State.FALLING, 3)),
    (State.FALLING, 3, 1, OK, (State.UP, 0)),
    # down: the first success starts rising
    (State.DOWN, 0, 0, SILENT, (State.DOWN, 0)),
    (State.DOWN, 0, 0, OK, (State.RISING, 1)),
    (State.DISABLED, 0, 0, OK, (State.DISABLED, 0)),
])
def test_step(state: State, streak: int, definitive: int, result: CheckResult, expected: tuple[State, int]) -> None:
    current = TierState(state=state, streak=streak, definitive=definitive, since=5.0)
    new = step(current, result, POLICY, now=10.0)
    assert (new.state, new.streak) == expected
    assert new.last is result
    assert new.since == (5.0 if new.state is state else 10.0)


def test_rise_of_one_goes_straight_up() -> None:
    policy = Policy(rise=1, fall=1, fall_definitive=1, interval=1.0, fast_interval=0.5)
    assert step(TierState(), OK, policy, 0.0).state is State.UP
    assert step(TierState(state=State.UP), SILENT, policy, 0.0).state is State.DOWN


def test_definitive_count_resets_with_a_new_streak() -> None:
    tier = TierState(state=State.UP)
    tier = step(tier, REFUSED, POLICY, 1.0)  # falling, 1 definitive
    tier = step(tier, OK, POLICY, 2.0)  # back up: the streak is over
    tier = step(tier, REFUSED, POLICY, 3.0)
    assert (tier.state, tier.definitive) == (State.FALLING, 1)


def test_reason_names_the_evidence() -> None:
    tier = TierState(state=State.FALLING, streak=3)
    down = step(tier, CheckResult.failure("timeout", detail="no SYN-ACK"), POLICY, 1.0)
    assert down.reason == "timeout: no SYN-ACK; fell after 4 failures"
    assert (down.successes, down.failures) == (0, 1)


@pytest.mark.parametrize(("state", "pace"), [
    (State.INIT, 0.1), (State.RISING, 0.1), (State.FALLING, 0.1), (State.UP, 1.0), (State.DOWN, 1.0),
])
def test_faster_interval_while_changing(state: State, pace: float) -> None:
    assert interval(TierState(state=state), POLICY) == pace


@pytest.mark.parametrize(("own", "other", "pace"), [
    (State.DOWN, State.RISING, 0.1),  # the server's port answers again: confirm the handshake fast
    (State.UP, State.FALLING, 0.1),
    (State.DOWN, State.DOWN, 1.0),  # a dead server stays at the stable pace
    (State.UP, State.UP, 1.0),
    (State.UP, State.DOWN, 1.0),  # alive but useless, settled: nothing is changing
])
def test_a_changing_tier_speeds_up_the_servers_other_tiers(own: State, other: State, pace: float) -> None:
    tier = TierState(state=own)
    assert interval(tier, POLICY, [tier, TierState(state=other)]) == pace


@pytest.mark.parametrize(("tiers", "expected"), [
    ({"tcp": State.UP, "wireguard": State.UP}, (State.UP, "", True)),
    ({"tcp": State.UP, "wireguard": State.FALLING}, (State.FALLING, "wireguard", True)),
    ({"tcp": State.UP, "wireguard": State.DOWN}, (State.DOWN, "wireguard", False)),  # alive but useless
    ({"tcp": State.DOWN, "wireguard": State.UP}, (State.DOWN, "tcp", False)),
    ({"tcp": State.UP, "wireguard": State.RISING}, (State.RISING, "wireguard", False)),  # both must rise
    ({"tcp": State.INIT, "wireguard": State.DOWN}, (State.DOWN, "wireguard", False)),
    ({}, (State.INIT, "", False)),
])
def test_combine(tiers: dict[str, State], expected: tuple[State, str, bool]) -> None:
    health = combine({name: TierState(state=s, reason=f"{name} says {s.value}") for name, s in tiers.items()})
    assert (health.state, health.tier, health.in_pool) == expected


def test_disabled_server_is_out_of_the_pool() -> None:
    health = combine({"tcp": TierState(state=State.UP)}, enabled=False)
    assert health == ServerHealth(State.DISABLED, "", "disabled by configuration")
    assert not health.in_pool
