"""checks.realtime_priority against the real kernel's scheduler (pop.priority): the thread runs
under SCHED_RR, what it starts does not, 0 puts it back, and without CAP_SYS_NICE the kernel's
refusal comes back as text while the thread runs on as before."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROGRAM = """
import json, os, subprocess, sys
sys.path.insert(0, sys.argv[1])
from pop import priority
out = {"before": priority.current(), "refused": priority.apply(10), "after": priority.current()}
child = subprocess.run([sys.executable, "-c",
                        "import os; print(os.sched_getscheduler(0), os.sched_getparam(0).sched_priority)"],
                       capture_output=True, text=True, check=True)
out["child"] = [int(word) for word in child.stdout.split()]
out["back"] = [priority.apply(0), priority.current()]
print(json.dumps(out))
"""


def run(*prefix: str) -> dict[str, object]:
    done = subprocess.run([*prefix, sys.executable, "-c", PROGRAM, str(ROOT)], capture_output=True, text=True,
                          check=True, timeout=30)
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_the_thread_runs_round_robin_and_what_it_starts_does_not() -> None:
    if os.geteuid() != 0:
        pytest.skip("SCHED_RR needs root (CAP_SYS_NICE)")
    out = run()
    assert out["before"] == ["other", 0]
    assert out["refused"] is None
    assert out["after"] == ["rr", 10]
    assert out["child"] == [os.SCHED_OTHER, 0]  # SCHED_RESET_ON_FORK
    assert out["back"] == [None, ["other", 0]]


def test_without_cap_sys_nice_the_refusal_is_said_and_nothing_changes() -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to take CAP_SYS_NICE away")
    out = run("setpriv", "--bounding-set=-sys_nice", "--inh-caps=-sys_nice")
    assert isinstance(out["refused"], str) and "refused" in out["refused"] and "CAP_SYS_NICE" in out["refused"]
    assert out["after"] == ["other", 0]
