"""containerlab.yml and the node files it binds, read into typed values.

Contract:

- ``parse(text, source, base)`` is pure: containerlab YAML text in, a ``Topology`` out, or a
  ``TopologyError`` listing every problem as ``source: key.path: what is wrong``. ``base`` is
  the directory relative bind sources are resolved against (containerlab's rule: the
  topology file's directory); nothing is opened.
- ``load(path)`` reads the topology and the node files its binds name and returns a
  ``LabSpec``: routers as ``lab.frr.BgpConfig``, PoPs as their ``pop.yaml`` (raw mapping and
  ``pop.config.Config``), VPN servers as (pop, address, ports) taken from that PoP's
  ``servers``. It checks that the pieces fit: every link end is a node's interface used once,
  every address a config names sits on the right node, router and PoP ASNs agree.
- The node files are the single source of truth for containerlab and for the namespace
  runner alike. A router's ``frr.conf`` must be exactly what ``BgpConfig.render()`` produces
  for the values read from it, so the runner feeds FRR byte for byte the file containerlab
  mounts. Addresses and routes live in each node's ``exec`` list as ``ip`` commands, which
  containerlab runs in the container and the runner runs in the namespace.
- Which part a node plays is its label ``pop.lab.role``: router, pop, vpn, client, probe,
  noc or internet (what the VPN servers forward their users' traffic to: the target of the
  PoPs' tunnel checks). A vpn node is the server of the same name in some PoP's ``servers``; a probe node that
  binds an agent.yaml runs a probe agent; a noc node that binds a noc.yaml runs `pop noc`.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import yaml

from lab.frr import GSHUT_POLICY, BgpConfig, BgpNeighbor
from lab.netns import IFNAMSIZ
from pop import config as pop_config
from pop import noc
from pop.agent import config as agent_config

Role = Literal["router", "pop", "vpn", "client", "probe", "noc", "internet"]
ROLES: tuple[Role, ...] = ("router", "pop", "vpn", "client", "probe", "noc", "internet")
ROLE_LABEL = "pop.lab.role"
FRR_CONF = "/etc/frr/frr.conf"
FRR_DAEMONS = "/etc/frr/daemons"
POP_YAML = "/etc/pop/pop.yaml"
AGENT_YAML = "/etc/pop/agent.yaml"
NOC_YAML = "/etc/pop/noc.yaml"

_NODE_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")  # short: it becomes part of namespace names
_IFNAME = re.compile(r"^(eth[0-9]{1,3}|lo)$")
_ADDR_ADD = re.compile(r"^ip (?:-[46] )?(?:addr|address) add (\S+) dev (\S+)$")


class TopologyError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)


@dataclass(frozen=True)
class Bind:
    source: Path  # absolute, resolved against the topology file's directory
    target: str
    mode: str = ""


@dataclass(frozen=True)
class Endpoint:
    node: str
    ifname: str

    def __str__(self) -> str:
        return f"{self.node}:{self.ifname}"


@dataclass(frozen=True)
class Link:
    a: Endpoint
    b: Endpoint


@dataclass(frozen=True)
class Node:
    name: str
    role: Role
    kind: str
    image: str
    binds: tuple[Bind, ...]
    exec: tuple[tuple[str, ...], ...]  # argv of each `ip` command, in order
    addresses: tuple[tuple[str, str], ...]  # (ifname, CIDR) added by those commands

    def bind_source(self, target: str) -> Path | None:
        return next((bind.source for bind in self.binds if bind.target == target), None)

    def owns(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(ipaddress.ip_interface(cidr).ip == ip for _, cidr in self.addresses)


@dataclass(frozen=True)
class Topology:
    name: str
    nodes: Mapping[str, Node]
    links: tuple[Link, ...]
    source: str = "containerlab.yml"

    def by_role(self, role: Role) -> list[Node]:
        return [node for node in self.nodes.values() if node.role == role]

    def owner_of(self, address: str) -> str | None:
        """The node that holds ``address`` on one of its interfaces."""
        return next((node.name for node in self.nodes.values() if node.owns(address)), None)


@dataclass(frozen=True)
class PopSpec:
    name: str
    document: Mapping[str, Any]  # the YAML as written; the runner adds run-specific values
    config: pop_config.Config
    path: Path


@dataclass(frozen=True)
class VpnSpec:
    name: str
    pop: str
    address: str
    tcp_port: int
    wireguard_port: int | None  # None: the PoP does not configure WireGuard for it


@dataclass(frozen=True)
class AgentSpec:
    """A probe node that runs `pop probe-agent` (it binds an agent.yaml)."""

    name: str  # the node's name
    document: Mapping[str, Any]  # the YAML as written; the runner adds the run's key files
    config: agent_config.AgentConfig
    path: Path


@dataclass(frozen=True)
class LabSpec:
    topology: Topology
    routers: Mapping[str, BgpConfig]
    pops: Mapping[str, PopSpec]
    vpns: Mapping[str, VpnSpec]
    anycast: tuple[str, ...] = field(default=())  # every PoP prefix, in first-seen order
    agents: Mapping[str, AgentSpec] = field(default_factory=dict)
    nocs: Mapping[str, noc.NocConfig] = field(default_factory=dict)  # noc nodes that run `pop noc`


# --- containerlab.yml ----------------------------------------------------------------------


def parse(text: str, source: str = "containerlab.yml", base: Path = Path()) -> Topology:
    problems: list[str] = []

    def error(path: str, message: str) -> None:
        problems.append(f"{source}: {path}: {message}")

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TopologyError([f"{source}: not valid YAML: {exc}"]) from None
    if not isinstance(doc, dict):
        raise TopologyError([f"{source}: (top level): must be a mapping"])
    name = doc.get("name")
    if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_-]*$", name):
        error("name", "required: letters, digits, '-' and '_'")
        name = ""
    topo = doc.get("topology")
    if not isinstance(topo, dict):
        raise TopologyError([*problems, f"{source}: topology: required mapping"])
    kinds = topo.get("kinds") or {}
    if not isinstance(kinds, dict):
        error("topology.kinds", "must be a mapping")
        kinds = {}
    raw_nodes = topo.get("nodes")
    if not isinstance(raw_nodes, dict) or not raw_nodes:
        raise TopologyError([*problems, f"{source}: topology.nodes: required, at least one node"])
    nodes: dict[str, Node] = {}
    for node_name, raw in raw_nodes.items():
        def node_error(path: str, message: str, name: str = str(node_name)) -> None:
            error(f"topology.nodes.{name}{path}", message)

        node = _node(str(node_name), raw, kinds, base, node_error)
        if node is not None:
            nodes[node.name] = node
    links = _links(topo.get("links"), nodes, error)
    if problems:
        raise TopologyError(problems)
    return Topology(name, nodes, tuple(links), source)


def _node(name: str, raw: Any, kinds: Mapping[str, Any], base: Path,
          error: Callable[[str, str], None]) -> Node | None:
    if not _NODE_NAME.match(name):
        error("", "node names: a lowercase letter, then lowercase letters or digits, at most 12")
        return None
    if not isinstance(raw, dict):
        error("", "must be a mapping")
        return None
    kind = raw.get("kind")
    if not isinstance(kind, str) or kind not in kinds:
        error(".kind", f"must name one of topology.kinds ({', '.join(sorted(map(str, kinds)))})")
        return None
    kind_defaults = kinds[kind] if isinstance(kinds[kind], dict) else {}
    image = raw.get("image", kind_defaults.get("image"))
    if not isinstance(image, str) or not image:
        error(".image", "required (on the node or its kind)")
    role = (raw.get("labels") or {}).get(ROLE_LABEL)
    if role not in ROLES:
        error(f".labels.{ROLE_LABEL}", f"must be one of {', '.join(ROLES)}")
        return None
    binds = []
    for i, text in enumerate(raw.get("binds") or []):
        parts = str(text).split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1].startswith("/"):
            error(f".binds[{i}]", f"{text!r} is not SOURCE:/TARGET[:MODE]")
            continue
        source_path = Path(parts[0]) if Path(parts[0]).is_absolute() else base / parts[0]
        binds.append(Bind(source_path, parts[1], parts[2] if len(parts) == 3 else ""))
    commands: list[tuple[str, ...]] = []
    addresses: list[tuple[str, str]] = []
    for i, line in enumerate(raw.get("exec") or []):
        argv = tuple(shlex.split(str(line)))
        if not argv or argv[0] != "ip":
            error(f".exec[{i}]", f"{line!r}: only `ip` commands (addresses, routes) are allowed")
            continue
        commands.append(argv)
        if match := _ADDR_ADD.match(" ".join(argv)):
            try:
                ipaddress.ip_interface(match[1])
            except ValueError:
                error(f".exec[{i}]", f"{match[1]!r} is not an address with prefix length")
                continue
            addresses.append((match[2], match[1]))
    return Node(name, cast(Role, role), kind, str(image), tuple(binds), tuple(commands), tuple(addresses))


def _links(raw: Any, nodes: Mapping[str, Node], error: Callable[[str, str], None]) -> list[Link]:
    links: list[Link] = []
    used: set[Endpoint] = set()
    for i, item in enumerate(raw or []):
        ends = item.get("endpoints") if isinstance(item, dict) else None
        if not isinstance(ends, list) or len(ends) != 2:
            error(f"topology.links[{i}]", "needs `endpoints` with exactly two NODE:IFNAME")
            continue
        parsed = []
        for end in ends:
            node_name, _, ifname = str(end).partition(":")
            if node_name not in nodes:
                error(f"topology.links[{i}]", f"{end!r}: no node named {node_name!r}")
            elif not _IFNAME.match(ifname) or ifname == "lo" or len(ifname) > IFNAMSIZ:
                error(f"topology.links[{i}]", f"{end!r}: interface must be eth1, eth2, ... (eth0 is management)")
            elif ifname == "eth0":
                error(f"topology.links[{i}]", f"{end!r}: eth0 is containerlab's management interface")
            elif Endpoint(node_name, ifname) in used:
                error(f"topology.links[{i}]", f"{end!r}: interface already used by another link")
            else:
                parsed.append(Endpoint(node_name, ifname))
        if len(parsed) == 2:
            if parsed[0].node == parsed[1].node:
                error(f"topology.links[{i}]", "a link must join two different nodes")
                continue
            used.update(parsed)
            links.append(Link(parsed[0], parsed[1]))
    for node in nodes.values():
        for ifname, cidr in node.addresses:
            if ifname != "lo" and Endpoint(node.name, ifname) not in used:
                error(f"topology.nodes.{node.name}.exec", f"{cidr} on {ifname}, which no link creates")
    return links


# --- frr.conf ------------------------------------------------------------------------------


def parse_frr(text: str, source: str) -> BgpConfig:
    """The BgpConfig whose ``render()`` is exactly ``text``; TopologyError otherwise."""
    name = asn = router_id = None
    maximum_paths = 8
    graceful_shutdown_in = add_paths = False
    neighbors: dict[str, dict[str, Any]] = {}
    networks: list[str] = []
    family = "ipv4"
    body, sep, extra = text.partition("\nexit\n!\n")
    for line in body.splitlines():
        words = line.split()
        if line.startswith("hostname "):
            name = words[1]
        elif line == GSHUT_POLICY[0]:
            graceful_shutdown_in = True  # the rest of the policy is checked by rendering it again
        elif line.startswith("router bgp "):
            asn = int(words[2])
        elif line.startswith(" bgp router-id "):
            router_id = words[2]
        elif line.startswith(" neighbor "):
            peer = neighbors.setdefault(words[1], {})
            rest = words[2:]
            if rest[0] == "remote-as":
                peer["remote_as"] = int(rest[1])
            elif rest[0] == "description":
                peer["description"] = line.split(" description ", 1)[1]
            elif rest[0] == "passive":
                peer["passive"] = True
            elif rest[:2] == ["timers", "connect"]:
                peer["connect_retry"] = int(rest[2])
            elif rest[0] == "timers":
                peer["keepalive"], peer["hold_time"] = int(rest[1]), int(rest[2])
        elif line.startswith("  neighbor ") and words[2] == "addpath-tx-all-paths":
            add_paths = True  # for every neighbor: rendering again checks that
        elif line.startswith("  neighbor ") and words[2] == "activate":
            neighbors.setdefault(words[1], {}).setdefault("families", []).append(family)
        elif line.startswith(" address-family "):
            family = words[1]
        elif line.startswith("  network "):
            networks.append(words[1])
        elif line.startswith("  maximum-paths ") and words[1] != "ibgp":
            maximum_paths = int(words[1])
    if name is None or asn is None or router_id is None or not sep:
        raise TopologyError([f"{source}: needs hostname, router bgp, bgp router-id and the closing exit"])
    extra = extra.removesuffix("!\n").strip("\n")
    try:
        parsed = []
        for address, values in neighbors.items():
            if "remote_as" not in values:
                raise TopologyError([f"{source}: neighbor {address}: no remote-as line"])
            families = tuple(values.pop("families", ()))
            default = ("ipv4" if ipaddress.ip_address(address).version == 4 else "ipv6",)
            # the neighbor's own family is BgpNeighbor's default: keep the value as one writes it
            parsed.append(BgpNeighbor(address, families=() if families == default else families, **values))
        config = BgpConfig(name, asn, router_id, tuple(parsed), tuple(networks), maximum_paths, extra,
                           graceful_shutdown_in, add_paths)
    except (TypeError, ValueError) as exc:
        raise TopologyError([f"{source}: {exc}"]) from None
    rendered = config.render()
    if rendered != text:
        diff = next((f"line {n}: file {a!r}, rendered {b!r}"
                     for n, (a, b) in enumerate(zip(text.splitlines(), rendered.splitlines(), strict=False), 1)
                     if a != b), "lengths differ")
        raise TopologyError([f"{source}: not in the form lab.frr.BgpConfig renders ({diff})"])
    return config


# --- the whole lab -------------------------------------------------------------------------


def load(path: Path) -> LabSpec:
    """Read containerlab.yml and every node file it binds; check that they fit together."""
    path = path.resolve()
    topology = parse(path.read_text(), path.name, path.parent)
    problems: list[str] = []
    routers: dict[str, BgpConfig] = {}
    pops: dict[str, PopSpec] = {}
    agents: dict[str, AgentSpec] = {}
    nocs: dict[str, noc.NocConfig] = {}
    for node in topology.nodes.values():
        wanted = {"router": [FRR_CONF, FRR_DAEMONS], "pop": [POP_YAML]}.get(node.role, [])
        for target in wanted:
            source = node.bind_source(target)
            if source is None:
                problems.append(f"{topology.source}: topology.nodes.{node.name}.binds: needs a bind to {target}")
            elif not source.is_file():
                problems.append(f"{topology.source}: topology.nodes.{node.name}.binds: {source} does not exist")
        for bind in node.binds:
            if not bind.source.exists():
                problems.append(f"{topology.source}: topology.nodes.{node.name}.binds: {bind.source} does not exist")
        try:
            if node.role == "router" and (frr := node.bind_source(FRR_CONF)) and frr.is_file():
                routers[node.name] = parse_frr(frr.read_text(), str(frr))
            if node.role == "pop" and (yml := node.bind_source(POP_YAML)) and yml.is_file():
                text = yml.read_text()
                pops[node.name] = PopSpec(node.name, yaml.safe_load(text), pop_config.load(text, str(yml)), yml)
            if node.role == "probe" and (yml := node.bind_source(AGENT_YAML)) and yml.is_file():
                text = yml.read_text()
                agents[node.name] = AgentSpec(node.name, yaml.safe_load(text), agent_config.load(text, str(yml)), yml)
            if node.role == "noc" and (yml := node.bind_source(NOC_YAML)) and yml.is_file():
                nocs[node.name] = noc.load(yml.read_text(), str(yml))
        except (TopologyError, pop_config.ConfigError, agent_config.ConfigError) as exc:
            problems.extend(exc.problems)
    if problems:
        raise TopologyError(problems)
    vpns = _vpns(topology, pops, problems)
    _check_sessions(topology, routers, pops, problems)
    _check_anycast_holders(topology, pops, problems)
    _check_agents(topology, pops, vpns, agents, problems)
    _check_nocs(topology, pops, nocs, problems)
    if problems:
        raise TopologyError(problems)
    anycast: list[str] = []
    for spec in pops.values():
        anycast += [p.prefix for p in spec.config.prefixes if p.prefix not in anycast]
    return LabSpec(topology, routers, pops, vpns, tuple(anycast), agents, nocs)


def _check_nocs(topology: Topology, pops: Mapping[str, PopSpec], nocs: Mapping[str, noc.NocConfig],
                problems: list[str]) -> None:
    """A fleet page lists every PoP, each at an address of that PoP where its status listens."""
    for name, config in nocs.items():
        where = f"{topology.source}: topology.nodes.{name} (noc.yaml)"
        if missing := sorted(set(pops) - {t.name for t in config.pops}):
            problems.append(f"{where}: pops: misses {', '.join(missing)}")
        for target in config.pops:
            url = urlsplit(target.url)
            owner = topology.owner_of(url.hostname or "")
            status = pops[target.name].config.status if target.name in pops else None
            if status is None or owner != target.name:
                problems.append(f"{where}: pops: {target.name}: {url.hostname} is not an address of {target.name}")
            elif status.listen not in ("0.0.0.0", "::", url.hostname) or (url.port or 80) != status.port:
                problems.append(f"{where}: pops: {target.name}: its status listens on {status.listen}:{status.port}, "
                                f"not {url.hostname}:{url.port}")


def _check_agents(topology: Topology, pops: Mapping[str, PopSpec], vpns: Mapping[str, VpnSpec],
                  agents: Mapping[str, AgentSpec], problems: list[str]) -> None:
    """Agents and PoPs name each other consistently, and every target sits behind its PoP's beacon."""
    by_address = {(spec.config.listen, spec.config.port): spec for spec in agents.values()}
    for spec in agents.values():
        node = topology.nodes[spec.name]
        if spec.config.listen not in ("0.0.0.0", "::") and not node.owns(spec.config.listen):
            problems.append(f"{spec.path}: listen: {spec.config.listen} is not on node {spec.name}")
        for pop in spec.config.pops:
            if pop.name not in pops:
                problems.append(f"{spec.path}: pops: {pop.name} is not a pop node of {topology.source}")
                continue
            beacons = [ipaddress.ip_network(b) for b in pops[pop.name].config.external.beacons]
            for target in pop.targets:
                owner = topology.owner_of(target.address) or ""
                if owner not in vpns or vpns[owner].pop != pop.name:
                    problems.append(f"{spec.path}: pops: {pop.name}: {target.address} is not a server of {pop.name}")
                elif not any(ipaddress.ip_address(target.address) in net for net in beacons):
                    problems.append(f"{spec.path}: pops: {pop.name}: {target.address} is outside {pop.name}'s "
                                    "external.beacons: a withdrawn PoP could not be seen coming back")
    for name, pop_spec in pops.items():
        for agent in pop_spec.config.external.agents:
            found = by_address.get((agent.address, agent.port))
            if found is None:
                problems.append(f"{pop_spec.path}: external.agents: {agent.name} at {agent.address}:{agent.port} "
                                "is no probe node's agent")
            elif found.config.name != agent.name:
                problems.append(f"{pop_spec.path}: external.agents: {agent.address} runs agent "
                                f"{found.config.name!r}, not {agent.name!r}")
            elif name not in {p.name for p in found.config.pops}:
                problems.append(f"{found.path}: pops: does not probe {name}, which pulls it")


