"""The probe schedule (pop.probes) and the engine's reload of it, with real asyncio tasks."""

from __future__ import annotations

import asyncio

import pytest

from pop.checks.base import CheckResult
from pop.config import load
from pop.engine import Engine
from pop.hysteresis import State
from pop.probes import Probes
from tests.unit.test_engine import CONFIG_TEXT, DOWN, OK, POLICY, FakeSpeaker, Scripted


class Held(Scripted):
    """A check whose probes wait until the test releases them, then answer `result`."""

    def __init__(self) -> None:
        super().__init__()
        self.timeout = 5.0
        self.release = asyncio.Event()
        self.started = 0
        self.cancelled = 0

    async def probe(self) -> CheckResult:
        self.started += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return self.result


async def until(predicate: object, within: float = 5.0) -> None:
    async with asyncio.timeout(within):  # a busy machine is slower, never wrong
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.005)


def test_a_result_older_than_one_already_handed_on_is_dropped() -> None:
    class FirstSlow(Scripted):
        def __init__(self) -> None:
            super().__init__()
            self.timeout = 5.0
            self.release = asyncio.Event()

        async def probe(self) -> CheckResult:
            self.probes += 1
            if self.probes == 1:
                await self.release.wait()
                return DOWN  # answers last, but was asked first
            return OK

    async def main() -> None:
        seen: list[CheckResult] = []
        check = FirstSlow()
        probes = Probes(lambda _s, _t, result: seen.append(result), lambda _s, _t: 0.01,
                        clock=asyncio.get_running_loop().time)
        async with asyncio.TaskGroup() as group:
            probes.start(group, {"a": [(check, POLICY)]}, ["a"])
            await until(lambda: len(seen) >= 2)
            check.release.set()
            await asyncio.sleep(0.05)
            probes.stop()
        assert DOWN not in seen and all(r == OK for r in seen)

    asyncio.run(main())


def test_reload_drops_probes_in_flight_of_a_changed_server() -> None:
    """A probe of the old address that answers after the reload must not count for the new one."""
    async def main() -> None:
        old = Held()
        engine = Engine(load(CONFIG_TEXT), FakeSpeaker(), {"a": [(old, POLICY)], "b": [(Scripted(), POLICY)]},
                        clock=asyncio.get_running_loop().time)
        task = asyncio.create_task(engine.run())
        try:
            await until(lambda: old.started >= 1)  # a probe of 10.0.2.1 is in flight
            new = Held()
            engine.reload(load(CONFIG_TEXT.replace("10.0.2.1", "10.0.2.9")),
                          {"a": [(new, POLICY)], "b": [(Scripted(), POLICY)]})
            old.release.set()  # the old address answers now
            await until(lambda: new.started >= 1)
            await asyncio.sleep(0.1)
            tier = engine.tiers["a"]["tcp"]
            assert (tier.state, tier.successes, tier.failures) == (State.INIT, 0, 0), tier
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())


def test_one_round_probes_every_enabled_server_once() -> None:
    async def main() -> None:
        a, b = Scripted(), Scripted()
        b.result = DOWN
        probes = Probes(lambda *_: None, lambda *_: 1.0)
        results = await probes.round({"a": [(a, POLICY)], "b": [(b, POLICY)]}, ["a", "b"])
        assert results == {("a", "tcp"): OK, ("b", "tcp"): DOWN}
        assert (a.probes, b.probes) == (1, 1)

    asyncio.run(main())


def test_reload_keeps_the_probes_of_an_unchanged_server_in_flight_and_counts_their_answers() -> None:
    """One changed server among many: the others' probes are neither cancelled nor restarted."""
    async def main() -> None:
        a_old, b = Held(), Held()
        engine = Engine(load(CONFIG_TEXT), FakeSpeaker(), {"a": [(a_old, POLICY)], "b": [(b, POLICY)]},
                        clock=asyncio.get_running_loop().time)
        task = asyncio.create_task(engine.run())
        try:
            await until(lambda: a_old.started >= 1 and b.started >= 1)  # a probe of each in flight
            before = engine.tiers["b"]["tcp"]
            a_new = Held()
            engine.reload(load(CONFIG_TEXT.replace("10.0.2.1", "10.0.2.9")), {"a": [(a_new, POLICY)], "b": [(b, POLICY)]})
            await asyncio.sleep(0)  # a cancelled task learns it at its next turn
            assert engine.tiers["b"]["tcp"] is before
            assert a_old.cancelled == a_old.started and b.cancelled == 0
            a_old.release.set()
            b.release.set()  # both answer now: only b's answer is b's
            await until(lambda: engine.tiers["b"]["tcp"].successes > before.successes)
            assert (engine.tiers["a"]["tcp"].successes, engine.tiers["a"]["tcp"].failures) == (0, 0)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())


def test_the_backstop_deadline_leaves_a_tunnel_check_its_data_exchange() -> None:
    from pop.probes import _deadline

    class Tunnel:
        timeout, data_timeout = 1.0, 0.3

    class Plain:
        timeout = 1.0

    assert _deadline(Tunnel()) == 2.8  # type: ignore[arg-type]
    assert _deadline(Plain()) == 2.5  # type: ignore[arg-type]
