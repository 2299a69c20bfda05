"""prometheus-node-exporter on a lab VPN server, with that server's own CPU.

Every lab node shares the host's kernel, and /proc/stat is not namespaced: an exporter in a
server's namespace would report the host's CPU, the same for every server. So each server
gets what lxcfs gives a container: its own CPU accounting. The server's processes that burn
CPU run in a cgroup of their own (cpuacct on cgroup v1, cpu.stat on v2), and a small view
process (`python -m lab.nodeexporter view ...`) turns that cgroup's usage into a `stat` file
of a node with `cpus` CPUs, which the real exporter reads with `--path.procfs`. The view runs
on the host: `ip netns exec` mounts a /sys of its own, without the cgroup hierarchies. The CPU is
really burnt and really measured; only the node boundary is the cgroup's.

The view counts per interval: of the capacity `cpus x dt`, the cgroup's usage (at most the
capacity) is user/system time and the rest is idle, so the counters only grow and a burn
that stops shows as idle at once.

`NodeExporter(ns, address, port, workdir, cgroup)`: `start()`, `burn(loops)` (busy loops in
the server's cgroup, nice 19 so that the lab's daemons keep their share), `stop()`.
Under containerlab the exporter runs in the container (entrypoint.sh) and sees the host's
CPU unless lxcfs is installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from lab.netns import Netns

USER_HZ = 100  # /proc/stat's unit
CGROUP_V1 = Path("/sys/fs/cgroup/cpuacct")
CGROUP_V2 = Path("/sys/fs/cgroup")
EXPORTER = "prometheus-node-exporter"
BUSY_LOOP = "while True: pass"


def cgroup_dir(name: str) -> Path:
    """The server's CPU cgroup (created by start())."""
    return (CGROUP_V1 if (CGROUP_V1 / "cpuacct.stat").exists() else CGROUP_V2) / f"pop-lab-{name}"


def usage(cgroup: Path) -> tuple[float, float]:
    """(user, system) CPU seconds the cgroup's processes used."""
    v1 = cgroup / "cpuacct.stat"
    if v1.exists():
        fields = dict(line.split() for line in v1.read_text().splitlines())
        return int(fields["user"]) / USER_HZ, int(fields["system"]) / USER_HZ
    fields = dict(line.split() for line in (cgroup / "cpu.stat").read_text().splitlines())
    return int(fields["user_usec"]) / 1e6, int(fields["system_usec"]) / 1e6


def stat_text(user: float, system: float, idle: float, cpus: int) -> str:
    """A /proc/stat with the node's counters (seconds) split evenly over its CPUs."""
    def line(name: str, share: float) -> str:
        return (f"{name} {round(user * share * USER_HZ)} 0 {round(system * share * USER_HZ)} "
                f"{round(idle * share * USER_HZ)} 0 0 0 0 0 0")

    lines = [line("cpu ", 1.0)] + [line(f"cpu{n}", 1 / cpus) for n in range(cpus)]
    return "\n".join([*lines, "btime 1700000000", ""])


def view(cgroup: Path, procfs: Path, cpus: int, interval: float = 0.2, share: float = 1.0) -> None:
    """Write ``procfs``/stat from the cgroup's usage every ``interval``, forever. The node has
    ``cpus`` CPUs, of which it may use ``share`` (like a container's CPU quota)."""
    user = system = idle = 0.0
    last_at, (last_user, last_system) = time.monotonic(), usage(cgroup)
    while True:
        try:
            _write(procfs / "stat", stat_text(user, system, idle, cpus))
            time.sleep(interval)
            now, (u, s) = time.monotonic(), usage(cgroup)
        except FileNotFoundError:
            return  # the lab is gone (down, or a sweep after a crash removed the cgroup)
        capacity = cpus * share * (now - last_at)
        du, ds = max(0.0, u - last_user), max(0.0, s - last_system)
        scale = min(1.0, capacity / (du + ds)) if du + ds > 0 else 1.0
        user, system = user + du * scale, system + ds * scale
        idle += capacity - (du + ds) * scale
        last_at, last_user, last_system = now, u, s


