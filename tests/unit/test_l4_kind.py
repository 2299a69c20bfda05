"""checks.l4.kind chooses how tier 1 probes: a connect, a SYN from a raw socket, or ICMP."""

from __future__ import annotations

import pytest

from pop.checks import cascade, syn
from pop.checks.l4 import IcmpCheck, TcpCheck
from pop.checks.syn import SynCheck
from pop.config import ConfigError, load


def config(kind: str) -> str:
    return f"""
pop: {{name: ams1, asn: 65101, router_id: 192.0.2.1}}
neighbors: [{{address: 10.0.0.1, peer_as: 65000}}]
prefixes: [198.51.100.1/32]
checks: {{l4: {{kind: {kind}}}}}
servers: [{{name: v4, address: 10.0.2.10}}, {{name: v6, address: "2001:db8::10", port: 8443}}]
"""


def tier1(kind: str) -> dict[str, tuple[type, int | None]]:
    checks = cascade.build(load(config(kind), "pop.yaml"))
    return {name: (type(pairs[0][0]), getattr(pairs[0][0], "port", None)) for name, pairs in checks.items()}


@pytest.mark.parametrize(("kind", "raw", "expected"), [
    ("tcp", True, {"v4": (TcpCheck, 443), "v6": (TcpCheck, 8443)}),
    ("syn", True, {"v4": (SynCheck, 443), "v6": (TcpCheck, 8443)}),  # the SYN codec is IPv4's
    ("auto", True, {"v4": (SynCheck, 443), "v6": (TcpCheck, 8443)}),
    ("auto", False, {"v4": (TcpCheck, 443), "v6": (TcpCheck, 8443)}),
    ("icmp", True, {"v4": (IcmpCheck, None), "v6": (IcmpCheck, None)}),
])
def test_kind_chooses_the_probe(monkeypatch: pytest.MonkeyPatch, kind: str, raw: bool,
                                expected: dict[str, tuple[type, int | None]]) -> None:
    monkeypatch.setattr(syn, "available", lambda: raw)
    assert tier1(kind) == expected


def test_syn_without_cap_net_raw_is_a_config_error_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(syn, "available", lambda: False)
    with pytest.raises(ConfigError) as info:
        tier1("syn")
    assert list(info.value.problems) == ["pop.yaml: checks.l4.kind: syn needs CAP_NET_RAW for its raw socket "
                                         "(run as root, or use kind: auto to fall back to tcp)"]


def test_the_syn_check_is_the_tcp_tier() -> None:
    # hysteresis, status and metrics know the tier as "tcp" whichever way it probes
    assert SynCheck("10.0.2.10", 443, 0.25).name == TcpCheck("10.0.2.10", 443, 0.25).name == "tcp"
