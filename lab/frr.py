"""FRR routers (zebra + bgpd) inside a lab namespace, driven through vtysh.

Contract:

- ``FrrRouter(...).render_config()`` is pure: the bgpd configuration text. The lab defaults
  are part of it and tested by a golden file: ``no bgp ebgp-requires-policy`` (FRR 8.4
  otherwise drops every eBGP route), ``no bgp network import-check`` (``networks`` are
  announced whether or not a matching route exists), ``bgp bestpath as-path multipath-relax``
  and ``maximum-paths`` (ECMP across peers with different ASNs, i.e. PoPs), advertisement
  interval 0 and a short connect retry (convergence is what the lab measures). With
  ``graceful_shutdown_in`` the router honours RFC 8326 as operators configure it: a route-map
  on every session's received routes sets LOCAL_PREF 0 on those carrying GRACEFUL_SHUTDOWN
  (65535:0), so a peer draining its routes loses the best path before it withdraws. (FRR's
  ``bgp graceful-shutdown`` is the other side: the router-wide switch that drains the
  router's own routes; the lab leaves it off.)
- ``start()`` enables forwarding inside the namespace, then runs zebra and bgpd as foreground
  children of the namespace (never daemonised, so that stop() reaps them) with their own pid
  files, zserv socket and vty socket directory, and no TCP vty (``-P 0``); it returns once
  vtysh gets answers from both. ``stop()`` stops bgpd (which sends a Cease to its peers) and
  then zebra (which removes its kernel routes).
- Files: configs, pid files and sockets live in ``<ns.rundir>/frr-<name>``, owned by user
  ``frr`` because the daemons drop to it before they open any of them; the daemons' logs
  (``zebra.log``, ``bgpd.log``) and a copy of each config go to ``workdir`` for humans.
- Every value spliced into the config is validated first (addresses, ASNs, prefixes, no
  control characters), so a bad argument fails here, not as a half-loaded FRR.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lab.netns import RUN_ROOT, Netns, run_host
from lab.routewatch import read_nexthops

FRR_LIBEXEC = Path("/usr/lib/frr")
ZEBRA = FRR_LIBEXEC / "zebra"
BGPD = FRR_LIBEXEC / "bgpd"
VTYSH = "vtysh"
FRR_USER = "frr"
LOG_LEVEL = "informational"

Family = Literal["ipv4", "ipv6"]

GSHUT_ROUTE_MAP = "GSHUT-IN"
# RFC 8326 on the receiving side, as FRR's documentation configures it; no `exit` lines, so the
# file's only "exit" is the one closing `router bgp` (lab.topology.parse_frr splits there)
GSHUT_POLICY = [
    "bgp community-list standard GSHUT permit graceful-shutdown",
    "!",
    f"route-map {GSHUT_ROUTE_MAP} permit 10",
    " match community GSHUT",
    " set local-preference 0",
    "!",
    f"route-map {GSHUT_ROUTE_MAP} permit 20",
    "!",
]


def _check_text(what: str, value: str) -> None:
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError(f"{what}: control character in {value!r}")


def _family_of(address: str) -> Family:
    return "ipv4" if ipaddress.ip_address(address).version == 4 else "ipv6"


@dataclass(frozen=True)
class BgpNeighbor:
    """One BGP peer of an FrrRouter.

    ``keepalive``/``hold_time`` None means FRR's defaults (60/180 s); if only ``hold_time`` is
    given, keepalive is a third of it. ``connect_retry`` defaults to 1 s (FRR's own is 120 s,
    far too slow to reconnect to a restarted ExaBGP). ``families`` defaults to the family of
    ``address``; list both to carry IPv6 prefixes over an IPv4 session or vice versa.
    """

    address: str
    remote_as: int
    description: str = ""
    passive: bool = False
    hold_time: int | None = None
    keepalive: int | None = None
    connect_retry: int | None = 1
    families: tuple[Family, ...] = ()

    def __post_init__(self) -> None:
        ipaddress.ip_address(self.address)
        if not 1 <= self.remote_as <= 0xFFFFFFFF:
            raise ValueError(f"neighbor {self.address}: remote_as {self.remote_as} out of range")
        _check_text(f"neighbor {self.address}: description", self.description)
        if self.hold_time is not None and self.hold_time != 0 and self.hold_time < 3:
            raise ValueError(f"neighbor {self.address}: hold_time must be 0 or at least 3 s")
        if self.keepalive is not None and self.hold_time is None:
            raise ValueError(f"neighbor {self.address}: keepalive needs hold_time")
        for family in self.families:
            if family not in ("ipv4", "ipv6"):
                raise ValueError(f"neighbor {self.address}: unknown family {family!r}")

    @property
    def active_families(self) -> tuple[Family, ...]:
        return self.families or (_family_of(self.address),)

    @property
    def timers(self) -> tuple[int, int] | None:
        if self.hold_time is None:
            return None
        keepalive = self.keepalive if self.keepalive is not None else self.hold_time // 3
        return keepalive, self.hold_time


class FrrError(RuntimeError):
    pass


@dataclass(frozen=True)
class BgpConfig:
    """What an FrrRouter's bgpd is configured with; ``render()`` is the config text (pure)."""

    name: str
    asn: int
    router_id: str
    neighbors: tuple[BgpNeighbor, ...]
    networks: tuple[str, ...] = ()
    maximum_paths: int = 8
    extra_config: str = ""
    graceful_shutdown_in: bool = False  # received 65535:0 -> local-preference 0 (RFC 8326)
    add_paths: bool = False  # send every path, not only the best, to every neighbor (RFC 7911)

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"router name {self.name!r}: letters, digits, '-' and '_' only")
        if not 1 <= self.asn <= 0xFFFFFFFF:
            raise ValueError(f"router {self.name}: asn {self.asn} out of range")
        if ipaddress.ip_address(self.router_id).version != 4:
            raise ValueError(f"router {self.name}: router_id must be an IPv4 address")
        if not 1 <= self.maximum_paths <= 64:
            raise ValueError(f"router {self.name}: maximum_paths must be 1..64")
        for net in self.networks:
            ipaddress.ip_network(net)
        _check_text(f"router {self.name}: extra_config", self.extra_config.replace("\n", " "))

    def render(self) -> str:
        lines = [
            "frr defaults traditional",
            f"hostname {self.name}",
            "log timestamp precision 6",
            "!",
        ]
        if self.graceful_shutdown_in:
            lines += GSHUT_POLICY
        lines += [
            f"router bgp {self.asn}",
            f" bgp router-id {self.router_id}",
            " no bgp ebgp-requires-policy",
            " no bgp network import-check",
            " no bgp default ipv4-unicast",
            " bgp bestpath as-path multipath-relax",
        ]
        for nbr in self.neighbors:
            lines.append(f" neighbor {nbr.address} remote-as {nbr.remote_as}")
            if nbr.description:
                lines.append(f" neighbor {nbr.address} description {nbr.description}")
            if nbr.passive:
                lines.append(f" neighbor {nbr.address} passive")
            if nbr.timers is not None:
                lines.append(f" neighbor {nbr.address} timers {nbr.timers[0]} {nbr.timers[1]}")
            if nbr.connect_retry is not None:
                lines.append(f" neighbor {nbr.address} timers connect {nbr.connect_retry}")
            lines.append(f" neighbor {nbr.address} advertisement-interval 0")
        for family in ("ipv4", "ipv6"):
            networks = [str(ipaddress.ip_network(net)) for net in self.networks
                        if _family_of(net.split("/")[0]) == family]
            peers = [nbr for nbr in self.neighbors if family in nbr.active_families]
            if not networks and not peers:
                continue
            lines += [" !", f" address-family {family} unicast"]
            lines += [f"  network {net}" for net in networks]
            lines += [f"  neighbor {nbr.address} activate" for nbr in peers]
            if self.graceful_shutdown_in:
                lines += [f"  neighbor {nbr.address} route-map {GSHUT_ROUTE_MAP} in" for nbr in peers]
            if self.add_paths:
                lines += [f"  neighbor {nbr.address} addpath-tx-all-paths" for nbr in peers]
            lines += [f"  maximum-paths {self.maximum_paths}",
                      f"  maximum-paths ibgp {self.maximum_paths}",
                      " exit-address-family"]
        lines += ["exit", "!"]
        if self.extra_config.strip():
            lines += [self.extra_config.strip("\n"), "!"]
        return "\n".join(lines) + "\n"


