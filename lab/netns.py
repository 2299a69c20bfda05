"""Network namespaces, veth links and the foreground daemons that run inside them.

Contract:

- ``Netns(name)`` creates a named namespace (``ip netns add``) with ``lo`` up, and fails if
  the name is taken. ``close()`` stops every child started with ``popen()``, kills whatever
  else still runs inside the namespace, deletes it and its runtime directory; it is idempotent
  and never raises because something is already gone. ``Netns`` is a context manager.
- Daemons run as *foreground* children (``popen``) and are always reaped with ``wait()``:
  PID 1 on these machines reaps orphans only after seconds, so a killed daemonised process
  would still answer ``kill -0`` and a port or socket path would look busy.
- Lab namespaces run without IPv6 duplicate address detection, so addresses work at once.
- ``veth()`` creates the pair directly between two lab namespaces; neither end ever exists
  in the host namespace, and nothing here adds routes or addresses outside lab namespaces.
- ``cleanup_prefix(prefix)`` removes the leftovers of a crashed run: every namespace whose
  name starts with ``prefix``, the processes inside it and its runtime directory.
- Every namespace has a runtime directory ``RUN_ROOT/<name>`` (``Netns.rundir``) for sockets
  and pid files of its daemons; it is created lazily and removed with the namespace.

All of this needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

NETNS_DIR = Path("/run/netns")
RUN_ROOT = Path("/run/pop-lab")
IFNAMSIZ = 15  # the kernel's limit on interface names, without the trailing NUL

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class CommandError(subprocess.CalledProcessError):
    """A command failed; unlike CalledProcessError, str() includes its stderr."""

    def __str__(self) -> str:
        detail = (self.stderr or self.output or "").strip()
        return f"{super().__str__()} Output: {detail}" if detail else super().__str__()


def _setns(fd: int) -> None:
    # os.setns() only exists from Python 3.12 on.
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def run_host(argv: Sequence[str], *, check: bool = True, timeout: float = 30,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command in the calling process's namespace, text mode, output captured."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input,
                          check=False)
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, list(argv), proc.stdout, proc.stderr)
    return proc


class Netns:
    """A named network namespace owning the foreground processes started in it."""

    def __init__(self, name: str) -> None:
        if not name or "/" in name or name in {".", ".."}:
            raise ValueError(f"invalid namespace name {name!r}")
        self.name = name
        self._children: list[subprocess.Popen[bytes]] = []
        self._closed = False
        if (NETNS_DIR / name).exists():
            raise FileExistsError(f"network namespace {name!r} already exists "
                                  f"(a crashed run? see lab.netns.cleanup_prefix)")
        run_host(["ip", "netns", "add", name])
        try:
            self.run("ip", "link", "set", "lo", "up")
            self._disable_dad()
        except BaseException:
            run_host(["ip", "netns", "del", name], check=False)
            raise

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _disable_dad(self) -> None:
        # Duplicate address detection keeps every new IPv6 address (link-locals included,
        # which FRR uses as eBGP next hops) unusable for about a second; a lab link has no
        # duplicates. /proc/sys/net shows the namespace of the thread that opens it.
        with self.enter():
            for conf in ("all", "default"):
                path = Path(f"/proc/sys/net/ipv6/conf/{conf}/accept_dad")
                if path.exists():
                    path.write_text("0\n")

    @property
    def rundir(self) -> Path:
        """Runtime directory for this namespace's sockets and pid files (created on first use)."""
        path = RUN_ROOT / self.name
        if not path.is_dir():
            path.mkdir(parents=True, exist_ok=True)
            # Daemons that drop privileges (zebra runs as frr) must be able to traverse it.
            for directory in (RUN_ROOT, path):
                directory.chmod(0o755)
        return path

    def _argv(self, argv: Sequence[str]) -> list[str]:
        if not argv:
            raise ValueError("empty command")
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 30,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace and wait for it; raises CommandError on failure."""
        return run_host(self._argv(argv), check=check, timeout=timeout, input=input)

    def popen(self, *argv: str, log: Path | None = None, env: Mapping[str, str] | None = None,
              user: str | None = None, pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
        """Start a foreground child inside the namespace and track it for stop()/close().

        ``log`` receives stdout and stderr (appended); without it they are inherited.
        ``env`` adds to the inherited environment. ``user`` drops to that user (and its
        groups) after entering the namespace, which needs root. ``pass_fds`` stay open in the
        child (a socket keeps the namespace it was made in: one bound on the host's loopback
        serves, from a process inside the lab, a browser on the host). The child leads its own
        process group, so that a SIGKILL also reaches anything it spawned.
        """
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        command = list(argv)
        if user is not None:
            # Dropping privileges in the child itself would come before `ip netns exec`, which
            # needs root: drop after entering the namespace instead.
            pw = pwd.getpwnam(user)
            command = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", *command]
        full_env = None if env is None else {**os.environ, **env}
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(log.open("ab")) if log is not None else None
            proc = subprocess.Popen(self._argv(command), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT if out is not None else None,
                                    env=full_env, start_new_session=True, pass_fds=tuple(pass_fds))
        self._children.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 3.0) -> int | None:
        """SIGTERM, wait, SIGKILL the process group, wait; returns the exit status.

        Returns None only if the process survived SIGKILL for ``timeout`` seconds (stuck in
        the kernel). The process is reaped in every other case.
        """
        if proc in self._children:
            self._children.remove(proc)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    @property
    def children(self) -> tuple[subprocess.Popen[bytes], ...]:
        """The tracked children that have not been stopped yet."""
        return tuple(self._children)

    def pids(self) -> list[int]:
        """Every process currently inside the namespace (including untracked ones)."""
        return _netns_pids(self.name)

    def close(self) -> None:
        """Stop all children, kill stragglers, delete the namespace. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for proc in list(self._children):
            self.stop(proc)
        _remove_netns(self.name)

    @contextlib.contextmanager
    def enter(self) -> Iterator[None]:
        """Move the *calling thread* into the namespace for the ``with`` block.

        Sockets opened inside the block stay in the namespace after it ends; that is how a
        test thread opens a netlink or UDP socket "inside" a namespace.
        """
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.open(NETNS_DIR / self.name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)


