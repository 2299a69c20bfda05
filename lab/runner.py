"""containerlab.yml realised with network namespaces, veth pairs and the real daemons.

Contract:

- ``Lab.from_file("containerlab.yml")`` reads the topology (``lab.topology.load``); nothing
  runs yet. ``up()`` builds one namespace per node (``<prefix><node>``), one veth pair per
  link with the same interface names as under containerlab, runs each node's ``exec`` ``ip``
  commands in its namespace, then starts every daemon as a foreground child of the calling
  process: FRR (zebra, bgpd) in routers from their ``frr.conf``, ``pop run`` in PoPs from their
  ``pop.yaml`` (``lab.popnode.PopNode``), a TCP service and wireguard-go in each VPN server
  (``lab.popnode.TcpService``, ``lab.wgserver.WireGuardServer``), and a "who am I" service
  (``lab/nodes/whoami.py``, port ``WHOAMI_PORT``) on every node that holds an anycast address
  on ``lo``: a PoP in data plane mode none, or the servers of a PoP in mode ecmp (checked by
  ``lab.topology.load``). A PoP in mode ipvs needs IPVS in the kernel; ``up()`` refuses it
  naming what is missing when the kernel has none (this machine's; see lab.microvm). ``up()``
  returns once every PoP reports ``announced`` and every router forwards the anycast prefixes
  to all of its PoP neighbours; it returns the seconds that took.
- ``down()`` stops everything and removes the namespaces, the wireguard-go UAPI sockets and
  the state directory (``statedir``, default ``.lab/<prefix>``: it belongs to the lab, logs
  and generated keys included). It is idempotent; ``Lab`` is a context manager that calls it.
- State on disk: before creating anything, ``up()`` writes ``<statedir>/state.json`` (prefix,
  namespaces, wireguard interfaces, owner pid); ``lab.state.sweep(statedir)`` uses it to remove
  a lab whose owner crashed.
- Everything stays inside the lab's namespaces: no address, route, link or rule is ever added
  to the host's own namespace.
- Data path (``lab.datapath``, the client side of who-am-I): ``ask(node)`` connects from
  ``node`` (e.g. the client) to the anycast address's who-am-I port and returns the name of the
  PoP whose node answered (the PoP, or one of its servers), or None; ``ask_node(node)`` returns
  the answering node itself (e.g. ``vpn11``). ``hold(node, n)`` opens n connections and keeps
  them; ``where(sock)`` says which node answers on one of them now (flows that must stay on
  their server, e.g. through a drain).
- Status (``lab.status``): ``status()`` is a ``LabStatus`` snapshot, ``pop_status(pop)`` a PoP
  engine's /status, ``log_tails()`` the end of the daemons' logs.
- Faults: ``lab.faults`` (``lab.faults.Faults``), each with a monotonic timestamp and an undo.

How a test or benchmark drives it (as root, from the repository root)::

    with Lab.from_file("containerlab.yml") as lab:   # down() on exit, also on failure
        lab.up()                                     # seconds to converged routes
        with lab.watch("r1") as watch:               # rtnetlink events of r1's anycast route
            fault = lab.faults.apply("server-down", "pop1")
            gone = watch.wait_for(lambda hops: lab.pop_address("r1", "pop1") not in hops,
                                  since=fault.at)
            print(gone - fault.at, lab.ask("client1"))  # detection time; who answers now
            back = lab.faults.undo(fault)

``restart_pop(name, changes)`` runs a PoP with its pop.yaml changed (an L4-only PoP for a
comparison, other timings) and ``restart_pop(name)`` goes back to the file. A benchmark that
runs another speaker in a PoP (ExaBGP's healthcheck) stops that PoP's ``pop run`` with
``lab.pop(name).stop()`` and starts its own process with ``lab.ns(name).popen(...)``; the
neighbors to peer with are in ``lab.spec.pops[name].config``.

Times are ``time.monotonic()`` throughout (CLOCK_MONOTONIC is system-wide, so timestamps from
the supervisor and from a CLI process compare directly).
"""

