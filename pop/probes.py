"""The probe schedule: every server's checks run on their pace, and each result is handed on.

One loop per server and tier. Probes run on a schedule, not back to back: a new probe starts
every interval even while an earlier one waits for its timeout, so silence is detected at
the pace of the interval rather than of the timeout. The pace is asked anew before every
probe (`pace(server, tier)`: fast while the server's state is changing) and `wake(server)`
makes the loops re-read it at once. A result older than one already handed on is dropped as
stale.

`stop()` cancels the loops *and the probes they have in flight*, and results of a stopped
generation are dropped even if they arrive: after a reload no probe of the old configuration
can be folded into a server's fresh state.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence

from pop.checks.base import Check, CheckResult
from pop.hysteresis import Policy

log = logging.getLogger("pop.probes")

Observe = Callable[[str, str, CheckResult], None]


class Probes:
    def __init__(self, observe: Observe, pace: Callable[[str, str], float], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._observe = observe
        self._pace = pace
        self.clock = clock
        self._loops: list[asyncio.Task[None]] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self._wake: dict[tuple[str, str], asyncio.Event] = {}
        self._latest: dict[tuple[str, str], int] = {}
        self._sequence = itertools.count(1)
        self._generation = 0
        self.on_duration: Callable[[str, float], None] | None = None  # (tier, seconds) of every probe

    def start(self, group: asyncio.TaskGroup, checks: Mapping[str, Sequence[tuple[Check, Policy]]],
              enabled: Sequence[str]) -> None:
        """Start one loop per enabled server and tier (stops the previous generation first)."""
        self.stop()
        for server in enabled:
            for check, policy in checks.get(server, ()):
                self._loops.append(group.create_task(self._loop(server, check, policy, self._generation),
                                                     name=f"probe {server} {check.name}"))

    def stop(self) -> None:
        self._generation += 1
        for task in (*self._loops, *self._in_flight):
            task.cancel()
        self._loops.clear()
        self._in_flight.clear()
        self._wake.clear()
        self._latest.clear()

    def wake(self, server: str) -> None:
        for (name, _), event in self._wake.items():
            if name == server:
                event.set()

    async def round(self, checks: Mapping[str, Sequence[tuple[Check, Policy]]],
                    enabled: Sequence[str]) -> dict[tuple[str, str], CheckResult]:
        """Probe every enabled server's every tier once, now, concurrently (an engine start
        that adopts its predecessor's routes decides on this round)."""
        keys = [(server, check) for server in enabled for check, _ in checks.get(server, ())]
        results = await asyncio.gather(*(_probe(check, _deadline(check)) for _, check in keys))
        return {(server, check.name): result for (server, check), result in zip(keys, results, strict=True)}

    async def _loop(self, server: str, check: Check, policy: Policy, generation: int) -> None:
        key = (server, check.name)
        wake = self._wake[key] = asyncio.Event()
        timeout = getattr(check, "timeout", 1.0)
        in_flight: set[asyncio.Task[None]] = set()
        # spread the first probes over one interval: no thundering herd at start
        await asyncio.sleep(random.uniform(0, policy.fast_interval))
        last_start = -1e9
        while True:
            delay = last_start + self._pace(server, check.name) - self.clock()
            if delay > 0:
                wake.clear()
                try:
                    async with asyncio.timeout(delay):
                        await wake.wait()
                except TimeoutError:
                    pass
                continue  # re-read the pace: the state may have changed while we slept
            # never more probes in flight than fit into one timeout at the fast pace
            if len(in_flight) > timeout / policy.fast_interval + 1:
                await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                continue
            last_start = self.clock()
            task = asyncio.create_task(self._once(server, check, next(self._sequence), generation))
            for tasks in (in_flight, self._in_flight):
                tasks.add(task)
                task.add_done_callback(tasks.discard)

    async def _once(self, server: str, check: Check, sequence: int, generation: int) -> None:
        started = self.clock()
        result = await _probe(check, _deadline(check), server)
        if self.on_duration is not None:
            self.on_duration(check.name, self.clock() - started)
        key = (server, check.name)
        if generation != self._generation or sequence < self._latest.get(key, 0):
            return  # a reload stopped this generation, or a newer probe already answered
        self._latest[key] = sequence
        self._observe(server, check.name, result)


def _deadline(check: Check) -> float:
    # the check keeps its own timeout; this deadline is the backstop for a check that does
    # not, so that a hung probe can never hold a server's state hostage
    return float(getattr(check, "timeout", 1.0)) * 2 + 0.5


async def _probe(check: Check, deadline: float, server: str = "") -> CheckResult:
    try:
        async with asyncio.timeout(deadline):
            return await check.probe()
    except TimeoutError:
        return CheckResult.failure("timeout", detail="check did not return by its deadline")
    except Exception as exc:  # a broken check is a failed check, never a dead engine
        log.exception("check.crashed server=%s tier=%s", server, check.name)
        return CheckResult.failure("error", detail=f"check raised {exc!r}")
