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
  (tmpfs, empty) and ``$POP_MICROVM_OUT``, a directory shared with the host (the run
  directory; its files are gone after the run unless ``keep=True``). ``HOME`` is /tmp/home.
- ``modules`` are loaded before the command; anything else is loaded on demand by the kernel
  (``ip link add ... type veth``, nftables, ``crc32c`` for ``ip_vs``) from the module tree in
  the cache. Network namespaces and veth work; there is no network to the outside at all
  (``-net none``), which is what the lab's network rule wants.
- The guest has ``memory_mb`` (default 1024) and one CPU; everything is emulated, so expect
  roughly 10x slower CPU work than on the host. Boot to the command takes about 10-15 s.

The pattern for kernel tests (files under ``tests/kernel/inner/`` only run in the guest;
``tests/kernel/conftest.py`` skips them elsewhere):

    @pytest.mark.kernel
    def test_ipvs_adapter_in_real_kernel():
        result = run_pytest_in_vm(["tests/kernel/inner/test_ipvs.py"], modules=["ip_vs", "ip_vs_mh"])
        assert result.returncode == 0, result.output  # the inner pytest report, on failure

``run_pytest_in_vm`` runs ``python -m pytest -q`` with the host's venv, without pytest's cache
(the repo is read-only in the guest) and without Hypothesis's plugin (a minute of emulated
imports); an inner test can check ``os.environ.get("POP_IN_MICROVM") == "1"``.

The kernel, its module tree (net, crypto, lib, virtio, 9p, the virtual NICs; no hardware
drivers) and the initramfs (busybox-static, the 9p modules, ``microvm_init.sh`` as /init) are
built once into ``<repo>/.cache/microvm/<kernel version>/`` by ``python -m lab.microvm
prepare`` (downloads about 70 MB with ``apt-get download``; about 20 s), and reused by every
run. ``python -m lab.microvm run [-m MODULE]... -- CMD...`` runs one command.

QEMU is always killed (and reaped) when the run times out or anything raises, and dies with
the process that started it. Run directories of runs whose process died are swept.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import lzma
import os
import re
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_ROOT = REPO_ROOT / ".cache" / "microvm"
RUNS_DIR = CACHE_ROOT / "runs"
INIT_SCRIPT = Path(__file__).with_name("microvm_init.sh")
QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")
KERNEL_META_PACKAGE = "linux-image-amd64"
KERNEL_PACKAGE_ENV = "POP_MICROVM_KERNEL"  # e.g. linux-image-6.1.0-56-amd64, overrides apt
CACHE_FORMAT = 2  # 2: with an uncompressed vmlinux (PVH entry)

# What the guest needs before it can reach the host root: virtio PCI, 9p, and an entropy
# source so that getrandom() never stalls an emulated boot.
INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "virtio-rng")

# Module trees kept from the kernel package; hardware drivers are most of its 400 MB.
KEPT_MODULE_TREES = ("net", "crypto", "lib", "arch", "drivers/net", "drivers/virtio",
                     "drivers/char/hw_random", "fs/9p", "fs/netfs", "fs/fscache")
DROPPED_MODULE_TREES = ("drivers/net/ethernet", "drivers/net/wireless", "drivers/net/usb",
                        "drivers/net/can", "drivers/net/wwan", "drivers/net/ieee802154")

GUEST_TMPFS = (Path("/tmp"), Path("/var/tmp"), Path("/run"))  # empty in the guest; see microvm_init.sh
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PASSED_HOST_ENV = ("CI",)


class VmError(RuntimeError):
    """The VM could not be prepared, did not boot, or did not report an exit status."""


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


@dataclass(frozen=True)
class KernelCache:
    version: str  # e.g. 6.1.0-56-amd64
    path: Path

    @property
    def vmlinuz(self) -> Path:
        """The kernel as Debian ships it (bzImage, XZ-compressed)."""
        return self.path / "vmlinuz"

    @property
    def vmlinux(self) -> Path:
        """The same kernel uncompressed, bootable through its PVH entry (absent if it has none)."""
        return self.path / "vmlinux"

    @property
    def kernel(self) -> Path:
        # Decompressing XZ inside an emulated CPU takes about 10 s of every boot; QEMU loads
        # an uncompressed ELF with a PVH entry point directly.
        return self.vmlinux if self.vmlinux.exists() else self.vmlinuz

    @property
    def initramfs(self) -> Path:
        # Named after what goes into it, so that changing /init builds a new one beside the old,
        # which runs in progress may still be booting. Uncompressed, for the same reason.
        return self.path / f"initramfs-{_initramfs_digest()}.cpio"

    @property
    def module_root(self) -> Path:
        """The directory that ``modprobe -d`` takes: it holds lib/modules/<version>."""
        return self.path / "root"


