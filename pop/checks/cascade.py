"""The cascade: every server's checks, each with the hysteresis policy of its tier.

Tier 1 (L4: TCP connect, TCP SYN from a raw socket, or ICMP echo) always, tier 2 (a WireGuard handshake) when enabled.
`build()` reads the probe key files, so it is where a missing, malformed or world-readable key
is found; its errors are ConfigError problems named by the config key path, like the loader's.
"""


from __future__ import annotations

import ipaddress

from pop.checks import syn
from pop.checks.base import Check
from pop.checks.l4 import IcmpCheck, TcpCheck
from pop.checks.syn import SynCheck
from pop.config import Config, ConfigError
from pop.hysteresis import Policy


def build(config: Config) -> dict[str, list[tuple[Check, Policy]]]:
    """The checks of every server, each with the hysteresis policy of its tier."""
    l4 = config.checks.l4
    kind = l4.kind
    if kind in ("syn", "auto"):
        if syn.available():
            kind = "syn"
        elif kind == "syn":
            raise ConfigError([f"{config.source}: checks.l4.kind: syn needs CAP_NET_RAW for its raw socket "
                               f"(run as root, or use kind: auto to fall back to tcp)"])
        else:
            kind = "tcp"
    result: dict[str, list[tuple[Check, Policy]]] = {}
    for server in config.servers:
        port = server.port or l4.port
        tier1: Check
        if kind == "icmp":
            tier1 = IcmpCheck(server.address, l4.timeout)
        elif kind == "syn" and ipaddress.ip_address(server.address).version == 4:
            tier1 = SynCheck(server.address, port, l4.timeout)
        else:  # an IPv6 server keeps the connect: the SYN codec is IPv4's
            tier1 = TcpCheck(server.address, port, l4.timeout)
        result[server.name] = [(tier1, Policy.of(l4))]
    wg = config.checks.wireguard
    if wg.enabled:
        # scapy and the handshake crypto load only when the tier is in use
        from pop import wgkeys
        from pop.checks.wireguard import WireGuardCheck

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
        for index, server in enumerate(config.servers):
            assert server.wireguard is not None  # the loader requires it when the tier is enabled
            try:
                server_key = wgkeys.parse_public_key(server.wireguard.public_key)
            except ValueError as exc:
                problems.append(f"{config.source}: servers[{index}].wireguard.public_key: {exc}")
                continue
            if probe_key is not None:
                tier2 = WireGuardCheck(server.address, server.wireguard.port, server_key, probe_key, psk=psk,
                                       timeout=wg.timeout)
                result[server.name].append((tier2, Policy.of(wg)))
        if problems:
            raise ConfigError(problems)
    return result
