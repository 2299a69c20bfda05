"""A soak of the lab: random faults of every kind for a while, invariants checked all along.

`Soak(lab, seed).run(seconds)` injects one fault after another (kind, target, how long: drawn
from a seeded random generator, so a run can be repeated), while a monitor thread checks every
`TICK` seconds, against ground truth measured independently of pop:

- **dead PoPs are not announced**: a PoP none of whose servers accepts a TCP connection (made
  from the PoP's own namespace, as its clients' traffic would go) is gone from its upstream
  routers' kernel tables within `bound` seconds (the documented detection time plus margin);
- **a drained PoP is not announced past its ladder**: among the faults, an operator drains a
  PoP (POST /v1/drain with the token) and undrains it later; from the end of its ladder (the
  sum of its dwells) plus `bound`, it is in no router's table;
- **every transition has a reason**: every event on every PoP's /status carries one;
- **nothing leaks**: the resident memory and the open file descriptors of an engine that lives
  through the whole soak (pop2's: no fault kills it) do not grow beyond a budget;
- **it comes back**: once the faults are undone, the lab converges again (every PoP announced).

- **the fleet keeps `min_pops`** (the soak turns the fleet guard on in every PoP, pop.fleet): at
  least min(`MIN_POPS`, PoPs that could announce) PoPs are announced, in their routers' kernel
  tables or, for a PoP the guard holds de-preferenced, in their BGP tables; a PoP
  could announce while it has a live server, no operator drain and no fault on its processes;
  after `bound` seconds of grace, as for the dead PoPs.

`summary()` is what bench/soak.py prints and tests/netns/test_soak.py asserts on.
"""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lab.faults import FaultError

if TYPE_CHECKING:
    from lab.routewatch import RouteWatcher
    from lab.runner import Lab

TICK = 0.25
BOUND = 3.0  # seconds a dead PoP may stay announced: tier 1's worst case (blackholed, ~1 s) + margin
LONG_LIVED = "pop2"  # no fault kills its engine: its memory and descriptors are measured
RSS_BUDGET_KB = 5 * 1024
FD_BUDGET = 8
MIN_POPS = 2  # the fleet guard's min_pops during the soak
GUARD_PACE = 3.0
PROCESS_FAULTS = ("engine-kill", "exabgp-kill", "pop-stop")
# ExaBGP restarts its API process at most 5 times per 64 s: engine kills stay well below that
ENGINE_KILL_GAP = 30.0


@dataclass(frozen=True)
class Violation:
    at: float  # seconds into the soak
    invariant: str
    detail: str


@dataclass
class Resources:
    rss_kb: int
    fds: int


@dataclass
class SoakResult:
    seed: int
    seconds: float
    faults: Counter[str] = field(default_factory=Counter)
    violations: list[Violation] = field(default_factory=list)
    checks: int = 0
    dead_episodes: int = 0  # times a PoP had no live server
    worst_dead_announced: float = 0.0  # longest a dead PoP stayed announced (s)
    resources: tuple[Resources, Resources] | None = None
    converged_after: float | None = None


def _menu(lab: Lab) -> list[tuple[str, str, dict[str, float]]]:
    """Every fault kind the lab has, on targets that keep the soak meaningful."""
    menu: list[tuple[str, str, dict[str, float]]] = []
    for pop in lab.pops:
        menu += [("server-down", pop, {}), ("wireguard-down", pop, {}), ("blackhole", pop, {}),
                 ("loss", pop, {"percent": 20}), ("flap", pop, {"period": 4}), ("cut-off", pop, {})]
        if pop != LONG_LIVED:
            menu += [("engine-kill", pop, {}), ("exabgp-kill", pop, {}), ("pop-stop", pop, {})]
    menu += [("server-down", vpn, {}) for vpn in lab.vpns]
    menu += [(kind, agent, {}) for agent in lab.agents for kind in ("agent-kill", "agent-blind", "agent-stale")]
    menu += [("router-down", "r3", {})]
    menu += [("operator-drain", pop, {}) for pop in lab.pops]
    return menu


