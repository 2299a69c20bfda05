"""The microVM harness: Debian's kernel boots and has what this host's kernel lacks."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from lab.microvm import (
    REPO_ROOT,
    KernelCache,
    VmError,
    VmResult,
    VmTimeout,
    _paths_under_guest_tmpfs,
    run_in_vm,
    run_pytest_in_vm,
)

FEATURES = r"""
set -eu
test "$POP_IN_MICROVM" = 1
test "$(pwd)" = "$EXPECTED_CWD"
echo "kernel $(uname -r)"
ipvsadm -A -u 10.9.0.1:51820 -s mh
ipvsadm -Ln
ip link add wgtest0 type wireguard
ip -d -o link show wgtest0
python - <<'PY'
import sys
import pyroute2
from pyroute2 import IPVS
from pyroute2.ipvs import IPVSService
with IPVS() as ipvs:
    services = [IPVSService.from_message(msg) for msg in ipvs.service("dump")]
services = [(svc["addr"], svc["port"], svc["sched_name"]) for svc in services]
print("pyroute2", pyroute2.__version__, "from", sys.prefix, "services", services)
PY
"""


def _explain(result: VmResult) -> str:
    return f"exit {result.returncode}\n--- output ---\n{result.output}\n--- console ---\n{result.console[-3000:]}"


def test_ipvs_wireguard_and_the_venv_work_in_the_guest(microvm: KernelCache) -> None:
    result = run_in_vm(["sh", "-c", FEATURES], modules=["ip_vs", "ip_vs_mh", "wireguard"],
                       env={"EXPECTED_CWD": str(REPO_ROOT)}, timeout=240)
    assert result.returncode == 0, _explain(result)
    assert f"kernel {microvm.version}" in result.output
    assert re.search(r"UDP\s+10\.9\.0\.1:51820 mh", result.output), result.output
    assert re.search(r"wgtest0: .*\bwireguard\b", result.output), result.output
    assert f"from {sys.prefix}" in result.output
    assert "services [('10.9.0.1', 51820, 'mh')]" in result.output


def test_pytest_with_namespaces_runs_inside_the_guest(microvm: KernelCache) -> None:
    # The lab's own namespace, veth and route-watcher tests, run in the guest's kernel: proves
    # namespaces, module auto-loading (veth) and the inner-pytest pattern.
    result = run_pytest_in_vm(["tests/netns/test_lab_primitives.py"],
                              extra_args=["-k", "routewatch or veth or enter"], timeout=400)
    assert result.returncode == 0, _explain(result)
    assert re.search(r"\b4 passed\b", result.output), result.output


def test_failures_come_back_as_exit_status(microvm: KernelCache) -> None:
    result = run_in_vm(["sh", "-c", "echo out; echo err >&2; exit 7"], timeout=240)
    assert (result.returncode, result.output.split()) == (7, ["out", "err"]), _explain(result)
    missing = run_in_vm(["true"], modules=["no_such_module_xyz"], timeout=240)
    assert missing.returncode == 125, _explain(missing)
    assert "modprobe no_such_module_xyz failed" in missing.output


def _our_qemus() -> list[int]:
    marker = f"-{os.getpid()}-".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmdline and marker in cmdline:
                pids.append(int(proc.name))
    return pids


def test_timeout_kills_qemu(microvm: KernelCache) -> None:
    with pytest.raises(VmTimeout):
        run_in_vm(["sleep", "600"], timeout=3)
    assert _our_qemus() == []


def test_paths_hidden_by_the_guest_tmpfs_are_kept_outermost_first() -> None:
    # A CI checkout in /tmp must stay visible in the guest, whose /tmp is an empty tmpfs.
    paths = [Path("/tmp/ci/repo"), Path("/tmp/ci/repo/.venv"), Path("/work/main"), Path("/run/x/y")]
    assert _paths_under_guest_tmpfs(paths) == [Path("/run/x/y"), Path("/tmp/ci/repo")]
    with pytest.raises(VmError, match="whitespace"):
        _paths_under_guest_tmpfs([Path("/tmp/with space")])
