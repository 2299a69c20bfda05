"""The engine's thread at a real-time priority (`checks.realtime_priority`), as keepalived
offers for its checker (`checker_rt_priority`).

On a host whose other processes want the CPU (the readers' process of `status.readers_port`
serving fifty dashboards, a busy director), the engine's loop waits for a core after every
wake-up and its probes start late, although it has the time to run them: in bench/scale.py
at 1,000 servers with 50 readers, the probes' p99 lateness was 18-33 ms at the normal
priority and 9-10 ms at SCHED_RR 10 (docs/benchmarks.md, Scale "Part 9").

`apply(priority)` puts the calling thread (the event loop's) under SCHED_RR at that priority,
with SCHED_RESET_ON_FORK: every process it starts (the readers' process, ExaBGP's helpers)
runs at the normal priority again. 0 puts it back under the normal scheduler. The kernel's
real-time throttling (sched_rt_runtime_us, 95 % of each second by default) keeps a runaway
loop from taking a core whole. It needs CAP_SYS_NICE or an RLIMIT_RTPRIO of at least the
priority (systemd: LimitRTPRIO=, and RestrictRealtime=no); without them the kernel refuses
and the engine runs on at the normal priority, saying why.
"""

from __future__ import annotations

import os


def apply(priority: int) -> str | None:
    """Schedule the calling thread at `priority` (0: normally); None, or why the kernel refused."""
    try:
        if priority > 0:
            os.sched_setscheduler(0, os.SCHED_RR | os.SCHED_RESET_ON_FORK, os.sched_param(priority))
        else:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except OSError as exc:
        return f"SCHED_RR priority {priority} refused: {exc.strerror} (needs CAP_SYS_NICE or LimitRTPRIO={priority})"
    return None


def current() -> tuple[str, int]:
    """The calling thread's policy ("rr", "fifo", "other", ...) and priority, as the kernel has them."""
    policy = os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK
    names = {os.SCHED_OTHER: "other", os.SCHED_RR: "rr", os.SCHED_FIFO: "fifo", os.SCHED_BATCH: "batch",
             os.SCHED_IDLE: "idle"}
    return names.get(policy, str(policy)), os.sched_getparam(0).sched_priority
