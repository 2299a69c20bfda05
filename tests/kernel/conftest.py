"""Kernel tests: features this host's kernel lacks (IPVS, kernel WireGuard), run in the microVM.

Host-side tests (``tests/kernel/test_*.py``) take the ``microvm`` fixture and call
``lab.microvm.run_in_vm`` / ``run_pytest_in_vm``. Tests under ``tests/kernel/inner/`` are what
those host-side tests run *inside* the guest; tests/conftest.py collects them only there.

The ``microvm`` fixture skips, naming what is missing, only when the parts cannot be there
(no root, no QEMU, no busybox-static, cpio or depmod to build the cache). When they are
present it prepares the kernel cache (a download on first use, as in CI's setup step) and
any failure is an error, never a skip. Every test here gets the ``kernel`` marker.

The ``inner_run`` fixture runs the inner suites of every collected module that names one
(``INNER``) in two microVMs side by side (tests/kernel/suite.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lab.microvm import BUSYBOX, QEMU, KernelCache, VmResult, kernel_cache, run_pytest_in_vm
from tests.kernel.suite import PYTEST_ARGS, InnerRun, InnerSuite

KERNEL_DIR = Path(__file__).parent
IN_MICROVM = os.environ.get("POP_IN_MICROVM") == "1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if KERNEL_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.kernel)


def _missing() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("root (euid 0)")
    if shutil.which(QEMU) is None:
        missing.append(f"{QEMU} (apt-get install qemu-system-x86)")
    if not BUSYBOX.exists():
        missing.append(f"{BUSYBOX} (apt-get install busybox-static)")
    for tool, package in (("cpio", "cpio"), ("depmod", "kmod"), ("apt-get", "apt")):
        if shutil.which(tool) is None:
            missing.append(f"{tool} ({package})")
    return missing


@pytest.fixture(scope="session")
def microvm() -> KernelCache:
    if IN_MICROVM:
        pytest.skip("already inside the microVM: no nested VMs")
    if missing := _missing():
        pytest.skip("microVM tests need " + ", ".join(missing))
    return kernel_cache()


@pytest.fixture(scope="session")
def inner_run(microvm: KernelCache, request: pytest.FixtureRequest) -> InnerRun:
    suites: list[InnerSuite] = []
    for item in request.session.items:
        suite = getattr(getattr(item, "module", None), "INNER", None)
        if isinstance(suite, InnerSuite) and suite not in suites:
            suites.append(suite)

    def boot(paths: list[str], modules: list[str]) -> VmResult:
        # emulated (TCG) guest: 3-5 minutes for a half; the timeout only stops a hung guest
        return run_pytest_in_vm(paths, modules=modules, timeout=2400, extra_args=PYTEST_ARGS)

    return InnerRun.running(suites, boot)
