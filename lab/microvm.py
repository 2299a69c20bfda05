"""Debian's own kernel under QEMU, for the kernel features this host lacks (IPVS, WireGuard).

The host kernel has no IPVS, no WireGuard module, no dummy links, no netem and no
/lib/modules. Debian's stock kernel has all of them as modules, and boots here under QEMU in
software emulation (TCG; KVM is present but hangs). ``run_in_vm(argv)`` boots it, runs
``argv`` as root chrooted into the *host's own root filesystem* (mounted read-only over 9p,
so the repo, the venv and every installed tool are the host's), and returns its exit status
and output:

    result = run_in_vm([sys.executable, "-c", "import pyroute2"], modules=["ip_vs"])
    assert result.returncode == 0, result.output

Inside the guest:

- cwd is the repository root (derived from this file, never hard-coded), ``POP_IN_MICROVM=1``
  and ``CI`` (if set on the host) are in the environment, together with ``env=``.
- The host root is read-only, except ``/tmp``, ``/var/tmp``, ``/run`` and ``/dev/shm``
  (tmpfs, empty, apart from the repo, venv and module tree if they live there) and
  ``$POP_MICROVM_OUT``, a directory shared with the host (the run directory; its files are
  gone after the run unless ``keep=True``). ``HOME`` is /tmp/home.
- ``modules`` are loaded before the command; anything else is loaded on demand by the kernel
  (``ip link add ... type veth``, nftables, ``crc32c`` for ``ip_vs``) from the module tree in
  the cache. Network namespaces and veth work; there is no network to the outside at all
  (``-net none``), which is what the lab's network rule wants.
- The guest has ``memory_mb`` (default 1024) and one CPU; everything is emulated, so expect
  CPU work 20-40x slower than on the host (importing pyroute2: 10-20 s). Boot to the command
  takes about 4 s on an idle host, 10-15 s on a busy one.

The pattern for kernel tests: a host-side test in ``tests/kernel/`` (marked ``kernel`` by
tests/kernel/conftest.py) takes the ``microvm`` fixture, which skips naming what is missing,
and runs an inner suite under ``tests/kernel/inner/`` (collected only in the guest):

    def test_ipvs_adapter_in_real_kernel(microvm: KernelCache) -> None:
        result = run_pytest_in_vm(["tests/kernel/inner/test_ipvs.py"], modules=["ip_vs", "ip_vs_mh"])
        assert result.returncode == 0, result.output  # the inner pytest report, on failure

``run_pytest_in_vm`` runs ``python -m pytest -q`` with the host's venv, without pytest's cache
(the repo is read-only in the guest) and without Hypothesis's plugin (a minute of emulated
imports); an inner test can check ``os.environ.get("POP_IN_MICROVM") == "1"``.

The kernel, its module tree and the initramfs are built once into
``<repo>/.cache/microvm/<kernel version>/`` by ``python -m lab.microvm prepare`` (see
``lab.microvm_kernel``; downloads about 70 MB with ``apt-get download``, 15-30 s), and reused
by every run. ``python -m lab.microvm run [-m MODULE]... -- CMD...`` runs one command.

QEMU is always killed (and reaped) when the run times out or anything raises, and dies with
the process that started it. Run directories of runs whose process died are swept.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lab.microvm_kernel import (
    BUSYBOX,
    CACHE_ROOT,
    KERNEL_META_PACKAGE,
    KERNEL_PACKAGE_ENV,
    REPO_ROOT,
    KernelCache,
    VmError,
    kernel_cache,
    prepare,
)

__all__ = [
    "BUSYBOX", "CACHE_ROOT", "QEMU", "REPO_ROOT", "KernelCache", "VmError", "VmResult", "VmTimeout",
    "kernel_cache", "main", "prepare", "run_in_vm", "run_pytest_in_vm",
]

RUNS_DIR = CACHE_ROOT / "runs"
QEMU = "qemu-system-x86_64"
GUEST_TMPFS = (Path("/tmp"), Path("/var/tmp"), Path("/run"))  # empty in the guest; see microvm_init.sh
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PASSED_HOST_ENV = ("CI",)


class VmTimeout(VmError, TimeoutError):
    """The run exceeded its timeout; QEMU was killed. ``output`` is what the guest wrote."""

    def __init__(self, message: str, output: str, console: str) -> None:
        super().__init__(message)
        self.output = output
        self.console = console


@dataclass(frozen=True)
class VmResult:
    returncode: int
    output: str  # stdout and stderr of the command, interleaved
    console: str  # the serial console: kernel messages, init's complaints
    seconds: float  # wall time of the whole run: boot, command, power-off
    command_seconds: float  # the command alone, by the guest's clock

    @property
    def boot_seconds(self) -> float:
        """Roughly: QEMU start to command start (wall time minus the command's own time)."""
        return self.seconds - self.command_seconds


# --- running ---------------------------------------------------------------------------------


def _command_script(argv: Sequence[str], modules: Sequence[str], env: Mapping[str, str],
                    cwd: Path, cache: KernelCache) -> str:
    lines = ["# generated by lab/microvm.py, run by microvm_init.sh inside the guest"]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
    lines.append('mkdir -p "$HOME"')
    for module in modules:
        lines.append(f"/sbin/modprobe -d {shlex.quote(str(cache.module_root))} {shlex.quote(module)} "
                     f"|| {{ echo 'microvm: modprobe {module} failed' >&2; exit 125; }}")
    lines.append(f"cd {shlex.quote(str(cwd))} || exit 126")
    lines.append(f"exec {shlex.join(argv)}")
    return "\n".join(lines) + "\n"


def _guest_env(run_dir: Path, env: Mapping[str, str] | None) -> dict[str, str]:
    base = {"PATH": f"{Path(sys.executable).parent}:{GUEST_PATH}", "HOME": "/tmp/home",
            "LANG": "C.UTF-8", "TMPDIR": "/tmp", "PYTHONDONTWRITEBYTECODE": "1",
            "POP_IN_MICROVM": "1", "POP_MICROVM_OUT": str(run_dir)}
    base |= {key: os.environ[key] for key in PASSED_HOST_ENV if key in os.environ}
    merged = base | dict(env or {})
    for key, value in merged.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or "\0" in value:
            raise ValueError(f"invalid environment variable {key!r}")
    return merged


def _paths_under_guest_tmpfs(paths: Sequence[Path]) -> list[Path]:
    """Those of ``paths`` that the guest's empty tmpfs mounts would hide, outermost only."""
    hidden = [path.resolve() for path in paths
              if any(path.resolve().is_relative_to(tmp) for tmp in GUEST_TMPFS)]
    for path in hidden:
        if any(ch.isspace() for ch in str(path)):
            raise VmError(f"the microVM cannot keep a path with whitespace visible: {path}")
    return sorted({path for path in hidden
                   if not any(path != other and path.is_relative_to(other) for other in hidden)})


def _qemu_argv(cache: KernelCache, run_dir: Path, memory_mb: int) -> list[str]:
    return [
        # TCG only: KVM is present on these machines but hangs. "-cpu max" lets the guest use
        # every instruction TCG can emulate; measured here it cut Python start-up by a third.
        QEMU, "-accel", "tcg", "-cpu", "max", "-m", str(memory_mb), "-smp", "1",
        "-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none",
        "-serial", f"file:{run_dir / 'console.log'}", "-net", "none",
        "-device", "virtio-rng-pci",
        "-kernel", str(cache.kernel), "-initrd", str(cache.initramfs),
        # Speculation mitigations and the crypto self-tests (run for every algorithm the
        # kernel registers, about 40% of a boot) only cost emulated instructions in a
        # throwaway VM that tests our code, not the kernel's. no_timer_check: on a busy host the
        # emulated 8254 timer can miss the kernel's IO-APIC check, which then panics the boot
        # ("IO-APIC + timer doesn't work", seen in CI); the check means nothing in an emulated PC.
        "-append", "console=ttyS0 panic=-1 quiet mitigations=off cryptomgr.notests no_timer_check",
        "-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={run_dir},mount_tag=out,security_model=none,multidevs=remap",
    ]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def run_in_vm(argv: Sequence[str], *, modules: Sequence[str] = (), timeout: float = 300,
              env: Mapping[str, str] | None = None, cwd: Path | None = None,
              memory_mb: int = 1024, keep: bool = False) -> VmResult:
    """Boot the microVM, run ``argv`` in the host root as root, power off; see the module doc.

    ``timeout`` covers the whole run (boot included); on expiry QEMU is killed and VmTimeout
    carries the partial output. ``cwd`` defaults to the repository root. ``keep`` leaves the
    run directory (output, console log, command script) under .cache/microvm/runs.
    """
    if not argv:
        raise ValueError("empty command")
    if shutil.which(QEMU) is None:
        raise VmError(f"{QEMU} not found (apt-get install qemu-system-x86)")
    cache = kernel_cache()
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    _sweep_stale_runs()
    run_dir = RUNS_DIR / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
    run_dir.mkdir()
    try:
        guest_env = _guest_env(run_dir, env)
        (run_dir / "cmd.sh").write_text(
            _command_script(argv, modules, guest_env, cwd or REPO_ROOT, cache))
        preserve = _paths_under_guest_tmpfs([REPO_ROOT, cwd or REPO_ROOT, cache.module_root,
                                             Path(sys.prefix), Path(sys.base_prefix)])
        (run_dir / "vm.env").write_text(f"RUN_DIR={shlex.quote(str(run_dir))}\n"
                                        f"MODULE_ROOT={shlex.quote(str(cache.module_root))}\n"
                                        f"PRESERVE={shlex.quote(' '.join(map(str, preserve)))}\n")
        return _boot(cache, run_dir, memory_mb, timeout)
    finally:
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)


