"""Convergence of `pop` against ExaBGP's own healthcheck, timed at a real FRR router.

Topology (namespaces, made and removed by this script):

    r1 (FRR, AS 65000) --10.0.1.0/30-- pop1 --10.1.1.0/30-- vpn1 (TCP :443)
                                            --10.1.2.0/30-- vpn2 (TCP :443)

pop1 runs, one after the other on the same topology in the same run:
- `pop` with its defaults (`pop run`: ExaBGP + the engine);
- ExaBGP's `healthcheck` as ExaBGP's API process with `--withdraw-on-down`, driven by the
  equivalent TCP check (the PoP is up while at least one server accepts a connection), once
  with its defaults (interval 5, fast-interval 1, rise 3, fall 3, timeout 5) and once tuned to
  interval 1, fast-interval 1, rise 3, fall 2, timeout 1.

Every time is taken at r1's kernel table from rtnetlink events in its namespace (lab.routewatch)
with time.monotonic(), against the monotonic moment the fault was applied:
- detection: every server dies (listeners killed: connections refused) or is blackholed
  (nftables drops their traffic in the PoP's namespace); p50/p95/max over --trials each, the
  fault moments spread evenly over the tool's check interval;
- recovery: servers back -> next hop back at r1 (includes pop's 5 s hold-down);
- flapping: the servers go down 2 s / up 2 s for --flap seconds: route changes at r1, and
  "blackhole seconds" — time r1 still routed to pop1 while no server was alive;
- false withdrawals: --loss percent random loss in each direction on the check path (PoP to
  servers) for --loss-seconds with healthy servers: withdrawals at r1.

    .venv/bin/python bench/failover.py [--trials 20] [--flap 120] [--loss-seconds 120] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
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
SERVERS = ("10.1.1.2", "10.1.2.2")


@dataclass(frozen=True)
class Tool:
    name: str
    interval: float  # the check period the fault moments are spread over
    healthcheck: str | None  # None: pop; else the healthcheck's tuning arguments


TOOLS = (
    Tool("pop (defaults)", 0.2, None),
    Tool("exabgp healthcheck (defaults)", 5.0, ""),
    Tool("exabgp healthcheck (tuned)", 1.0, "--interval 1 --fast-interval 1 --rise 3 --fall 2 --timeout 1"),
)


class HealthcheckNode:
    """ExaBGP with its own `healthcheck` as API process, in the PoP's namespace."""

    def __init__(self, ns: Netns, workdir: Path, tuning: str) -> None:
        self.ns = ns
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        exabgp = Path(sys.executable).parent / "exabgp"
        # ExaBGP's `run` takes a plain command line: the check and the helper go into scripts
        check = workdir / "check.sh"
        probes = " || ".join(f"timeout 1 bash -c '</dev/tcp/{ip}/{PORT}'" for ip in SERVERS)
        check.write_text(f"#!/bin/bash\n{probes}\n")
        helper = workdir / "healthcheck.sh"
        helper.write_text(f"#!/bin/bash\nexec {exabgp} healthcheck --no-syslog --no-ip-setup --withdraw-on-down "
                          f"--ip {ANYCAST} {tuning} --cmd {check}\n")
        for script in (check, helper):
            script.chmod(0o755)
        command = str(helper)
        (workdir / "exabgp.conf").write_text(f"""
process healthcheck {{
    run {command};
    encoder text;
}}
neighbor 10.0.1.1 {{
    router-id 192.0.2.1;
    local-address {NEXT_HOP};
    local-as 65101;
    peer-as 65000;
    hold-time 9;
    family {{ ipv4 unicast; }}
    api {{ processes [ healthcheck ]; }}
}}
""")
        (workdir / "exabgp.env").write_text(
            "[exabgp.api]\ncli = false\nack = true\n[exabgp.daemon]\ndrop = false\nuser = 'root'\n"
            "[exabgp.log]\ndestination = 'stderr'\n")
        self.proc = ns.popen(str(exabgp), "--env-file", str(workdir / "exabgp.env"), "server",
                             str(workdir / "exabgp.conf"), log=workdir / "exabgp.log")

    def settled(self) -> None:
        """The healthcheck has no status endpoint: being announced at r1 is its 'up'."""

    def stop(self) -> None:
        self.ns.stop(self.proc, timeout=10)


class PopTool:
    def __init__(self, ns: Netns, workdir: Path) -> None:
        self.node = PopNode(ns, {
            "pop": {"name": "pop1", "asn": 65101, "router_id": "192.0.2.1"},
            "neighbors": [{"address": "10.0.1.1", "peer_as": 65000, "local_address": NEXT_HOP}],
            "prefixes": [ANYCAST],
            "servers": [{"name": f"vpn{i}", "address": ip} for i, ip in enumerate(SERVERS, 1)],
            "checks": {"l4": {"port": PORT}},
        }, workdir)
        self.node.start()

    def settled(self) -> None:
        self.node.wait_status(lambda s: s["state"] == "announced", timeout=15)

    def stop(self) -> None:
        self.node.stop()


