"""The `external:` section of pop.yaml: tier 3, the probe agents a PoP pulls (pure).

Part of the one loader (pop.config.load); kept apart because it is a section of its own with
its own cross-checks: agent names are unique, a quorum no larger than the agents, and a key
file when the tier is enabled.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from pop.config_model import External, ExternalAgent, Neighbor
from pop.config_reader import Reader, join, zone_problem

U16 = 65535
_KEYS = {"enabled", "beacons", "key_file", "agents", "quorum", "unreachable_fraction", "max_age", "max_skew",
         "fall_for", "pull_interval", "timeout", "identity_port"}


def parse(r: Reader, value: Any, path: str) -> External:
    data = r.mapping(value, path, _KEYS)
    default = External()
    if data is None:
        return default
    agents: list[ExternalAgent] = []
    for index, item in enumerate(r.sequence(data.get("agents"), join(path, "agents")) or []):
        item_path = join(join(path, "agents"), index)
        entry = r.mapping(item, item_path, {"name", "address", "port"})
        if entry is None:
            continue
        name = r.need(entry, "name", item_path, r.name)
        address = r.need(entry, "address", item_path, r.address)
        port = r.optional(entry, "port", item_path, lambda v, p: r.integer(v, p, 1, U16), 9190)
        if name is not None and address is not None:
            if any(a.name == name for a in agents):
                r.error(join(item_path, "name"), f"{name!r} is already the name of another agent")
            agents.append(ExternalAgent(name, address, port))

    def number(key: str, low: float, high: float) -> float:
        return r.optional(data, key, path, lambda v, p: r.number(v, p, low, high, low_open=True),
                          float(getattr(default, key)))

    beacons: list[str] = []
    for index, item in enumerate(r.sequence(data.get("beacons"), join(path, "beacons")) or []):
        beacon = _prefix(r, item, join(join(path, "beacons"), index))
        if beacon is not None and beacon not in beacons:
            beacons.append(beacon)
    result = External(
        enabled=r.optional(data, "enabled", path, r.boolean, default.enabled),
        beacons=tuple(beacons),
        key_file=r.optional(data, "key_file", path, r.absolute_path, default.key_file),
        agents=tuple(agents),
        quorum=r.optional(data, "quorum", path, lambda v, p: r.integer(v, p, 1, 1000), default.quorum),
        unreachable_fraction=number("unreachable_fraction", 0, 1),
        max_age=number("max_age", 0, 3600),
        max_skew=r.optional(data, "max_skew", path, lambda v, p: r.number(v, p, 0, 3600), default.max_skew),
        fall_for=r.optional(data, "fall_for", path, lambda v, p: r.number(v, p, 0, 3600), default.fall_for),
        pull_interval=number("pull_interval", 0, 3600),
        timeout=number("timeout", 0, 60),
        identity_port=r.optional(data, "identity_port", path, lambda v, p: r.integer(v, p, 0, U16),
                                 default.identity_port),
    )
    if result.enabled:
        if not result.key_file:
            r.error(join(path, "key_file"), "is required when the external tier is enabled")
        if len(result.agents) < result.quorum:
            r.error(join(path, "agents"), f"{len(result.agents)} agents cannot make a quorum of {result.quorum}")
    return result


def _prefix(r: Reader, value: Any, path: str) -> str | None:
    text = r.string(value, path)
    if text is None:
        return None
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        r.error(path, f"{text!r} is not a prefix ({exc})")
        return None
    zone = getattr(network.network_address, "scope_id", None)
    if zone is not None:
        r.error(path, zone_problem(text, zone))
        return None
    return str(network)


def check_beacons(r: Reader, external: External, anycast: Iterable[str],
                  neighbors: Iterable[tuple[int, Neighbor]]) -> None:
    """A beacon is never withdrawn, so it must not overlap an anycast prefix (it would keep
    attracting the anycast traffic of a withdrawn PoP); a session must carry its family; and
    ExaBGP's static routes resolve `next-hop self` when the configuration is read, so every
    session of a beacon's family needs its local address."""
    networks = [ipaddress.ip_network(p) for p in anycast]
    sessions = list(neighbors)
    for index, beacon in enumerate(external.beacons):
        net = ipaddress.ip_network(beacon)
        path = f"external.beacons[{index}]"
        clash = next((str(n) for n in networks if n.version == net.version and n.overlaps(net)), None)
        if clash is not None:
            r.error(path, f"{beacon} overlaps the anycast prefix {clash}: a beacon is never withdrawn")
        elif not any(n.version == net.version for _, n in sessions):
            r.error(path, f"{beacon} is IPv{net.version} but no neighbor is; it would never be announced")
    versions = {ipaddress.ip_network(b).version for b in external.beacons}
    for position, neighbor in sessions:
        if neighbor.version in versions and neighbor.local_address is None:
            r.error(f"neighbors[{position}].local_address", "is required with external.beacons (ExaBGP's "
                                                            "static routes need it for next-hop self)")
