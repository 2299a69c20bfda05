"""The demo: two PoPs behind a real FRR router, a client, a failure and a recovery.

    client --10.9.0.0/30-- r1 (FRR, AS 65000) --10.0.1.0/30-- pop1 (AS 65101) -- vpn11, vpn12
                                              --10.0.2.0/30-- pop2 (AS 65102) -- vpn21, vpn22

Each PoP runs the real `pop run` (ExaBGP + engine) and answers on the anycast address
198.51.100.1 (held on its lo) with its own name, so the client sees which PoP it reached.
Prints a timeline, then tears everything down (also on Ctrl-C or failure).

Run as root from the repository root:  .venv/bin/python -m lab.demo
"""

from __future__ import annotations

import secrets
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from lab.frr import BgpNeighbor, FrrRouter
from lab.netns import Netns, cleanup_prefix, veth
from lab.popnode import PopNode, TcpService
from lab.routewatch import RouteWatcher

ANYCAST = "198.51.100.1"
PORT = 443
WHOAMI_PORT = 8080
_WHOAMI = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(64)
while True:
    c, _ = s.accept()
    c.sendall(sys.argv[3].encode())
    c.close()
"""

T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - T0:7.2f}s] {message}", flush=True)


def ask_anycast(client: Netns) -> str:
    script = (f"import socket; s = socket.create_connection(('{ANYCAST}', {WHOAMI_PORT}), timeout=2); "
              "print(s.recv(64).decode())")
    result = client.run(sys.executable, "-c", script, check=False, timeout=10)
    return result.stdout.strip() or f"no answer ({result.stderr.strip().splitlines()[-1:]})"


def main() -> int:
    prefix = f"demo-{secrets.token_hex(2)}-"
    workdir = Path(tempfile.mkdtemp(prefix="pop-demo-"))
    namespaces: list[Netns] = []
    nodes: list[PopNode] = []
    router: FrrRouter | None = None
    failed = True

    def ns(name: str) -> Netns:
        made = Netns(prefix + name)
        namespaces.append(made)
        return made

    try:
        say(f"building the lab in namespaces {prefix}* (logs in {workdir})")
        r1 = ns("r1")
        client = ns("client")
        veth(client, "eth0", "10.9.0.2/30", r1, "client", "10.9.0.1/30")
        client.run("ip", "route", "add", "default", "via", "10.9.0.1")
        router = FrrRouter(r1, "r1", 65000, "192.0.2.100",
                           [BgpNeighbor(f"10.0.{i}.2", 65100 + i, hold_time=9) for i in (1, 2)],
                           workdir=workdir / "r1")
        router.start()
        say("r1: FRR (zebra + bgpd) up, AS 65000")
        services: dict[int, list[TcpService]] = {}
        for i in (1, 2):
            pop_ns = ns(f"pop{i}")
            veth(r1, f"pop{i}", f"10.0.{i}.1/30", pop_ns, "up0", f"10.0.{i}.2/30")
            pop_ns.run("ip", "route", "add", "default", "via", f"10.0.{i}.1")
            pop_ns.run("ip", "addr", "add", f"{ANYCAST}/32", "dev", "lo")
            pop_ns.popen(sys.executable, "-c", _WHOAMI, ANYCAST, str(WHOAMI_PORT), f"pop{i}")
            services[i] = []
            servers = []
            for s in (1, 2):
                server_ns = ns(f"vpn{i}{s}")
                veth(pop_ns, f"v{s}", f"10.{i}.{s}.1/30", server_ns, "eth0", f"10.{i}.{s}.2/30")
                service = TcpService(server_ns, f"10.{i}.{s}.2", PORT)
                service.start()
                services[i].append(service)
                servers.append({"name": f"vpn{i}{s}", "address": f"10.{i}.{s}.2"})
            node = PopNode(pop_ns, {
                "pop": {"name": f"pop{i}", "asn": 65100 + i, "router_id": f"192.0.2.{i}"},
                "neighbors": [{"address": f"10.0.{i}.1", "peer_as": 65000, "local_address": f"10.0.{i}.2"}],
                "prefixes": [f"{ANYCAST}/32"],
                "servers": servers,
                "checks": {"l4": {"port": PORT}},
            }, workdir / f"pop{i}")
            node.start()
            nodes.append(node)
            say(f"pop{i}: `pop run` started (ExaBGP + engine), servers vpn{i}1 vpn{i}2 listening on :{PORT}")

        with RouteWatcher(r1, f"{ANYCAST}/32") as watch:
            both = frozenset({"10.0.1.2", "10.0.2.2"})
            at = watch.wait_for(lambda hops: hops == both, timeout=60)
            say(f"r1 kernel: {ANYCAST}/32 via 10.0.1.2 and 10.0.2.2 (ECMP) "
                f"— {at - T0:.2f}s after start")
            answered = ask_anycast(client)
            say(f"client -> {ANYCAST}:{WHOAMI_PORT} answered by {answered}")
            victim = 1 if answered == "pop1" else 2
            other = 3 - victim

            failed = time.monotonic()
            for service in services[victim]:
                service.stop()
            say(f"FAULT: every VPN server of pop{victim} stops (connections refused)")
            at = watch.wait_for(lambda hops: hops == frozenset({f"10.0.{other}.2"}), timeout=15, since=failed)
            say(f"r1 kernel: route now only via pop{other} — {(at - failed) * 1000:.0f} ms after the failure")
            status = nodes[victim - 1].status()
            say(f"pop{victim} /status: {status['state']}: {status['last_change_reason']}")
            say(f"client -> {ANYCAST}:{WHOAMI_PORT} answered by {ask_anycast(client)}")

            recovered = time.monotonic()
            for service in services[victim]:
                service.start()
            say(f"RECOVERY: pop{victim}'s servers are back")
            at = watch.wait_for(lambda hops: hops == both, timeout=20, since=recovered)
            say(f"r1 kernel: ECMP via both PoPs again — {at - recovered:.2f}s after recovery "
                f"(hold-down {nodes[0].config.get('pool', {}).get('hold_down', 5)} s)")
            say(f"pop{victim} /status: {nodes[victim - 1].status()['state']}")
        say("demo complete: announce, failover and recovery shown against a real FRR router")
        failed = False
        return 0
    except (TimeoutError, RuntimeError, OSError) as exc:
        say(f"demo FAILED: {exc}")
        for node in nodes:
            print(f"--- {node.name} log ---\n{node.log_tail(40)}")
        return 1
    finally:
        for node in nodes:
            node.stop()
        if router is not None:
            router.stop()
        for made in reversed(namespaces):
            made.close()
        cleanup_prefix(prefix)
        if failed:
            say(f"teardown: namespaces and processes removed; logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            say("teardown: namespaces, processes and files removed")


if __name__ == "__main__":
    socket.setdefaulttimeout(10)
    sys.exit(main())
