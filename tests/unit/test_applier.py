"""The applier with recording fakes: retries, read-back repair, the dwell, reconfigure.

The fakes keep a "kernel" the test can change behind the applier's back, and fail on an
impossible order (announce onto a missing data plane, teardown while announced)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import pytest

from pop.adapters.bgp import BgpRefused
from pop.applier import Applier, DataplaneFailure
from pop.config import load
from pop.desired import Announcement, DesiredState, RealServer, VirtualService

CONFIG_TEXT = """
pop: {name: t1, asn: 65101, router_id: 192.0.2.1}
neighbors: [{address: 10.0.0.1, peer_as: 65000}]
prefixes: [198.51.100.1/32]
servers: [{name: a, address: 10.0.2.1}, {name: b, address: 10.0.2.2}]
dataplane: {mode: ipvs, withdraw_dwell: 0.6, services: [{protocol: udp, port: 51820}]}
"""
CONFIG = load(CONFIG_TEXT)
ROUTE = (Announcement("198.51.100.1/32"),)


def serving(*reals: str) -> DesiredState:
    service = VirtualService("udp", "198.51.100.1", 51820, reals=tuple(RealServer(r, 51820) for r in reals))
    return DesiredState(vips=("198.51.100.1/32",), services=(service,))


class Speaker:
    def __init__(self) -> None:
        self.refuse = 0  # refuse this many set() calls
        self.calls: list[float] = []
        self.held: tuple[Announcement, ...] = ()
        self.kernel: Callable[[], DesiredState] = DesiredState

    async def set(self, announcements: Sequence[Announcement], *, force: bool = False) -> None:
        self.calls.append(asyncio.get_running_loop().time())
        if announcements:
            assert self.kernel().vips, "announce before the VIP exists"
        if self.refuse:
            self.refuse -= 1
            raise BgpRefused("ExaBGP refused: announce 198.51.100.1/32")
        self.held = tuple(announcements)

    def announced(self) -> tuple[Announcement, ...]:
        return self.held


class Kernel:
    def __init__(self, speaker: Speaker) -> None:
        self.state = DesiredState()
        self.speaker = speaker
        self.fail = ""
        self.reconfigured: list[Sequence[str]] = []
        self.history: list[tuple[float, DesiredState]] = []

    async def set(self, state: DesiredState, *, verify: bool = False) -> tuple[str, ...]:
        if not state.vips:
            assert not self.speaker.held, "data plane torn down while still announced"
        if self.fail:
            raise DataplaneFailure(self.fail)
        changes = () if state == self.state else ("changed",)
        self.state = state
        self.history.append((asyncio.get_running_loop().time(), state))
        return changes

    async def connections(self) -> Mapping[str, int]:
        return {}

    def reconfigure(self, config: object, prefixes: object, servers: Sequence[str]) -> None:
        if self.fail:
            raise DataplaneFailure(self.fail)
        self.reconfigured.append(servers)


def run(scenario: Callable[[Applier, Speaker, Kernel], object], verify_interval: float = 0.0) -> None:
    async def main() -> None:
        speaker = Speaker()
        kernel = Kernel(speaker)
        speaker.kernel = lambda: kernel.state
        events: list[tuple[str, str, str]] = []
        config = load(CONFIG_TEXT.replace("withdraw_dwell: 0.6", f"withdraw_dwell: 0.6, verify_interval: {verify_interval}"))
        applier = Applier(speaker, kernel, config, clock=asyncio.get_running_loop().time,
                          on_event=lambda *e: events.append(e))
        applier.events = events  # type: ignore[attr-defined]
        task = asyncio.create_task(applier.run())
        try:
            await scenario(applier, speaker, kernel)  # type: ignore[misc]
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())


async def until(predicate: Callable[[], object], within: float = 5.0) -> None:
    async with asyncio.timeout(within):  # a busy machine is slower, never wrong
        while not predicate():
            await asyncio.sleep(0.005)


def test_a_refused_announce_is_retried_with_backoff_and_visible_until_it_succeeds() -> None:
    async def scenario(applier: Applier, speaker: Speaker, kernel: Kernel) -> None:
        speaker.refuse = 3
        applier.want(replace(serving("10.0.2.1"), announcements=ROUTE))
        await until(lambda: applier.status().bgp_failures == 1)
        assert applier.status().bgp_error == "ExaBGP refused: announce 198.51.100.1/32"
        assert applier.status().retry_at is not None
        await until(lambda: speaker.held)
        gaps = [b - a for a, b in itertools.pairwise(speaker.calls)]
        assert len(gaps) >= 3 and gaps[-3] >= 0.45 and gaps[-2] >= 0.95 and gaps[-1] >= 1.95  # 0.5, 1, 2 s
        status = applier.status()
        assert (status.bgp_error, status.retry_at, status.bgp_failures) == ("", None, 3)

    run(scenario)


def test_a_failed_dataplane_is_retried_and_never_announced_onto() -> None:
    async def scenario(applier: Applier, speaker: Speaker, kernel: Kernel) -> None:
        kernel.fail = "ip_vs: module not loaded"
        applier.want(replace(serving("10.0.2.1"), announcements=ROUTE))
        await until(lambda: applier.status().dataplane_failures >= 2)
        assert not speaker.held and applier.status().dataplane_error == "ip_vs: module not loaded"
        kernel.fail = ""
        await until(lambda: speaker.held)
        assert applier.status().dataplane_error == ""

    run(scenario)


def test_read_back_repairs_drift_and_reports_it() -> None:
    async def scenario(applier: Applier, speaker: Speaker, kernel: Kernel) -> None:
        wanted = replace(serving("10.0.2.1", "10.0.2.2"), announcements=ROUTE)
        applier.want(wanted)
        await until(lambda: speaker.held)
        assert applier.status().repairs == 0  # read-backs of an untouched kernel repair nothing
        kernel.state = DesiredState()  # somebody flushed the VIP and the IPVS service
        await until(lambda: kernel.state.vips)
        status = applier.status()
        assert status.repairs == 1 and status.last_repair == "changed"
        assert kernel.state == replace(wanted, announcements=())
        assert ("repair", "dataplane", "drift repaired: changed") in applier.events  # type: ignore[attr-defined]

    run(scenario, verify_interval=0.1)


def test_the_dataplane_follows_health_through_the_withdraw_dwell_then_goes() -> None:
    async def scenario(applier: Applier, speaker: Speaker, kernel: Kernel) -> None:
        applier.want(replace(serving("10.0.2.1", "10.0.2.2"), announcements=ROUTE))
        await until(lambda: speaker.held)
        applier.want(serving("10.0.2.1", "10.0.2.2"))  # withdraw (e.g. an operator drain)
        await until(lambda: not speaker.held)
        withdrawn = asyncio.get_running_loop().time()
        applier.want(serving("10.0.2.1"))  # b dies during the dwell: it must leave IPVS now
        await until(lambda: kernel.state == serving("10.0.2.1"), within=0.4)
        assert applier.status().dwell_until is not None
        await until(lambda: kernel.state == DesiredState())
        assert asyncio.get_running_loop().time() - withdrawn >= 0.55
        assert applier.status().dwell_until is None

    run(scenario)


def test_reconfigure_rebuilds_the_dataplane_and_a_failure_is_retried() -> None:
    async def scenario(applier: Applier, speaker: Speaker, kernel: Kernel) -> None:
        applier.want(replace(serving("10.0.2.1"), announcements=ROUTE))
        await until(lambda: speaker.held)
        bigger = load(CONFIG_TEXT.replace("{name: b, address: 10.0.2.2}",
                                                 "{name: b, address: 10.0.2.2}, {name: c, address: 10.0.2.3}"))
        applier.reconfigure(bigger)
        assert kernel.reconfigured == [["10.0.2.1", "10.0.2.2", "10.0.2.3"]]
        applier.want(replace(serving("10.0.2.1", "10.0.2.3"), announcements=ROUTE))
        await until(lambda: kernel.state == serving("10.0.2.1", "10.0.2.3"))
        assert speaker.held == ROUTE  # the reload never withdrew

    run(scenario)