def _sweep_stale_runs() -> None:
    """Remove run directories left by runs whose process died (named <time>-<pid>-<random>)."""
    for run_dir in RUNS_DIR.iterdir():
        parts = run_dir.name.split("-")
        if len(parts) == 3 and parts[1].isdigit() and not Path(f"/proc/{parts[1]}").exists():
            shutil.rmtree(run_dir, ignore_errors=True)


def _boot(cache: KernelCache, run_dir: Path, memory_mb: int, timeout: float) -> VmResult:
    started = time.monotonic()
    # If the test process is killed outright, QEMU must not run on with a hung guest; setpriv
    # sets the parent-death signal without a preexec_fn (unsafe in a threaded test process).
    argv = ["setpriv", "--pdeathsig", "KILL", "--", *_qemu_argv(cache, run_dir, memory_mb)]
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            qemu_out, _ = qemu.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise VmTimeout(f"microVM run exceeded {timeout}s; QEMU killed",
                            _read(run_dir / "output"), _read(run_dir / "console.log")) from None
    finally:
        if qemu.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(qemu.pid, signal.SIGKILL)
            qemu.communicate()
    seconds = time.monotonic() - started
    console = _read(run_dir / "console.log")
    rc_text = _read(run_dir / "rc").strip()
    if not rc_text.isdigit():
        raise VmError(f"the guest reported no exit status (QEMU exited {qemu.returncode}): "
                      f"{qemu_out.decode(errors='replace').strip()}\n--- console ---\n{console[-4000:]}"
                      f"\n--- output ---\n{_read(run_dir / 'output')[-4000:]}")
    uptimes = _read(run_dir / "uptime").split()
    command_seconds = float(uptimes[1]) - float(uptimes[0]) if len(uptimes) == 2 else 0.0
    return VmResult(int(rc_text), _read(run_dir / "output"), console, seconds, command_seconds)