# --- preparing the cache ---------------------------------------------------------------------


def _run(argv: Sequence[str], *, timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=timeout, cwd=cwd)
    if proc.returncode != 0:
        raise VmError(f"{shlex.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _kernel_package_from_apt() -> str:
    def depends() -> list[str]:
        out = subprocess.run(["apt-cache", "depends", KERNEL_META_PACKAGE], capture_output=True,
                             text=True, check=False, timeout=120).stdout
        return re.findall(r"Depends:\s+(linux-image-\S+)", out)

    found = depends()
    if not found:  # a fresh machine or container whose package lists were never fetched
        _run(["apt-get", "update"], timeout=600)
        found = depends()
    if not found:
        raise VmError(f"apt knows no dependency of {KERNEL_META_PACKAGE}; set {KERNEL_PACKAGE_ENV}")
    return found[0]


def _download(package: str, into: Path) -> Path:
    # apt's _apt user must be able to write the download directory, or apt warns.
    into.chmod(0o777)
    try:
        _run(["apt-get", "download", package], cwd=into, timeout=900)
    except VmError:
        _run(["apt-get", "update"], timeout=600)  # the index may name a version gone from the mirror
        _run(["apt-get", "download", package], cwd=into, timeout=900)
    debs = sorted(into.glob(f"{package}_*.deb"))
    if not debs:
        raise VmError(f"apt-get download {package} left no .deb in {into}")
    return debs[-1]


def _module_deps(moddir: Path) -> dict[str, list[str]]:
    """Module name -> [path of the module, paths of its dependencies...], from modules.dep."""
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        name = Path(target).name.split(".ko")[0].replace("-", "_")
        deps[name] = [target, *rest.split()]
    return deps


def _load_order(names: Sequence[str], deps: Mapping[str, list[str]]) -> list[str]:
    """Module paths in an order insmod accepts: every dependency before its users."""
    by_path = {paths[0]: name for name, paths in deps.items()}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps[by_path[path]][1:]:
            visit(dep)
        order.append(path)

    for name in names:
        key = name.replace("-", "_")
        if key not in deps:
            raise VmError(f"kernel module {name} not found in modules.dep")
        visit(deps[key][0])
    return order


def _initramfs_digest() -> str:
    content = INIT_SCRIPT.read_bytes() + "\0".join(INITRAMFS_MODULES).encode()
    return hashlib.sha256(content).hexdigest()[:12]


def _write_initramfs(cache: KernelCache, staging: Path) -> None:
    moddir = cache.module_root / "lib" / "modules" / cache.version
    order = _load_order(INITRAMFS_MODULES, _module_deps(moddir))
    for sub in ("bin", "sbin", "dev", "proc", "sys", "host", "out", "tmp", "modules"):
        (staging / sub).mkdir()
    shutil.copy2(BUSYBOX, staging / "bin" / "busybox")
    (staging / "bin" / "sh").symlink_to("busybox")
    shutil.copy2(INIT_SCRIPT, staging / "init")
    (staging / "init").chmod(0o755)
    # The kernel opens /dev/console for init before anything is mounted.
    os.mknod(staging / "dev" / "console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))
    names = []
    for rel in order:
        shutil.copy2(moddir / rel, staging / "modules" / Path(rel).name)
        names.append(Path(rel).name)
    (staging / "modules.order").write_text("\n".join(names) + "\n")
    files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*"))
    archive = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=staging,
                             input="\n".join([".", *files]).encode(), capture_output=True, check=False)
    if archive.returncode != 0:
        raise VmError(f"cpio failed: {archive.stderr.decode(errors='replace')}")
    partial = cache.initramfs.with_suffix(".partial")
    partial.write_bytes(archive.stdout)
    partial.rename(cache.initramfs)


_PVH_NOTE = re.compile(rb"\x04\x00\x00\x00.\x00\x00\x00\x12\x00\x00\x00Xen\x00", re.DOTALL)


def _extract_vmlinux(cache: KernelCache) -> None:
    """Write cache.vmlinux from the bzImage if its payload is XZ and it has a PVH entry."""
    image = cache.vmlinuz.read_bytes()
    start = image.find(b"\xfd7zXZ\x00")
    if start < 0:
        return
    try:
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(image[start:])
    except lzma.LZMAError:
        return
    # XEN_ELFNOTE_PHYS32_ENTRY (18): without it QEMU cannot boot the ELF directly.
    if elf[:4] != b"\x7fELF" or not _PVH_NOTE.search(elf):
        return
    partial = cache.vmlinux.with_suffix(".partial")
    partial.write_bytes(elf)
    partial.rename(cache.vmlinux)


def _complete(cache: KernelCache) -> None:
    """Add what an older cache lacks (uncompressed kernel, the current initramfs), in place.

    Additive only, because other runs may be booting from the cache at this moment.
    """
    stamp = cache.path / "complete"
    if f"format={CACHE_FORMAT}" not in stamp.read_text():
        if not cache.vmlinux.exists():
            _extract_vmlinux(cache)
        stamp.write_text(stamp.read_text().split()[0] + f" format={CACHE_FORMAT}\n")
    if not cache.initramfs.exists():
        with tempfile.TemporaryDirectory(prefix=".initramfs-", dir=cache.path) as staging:
            _write_initramfs(cache, Path(staging))


def _up_to_date(cache: KernelCache) -> bool:
    return f"format={CACHE_FORMAT}" in (cache.path / "complete").read_text() and cache.initramfs.exists()


def _build(package: str, version: str, final: Path) -> KernelCache:
    with tempfile.TemporaryDirectory(prefix=f".build-{version}-", dir=CACHE_ROOT) as tmp:
        work = Path(tmp)
        (work / "deb").mkdir()
        deb = _download(package, work / "deb")
        root = work / "cache" / "root"
        root.mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(deb), str(root)], timeout=600)
        moddir = root / "lib" / "modules" / version
        kernel_dir = moddir / "kernel"
        kept = work / "kept"
        for tree in KEPT_MODULE_TREES:
            if (kernel_dir / tree).is_dir():
                (kept / tree).parent.mkdir(parents=True, exist_ok=True)
                (kernel_dir / tree).rename(kept / tree)
        for tree in DROPPED_MODULE_TREES:
            shutil.rmtree(kept / tree, ignore_errors=True)
        shutil.rmtree(kernel_dir)
        kept.rename(kernel_dir)
        _run(["depmod", "-b", str(root), version], timeout=300)
        cache = KernelCache(version, work / "cache")
        (root / "boot" / f"vmlinuz-{version}").rename(cache.vmlinuz)
        _extract_vmlinux(cache)
        shutil.rmtree(root / "boot")
        shutil.rmtree(root / "usr", ignore_errors=True)
        staging = work / "initramfs"
        staging.mkdir()
        _write_initramfs(cache, staging)
        (cache.path / "complete").write_text(f"{package} format={CACHE_FORMAT}\n")
        cache.path.rename(final)
    return KernelCache(version, final)


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with (CACHE_ROOT / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent first runs build the cache once
        yield


def _cached(version: str) -> KernelCache | None:
    """The complete cache of ``version``, in whatever format it was built."""
    cache = KernelCache(version, CACHE_ROOT / version)
    return cache if (cache.path / "complete").exists() else None


def prepare(package: str | None = None) -> KernelCache:
    """Download and build the kernel cache if needed; returns it. Records it as current."""
    with _cache_lock():
        package = package or os.environ.get(KERNEL_PACKAGE_ENV) or _kernel_package_from_apt()
        version = package.removeprefix("linux-image-")
        if not re.fullmatch(r"[0-9][\w.+-]*", version):
            raise VmError(f"not a kernel image package: {package}")
        cache = _cached(version) or _build(package, version, CACHE_ROOT / version)
        if not _up_to_date(cache):
            _complete(cache)
        (CACHE_ROOT / "current").write_text(version + "\n")
        return cache


def kernel_cache() -> KernelCache:
    """The current kernel cache, preparing it (downloading) on first use."""
    current = CACHE_ROOT / "current"
    if current.exists() and (cache := _cached(current.read_text().strip())) is not None:
        if not _up_to_date(cache):
            with _cache_lock():
                if not _up_to_date(cache):
                    _complete(cache)
        return cache
    return prepare()


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
        # Speculation mitigations only cost emulated instructions in a throwaway test VM.
        "-append", "console=ttyS0 panic=-1 quiet mitigations=off",
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