class Lab:
    def __init__(self, workdir: Path) -> None:
        self.prefix = f"bfo-{secrets.token_hex(2)}-"
        self.namespaces: list[Netns] = []
        self.workdir = workdir
        r1 = self._ns("r1")
        self.pop_ns = self._ns("pop1")
        veth(r1, "pop1", "10.0.1.1/30", self.pop_ns, "up0", f"{NEXT_HOP}/30")
        self.router = FrrRouter(r1, "r1", 65000, "192.0.2.100", [BgpNeighbor(NEXT_HOP, 65101, hold_time=9)],
                                workdir=workdir / "r1")
        self.router.start()
        self.services: list[TcpService] = []
        for index, address in enumerate(SERVERS, 1):
            sns = self._ns(f"vpn{index}")
            veth(self.pop_ns, f"v{index}", f"10.1.{index}.1/30", sns, "eth0", f"{address}/30")
            service = TcpService(sns, address, PORT)
            service.start()
            self.services.append(service)
        self.pop_ns.run("nft", "add table inet bench; "
                        "add chain inet bench out { type filter hook output priority 0; policy accept; }; "
                        "add chain inet bench in { type filter hook input priority 0; policy accept; }")

    def _ns(self, name: str) -> Netns:
        ns = Netns(self.prefix + name)
        self.namespaces.append(ns)
        return ns

    def servers(self, up: bool) -> None:
        for service in self.services:
            if up:
                service.start()
            else:
                service.stop()

    def blackhole(self, on: bool) -> None:
        if on:
            self.pop_ns.run("nft", "add", "rule", "inet", "bench", "out", "ip", "daddr", "10.1.0.0/16", "drop")
        else:
            self.pop_ns.run("nft", "flush", "chain", "inet", "bench", "out")

    def loss(self, percent: int) -> None:
        """Random loss in each direction between the PoP and its servers (not on the BGP link)."""
        self.pop_ns.run("nft", "flush chain inet bench out; flush chain inet bench in")
        if percent:
            drop = f"numgen random mod 100 < {percent} drop"
            self.pop_ns.run("nft", f"add rule inet bench out ip daddr 10.1.0.0/16 {drop}; "
                                   f"add rule inet bench in ip saddr 10.1.0.0/16 {drop}")

    def close(self) -> None:
        self.router.stop()
        for ns in reversed(self.namespaces):
            ns.close()
        cleanup_prefix(self.prefix)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def announced(hops: frozenset[str]) -> bool:
    return hops == frozenset({NEXT_HOP})


def withdrawn(hops: frozenset[str]) -> bool:
    return not hops


def detection_trials(lab: Lab, tool: Tool, runner: PopTool | HealthcheckNode, watch: RouteWatcher, *,
                     kind: str, trials: int) -> tuple[list[float], list[float]]:
    detections, recoveries = [], []
    for index in range(trials):
        watch.wait_for(announced, timeout=60)
        runner.settled()
        time.sleep(1.0 + tool.interval * index / trials)
        fault = time.monotonic()
        if kind == "dead":
            lab.servers(up=False)
        else:
            lab.blackhole(True)
        gone = watch.wait_for(withdrawn, timeout=60, since=fault)
        time.sleep(0.5)
        back = time.monotonic()
        if kind == "dead":
            lab.servers(up=True)
        else:
            lab.blackhole(False)
        returned = watch.wait_for(announced, timeout=90, since=back)
        detections.append(gone - fault)
        recoveries.append(returned - back)
        print(f"    {kind:9s} {index + 1:2d}/{trials}: detection {gone - fault:6.3f} s, "
              f"recovery {returned - back:6.2f} s", flush=True)
    return detections, recoveries


def flapping(lab: Lab, watch: RouteWatcher, seconds: float, period: float = 2.0) -> dict[str, float]:
    watch.wait_for(announced, timeout=60)
    down_intervals: list[tuple[float, float]] = []
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        went_down = time.monotonic()
        lab.servers(up=False)
        time.sleep(period)
        lab.servers(up=True)
        down_intervals.append((went_down, time.monotonic()))
        time.sleep(period)
    settle = time.monotonic()
    time.sleep(0.5)
    events = [e for e in watch.events if start <= e.timestamp <= settle]
    changes = len(events)
    # blackhole seconds: r1 routes to pop1 while every server is down
    routed: list[tuple[float, float]] = []
    state_on = bool(watch_state_at(watch, start))
    since = start
    for event in events:
        now_on = bool(event.nexthops)
        if state_on and not now_on:
            routed.append((since, event.timestamp))
        if now_on and not state_on:
            since = event.timestamp
        state_on = now_on
    if state_on:
        routed.append((since, settle))
    blackhole = sum(max(0.0, min(a_end, b_end) - max(a_start, b_start))
                    for a_start, a_end in routed for b_start, b_end in down_intervals)
    return {"route_changes": changes, "blackhole_seconds": blackhole, "cycles": len(down_intervals)}


