"""The desired state: what the BGP session, the kernel routes and IPVS should hold.

Pure values. The engine computes one DesiredState from the verdict and the pool; each
adapter receives the part it owns, whole, and works out the difference itself.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from pop.config import Dataplane, Prefix
from pop.ladder import GRACEFUL_SHUTDOWN, NO_DRAIN, Effect


@dataclass(frozen=True, slots=True)
class Announcement:
    """One prefix announced to all neighbors, with the attributes of the current state."""

    prefix: str  # "192.0.2.1/32" or "2001:db8::1/128"
    next_hop: str = "self"
    med: int | None = None
    local_pref: int | None = None
    communities: tuple[str, ...] = ()  # "65000:100", "65535:0"
    large_communities: tuple[str, ...] = ()  # "65000:1:2"
    as_path_prepend: int = 0  # how many times the local AS is prepended


@dataclass(frozen=True, slots=True)
class NextHop:
    address: str
    weight: int = 1  # 1..256, the kernel's multipath weight


@dataclass(frozen=True, slots=True)
class EcmpRoute:
    """A multipath route toward the healthy VPN servers, in a table `pop` owns."""

    prefix: str
    nexthops: tuple[NextHop, ...]
    table: int = 254
    protocol: int = 200  # rtnetlink protocol number that marks routes as ours


@dataclass(frozen=True, slots=True)
class RealServer:
    address: str
    port: int
    weight: int = 1  # 0 = quiescent drain: existing flows stay, no new ones


@dataclass(frozen=True, slots=True)
class VirtualService:
    """An IPVS virtual service on the anycast address with its real servers."""

    protocol: str  # "udp" | "tcp"
    address: str
    port: int
    scheduler: str = "mh"
    forward: str = "dr"  # "dr" (direct routing) | "tunnel" | "nat"
    reals: tuple[RealServer, ...] = ()


@dataclass(frozen=True, slots=True)
class DesiredState:
    announcements: tuple[Announcement, ...] = ()
    vips: tuple[str, ...] = field(default=())  # addresses (with prefix length) to hold on lo
    routes: tuple[EcmpRoute, ...] = ()
    services: tuple[VirtualService, ...] = ()
    pins: tuple[str, ...] = ()  # ecmp with pin_flows: server addresses whose flows stay on them


def announcements(prefixes: tuple[Prefix, ...], announce: bool, degraded: bool,
                  drain: Effect = NO_DRAIN, fleet_tags: tuple[str, ...] = ()) -> tuple[Announcement, ...]:
    """What the BGP session should carry: every anycast prefix with the attributes of the
    current state (healthy or degraded) and of the drain ladder's steps so far (pop.ladder),
    or nothing while the verdict is withdraw.

    A drain only ever makes a route less preferred: the MED is raised to the step's value
    (never lowered), the prepends add to the configured ones, and GRACEFUL_SHUTDOWN adds
    65535:0 and LOCAL_PREF 0 (sent on iBGP sessions only; eBGP peers set it themselves, RFC 8326).
    ``fleet_tags``: the large communities by which the other PoPs recognise this one (pop.fleet).
    """
    if not announce:
        return ()
    result = []
    for prefix in prefixes:
        attributes = prefix.degraded if degraded else prefix.healthy
        med, communities, local_pref = attributes.med, attributes.communities, attributes.local_pref
        if drain.med is not None:
            med = max(med or 0, drain.med)
        if drain.graceful_shutdown:
            local_pref = 0
            if GRACEFUL_SHUTDOWN not in communities:
                communities = (*communities, GRACEFUL_SHUTDOWN)
        result.append(Announcement(
            prefix=prefix.prefix,
            next_hop=prefix.next_hop,
            med=med,
            local_pref=local_pref,
            communities=communities,
            large_communities=attributes.large_communities + tuple(t for t in fleet_tags
                                                                   if t not in attributes.large_communities),
            as_path_prepend=attributes.as_path_prepend + drain.prepend,
        ))
    return tuple(result)


def host_addresses(prefixes: tuple[Prefix, ...]) -> tuple[str, ...]:
    """The anycast prefixes that are single addresses (/32, /128): the VIPs a PoP can hold."""
    result = []
    for prefix in prefixes:
        network = ipaddress.ip_network(prefix.prefix)
        if network.prefixlen == network.max_prefixlen:
            result.append(str(network))
    return tuple(result)


def dataplane(prefixes: tuple[Prefix, ...], pool: Sequence[tuple[str, int]], config: Dataplane) -> DesiredState:
    """The data plane toward the servers in the pool, as (address, weight) pairs.

    Weight 0 is a server being drained: IPVS keeps it as a quiescent real server (existing
    flows continue, no new ones); a multipath route cannot carry weight 0, so ECMP drops it
    from the route, and with pin_flows keeps it pinned (its flows stay, new ones go elsewhere).

    No announcements here: the engine decides *when* the data plane is wanted (before an
    announce, and until the withdraw has had time to propagate).
    """
    vips = tuple(f"{address}" for address in host_addresses(prefixes)) if config.vip or config.mode == "ipvs" else ()
    routes: tuple[EcmpRoute, ...] = ()
    services: tuple[VirtualService, ...] = ()
    if config.mode == "ecmp" and pool:
        routes = tuple(
            EcmpRoute(prefix=p.prefix, nexthops=tuple(NextHop(address, weight) for address, weight in pool
                                                     if weight > 0
                                                     and ipaddress.ip_address(address).version == p.version),
                      table=config.table, protocol=config.protocol)
            for p in prefixes)
        routes = tuple(r for r in routes if r.nexthops)
    if config.mode == "ipvs":
        services = tuple(
            VirtualService(protocol=port.protocol, address=vip.split("/")[0], port=port.port,
                           scheduler=config.scheduler, forward=config.forward,
                           reals=tuple(RealServer(address, port.port, weight) for address, weight in pool
                                       if ipaddress.ip_address(address).version
                                       == ipaddress.ip_network(vip).version))
            for vip in host_addresses(prefixes) for port in config.services)
    pins = tuple(address for address, _ in pool) if config.mode == "ecmp" and config.pin_flows else ()
    return DesiredState(vips=vips, routes=routes, services=services, pins=pins)
