"""Tier 3 in the lab: a PoP cut off from outside, and monitoring that fails or lies.

Runs against the lab (`containerlab.yml` realised in namespaces by lab.runner): three PoPs,
three FRR routers, three probe agents behind r1, r2 and r3, every PoP pulling all three
(quorum 2, the defaults of docs/configuration.md). The scenarios are lab.tier3's, the same
the lab test runs once; here they run many times and the figures are printed.

1. cut off: the PoP that the agent beside the client (probe2, behind r1 like client1) lands on
   is cut off: its upstreams drop every packet to and from its anycast prefix and beacon, while
   its BGP sessions, servers and checks stay green. Per trial: the cut -> its next hop gone from
   its first upstream's kernel route; the withdrawal -> the catchment map (the PoPs' /status) shows the agent
   beside the client landing where the client's own TCP connection lands; the undo -> pop1
   back in r1's route. p50 and max over --trials. Goals: withdrawn <= 10 s, catchment <= 10 s,
   back <= hold-down + 10 s.
   Side by side, in the same run: pop1 with tier 3 disabled (what pop did before tier 3, and
   what an internal-only health checker does) under the same cut for --baseline-wait s.
2. monitoring fails: every agent dead; every agent lying (a replayed report, a stale one
   signed with the right key, a forged one); one agent's own network broken; every agent
   seeing every PoP down. Each held for lab.tier3.HOLD s, --holds times; the anycast route's
   changes at every router are counted. Goal: 0.

    flock /tmp/pop-netns.lock .venv/bin/python bench/tier3.py [--trials 10] [--holds 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.failover import percentile
from lab import tier3
from lab.runner import Lab

POP, CLIENT = "pop1", "client1"


def baseline(lab: Lab, wait: float) -> dict[str, Any]:
    """pop1 without tier 3 under the same cut: is it withdrawn within ``wait`` seconds?"""
    lab.restart_pop(POP, {"external": {"enabled": False}})
    lab.wait_converged(60)
    router, _ = lab.faults.upstreams(POP)[0]
    hop = lab.pop_address(router, POP)
    with lab.watch(router) as watch:
        fault = lab.faults.apply("cut-off", POP)
        try:
            withdrawn: float | None = watch.wait_for(lambda hops: hop not in hops, timeout=wait,
                                                     since=fault.at) - fault.at
        except TimeoutError:
            withdrawn = None
        answered = lab.ask(CLIENT)
        lab.faults.undo(fault)
    lab.restart_pop(POP)
    tier3.settled(lab, timeout=60)
    return {"withdrawn": withdrawn, "waited": wait, "client_lands_meanwhile": answered}


def table(result: dict[str, Any]) -> str:
    trials = result["cut_off"]
    rows = [f"{'trial':>5} {'PoP cut':>8} {'withdrawn s':>12} {'catchment s':>12} {'back s':>8}  "
            "client lands on; agents moved off it"]
    rows += [f"{i:>5} {t['pop']:>8} {t['withdrawn']:>12.2f} {t['catchment']:>12.2f} {t['back']:>8.2f}  "
             f"{t['landing']}; {', '.join(t['moved']) or '-'}" for i, t in enumerate(trials, 1)]
    hold = trials[0]["hold_down"]
    lines = ["", "1. a PoP cut off from outside while healthy inside (its upstreams drop its traffic)", *rows, ""]
    for key, goal in (("withdrawn", 10.0), ("catchment", 10.0), ("back", hold + 10.0)):
        values = [t[key] for t in trials]
        p50, top = percentile(values, 0.5), max(values)
        lines.append(f"   {key:<10} p50 {p50:6.2f} s   max {top:6.2f} s   goal <= {goal:g} s   "
                     f"{'met' if top <= goal else 'MISSED'}")
    base = result["baseline"]
    if base is not None:
        p50 = percentile([t["withdrawn"] for t in trials], 0.5)
        seen = f"{base['withdrawn']:.2f} s" if base["withdrawn"] is not None else f"never within {base['waited']:g} s"
        ratio = (f"at least {base['waited'] / p50:.0f}x faster" if base["withdrawn"] is None
                 else f"{base['withdrawn'] / p50:.1f}x")
        lines.append(f"   side by side: tier 3 p50 {p50:.2f} s vs tier 3 disabled: {seen} "
                     f"(the client meanwhile lands on {base['client_lands_meanwhile']}): {ratio}")
    lines += ["", "2. monitoring that fails or lies (announcement changes at every router; goal 0)"]
    for name, runs in result["monitoring"].items():
        changes = [run["changes"] for run in runs]
        lines.append(f"   {name:<34} changes {changes}  view {runs[0]['view']:<9} "
                     f"(after {max(r['view_after'] for r in runs):.1f} s)  {'met' if not any(changes) else 'MISSED'}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10, help="cut-off trials")
    parser.add_argument("--holds", type=int, default=1, help="runs of each monitoring failure")
    parser.add_argument("--baseline-wait", type=float, default=30.0,
                        help="seconds the PoP without tier 3 is watched under the cut (0: skip)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result: dict[str, Any] = {"cut_off": [], "monitoring": {}, "baseline": None}
    with Lab.from_file() as lab:
        print(f"lab up in {lab.up():.1f}s ({lab.prefix}*)", flush=True)
        started = time.monotonic()
        tier3.settled(lab, timeout=60)
        print(f"every PoP seen from outside by every agent {time.monotonic() - started:.1f} s later", flush=True)
        for trial in range(args.trials):
            cut = tier3.cut_off(lab, None, CLIENT)
            result["cut_off"].append(asdict(cut))
            print(f"cut-off {trial + 1} ({cut.pop}): withdrawn {cut.withdrawn:.2f} s, "
                  f"catchment +{cut.catchment:.2f} s, back {cut.back:.2f} s", flush=True)
        for name in tier3.SCENARIOS:
            runs = []
            for _ in range(args.holds):
                run = tier3.monitoring_fails(lab, name)
                runs.append({**run, "events": [str(event) for event in run["events"]]})
                print(f"{name}: {run['changes']} changes", flush=True)
            result["monitoring"][name] = runs
        if args.baseline_wait > 0:
            result["baseline"] = baseline(lab, args.baseline_wait)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, **result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