def _write(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.replace(path)  # the exporter never reads half a file


class NodeExporter:
    def __init__(self, ns: Netns, name: str, address: str, port: int, workdir: Path, *, cpus: int = 1,
                 share: float = 1.0) -> None:
        self.ns, self.name, self.address, self.port, self.cpus = ns, name, address, port, cpus
        self.share = share  # of its CPUs the node may use: a quota, for hosts with few CPUs to burn
        self.procfs = workdir / "proc"
        self.log = workdir / "node-exporter.log"
        self.cgroup = cgroup_dir(f"{ns.name}")
        self.exporter: subprocess.Popen[bytes] | None = None
        self.viewer: subprocess.Popen[bytes] | None = None
        self.burners: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}/metrics"

    def start(self) -> None:
        binary = shutil.which(EXPORTER)
        if binary is None:
            raise RuntimeError(f"{EXPORTER} is not installed (.ci/install installs Debian's package)")
        self.cgroup.mkdir(exist_ok=True)
        self.procfs.mkdir(parents=True, exist_ok=True)
        _write(self.procfs / "stat", stat_text(0.0, 0.0, 0.0, self.cpus))
        # on the host: `ip netns exec` mounts a fresh /sys, without the cgroup hierarchies
        with self.log.open("ab") as log:
            argv = [sys.executable, "-m", "lab.nodeexporter", "view", str(self.cgroup), str(self.procfs),
                    str(self.cpus), str(self.share)]
            self.viewer = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True, cwd=Path(__file__).resolve().parents[1])
        self.exporter = self.ns.popen(binary, f"--web.listen-address={self.address}:{self.port}",
                                      f"--path.procfs={self.procfs}", "--collector.disable-defaults",
                                      "--collector.cpu", log=self.log)
        deadline = time.monotonic() + 10
        while not self.ns.run("ss", "-Hltn", f"sport = :{self.port}", check=False).stdout.strip():
            if self.exporter.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node-exporter on {self.name} did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def burn(self, loops: int = 2, nice: int = 19) -> list[subprocess.Popen[bytes]]:
        """Busy loops in the server's cgroup (they show in its CPU), until unburn() or stop()."""
        for _ in range(loops):
            proc = self.ns.popen("nice", "-n", str(nice), sys.executable, "-c", BUSY_LOOP)
            (self.cgroup / "cgroup.procs").write_text(f"{proc.pid}\n")
            self.burners.append(proc)
        return self.burners

    def unburn(self) -> None:
        for proc in self.burners:
            self.ns.stop(proc)
        self.burners.clear()

    @contextlib.contextmanager
    def burning(self, loops: int = 2, nice: int = 19) -> Iterator[None]:
        self.burn(loops, nice)
        try:
            yield
        finally:
            self.unburn()

    def stop(self) -> None:
        self.unburn()
        for proc in (self.exporter, self.viewer):
            if proc is not None:
                self.ns.stop(proc)
        self.exporter = self.viewer = None
        with contextlib.suppress(OSError):  # busy only if a process escaped: left for the host to see
            self.cgroup.rmdir()


def remove_cgroups(prefix: str) -> None:
    """The CPU cgroups of a lab's servers (namespaces ``<prefix>*``) that a crash left behind."""
    for cgroup in cgroup_dir(prefix).parent.glob(f"pop-lab-{prefix}*"):
        with contextlib.suppress(OSError):
            cgroup.rmdir()


def main(argv: list[str]) -> int:
    if len(argv) == 5 and argv[0] == "view":
        os.nice(-5)  # the view's clock must not lag behind the burn it measures
        view(Path(argv[1]), Path(argv[2]), int(argv[3]), share=float(argv[4]))
        return 0
    print("usage: python -m lab.nodeexporter view CGROUP PROCFS CPUS SHARE", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
