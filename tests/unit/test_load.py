"""Load-following weights, as tables; and the engine folding a reading into IPVS weights."""

import asyncio

import pytest

from pop.config import load as load_config
from pop.engine import Engine
from pop.load import connection_factors, smooth, weighted
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