def veth(a: Netns, a_ifname: str, a_addr: str | None,  # noqa: PLR0917 - reads as two link ends
         b: Netns, b_ifname: str, b_addr: str | None) -> None:
    """Link two namespaces with a veth pair, address both ends (CIDR or None) and bring them up.

    IPv6 addresses are usable at once: lab namespaces run without duplicate address detection.
    """
    for ifname in (a_ifname, b_ifname):
        if not 0 < len(ifname) <= IFNAMSIZ or "/" in ifname or " " in ifname:
            raise ValueError(f"invalid interface name {ifname!r} (at most {IFNAMSIZ} characters)")
    a.run("ip", "link", "add", a_ifname, "type", "veth", "peer", "name", b_ifname, "netns", b.name)
    for ns, ifname, addr in ((a, a_ifname, a_addr), (b, b_ifname, b_addr)):
        if addr is not None:
            ns.run("ip", "address", "add", addr, "dev", ifname)
        ns.run("ip", "link", "set", ifname, "up")


def cleanup_prefix(prefix: str) -> list[str]:
    """Delete every namespace named ``prefix*`` with its processes and runtime directory.

    For crash recovery: a run that died without ``close()`` leaves namespaces and daemons
    behind. Returns the names of the namespaces removed.
    """
    if not prefix:
        raise ValueError("refusing to clean up every namespace: empty prefix")
    names = sorted(p.name for p in NETNS_DIR.glob(f"{prefix}*")) if NETNS_DIR.is_dir() else []
    for name in names:
        _remove_netns(name)
    if RUN_ROOT.is_dir():
        for leftover in RUN_ROOT.glob(f"{prefix}*"):
            shutil.rmtree(leftover, ignore_errors=True)
    return names


def _netns_pids(name: str) -> list[int]:
    proc = run_host(["ip", "netns", "pids", name], check=False)
    return [int(tok) for tok in proc.stdout.split() if tok.isdigit()]


def _is_gone(pid: int) -> bool:
    # A zombie is dead for our purposes; reap it if it happens to be our own child.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rpartition(")")[2].split()[0] in {"Z", "X"}


def _kill_all(pids: Sequence[int], timeout: float = 3.0) -> None:
    # Our own pid shows up when the main thread is inside the namespace (Netns.enter()).
    pids = [pid for pid in pids if pid != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    pending = list(pids)
    while pending and time.monotonic() < deadline:
        pending = [pid for pid in pending if not _is_gone(pid)]
        if pending:
            time.sleep(0.02)


def _remove_netns(name: str) -> None:
    if (NETNS_DIR / name).exists():
        _kill_all(_netns_pids(name))
        run_host(["ip", "netns", "del", name], check=False)
    shutil.rmtree(RUN_ROOT / name, ignore_errors=True)
