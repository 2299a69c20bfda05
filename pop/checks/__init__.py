"""Health checks: async probes that each return a CheckResult value (see base.py)."""

from __future__ import annotations

from pop.checks.base import Check
from pop.checks.l4 import IcmpCheck, TcpCheck
from pop.config import Config
from pop.hysteresis import Policy


def build(config: Config) -> dict[str, list[tuple[Check, Policy]]]:
    """The checks of every server, each with the hysteresis policy of its tier."""
    l4 = config.checks.l4
    result: dict[str, list[tuple[Check, Policy]]] = {}
    for server in config.servers:
        tier1: Check = (IcmpCheck(server.address, l4.timeout) if l4.kind == "icmp"
                        else TcpCheck(server.address, server.port or l4.port, l4.timeout))
        result[server.name] = [(tier1, Policy.of(l4))]
    return result
