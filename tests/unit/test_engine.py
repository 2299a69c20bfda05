"""The engine's scheduling and wiring, with a recording fake speaker and scripted checks."""

import asyncio
from collections.abc import Sequence

import pytest

from pop.checks.base import CheckResult
from pop.config import load
from pop.desired import Announcement
from pop.engine import Engine
from pop.hysteresis import Policy, State

CONFIG_TEXT = """
pop: {name: t1, asn: 65101, router_id: 192.0.2.1}
neighbors: [{address: 10.0.0.1, peer_as: 65000}]
prefixes:
  - prefix: 198.51.100.1/32
    healthy: {med: 10}
    degraded: {med: 50}
servers: [{name: a, address: 10.0.2.1}, {name: b, address: 10.0.2.2}]
pool: {low_watermark: 0.5, high_watermark: 1.0, hold_down: 0.3}
"""
CONFIG = load(CONFIG_TEXT)
POLICY = Policy(rise=2, fall=3, fall_definitive=1, interval=0.02, fast_interval=0.01)
OK = CheckResult.success(0.001)
DOWN = CheckResult.failure("refused", definitive=True)


class FakeSpeaker:
    """Records every set() and fails on an impossible call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Announcement, ...]] = []
        self.current: tuple[Announcement, ...] = ()
        self.in_flight = False

    async def set(self, announcements: Sequence[Announcement], *, force: bool = False) -> None:
        assert not self.in_flight, "set() called concurrently: the applier must serialise"
        assert len({a.prefix for a in announcements}) == len(announcements), "duplicate prefix"
        self.in_flight = True
        await asyncio.sleep(0.001)
        self.in_flight = False
        self.current = tuple(announcements)
        self.calls.append(self.current)

    def announced(self) -> tuple[Announcement, ...]:
        return self.current


class Scripted:
    """A check whose answer the test flips."""

    tier = 1

    def __init__(self, name: str = "tcp") -> None:
        self._name = name
        self.result = OK
        self.timeout = 0.05
        self.probes = 0

    @property
    def name(self) -> str:
        return self._name

    async def probe(self) -> CheckResult:
        self.probes += 1
        return self.result


class ManualClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def engine_with(clock: ManualClock | None = None) -> tuple[Engine, FakeSpeaker, dict[str, Scripted]]:
    speaker = FakeSpeaker()
    checks = {"a": Scripted(), "b": Scripted()}
    engine = Engine(CONFIG, speaker, {name: [(check, POLICY)] for name, check in checks.items()},
                    clock=clock or ManualClock())
    return engine, speaker, checks


def feed(engine: Engine, server: str, result: CheckResult, times: int = 1) -> None:
    for _ in range(times):
        engine.observe(server, "tcp", result)


def test_starts_withdrawn_and_announces_after_rise() -> None:
    async def main() -> None:
        engine, _, _ = engine_with()
        engine.reevaluate()
        assert engine.desired == ()
        feed(engine, "a", OK, 2)
        assert engine.desired == ()  # high watermark 1.0: both must be up
        feed(engine, "b", OK, 2)
        assert [a.med for a in engine.desired] == [10]
        assert engine.verdict.reason == "2/2 healthy, servers up"

    asyncio.run(main())


def test_degraded_attributes_then_withdraw_then_hold_down() -> None:
    async def main() -> None:
        clock = ManualClock()
        engine, _, _ = engine_with(clock)
        feed(engine, "a", OK, 2)
        feed(engine, "b", OK, 2)
        feed(engine, "a", DOWN)  # fall_definitive 1
        assert engine.health["a"].state is State.DOWN
        assert [a.med for a in engine.desired] == [50]  # 1/2 is not below 0.5: degraded
        feed(engine, "b", DOWN)
        assert engine.desired == ()
        assert engine.verdict.reason == "0/2 healthy, below low watermark 0.5"
        feed(engine, "a", OK, 2)
        feed(engine, "b", OK, 2)
        assert engine.desired == () and engine.verdict.hold_down_until == pytest.approx(100.3)
        clock.now = 100.31
        engine.reevaluate()
        assert [a.med for a in engine.desired] == [10]
        kinds = [(e.kind, e.subject, e.new) for e in engine.events]
        assert ("verdict", "t1", "withdrawn") in kinds and kinds[-1] == ("verdict", "t1", "announced")

    asyncio.run(main())


def test_running_engine_applies_newest_state_and_probes_faster_while_changing() -> None:
    async def main() -> None:
        engine, speaker, checks = engine_with(clock=None)
        engine.clock = asyncio.get_running_loop().time
        engine.started = engine.clock()
        task = asyncio.create_task(engine.run())
        try:
            async with asyncio.timeout(2):
                while not speaker.current:
                    await asyncio.sleep(0.005)
            assert speaker.current[0].med == 10
            checks["a"].result = DOWN
            checks["b"].result = DOWN
            async with asyncio.timeout(2):
                while speaker.current:
                    await asyncio.sleep(0.005)
            # recovery waits out the 0.3 s hold-down
            checks["a"].result = OK
            checks["b"].result = OK
            started = asyncio.get_running_loop().time()
            async with asyncio.timeout(3):
                while not speaker.current:
                    await asyncio.sleep(0.005)
            assert asyncio.get_running_loop().time() - started >= 0.3
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        meds = [c[0].med if c else None for c in speaker.calls]
        while meds and meds[0] is None:
            meds.pop(0)  # the applier's first pass states the empty set
        # announce, maybe degraded while the second failure is folded in, withdraw, re-announce
        assert meds in ([10, None, 10], [10, 50, None, 10])
        assert all(c.probes > 10 for c in checks.values())

    asyncio.run(main())


def test_a_crashing_check_is_a_failed_check() -> None:
    class Crashing(Scripted):
        async def probe(self) -> CheckResult:
            raise RuntimeError("boom")

    async def main() -> None:
        speaker = FakeSpeaker()
        crash = Crashing()
        engine = Engine(CONFIG, speaker, {"a": [(crash, POLICY)], "b": [(Scripted(), POLICY)]})
        task = asyncio.create_task(engine.run())
        try:
            async with asyncio.timeout(10):  # a busy machine is slower, never wrong
                while engine.tiers["a"]["tcp"].state is not State.DOWN:
                    await asyncio.sleep(0.01)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert "boom" in engine.tiers["a"]["tcp"].reason

    asyncio.run(main())


def test_reload_keeps_state_of_unchanged_servers() -> None:
    async def main() -> None:
        engine, _, _ = engine_with()
        feed(engine, "a", OK, 2)
        feed(engine, "b", OK, 2)
        announced = engine.desired
        new = load(CONFIG_TEXT.replace("{name: b, address: 10.0.2.2}]",
                                       "{name: b, address: 10.0.2.2}, {name: c, address: 10.0.2.3}]")
                   .replace("high_watermark: 1.0", "high_watermark: 0.6"))

        engine.reload(new, {name: [(Scripted(), POLICY)] for name in ("a", "b", "c")})
        assert engine.tiers["a"]["tcp"].state is State.UP
        assert engine.tiers["c"]["tcp"].state is State.INIT
        assert engine.verdict.announce
        assert [a.prefix for a in engine.desired] == [a.prefix for a in announced]
        assert engine.desired[0].med == 10  # c is new and rising: no loss of capacity, no UPDATE
        engine.observe("c", "tcp", DOWN)
        assert engine.desired[0].med == 50  # c failed: degraded

    asyncio.run(main())


def test_periodic_reassertion_resends_unchanged_announcements() -> None:
    class Counting(FakeSpeaker):
        def __init__(self) -> None:
            super().__init__()
            self.forced = 0

        async def set(self, announcements: Sequence[Announcement], *, force: bool = False) -> None:
            self.forced += force
            await super().set(announcements, force=force)

    async def main() -> None:
        config = load(CONFIG_TEXT + "exabgp: {reassert_interval: 0.1}\n")
        speaker = Counting()
        engine = Engine(config, speaker, {"a": [(Scripted(), POLICY)], "b": [(Scripted(), POLICY)]})
        task = asyncio.create_task(engine.run())
        try:
            async with asyncio.timeout(10):  # a busy machine is slower, never wrong
                while speaker.forced < 4:
                    await asyncio.sleep(0.02)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert all(len(call) == 1 for call in speaker.calls[1:])  # the same announcement each time

    asyncio.run(main())
