"""A lab's record on disk, and the sweep that removes a lab by it whatever became of its owner.

Contract:

- ``<statedir>/state.json`` (``STATE_FILE``) is written by ``lab.runner.Lab`` before it creates
  anything: the namespace prefix, the namespaces, the wireguard-go interface names, the owner's
  pid and whether that owner is a supervisor (``python -m lab``), plus what the supervisor adds
  once the lab is up. ``write_state`` replaces it atomically; ``read_state`` returns None when
  there is none or it cannot be read.
- ``sweep(statedir)`` asks a supervisor that still runs to stop (SIGTERM, then SIGKILL), then
  removes every namespace carrying the prefix with its processes, the UAPI sockets and the state
  directory. ``remove_leftovers`` is that last step, also used by ``Lab.down()``.
- ``lab_resources(prefix, wg_ifnames)`` lists whatever of a lab still exists on the host, for
  tests proving that nothing was left behind.

The default state directories live under ``STATE_ROOT`` (``.lab/`` in the repository, git-ignored).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lab import nodeexporter
from lab.netns import cleanup_prefix
from lab.wgserver import UAPI_DIR

STATE_ROOT = Path(__file__).resolve().parent.parent / ".lab"
STATE_FILE = "state.json"


def write_state(statedir: Path, state: Mapping[str, Any]) -> None:
    tmp = statedir / f"{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(statedir / STATE_FILE)


def read_state(statedir: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads((statedir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in {"Z", "X"}


def sweep(statedir: Path, *, timeout: float = 20.0) -> list[str]:
    """Remove the lab recorded in ``statedir``, whatever became of its owner.

    A supervisor that still runs is asked to stop (SIGTERM, then SIGKILL after ``timeout``);
    then every namespace with the recorded prefix, its processes, the UAPI sockets and the
    state directory go. Returns the namespaces that were still there.
    """
    state = read_state(statedir)
    if state is None:
        shutil.rmtree(statedir, ignore_errors=True)
        return []
    pid = int(state.get("owner_pid", 0))
    if state.get("supervised") and pid > 1 and pid != os.getpid() and pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    prefix = str(state["prefix"])
    left = sorted(p.name for p in Path("/run/netns").glob(f"{prefix}*"))
    remove_leftovers(prefix, state.get("wg_ifnames", []), statedir)
    return left


def remove_leftovers(prefix: str, wg_ifnames: Iterable[str], statedir: Path) -> None:
    cleanup_prefix(prefix)
    nodeexporter.remove_cgroups(prefix)  # the servers' CPU cgroups; their views then exit
    for ifname in wg_ifnames:
        # wireguard-go removes its socket on a clean exit only
        (UAPI_DIR / f"{ifname}.sock").unlink(missing_ok=True)
    shutil.rmtree(statedir, ignore_errors=True)


def lab_resources(prefix: str, wg_ifnames: Iterable[str]) -> Iterator[str]:
    """Whatever of a lab still exists on the host (for tests proving ``down`` left nothing)."""
    yield from (f"netns {p.name}" for p in Path("/run/netns").glob(f"{prefix}*"))
    yield from (f"rundir {p}" for p in Path("/run/pop-lab").glob(f"{prefix}*"))
    yield from (f"uapi {UAPI_DIR / (i + '.sock')}" for i in wg_ifnames if (UAPI_DIR / f"{i}.sock").exists())
    yield from (f"cgroup {p}" for p in nodeexporter.cgroup_dir(prefix).parent.glob(f"pop-lab-{prefix}*"))
