"""One PoP's configuration: YAML text in, frozen dataclasses out.

`load(text, source)` is a pure function. It either returns a `Config` or raises
`ConfigError` carrying *every* problem it found, each as `source: key.path: what is wrong`.
It never raises anything else, whatever the input, and has no side effects: it opens no
file, starts no check and resolves no name. (Key files named by the config are read later,
by the check that needs them.)

Every value that reaches ExaBGP (exabgp/*.tmpl and the API lines of pop/exabgp.py) is held
to what ExaBGP's grammar allows: no control character anywhere (a newline would turn one
command into two), names and communities in ASCII letters and digits (communities are
stored canonically), addresses and prefixes normalised and without an IPv6 zone, and a
neighbor's description free of quotes, backslashes and non-ASCII (it sits between quotes in
exabgp.conf). tests/unit/test_config_exabgp.py feeds what the loader accepts to ExaBGP.

The model is in pop/config_model.py, the YAML-walking primitives in pop/config_reader.py;
this module holds what each section means.

Defaults are chosen for detection speed without false withdrawals; docs/configuration.md
explains each one.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from pop import config_dampening, config_drain, config_external, config_fleet, config_load
from pop.config_model import (
    Attributes,
    Availability,
    Checks,
    Config,
    Control,
    Dataplane,
    Drain,
    DrainStep,
    ExaBGP,
    External,
    ExternalAgent,
    L4Check,
    Neighbor,
    Pool,
    Prefix,
    Server,
    ServicePort,
    StatusEndpoint,
    WireGuardCheck,
    WireGuardTarget,
)
from pop.config_reader import U16, U32, ConfigError, Reader, join, parse_yaml, zone_problem

__all__ = [
    "Attributes", "Availability", "Checks", "Config", "ConfigError", "Control", "Dataplane", "Drain", "DrainStep",
    "ExaBGP", "External", "ExternalAgent", "L4Check", "Neighbor", "Pool",
    "Prefix", "Server", "ServicePort", "StatusEndpoint", "WireGuardCheck", "WireGuardTarget", "load",
]

# [0-9], not \d: \d also matches other scripts' digits, which int() accepts and ExaBGP does not
_COMMUNITY = re.compile(r"([0-9]+):([0-9]+)")
_LARGE_COMMUNITY = re.compile(r"([0-9]+):([0-9]+):([0-9]+)")
_WELL_KNOWN = {
    "graceful-shutdown": "65535:0",
    "no-export": "65535:65281",
    "no-advertise": "65535:65282",
    "no-export-subconfed": "65535:65283",
    "blackhole": "65535:666",
}
_B64_KEY = re.compile(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=")


# --- sections ----------------------------------------------------------------------------


def _attributes(r: Reader, value: Any, path: str, base: Attributes) -> Attributes:
    data = r.mapping(value, path, {"med", "local_pref", "communities", "large_communities", "as_path_prepend"})
    if data is None:
        return base
    communities = base.communities
    if "communities" in data:
        items = r.sequence(data["communities"], join(path, "communities")) or []
        parsed = [_community(r, item, join(join(path, "communities"), i)) for i, item in enumerate(items)]
        communities = tuple(c for c in parsed if c is not None)
    large = base.large_communities
    if "large_communities" in data:
        items = r.sequence(data["large_communities"], join(path, "large_communities")) or []
        parsed = [_large_community(r, item, join(join(path, "large_communities"), i))
                  for i, item in enumerate(items)]
        large = tuple(c for c in parsed if c is not None)
    return Attributes(
        med=r.optional(data, "med", path, lambda v, p: r.integer(v, p, 0, U32), base.med),
        local_pref=r.optional(data, "local_pref", path, lambda v, p: r.integer(v, p, 0, U32), base.local_pref),
        communities=communities,
        large_communities=large,
        as_path_prepend=r.optional(data, "as_path_prepend", path, lambda v, p: r.integer(v, p, 0, 16),
                                   base.as_path_prepend),
    )


def _community(r: Reader, value: Any, path: str) -> str | None:
    text = r.string(value, path)
    if text is None:
        return None
    if text in _WELL_KNOWN:
        return _WELL_KNOWN[text]
    match = _COMMUNITY.fullmatch(text)
    if not match or int(match[1]) > U16 or int(match[2]) > U16:
        r.error(path, f"{text!r} is not a community (ASN:VALUE, each 0..65535, or one of "
                      f"{', '.join(sorted(_WELL_KNOWN))})")
        return None
    return ":".join(str(int(part)) for part in match.groups())


def _large_community(r: Reader, value: Any, path: str) -> str | None:
    text = r.string(value, path)
    if text is None:
        return None
    match = _LARGE_COMMUNITY.fullmatch(text)
    if not match or any(int(part) > U32 for part in match.groups()):
        r.error(path, f"{text!r} is not a large community (GLOBAL:LOCAL1:LOCAL2, each 0..4294967295)")
        return None
    return ":".join(str(int(part)) for part in match.groups())


def _prefixes(r: Reader, value: Any, path: str) -> dict[int, Prefix]:
    items = r.sequence(value, path)
    if not items:
        if items is not None:
            r.error(path, "at least one anycast prefix is required")
        return {}
    result: dict[int, Prefix] = {}  # by position in the file, so later checks name the right item
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        item_path = join(path, index)
        data = r.mapping({"prefix": item} if isinstance(item, str) else item, item_path,
                         {"prefix", "next_hop", "healthy", "degraded"})
        if data is None:
            continue
        text = r.need(data, "prefix", item_path, r.string)
        if text is None:
            continue
        try:
            network = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            r.error(join(item_path, "prefix"), f"{text!r} is not a prefix ({exc})")
            continue
        zone = getattr(network.network_address, "scope_id", None)
        if zone is not None:
            r.error(join(item_path, "prefix"), zone_problem(text, zone))
            continue
        next_hop = "self"
        if data.get("next_hop") not in (None, "self"):
            next_hop = r.address(data["next_hop"], join(item_path, "next_hop"), network.version) or "self"
        healthy = _attributes(r, data.get("healthy"), join(item_path, "healthy"), Attributes())
        degraded = _attributes(r, data.get("degraded"), join(item_path, "degraded"), healthy)
        key = str(network)
        if key in seen:
            r.error(item_path, f"prefix {key} is listed twice (also at {path}[{seen[key]}])")
            continue
        seen[key] = index
        result[index] = Prefix(prefix=key, next_hop=next_hop, healthy=healthy, degraded=degraded)
    return result


def _neighbors(r: Reader, value: Any, path: str) -> dict[int, Neighbor]:
    items = r.sequence(value, path)
    if not items:
        if items is not None:
            r.error(path, "at least one BGP neighbor is required")
        return {}
    result: dict[int, Neighbor] = {}  # by position in the file, so later checks name the right item
    seen: set[str] = set()
    for index, item in enumerate(items):
        item_path = join(path, index)
        data = r.mapping(item, item_path, {"address", "peer_as", "local_address", "description",
                                           "hold_time", "passive"})
        if data is None:
            continue
        address = r.need(data, "address", item_path, r.address)
        peer_as = r.need(data, "peer_as", item_path, lambda v, p: r.integer(v, p, 1, U32))
        local = None
        if data.get("local_address") is not None and address is not None:
            local = r.address(data["local_address"], join(item_path, "local_address"),
                              ipaddress.ip_address(address).version)
        description = r.optional(data, "description", item_path, r.exabgp_text, "")
        hold_time = r.optional(data, "hold_time", item_path, lambda v, p: _hold_time(r, v, p), 9)
        passive = r.optional(data, "passive", item_path, r.boolean, False)
        if address is None or peer_as is None:
            continue
        if address in seen:
            r.error(join(item_path, "address"), f"neighbor {address} is listed twice")
            continue
        seen.add(address)
        result[index] = Neighbor(address, peer_as, local, description, hold_time, passive)
    return result


def _hold_time(r: Reader, value: Any, path: str) -> int | None:
    hold = r.integer(value, path, 0, U16)
    if hold is not None and 0 < hold < 3:
        r.error(path, f"{hold} is not allowed: a hold time is 0 or at least 3 seconds (RFC 4271)")
        return None
    return hold


def _servers(r: Reader, value: Any, path: str) -> dict[int, Server]:
    items = r.sequence(value, path)
    if not items:
        if items is not None:
            r.error(path, "at least one VPN server is required")
        return {}
    result: dict[int, Server] = {}  # by position in the file, so later checks name the right item
    names: dict[str, int] = {}
    targets: dict[tuple[str, int | None], int] = {}
    for index, item in enumerate(items):
        item_path = join(path, index)
        server = _server(r, item, item_path)
        if server is None:
            continue
        name, address, port = server.name, server.address, server.port
        if name in names:
            r.error(join(item_path, "name"), f"server name {name!r} is used twice (also {path}[{names[name]}])")
            continue
        if (address, port) in targets:
            r.error(item_path, f"server {address} port {port or 'default'} is listed twice "
                               f"(also {path}[{targets[(address, port)]}])")
            continue
        names[name] = index
        targets[(address, port)] = index
        result[index] = server
    return result


_VALIDATED: dict[Any, Server] = {}  # server items validated without a problem, by their exact values
_VALIDATED_LIMIT = 20_000  # then start over: a process that reloads ever new servers does not grow


def _server(r: Reader, item: Any, path: str) -> Server | None:
    """One item of `servers`. An item with exactly the values of one validated before is not
    validated again (a reload of 1,000 servers changes a few: issue 12's reload goal); the
    checks across items (names and targets used twice) still run for every item."""
    key = _exact(item)
    if key is not None and (known := _VALIDATED.get(key)) is not None:
        return known
    problems = len(r.problems)
    data = r.mapping(item, path, {"name", "address", "port", "weight", "enabled", "wireguard"})
    if data is None:
        return None
    name = r.need(data, "name", path, lambda v, p: _name(r, v, p))
    address = r.need(data, "address", path, r.address)
    port = r.optional(data, "port", path, lambda v, p: r.integer(v, p, 1, U16), None)
    weight = r.optional(data, "weight", path, lambda v, p: r.integer(v, p, 1, 256), 1)
    enabled = r.optional(data, "enabled", path, r.boolean, True)
    wireguard = None
    if data.get("wireguard") is not None:
        wireguard = _wireguard_target(r, data["wireguard"], join(path, "wireguard"))
    if name is None or address is None:
        return None
    server = Server(name, address, port, weight, enabled, wireguard)
    if key is not None and len(r.problems) == problems:
        if len(_VALIDATED) >= _VALIDATED_LIMIT:
            _VALIDATED.clear()
        _VALIDATED[key] = server
    return server


def _exact(value: Any) -> Any:
    """A hashable stand-in for a parsed YAML value that keeps apart what Python takes for equal
    across types (1, 1.0 and true), or None for anything it does not know."""
    kind = type(value)
    if kind in (str, int, float, bool) or value is None:
        return kind.__name__, value
    if kind is dict:
        pairs = []
        for name, inner in value.items():
            exact = _exact(inner)
            if type(name) is not str or exact is None:
                return None
            pairs.append((name, exact))
        return "mapping", tuple(sorted(pairs))
    return None


def _wireguard_target(r: Reader, value: Any, path: str) -> WireGuardTarget | None:
    data = r.mapping(value, path, {"public_key", "port"})
    if data is None:
        return None
    key = r.need(data, "public_key", path, lambda v, p: r.string(
        v, p, pattern=_B64_KEY, what="a base64 Curve25519 key (44 characters, as `wg pubkey` prints)"))
    port = r.optional(data, "port", path, lambda v, p: r.integer(v, p, 1, U16), 51820)
    return None if key is None else WireGuardTarget(public_key=key, port=port)


def _timing(r: Reader, data: dict[str, Any], path: str, defaults: Any) -> dict[str, Any]:
    """interval, fast_interval, timeout, rise, fall, fall_definitive — shared by every tier."""
    values = {
        "interval": r.optional(data, "interval", path, lambda v, p: r.number(v, p, 0.01, 3600), defaults.interval),
        "fast_interval": r.optional(data, "fast_interval", path, lambda v, p: r.number(v, p, 0.01, 3600),
                                    defaults.fast_interval),
        "timeout": r.optional(data, "timeout", path, lambda v, p: r.number(v, p, 0.01, 60), defaults.timeout),
        "rise": r.optional(data, "rise", path, lambda v, p: r.integer(v, p, 1, 100), defaults.rise),
        "fall": r.optional(data, "fall", path, lambda v, p: r.integer(v, p, 1, 100), defaults.fall),
        "fall_definitive": r.optional(data, "fall_definitive", path, lambda v, p: r.integer(v, p, 1, 100),
                                      defaults.fall_definitive),
    }
    if values["fast_interval"] > values["interval"]:
        r.error(join(path, "fast_interval"), f"{values['fast_interval']} is longer than interval "
                                               f"{values['interval']}; it is the faster pace while a state changes")
    if values["fall_definitive"] > values["fall"]:
        r.error(join(path, "fall_definitive"), "must not exceed fall (a definitive failure is stronger evidence)")
    return values


_TIMING_KEYS = {"interval", "fast_interval", "timeout", "rise", "fall", "fall_definitive"}


def _checks(r: Reader, value: Any, path: str) -> Checks:
    data = r.mapping(value, path, {"l4", "wireguard", "realtime_priority"})
    if data is None:
        return Checks()
    realtime = r.optional(data, "realtime_priority", path, lambda v, p: r.integer(v, p, 0, 99), 0)
    l4 = L4Check()
    l4_data = r.mapping(data.get("l4"), join(path, "l4"), _TIMING_KEYS | {"kind", "port"})
    if l4_data is not None:
        l4_path = join(path, "l4")
        kinds, what = re.compile(r"^(tcp|syn|auto|icmp)$"), "a check kind (tcp, syn, auto or icmp)"
        kind = r.optional(l4_data, "kind", l4_path,
                          lambda v, p: r.string(v, p, pattern=kinds, what=what), "tcp")
        port = r.optional(l4_data, "port", l4_path, lambda v, p: r.integer(v, p, 1, U16), l4.port)
        l4 = L4Check(kind=kind, port=port, **_timing(r, l4_data, l4_path, l4))
    wg = WireGuardCheck()
    wg_data = r.mapping(data.get("wireguard"), join(path, "wireguard"),
                        _TIMING_KEYS | {"enabled", "probe_key_file", "psk_file", "through", "tunnel_address",
                                        "data_timeout"})
    if wg_data is not None:
        wg_path = join(path, "wireguard")
        through = r.optional(wg_data, "through", wg_path, lambda v, p: r.address(v, p, 4), None)
        tunnel_address = r.optional(wg_data, "tunnel_address", wg_path, lambda v, p: r.address(v, p, 4), None)
        if through is not None and tunnel_address is None and "tunnel_address" not in wg_data:
            r.error(join(wg_path, "tunnel_address"), "required with through: the probe's own IPv4 address inside "
                                                     "the tunnel (in the servers' allowed-ips for the probe peer)")
        wg = WireGuardCheck(
            enabled=r.optional(wg_data, "enabled", wg_path, r.boolean, False),
            probe_key_file=r.optional(wg_data, "probe_key_file", wg_path, r.absolute_path,
                                      wg.probe_key_file),
            psk_file=r.optional(wg_data, "psk_file", wg_path, r.absolute_path, None),
            through=through,
            tunnel_address=tunnel_address,
            data_timeout=r.optional(wg_data, "data_timeout", wg_path, lambda v, p: r.number(v, p, 0.01, 60),
                                    wg.data_timeout),
            **_timing(r, wg_data, wg_path, wg),
        )
    return Checks(l4=l4, wireguard=wg, realtime_priority=realtime)


def _pool(r: Reader, value: Any, path: str) -> Pool:
    data = r.mapping(value, path, {"low_watermark", "high_watermark", "hold_down"})
    if data is None:
        return Pool()
    default = Pool()
    low = r.optional(data, "low_watermark", path, lambda v, p: r.number(v, p, 0.0, 1.0, low_open=True),
                     default.low_watermark)
    high = r.optional(data, "high_watermark", path, lambda v, p: r.number(v, p, 0.0, 1.0, low_open=True),
                      default.high_watermark)
    if high < low:
        r.error(join(path, "high_watermark"), f"{high} is below low_watermark {low}; the PoP would flap")
    hold_down = r.optional(data, "hold_down", path, lambda v, p: r.number(v, p, 0.0, 3600), default.hold_down)
    return Pool(low_watermark=low, high_watermark=high, hold_down=hold_down)


def _status(r: Reader, value: Any, path: str) -> StatusEndpoint:
    data = r.mapping(value, path, {"listen", "port", "enabled", "readers_port"})
    if data is None:
        return StatusEndpoint()
    default = StatusEndpoint()
    port = r.optional(data, "port", path, lambda v, p: r.integer(v, p, 1, U16), default.port)
    readers = r.optional(data, "readers_port", path, lambda v, p: r.integer(v, p, 1, U16), None)
    if readers is not None and readers == port:
        r.error(join(path, "readers_port"), f"{readers} is also status.port: the readers need a port of their own")
    return StatusEndpoint(
        listen=r.optional(data, "listen", path, r.address, default.listen),
        port=port,
        enabled=r.optional(data, "enabled", path, r.boolean, default.enabled),
        readers_port=readers,
    )


def _control(r: Reader, value: Any, path: str) -> Control:
    data = r.mapping(value, path, {"token_file"})
    if data is None:
        return Control()
    return Control(token_file=r.optional(data, "token_file", path, r.absolute_path, ""))


def _availability(r: Reader, value: Any, path: str) -> Availability:
    data = r.mapping(value, path, {"slo"})
    if data is None:
        return Availability()
    slo = r.optional(data, "slo", path, lambda v, p: r.number(v, p, 0.0, 1.0, low_open=True),
                     Availability().slo)
    if slo is not None and slo >= 1.0:
        r.error(join(path, "slo"), "must be below 1: an objective of 100 % leaves no error budget")
    return Availability(slo=slo)


def _exabgp(r: Reader, value: Any, path: str) -> ExaBGP:
    data = r.mapping(value, path, {"reassert_interval", "withdraw_settle", "ack_timeout", "watchdog",
                                       "graceful_restart"})
    if data is None:
        return ExaBGP()
    default = ExaBGP()
    return ExaBGP(
        reassert_interval=r.optional(data, "reassert_interval", path, lambda v, p: r.number(v, p, 0, 86400),
                                     default.reassert_interval),
        withdraw_settle=r.optional(data, "withdraw_settle", path, lambda v, p: r.number(v, p, 0, 60),
                                   default.withdraw_settle),
        ack_timeout=r.optional(data, "ack_timeout", path, lambda v, p: r.number(v, p, 0.1, 300, low_open=True),
                               default.ack_timeout),
        watchdog=r.optional(data, "watchdog", path, lambda v, p: _watchdog(r, v, p), default.watchdog),
        graceful_restart=r.optional(data, "graceful_restart", path, lambda v, p: r.integer(v, p, 0, 60),
                                    default.graceful_restart),
    )


def _watchdog(r: Reader, value: Any, path: str) -> float | None:
    seconds = r.number(value, path, 0, 600)
    if seconds is not None and 0 < seconds < 1:
        r.error(path, f"{seconds:g} s is too short to tell a hung engine from a busy one; at least 1, or 0 for off")
        return None
    return seconds


_SCHEDULERS = {"mh", "sh", "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sed", "nq", "fo", "ovf", "twos"}


def _dataplane(r: Reader, value: Any, path: str) -> Dataplane:
    data = r.mapping(value, path, {"mode", "vip", "withdraw_dwell", "table", "protocol", "hash_policy",
                                   "scheduler", "forward", "services", "drain_timeout", "load_weights",
                                   "pin_flows", "verify_interval"})
    default = Dataplane()
    if data is None:
        return default

    def choice(key: str, allowed: set[str], what: str, fallback: str) -> str:
        pattern = re.compile("^(" + "|".join(sorted(allowed)) + ")$")
        return r.optional(data, key, path, lambda v, p: r.string(v, p, pattern=pattern, what=what), fallback)

    mode = choice("mode", {"none", "ecmp", "ipvs"}, "a data plane mode (none, ecmp or ipvs)", default.mode)
    services = default.services
    if "services" in data:
        parsed = []
        for index, item in enumerate(r.sequence(data["services"], join(path, "services")) or []):
            item_path = join(join(path, "services"), index)
            entry = r.mapping(item, item_path, {"protocol", "port"})
            if entry is None:
                continue
            protocol = r.need(entry, "protocol", item_path, lambda v, p: r.string(
                v, p, pattern=re.compile(r"^(udp|tcp)$"), what="a protocol (udp or tcp)"))
            port = r.need(entry, "port", item_path, lambda v, p: r.integer(v, p, 1, U16))
            if protocol is not None and port is not None:
                parsed.append(ServicePort(protocol, port))
        if len(set(parsed)) != len(parsed):
            r.error(join(path, "services"), "lists the same protocol and port twice")
        services = tuple(parsed)
    result = Dataplane(
        mode=mode,
        vip=r.optional(data, "vip", path, r.boolean, mode == "ipvs"),
        withdraw_dwell=r.optional(data, "withdraw_dwell", path, lambda v, p: r.number(v, p, 0, 600),
                                  default.withdraw_dwell),
        table=r.optional(data, "table", path, lambda v, p: _table(r, v, p), default.table),
        protocol=r.optional(data, "protocol", path, lambda v, p: r.integer(v, p, 4, 255), default.protocol),
        hash_policy=r.optional(data, "hash_policy", path, lambda v, p: r.integer(v, p, 0, 3), None),
        scheduler=choice("scheduler", _SCHEDULERS, "an IPVS scheduler (" + ", ".join(sorted(_SCHEDULERS)) + ")",
                         default.scheduler),
        forward=choice("forward", {"dr", "tunnel", "nat"}, "a forwarding method (dr, tunnel or nat)",
                       default.forward),
        services=services,
        drain_timeout=r.optional(data, "drain_timeout", path, lambda v, p: r.number(v, p, 0, 86400),
                                 default.drain_timeout),
        load_weights=r.optional(data, "load_weights", path, r.boolean, default.load_weights),
        pin_flows=r.optional(data, "pin_flows", path, r.boolean, default.pin_flows),
        verify_interval=r.optional(data, "verify_interval", path, lambda v, p: r.number(v, p, 0, 3600),
                                   default.verify_interval),
    )
    if result.pin_flows and result.mode != "ecmp":
        r.error(join(path, "pin_flows"), "only for ecmp mode (IPVS keeps its flows on their servers itself)")
    if result.mode == "ipvs" and not result.services:
        r.error(join(path, "services"), "ipvs mode needs at least one service port")
    if result.mode == "ipvs" and "vip" in data and not result.vip:
        r.error(join(path, "vip"), "ipvs mode needs the VIP on lo (IPVS only sees traffic to a local address)")
    if result.mode == "ecmp" and result.vip:
        r.error(join(path, "vip"), "ecmp mode must not hold the VIP on the PoP: a local address wins over "
                                    "the multipath route and the PoP would answer itself")
    return result


def _table(r: Reader, value: Any, path: str) -> int | None:
    table = r.integer(value, path, 1, U32)
    if table in (253, 255):  # the kernel's own `default` and `local` tables
        r.error(path, f"{table} is a table the kernel owns (253 default, 255 local)")
        return None
    return table


_TOP = {"pop", "neighbors", "prefixes", "servers", "checks", "pool", "status", "control", "exabgp", "dataplane",
        "external", "drain", "availability", "dampening", "fleet", "load", "tails"}


def load(text: str | bytes, source: str = "pop.yaml") -> Config:
    """Parse one PoP's YAML configuration. Raises ConfigError listing every problem."""
    r = Reader(source)
    document = parse_yaml(text, source)
    try:
        return _build(r, document)
    except RecursionError:
        raise ConfigError([f"{source}: (top level): nesting is too deep"]) from None


def _build(r: Reader, document: Any) -> Config:
    if document is None:
        raise ConfigError([f"{r.source}: (top level): the file is empty"])
    top = r.mapping(document, "", _TOP)
    if top is None:
        raise ConfigError(r.problems)
    pop_data = r.need(top, "pop", "", lambda v, p: r.mapping(v, p, {"name", "asn", "router_id", "runtime_dir"}))
    name = asn = router_id = None
    runtime_dir = "/run/pop"
    if pop_data is not None:
        name = r.need(pop_data, "name", "pop", lambda v, p: _name(r, v, p))
        asn = r.need(pop_data, "asn", "pop", lambda v, p: r.integer(v, p, 1, U32))
        router_id = r.need(pop_data, "router_id", "pop", lambda v, p: r.address(v, p, 4))
        runtime_dir = r.optional(pop_data, "runtime_dir", "pop", r.absolute_path, runtime_dir)
    neighbors = r.need(top, "neighbors", "", lambda v, p: _neighbors(r, v, p)) or {}
    prefixes = r.need(top, "prefixes", "", lambda v, p: _prefixes(r, v, p)) or {}
    servers = r.need(top, "servers", "", lambda v, p: _servers(r, v, p)) or {}
    checks = _checks(r, top.get("checks"), "checks")
    pool = _pool(r, top.get("pool"), "pool")
    status = _status(r, top.get("status"), "status")
    control = _control(r, top.get("control"), "control")
    exabgp = _exabgp(r, top.get("exabgp"), "exabgp")
    dataplane = _dataplane(r, top.get("dataplane"), "dataplane")
    external = config_external.parse(r, top.get("external"), "external")
    drain = config_drain.parse(r, top.get("drain"), "drain")
    availability = _availability(r, top.get("availability"), "availability")
    dampening = config_dampening.parse(r, top.get("dampening"), "dampening")
    fleet = config_fleet.parse(r, top.get("fleet"), "fleet")
    load_policy = config_load.parse_load(r, top.get("load"), "load")
    tails = config_load.parse_tails(r, top.get("tails"), "tails")
    if load_policy.enabled and dataplane.mode == "none":
        r.error("load.enabled", "the load signal sets data-plane weights: it needs dataplane.mode ecmp or ipvs")
    if load_policy.enabled and dataplane.load_weights:
        r.error("load.enabled", "dataplane.load_weights (connection counts) is on too: choose one load signal")
    _cross_checks(r, neighbors, prefixes, servers, checks)
    config_external.check_beacons(r, external, (p.prefix for p in prefixes.values()), neighbors.items())
    if r.problems or name is None or asn is None or router_id is None:
        raise ConfigError(r.problems or [f"{r.source}: pop: is incomplete"])
    return Config(name=name, asn=asn, router_id=router_id, neighbors=tuple(neighbors.values()),
                  prefixes=tuple(prefixes.values()), servers=tuple(servers.values()), checks=checks, pool=pool,
                  status=status, control=control, exabgp=exabgp, dataplane=dataplane, external=external,
                  drain=drain, availability=availability, dampening=dampening, fleet=fleet, load=load_policy,
                  tails=tails, runtime_dir=runtime_dir,
                  source=r.source)


def _name(r: Reader, value: Any, path: str) -> str | None:
    return r.name(value, path)


def _cross_checks(r: Reader, neighbors: dict[int, Neighbor], prefixes: dict[int, Prefix], servers: dict[int, Server],
                  checks: Checks) -> None:
    families = {n.version for n in neighbors.values()}
    for index, prefix in prefixes.items():
        if neighbors and prefix.version not in families:
            r.error(f"prefixes[{index}]", f"{prefix.prefix} is IPv{prefix.version} but no neighbor is "
                                          f"IPv{prefix.version}; it would never be announced")
    if checks.wireguard.enabled:
        for index, server in servers.items():
            if server.wireguard is None:
                r.error(f"servers[{index}].wireguard", "is required when checks.wireguard.enabled is true "
                                                       "(public_key of the server)")
