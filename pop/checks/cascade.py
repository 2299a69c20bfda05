"""The cascade: every server's checks, each with the hysteresis policy of its tier.

Tier 1 (L4: TCP connect or ICMP echo) always, tier 2 (a WireGuard handshake, and with
`through` an ICMP echo through the tunnel after it) when enabled.
`build()` reads the probe key files, so it is where a missing, malformed or world-readable key
is found; its errors are ConfigError problems named by the config key path, like the loader's.
"""


from __future__ import annotations

from pop.checks.base import Check
from pop.checks.l4 import IcmpCheck, TcpCheck
from pop.config import Config, ConfigError
from pop.hysteresis import Policy


def build(config: Config) -> dict[str, list[tuple[Check, Policy]]]:
    """The checks of every server, each with the hysteresis policy of its tier."""
    l4 = config.checks.l4
    result: dict[str, list[tuple[Check, Policy]]] = {}
    for server in config.servers:
        tier1: Check = (IcmpCheck(server.address, l4.timeout) if l4.kind == "icmp"
                        else TcpCheck(server.address, server.port or l4.port, l4.timeout))
        result[server.name] = [(tier1, Policy.of(l4))]
    wg = config.checks.wireguard
    if wg.enabled:
        # scapy and the handshake crypto load only when the tier is in use
        from pop import wgkeys
        from pop.checks.tunnel import Echo
        from pop.checks.wireguard import WireGuardCheck

        echo = Echo(wg.tunnel_address, wg.through) if wg.through and wg.tunnel_address else None

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
                                       timeout=wg.timeout, through=echo, data_timeout=wg.data_timeout)
                result[server.name].append((tier2, Policy.of(wg)))
        if problems:
            raise ConfigError(problems)
    return result
