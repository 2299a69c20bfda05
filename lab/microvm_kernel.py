"""The microVM's kernel cache: Debian's kernel, its module tree and the initramfs.

``prepare()`` (``python -m lab.microvm prepare``) downloads the kernel image package that
``linux-image-amd64`` depends on (or ``$POP_MICROVM_KERNEL``) with ``apt-get download``,
keeps the module trees a network lab needs (net, crypto, lib, virtio, 9p, virtual NICs; no
hardware drivers), runs ``depmod``, extracts an uncompressed ``vmlinux`` to boot through its
PVH entry, and builds the initramfs (busybox-static, the 9p modules, ``microvm_init.sh`` as
/init) into ``<repo>/.cache/microvm/<kernel version>/``. ``kernel_cache()`` returns the
current cache, preparing it on first use. Building is serialised by a lock file, and
changes to an existing cache are additive, because other runs may be booting from it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import lzma
import os
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_ROOT = REPO_ROOT / ".cache" / "microvm"
INIT_SCRIPT = Path(__file__).with_name("microvm_init.sh")
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


class VmError(RuntimeError):
    """The VM could not be prepared, did not boot, or did not report an exit status."""


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
