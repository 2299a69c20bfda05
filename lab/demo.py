"""The main job: the containerlab.yml topology, realised in namespaces, through a failure and a
recovery, printed as a timeline.

    client1 -- r1 (FRR, AS 65000) ==== r2 (FRR, AS 65010) -- probe1
                |         \\               /        |
              pop1        pop3 (both)           pop2          each PoP: `pop run` (ExaBGP + engine)
             vpn11 vpn12  vpn31 vpn32        vpn21 vpn22      each VPN server: TCP :443 + wireguard-go

A "who am I" service on the anycast address answers with the name of the node that holds it:
pop2 and pop3 hold it themselves (data plane mode none); pop1 (mode ecmp) routes it to its
healthy servers, so connections that reach pop1 are answered by vpn11 or vpn12. The client
shows where its connections landed. Everything is torn down at the end, also on Ctrl-C or failure.

Run as root from the repository root:  .venv/bin/python -m lab.demo
"""

from __future__ import annotations

import collections
import json
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from lab.runner import NOC_PORT, Lab

T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - T0:7.2f}s] {message}", flush=True)


def landed(lab: Lab, node: str, count: int = 20) -> str:
    """Where ``count`` new TCP connections from ``node`` to the anycast address land."""
    seen = collections.Counter(lab.ask_node(node) for _ in range(count))
    parts = []
    for who, n in seen.most_common():
        pop = lab.pop_of(who)
        parts.append(f"{who or 'nobody'} x{n}" + (f" ({pop}'s server)" if pop != who else ""))
    return f"{count} connections answered by " + ", ".join(parts)


def fleet_shows(url: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
    """The fleet page's JSON (pop noc, served on the host's loopback) once it shows ``predicate``."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(url + "v1/fleet", timeout=2) as response:
            view: dict[str, Any] = json.loads(response.read())
        if predicate(view) or time.monotonic() > deadline:
            return view
        time.sleep(0.2)


def main() -> int:
    lab = Lab.from_file()
    try:
        say(f"bringing up containerlab.yml in network namespaces ({lab.prefix}*): {len(lab.spec.routers)} FRR "
            f"routers, {len(lab.spec.pops)} PoPs, {len(lab.spec.vpns)} VPN servers, a client, "
            f"{len(lab.spec.agents)} probe agents")
        converged = lab.up()
        say(f"converged in {converged:.1f}s: every router has a route to {lab.anycast}")
        for router in ("r1", "r2"):
            hops = lab.router(router).kernel_nexthops(lab.anycast)
            say(f"  {router} kernel: {lab.anycast} via {', '.join(sorted(lab.nexthop_nodes(hops)))}")
        first, _ = lab.wait_answer("client1")
        say(f"client1 -> anycast address: answered by {first}: {landed(lab, 'client1')}")
        assert first is not None

        with lab.watch("r1") as watch:
            fault = lab.faults.apply("server-down", first)
            say(f"FAULT: every VPN server of {first} stops (TCP and WireGuard)")
            hop = lab.pop_address("r1", first)
            at = watch.wait_for(lambda hops: hop not in hops, timeout=15, since=fault.at)
            say(f"r1 kernel: {first} removed from the route {(at - fault.at) * 1000:.0f} ms after the failure; "
                f"now via {', '.join(sorted(lab.nexthop_nodes(watch.nexthops)))}")
            status = lab.pop_status(first)
            say(f"{first} /status: {status['state']} — {status['last_change_reason']}")
            second, when = lab.wait_answer("client1", lambda who: who not in (None, first))
            say(f"client1 -> anycast address: answered by {second} "
                f"({(when - fault.at) * 1000:.0f} ms after the failure): {landed(lab, 'client1')}")
            if lab.noc_url:
                # the page polls every PoP in turn: wait until each has answered since the fault,
                # so that it does not show the others as they were during the lab's convergence
                fleet = fleet_shows(lab.noc_url, lambda view: first in view["red"] and all(
                    p["last_answer_seconds"] is not None
                    and p["last_answer_seconds"] < time.monotonic() - fault.at for p in view["pops"]))
                say(f"fleet page {lab.noc_url}: {fleet['announcing']}/{len(fleet['pops'])} PoPs announcing, "
                    f"red: {', '.join(fleet['red'])}")

            back = lab.faults.undo(fault)
            say(f"RECOVERY: {first}'s servers are back")
            at = watch.wait_for(lambda hops: hop in hops, timeout=30, since=back)
            say(f"r1 kernel: {first} back in the route {at - back:.2f}s after recovery "
                f"(servers rise, then the {lab.spec.pops[first].config.pool.hold_down:g} s "
                "hold-down)")
            say(f"{first} /status: {lab.pop_status(first)['state']}")
        say("demo complete: announce, failover and recovery against real FRR routers")
        say("to look around yourself: `.venv/bin/python -m lab up` keeps this lab running and prints where the "
            f"fleet page is (http://127.0.0.1:{NOC_PORT}/ unless that port is taken) for a browser on this host; "
            "`.venv/bin/python -m lab down` ends it")
        return 0
    except Exception as exc:  # the demo reports any failure with the daemons' logs, then tears down
        say(f"demo FAILED: {exc!r}")
        print(lab.log_tails(30))
        return 1
    finally:
        lab.down()
        say("teardown: namespaces, processes and files removed")


if __name__ == "__main__":
    sys.exit(main())
