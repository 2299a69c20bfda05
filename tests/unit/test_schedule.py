"""The probe schedule at scale (issue 12): one timer for every server, checks started without a
task, the schedule stretched when the engine cannot keep up, and what /status shows of it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest

from pop import stretch
from pop.checks.base import CheckResult
from pop.checks.l4 import TcpCheck
from pop.probes import Probes
from pop.stretch import Lateness, Window
from tests.unit.test_engine import OK, POLICY, Scripted
from tests.unit.test_l4 import closed_port, listener
from tests.unit.test_probes import until


@pytest.mark.parametrize(("current", "window", "expected"), [
    (1.0, Window(500, 0.001, 0.02, busy=0.95), 1.0),          # busy but on time: nothing to stretch
    (1.0, Window(500, 0.05, 0.25, busy=0.95), 1.25),          # late and busy: behind
    (1.0, Window(500, 0.05, 0.25, busy=0.2), 1.0),            # late but idle: the machine, not the engine
    (8.0, Window(500, 0.05, 0.25, busy=0.95), 10.0),          # never beyond MAX_STRETCH
    (2.0, Window(500, 0.01, 0.05, busy=0.6), 2.0),            # neither behind nor caught up: hold
    (2.0, Window(500, 0.001, 0.02, busy=0.6), 2.0 / 1.2),     # caught up: tighten step by step
    (2.0, Window(500, 0.01, 0.05, busy=0.2), 2.0 / 1.2),      # room on the loop: tighten
    (1.05, Window(500, 0.001, 0.002, busy=0.1), 1.0),         # never below 1
    (3.0, Window(0, 0.0, 0.0, busy=0.0), 3.0),                # no probe in the window: no evidence
])
def test_stretch(current: float, window: Window, expected: float) -> None:
    assert stretch.stretch(current, window) == pytest.approx(expected)


def test_a_window_gives_bucket_quantiles_and_starts_the_next() -> None:
    book = Lateness()
    for seconds in [0.0002] * 98 + [0.03, 7.0]:
        book.observe(seconds)
    assert book.close_window(0.5) == Window(100, 0.0005, 0.05, 0.5)
    assert book.close_window(0.1) == Window(0, 0.0, 0.0, 0.1)
    assert sum(book.counts) == 100  # the histogram since start keeps them


class Counting(Scripted):
    """A check with begin(): started without a task, answered from the loop."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled = 0

    def begin(self, done: Callable[[CheckResult], None]) -> Callable[[], None]:
        self.probes += 1
        handle = asyncio.get_running_loop().call_soon(done, self.result)

        def cancel() -> None:
            self.cancelled += 1
            handle.cancel()
        return cancel


def test_checks_with_begin_run_on_one_timer_without_a_task_per_probe() -> None:
    async def main() -> None:
        seen: list[tuple[str, CheckResult]] = []
        checks = {f"s{i}": [(Counting(), POLICY)] for i in range(50)}
        probes = Probes(lambda server, _t, result: seen.append((server, result)), lambda _s, _t: 0.02,
                        clock=asyncio.get_running_loop().time)
        async with asyncio.TaskGroup() as group:
            probes.start(group, checks, list(checks))
            tasks = len(asyncio.all_tasks())
            await until(lambda: all(c.probes >= 3 for (c, _), in checks.values()))  # type: ignore[attr-defined]
            assert len(asyncio.all_tasks()) == tasks  # the schedule's own task and ours, no more
            probes.stop()
        assert {server for server, _ in seen} == set(checks) and all(r == OK for _, r in seen)
        assert probes.schedule().window.busy >= 0.0 and probes.schedule().stretch == 1.0

    asyncio.run(main())


def test_a_failing_observer_fails_the_task_group_instead_of_stopping_the_probes_silently() -> None:
    def observe(_server: str, _tier: str, _result: CheckResult) -> None:
        raise RuntimeError("a bug in the engine")

    async def main() -> None:
        probes = Probes(observe, lambda _s, _t: 0.01, clock=asyncio.get_running_loop().time)
        async with asyncio.timeout(5), asyncio.TaskGroup() as group:
            probes.start(group, {"a": [(Counting(), POLICY)]}, ["a"])

    with pytest.raises(ExceptionGroup) as caught:
        asyncio.run(main())
    assert caught.group_contains(RuntimeError, match="a bug in the engine")


def test_wake_rereads_the_pace_at_once() -> None:
    async def main() -> None:
        check = Counting()
        pace = {"now": 30.0}
        probes = Probes(lambda *_: None, lambda _s, _t: pace["now"], clock=asyncio.get_running_loop().time)
        async with asyncio.TaskGroup() as group:
            probes.start(group, {"a": [(check, POLICY)]}, ["a"])
            await until(lambda: check.probes == 1)  # the first probe, then 30 s to the next
            pace["now"] = 0.01
            probes.wake("a")
            await until(lambda: check.probes >= 3, within=2.0)
            probes.stop()

    asyncio.run(main())