from __future__ import annotations

import copy
import ipaddress
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from lab import datapath, prometheus, state
from lab import status as lab_status
from lab.agentnode import AgentNode
from lab.datapath import WHOAMI_PORT
from lab.faults import Faults
from lab.frr import FrrRouter
from lab.netns import IFNAMSIZ, Netns, veth
from lab.nodeexporter import NodeExporter
from lab.popnode import PopNode, TcpService, write_token
from lab.prometheus import PrometheusNode
from lab.routewatch import RouteWatcher, read_nexthops
from lab.status import LabStatus
from lab.topology import LabSpec, Node, anycast_on_lo, load
from lab.wgserver import WireGuardServer, keypair, write_key
from pop import config as pop_config
from pop import wgkeys

REPO = Path(__file__).resolve().parent.parent
WHOAMI = Path(__file__).resolve().parent / "nodes" / "whoami.py"
WG_KEY = "/etc/pop-lab/wg.key"
NOC_PORT = 9300  # the fleet page on the host's loopback
# every server's own address on its WireGuard interface when its PoP's tier 2 goes through the
# tunnel (as lab/nodes/entrypoint.sh sets it): the route back to the probe's tunnel address
SERVER_TUNNEL = "10.255.0.1/16"
MASQUERADE = """table ip poplab_nat {
  chain post { type nat hook postrouting priority srcnat; policy accept;
    ip saddr 10.255.0.0/16 ip daddr != 10.255.0.0/16 masquerade
  }
}
"""


def new_prefix(kind: str = "plab") -> str:
    """A namespace name prefix unique to one run (short: interface names derive from it)."""
    return f"{kind}-{secrets.token_hex(2)}-"


def wireguard_ifnames(prefix: str, servers: list[str]) -> dict[str, str]:
    """wireguard-go interface names, unique on the host: its UAPI socket directory is global.

    ``w`` + the prefix's first letter and random part + the server's name, or its index when
    the name would not fit the kernel's 15 characters.
    """
    kind, _, token = prefix.rstrip("-").rpartition("-")
    stem = f"w{kind[:1]}{token}"
    names = {name: f"{stem}{name}" for name in servers}
    if any(len(ifname) > IFNAMSIZ for ifname in names.values()):
        names = {name: f"{stem}v{index}" for index, name in enumerate(servers)}
    return names


@dataclass
class VpnServer:
    """One VPN server node: its TCP service and (when its PoP checks it) wireguard-go."""

    name: str
    ns: Netns
    tcp: TcpService
    wireguard: WireGuardServer | None

    def start(self) -> None:
        self.tcp.start()
        if self.wireguard is not None:
            self.wireguard.start()

    def stop(self, *, wireguard_only: bool = False) -> None:
        if self.wireguard is not None:
            self.wireguard.stop()
        if not wireguard_only:
            self.tcp.stop()

    def set_forwarding(self, on: bool) -> None:
        """What the server forwards for its WireGuard peers (net.ipv4.ip_forward)."""
        self.ns.run("sysctl", "-qw", f"net.ipv4.ip_forward={int(on)}")


