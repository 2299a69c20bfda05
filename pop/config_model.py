"""What one PoP's configuration is: frozen dataclasses, built only by `pop.config.load`.

Every value here has passed the loader's checks (pop/config.py): addresses and prefixes are
normalised and zone-free, communities are canonical ASCII digits, and any text that reaches
ExaBGP fits its grammar.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from pop.dampening import Policy as DampeningPolicy
from pop.fleet import Policy as FleetPolicy
from pop.load import Policy as LoadPolicy
from pop.tails import Policy as TailsPolicy


@dataclass(frozen=True, slots=True)
class Attributes:
    """BGP path attributes of an announcement in one state."""

    med: int | None = None
    local_pref: int | None = None
    communities: tuple[str, ...] = ()
    large_communities: tuple[str, ...] = ()
    as_path_prepend: int = 0


@dataclass(frozen=True, slots=True)
class Prefix:
    prefix: str  # normalised CIDR
    next_hop: str  # "self" or an address of the same family
    healthy: Attributes  # every server up
    degraded: Attributes  # announced, but some servers are not up

    @property
    def version(self) -> int:
        return ipaddress.ip_network(self.prefix).version


@dataclass(frozen=True, slots=True)
class Neighbor:
    address: str
    peer_as: int
    local_address: str | None = None
    description: str = ""
    hold_time: int = 9  # seconds; a crashed host is noticed after this without BFD
    passive: bool = False

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.address).version


@dataclass(frozen=True, slots=True)
class WireGuardTarget:
    public_key: str  # base64; format-checked here, decoded by the check
    port: int = 51820


@dataclass(frozen=True, slots=True)
class Server:
    name: str
    address: str
    port: int | None = None  # L4 check port; None means the L4 check's default port
    weight: int = 1
    enabled: bool = True
    wireguard: WireGuardTarget | None = None


@dataclass(frozen=True, slots=True)
class L4Check:
    """Tier 1: a TCP connect (or ICMP echo) to every server.

    Silence (a timeout) may be packet loss, so it takes `fall` failures in a row; a refusal
    (TCP RST, ICMP unreachable) cannot be caused by loss, so `fall_definitive` suffices.
    """

    kind: str = "tcp"  # "tcp" (connect) | "syn" (raw SYN, pop.checks.syn) | "auto" (syn where allowed) | "icmp"
    port: int = 443
    interval: float = 0.2
    fast_interval: float = 0.05  # while a server is rising or falling
    timeout: float = 0.25
    rise: int = 3
    fall: int = 6
    fall_definitive: int = 2


@dataclass(frozen=True, slots=True)
class WireGuardCheck:
    """Tier 2: a real WireGuard handshake from a probe key every server has as a peer."""

    enabled: bool = False
    probe_key_file: str = "/etc/pop/probe.key"
    psk_file: str | None = None
    through: str | None = None  # IPv4 target of an ICMP echo through the tunnel after the handshake
    tunnel_address: str | None = None  # the probe's IPv4 address inside the tunnel (required with through)
    data_timeout: float = 0.3  # wait for the data reply; the echo is sent 3 times within it
    interval: float = 2.0
    fast_interval: float = 0.5
    timeout: float = 1.0
    rise: int = 2
    fall: int = 6  # silence: handshake timeouts at 10 % loss each way are ~19-23 % of probes
    fall_definitive: int = 2


@dataclass(frozen=True, slots=True)
class Checks:
    l4: L4Check = field(default_factory=L4Check)
    wireguard: WireGuardCheck = field(default_factory=WireGuardCheck)
    # the engine's thread at this SCHED_RR priority (1-99; 0: the normal scheduler), so that the
    # probes start on time while other processes of the host (the status readers) want the CPU
    realtime_priority: int = 0


@dataclass(frozen=True, slots=True)
class Pool:
    """When the PoP attracts traffic: two watermarks on the healthy fraction, and a hold-down."""

    low_watermark: float = 0.5  # withdraw when the healthy fraction drops below this
    high_watermark: float = 0.6  # re-announce only at or above this ...
    hold_down: float = 5.0  # ... and after it has stayed there this many seconds


@dataclass(frozen=True, slots=True)
class StatusEndpoint:
    listen: str = "127.0.0.1"
    port: int = 9180
    enabled: bool = True
    readers_port: int | None = None  # /v1/status from a process of its own (pop.readers)


@dataclass(frozen=True, slots=True)
class Control:
    """Who may change the PoP's state over HTTP (pop/control.py): bearer tokens from a 0600 file.

    Without a token file, every state-changing request is refused (403).
    """

    token_file: str = ""


@dataclass(frozen=True, slots=True)
class Availability:
    """The PoP's availability objective (pop/availability.py): the share of time announced."""

    slo: float = 0.9995  # over 30 days, planned maintenance (operator drains) excluded


@dataclass(frozen=True, slots=True)
class ExaBGP:
    reassert_interval: float = 0.0  # re-send the current announcements this often; 0 = only on change
    withdraw_settle: float = 0.5  # on shutdown, time for the withdraw to leave before ExaBGP stops
    ack_timeout: float = 5.0  # an API command without ack after this is a broken channel
    watchdog: float = 5.0  # `pop run` kills an engine whose event loop was silent this long; 0 = off
    # BGP graceful restart (RFC 4724): the restart time offered to the routers, in seconds;
    # 0 = off. A planned restart (SIGUSR2 to `pop run`) keeps the routes for that long.
    graceful_restart: int = 0


