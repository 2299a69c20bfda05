"""Convergence of `pop` against ExaBGP's own healthcheck, timed at a real FRR router.

Runs against the lab: `containerlab.yml` realised in namespaces by lab.runner (two FRR
routers, three PoPs, two VPN servers per PoP, a client). The PoP under test is pop1, which
peers with r1; r1 also reaches the anycast prefix through pop3, so every measurement is "pop1's
next hop leaves / returns to r1's ECMP set". pop1 runs, one after the other, in the same lab:

- `pop` with its defaults (the lab's pop.yaml with the WireGuard tier off, so both tools check
  the same thing: the servers' TCP port);
- ExaBGP's `healthcheck` as ExaBGP's API process with `--withdraw-on-down`, driven by the
  equivalent TCP check (the PoP is up while at least one server accepts a connection), once
  with its defaults (interval 5, fast-interval 1, rise 3, fall 3, timeout 5) and once tuned to
  interval 1, fast-interval 1, rise 3, fall 2, timeout 1.

Every time is taken at r1's kernel table from rtnetlink events in its namespace (lab.routewatch)
with time.monotonic(), against the monotonic moment the lab's fault took effect (lab.faults):
- detection: pop1's servers die (server-down: connections refused) or are blackholed (every
  packet on pop1's check path dropped); p50/p95/max over --trials each, the fault moments
  spread evenly over the tool's check interval;
- recovery: the fault undone -> pop1's next hop back at r1 (includes pop's 5 s hold-down);
- flapping: pop1's servers go down 2 s / up 2 s for --flap seconds: route changes at r1, and
  "blackhole seconds" - time r1 still routed to pop1 while none of its servers was alive;
- false withdrawals: --loss percent random loss in each direction on pop1's check path for
  --loss-seconds with healthy servers: withdrawals of pop1 at r1.

A fourth tool, `pop (dampening)`, is pop with `dampening.enabled` (flap dampening at the origin,
docs/decisions.md) and runs the flapping scenarios only (the detection trials would suppress
it). Both pop tools also run a slow flap (--slow-flap seconds of down 3 s / up 9 s: each up
phase outlasts the 5 s hold-down, so every cycle is a withdrawal and an announcement at r1),
where the dampening should suppress pop1 after its fourth withdrawal: route changes at r1 and
when it was suppressed.

    .venv/bin/python bench/failover.py [--trials 20] [--flap 120] [--loss-seconds 120] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.routewatch import RouteWatcher
from lab.runner import Lab

POP = "pop1"
ROUTER = "r1"
L4_ONLY = {"checks": {"wireguard": {"enabled": False}}}


@dataclass(frozen=True)
class Tool:
    name: str
    interval: float  # the check period the fault moments are spread over
    healthcheck: str | None  # None: pop; else the healthcheck's tuning arguments
    damped: bool = False  # pop with flap dampening on, the flapping scenario only


TOOLS = (
    Tool("pop (defaults)", 0.2, None),
    Tool("pop (dampening)", 0.2, None, damped=True),
    Tool("exabgp healthcheck (defaults)", 5.0, ""),
    Tool("exabgp healthcheck (tuned)", 1.0, "--interval 1 --fast-interval 1 --rise 3 --fall 2 --timeout 1"),
)


class HealthcheckNode:
    """ExaBGP with its own `healthcheck` as API process, in pop1's namespace, same sessions."""

    def __init__(self, lab: Lab, workdir: Path, tuning: str) -> None:
        self.ns = lab.ns(POP)
        workdir.mkdir(parents=True, exist_ok=True)
        config = lab.spec.pops[POP].config
        exabgp = Path(sys.executable).parent / "exabgp"
        targets = [(s.address, s.port or config.checks.l4.port) for s in config.servers]
        # ExaBGP's `run` takes a plain command line: the check and the helper go into scripts
        check = workdir / "check.sh"
        probes = " || ".join(f"timeout 1 bash -c '</dev/tcp/{ip}/{port}'" for ip, port in targets)
        check.write_text(f"#!/bin/bash\n{probes}\n")
        helper = workdir / "healthcheck.sh"
        prefix = config.prefixes[0].prefix
        helper.write_text(f"#!/bin/bash\nexec {exabgp} healthcheck --no-syslog --no-ip-setup --withdraw-on-down "
                          f"--ip {prefix} {tuning} --cmd {check}\n")
        for script in (check, helper):
            script.chmod(0o755)
        neighbors = "".join(f"""
neighbor {n.address} {{
    router-id {config.router_id};
    {f"local-address {n.local_address};" if n.local_address else ""}
    local-as {config.asn};
    peer-as {n.peer_as};
    hold-time {n.hold_time};
    family {{ ipv4 unicast; }}
    api {{ processes [ healthcheck ]; }}
}}
""" for n in config.neighbors)
        (workdir / "exabgp.conf").write_text(f"process healthcheck {{\n    run {helper};\n    encoder text;\n}}\n"
                                             + neighbors)
        (workdir / "exabgp.env").write_text(
            "[exabgp.api]\ncli = false\nack = true\n[exabgp.daemon]\ndrop = false\nuser = 'root'\n"
            "[exabgp.log]\ndestination = 'stderr'\n")
        self.proc = self.ns.popen(str(exabgp), "--env-file", str(workdir / "exabgp.env"), "server",
                                  str(workdir / "exabgp.conf"), log=workdir / "exabgp.log")

    def settled(self) -> None:
        """The healthcheck has no status endpoint: being announced at r1 is its 'up'."""

    def stop(self) -> None:
        self.ns.stop(self.proc, timeout=10)


