"""agent.yaml: defaults, and every problem named by file, key path and what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from pop import wgkeys
from pop.agent.config import AgentConfig, ConfigError, PopTarget, Target, WireGuardProbe, load

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "agent.yaml"
PUBLIC = X25519PrivateKey.generate().public_key().public_bytes_raw()
MINIMAL = """
name: probe1
key_file: /etc/pop/agent.key
pops:
  - {name: pop1, address: 192.0.2.1, tcp_port: 443}
"""


def test_minimal_config_takes_the_documented_defaults() -> None:
    assert load(MINIMAL) == AgentConfig(
        name="probe1", key_file="/etc/pop/agent.key", pops=(PopTarget("pop1", (Target("192.0.2.1", 443),)),),
        listen="0.0.0.0", port=9190, probe_key_file=None, interval=0.5, timeout=0.5, rise=2, fall=3,
        identity_port=9191, anycast=())


def test_wireguard_target_and_anycast_are_parsed() -> None:
    config = load(f"""
name: probe1
key_file: k
probe_key_file: p
anycast: [198.51.100.1, "2001:db8:100::1"]
pops:
  - {{name: pop1, address: "2001:db8::1", tcp_port: 443, wireguard: {{public_key: "{wgkeys.encode_key(PUBLIC)}"}}}}
""")
    assert config.pops[0].targets[0].wireguard == WireGuardProbe(PUBLIC, 51820)
    assert config.anycast == ("198.51.100.1", "2001:db8:100::1")


def test_a_pop_with_several_targets() -> None:
    config = load(f"""
name: probe1
key_file: k
probe_key_file: p
pops:
  - name: pop1
    targets:
      - {{name: vpn11, address: 10.1.1.2, tcp_port: 443, wireguard: {{public_key: "{wgkeys.encode_key(PUBLIC)}"}}}}
      - {{name: vpn12, address: 10.1.2.2, tcp_port: 443}}