def _vpns(topology: Topology, pops: Mapping[str, PopSpec], problems: list[str]) -> dict[str, VpnSpec]:
    vpns: dict[str, VpnSpec] = {}
    for spec in pops.values():
        for server in spec.config.servers:
            node = topology.nodes.get(server.name)
            if node is None or node.role != "vpn":
                problems.append(f"{spec.path}: servers: {server.name} is not a vpn node of {topology.source}")
                continue
            if not node.owns(server.address):
                problems.append(f"{spec.path}: servers: {server.name}'s address {server.address} "
                                f"is not on node {node.name}")
            if server.name in vpns:
                problems.append(f"{spec.path}: servers: {server.name} already serves {vpns[server.name].pop}")
            vpns[server.name] = VpnSpec(
                server.name, spec.name, server.address,
                server.port or spec.config.checks.l4.port,
                server.wireguard.port if server.wireguard is not None else None)
    for node in topology.by_role("vpn"):
        if node.name not in vpns:
            problems.append(f"{topology.source}: topology.nodes.{node.name}: a vpn node no PoP lists in servers")
    return vpns


def anycast_on_lo(node: Node, anycast: Iterable[str]) -> list[str]:
    """The anycast host addresses ``node`` holds on ``lo`` (from its ``exec`` commands)."""
    hosts = {ipaddress.ip_network(prefix).network_address for prefix in anycast}
    return [str(ip) for ifname, cidr in node.addresses
            if ifname == "lo" and (ip := ipaddress.ip_interface(cidr).ip) in hosts]