def watch_state_at(watch: RouteWatcher, moment: float) -> frozenset[str]:
    state: frozenset[str] = frozenset({NEXT_HOP})
    for event in watch.events:
        if event.timestamp > moment:
            break
        state = event.nexthops
    return state


def loss_run(lab: Lab, watch: RouteWatcher, seconds: float, percent: int) -> dict[str, float]:
    watch.wait_for(announced, timeout=60)
    start = time.monotonic()
    lab.loss(percent)
    time.sleep(seconds)
    lab.loss(0)
    withdrawals = sum(1 for e in watch.events if e.timestamp >= start and not e.nexthops)
    return {"withdrawals": withdrawals, "seconds": seconds, "loss_percent_each_way": percent}


def run_tool(lab: Lab, tool: Tool, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    print(f"\n== {tool.name}", flush=True)
    runner: PopTool | HealthcheckNode
    if tool.healthcheck is None:
        runner = PopTool(lab.pop_ns, workdir / "pop")
    else:
        slug = "".join(c if c.isalnum() else "-" for c in tool.name)
        runner = HealthcheckNode(lab.pop_ns, workdir / slug, tool.healthcheck)
    result: dict[str, Any] = {"tool": tool.name}
    try:
        with RouteWatcher(lab.router.ns, ANYCAST) as watch:
            for kind in ("dead", "blackhole"):
                detections, recoveries = detection_trials(lab, tool, runner, watch, kind=kind, trials=args.trials)
                result[kind] = {"detection": detections, "recovery": recoveries}
            if args.flap > 0:
                result["flapping"] = flapping(lab, watch, args.flap)
                print(f"    flapping: {result['flapping']}", flush=True)
            if args.loss_seconds > 0:
                result["loss"] = loss_run(lab, watch, args.loss_seconds, args.loss)
                print(f"    loss: {result['loss']}", flush=True)
    finally:
        runner.stop()
        lab.servers(up=True)
        lab.loss(0)
        time.sleep(1.0)
    return result


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    def stats(values: list[float]) -> str:
        return f"{statistics.median(values):5.2f} {percentile(values, 0.95):5.2f} {max(values):5.2f}"

    lines = [
        f"detection and recovery at the FRR router, {args.trials} trials each; flapping 2 s/2 s for {args.flap:g} s; "
        f"{args.loss}% loss each way for {args.loss_seconds:g} s",
        "",
        f"{'tool':32s} {'dead p50/p95/max (s)':>21s} {'blackhole p50/p95/max':>22s} {'recovery p50':>12s} "
        f"{'flap changes':>12s} {'blackhole s':>11s} {'false wd':>8s}",
    ]
    base = statistics.median(results[0]["dead"]["detection"]) if results else 1.0
    for r in results:
        flap = r.get("flapping", {})
        loss = r.get("loss", {})
        lines.append(
            f"{r['tool']:32s} {stats(r['dead']['detection']):>21s} {stats(r['blackhole']['detection']):>22s} "
            f"{statistics.median(r['dead']['recovery']):12.2f} {flap.get('route_changes', '-'):>12} "
            f"{flap.get('blackhole_seconds', float('nan')):11.1f} {loss.get('withdrawals', '-'):>8}")
    lines.append("")
    for r in results[1:]:
        ratio = statistics.median(r["dead"]["detection"]) / base
        pop_bh = statistics.median(results[0]["blackhole"]["detection"])
        ratio_bh = statistics.median(r["blackhole"]["detection"]) / pop_bh
        lines.append(f"{r['tool']}: dead detection {ratio:.1f}x pop's, blackhole {ratio_bh:.1f}x pop's")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--flap", type=float, default=120.0, help="seconds of 2 s/2 s flapping (0: skip)")
    parser.add_argument("--loss-seconds", type=float, default=120.0, help="seconds of lossy check path (0: skip)")
    parser.add_argument("--loss", type=int, default=10, help="percent loss in each direction")
    parser.add_argument("--tools", default="all", help="all, or a comma list of: pop,default,tuned")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    wanted = {"pop": TOOLS[0], "default": TOOLS[1], "tuned": TOOLS[2]}
    tools = TOOLS if args.tools == "all" else tuple(wanted[t] for t in args.tools.split(","))
    results = []
    with tempfile.TemporaryDirectory(prefix="pop-bench-") as tmp:
        lab = Lab(Path(tmp))
        try:
            for tool in tools:
                results.append(run_tool(lab, tool, args, Path(tmp)))
        finally:
            lab.close()
    print()
    print(table(results, args))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
