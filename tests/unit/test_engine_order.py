"""Order at the edges, with fakes that fail on an impossible order (the MetalLB pattern):
the data plane exists before the prefix is announced, and stays until the withdraw has had
`withdraw_dwell` to propagate."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from pop.applier import DataplaneFailure
from pop.config import load
from pop.desired import Announcement, DesiredState
from pop.engine import Engine
from pop.hysteresis import Policy
from tests.unit.test_engine import DOWN, OK, Scripted

CONFIG = load("""
pop: {name: t1, asn: 65101, router_id: 192.0.2.1}
neighbors: [{address: 10.0.0.1, peer_as: 65000}]
prefixes: [198.51.100.1/32]
servers: [{name: a, address: 10.0.2.1}, {name: b, address: 10.0.2.2, weight: 3}]
pool: {low_watermark: 0.5, high_watermark: 1.0, hold_down: 0.2}
dataplane: {mode: ipvs, withdraw_dwell: 0.3, services: [{protocol: udp, port: 51820}]}
""")
POLICY = Policy(rise=1, fall=1, fall_definitive=1, interval=0.02, fast_interval=0.01)


class World:
    """The fake kernel and the fake BGP session, with one shared timeline."""

    def __init__(self) -> None:
        self.log: list[tuple[float, str, object]] = []
        self.dataplane = DesiredState()
        self.announced: tuple[Announcement, ...] = ()
        self.fail_dataplane = False


class FakeSpeaker:
    def __init__(self, world: World) -> None:
        self.world = world

    async def set(self, announcements: Sequence[Announcement], *, force: bool = False) -> None:
        if announcements:
            assert self.world.dataplane.vips, "announce before the VIP exists"
            assert self.world.dataplane.services, "announce before the IPVS service exists"
        await asyncio.sleep(0)
        self.world.announced = tuple(announcements)
        self.world.log.append((asyncio.get_running_loop().time(), "bgp", tuple(a.prefix for a in announcements)))

    def announced(self) -> tuple[Announcement, ...]:
        return self.world.announced


class FakeDataplane:
    def __init__(self, world: World) -> None:
        self.world = world

    async def set(self, state: DesiredState, *, verify: bool = False) -> tuple[str, ...]:
        if not state.vips:
            assert not self.world.announced, "data plane torn down while still announced"
        if self.world.fail_dataplane:
            raise DataplaneFailure("ip_vs: module not loaded")
        await asyncio.sleep(0)
        changed = state != self.world.dataplane
        self.world.dataplane = state
        self.world.log.append((asyncio.get_running_loop().time(), "dataplane", state))
        return ("changed",) if changed else ()

    def reconfigure(self, *_: object) -> None:
        pass


async def scenario(world: World, checks: dict[str, Scripted], engine: Engine) -> None:
    async def until(predicate: object) -> None:
        async with asyncio.timeout(3.0):
            while not predicate():  # type: ignore[operator]
                await asyncio.sleep(0.005)

    await until(lambda: world.announced)
    service = world.dataplane.services[0]
    assert (service.protocol, service.address, service.port, service.scheduler) == ("udp", "198.51.100.1", 51820, "mh")
    assert {(r.address, r.weight) for r in service.reals} == {("10.0.2.1", 1), ("10.0.2.2", 3)}
    # one server fails: it leaves IPVS while the PoP stays announced
    checks["a"].result = DOWN
    await until(lambda: len(world.dataplane.services[0].reals) == 1)
    assert world.announced
    # the other fails too: BGP withdraws first, the data plane stays for the dwell
    checks["b"].result = DOWN
    await until(lambda: not world.announced)
    withdrawn_at = asyncio.get_running_loop().time()
    await until(lambda: not world.dataplane.vips)
    teardown = next(t for t, kind, what in world.log if kind == "dataplane" and not what.vips)  # type: ignore[attr-defined]
    assert teardown - withdrawn_at >= 0.29


def test_order_announce_after_dataplane_teardown_after_dwell() -> None:
    async def main() -> None:
        world = World()
        checks = {"a": Scripted(), "b": Scripted()}
        engine = Engine(CONFIG, FakeSpeaker(world), {n: [(c, POLICY)] for n, c in checks.items()},
                        dataplane=FakeDataplane(world))
        engine.clock = asyncio.get_running_loop().time
        task = asyncio.create_task(engine.run())
        try:
            await scenario(world, checks, engine)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())


def test_reannounce_during_dwell_keeps_the_dataplane() -> None:
    async def main() -> None:
        world = World()
        checks = {"a": Scripted(), "b": Scripted()}
        config = load(CONFIG_TEXT_NO_HOLD_DOWN)
        engine = Engine(config, FakeSpeaker(world), {n: [(c, POLICY)] for n, c in checks.items()},
                        dataplane=FakeDataplane(world))
        engine.clock = asyncio.get_running_loop().time
        task = asyncio.create_task(engine.run())
        try:
            async with asyncio.timeout(3):
                while not world.announced:
                    await asyncio.sleep(0.005)
            for check in checks.values():
                check.result = DOWN
            async with asyncio.timeout(3):
                while world.announced:
                    await asyncio.sleep(0.005)
            for check in checks.values():
                check.result = OK
            async with asyncio.timeout(3):
                while not world.announced:
                    await asyncio.sleep(0.005)
            await asyncio.sleep(1.2)  # well past the dwell: the teardown was cancelled
            assert world.dataplane.vips and world.announced
            assert all(what.vips for _, kind, what in world.log if kind == "dataplane")  # type: ignore[attr-defined]
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())


CONFIG_TEXT_NO_HOLD_DOWN = """
pop: {name: t1, asn: 65101, router_id: 192.0.2.1}
neighbors: [{address: 10.0.0.1, peer_as: 65000}]
prefixes: [198.51.100.1/32]
servers: [{name: a, address: 10.0.2.1}, {name: b, address: 10.0.2.2}]
pool: {hold_down: 0}
dataplane: {mode: ipvs, withdraw_dwell: 1.0}
"""


def test_a_failing_dataplane_is_reported_and_never_announced_onto() -> None:
    async def main() -> None:
        world = World()
        world.fail_dataplane = True
        checks = {"a": Scripted(), "b": Scripted()}
        engine = Engine(CONFIG, FakeSpeaker(world), {n: [(c, POLICY)] for n, c in checks.items()},
                        dataplane=FakeDataplane(world))
        task = asyncio.create_task(engine.run())
        try:
            async with asyncio.timeout(10):
                while not (engine.verdict.announce and engine.applier.status().dataplane_failures >= 2):
                    await asyncio.sleep(0.01)
            assert not world.announced  # wanted, but not onto a missing data plane
            assert engine.applier.status().dataplane_error == "ip_vs: module not loaded" and engine.applier.status().dataplane_failures >= 1
            world.fail_dataplane = False  # the module got loaded: the retry succeeds
            async with asyncio.timeout(3):
                while not world.announced:
                    await asyncio.sleep(0.01)
            assert engine.applier.status().dataplane_error == ""
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())


class CountingDataplane(FakeDataplane):
    def __init__(self, world: World) -> None:
        super().__init__(world)
        self.open: dict[str, int] = {}

    async def connections(self) -> dict[str, int]:
        return dict(self.open)


def test_server_drain_is_quiescent_until_its_connections_are_gone() -> None:
    async def main() -> None:
        world = World()
        checks = {"a": Scripted(), "b": Scripted()}
        config = load(CONFIG_TEXT_NO_HOLD_DOWN)
        dataplane = CountingDataplane(world)
        engine = Engine(config, FakeSpeaker(world), {n: [(c, POLICY)] for n, c in checks.items()}, dataplane=dataplane)
        task = asyncio.create_task(engine.run())

        def weights() -> dict[str, int]:
            return {r.address: r.weight for r in world.dataplane.services[0].reals} if world.dataplane.services else {}

        try:
            async with asyncio.timeout(3):
                while weights() != {"10.0.2.1": 1, "10.0.2.2": 1}:
                    await asyncio.sleep(0.01)
            dataplane.open = {"10.0.2.2": 3}
            engine.drain_server("b")
            async with asyncio.timeout(3):
                while weights() != {"10.0.2.1": 1, "10.0.2.2": 0}:
                    await asyncio.sleep(0.01)
            assert engine.pool.healthy == 1 and world.announced  # 1/2 is not below 0.5
            await asyncio.sleep(1.5)
            assert weights() == {"10.0.2.1": 1, "10.0.2.2": 0}  # 3 connections left: still quiescent
            dataplane.open = {}
            async with asyncio.timeout(3):
                while weights() != {"10.0.2.1": 1}:
                    await asyncio.sleep(0.01)
            assert engine.server_drains["b"].done and engine.server_drains["b"].reason == "drained: connections gone"
            engine.undrain_server("b")
            async with asyncio.timeout(3):
                while weights() != {"10.0.2.1": 1, "10.0.2.2": 1}:
                    await asyncio.sleep(0.01)
            with pytest.raises(KeyError):
                engine.drain_server("nope")
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())


def test_server_drain_times_out() -> None:
    async def main() -> None:
        clock = [0.0]
        config = load(CONFIG_TEXT_NO_HOLD_DOWN.replace("withdraw_dwell: 1.0", "withdraw_dwell: 1.0, drain_timeout: 60"))
        engine = Engine(config, FakeSpeaker(World()), {n: [(Scripted(), POLICY)] for n in ("a", "b")},
                        clock=lambda: clock[0])
        engine.drain_server("a")
        engine.finish_drains({"10.0.2.1": 5})
        assert not engine.server_drains["a"].done
        clock[0] = 61.0
        engine.finish_drains({"10.0.2.1": 5})
        assert engine.server_drains["a"].reason == "drained: drain_timeout passed with 5 connections"

    asyncio.run(main())


@pytest.mark.parametrize(("mode", "why"), [("ecmp", "its flows move"), ("none", "no data plane")])
def test_server_drain_without_ipvs_or_pins_is_done_at_once_and_says_why(mode: str, why: str) -> None:
    config = load(CONFIG_TEXT_NO_HOLD_DOWN.replace("mode: ipvs", f"mode: {mode}"))
    engine = Engine(config, FakeSpeaker(World()), {n: [(Scripted(), POLICY)] for n in ("a", "b")}, clock=lambda: 0.0)
    engine.drain_server("a")
    drain = engine.server_drains["a"]
    assert drain.done and why in drain.reason, drain  # no quiescent phase to wait for


def test_server_drain_with_pinned_flows_is_quiescent() -> None:
    config = load(CONFIG_TEXT_NO_HOLD_DOWN.replace("mode: ipvs", "mode: ecmp, pin_flows: true"))
    engine = Engine(config, FakeSpeaker(World()), {n: [(Scripted(), POLICY)] for n in ("a", "b")}, clock=lambda: 0.0)
    engine.drain_server("a")
    assert not engine.server_drains["a"].done  # until its pinned connections are gone
    engine.finish_drains({"10.0.2.1": 2})
    assert not engine.server_drains["a"].done
    engine.finish_drains({"10.0.2.1": 0})
    assert engine.server_drains["a"].reason == "drained: connections gone"