def _check_anycast_holders(topology: Topology, pops: Mapping[str, PopSpec], problems: list[str]) -> None:
    """Where the anycast address must (not) sit for the PoP's data plane mode to deliver."""
    for name, spec in pops.items():
        dataplane = spec.config.dataplane
        hosts = [p.prefix for p in spec.config.prefixes if ipaddress.ip_network(p.prefix).prefixlen in (32, 128)]
        if dataplane.mode == "ecmp" and (held := anycast_on_lo(topology.nodes[name], hosts)):
            problems.append(f"{topology.source}: topology.nodes.{name}.exec: {', '.join(held)} on lo would take "
                            f"the traffic that {name}'s ecmp data plane routes to its servers")
        if dataplane.mode == "ecmp" or (dataplane.mode == "ipvs" and dataplane.forward != "nat"):
            wanted = {str(ipaddress.ip_network(h).network_address) for h in hosts}
            for server in spec.config.servers:
                node = topology.nodes.get(server.name)
                if node is not None and (missing := wanted - set(anycast_on_lo(node, hosts))):
                    problems.append(f"{topology.source}: topology.nodes.{server.name}.exec: serves {name} in "
                                    f"{dataplane.mode} mode, so it must hold {', '.join(sorted(missing))} on lo")


def _check_sessions(topology: Topology, routers: Mapping[str, BgpConfig], pops: Mapping[str, PopSpec],
                    problems: list[str]) -> None:
    """Every BGP session is configured on both ends with matching addresses and ASNs."""
    asn_of = {name: cfg.asn for name, cfg in routers.items()} | {n: s.config.asn for n, s in pops.items()}
    for name, cfg in routers.items():
        for nbr in cfg.neighbors:
            peer = topology.owner_of(nbr.address)
            if peer is None or peer not in asn_of:
                problems.append(f"router {name}: neighbor {nbr.address} is on no router or pop node")
            elif asn_of[peer] != nbr.remote_as:
                problems.append(f"router {name}: neighbor {nbr.address} ({peer}) is AS {asn_of[peer]}, "
                                f"not {nbr.remote_as}")
    for name, spec in pops.items():
        for neighbor in spec.config.neighbors:
            peer = topology.owner_of(neighbor.address)
            if peer is None or peer not in routers:
                problems.append(f"{spec.path}: neighbors: {neighbor.address} is on no router node")
                continue
            if routers[peer].asn != neighbor.peer_as:
                problems.append(f"{spec.path}: neighbors: {neighbor.address} ({peer}) is AS {routers[peer].asn}")
            if neighbor.local_address and not topology.nodes[name].owns(neighbor.local_address):
                problems.append(f"{spec.path}: neighbors: local_address {neighbor.local_address} is not on {name}")
            if not any(topology.nodes[name].owns(n.address) for n in routers[peer].neighbors):
                problems.append(f"router {peer}: no neighbor statement for {name}")
