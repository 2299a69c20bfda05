"""Restart without a withdrawal, counted at a real FRR router (issue 11, item 3).

Runs against the lab (lab.runner). pop1 runs with BGP graceful restart
(`exabgp.graceful_restart`, --restart-time s; FRR 8.4 is a helper by default) and peers with
r1, which also reaches the anycast prefix through pop3. At r1: changes of the anycast
prefix's kernel route (rtnetlink, lab.routewatch), those without pop1 (withdrawals), and the
UPDATEs r1 received from pop1 per restart (a new session re-sends the routes: the anycast
prefix, the beacon and End-of-RIB; none of them changes a route). client1 connects to the
anycast address every 0.1 s throughout.

1. today's way, for comparison: SIGTERM to `pop run`, then start it again (--baseline times).
2. --restarts planned restarts: SIGUSR2 to `pop run` (lab fault pop-restart). Goal: 0 route
   changes, 0 withdrawals, every client connection answered.
3. unplanned death: `pop run` and ExaBGP SIGKILLed and pop1's servers stopped (--trials):
   the time until pop1 leaves r1's route. Bound: the restart time.

    flock /tmp/pop-netns.lock .venv/bin/python bench/restart.py [--restarts 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.routewatch import RouteWatcher
from lab.runner import Lab

POP = "pop1"
ROUTER = "r1"
CLIENT = "client1"


class Client:
    """client1 connecting to the anycast address every 0.1 s in a thread; answers counted."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.asked = self.unanswered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            answer = self.lab.ask(CLIENT, timeout=0.5)
            self.asked += 1
            self.unanswered += answer is None
            self._stop.wait(0.1)

    def __enter__(self) -> Client:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


