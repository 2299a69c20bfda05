"""The probe schedule: every server's checks run on their pace, and each result is handed on.

One schedule for every server and tier: a heap of the times each probe is due, served by
one timer on the event loop (the earliest due first, so when the engine falls behind every
probe is late by the same amount and none is skipped). Probes run on a schedule, not back to
back: a new probe starts every interval even while an earlier one waits for its timeout, so
silence is detected at the pace of the interval rather than of the timeout. The pace
(`pace(server, tier)`: fast while the server's state is changing) depends on nothing but the
server's state, so it is asked once and again whenever `wake(server)` says that state changed,
which re-schedules that server's tiers at once (and a reload). A result older than one already
handed on is dropped as stale.

A check that offers `begin(done)` (the TCP check: a non-blocking connect driven by loop
callbacks) is started without a task; any other check runs as one task per probe, under a
deadline. With 1,000 servers at 0.2 s that is the difference between 5,000 tasks, timeouts
and events a second and none (issue 12).

How late each probe starts against its due time is counted (pop.stretch); when the engine
cannot keep up, every interval is stretched by the same factor, logged (`probes.behind`),
and shown on /status and /metrics (`schedule()`), until it catches up.

`stop()` cancels the schedule *and the probes in flight*, and results of a stopped
generation are dropped even if they arrive: after a reload no probe of the old configuration
can be folded into a server's fresh state.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import heapq
import itertools
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from pop import stretch
from pop.checks.base import Check, CheckResult
from pop.hysteresis import Policy

log = logging.getLogger("pop.probes")

Observe = Callable[[str, str, CheckResult], None]


class Begins(Protocol):
    """A check that can start a probe without a coroutine (see TcpCheck.begin)."""

    def begin(self, done: Callable[[CheckResult], None]) -> Callable[[], None]: ...


# Probes due within this much of the timer's firing start together: one timer callback per
# millisecond at most, however many servers, at the price of starting a probe up to 1 ms early.
_TICK = 0.001
# At most this many probes start per timer callback; more due ones wait for the next turn of
# the loop, so the answers of probes in flight (and the status, the control endpoints) are
# served in between however far behind the schedule is.
_BATCH = 256
_NEVER = float("inf")
_YOUNG = 20_000
_frozen: list[bool] = []  # whether this process froze its heap for the collector (Probes.start)


class _Slot:
    """One server's one tier on the schedule."""

    __slots__ = ("begin", "check", "due", "generation", "in_flight", "last_due", "latest", "limit", "name",
                 "pace", "server", "waiting")

    def __init__(self, server: str, check: Check, policy: Policy, generation: int) -> None:
        self.server, self.check, self.name, self.generation = server, check, check.name, generation
        begin = getattr(check, "begin", None)
        self.begin: Callable[[Callable[[CheckResult], None]], Callable[[], None]] | None = begin
        # never more probes in flight than fit into one timeout at the fast pace
        self.limit = float(getattr(check, "timeout", 1.0)) / policy.fast_interval + 1
        self.in_flight = 0
        self.due = _NEVER
        self.last_due: float | None = None  # when the last probe started was due
        self.latest = 0  # sequence number of the newest result handed on
        self.waiting = False  # due, but held back by `limit` until a probe in flight returns
        self.pace: float | None = None  # the interval as last asked (None: ask)


