"""Fault injection into a running lab, each fault with a timestamp and an undo.

Contract:

- ``lab.faults.apply(kind, target, **params) -> Fault``; ``Fault.at`` is the
  ``time.monotonic()`` right after the fault took effect (the process is dead and reaped,
  the nftables table is committed), ``Fault.began`` the moment just before it was injected.
  ``undo(fault) -> float`` reverts it and returns when the revert took effect; undoing twice
  is an error. ``clear()`` undoes every active fault, newest first.
- Kinds and targets (a *server target* is a vpn node, or a pop node meaning all its servers):

  ==================  =================  ===================================================
  kind                target             effect (undo)
  ==================  =================  ===================================================
  server-down         server target      TCP service and wireguard-go stopped: connections
                                         refused, ICMP port unreachable (both started again)
  wireguard-down      server target      only wireguard-go stopped: "alive but useless"
  forward-break       server target      the server's forwarding switched off
                                         (net.ipv4.ip_forward=0): its handshake still
                                         succeeds, nothing reaches the internet through it
                                         (forwarding on again)
  loss                link target        ``percent`` (1..100) of packets dropped in each
                                         direction, by nftables ``numgen random`` (rules gone)
  blackhole           link target        every packet dropped silently in each direction
  flap                server target      a background thread takes the servers down for
                                         ``down`` s and up for ``period - down`` s, over and
                                         over; ``Fault.transitions`` lists (time, "down"/"up")
                                         (thread stopped, servers left up)
  exabgp-kill         pop node           SIGKILL to ExaBGP; ``pop run`` exits with it
                                         (``pop run`` started again)
  engine-kill         pop node           SIGKILL to the engine; ExaBGP respawns it by itself
                                         (undo waits for the new engine's /status)
  pop-stop            pop node           SIGTERM to ``pop run``: a graceful stop (started again)
  pop-restart         pop node           SIGUSR2 to ``pop run``: a planned restart in place
                                         (graceful restart; undo waits for the new engine's
                                         /status)
  router-down         router node        FRR's bgpd and zebra stopped (started again)
  cut-off             pop node           the PoP's upstream routers drop every forwarded
                                         packet to or from its anycast prefixes and beacons:
                                         users and agents cannot reach it, while its BGP
                                         sessions, its servers and its own checks stay green
                                         (nftables forward rules removed)
  agent-kill          probe node         SIGKILL to the probe agent (started again)
  agent-blind         probe node         the agent's upstream drops what the agent sends to
                                         any PoP's anycast prefixes and beacons: it reaches
                                         no PoP, while the PoPs still pull its reports
                                         (rules removed)
  agent-replay        probe node         the agent replaced by lab.liar replaying a report
  agent-stale                            it signed earlier / a correctly signed report dated
  agent-forged                           a minute ago / a fresh report signed with a wrong
                                         key, each saying every PoP is unreachable
                                         (the real agent started again)
  ==================  =================  ===================================================

  A *link target* is a link end ``node:ifname`` (that link), a vpn node (its links: its side
  of the check path), a pop node (every link toward its servers: the PoP's check path) or a
  probe node (its uplinks: the agent's own network broken).
  There is no netem in this kernel: nftables drops each direction where it arrives (prerouting
  of the receiving end, so that senders see silence, never an error), each fault in its own
  table ``inet poplab_f<id>`` per namespace, so that an undo removes exactly it.
- The lab's supervisor owns the daemons, so faults run in the process that holds the ``Lab``;
  the CLI reaches them through the supervisor (``python -m lab fault ...``).
- ``Faults`` sees the lab only through ``FaultableLab`` (``lab.runner.Lab`` is one), so this
  module does not depend on the runner that owns it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from lab.status import pop_status

if TYPE_CHECKING:
    from lab.frr import FrrRouter
    from lab.netns import Netns
    from lab.popnode import PopNode
    from lab.topology import Topology

PARAMS = {"loss": {"percent"}, "flap": {"period", "down"}}  # every other kind takes none
KINDS = ("server-down", "wireguard-down", "forward-break", "loss", "blackhole", "flap", "exabgp-kill", "engine-kill",
         "pop-stop", "pop-restart", "router-down", "cut-off", "agent-kill", "agent-blind", "agent-replay",
         "agent-stale", "agent-forged")


class FaultError(ValueError):
    pass


class FaultableServer(Protocol):
    """A VPN server as faults stop and start it (``lab.runner.VpnServer``)."""

    @property
    def wireguard(self) -> object | None: ...  # None: the server runs no wireguard-go

    def start(self) -> None: ...

    def stop(self, *, wireguard_only: bool = False) -> None: ...

    def set_forwarding(self, on: bool) -> None: ...


class FaultableAgent(Protocol):
    """A probe agent as faults kill, replace and start it (``lab.agentnode.AgentNode``)."""

    def start(self) -> None: ...

    def kill(self) -> None: ...

    def lie(self, mode: str) -> None: ...


class FaultableLab(Protocol):
    """What ``Faults`` needs from the lab it injects faults into (``lab.runner.Lab``)."""

    @property
    def topology(self) -> Topology: ...

    @property
    def pops(self) -> Mapping[str, PopNode]: ...

    @property
    def routers(self) -> Mapping[str, FrrRouter]: ...

    def ns(self, node: str) -> Netns: ...

    @property
    def agents(self) -> Mapping[str, FaultableAgent]: ...

    def servers_of(self, target: str) -> Sequence[FaultableServer]:
        """A VPN server by name, or every server of a PoP; KeyError for any other name."""
        ...

    def service_prefixes(self, pop: str) -> list[str]:
        """A PoP's anycast prefixes and beacons."""
        ...


