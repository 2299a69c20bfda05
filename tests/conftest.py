"""Suite-wide rules.

tests/kernel/inner is collected only inside the microVM.

Under CI (CI=true) a test marked `netns` or `kernel` that skips is a failure: the lab and
kernel tests are the proof against real daemons and kernels, so CI must run them, and a
missing package or a missing root shows up as red rather than as a quiet skip.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path

import pytest

REAL_THINGS = ("netns", "kernel")
INNER = Path(__file__).parent / "kernel" / "inner"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/kernel/inner runs only inside the microVM, started by a host-side kernel test;
    on the host it is not collected at all (rather than collected and skipped)."""
    if os.environ.get("POP_IN_MICROVM") != "1" and (collection_path == INNER or INNER in collection_path.parents):
        return True
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport,
                                                                                               pytest.TestReport]:
    report = yield
    if (os.environ.get("CI") == "true" and report.skipped
            and any(item.get_closest_marker(m) for m in REAL_THINGS)):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI must not skip tests against real daemons and kernels: {reason}"
    setattr(item, f"rep_{report.when}", report)
    return report