class PopTool:
    def __init__(self, lab: Lab, damped: bool = False) -> None:
        self.lab = lab
        lab.restart_pop(POP, L4_ONLY | ({"dampening": {"enabled": True}} if damped else {}))

    def settled(self) -> None:
        deadline = time.monotonic() + 20
        while self.lab.pop_status(POP)["state"] != "announced":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{POP} did not settle: {self.lab.pop_status(POP)}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.lab.pop(POP).stop()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Bench:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.hop = lab.pop_address(ROUTER, POP)

    def announced(self, hops: frozenset[str]) -> bool:
        return self.hop in hops

    def withdrawn(self, hops: frozenset[str]) -> bool:
        return self.hop not in hops

    def detection_trials(self, tool: Tool, runner: PopTool | HealthcheckNode, watch: RouteWatcher, *,
                         kind: str, trials: int) -> tuple[list[float], list[float]]:
        detections, recoveries = [], []
        for index in range(trials):
            watch.wait_for(self.announced, timeout=90)
            runner.settled()
            time.sleep(1.0 + tool.interval * index / trials)
            fault = self.lab.faults.apply("server-down" if kind == "dead" else "blackhole", POP)
            gone = watch.wait_for(self.withdrawn, timeout=60, since=fault.at)
            time.sleep(0.5)
            back = self.lab.faults.undo(fault)
            returned = watch.wait_for(self.announced, timeout=90, since=back)
            detections.append(gone - fault.at)
            recoveries.append(returned - back)
            print(f"    {kind:9s} {index + 1:2d}/{trials}: detection {gone - fault.at:6.3f} s, "
                  f"recovery {returned - back:6.2f} s", flush=True)
        return detections, recoveries

    def membership_changes(self, watch: RouteWatcher, start: float, end: float) -> list[tuple[float, bool]]:
        """(time, pop1 routed?) at every change of pop1's membership in r1's route."""
        routed = self.hop in self.state_at(watch, start)
        changes = []
        for event in watch.events:
            if start < event.timestamp <= end and (self.hop in event.nexthops) != routed:
                routed = not routed
                changes.append((event.timestamp, routed))
        return changes

    def state_at(self, watch: RouteWatcher, moment: float) -> frozenset[str]:
        state: frozenset[str] = frozenset()
        for event in watch.events:
            if event.timestamp > moment:
                break
            state = event.nexthops
        return state

    def flapping(self, watch: RouteWatcher, seconds: float, period: float = 4.0,
                 down_for: float = 2.0) -> dict[str, float | None]:
        watch.wait_for(self.announced, timeout=90)
        fault = self.lab.faults.apply("flap", POP, period=period, down=down_for)
        time.sleep(seconds)
        end = self.lab.faults.undo(fault)
        time.sleep(0.5)
        down = [(t, fault.transitions[i + 1][0] if i + 1 < len(fault.transitions) else end)
                for i, (t, what) in enumerate(fault.transitions) if what == "down"]
        changes = self.membership_changes(watch, fault.at - 0.001, end)
        routed_from = fault.at if self.hop in self.state_at(watch, fault.at) else None
        routed: list[tuple[float, float]] = []
        for at, now_routed in changes:
            if now_routed:
                routed_from = at
            elif routed_from is not None:
                routed.append((routed_from, at))
                routed_from = None
        if routed_from is not None:
            routed.append((routed_from, end))
        blackhole = sum(max(0.0, min(r_end, d_end) - max(r_start, d_start))
                        for r_start, r_end in routed for d_start, d_end in down)
        result: dict[str, float | None] = {"route_changes": len(changes), "blackhole_seconds": blackhole,
                                           "cycles": len(down)}
        status = self.lab.pop_status(POP)
        if status.get("dampening") is not None:  # when the dampening suppressed pop1, from its events
            began = time.time() - (time.monotonic() - fault.at)  # the fault's moment on the wall clock
            first = [e["time"] for e in status["events"] if e["kind"] == "dampening" and e["to"] == "suppressed"][-1:]
            result["flaps_charged"] = status["dampening"]["flaps"]
            result["suppressed_after_s"] = round(first[0] - began, 1) if first else None
        return result

    def loss(self, watch: RouteWatcher, seconds: float, percent: int) -> dict[str, float]:
        watch.wait_for(self.announced, timeout=90)
        fault = self.lab.faults.apply("loss", POP, percent=percent)
        time.sleep(seconds)
        end = self.lab.faults.undo(fault)
        withdrawals = sum(1 for _, routed in self.membership_changes(watch, fault.at, end) if not routed)
        return {"withdrawals": withdrawals, "seconds": seconds, "loss_percent_each_way": percent}

    def run_tool(self, tool: Tool, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
        print(f"\n== {tool.name}", flush=True)
        runner: PopTool | HealthcheckNode
        if tool.healthcheck is None:
            runner = PopTool(self.lab, tool.damped)
        else:
            self.lab.pop(POP).stop()
            slug = "".join(c if c.isalnum() else "-" for c in tool.name)
            runner = HealthcheckNode(self.lab, workdir / slug, tool.healthcheck)
        result: dict[str, Any] = {"tool": tool.name}
        try:
            with self.lab.watch(ROUTER) as watch:
                for kind in () if tool.damped else ("dead", "blackhole"):
                    detections, recoveries = self.detection_trials(tool, runner, watch, kind=kind,
                                                                   trials=args.trials)
                    result[kind] = {"detection": detections, "recovery": recoveries}
                if args.flap > 0:
                    result["flapping"] = self.flapping(watch, args.flap)
                    print(f"    flapping: {result['flapping']}", flush=True)
                if args.slow_flap > 0 and tool.healthcheck is None:
                    result["slow_flapping"] = self.flapping(watch, args.slow_flap, period=12.0, down_for=3.0)
                    print(f"    slow flapping: {result['slow_flapping']}", flush=True)
                if args.loss_seconds > 0 and not tool.damped:
                    result["loss"] = self.loss(watch, args.loss_seconds, args.loss)
                    print(f"    loss: {result['loss']}", flush=True)
        finally:
            self.lab.faults.clear()
            runner.stop()
        return result


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    def stats(values: list[float]) -> str:
        return f"{statistics.median(values):5.2f} {percentile(values, 0.95):5.2f} {max(values):5.2f}"

    lines = [
        f"{POP}'s next hop at {ROUTER}'s kernel table, {args.trials} trials each; flapping 2 s/2 s for "
        f"{args.flap:g} s; {args.loss}% loss each way for {args.loss_seconds:g} s",
        "",
        f"{'tool':32s} {'dead p50/p95/max (s)':>21s} {'blackhole p50/p95/max':>22s} {'recovery p50':>12s} "
        f"{'flap changes':>12s} {'blackhole s':>11s} {'false wd':>8s}",
    ]
    for r in results:
        flap = r.get("flapping", {})
        loss = r.get("loss", {})
        if "dead" not in r:  # the dampening run: flapping only
            after = flap.get("suppressed_after_s")
            lines.append(f"{r['tool']:32s} {'-':>21s} {'-':>22s} {'-':>12s} {flap.get('route_changes', '-'):>12} "
                         f"{flap.get('blackhole_seconds', float('nan')):11.1f} {'-':>8}   suppressed "
                         + ("never" if after is None else f"{after:g} s into the flapping, after "
                            f"{flap.get('flaps_charged')} charged withdrawals"))
            continue
        lines.append(
            f"{r['tool']:32s} {stats(r['dead']['detection']):>21s} {stats(r['blackhole']['detection']):>22s} "
            f"{statistics.median(r['dead']['recovery']):12.2f} {flap.get('route_changes', '-'):>12} "
            f"{flap.get('blackhole_seconds', float('nan')):11.1f} {loss.get('withdrawals', '-'):>8}")
    slow = [r for r in results if "slow_flapping" in r]
    if slow:
        lines += ["", f"slow flapping (down 3 s / up 9 s for {args.slow_flap:g} s): "
                      + "; ".join(_slow(r) for r in slow)]
    lines.append("")
    for r in [r for r in results[1:] if "dead" in r]:
        ratio = statistics.median(r["dead"]["detection"]) / statistics.median(results[0]["dead"]["detection"])
        pop_bh = statistics.median(results[0]["blackhole"]["detection"])
        ratio_bh = statistics.median(r["blackhole"]["detection"]) / pop_bh
        lines.append(f"{r['tool']}: dead detection {ratio:.1f}x {results[0]['tool']}'s, blackhole {ratio_bh:.1f}x")
    return "\n".join(lines)


def _slow(r: dict[str, Any]) -> str:
    flap = r["slow_flapping"]
    after = flap.get("suppressed_after_s")
    told = "" if "flaps_charged" not in flap else (
        ", never suppressed" if after is None else f", suppressed {after:g} s in after {flap['flaps_charged']} "
                                                   f"charged withdrawals")
    return f"{r['tool']}: {flap['route_changes']} route changes, {flap['blackhole_seconds']:.1f} blackhole s{told}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--flap", type=float, default=120.0, help="seconds of 2 s/2 s flapping (0: skip)")
    parser.add_argument("--slow-flap", type=float, default=120.0,
                        help="seconds of 3 s down / 9 s up flapping for the pop tools (0: skip)")
    parser.add_argument("--loss-seconds", type=float, default=120.0, help="seconds of lossy check path (0: skip)")
    parser.add_argument("--loss", type=int, default=10, help="percent loss in each direction")
    parser.add_argument("--tools", default="all", help="all, or a comma list of: pop,damped,default,tuned")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    wanted = {"pop": TOOLS[0], "damped": TOOLS[1], "default": TOOLS[2], "tuned": TOOLS[3]}
    tools = TOOLS if args.tools == "all" else tuple(wanted[t] for t in args.tools.split(","))
    results = []
    with Lab.from_file() as lab:
        print(f"lab up in {lab.up():.1f}s ({lab.prefix}*)", flush=True)
        bench = Bench(lab)
        for tool in tools:
            results.append(bench.run_tool(tool, args, lab.statedir / "bench"))
    print()
    print(table(results, args))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