class Probes:
    def __init__(self, observe: Observe, pace: Callable[[str, str], float], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._observe = observe
        self._pace = pace
        self.clock = clock
        self._slots: dict[str, list[_Slot]] = {}
        self._heap: list[tuple[float, int, _Slot]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = _NEVER
        self._serving: asyncio.Task[None] | None = None
        self._failed: asyncio.Future[None] | None = None
        self._cancels: dict[int, tuple[_Slot, Callable[[], None]]] = {}  # the probes in flight, by sequence
        self._tasks: dict[asyncio.Task[None], _Slot] = {}
        self._sequence = itertools.count(1)
        self._generation = 0
        self.lateness = stretch.Lateness()
        self.stretch = 1.0  # the factor on every interval while the engine cannot keep up
        self.window = stretch.Window(0, 0.0, 0.0)  # the last full window of probe starts
        self._window_end = _NEVER
        self._window_cpu = 0.0  # the loop thread's CPU time when the window began
        self.on_duration: Callable[[str, float], None] | None = None  # (tier, seconds) of every probe

    def start(self, group: asyncio.TaskGroup, checks: Mapping[str, Sequence[tuple[Check, Policy]]],
              enabled: Sequence[str]) -> None:
        """Put every enabled server's every tier on the schedule (stops the previous generation first)."""
        self.stop()
        now = self.clock()
        self._add([(server, check, policy) for server in enabled for check, policy in checks.get(server, ())], now)
        self._window_end, self._window_cpu = now + stretch.WINDOW, time.thread_time()
        self._serving = group.create_task(self._serve(self._generation), name="probe schedule")
        # Everything built before the first start (the libraries, the configuration, the checks,
        # the state tables) mostly lives as long as the process. The probes allocate thousands of
        # short-lived objects a second, so the collector runs hundreds of times a second, and
        # every full collection walked that whole heap: 75 ms pauses at 1,000 servers, the
        # schedule's p99 lateness (issue 12). Frozen, it is no longer walked; what a reload drops
        # is still freed by reference counting. Once per process, collected first: no garbage is
        # frozen.
        # The young generation is collected every _YOUNG allocations instead of every 700: the
        # probes' garbage is freed by reference counting, the collector only finds cycles, and
        # at 700 it ran ~30 times a second for nothing (issue 12).
        if not _frozen:
            gc.collect()
            gc.freeze()
            gc.set_threshold(_YOUNG, *gc.get_threshold()[1:])
            _frozen.append(True)

    def _add(self, wanted: Sequence[tuple[str, Check, Policy]], now: float) -> None:
        tiers = collections.Counter(check.name for _, check, _ in wanted)
        for server, check, policy in wanted:
            slot = _Slot(server, check, policy, self._generation)
            self._slots.setdefault(server, []).append(slot)
            # no thundering herd at the start (pop.stretch.first_spread)
            spread = stretch.first_spread(tiers[check.name], policy.interval, policy.fast_interval)
            self._push(slot, now + random.uniform(0, spread))

    def update(self, checks: Mapping[str, Sequence[tuple[Check, Policy]]], enabled: Sequence[str]) -> None:
        """Take a reloaded configuration's checks without touching what did not change: a tier
        whose check is the very object it had (pop.checks.cascade hands unchanged servers
        theirs again) keeps its place on the schedule and its probes in flight; every other
        tier is dropped with its probes, whose answers no longer count, and the new ones start
        as at start(). Nothing happens before start()."""
        if self._serving is None:
            return
        wanted = {(server, id(check)): (server, check, policy) for server in enabled
                  for check, policy in checks.get(server, ())}
        gone: set[_Slot] = set()
        for server, slots in list(self._slots.items()):
            kept = [slot for slot in slots if wanted.pop((server, id(slot.check)), None) is not None]
            for slot in kept:
                slot.pace = None  # the new configuration's state table may say otherwise
            gone.update(slot for slot in slots if slot not in kept)
            if kept:
                self._slots[server] = kept
            else:
                del self._slots[server]
        for slot in gone:
            slot.generation = -1  # its entries on the heap and its answers are ignored from now on
        for sequence, (slot, cancel) in list(self._cancels.items()):
            if slot in gone:
                del self._cancels[sequence]
                cancel()
        for task, slot in list(self._tasks.items()):
            if slot in gone:
                task.cancel()
        self._add(list(wanted.values()), self.clock())

    def stop(self) -> None:
        if self._serving is not None:
            self._serving.cancel()
            self._serving = None
        self._halt()

    def _halt(self) -> None:
        self._generation += 1
        self._disarm()
        cancels, self._cancels = self._cancels, {}
        for _, cancel in cancels.values():
            cancel()
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        self._slots.clear()
        self._heap.clear()

    def wake(self, server: str) -> None:
        """Re-read the pace of the server's tiers now (its state changed)."""
        for slot in self._slots.get(server, ()):
            slot.pace = None
            if slot.last_due is not None and not slot.waiting:
                due = slot.last_due + self._ask_pace(slot) * self.stretch
                if due != slot.due:
                    self._push(slot, due)

    def _ask_pace(self, slot: _Slot) -> float:
        slot.pace = pace = self._pace(slot.server, slot.name)
        return pace

    def schedule(self) -> stretch.Schedule:
        """How the schedule holds: the stretch in force, the last window, lateness since start."""
        return stretch.Schedule(self.stretch, self.window, tuple(self.lateness.counts), self.lateness.total)

    async def round(self, checks: Mapping[str, Sequence[tuple[Check, Policy]]],
                    enabled: Sequence[str]) -> dict[tuple[str, str], CheckResult]:
        """Probe every enabled server's every tier once, now, concurrently (an engine start
        that adopts its predecessor's routes decides on this round)."""
        keys = [(server, check) for server in enabled for check, _ in checks.get(server, ())]
        results = await asyncio.gather(*(_probe(check, _deadline(check)) for _, check in keys))
        return {(server, check.name): result for (server, check), result in zip(keys, results, strict=True)}

    # --- the timer ---------------------------------------------------------------------------

    async def _serve(self, generation: int) -> None:
        """Lives as long as the schedule: a failure in a callback fails the task group through it,
        and the group's end (the engine stopping) ends the schedule and its probes in flight."""
        self._failed = asyncio.get_running_loop().create_future()
        self._arm()
        try:
            await self._failed
        finally:
            if generation == self._generation:  # not already replaced by a reload's start()
                self._serving = None
                self._halt()

    def _fail(self, exc: BaseException) -> None:
        if self._failed is not None and not self._failed.done():
            self._failed.set_exception(exc)

    def _push(self, slot: _Slot, due: float) -> None:
        slot.due = due
        heapq.heappush(self._heap, (due, next(self._order), slot))
        if due < self._timer_at and self._serving is not None:
            self._disarm()
            self._arm()

    def _arm(self) -> None:
        if self._heap and self._timer is None:
            # also at the window's end: the stretch is judged on time when nothing is due
            self._timer_at = min(self._heap[0][0], self._window_end)
            delay = max(0.0, self._timer_at - self.clock())
            self._timer = asyncio.get_running_loop().call_later(delay, self._run)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, _NEVER

    def _run(self) -> None:
        self._timer, self._timer_at = None, _NEVER
        try:
            now = self.clock()
            heap, generation, started = self._heap, self._generation, 0
            while heap and heap[0][0] <= now + _TICK and started < _BATCH:
                due, _, slot = heapq.heappop(heap)
                if due != slot.due or slot.generation != generation:
                    continue  # rescheduled by wake(), or of a stopped generation
                if slot.in_flight > slot.limit:
                    slot.waiting, slot.due = True, _NEVER
                    continue
                self.lateness.observe(max(0.0, now - due))
                started += 1
                slot.last_due = due
                self._launch(slot, now)
                # The next probe is due one interval after this one was due, not after it
                # started: a late start does not shift the server's phase, so servers spread
                # over the interval stay spread. After a stall of more than an interval they
                # are spread anew instead of all starting at once, forever in step.
                interval = (slot.pace or self._ask_pace(slot)) * self.stretch
                slot.due = due + interval if due + interval > now else now + random.uniform(0, interval)
                heapq.heappush(heap, (slot.due, next(self._order), slot))
            if now >= self._window_end:
                self._judge(now)
            self._arm()
        except Exception as exc:  # the engine must not go on with a schedule that stopped
            self._fail(exc)

    def _judge(self, now: float) -> None:
        cpu = time.thread_time()
        busy = (cpu - self._window_cpu) / max(1e-9, now - self._window_end + stretch.WINDOW)
        self.window = self.lateness.close_window(round(busy, 3))
        self._window_end, self._window_cpu = now + stretch.WINDOW, cpu
        factor = stretch.stretch(self.stretch, self.window)
        if factor > self.stretch:
            log.warning("probes.behind stretch=%.2f lateness_p50_ms=%.1f lateness_p99_ms=%.1f busy=%.2f probes=%d",
                        factor, self.window.p50 * 1000, self.window.p99 * 1000, self.window.busy, self.window.probes)
        elif factor < self.stretch:
            log.info("probes.%s stretch=%.2f lateness_p50_ms=%.1f", "caught_up" if factor == 1.0 else "tighten",
                     factor, self.window.p50 * 1000)
        if factor != self.stretch:
            self._rescale(factor / self.stretch, now)
        self.stretch = factor

    def _rescale(self, ratio: float, now: float) -> None:
        """Every probe scheduled under the old stretch waits `ratio` times what it had left: the
        stretch applies from now on, not only from each server's next probe (a tier of 5 s
        stretched tenfold would otherwise stay at 50 s for a whole stretched interval after the
        engine caught up), and the servers keep their order and spread. Stale entries go."""
        heap = [(now + (due - now) * ratio if due > now else due, order, slot)
                for due, order, slot in self._heap if due == slot.due]
        for due, _, slot in heap:
            slot.due = due
        heapq.heapify(heap)
        self._heap[:] = heap
        if self._timer is not None:  # not from _run(), which arms the timer for the new head itself
            self._disarm()
            self._arm()

    # --- one probe ---------------------------------------------------------------------------

    def _launch(self, slot: _Slot, now: float) -> None:
        sequence = next(self._sequence)
        slot.in_flight += 1
        if slot.begin is not None:
            self._cancels[sequence] = (slot, slot.begin(lambda result: self._done(slot, sequence, now, result)))
        else:
            task = asyncio.create_task(self._once(slot, sequence, now))
            self._tasks[task] = slot
            task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    async def _once(self, slot: _Slot, sequence: int, started: float) -> None:
        result = await _probe(slot.check, _deadline(slot.check), slot.server)
        self._done(slot, sequence, started, result)

    def _done(self, slot: _Slot, sequence: int, started: float, result: CheckResult) -> None:
        try:
            self._cancels.pop(sequence, None)
            slot.in_flight -= 1
            if self.on_duration is not None:
                self.on_duration(slot.name, self.clock() - started)
            if slot.generation != self._generation:
                return  # a reload stopped this generation
            if slot.waiting:
                slot.waiting = False
                self._push(slot, self.clock())
            if sequence < slot.latest:
                return  # a newer probe already answered
            slot.latest = sequence
            self._observe(slot.server, slot.name, result)
        except Exception as exc:
            self._fail(exc)


def _deadline(check: Check) -> float:
    # the check keeps its own timeout; this deadline is the backstop for a check that does
    # not, so that a hung probe can never hold a server's state hostage; a WireGuard check
    # through the tunnel adds its data exchange to the handshake's (a cookie retry) time
    return float(getattr(check, "timeout", 1.0)) * 2 + float(getattr(check, "data_timeout", 0.0)) + 0.5


async def _probe(check: Check, deadline: float, server: str = "") -> CheckResult:
    try:
        async with asyncio.timeout(deadline):
            return await check.probe()
    except TimeoutError:
        return CheckResult.failure("timeout", detail="check did not return by its deadline")
    except Exception as exc:  # a broken check is a failed check, never a dead engine
        log.exception("check.crashed server=%s tier=%s", server, check.name)
        return CheckResult.failure("error", detail=f"check raised {exc!r}")
