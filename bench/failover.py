"""Convergence of `pop` measured at a real FRR router's kernel table.

Topology (namespaces, made and removed by this script):

    r1 (FRR, AS 65000) --10.0.1.0/30-- pop1 (pop run: ExaBGP + engine) -- vpn1, vpn2 (TCP :443)

For each trial the PoP is announced and settled, then at a moment spread evenly over the
L4 check period every server fails at once, in one of two ways:

- dead: the listeners are killed (the kernel answers SYNs with RST);
- blackhole: an nftables rule in the PoP's namespace silently drops the servers' traffic.

The detection time is from the fault to the route's removal from r1's kernel table, read from
rtnetlink events in r1's namespace (lab.routewatch). Recovery is from the servers being back to
the route being back (the hold-down is part of it). Prints a table and writes JSON.

    sudo .venv/bin/python bench/failover.py [--trials 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.frr import BgpNeighbor, FrrRouter
from lab.netns import Netns, cleanup_prefix, veth
from lab.popnode import PopNode, TcpService
from lab.routewatch import RouteWatcher

ANYCAST = "198.51.100.1/32"
NEXT_HOP = "10.0.1.2"
PORT = 443
INTERVAL = 0.2  # pop's default checks.l4.interval: faults are spread over it


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


class Lab:
    def __init__(self, workdir: Path) -> None:
        self.prefix = f"bfo-{secrets.token_hex(2)}-"
        self.namespaces: list[Netns] = []
        self.workdir = workdir
        r1 = self._ns("r1")
        self.pop_ns = self._ns("pop1")
        veth(r1, "pop1", "10.0.1.1/30", self.pop_ns, "up0", "10.0.1.2/30")
        self.router = FrrRouter(r1, "r1", 65000, "192.0.2.100", [BgpNeighbor(NEXT_HOP, 65101, hold_time=9)],
                                workdir=workdir / "r1")
        self.router.start()
        self.services: list[TcpService] = []
        servers = []
        for s in (1, 2):
            sns = self._ns(f"vpn{s}")
            veth(self.pop_ns, f"v{s}", f"10.1.{s}.1/30", sns, "eth0", f"10.1.{s}.2/30")
            service = TcpService(sns, f"10.1.{s}.2", PORT)
            service.start()
            self.services.append(service)
            servers.append({"name": f"vpn{s}", "address": f"10.1.{s}.2"})
        self.pop = PopNode(self.pop_ns, {
            "pop": {"name": "pop1", "asn": 65101, "router_id": "192.0.2.1"},
            "neighbors": [{"address": "10.0.1.1", "peer_as": 65000, "local_address": NEXT_HOP}],
            "prefixes": [ANYCAST],
            "servers": servers,
            "checks": {"l4": {"port": PORT}},
        }, workdir / "pop1")
        self.pop.start()
        self.pop_ns.run("nft", "add", "table", "inet", "bench")
        self.pop_ns.run("nft", "add", "chain", "inet", "bench", "out",
                        "{ type filter hook output priority 0; policy accept; }")

    def _ns(self, name: str) -> Netns:
        ns = Netns(self.prefix + name)
        self.namespaces.append(ns)
        return ns

    def blackhole(self, on: bool) -> None:
        if on:
            self.pop_ns.run("nft", "add", "rule", "inet", "bench", "out", "ip", "daddr", "10.1.0.0/16", "drop")
        else:
            self.pop_ns.run("nft", "flush", "chain", "inet", "bench", "out")

    def close(self) -> None:
        self.pop.stop()
        self.router.stop()
        for ns in reversed(self.namespaces):
            ns.close()
        cleanup_prefix(self.prefix)


def trial(lab: Lab, watch: RouteWatcher, kind: str, offset: float) -> tuple[float, float]:
    watch.wait_for(lambda hops: hops == frozenset({NEXT_HOP}), timeout=30)
    lab.pop.wait_status(lambda s: s["state"] == "announced", timeout=10)
    time.sleep(1.0 + offset)
    fault = time.monotonic()
    if kind == "dead":
        for service in lab.services:
            service.stop()
    else:
        lab.blackhole(True)
    gone = watch.wait_for(lambda hops: not hops, timeout=15, since=fault)
    time.sleep(0.5)
    back = time.monotonic()
    if kind == "dead":
        for service in lab.services:
            service.start()
    else:
        lab.blackhole(False)
    returned = watch.wait_for(lambda hops: hops == frozenset({NEXT_HOP}), timeout=30, since=back)
    return gone - fault, returned - back


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results: dict[str, Any] = {"trials": args.trials, "tool": "pop (defaults)", "kinds": {}}
    with tempfile.TemporaryDirectory(prefix="pop-bench-") as tmp:
        lab = Lab(Path(tmp))
        try:
            with RouteWatcher(lab.router.ns, ANYCAST) as watch:
                for kind in ("dead", "blackhole"):
                    detections, recoveries = [], []
                    for index in range(args.trials):
                        detection, recovery = trial(lab, watch, kind, INTERVAL * index / args.trials)
                        detections.append(detection)
                        recoveries.append(recovery)
                        print(f"  {kind:9s} trial {index + 1:2d}: detection {detection * 1000:6.0f} ms, "
                              f"recovery {recovery:5.2f} s", flush=True)
                    results["kinds"][kind] = {"detection": detections, "recovery": recoveries}
        finally:
            lab.close()
    print()
    print(f"pop with default settings, {args.trials} trials each, timed at the FRR router's kernel table")
    print(f"{'failure':10s} {'p50':>8s} {'p95':>8s} {'max':>8s}   {'recovery p50':>12s} {'max':>6s}")
    for kind, data in results["kinds"].items():
        d = data["detection"]
        r = data["recovery"]
        print(f"{kind:10s} {statistics.median(d):7.3f}s {percentile(d, 0.95):7.3f}s {max(d):7.3f}s   "
              f"{statistics.median(r):11.2f}s {max(r):5.2f}s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
