"""The cascade: every server's checks, each with the hysteresis policy of its tier.

Tier 1 (L4: TCP connect, TCP SYN from a raw socket, or ICMP echo) always, tier 2 (a WireGuard
handshake, and with `through` an ICMP echo through the tunnel after it) when enabled.
`build()` reads the probe key files, so it is where a missing, malformed or world-readable key
is found; its errors are ConfigError problems named by the config key path, like the loader's.
"""


from __future__ import annotations

import ipaddress

from pop.checks import syn
from pop.checks.base import Check
from pop.checks.l4 import IcmpCheck, TcpCheck
from pop.checks.syn import SynCheck
from pop.config import Config, ConfigError, Server
from pop.hysteresis import Policy

Pairs = list[tuple[Check, Policy]]

# the checks of the last build, by everything they were built from: a reload builds only the
# servers that changed (issue 12: one changed server among 1,000); the rest keep their objects
_built: dict[tuple[object, ...], Pairs] = {}


def build(config: Config) -> dict[str, Pairs]:
    """The checks of every server, each with the hysteresis policy of its tier.

    A server whose record, check settings and keys are those of the previous build gets the
    same check objects again (a check holds no state of one probe between probes)."""
    kind = _l4_kind(config)
    wg = config.checks.wireguard
    probe_key, psk, problems = _probe_keys(config) if wg.enabled else (None, None, [])
    result: dict[str, Pairs] = {}
    built: dict[tuple[object, ...], Pairs] = {}
    for index, server in enumerate(config.servers):
        key = (server, config.checks, kind, probe_key, psk)
        pairs = _built.get(key)
        if pairs is None:
            pairs = [(_tier1(config, server, kind), Policy.of(config.checks.l4))]
            if wg.enabled:
                tier2 = _tier2(config, index, server, (probe_key, psk), problems)
                if tier2 is None:
                    continue
                pairs.append((tier2, Policy.of(wg)))
        result[server.name] = built[key] = pairs
    if problems:
        raise ConfigError(problems)
    _built.clear()
    _built.update(built)
    return {name: list(pairs) for name, pairs in result.items()}


def _l4_kind(config: Config) -> str:
    kind = config.checks.l4.kind
    if kind not in ("syn", "auto"):
        return kind
    if syn.available():
        return "syn"
    if kind == "syn":
        raise ConfigError([f"{config.source}: checks.l4.kind: syn needs CAP_NET_RAW for its raw socket "
                           f"(run as root, or use kind: auto to fall back to tcp)"])
    return "tcp"


def _tier1(config: Config, server: Server, kind: str) -> Check:
    l4 = config.checks.l4
    port = server.port or l4.port
    if kind == "icmp":
        return IcmpCheck(server.address, l4.timeout)
    if kind == "syn" and ipaddress.ip_address(server.address).version == 4:
        return SynCheck(server.address, port, l4.timeout)
    return TcpCheck(server.address, port, l4.timeout)  # an IPv6 server keeps the connect: the SYN codec is IPv4's


def _probe_keys(config: Config) -> tuple[bytes | None, bytes | None, list[str]]:
    from pop import wgkeys

    wg = config.checks.wireguard
    problems = []
    probe_key = psk = None
    try:
        probe_key = wgkeys.read_private_key(wg.probe_key_file)
    except ValueError as exc:
        problems.append(f"{config.source}: checks.wireguard.probe_key_file: {exc}")
    if wg.psk_file is not None:
        try:
            psk = wgkeys.read_psk(wg.psk_file)
        except ValueError as exc:
            problems.append(f"{config.source}: checks.wireguard.psk_file: {exc}")
    return probe_key, psk, problems


def _tier2(config: Config, index: int, server: Server, keys: tuple[bytes | None, bytes | None],
           problems: list[str]) -> Check | None:
    # scapy and the handshake crypto load only when the tier is in use
    from pop import wgkeys
    from pop.checks.tunnel import Echo
    from pop.checks.wireguard import WireGuardCheck

    assert server.wireguard is not None  # the loader requires it when the tier is enabled
    probe_key, psk = keys
    try:
        server_key = wgkeys.parse_public_key(server.wireguard.public_key)
    except ValueError as exc:
        problems.append(f"{config.source}: servers[{index}].wireguard.public_key: {exc}")
        return None
    if probe_key is None:
        return None
    wg = config.checks.wireguard
    echo = Echo(wg.tunnel_address, wg.through) if wg.through and wg.tunnel_address else None
    return WireGuardCheck(server.address, server.wireguard.port, server_key, probe_key, psk=psk,
                          timeout=wg.timeout, through=echo, data_timeout=wg.data_timeout)
