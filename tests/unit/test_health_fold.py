"""Health.fold's shortcut for an UP tier staying UP gives the combination combine() gives."""

from __future__ import annotations

import pytest

from pop import hysteresis
from pop.checks.base import CheckResult
from pop.config import Server
from pop.health import Health
from pop.hysteresis import Policy, State, TierState

POLICY = Policy(rise=3, fall=6, fall_definitive=2, interval=0.2, fast_interval=0.05)


@pytest.mark.parametrize("other", list(State))
@pytest.mark.parametrize("result", [CheckResult.success(0.001), CheckResult.failure("timeout")])
def test_an_up_tier_folds_to_the_combination_of_its_tiers(other: State, result: CheckResult) -> None:
    board = Health([Server("s", "192.0.2.1")], {"s": {"tcp": POLICY, "wireguard": POLICY}}, 0.0)
    board.tiers["s"] = {"tcp": TierState(State.UP), "wireguard": TierState(other, reason=f"{other.value} why")}
    board.servers["s"] = hysteresis.combine(board.tiers["s"])
    moved = board.fold("s", "tcp", result, 1.0)
    assert moved is not None
    assert moved.server[1] == board.servers["s"] == hysteresis.combine(board.tiers["s"])