class Lab:
    def __init__(self, spec: LabSpec, *, prefix: str | None = None, statedir: Path | None = None) -> None:
        self.spec = spec
        self.topology = spec.topology
        self.prefix = prefix or new_prefix()
        self.statedir = statedir or state.STATE_ROOT / self.prefix.rstrip("-")
        self.namespaces: dict[str, Netns] = {}
        self.routers: dict[str, FrrRouter] = {}
        self.pops: dict[str, PopNode] = {}
        self.vpns: dict[str, VpnServer] = {}
        self.exporters: dict[str, NodeExporter] = {}  # servers of PoPs with the load signal on
        self.agents: dict[str, AgentNode] = {}
        self.nocs: dict[str, tuple[socket.socket, subprocess.Popen[bytes]]] = {}
        self.prometheus: PrometheusNode | None = None  # in the noc node, when Debian's prometheus is installed
        self.whoami: dict[str, list[subprocess.Popen[bytes]]] = {}
        self.faults = Faults(self)
        self.owner_pid = os.getpid()
        self.supervised = False
        self._up = False
        self.phases: dict[str, float] = {}  # seconds from the start of up() to the end of each phase
        self.wg_ifnames = wireguard_ifnames(self.prefix, list(spec.vpns))

    @classmethod
    def from_file(cls, path: Path | str = REPO / "containerlab.yml", **kwargs: Any) -> Lab:
        return cls(load(Path(path)), **kwargs)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()

    # --- access -------------------------------------------------------------------------

    def ns(self, node: str) -> Netns:
        return self.namespaces[node]

    def router(self, name: str) -> FrrRouter:
        return self.routers[name]

    def pop(self, name: str) -> PopNode:
        return self.pops[name]

    def vpn(self, name: str) -> VpnServer:
        return self.vpns[name]

    def agent(self, name: str) -> AgentNode:
        return self.agents[name]

    @property
    def noc_url(self) -> str | None:
        """Where the fleet page is served on the host's loopback (None: the lab has no noc node)."""
        for sock, _ in self.nocs.values():
            return f"http://127.0.0.1:{sock.getsockname()[1]}/"
        return None

    def service_prefixes(self, pop: str) -> list[str]:
        """What users and agents reach a PoP by: its anycast prefixes and its beacons."""
        config = self.spec.pops[pop].config
        return [p.prefix for p in config.prefixes] + list(config.external.beacons)

    @property
    def anycast(self) -> str:
        """The first anycast prefix (the lab's topology has exactly one)."""
        return self.spec.anycast[0]

    def servers_of(self, target: str) -> list[VpnServer]:
        """A VPN server by name, or every server of a PoP."""
        if target in self.vpns:
            return [self.vpns[target]]
        if target in self.spec.pops:
            return [self.vpns[s.name] for s in self.spec.pops[target].config.servers]
        raise KeyError(f"{target!r} is neither a vpn nor a pop node")

    def pop_address(self, router: str, pop: str) -> str:
        """The address by which ``router`` reaches ``pop`` directly (its BGP next hop)."""
        for nbr in self.spec.routers[router].neighbors:
            if self.topology.owner_of(nbr.address) == pop:
                return nbr.address
        raise KeyError(f"router {router} has no session with {pop}")

    def nexthop_nodes(self, nexthops: Iterable[str]) -> set[str]:
        """Node names for kernel next hops (an address no node holds stays as it is)."""
        return {self.topology.owner_of(hop) or hop for hop in nexthops}

    def expected_nexthops(self, router: str) -> frozenset[str]:
        """With every PoP announcing, ``router`` forwards to all PoPs it peers with directly."""
        return frozenset(nbr.address for nbr in self.spec.routers[router].neighbors
                         if self.topology.owner_of(nbr.address) in self.spec.pops)

    def watch(self, router: str, prefix: str | None = None) -> RouteWatcher:
        """A RouteWatcher on ``router``'s kernel table: ``with lab.watch("r1") as watch: ...``."""
        return RouteWatcher(self.ns(router), prefix or self.anycast)

    @property
    def anycast_address(self) -> str:
        """The address clients connect to: the first anycast prefix's network address."""
        return str(ipaddress.ip_network(self.anycast).network_address)

    def pop_of(self, node: str | None) -> str | None:
        """The PoP a node belongs to: a VPN server's PoP, or the node itself."""
        return self.spec.vpns[node].pop if node is not None and node in self.spec.vpns else node

    # --- data path (lab.datapath) -------------------------------------------------------

    def ask(self, node: str, address: str | None = None, timeout: float = 1.0) -> str | None:
        """Which PoP answers ``node``'s TCP connection to the anycast address (None: nobody)."""
        return self.pop_of(self.ask_node(node, address, timeout))

    def ask_node(self, node: str, address: str | None = None, timeout: float = 1.0) -> str | None:
        """Which node answers ``node``'s TCP connection to the anycast address: a PoP or a server."""
        return datapath.ask_node(self.ns(node), address or self.anycast_address, timeout)

    def hold(self, node: str, count: int, timeout: float = 2.0) -> list[socket.socket]:
        """``count`` connections from ``node`` to the anycast address, kept open; see ``where``."""
        return datapath.hold(self.ns(node), self.anycast_address, count, timeout)

    where = staticmethod(datapath.where)

    def wait_answer(self, node: str, predicate: Callable[[str | None], bool] = lambda who: who is not None,
                    timeout: float = 10.0, interval: float = 0.05) -> tuple[str | None, float]:
        """Ask from ``node`` until the PoP answering satisfies ``predicate``: (answer, monotonic time)."""
        return datapath.wait_answer(lambda limit: self.ask(node, timeout=limit), predicate, timeout=timeout,
                                    interval=interval, what=f"{node}: anycast answer")

    # --- bring-up -----------------------------------------------------------------------

    def up(self, timeout: float = 60.0) -> float:
        """Build the lab and start every daemon; the seconds until routes converged."""
        if self._up:
            raise RuntimeError("lab is already up")
        if problems := self.preflight():
            raise RuntimeError("cannot run this lab here: " + "; ".join(problems))
        started = time.monotonic()
        self._up = True
        self.statedir.mkdir(parents=True, exist_ok=True)
        self.write_state()
        try:
            self._build_network()
            self.phases["network"] = time.monotonic() - started
            keydir = self.statedir / "keys"
            keydir.mkdir(mode=0o700, exist_ok=True)
            probe_private, probe_public = keypair()
            write_key(keydir / "probe.key", probe_private)
            # the agents' shared HMAC key, and each agent's own WireGuard probe key, which every
            # server lists as a peer (one key per agent: a server's replay protection rejects a
            # handshake older than the last one it saw from the same key)
            agents_key = keydir / "agents.key"
            agents_key.write_text(secrets.token_hex(32) + "\n")
            agents_key.chmod(0o600)
            peers = [probe_public]
            for name in self.spec.agents:
                agent_private, agent_public = keypair()
                write_key(keydir / f"{name}.key", agent_private)
                peers.append(agent_public)
            # `pop run` takes longest (ExaBGP validates, then starts the engine), so it goes
            # first; its checks see the servers once they are up, as after any restart
            for name in self.spec.pops:
                self._start_pop(name)
            with ThreadPoolExecutor(max_workers=8) as pool:
                jobs = [pool.submit(self._start_router, node) for node in self.topology.by_role("router")]
                jobs += [pool.submit(self._start_vpn, name, peers) for name in self.spec.vpns]
                for job in jobs:
                    job.result()
                for job in [pool.submit(self._start_agent, name) for name in self.spec.agents]:
                    job.result()
            for name in self.spec.nocs:
                self._start_noc(name)
            self.phases["daemons"] = time.monotonic() - started
            self.wait_converged(timeout=max(1.0, timeout - (time.monotonic() - started)))
            self.phases["converged"] = time.monotonic() - started
        except BaseException:
            self.down()
            raise
        return time.monotonic() - started

    def preflight(self) -> list[str]:
        """What this machine lacks for the topology's PoPs (IPVS for a PoP in ipvs mode)."""
        return [f"{name} runs dataplane mode ipvs, and this kernel has no IPVS (no /proc/net/ip_vs; "
                "run it under containerlab on a kernel with ip_vs, or see tests/kernel for IPVS in the microVM)"
                for name, spec in self.spec.pops.items()
                if spec.config.dataplane.mode == "ipvs" and not Path("/proc/net/ip_vs").exists()]

    def write_state(self, **extra: Any) -> None:
        state.write_state(self.statedir, {
            "prefix": self.prefix, "owner_pid": self.owner_pid, "supervised": self.supervised,
            "namespaces": [self.prefix + n for n in self.topology.nodes],
            "wg_ifnames": sorted(self.wg_ifnames.values()), "topology": self.topology.name,
            "statedir": str(self.statedir), **extra})

    def _build_network(self) -> None:
        for node in self.topology.nodes.values():
            ns = Netns(self.prefix + node.name)
            self.namespaces[node.name] = ns
            with ns.enter():
                # Reverse-path filtering would drop the replies that come back over the other
                # upstream of a dual-homed PoP; "all" and "default" must be off before links exist.
                for conf in ("all", "default"):
                    Path(f"/proc/sys/net/ipv4/conf/{conf}/rp_filter").write_text("0\n")
                if node.role in ("router", "pop"):
                    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        for link in self.topology.links:
            veth(self.ns(link.a.node), link.a.ifname, None, self.ns(link.b.node), link.b.ifname, None)
        for node in self.topology.nodes.values():
            self._exec(node)

    def _exec(self, node: Node) -> None:
        if node.exec:
            # one `ip -batch` per node instead of a process per command; order is kept
            script = "".join(" ".join(argv[1:]) + "\n" for argv in node.exec)
            self.ns(node.name).run("ip", "-batch", "-", input=script)

    def _start_router(self, node: Node) -> None:
        config = self.spec.routers[node.name]
        router = FrrRouter.from_config(self.ns(node.name), config, workdir=self.statedir / node.name)
        self.routers[node.name] = router
        router.start()

    def _start_vpn(self, name: str, peers: list[bytes]) -> None:
        spec = self.spec.vpns[name]
        ns = self.ns(name)
        workdir = self.statedir / name
        workdir.mkdir(parents=True, exist_ok=True)
        tcp = TcpService(ns, spec.address, spec.tcp_port, log=workdir / "tcp.log")
        wireguard = None
        if spec.wireguard_port is not None:
            # a PoP whose tier 2 goes through the tunnel: the server forwards and masquerades
            # what the probe sends from its tunnel address (the probe peer's allowed-ips)
            probe_tunnel = self.spec.pops[spec.pop].config.checks.wireguard.tunnel_address
            wireguard = WireGuardServer(ns, self.wg_ifnames[name], workdir, spec.wireguard_port,
                                        tunnel_address=SERVER_TUNNEL if probe_tunnel else None)
            key_file = self.topology.nodes[name].bind_source(WG_KEY)
            if key_file is not None:
                # the node's own key, so that the public key in its PoP's pop.yaml matches
                wireguard.private = wgkeys.decode_key(key_file.read_text())
                wireguard.public = wgkeys.public_key_of(wireguard.private)
            for index, public in enumerate(peers):  # peers[0] is the PoPs' probe key
                wireguard.add_peer(public, allowed_ips=f"{probe_tunnel}/32" if index == 0 and probe_tunnel else None)
            if probe_tunnel:
                ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
                ns.run("nft", "-f", "-", input=MASQUERADE)
        server = VpnServer(name, ns, tcp, wireguard)
        self.vpns[name] = server
        self._start_witness(name)
        server.start()
        load = self.spec.pops[spec.pop].config.load
        if load.enabled:
            # half a CPU per server: a burn reaches the top step even while the host is busy
            exporter = self.exporters[name] = NodeExporter(ns, name, spec.address, load.port, workdir, share=0.5)
            exporter.start()

    def _pop_document(self, name: str, changes: Mapping[str, Any] | None) -> dict[str, Any]:
        """The PoP's pop.yaml as written, with the run's paths (and ``changes``) merged in."""
        document = _merged(self.spec.pops[name].document, changes or {})
        document["pop"]["runtime_dir"] = str(self.statedir / name / "run")
        wg = document.get("checks", {}).get("wireguard")
        if isinstance(wg, dict) and wg.get("enabled"):
            wg["probe_key_file"] = str(self.statedir / "keys" / "probe.key")
        external = document.get("external")
        if isinstance(external, dict) and external.get("enabled"):
            external["key_file"] = str(self.statedir / "keys" / "agents.key")
        token = self.statedir / "keys" / "control.token"  # HTTP control's bearer token, one for the lab
        if not token.exists():
            write_token(token)
        document["control"] = {"token_file": str(token)}
        return document

    def _start_agent(self, name: str) -> None:
        document = copy.deepcopy(dict(self.spec.agents[name].document))
        document["key_file"] = str(self.statedir / "keys" / "agents.key")
        document["probe_key_file"] = str(self.statedir / "keys" / f"{name}.key")
        node = AgentNode(self.ns(name), document, self.statedir / name)
        self.agents[name] = node
        node.start()

    def _start_noc(self, name: str, port: int = NOC_PORT) -> None:
        """`pop noc` in the noc node, serving on a socket bound on the host's loopback: a browser
        on the host reaches the page, and no route joins the host and the lab (NOC_PORT, or any
        free port when another lab holds it)."""
        try:
            sock = socket.create_server(("127.0.0.1", port))
        except OSError:
            sock = socket.create_server(("127.0.0.1", 0))
        try:
            workdir = self.statedir / name
            workdir.mkdir(parents=True, exist_ok=True)
            config = self.topology.nodes[name].bind_source("/etc/pop/noc.yaml")
            pop = Path(sys.executable).parent / "pop"
            proc = self.ns(name).popen(str(pop), "noc", "-c", str(config), "--listen-fd", str(sock.fileno()),
                                       log=workdir / "noc.log", pass_fds=(sock.fileno(),))
        except BaseException:
            sock.close()
            raise
        self.nocs[name] = (sock, proc)
        if prometheus.available() and self.prometheus is None:
            fleet = self.spec.nocs[name]
            targets = [urllib.parse.urlsplit(target.url).netloc for target in fleet.pops]
            self.prometheus = PrometheusNode(self.ns(name), targets, self.statedir / name / "prometheus",
                                             fleet.listen)
            self.prometheus.start()

    def _start_pop(self, name: str) -> None:
        ns = self.ns(name)
        workdir = self.statedir / name
        node = PopNode(ns, self._pop_document(name, None), workdir)
        self.pops[name] = node
        self._start_witness(name)
        node.start()

    def _start_witness(self, name: str) -> None:
        """The who-am-I service on each anycast address ``name`` holds on lo (the data path's end);
        on a server of a PoP with tier 3, also `pop identity` there, for the agents' catchment map
        (a PoP in mode none answers that itself: ``external.identity_port``)."""
        log = self.statedir / name / "whoami.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        addresses = anycast_on_lo(self.topology.nodes[name], self.spec.anycast)
        self.whoami[name] = [self.ns(name).popen(sys.executable, str(WHOAMI), address, str(WHOAMI_PORT), name, log=log)
                             for address in addresses]
        vpn = self.spec.vpns.get(name)
        port = self.spec.pops[vpn.pop].config.external.identity_port if vpn is not None else 0
        pop = Path(sys.executable).parent / "pop"
        self.whoami[name] += [self.ns(name).popen(str(pop), "identity", "--pop", vpn.pop, "--server", name,
                                                  "--listen", f"{address}:{port}", log=log)
                              for address in addresses if vpn is not None and port]

    def restart_pop(self, name: str, changes: Mapping[str, Any] | None = None) -> float:
        """Restart ``pop run`` in a PoP with its pop.yaml merged with ``changes``.

        E.g. ``{"checks": {"wireguard": {"enabled": False}}}`` for an L4-only PoP; None goes
        back to the file as written. pop's loader checks the result before anything stops.
        Returns the monotonic time the new ``pop run`` started.
        """
        document = self._pop_document(name, changes)
        pop_config.load(yaml.safe_dump(document), f"{self.spec.pops[name].path} with {changes}")
        self.pops[name].stop()
        node = PopNode(self.ns(name), document, self.statedir / name)
        self.pops[name] = node
        node.start()
        return time.monotonic()

    def wait_converged(self, timeout: float = 60.0) -> float:
        """Wait until every PoP is announced and every router forwards to all its PoPs."""
        deadline = time.monotonic() + timeout
        pending: list[str] = []
        while time.monotonic() < deadline:
            for name, node in self.pops.items():
                if node.proc is not None and node.proc.poll() is not None:
                    raise RuntimeError(f"{name}: `pop run` exited with {node.proc.returncode}:\n{node.log_tail()}")
            # the kernel tables first: a netlink dump costs nothing, a /status request more
            pending = [f"{name}: {prefix} via {sorted(hops)}" for name in self.routers for prefix in self.spec.anycast
                       if not self.expected_nexthops(name) <= (hops := read_nexthops(self.ns(name), prefix))]
            # a PoP in ecmp mode routes to all of its servers
            pending += [f"{name}: {prefix} via {sorted(hops)}" for name, (table, servers) in self._ecmp().items()
                        for prefix in self.spec.anycast
                        if (hops := read_nexthops(self.ns(name), prefix, table)) != servers]
            if not pending:
                pending = [f"{name}: {engine}" for name in self.pops
                           if (engine := self.pop_status(name).get("state", "unreachable")) != "announced"]
            if not pending:
                return time.monotonic()
            time.sleep(0.05)
        raise TimeoutError("lab did not converge: " + "; ".join(pending) + "\n" + self.log_tails())

    def _ecmp(self) -> dict[str, tuple[int, frozenset[str]]]:
        """Each PoP in ecmp mode: its table and all its servers, the multipath route's full next-hop set."""
        return {name: (spec.config.dataplane.table, frozenset(server.address for server in spec.config.servers))
                for name, spec in self.spec.pops.items() if spec.config.dataplane.mode == "ecmp"}

    # --- status (lab.status) -----------------------------------------------------------

    def pop_status(self, name: str, timeout: float = 2.0) -> dict[str, Any]:
        """GET /status of a PoP's engine (``{}`` when it does not answer)."""
        return lab_status.pop_status(self.pops[name], timeout)

    def log_tails(self, lines: int = 15) -> str:
        return lab_status.log_tails(self.pops, self.routers, lines)

    def status(self) -> LabStatus:
        answers = []
        for node in self.topology.nodes.values():
            if node.role in ("client", "probe"):
                who = self.ask_node(node.name, timeout=0.5)
                answers.append((node.name, self.pop_of(who), who))
        return LabStatus(self.prefix, lab_status.router_routes(self.routers, self.spec.anycast, self.topology.owner_of),
                         lab_status.pop_verdicts(self.pops), tuple(str(f) for f in self.faults.active()),
                         tuple(answers))

    # --- teardown -----------------------------------------------------------------------

    def down(self) -> None:
        """Stop every daemon and remove every trace of the lab. Idempotent."""
        self.faults.stop_all()
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda agent: agent.stop(), list(self.agents.values())))
            for name, (sock, proc) in self.nocs.items():
                self.ns(name).stop(proc)
                sock.close()
            if self.prometheus is not None:
                self.prometheus.stop()
                self.prometheus = None
            # PoPs next, in parallel: each withdraws and closes its sessions on SIGTERM
            list(pool.map(lambda node: node.stop(timeout=5), list(self.pops.values())))
            list(pool.map(lambda router: router.stop(), list(self.routers.values())))
            list(pool.map(lambda vpn: vpn.stop(), list(self.vpns.values())))
            list(pool.map(lambda exporter: exporter.stop(), list(self.exporters.values())))
            list(pool.map(lambda ns: ns.close(), list(self.namespaces.values())))
        self.pops.clear()
        self.routers.clear()
        self.vpns.clear()
        self.exporters.clear()
        self.agents.clear()
        self.nocs.clear()
        self.whoami.clear()
        self.namespaces.clear()
        state.remove_leftovers(self.prefix, self.wg_ifnames.values(), self.statedir)
        self._up = False


def _merged(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
