"""Crash and reload without churn, counted at a real FRR router.

Runs against the lab (`containerlab.yml` realised in namespaces by lab.runner). The PoP under
test is pop1 (ecmp mode with pinned flows, every check tier as the lab configures it), which
peers with r1; r1 also reaches the anycast prefix through pop3. At r1 two things are counted:
changes of the anycast prefix's kernel route (rtnetlink events in r1's namespace,
lab.routewatch), and the BGP UPDATEs r1's bgpd received from pop1 (FRR's messageStats,
lab.frr.FrrRouter.updates_received).

1. crash, healthy servers: pop1's engine is SIGKILLed --kills times; ExaBGP respawns it and
   the new engine adopts what ExaBGP still announces after one probe round (pop.handover).
   Goal: 0 route changes and 0 UPDATEs.
2. crash with the servers: the engine is SIGKILLed, then pop1's servers are stopped at once
   (server-down, a few ms later); the time from the kill to pop1's next hop leaving r1's
   route, p50/p95/max over --trials. Goal: <= 1 s. Between trials everything is undone and the
   lab converges again (hold-down 5 s).
3. reload: SIGHUP to pop1's `pop run` with (a) nothing changed, (b) a server removed, (c) it
   added back, (d) a prefix added, (e) the original file back (the prefix removed): UPDATEs
   and anycast route events at r1 per step (goal 0 for the unchanged prefix), and for (d) the
   time from the SIGHUP until the new prefix is in r1's kernel.

ExaBGP 5.0.15 respawns its API process at most 5 times per 64 s window aligned to the wall
clock and then terminates itself, so kills are spaced: at most --per-window per window.

    flock /tmp/pop-netns.lock .venv/bin/python bench/churn.py [--kills 20] [--trials 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.failover import percentile
from lab.routewatch import RouteWatcher
from lab.runner import Lab

POP = "pop1"
ROUTER = "r1"
NEW_PREFIX = "198.51.100.2/32"
ADOPTED = "adopted the previous engine's announcement"
RESPAWN_WINDOW = 64  # ExaBGP: int(time.time()) & ~63 (reactor/api/processes.py)


class RespawnBudget:
    """Spaces engine kills so that ExaBGP never exceeds its respawn limit.

    A kill is allowed in the current wall-clock window while fewer than ``per_window`` were made
    in it and at least ``margin`` s of it remain (ExaBGP counts the respawn when it notices the
    death, a little after the kill); otherwise it waits for the next window.
    """

    def __init__(self, per_window: int, margin: float = 5.0) -> None:
        self.per_window = per_window
        self.margin = margin
        self.window = -1
        self.used = 0

    def wait_turn(self) -> None:
        now = time.time()
        left = RESPAWN_WINDOW - now % RESPAWN_WINDOW
        if left < self.margin or (int(now) // RESPAWN_WINDOW == self.window and self.used >= self.per_window):
            print(f"    (waiting {left + 0.5:.1f} s for ExaBGP's next respawn window)", flush=True)
            time.sleep(left + 0.5)
        window = int(time.time()) // RESPAWN_WINDOW
        if window != self.window:
            self.window, self.used = window, 0
        self.used += 1


def process_started(pid: int) -> float:
    """When ``pid`` started, in seconds since boot (CLOCK_BOOTTIME; the kernel counts in ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


def logged_at(log: Path, event: str, after: float) -> float | None:
    """The wall-clock time of the first line of ``log`` with ``event`` at or after ``after``."""
    for line in log.read_text(errors="replace").splitlines():
        if event in line and line[:2] == "20":
            at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()  # local, as logged
            if at >= after:
                return at
    return None


class Bench:
    def __init__(self, lab: Lab, budget: RespawnBudget) -> None:
        self.lab = lab
        self.node = lab.pop(POP)
        self.r1 = lab.router(ROUTER)
        self.peer = lab.pop_address(ROUTER, POP)
        self.budget = budget

    def routed(self, hops: frozenset[str]) -> bool:
        return self.peer in hops

    def left(self, hops: frozenset[str]) -> bool:
        return self.peer not in hops

    def updates(self) -> int:
        return self.r1.updates_received(self.peer)

    def wait_announced(self, timeout: float = 30) -> dict[str, Any]:
        return self.node.wait_status(lambda s: s["state"] == "announced", timeout=timeout)

    # --- 1. crash with healthy servers -----------------------------------------------------

    def crash_healthy(self, watch: RouteWatcher, kills: int) -> dict[str, Any]:
        print(f"\n== engine SIGKILLed {kills} times, servers healthy", flush=True)
        self.wait_announced()
        start, first_updates = time.monotonic(), self.updates()
        rows = []
        for index in range(kills):
            self.budget.wait_turn()
            before = self.updates()
            fault = self.lab.faults.apply("engine-kill", POP)
            respawned = self.lab.faults.undo(fault)
            status = self.node.wait_status(
                lambda s: s["state"] == "announced" and s["uptime_seconds"] > 0.5, timeout=15)
            time.sleep(1.0)  # room for a late withdraw or re-announce to reach r1
            row = {"respawn_s": respawned - fault.at, "updates": self.updates() - before,
                   "adopted": ADOPTED in status["last_change_reason"],
                   "reason": status["last_change_reason"],
                   "route_events": len([e for e in watch.events if e.timestamp >= fault.began])}
            rows.append(row)
            print(f"    kill {index + 1:2d}/{kills}: new engine in {row['respawn_s']:.2f} s, "
                  f"adopted={row['adopted']}, UPDATEs {row['updates']}, "
                  f"route events since kill {row['route_events']}", flush=True)
        events = [e for e in watch.events if e.timestamp >= start]
        return {"kills": rows,
                "route_events": len(events),
                "pop1_left": sum(1 for e in events if self.left(e.nexthops)),
                "updates": self.updates() - first_updates,
                "adopted": sum(1 for r in rows if r["adopted"]),
                "respawn_s": [r["respawn_s"] for r in rows]}

    # --- 2. crash together with the servers ------------------------------------------------

    def crash_with_servers(self, watch: RouteWatcher, trials: int) -> dict[str, Any]:
        print(f"\n== engine SIGKILLed, then its servers stopped, {trials} trials", flush=True)
        gone, gaps, recoveries, phases = [], [], [], []
        for index in range(trials):
            watch.wait_for(self.routed, timeout=60)
            self.wait_announced()
            time.sleep(1.0)
            self.budget.wait_turn()
            kill = self.lab.faults.apply("engine-kill", POP)
            wall, boot = time.time() - (time.monotonic() - kill.at), \
                time.clock_gettime(time.CLOCK_BOOTTIME) - (time.monotonic() - kill.at)
            servers = self.lab.faults.apply("server-down", POP)
            left = watch.wait_for(self.left, timeout=15, since=kill.at)
            self.lab.faults.undo(kill)  # the new engine answers /status
            phases.append(self.startup_phases(wall, boot, left - kill.at))
            back = self.lab.faults.undo(servers)
            returned = watch.wait_for(self.routed, timeout=60, since=back)
            gone.append(left - kill.at)
            gaps.append(servers.at - kill.at)
            recoveries.append(returned - back)
            print(f"    trial {index + 1:2d}/{trials}: route left r1 {left - kill.at:.3f} s after the kill "
                  f"(servers down {servers.at - kill.at:.3f} s after it), back {returned - back:.2f} s "
                  f"after the servers", flush=True)
            print(f"      after the kill: {', '.join(f'{k} {v:.3f} s' for k, v in phases[-1].items())}", flush=True)
        return {"gone": gone, "servers_down_after_kill": gaps, "recovery": recoveries,
                "startup": {key: [p[key] for p in phases] for key in phases[0]}}

    def startup_phases(self, wall: float, boot: float, left: float) -> dict[str, float]:
        """Where the time from the kill to the route leaving r1 goes, each moment after the kill:
        ExaBGP starts the new engine, the engine has imported and set up (/status listening),
        one probe round decided (engine.adopt), the withdraw was sent."""
        phases = {"engine_process_started": process_started(self.node.engine_pid()) - boot}
        for name, event in (("status_listening", "status.listening"), ("adopt_decided", "engine.adopt"),
                            ("withdraw_sent", "bgp.withdraw")):
            at = logged_at(self.node.log, event, wall)
            phases[name] = float("nan") if at is None else at - wall
        return phases | {"route_left_r1": left}

    # --- 3. reloads -------------------------------------------------------------------------

    def reload(self, change: Callable[[dict[str, Any]], None]) -> float:
        """Edit pop1's YAML and SIGHUP `pop run`; the monotonic moment of the signal, returned once
        the engine has taken the new file."""
        document = yaml.safe_load(self.node.config_path.read_text())
        change(document)
        self.node.config_path.write_text(yaml.safe_dump(document, sort_keys=False))
        before = sum(1 for e in self.node.status()["events"] if e["to"] == "reloaded")
        assert self.node.proc is not None
        sent = time.monotonic()
        self.node.proc.send_signal(signal.SIGHUP)
        self.node.wait_status(lambda s: sum(1 for e in s["events"] if e["to"] == "reloaded") > before,
                              timeout=15)
        return sent

    def reloads(self, watch: RouteWatcher) -> dict[str, Any]:
        print("\n== SIGHUP reloads", flush=True)
        original = self.node.config_path.read_text()
        removed = yaml.safe_load(original)["servers"][-1]
        vpn11, vpn12 = (self.lab.spec.vpns[name].address for name in ("vpn11", "vpn12"))
        steps: dict[str, Any] = {}
        self.wait_announced()
        with self.lab.watch(POP) as at_pop1, self.lab.watch(ROUTER, NEW_PREFIX) as new_at_r1:

            def step(name: str, change: Callable[[dict[str, Any]], None],
                     settled: Callable[[float], float] | None = None) -> dict[str, Any]:
                """One reload; ``settled(sent)`` waits for its effect and returns when it was seen."""
                updates = self.updates()
                sent = self.reload(change)
                effect = settled(sent) - sent if settled else None
                time.sleep(1.0)  # room for a late UPDATE to arrive
                events = [e for e in watch.events if e.timestamp >= sent]
                steps[name] = {"updates": self.updates() - updates, "route_events": len(events),
                               "pop1_left": sum(1 for e in events if self.left(e.nexthops)),
                               "effect_s": effect}
                print(f"    {name}: {steps[name]}", flush=True)
                return steps[name]

            def restore(document: dict[str, Any]) -> None:
                document.clear()
                document.update(yaml.safe_load(original))

            try:
                step("(a) nothing changed", lambda doc: None)
                step("(b) a server removed", lambda doc: doc["servers"].pop(),
                     lambda sent: at_pop1.wait_for(lambda h: h == {vpn11}, timeout=10, since=sent))
                step("(c) the server added back", lambda doc: doc["servers"].append(removed),
                     lambda sent: at_pop1.wait_for(lambda h: h == {vpn11, vpn12}, timeout=20, since=sent))
                step("(d) a prefix added", lambda doc: doc["prefixes"].append({"prefix": NEW_PREFIX}),
                     lambda sent: new_at_r1.wait_for(self.routed, timeout=15, since=sent))
                step("(e) original file back", restore,
                     lambda sent: new_at_r1.wait_for(self.left, timeout=15, since=sent))
            finally:
                if self.node.config_path.read_text() != original:
                    self.node.config_path.write_text(original)
                    assert self.node.proc is not None
                    self.node.proc.send_signal(signal.SIGHUP)
        return steps


def missed_goals(result: dict[str, Any]) -> list[str]:
    healthy, reloads = result["crash_healthy"], result["reloads"]
    missed = [f"crash with healthy servers: {healthy[key]} {key}" for key in ("route_events", "updates")
              if healthy[key]]
    if (worst := max(result["crash_with_servers"]["gone"])) > 1.0:
        missed.append(f"crash with the servers: route gone after {worst:.3f} s")
    missed += [f"reload {name}: {step['pop1_left']} route changes without {POP}"
               for name, step in reloads.items() if step["pop1_left"]]
    missed += [f"reload {name}: {step['updates']} UPDATEs for an unchanged prefix"
               for name, step in reloads.items() if step["updates"] and name[:3] in {"(a)", "(b)", "(c)"}]
    return missed


def table(result: dict[str, Any], args: argparse.Namespace) -> str:
    healthy, dead, reloads = result["crash_healthy"], result["crash_with_servers"], result["reloads"]
    gone = dead["gone"]
    lines = [
        f"{POP}'s next hop in {ROUTER}'s kernel route and UPDATEs {ROUTER} received from {POP}",
        "",
        f"engine SIGKILLed {args.kills}x, servers healthy: {healthy['route_events']} route changes "
        f"({healthy['pop1_left']} with {POP} gone), {healthy['updates']} UPDATEs; "
        f"{healthy['adopted']}/{args.kills} adopted; new engine's /status "
        f"{statistics.median(healthy['respawn_s']):.2f} s (p50) after the kill",
        f"engine SIGKILLed + servers down ({args.trials}x): route gone p50/p95/max "
        f"{statistics.median(gone):.3f} / {percentile(gone, 0.95):.3f} / {max(gone):.3f} s after the kill "
        f"(servers down {statistics.median(dead['servers_down_after_kill']) * 1000:.0f} ms after it); "
        f"back {statistics.median(dead['recovery']):.2f} s after the servers",
        "  where that time goes (p50 after the kill): " + ", ".join(
            f"{name.replace('_', ' ')} {statistics.median(values):.3f} s" for name, values in dead["startup"].items()),
        "",
        f"{'SIGHUP reload':30s} {'UPDATEs':>7s} {'route events':>12s} {POP + ' gone':>9s}  effect seen after",
    ]
    for name, step in reloads.items():
        effect = "-" if step["effect_s"] is None else f"{step['effect_s']:.2f} s"
        lines.append(f"{name:30s} {step['updates']:7d} {step['route_events']:12d} {step['pop1_left']:9d}  {effect}")
    lines.append("effect: (b)/(c) pop1's own multipath route follows; (d)/(e) the new prefix enters/leaves "
                 "r1's kernel; counted from the SIGHUP")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="engine kills with healthy servers")
    parser.add_argument("--trials", type=int, default=10, help="engine kills with the servers")
    parser.add_argument("--per-window", type=int, default=4,
                        help="kills per 64 s respawn window of ExaBGP (it gives up after 5)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result: dict[str, Any] = {}
    with Lab.from_file() as lab:
        print(f"lab up in {lab.up():.1f}s ({lab.prefix}*)", flush=True)
        bench = Bench(lab, RespawnBudget(args.per_window))
        try:
            with lab.watch(ROUTER) as watch:
                result["crash_healthy"] = bench.crash_healthy(watch, args.kills)
                result["crash_with_servers"] = bench.crash_with_servers(watch, args.trials)
                result["reloads"] = bench.reloads(watch)
            if missed := missed_goals(result):
                print(f"\nGOALS MISSED: {'; '.join(missed)}\n{POP}'s log:\n{lab.pop(POP).log_tail(200)}")
        finally:
            lab.faults.clear()
    print()
    print(table(result, args))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, **result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