""")
    assert config.pops[0].targets == (Target("10.1.1.2", 443, WireGuardProbe(PUBLIC, 51820), "vpn11"),
                                      Target("10.1.2.2", 443, None, "vpn12"))
    assert [t.check_name("tcp") for t in config.pops[0].targets] == ["vpn11.tcp", "vpn12.tcp"]


def test_the_documented_example_loads() -> None:
    config = load(EXAMPLE.read_text(), "agent.yaml")
    assert config.name and len(config.pops) >= 2


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(text)
    return list(caught.value.problems)


@pytest.mark.parametrize(("text", "expected"), [
    ("", "agent.yaml: (top level): the file is empty"),
    ("name: [", "agent.yaml: line 1 column 8: not valid YAML"),
    ("- a", "agent.yaml: (top level): must be a mapping, not a list"),
    (MINIMAL + "intervall: 1", "agent.yaml: intervall: unknown key (did you mean 'interval'?)"),
    ("key_file: k\npops: [{name: p, address: 192.0.2.1, tcp_port: 1}]", "agent.yaml: name: is required"),
    ("name: a\npops: [{name: p, address: 192.0.2.1, tcp_port: 1}]", "agent.yaml: key_file: is required"),
    ("name: a\nkey_file: k", "agent.yaml: pops: is required"),
    ("name: a\nkey_file: k\npops: []", "agent.yaml: pops: at least one PoP is required"),
    ("name: a b\nkey_file: k\npops: [{name: p, address: 192.0.2.1, tcp_port: 1}]",
     "agent.yaml: name: 'a b' is not a name (letters, digits, '_', '.', '-'; at most 63)"),
    ("name: a\nkey_file: k\npops: [{name: p, address: 192.0.2.1, tcp_port: 1}, {name: q, address: nowhere, tcp_port: 1}]",
     "agent.yaml: pops[1].address: 'nowhere' is not an IP address"),
    ("name: a\nkey_file: k\npops: [{name: p, address: 192.0.2.1, tcp_port: 0}]",
     "agent.yaml: pops[0].tcp_port: 0 is out of range 1..65535"),
    ("name: a\nkey_file: k\npops: [{name: p, address: 192.0.2.1}]", "agent.yaml: pops[0].tcp_port: is required"),
    ("name: a\nkey_file: k\npops: [{name: p, address: 192.0.2.1, tcp_port: 1}, {name: p, address: 192.0.2.2, tcp_port: 1}]",
     "agent.yaml: pops[1].name: PoP name 'p' is used twice (also pops[0])"),
    ("name: a\nkey_file: k\nprobe_key_file: p\npops: [{name: p, address: 192.0.2.1, tcp_port: 1, wireguard: {public_key: xyz}}]",
     "agent.yaml: pops[0].wireguard.public_key: not a base64 Curve25519 key (32 bytes)"),
    (f"name: a\nkey_file: k\npops: [{{name: p, address: 192.0.2.1, tcp_port: 1, wireguard: {{public_key: '{wgkeys.encode_key(PUBLIC)}'}}}}]",
     "agent.yaml: pops[0].wireguard: needs probe_key_file (the agent's WireGuard private key)"),
    ("name: a\nkey_file: k\npops: [{name: p, address: 192.0.2.1, targets: [{name: t, address: 192.0.2.2, tcp_port: 1}]}]",
     "agent.yaml: pops[0]: either targets or address, not both"),
    ("name: a\nkey_file: k\npops: [{name: p, targets: []}]", "agent.yaml: pops[0].targets: has 0 targets; between 1 and 8"),
    ("name: a\nkey_file: k\npops: [{name: p, targets: [{address: 192.0.2.2, tcp_port: 1}]}]",
     "agent.yaml: pops[0].targets[0].name: is required"),
    ("name: a\nkey_file: k\npops: [{name: p, targets: [{name: t, address: 192.0.2.2, tcp_port: 1}, "
     "{name: t, address: 192.0.2.3, tcp_port: 1}]}]", "agent.yaml: pops[0].targets[1].name: target name 't' is used twice"),
    (f"name: a\nkey_file: k\npops: [{{name: p, targets: [{{name: t, address: 192.0.2.2, tcp_port: 1, "
     f"wireguard: {{public_key: '{wgkeys.encode_key(PUBLIC)}'}}}}]}}]",
     "agent.yaml: pops[0].targets[0].wireguard: needs probe_key_file (the agent's WireGuard private key)"),
    (MINIMAL + "interval: 0", "agent.yaml: interval: 0 is out of range (greater than 0.0 and at most 3600.0)"),
    (MINIMAL + "timeout: fast", "agent.yaml: timeout: must be a number, not a string"),
    (MINIMAL + "rise: 0", "agent.yaml: rise: 0 is out of range 1..100"),
    (MINIMAL + "fall: true", "agent.yaml: fall: must be an integer, not a boolean"),
    (MINIMAL + "listen: localhost", "agent.yaml: listen: 'localhost' is not an IP address"),
    (MINIMAL + "port: 70000", "agent.yaml: port: 70000 is out of range 0..65535"),
    (MINIMAL + "identity_port: 0", "agent.yaml: identity_port: 0 is out of range 1..65535"),
    (MINIMAL + "anycast: [198.51.100.1, 198.51.100.1]", "agent.yaml: anycast[1]: 198.51.100.1 is listed twice"),
    (MINIMAL + "anycast: [198.51.100.0/24]", "agent.yaml: anycast[0]: '198.51.100.0/24' is not an IP address"),
])
def test_bad_input_is_named_by_key_path(text: str, expected: str) -> None:
    assert any(problem.startswith(expected) for problem in problems(text)), problems(text)


def test_every_problem_is_reported_at_once() -> None:
    found = problems("name: a\nkey_file: k\nrise: 0\npops: [{name: p, address: x, tcp_port: 1}]")
    assert len(found) == 2