class FrrRouter:
    # The positional order is the lab API other modules already code against.
    def __init__(self, ns: Netns, name: str, asn: int, router_id: str,  # noqa: PLR0917
                 neighbors: Sequence[BgpNeighbor], networks: Sequence[str] = (), *,
                 workdir: Path, maximum_paths: int = 8, extra_config: str = "",
                 graceful_shutdown_in: bool = False, add_paths: bool = False) -> None:
        self.config = BgpConfig(name, asn, router_id, tuple(neighbors), tuple(networks),
                                maximum_paths, extra_config, graceful_shutdown_in, add_paths)
        self.ns = ns
        self.name = name
        self.asn = asn
        self.workdir = workdir
        self.rundir = RUN_ROOT / ns.name / f"frr-{name}"
        self._zebra: subprocess.Popen[bytes] | None = None
        self._bgpd: subprocess.Popen[bytes] | None = None

    @classmethod
    def from_config(cls, ns: Netns, config: BgpConfig, *, workdir: Path) -> FrrRouter:
        return cls(ns, config.name, config.asn, config.router_id, config.neighbors, config.networks,
                   workdir=workdir, maximum_paths=config.maximum_paths, extra_config=config.extra_config,
                   graceful_shutdown_in=config.graceful_shutdown_in, add_paths=config.add_paths)

    def __repr__(self) -> str:
        return f"FrrRouter({self.name!r}, asn={self.asn}, ns={self.ns.name!r})"

    def render_config(self) -> str:
        """The bgpd configuration (pure)."""
        return self.config.render()

    def render_zebra_config(self) -> str:
        return f"hostname {self.name}\nlog timestamp precision 6\n!\n"

    @property
    def running(self) -> bool:
        return any(p is not None and p.poll() is None for p in (self._zebra, self._bgpd))

    def start(self, timeout: float = 15.0) -> None:
        if self.running:
            raise FrrError(f"{self!r} already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.rundir = self.ns.rundir / f"frr-{self.name}"  # Netns.rundir creates the parent
        shutil.rmtree(self.rundir, ignore_errors=True)
        self.rundir.mkdir(mode=0o750)
        frr = pwd.getpwnam(FRR_USER)
        os.chown(self.rundir, frr.pw_uid, frr.pw_gid)
        for daemon, text in (("zebra", self.render_zebra_config()), ("bgpd", self.render_config())):
            (self.workdir / f"{daemon}.conf").write_text(text)
            path = self.rundir / f"{daemon}.conf"
            path.write_text(text)
            os.chown(path, frr.pw_uid, frr.pw_gid)
        self.ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        deadline = time.monotonic() + timeout
        self._zebra = self._spawn("zebra", ZEBRA)
        self._wait_vty("zebra", self._zebra, deadline)
        self._bgpd = self._spawn("bgpd", BGPD)
        self._wait_vty("bgpd", self._bgpd, deadline)
        # The daemons read their config before their vty answers, so any complaint is logged.
        if errors := self.config_errors():
            self.stop()
            raise FrrError(f"{self!r}: FRR rejected configuration lines:\n" + "\n".join(errors))

    def config_errors(self) -> list[str]:
        """Lines in which zebra or bgpd complained about their configuration file."""
        errors: list[str] = []
        for daemon in ("zebra", "bgpd"):
            path = self.workdir / f"{daemon}.log"
            if path.exists():
                errors += [f"{daemon}: {line}" for line in path.read_text(errors="replace").splitlines()
                           if "on config line" in line or "vty_read_config" in line]
        return errors

    def _spawn(self, daemon: str, binary: Path) -> subprocess.Popen[bytes]:
        run = self.rundir
        argv = [str(binary), "-f", str(run / f"{daemon}.conf"), "-i", str(run / f"{daemon}.pid"),
                "-z", str(run / "zserv.api"), "--vty_socket", str(run), "-P", "0",
                "--log", "stdout", "--log-level", LOG_LEVEL]
        return self.ns.popen(*argv, log=self.workdir / f"{daemon}.log")

    def _wait_vty(self, daemon: str, proc: subprocess.Popen[bytes], deadline: float) -> None:
        while True:
            if proc.poll() is not None:
                raise FrrError(f"{self!r}: {daemon} exited with {proc.returncode}:\n{self.log_tail(daemon)}")
            answer = run_host([VTYSH, "--vty_socket", str(self.rundir), "-d", daemon, "-c", "show version"],
                              check=False, timeout=5)
            if answer.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise FrrError(f"{self!r}: {daemon} vty not answering: {answer.stderr.strip()}\n"
                               f"{self.log_tail(daemon)}")
            time.sleep(0.05)

    def log_tail(self, daemon: str, lines: int = 30) -> str:
        path = self.workdir / f"{daemon}.log"
        if not path.exists():
            return f"({path} missing)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def vtysh(self, *commands: str, daemon: str | None = None) -> str:
        """Run vtysh commands in order (e.g. "configure terminal", "router bgp 65001", ...)."""
        for command in commands:
            _check_text("vtysh command", command)
        argv = [VTYSH, "--vty_socket", str(self.rundir)]
        if daemon is not None:
            argv += ["-d", daemon]
        for command in commands:
            argv += ["-c", command]
        return run_host(argv, timeout=15).stdout

    def vtysh_json(self, command: str) -> Any:
        return json.loads(self.vtysh(command) or "{}")

    def _network_command(self, prefix: str, negate: bool) -> None:
        network = ipaddress.ip_network(prefix)
        family = "ipv4" if network.version == 4 else "ipv6"
        self.vtysh("configure terminal", f"router bgp {self.asn}", f"address-family {family} unicast",
                   f"{'no ' if negate else ''}network {network}", daemon="bgpd")

    def announce(self, prefix: str) -> None:
        """Add ``network prefix`` to the running bgpd (announced to every active peer)."""
        self._network_command(prefix, negate=False)

    def withdraw(self, prefix: str) -> None:
        """Remove ``network prefix`` from the running bgpd (withdrawn from every peer)."""
        self._network_command(prefix, negate=True)

    def neighbor_state(self, peer: str) -> str:
        """The BGP FSM state of the session to ``peer`` ("Established", "Active", ...)."""
        address = str(ipaddress.ip_address(peer))
        data = self.vtysh_json(f"show bgp neighbors {address} json")
        return str(data.get(address, {}).get("bgpState", "Unknown"))

    def updates_received(self, peer: str) -> int:
        """BGP UPDATE messages bgpd has received from ``peer`` in this session (FRR's
        messageStats): a re-announcement of an unchanged route counts too, which the kernel
        route table would not show."""
        address = str(ipaddress.ip_address(peer))
        data = self.vtysh_json(f"show bgp neighbors {address} json")
        return int(data.get(address, {}).get("messageStats", {}).get("updatesRecv", 0))

    def wait_established(self, peer: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while (state := self.neighbor_state(peer)) != "Established":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self!r}: session to {peer} is {state} after {timeout}s\n"
                                   f"{self.log_tail('bgpd')}")
            time.sleep(0.1)

    def bgp_routes(self, prefix: str) -> dict[str, Any]:
        """``show bgp <afi> unicast <prefix> json`` parsed; ``{}`` if bgpd has no such route."""
        network = ipaddress.ip_network(prefix)
        family = "ipv4" if network.version == 4 else "ipv6"
        data = self.vtysh_json(f"show bgp {family} unicast {network} json")
        return data if isinstance(data, dict) else {}

    def kernel_nexthops(self, prefix: str) -> set[str]:
        """Next hops of the kernel route for exactly ``prefix`` in the namespace; empty if none."""
        return set(read_nexthops(self.ns, prefix))

    def stop(self) -> None:
        """Stop bgpd then zebra (zebra removes its routes on SIGTERM). Idempotent."""
        for proc in (self._bgpd, self._zebra):
            if proc is not None:
                self.ns.stop(proc, timeout=5)
        self._bgpd = self._zebra = None
        shutil.rmtree(self.rundir, ignore_errors=True)