class Bench:
    def __init__(self, lab: Lab, restart_time: int) -> None:
        self.lab = lab
        self.restart_time = restart_time
        self.r1 = lab.router(ROUTER)
        self.peer = lab.pop_address(ROUTER, POP)

    def left(self, hops: frozenset[str]) -> bool:
        return self.peer not in hops

    def routed(self, hops: frozenset[str]) -> bool:
        return self.peer in hops

    def wait_announced(self) -> None:
        self.lab.pop(POP).wait_status(lambda s: s["state"] == "announced", timeout=60)

    def baseline(self, watch: RouteWatcher, times: int) -> dict[str, Any]:
        print(f"\n== today's way: SIGTERM, then start ({times}x)", flush=True)
        rows = []
        for index in range(times):
            watch.wait_for(self.routed, timeout=60)
            self.wait_announced()
            fault = self.lab.faults.apply("pop-stop", POP)
            left = watch.wait_for(self.left, timeout=15, since=fault.began)
            self.lab.faults.undo(fault)
            back = watch.wait_for(self.routed, timeout=60, since=left)
            events = [e for e in watch.events if fault.began <= e.timestamp <= back]
            rows.append({"route_events": len(events), "withdrawals": sum(1 for e in events if self.left(e.nexthops)),
                         "absent_s": back - left})
            print(f"    {index + 1}: {rows[-1]}", flush=True)
        return {"rows": rows, "withdrawals": sum(r["withdrawals"] for r in rows)}

    def planned(self, watch: RouteWatcher, restarts: int) -> dict[str, Any]:
        print(f"\n== planned restarts (SIGUSR2), {restarts}x", flush=True)
        watch.wait_for(self.routed, timeout=60)
        self.wait_announced()
        node = self.lab.pop(POP)
        start = time.monotonic()
        rows = []
        with Client(self.lab) as client:
            for index in range(restarts):
                updates = self.r1.updates_received(self.peer)  # FRR counts across the peer's sessions
                fault = self.lab.faults.apply("pop-restart", POP)
                answered = self.lab.faults.undo(fault)
                status = node.wait_status(lambda s: s["state"] == "announced", timeout=30)
                time.sleep(1.0)  # room for a late withdraw or stale-route flush to reach r1
                events = [e for e in watch.events if e.timestamp >= fault.began]
                rows.append({"new_engine_s": answered - fault.began, "route_events": len(events),
                             "withdrawals": sum(1 for e in events if self.left(e.nexthops)),
                             "updates": self.r1.updates_received(self.peer) - updates,
                             "adopted": "adopted the previous engine's announcement" in status["last_change_reason"]})
                print(f"    restart {index + 1:2d}/{restarts}: {rows[-1]}", flush=True)
            asked, unanswered = client.asked, client.unanswered
        events = [e for e in watch.events if e.timestamp >= start]
        return {"rows": rows, "route_events": len(events),
                "withdrawals": sum(1 for e in events if self.left(e.nexthops)),
                "adopted": sum(r["adopted"] for r in rows), "client_asked": asked, "client_unanswered": unanswered,
                "new_engine_s": [r["new_engine_s"] for r in rows]}

    def unplanned(self, watch: RouteWatcher, trials: int) -> dict[str, Any]:
        print(f"\n== unplanned death: pop run + ExaBGP SIGKILLed, servers stopped ({trials}x)", flush=True)
        gone = []
        for index in range(trials):
            watch.wait_for(self.routed, timeout=60)
            self.wait_announced()
            node = self.lab.pop(POP)
            assert node.proc is not None
            killed = time.monotonic()
            node.proc.send_signal(signal.SIGKILL)
            os.kill(node.exabgp_pid(), signal.SIGKILL)
            servers = self.lab.faults.apply("server-down", POP)
            left = watch.wait_for(self.left, timeout=self.restart_time + 15, since=killed)
            gone.append(left - killed)
            print(f"    trial {index + 1}: pop1 left r1 {left - killed:.2f} s after the kill", flush=True)
            node.stop()
            self.lab.faults.undo(servers)
            node.start()
        return {"gone": gone}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--restarts", type=int, default=20)
    parser.add_argument("--baseline", type=int, default=3)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--restart-time", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result: dict[str, Any] = {}
    with Lab.from_file() as lab:
        print(f"lab up in {lab.up():.1f}s ({lab.prefix}*)", flush=True)
        lab.restart_pop(POP, {"exabgp": {"graceful_restart": args.restart_time}})
        lab.wait_converged()
        bench = Bench(lab, args.restart_time)
        try:
            with lab.watch(ROUTER) as watch:
                result["baseline"] = bench.baseline(watch, args.baseline)
                result["planned"] = bench.planned(watch, args.restarts)
                result["unplanned"] = bench.unplanned(watch, args.trials)
        finally:
            lab.faults.clear()
    base, planned, gone = result["baseline"], result["planned"], result["unplanned"]["gone"]
    print(f"\n{POP}'s next hop in {ROUTER}'s kernel route (rtnetlink), restart time {args.restart_time} s\n")
    print(f"SIGTERM + start ({args.baseline}x): {base['withdrawals']} withdrawals; pop1 absent p50 "
          f"{statistics.median(r['absent_s'] for r in base['rows']):.1f} s each time")
    print(f"planned restart, SIGUSR2 ({args.restarts}x): {planned['route_events']} route changes, "
          f"{planned['withdrawals']} withdrawals; {planned['adopted']}/{args.restarts} adopted; new engine's /status "
          f"p50 {statistics.median(planned['new_engine_s']):.2f} s after the signal; client1 "
          f"{planned['client_asked'] - planned['client_unanswered']}/{planned['client_asked']} connections answered; "
          f"UPDATEs per restart {statistics.median(r['updates'] for r in planned['rows']):.0f} (p50)")
    print(f"unplanned death ({args.trials}x): pop1 left r1 p50/max {statistics.median(gone):.2f} / {max(gone):.2f} s "
          f"after the kill (bound: restart time {args.restart_time} s)")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, **result}, indent=2) + "\n")
    missed = planned["route_events"] or planned["withdrawals"] or planned["client_unanswered"] \
        or max(gone) > args.restart_time + 1
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