def test_tcp_begin_answers_from_the_loop_and_a_cancelled_probe_never_answers() -> None:
    async def main() -> None:
        answers: list[CheckResult] = []
        with listener() as sock:
            TcpCheck("127.0.0.1", sock.getsockname()[1], timeout=1.0).begin(answers.append)
            assert answers == []  # never from begin() itself
            await until(lambda: answers)
        assert answers[0].ok
        refused: list[CheckResult] = []
        TcpCheck("127.0.0.1", closed_port(), timeout=1.0).begin(refused.append)
        await until(lambda: refused)
        assert (refused[0].error, refused[0].definitive) == ("refused", True)
        with listener() as sock:
            sock.listen(0)
            port = sock.getsockname()[1]
            filler = socket.create_connection(("127.0.0.1", port), timeout=0.5)
            late: list[CheckResult] = []
            cancel = TcpCheck("127.0.0.1", port, timeout=0.1).begin(late.append)
            cancel()
            # a twin started after it times out; the cancelled one's timer would have fired first
            twin: list[CheckResult] = []
            TcpCheck("127.0.0.1", port, timeout=0.1).begin(twin.append)
            await until(lambda: twin)
            filler.close()
        assert twin[0].error == "timeout" and late == []

    asyncio.run(main())


@pytest.mark.parametrize(("servers", "interval", "fast", "expected"), [
    (2, 0.2, 0.05, 0.05),       # a few servers rise as fast as ever
    (100, 0.2, 0.05, 0.05),
    (200, 0.2, 0.05, 0.1),
    (1000, 0.2, 0.05, 0.2),     # a thousand: over one interval, no further
    (5000, 0.2, 0.05, 0.2),
    (1000, 5.0, 0.5, 5.0),      # WireGuard's handshakes at 1,000 servers: over its 5 s interval
    (0, 0.2, 0.05, 0.05),
])
def test_the_first_probes_spread_further_the_more_servers_start(servers: int, interval: float, fast: float,
                                                                 expected: float) -> None:
    assert stretch.first_spread(servers, interval, fast) == pytest.approx(expected)


def test_a_thousand_servers_first_probes_start_over_one_interval() -> None:
    starts: list[float] = []

    async def run() -> None:
        checks = {f"s{i}": [(Counting(), POLICY)] for i in range(1000)}
        probes = Probes(lambda *_: None, lambda *_: POLICY.fast_interval, clock=lambda: 100.0)
        probes._push = lambda slot, due: starts.append(due - 100.0)  # type: ignore[method-assign]
        async with asyncio.TaskGroup() as group:
            probes.start(group, checks, list(checks))
            probes.stop()

    asyncio.run(run())
    assert len(starts) == 1000
    assert max(starts) > 0.8 * POLICY.interval and max(starts) <= POLICY.interval


def test_the_pace_is_asked_again_only_when_the_server_wakes() -> None:
    """The pace depends on the server's state alone, so it is not asked for every probe."""
    async def main() -> None:
        check = Counting()
        asked: list[str] = []

        def pace(server: str, _tier: str) -> float:
            asked.append(server)
            return 0.01

        probes = Probes(lambda *_: None, pace, clock=asyncio.get_running_loop().time)
        async with asyncio.TaskGroup() as group:
            probes.start(group, {"a": [(check, POLICY)]}, ["a"])
            await until(lambda: check.probes >= 5)
            assert asked == ["a"]
            probes.wake("a")
            await until(lambda: check.probes >= 10)
            probes.stop()
        assert asked == ["a", "a"]

    asyncio.run(main())


def test_probes_scheduled_under_a_stretch_come_back_to_the_pace_when_it_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stretch (the engine behind, e.g. at the start of 1,000 servers) multiplies every
    interval; when it ends, the probes already scheduled under it are pulled in by the same
    factor instead of keeping the stretched wait: at 1,000 servers the WireGuard tier (5 s)
    was probed at a fifth of its rate for half a minute after the start."""
    ended = [False]
    monkeypatch.setattr(stretch, "WINDOW", 0.05)
    monkeypatch.setattr(stretch, "stretch", lambda current, _window: 1.0 if ended[0] else current)

    async def main() -> None:
        checks = {f"s{i}": [(Counting(), POLICY)] for i in range(50)}
        counted = [c for (c, _), in checks.values()]  # type: ignore[misc]
        probes = Probes(lambda *_: None, lambda _s, _t: 0.05, clock=asyncio.get_running_loop().time)
        async with asyncio.TaskGroup() as group:
            probes.start(group, checks, list(checks))
            probes.stretch = 200.0  # behind: every next probe 10 s after the last
            await until(lambda: all(c.probes >= 1 for c in counted))
            seen = [c.probes for c in counted]
            ended[0] = True  # caught up: the pace is 0.05 s again
            await until(lambda: all(c.probes >= n + 3 for c, n in zip(counted, seen, strict=True)))
            assert probes.stretch == 1.0
            probes.stop()

    asyncio.run(main())