@dataclass
class Fault:
    id: int
    kind: str
    target: str
    params: Mapping[str, float]
    began: float
    at: float
    undone_at: float | None = None
    transitions: list[tuple[float, str]] = field(default_factory=list)
    _undo: Callable[[], float] | None = field(default=None, repr=False)

    def __str__(self) -> str:
        extra = "".join(f" {key}={value:g}" for key, value in self.params.items())
        return f"#{self.id} {self.kind} {self.target}{extra}"

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "target": self.target, "params": dict(self.params),
                "began": self.began, "at": self.at, "undone_at": self.undone_at,
                "transitions": [list(t) for t in self.transitions]}


class Faults:
    def __init__(self, lab: FaultableLab) -> None:
        self.lab = lab
        self._lock = threading.Lock()
        self._next_id = 1
        self._active: dict[int, Fault] = {}
        self._flappers: dict[int, tuple[threading.Event, threading.Thread]] = {}

    def active(self) -> list[Fault]:
        with self._lock:
            return list(self._active.values())

    def get(self, fault_id: int) -> Fault:
        with self._lock:
            if fault_id not in self._active:
                raise FaultError(f"no active fault #{fault_id}")
            return self._active[fault_id]

    def apply(self, kind: str, target: str, **params: float) -> Fault:
        handlers: dict[str, Callable[[Fault], Callable[[], float]]] = {
            "server-down": lambda f: self._server_down(f, wireguard_only=False),
            "wireguard-down": lambda f: self._server_down(f, wireguard_only=True),
            "forward-break": self._forward_break,
            "loss": self._loss, "blackhole": self._loss, "flap": self._flap,
            "exabgp-kill": self._exabgp_kill, "engine-kill": self._engine_kill,
            "pop-stop": self._pop_stop, "pop-restart": self._pop_restart, "router-down": self._router_down,
            "cut-off": self._cut_off, "agent-kill": self._agent_kill, "agent-blind": self._agent_blind,
            "agent-replay": self._agent_lie, "agent-stale": self._agent_lie, "agent-forged": self._agent_lie,
        }
        if kind not in handlers:
            raise FaultError(f"unknown fault kind {kind!r}; one of {', '.join(KINDS)}")
        if unknown := set(params) - PARAMS.get(kind, set()):
            raise FaultError(f"{kind}: no parameter {', '.join(sorted(unknown))} "
                             f"(takes: {', '.join(sorted(PARAMS.get(kind, set()))) or 'none'})")
        with self._lock:
            fault_id = self._next_id
            self._next_id += 1
        fault = Fault(fault_id, kind, target, dict(params), began=time.monotonic(), at=0.0)
        fault._undo = handlers[kind](fault)
        if not fault.at:
            fault.at = time.monotonic()
        with self._lock:
            self._active[fault_id] = fault
        return fault

    def undo(self, fault: Fault | int) -> float:
        fault = self.get(fault if isinstance(fault, int) else fault.id)
        with self._lock:
            self._active.pop(fault.id, None)
        assert fault._undo is not None
        fault.undone_at = fault._undo()
        return fault.undone_at

    def clear(self) -> list[Fault]:
        undone = []
        for fault in sorted(self.active(), key=lambda f: f.id, reverse=True):
            self.undo(fault)
            undone.append(fault)
        return undone

    def stop_all(self) -> None:
        """Stop the flapping threads without reverting anything (the lab is being torn down)."""
        with self._lock:
            flappers = list(self._flappers.values())
            self._flappers.clear()
            self._active.clear()
        for stop, _ in flappers:
            stop.set()
        for _, thread in flappers:
            # joined, so that no server is started again behind the teardown's back
            thread.join(30)

    # --- servers ------------------------------------------------------------------------

    def _servers(self, target: str, *, wireguard: bool = False) -> Sequence[FaultableServer]:
        try:
            servers = self.lab.servers_of(target)
        except KeyError as exc:
            raise FaultError(str(exc.args[0])) from None
        if wireguard and any(s.wireguard is None for s in servers):
            raise FaultError(f"{target}: a server without wireguard-go")
        return servers

    def _server_down(self, fault: Fault, *, wireguard_only: bool) -> Callable[[], float]:
        servers = self._servers(fault.target, wireguard=wireguard_only)
        for server in servers:
            server.stop(wireguard_only=wireguard_only)

        def undo() -> float:
            for server in servers:
                server.start()
            return time.monotonic()
        return undo

    def _forward_break(self, fault: Fault) -> Callable[[], float]:
        servers = self._servers(fault.target, wireguard=True)
        for server in servers:
            server.set_forwarding(False)

        def undo() -> float:
            for server in servers:
                server.set_forwarding(True)
            return time.monotonic()
        return undo

    def _flap(self, fault: Fault) -> Callable[[], float]:
        servers = self._servers(fault.target)
        period = float(fault.params.get("period", 4.0))
        down = float(fault.params.get("down", period / 2))
        if not 0 < down < period:
            raise FaultError(f"flap: need 0 < down ({down}) < period ({period})")
        stop = threading.Event()
        first = threading.Event()
        failure: list[BaseException] = []
        origin: list[float] = []  # when the schedule starts: the first stop begins

        def run() -> None:
            try:
                cycle_servers()
            except BaseException as exc:  # surfaced by undo(), never lost in the thread
                failure.append(exc)
                first.set()

        def cycle_servers() -> None:
            start = time.monotonic()
            origin.append(start)
            cycle = 0
            while not stop.is_set():
                for server in servers:
                    server.stop()
                fault.transitions.append((time.monotonic(), "down"))
                first.set()
                # an absolute schedule: the time servers take to start must not stretch it
                if stop.wait(max(0.0, start + cycle * period + down - time.monotonic())):
                    break
                for server in servers:
                    server.start()
                fault.transitions.append((time.monotonic(), "up"))
                cycle += 1
                stop.wait(max(0.0, start + cycle * period - time.monotonic()))

        thread = threading.Thread(target=run, name=f"flap {fault.target}", daemon=True)
        with self._lock:
            self._flappers[fault.id] = (stop, thread)
        thread.start()
        first.wait(10)
        # the schedule's origin: stopping the servers takes a while, and the later transitions
        # keep to the schedule, not to the end of that first stop
        fault.at = origin[0] if origin else time.monotonic()

        def undo() -> float:
            stop.set()
            thread.join(30)
            with self._lock:
                self._flappers.pop(fault.id, None)
            if failure:
                raise RuntimeError(f"flap {fault.target} failed") from failure[0]
            if not fault.transitions or fault.transitions[-1][1] == "down":
                for server in servers:
                    server.start()
                fault.transitions.append((time.monotonic(), "up"))
            return fault.transitions[-1][0]
        return undo

    # --- packets ------------------------------------------------------------------------

    def link_ends(self, target: str) -> list[tuple[str, str]]:
        """(node, ifname) pairs a link target means."""
        topology = self.lab.topology
        if ":" in target:
            node, _, ifname = target.partition(":")
            if not any(str(end) == target for link in topology.links for end in (link.a, link.b)):
                raise FaultError(f"{target}: no link has this end")
            return [(node, ifname)]
        if target not in topology.nodes or topology.nodes[target].role not in ("pop", "vpn", "probe"):
            raise FaultError(f"{target}: name a link end (node:ifname), a vpn, pop or probe node")
        ends = []
        for link in topology.links:
            for mine, other in ((link.a, link.b), (link.b, link.a)):
                # a probe's links lead to routers; a pop's or vpn's to each other (the check path)
                wanted = ("router",) if topology.nodes[target].role == "probe" else ("vpn", "pop")
                if mine.node == target and topology.nodes[other.node].role in wanted:
                    ends.append((mine.node, mine.ifname))
        return ends

    def upstreams(self, node: str) -> list[tuple[str, str]]:
        """(router, the router's ifname toward ``node``) for every router ``node`` is linked to."""
        topology = self.lab.topology
        return [(other.node, other.ifname) for link in topology.links
                for mine, other in ((link.a, link.b), (link.b, link.a))
                if mine.node == node and topology.nodes[other.node].role == "router"]

    def _nft(self, fault: Fault, scripts: Mapping[str, str]) -> Callable[[], float]:
        """Commit one table per namespace; the undo deletes exactly those tables."""
        fault.began = time.monotonic()
        for node, script in scripts.items():
            self.lab.ns(node).run("nft", "-f", "-", input=script)

        def undo() -> float:
            for node in scripts:
                self.lab.ns(node).run("nft", "delete", "table", "inet", f"poplab_f{fault.id}", check=False)
            return time.monotonic()
        return undo

    @staticmethod
    def _match(prefixes: Sequence[str], field: str) -> list[str]:
        """nftables matches of ``field`` (saddr/daddr) against the prefixes, one per family."""
        v4 = [p for p in prefixes if ":" not in p]
        v6 = [p for p in prefixes if ":" in p]
        return ([f"ip {field} {{ {', '.join(v4)} }}"] if v4 else []) + \
               ([f"ip6 {field} {{ {', '.join(v6)} }}"] if v6 else [])

    def _cut_off(self, fault: Fault) -> Callable[[], float]:
        self._pop_node(fault.target)
        prefixes = self.lab.service_prefixes(fault.target)
        scripts: dict[str, str] = {}
        for router, ifname in self.upstreams(fault.target):
            rules = "".join(f'    oifname "{ifname}" {m} drop\n' for m in self._match(prefixes, "daddr"))
            rules += "".join(f'    iifname "{ifname}" {m} drop\n' for m in self._match(prefixes, "saddr"))
            scripts[router] = (f"table inet poplab_f{fault.id} {{\n"
                               "  chain cut { type filter hook forward priority 0; policy accept;\n"
                               f"{rules}  }}\n}}\n")
        if not scripts:
            raise FaultError(f"{fault.target}: no upstream router to cut it off at")
        return self._nft(fault, scripts)

    # --- probe agents -------------------------------------------------------------------

    def _agent(self, target: str) -> FaultableAgent:
        if target not in self.lab.agents:
            raise FaultError(f"{target}: not a probe node that runs an agent")
        return self.lab.agents[target]

    def _agent_kill(self, fault: Fault) -> Callable[[], float]:
        agent = self._agent(fault.target)
        fault.began = time.monotonic()
        agent.kill()

        def undo() -> float:
            agent.start()
            return time.monotonic()
        return undo

    def _agent_lie(self, fault: Fault) -> Callable[[], float]:
        agent = self._agent(fault.target)
        agent.lie(fault.kind.removeprefix("agent-"))

        def undo() -> float:
            agent.start()
            return time.monotonic()
        return undo

    def _agent_blind(self, fault: Fault) -> Callable[[], float]:
        self._agent(fault.target)
        prefixes = [p for pop in self.lab.pops for p in self.lab.service_prefixes(pop)]
        scripts = {router: (f"table inet poplab_f{fault.id} {{\n"
                            "  chain pre { type filter hook prerouting priority raw; policy accept;\n"
                            + "".join(f'    iifname "{ifname}" {m} drop\n' for m in self._match(prefixes, "daddr"))
                            + "  }\n}\n")
                   for router, ifname in self.upstreams(fault.target)}
        return self._nft(fault, scripts)

    def _peer_end(self, node: str, ifname: str) -> tuple[str, str]:
        for link in self.lab.topology.links:
            for mine, other in ((link.a, link.b), (link.b, link.a)):
                if (mine.node, mine.ifname) == (node, ifname):
                    return other.node, other.ifname
        raise FaultError(f"{node}:{ifname}: no link has this end")

    def _loss(self, fault: Fault) -> Callable[[], float]:
        percent = 100.0 if fault.kind == "blackhole" else float(fault.params.get("percent", 0))
        if not 0 < percent <= 100 or percent != int(percent):
            raise FaultError(f"loss: percent must be a whole number 1..100, not {percent:g}")
        match = "" if percent == 100 else f"numgen random mod 100 < {int(percent)} "
        table = f"poplab_f{fault.id}"
        # Each direction is dropped where it *arrives*: a drop on the sender's own output path
        # would fail its send() with EPERM, which no real loss does; arriving packets vanish.
        by_node: dict[str, list[str]] = {}
        for node, ifname in self.link_ends(fault.target):
            for end_node, end_ifname in ((node, ifname), self._peer_end(node, ifname)):
                by_node.setdefault(end_node, []).append(end_ifname)
        scripts = {}
        for node, ifnames in by_node.items():
            rules = "".join(f'    iifname "{i}" {match}drop\n' for i in ifnames)
            scripts[node] = (f"table inet {table} {{\n"
                             f"  chain pre {{ type filter hook prerouting priority raw; policy accept;\n"
                             f"{rules}  }}\n}}\n")
        return self._nft(fault, scripts)

    # --- daemons ------------------------------------------------------------------------

    def _pop_node(self, target: str) -> PopNode:
        if target not in self.lab.pops:
            raise FaultError(f"{target}: not a pop node")
        return self.lab.pops[target]

    def _restart_pop(self, target: str) -> Callable[[], float]:
        def undo() -> float:
            node = self._pop_node(target)
            node.stop()  # reaps a `pop run` that already exited
            node.start()
            return time.monotonic()
        return undo

    def _exabgp_kill(self, fault: Fault) -> Callable[[], float]:
        node = self._pop_node(fault.target)
        pid = node.exabgp_pid()
        fault.began = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        fault.at = time.monotonic()
        fault.params = {**fault.params, "pid": pid}
        return self._restart_pop(fault.target)

    def _engine_kill(self, fault: Fault) -> Callable[[], float]:
        node = self._pop_node(fault.target)
        fault.began = time.monotonic()
        pid = node.kill_engine()
        fault.at = time.monotonic()
        fault.params = {**fault.params, "pid": pid}
        return lambda: self._wait_new_engine(node, pid, 20, "ExaBGP did not respawn the engine")

    @staticmethod
    def _wait_new_engine(node: PopNode, old: int, timeout: float, problem: str) -> float:
        """When an engine other than ``old`` answers /status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                if node.engine_pid() != old and pop_status(node):
                    return time.monotonic()
            time.sleep(0.05)
        raise TimeoutError(f"{node.name}: {problem}\n{node.log_tail()}")

    def _pop_stop(self, fault: Fault) -> Callable[[], float]:
        node = self._pop_node(fault.target)
        fault.began = time.monotonic()
        node.stop()
        return self._restart_pop(fault.target)

    def _pop_restart(self, fault: Fault) -> Callable[[], float]:
        node = self._pop_node(fault.target)
        old = node.engine_pid()
        fault.began = node.restart()
        fault.params = {**fault.params, "pid": old}
        return lambda: self._wait_new_engine(node, old, 30, "no new engine 30 s after the restart")

    def _router_down(self, fault: Fault) -> Callable[[], float]:
        if fault.target not in self.lab.routers:
            raise FaultError(f"{fault.target}: not a router node")
        router = self.lab.routers[fault.target]
        router.stop()

        def undo() -> float:
            router.start()
            return time.monotonic()
        return undo