@dataclass(frozen=True, slots=True)
class ServicePort:
    protocol: str  # "udp" | "tcp"
    port: int


@dataclass(frozen=True, slots=True)
class Dataplane:
    """The local data plane toward the healthy servers (docs/dataplane.md).

    mode "none": BGP only (the servers hold the VIP and the upstream routes to them);
    "ecmp": a multipath route for the anycast prefixes via the healthy servers;
    "ipvs": IPVS virtual services on the anycast addresses with the healthy servers as reals.
    """

    mode: str = "none"
    vip: bool = False  # hold the anycast host addresses on lo (ipvs mode always does)
    withdraw_dwell: float = 2.0  # after a withdraw is acknowledged, keep the data plane this long
    table: int = 254  # ecmp: routing table
    protocol: int = 200  # rtnetlink protocol marking our routes and VIPs
    hash_policy: int | None = None  # ecmp: set fib_multipath_hash_policy (None: leave it, report it)
    scheduler: str = "mh"  # ipvs
    forward: str = "dr"  # ipvs: dr | tunnel | nat
    services: tuple[ServicePort, ...] = (ServicePort("udp", 51820),)  # ipvs: ports on the anycast address
    drain_timeout: float = 300.0  # a drained server leaves IPVS when its connections are gone or after this
    load_weights: bool = False  # scale weights down for servers busier than the pool's average (pop/load.py)
    pin_flows: bool = False  # ecmp: keep each flow on its server while that server is pinned (pop/adapters/pins.py)
    verify_interval: float = 5.0  # read the kernel back this often and repair drift (pop/applier.py); 0 = never


@dataclass(frozen=True, slots=True)
class ExternalAgent:
    """A probe agent whose signed reports this PoP pulls (docs/probe-agent.md)."""

    name: str
    address: str
    port: int = 9190

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/v1/results"


@dataclass(frozen=True, slots=True)
class External:
    """Tier 3: the view of this PoP from external probe agents, by quorum (docs/decisions.md)."""

    enabled: bool = False
    # announced always, never health-gated, by ExaBGP itself: how agents reach a withdrawn PoP
    beacons: tuple[str, ...] = ()
    key_file: str = ""  # the agents' shared HMAC key (mode 0600)
    agents: tuple[ExternalAgent, ...] = ()
    quorum: int = 2  # competent agents needed for any view but "unknown"
    unreachable_fraction: float = 0.5  # of the competent agents, to call the PoP unreachable
    max_age: float = 5.0  # a report older than this (by its own timestamp) is not fresh
    max_skew: float = 2.0  # a report dated this far ahead of our clock is refused
    fall_for: float = 2.0  # "unreachable" must last this long before it withdraws
    pull_interval: float = 1.0
    timeout: float = 1.0  # per pull
    identity_port: int = 0  # mode none: answer `pop identity` on the anycast addresses here; 0 = off


@dataclass(frozen=True, slots=True)
class DrainStep:
    """One rung of the PoP drain ladder (RFC 8326), held for `dwell` seconds; rungs add up.

    kind "med": MED raised to `value`; "prepend": the local AS prepended `value` more times;
    "graceful_shutdown": the GRACEFUL_SHUTDOWN community 65535:0 added; "withdraw": the last
    rung (its dwell is unused).
    """

    kind: str  # "med" | "prepend" | "graceful_shutdown" | "withdraw"
    value: int = 0
    dwell: float = 0.0


DEFAULT_LADDER = (DrainStep("med", 1000, 10.0), DrainStep("prepend", 3, 10.0),
                  DrainStep("graceful_shutdown", 0, 20.0), DrainStep("withdraw"))


@dataclass(frozen=True, slots=True)
class Drain:
    """How the PoP leaves service: the ladder every drain walks (operator, maintenance, the
    disable file), and the file whose existence drains the PoP (pop/ladder.py)."""

    steps: tuple[DrainStep, ...] = DEFAULT_LADDER
    disable_file: str = ""


@dataclass(frozen=True, slots=True)
class Config:
    name: str
    asn: int
    router_id: str
    neighbors: tuple[Neighbor, ...]
    prefixes: tuple[Prefix, ...]
    servers: tuple[Server, ...]
    checks: Checks = field(default_factory=Checks)
    pool: Pool = field(default_factory=Pool)
    status: StatusEndpoint = field(default_factory=StatusEndpoint)
    control: Control = field(default_factory=Control)
    exabgp: ExaBGP = field(default_factory=ExaBGP)
    dataplane: Dataplane = field(default_factory=Dataplane)
    external: External = field(default_factory=External)
    drain: Drain = field(default_factory=Drain)
    availability: Availability = field(default_factory=Availability)
    dampening: DampeningPolicy = field(default_factory=lambda: DampeningPolicy(enabled=False))
    fleet: FleetPolicy = field(default_factory=FleetPolicy)
    load: LoadPolicy = field(default_factory=LoadPolicy)  # weights from the servers' node exporters
    tails: TailsPolicy = field(default_factory=TailsPolicy)  # latency tails, the degraded mark
    runtime_dir: str = "/run/pop"
    source: str = "pop.yaml"
