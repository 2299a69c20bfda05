"""The inner suites of a session, in as few microVM boots as there are cores.

Each host-side kernel test module names its inner suite (``INNER = InnerSuite(...)``: the
file under tests/kernel/inner, the modules it needs, how many tests it has, about how long
it runs in the emulated guest). The first test that takes the ``inner_run`` fixture splits
the inner suites of every module the session collected into ``VMS`` groups of about equal
time, boots one microVM per group at the same time (the guest is emulated on one host core,
and this machine has two), and runs pytest over each group (the union of its modules loaded
first); each host-side test then checks its own suite's outcomes in those reports.

A boot, Python's start and the imports of pop, pyroute2 and scapy cost 30-60 s of emulated
CPU per run, and a guest uses one core: six suites in six boots one after another took
578 s, in one boot 438 s, in two boots side by side 243 s.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from lab.microvm import VmResult

VMS = 2
# pytest -rA: a test file (or, verbose, a test id) starts the line that reports it; the short
# summary at the end has one "OUTCOME id" line per test
_TEST_LINE = re.compile(r"^(tests/kernel/inner/[\w/]+\.py)[: ]")
_SUMMARY = re.compile(r"^(PASSED|FAILED|ERROR|XPASS|XFAIL) (tests/kernel/inner/[\w/]+\.py)::(\S+)")
_SKIPPED = re.compile(r"^SKIPPED \[\d+\] (tests/kernel/inner/[\w/]+\.py)")
PYTEST_ARGS = ("-v", "-s", "-rA", "--durations=0")  # --durations=0: what InnerSuite.seconds should say


@dataclass(frozen=True)
class InnerSuite:
    path: str  # under tests/kernel/inner
    modules: tuple[str, ...]  # kernel modules loaded before the run
    tests: int  # how many tests it has: all must pass, none skip
    seconds: float  # about how long it runs in the guest, to share the suites out between the VMs


def groups(suites: Sequence[InnerSuite], count: int = VMS) -> list[list[InnerSuite]]:
    """The suites in at most ``count`` groups of about equal time (longest first, each to the
    group with the least so far), in their given order within a group; no empty groups."""
    shares: list[list[InnerSuite]] = [[] for _ in range(count)]
    for suite in sorted(suites, key=lambda s: -s.seconds):
        min(shares, key=lambda share: sum(s.seconds for s in share)).append(suite)
    return [sorted(share, key=suites.index) for share in shares if share]


@dataclass
class InnerRun:
    """The outcome of every inner test of the session's microVM runs, by file, what each file
    printed as MEASURED, and the run each file was in."""

    results: dict[str, VmResult] = field(default_factory=dict)
    outcomes: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: defaultdict(list))
    skipped: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    measured: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def of(cls, runs: Sequence[tuple[Sequence[InnerSuite], VmResult]]) -> InnerRun:
        run = cls()
        for suites, result in runs:
            run.results.update((suite.path, result) for suite in suites)
            run._read(result.output)
        return run

    @classmethod
    def running(cls, suites: Sequence[InnerSuite],
                boot: Callable[[list[str], list[str]], VmResult]) -> InnerRun:
        """Run ``suites`` in parallel microVMs: ``boot(paths, modules)`` runs one."""
        shares = groups(suites)
        with ThreadPoolExecutor(max_workers=len(shares) or 1) as pool:
            futures = [pool.submit(boot, [s.path for s in share], sorted({m for s in share for m in s.modules}))
                       for share in shares]
            return cls.of([(share, future.result()) for share, future in zip(shares, futures, strict=True)])

    def _read(self, output: str) -> None:
        current = ""
        for line in output.splitlines():
            if test := _TEST_LINE.match(line):
                current = test.group(1)
            if "MEASURED" in line and current:
                self.measured[current].append(line[line.index("MEASURED"):])
            if summary := _SUMMARY.match(line):
                self.outcomes[summary.group(2)].append((summary.group(3), summary.group(1)))
            elif skip := _SKIPPED.match(line):
                self.skipped[skip.group(1)] += 1

    def check(self, suite: InnerSuite) -> None:
        """Assert that every test of ``suite`` ran and passed; print what it measured."""
        outcomes = self.outcomes.get(suite.path, [])
        failed = [f"{name}: {outcome}" for name, outcome in outcomes if outcome != "PASSED"]
        result = self.results[suite.path]
        assert not failed and not self.skipped.get(suite.path) and len(outcomes) == suite.tests, (
            f"{suite.path}: {len(outcomes)} of {suite.tests} tests reported, not passed: {failed}, "
            f"skipped: {self.skipped.get(suite.path, 0)}; microVM exit {result.returncode}\n"
            f"{result.output[-20000:]}\n--- console ---\n{result.console[-3000:]}")
        print("\n".join([*self.measured.get(suite.path, []),
                         f"{suite.path}: {suite.tests} passed in a microVM run of {result.seconds:.0f} s "
                         f"(its suites {result.command_seconds:.0f} s)"]))