class Soak:
    def __init__(self, lab: Lab, seed: int, bound: float = BOUND) -> None:
        self.lab = lab
        self.seed = seed
        self.rng = random.Random(seed)
        self.bound = bound
        self.started = 0.0
        self.result = SoakResult(seed, 0.0)
        self._stop = threading.Event()
        self._last_kill: dict[str, float] = {}
        self._drained: dict[str, float] = {}  # PoP -> when its ladder ends (monotonic)

    # --- ground truth ----------------------------------------------------------------------

    def live_servers(self, pop: str) -> int:
        """How many of the PoP's servers accept a TCP connection from the PoP's namespace now."""
        live = 0
        for server in self.lab.spec.pops[pop].config.servers:
            vpn = self.lab.spec.vpns[server.name]
            with self.lab.ns(pop).enter():
                sock = socket.socket(socket.AF_INET6 if ":" in vpn.address else socket.AF_INET, socket.SOCK_STREAM)
            with sock:
                sock.settimeout(0.2)
                with contextlib.suppress(OSError):
                    sock.connect((vpn.address, vpn.tcp_port))
                    live += 1
        return live

    def announced(self, pop: str, watches: dict[str, RouteWatcher]) -> bool:
        """Whether any of the PoP's upstream routers forwards the anycast prefix to it."""
        return any(self.lab.pop_address(router, pop) in watches[router].nexthops
                   for router, _ in self.lab.faults.upstreams(pop) if router in watches)

    def in_rib(self, pop: str) -> bool:
        """Whether any of the PoP's upstream routers holds a path for an anycast prefix from the
        PoP's session, best or not: a PoP the fleet guard holds is announced de-preferenced and
        is rarely any router's best (so not in its kernel table) while another PoP announces."""
        for router, _ in self.lab.faults.upstreams(pop):
            peer = self.lab.pop_address(router, pop)
            for prefix in self.lab.spec.anycast:
                family = "ipv6" if ":" in prefix else "ipv4"
                try:
                    data = self.lab.router(router).vtysh_json(f"show bgp {family} unicast {prefix} json")
                except (RuntimeError, ValueError, subprocess.SubprocessError):
                    continue
                if any(path.get("peer", {}).get("peerId") == peer for path in data.get("paths", [])):
                    return True
        return False

    def resources(self) -> Resources:
        pid = self.lab.pop(LONG_LIVED).engine_pid()
        status = Path(f"/proc/{pid}/status").read_text()
        rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        return Resources(rss, len(list(Path(f"/proc/{pid}/fd").iterdir())))

    # --- the two loops ---------------------------------------------------------------------

    def _violate(self, invariant: str, detail: str) -> None:
        self.result.violations.append(Violation(round(time.monotonic() - self.started, 2), invariant, detail))

    def _monitor(self, watches: dict[str, RouteWatcher]) -> None:
        dead_since: dict[str, float] = {}
        reported: set[tuple[str, float]] = set()
        short_since: float | None = None
        while not self._stop.wait(TICK):
            now = time.monotonic()
            live = {pop: self.live_servers(pop) for pop in self.lab.pops}
            could, announced = self._fleet(watches, live)
            if len(announced) >= min(MIN_POPS, len(could)):
                short_since = None
            else:
                short_since = now if short_since is None else short_since
                if now - short_since > self.bound and ("fleet", short_since) not in reported:
                    reported.add(("fleet", short_since))
                    self._violate("fewer than min_pops announced",
                                  f"{sorted(announced)} announced while {sorted(could)} could, for "
                                  f"{now - short_since:.1f} s (faults: {self._active()})")
            for pop, ends in list(self._drained.items()):
                if now > ends + self.bound and self.announced(pop, watches) and (pop, ends) not in reported:
                    reported.add((pop, ends))
                    self._violate("drained PoP announced", f"{pop}: {now - ends:.1f} s past the end of its ladder")
            for pop in self.lab.pops:
                if live[pop]:
                    dead_since.pop(pop, None)
                    continue
                if pop not in dead_since:
                    dead_since[pop] = now
                    self.result.dead_episodes += 1
                since = dead_since[pop]
                if self.announced(pop, watches):
                    self.result.worst_dead_announced = max(self.result.worst_dead_announced, now - since)
                    if now - since > self.bound and (pop, since) not in reported:
                        reported.add((pop, since))
                        self._violate("dead PoP announced", f"{pop}: no live server for {now - since:.1f} s, "
                                                            f"still announced (faults: {self._active()})")
            self.result.checks += 1

    def _fleet(self, watches: dict[str, RouteWatcher], live: dict[str, int]) -> tuple[set[str], set[str]]:
        """The PoPs that could announce (a live server, no drain, no fault on their processes),
        and the PoPs in their routers' tables."""
        stopped = {f.target for f in self.lab.faults.active() if f.kind in PROCESS_FAULTS}
        could = {pop for pop in self.lab.pops
                 if pop not in stopped and pop not in self._drained and live[pop]}
        announced = {pop for pop in self.lab.pops if self.announced(pop, watches)}
        if len(announced) < min(MIN_POPS, len(could)):  # held PoPs are in the routers' RIBs only
            announced |= {pop for pop in could - announced if self.in_rib(pop)}
        return could, announced

    def _active(self) -> str:
        return ", ".join(str(f) for f in self.lab.faults.active()) or "none"

    def _inject(self, deadline: float) -> None:
        menu = _menu(self.lab)
        # one operator drain first, whatever the draw: the ladder's invariant is always exercised
        self._operator_drain(self.rng.choice(sorted(self.lab.pops)), deadline)
        while time.monotonic() < deadline:
            kind, target, params = self.rng.choice(menu)
            if kind in ("engine-kill", "exabgp-kill", "pop-stop"):
                if time.monotonic() - self._last_kill.get(target, -1e9) < ENGINE_KILL_GAP:
                    continue
                self._last_kill[target] = time.monotonic()
            if kind == "operator-drain":
                self._operator_drain(target, deadline)
                continue
            hold = self.rng.uniform(2.0, 10.0)
            try:
                fault = self.lab.faults.apply(kind, target, **params)
            except FaultError as exc:
                self._violate("fault refused", f"{kind} {target}: {exc}")
                continue
            self.result.faults[kind] += 1
            self._stop.wait(min(hold, max(0.0, deadline - time.monotonic())))
            self.lab.faults.undo(fault)
            self._stop.wait(self.rng.uniform(0.5, 3.0))

    def _operator_drain(self, pop: str, deadline: float) -> None:
        """Drain a PoP through its whole ladder and a little longer, then undrain it."""
        ladder = sum(step.dwell for step in self.lab.spec.pops[pop].config.drain.steps)
        node = self.lab.pop(pop)
        try:
            node.post("/v1/drain", who="soak", reason="the soak drains it")
        except (RuntimeError, subprocess.SubprocessError, ValueError):
            return  # the engine is still starting after an earlier fault: another time
        self._drained[pop] = time.monotonic() + ladder
        self.result.faults["operator-drain"] += 1
        try:
            # held past the ladder and the bound, so that the invariant is checked for a while
            self._stop.wait(min(ladder + self.bound + self.rng.uniform(2.0, 6.0),
                                max(0.0, deadline - time.monotonic()) + self.bound + 2.0))
        finally:
            self._drained.pop(pop, None)
            for _ in range(50):  # the drain must end, whatever happens meanwhile
                try:
                    node.post("/v1/undrain", who="soak", reason="the soak ends the drain")
                    break
                except (RuntimeError, subprocess.SubprocessError, ValueError):
                    time.sleep(0.2)
        self._stop.wait(self.rng.uniform(0.5, 3.0))

    @contextmanager
    def _watching(self) -> Iterator[dict[str, RouteWatcher]]:
        with ExitStack() as stack:
            yield {router: stack.enter_context(self.lab.watch(router)) for router in self.lab.routers}

    def run(self, seconds: float) -> SoakResult:
        self.lab.wait_converged(60)
        for pop in self.lab.pops:
            self.lab.pop(pop).set_fleet(min_pops=MIN_POPS, pace=GUARD_PACE)
        with self._watching() as watches:
            time.sleep(1.0)  # the watchers' initial dumps
            before = self.resources()
            self.started = time.monotonic()
            monitor = threading.Thread(target=self._monitor, args=(watches,), name="soak monitor", daemon=True)
            monitor.start()
            try:
                self._inject(self.started + seconds)
            finally:
                self.lab.faults.clear()
                self._stop.set()
                monitor.join(10)
            self.result.seconds = round(time.monotonic() - self.started, 1)
            settle = time.monotonic()
            try:
                self.lab.wait_converged(90)
                self.result.converged_after = round(time.monotonic() - settle, 1)
            except TimeoutError as exc:
                self._violate("did not converge after the faults", str(exc).splitlines()[0])
        self._check_reasons()
        after = self.resources()
        self.result.resources = (before, after)
        if after.rss_kb - before.rss_kb > RSS_BUDGET_KB:
            self._violate("memory", f"{LONG_LIVED}'s engine grew {after.rss_kb - before.rss_kb} kB")
        if after.fds - before.fds > FD_BUDGET:
            self._violate("file descriptors", f"{LONG_LIVED}'s engine went from {before.fds} to {after.fds}")
        return self.result

    def _check_reasons(self) -> None:
        for pop in self.lab.pops:
            for event in self.lab.pop_status(pop).get("events", []):
                if not str(event.get("reason") or "").strip():
                    self._violate("transition without a reason", f"{pop}: {event}")


def summary(result: SoakResult) -> dict[str, Any]:
    before, after = result.resources or (Resources(0, 0), Resources(0, 0))
    hours = max(result.seconds, 1.0) / 3600
    return {"seed": result.seed, "seconds": result.seconds, "faults": sum(result.faults.values()),
            "by_kind": dict(sorted(result.faults.items())), "checks": result.checks,
            "dead_episodes": result.dead_episodes, "worst_dead_announced_s": round(result.worst_dead_announced, 2),
            "violations": [f"{v.at:.1f}s {v.invariant}: {v.detail}" for v in result.violations],
            "engine_rss_kb": [before.rss_kb, after.rss_kb],
            "engine_rss_growth_mb_per_hour": round((after.rss_kb - before.rss_kb) / 1024 / hours, 2),
            "engine_fds": [before.fds, after.fds], "converged_after_s": result.converged_after}
