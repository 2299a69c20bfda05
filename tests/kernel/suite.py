"""One microVM boot for every inner suite of the session.

Each host-side kernel test module names its inner suite (``INNER = InnerSuite(...)``: the
file under tests/kernel/inner, the modules it needs, how many tests it has). The first test
that takes the ``inner_run`` fixture boots the microVM once and runs pytest over the inner
suites of every module the session collected (the union of their modules loaded first);
each host-side test then checks its own suite's outcomes in that one report.

A boot, Python's start and the imports of pop, pyroute2 and scapy cost 30-60 s of emulated
CPU per run; one run instead of one per suite saves most of that in CI.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from lab.microvm import VmResult

# pytest -rA: a test file (or, verbose, a test id) starts the line that reports it; the short summary at the end
# has one "OUTCOME id" line per test
_TEST_LINE = re.compile(r"^(tests/kernel/inner/[\w/]+\.py)[: ]")
_SUMMARY = re.compile(r"^(PASSED|FAILED|ERROR|XPASS|XFAIL) (tests/kernel/inner/[\w/]+\.py)::(\S+)")
_SKIPPED = re.compile(r"^SKIPPED \[\d+\] (tests/kernel/inner/[\w/]+\.py)")
PYTEST_ARGS = ("-v", "-s", "-rA")


@dataclass(frozen=True)
class InnerSuite:
    path: str  # under tests/kernel/inner
    modules: tuple[str, ...]  # kernel modules loaded before the run
    tests: int  # how many tests it has: all must pass, none skip


@dataclass
class InnerRun:
    """The outcome of every inner test of one microVM run, by file, and what each file printed
    as MEASURED."""

    result: VmResult
    outcomes: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: defaultdict(list))
    skipped: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    measured: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def of(cls, result: VmResult) -> InnerRun:
        run = cls(result)
        current = ""
        for line in result.output.splitlines():
            if test := _TEST_LINE.match(line):
                current = test.group(1)
            if "MEASURED" in line and current:
                run.measured[current].append(line[line.index("MEASURED"):])
            if summary := _SUMMARY.match(line):
                run.outcomes[summary.group(2)].append((summary.group(3), summary.group(1)))
            elif skip := _SKIPPED.match(line):
                run.skipped[skip.group(1)] += 1
        return run

    def check(self, suite: InnerSuite) -> None:
        """Assert that every test of ``suite`` ran and passed; print what it measured."""
        outcomes = self.outcomes.get(suite.path, [])
        failed = [f"{name}: {outcome}" for name, outcome in outcomes if outcome != "PASSED"]
        assert not failed and not self.skipped.get(suite.path) and len(outcomes) == suite.tests, (
            f"{suite.path}: {len(outcomes)} of {suite.tests} tests reported, not passed: {failed}, "
            f"skipped: {self.skipped.get(suite.path, 0)}; microVM exit {self.result.returncode}\n"
            f"{self.result.output[-20000:]}\n--- console ---\n{self.result.console[-3000:]}")
        print("\n".join([*self.measured.get(suite.path, []),
                         f"{suite.path}: {suite.tests} passed in one microVM run of {self.result.seconds:.0f} s "
                         f"for every inner suite (the suites {self.result.command_seconds:.0f} s)"]))