def run_pytest_in_vm(paths: Sequence[str], *, modules: Sequence[str] = (), timeout: float = 600,
                     extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                     hypothesis: bool = False) -> VmResult:
    """Run pytest with the host's venv inside the microVM (the kernel-test pattern).

    The cache provider is off (the repo is read-only in the guest) and so, unless
    ``hypothesis=True``, is Hypothesis's pytest plugin: importing it costs about a minute
    of emulated CPU, more than most inner suites take to run.
    """
    plugins = ["-p", "no:cacheprovider"] + ([] if hypothesis else ["-p", "no:hypothesispytest"])
    argv = [sys.executable, "-m", "pytest", "-q", *plugins, *extra_args, *paths]
    return run_in_vm(argv, modules=modules, timeout=timeout, env=env)


# --- command line ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.microvm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    prep = sub.add_parser("prepare", help="download and build the kernel cache (CI setup)")
    prep.add_argument("--package", help=f"kernel image package (default: what {KERNEL_META_PACKAGE} "
                                        f"depends on, or ${KERNEL_PACKAGE_ENV})")
    run = sub.add_parser("run", help="run one command in the microVM: run [-m MOD]... -- CMD...")
    run.add_argument("-m", "--module", action="append", default=[], help="kernel module to load first")
    run.add_argument("--timeout", type=float, default=300)
    run.add_argument("--memory", type=int, default=1024, help="guest memory in MiB")
    run.add_argument("--keep", action="store_true", help="keep the run directory")
    run.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.action == "prepare":
        started = time.monotonic()
        cache = prepare(args.package)
        print(f"microvm: kernel {cache.version} ready in {cache.path} ({time.monotonic() - started:.1f}s)")
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("run needs a command after --")
    result = run_in_vm(command, modules=args.module, timeout=args.timeout, memory_mb=args.memory,
                       keep=args.keep)
    sys.stdout.write(result.output)
    print(f"microvm: exit {result.returncode}, {result.seconds:.1f}s "
          f"(boot {result.boot_seconds:.1f}s, command {result.command_seconds:.1f}s)", file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
