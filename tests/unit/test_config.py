"""The config loader: every malformed input gets named problems, never a traceback."""

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pop.config import Config, ConfigError, load

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "pop.yaml"

MINIMAL = """
pop: {name: ams1, asn: 65101, router_id: 192.0.2.1}
neighbors: [{address: 10.0.0.1, peer_as: 65000}]
prefixes: [198.51.100.1/32]
servers: [{name: vpn1, address: 10.0.2.10}]
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(text, "pop.yaml")
    return list(info.value.problems)


def with_(**sections: object) -> str:
    data = yaml.safe_load(MINIMAL)
    data.update(sections)
    return yaml.safe_dump(data)


def test_example_loads() -> None:
    config = load(EXAMPLE.read_text(), str(EXAMPLE))
    assert config.name == "ams1"
    assert [p.prefix for p in config.prefixes] == ["198.51.100.1/32", "2001:db8:100::1/128"]
    assert config.prefixes[0].degraded.med == 200
    assert config.prefixes[0].degraded.communities == ("65101:100",)  # inherited from healthy
    assert config.servers[2].enabled is False


def test_minimal_has_careful_defaults() -> None:
    config = load(MINIMAL)
    assert isinstance(config, Config)
    l4 = config.checks.l4
    assert (l4.kind, l4.interval, l4.fast_interval, l4.timeout, l4.rise, l4.fall, l4.fall_definitive) == (
        "tcp", 0.2, 0.05, 0.25, 3, 6, 2)
    assert (config.pool.low_watermark, config.pool.high_watermark, config.pool.hold_down) == (0.5, 0.6, 5.0)
    assert config.neighbors[0].hold_time == 9
    assert config.status.listen == "127.0.0.1"
    assert config.exabgp.watchdog == 5.0 and load(with_(exabgp={"watchdog": 0})).exabgp.watchdog == 0


@pytest.mark.parametrize(("text", "expected"), [
    ("", "pop.yaml: (top level): the file is empty"),
    ("[1, 2]", "pop.yaml: (top level): must be a mapping, not a list"),
    ("pop: {name: x\n", "pop.yaml: line 2 column 1: not valid YAML: expected ',' or '}', but got '<stream end>'"),
    ("\tpop: 1", "pop.yaml: line 1 column 1: not valid YAML: found character '\\t' that cannot start any token"),
])
def test_not_a_config_at_all(text: str, expected: str) -> None:
    assert problems(text) == [expected]


@pytest.mark.parametrize(("sections", "expected"), [
    ({"pop": {"name": "a b", "asn": 1, "router_id": "1.1.1.1"}},
     "pop.yaml: pop.name: 'a b' is not a name (letters, digits, '_', '.', '-'; at most 63)"),
    ({"pop": {"name": "x", "asn": True, "router_id": "1.1.1.1"}}, "pop.yaml: pop.asn: must be an integer, not a boolean"),
    ({"pop": {"name": "x", "asn": 2**32, "router_id": "1.1.1.1"}}, "pop.yaml: pop.asn: 4294967296 is out of range 1..4294967295"),
    ({"pop": {"name": "x", "asn": 1, "router_id": "::1"}}, "pop.yaml: pop.router_id: ::1 is IPv6, expected IPv4"),
    ({"pop": {"name": "x", "asn": 1}}, "pop.yaml: pop.router_id: is required"),
    ({"prefixes": ["198.51.100.1/24"]},
     "pop.yaml: prefixes[0].prefix: '198.51.100.1/24' is not a prefix (198.51.100.1/24 has host bits set)"),
    ({"prefixes": ["198.51.100.1/32", "198.51.100.1/32"]},
     "pop.yaml: prefixes[1]: prefix 198.51.100.1/32 is listed twice (also at prefixes[0])"),
    ({"prefixes": ["2001:db8::1/128"]},
     "pop.yaml: prefixes[0]: 2001:db8::1/128 is IPv6 but no neighbor is IPv6; it would never be announced"),
    ({"prefixes": [{"prefix": "198.51.100.1/32", "healthy": {"communities": ["65000:1\nannounce route 0.0.0.0/0"]}}]},
     "pop.yaml: prefixes[0].healthy.communities[0]: contains a control character (newline, tab, ...), "
     "which is not allowed"),
    ({"prefixes": [{"prefix": "198.51.100.1/32", "healthy": {"communities": ["65536:1"]}}]},
     "pop.yaml: prefixes[0].healthy.communities[0]: '65536:1' is not a community (ASN:VALUE, each 0..65535, "
     "or one of blackhole, graceful-shutdown, no-advertise, no-export, no-export-subconfed)"),
    ({"prefixes": [{"prefix": "198.51.100.1/32", "healthy": {"med": -1}}]},
     "pop.yaml: prefixes[0].healthy.med: -1 is out of range 0..4294967295"),
    ({"prefixes": [{"prefix": "198.51.100.1/32", "healthy": {"mde": 1}}]},
     "pop.yaml: prefixes[0].healthy.mde: unknown key (did you mean 'med'?)"),
    ({"neighbors": [{"address": "10.0.0.1", "peer_as": 1}, {"address": "10.0.0.1", "peer_as": 2}]},
     "pop.yaml: neighbors[1].address: neighbor 10.0.0.1 is listed twice"),
    ({"neighbors": [{"address": "10.0.0.1", "peer_as": 1, "hold_time": 2}]},
     "pop.yaml: neighbors[0].hold_time: 2 is not allowed: a hold time is 0 or at least 3 seconds (RFC 4271)"),
    ({"neighbors": [{"address": "10.0.0.1", "peer_as": 1, "description": "up\rstream"}]},
     "pop.yaml: neighbors[0].description: contains a control character (newline, tab, ...), which is not allowed"),
    ({"servers": [{"name": "a", "address": "10.0.0.5"}, {"name": "a", "address": "10.0.0.6"}]},
     "pop.yaml: servers[1].name: server name 'a' is used twice (also servers[0])"),
    ({"servers": [{"name": "a", "address": "10.0.0.5"}, {"name": "b", "address": "10.0.0.5"}]},
     "pop.yaml: servers[1]: server 10.0.0.5 port default is listed twice (also servers[0])"),
    ({"servers": [{"name": "a", "address": "10.0.0.5", "wireguard": {"public_key": "short"}}]},
     "pop.yaml: servers[0].wireguard.public_key: 'short' is not a base64 Curve25519 key "
     "(44 characters, as `wg pubkey` prints)"),
    ({"servers": []}, "pop.yaml: servers: at least one VPN server is required"),
    ({"servers": "vpn1"}, "pop.yaml: servers: must be a list, not a string"),
    ({"checks": {"l4": {"fast_interval": 2.0}}},
     "pop.yaml: checks.l4.fast_interval: 2.0 is longer than interval 0.2; it is the faster pace while a state changes"),
    ({"checks": {"l4": {"kind": "udp"}}}, "pop.yaml: checks.l4.kind: 'udp' is not a check kind (tcp, syn, auto or icmp)"),
    ({"checks": {"l4": {"timeout": float("nan")}}},
     "pop.yaml: checks.l4.timeout: nan is out of range (at least 0.01 and at most 60)"),
    ({"checks": {"wireguard": {"enabled": True}}},
     "pop.yaml: servers[0].wireguard: is required when checks.wireguard.enabled is true (public_key of the server)"),
    ({"checks": {"wireguard": {"probe_key_file": "probe.key"}}},
     "pop.yaml: checks.wireguard.probe_key_file: 'probe.key' must be an absolute path"),
    ({"pool": {"low_watermark": 0}}, "pop.yaml: pool.low_watermark: 0 is out of range (greater than 0.0 and at most 1.0)"),
    ({"pool": {"low_watermark": 0.8, "high_watermark": 0.6}},
     "pop.yaml: pool.high_watermark: 0.6 is below low_watermark 0.8; the PoP would flap"),
    ({"status": {"listen": "localhost"}}, "pop.yaml: status.listen: 'localhost' is not an IP address"),
    ({"status": {"port": 9180, "readers_port": 9180}},
     "pop.yaml: status.readers_port: 9180 is also status.port: the readers need a port of their own"),
    ({"status": {"readers_port": 70000}}, "pop.yaml: status.readers_port: 70000 is out of range 1..65535"),
    ({"exabgp": {"watchdog": 0.5}},
     "pop.yaml: exabgp.watchdog: 0.5 s is too short to tell a hung engine from a busy one; at least 1, or 0 for off"),
    ({"dataplane": {"mode": "ipvs", "pin_flows": True}},
     "pop.yaml: dataplane.pin_flows: only for ecmp mode (IPVS keeps its flows on their servers itself)"),
    ({"bogus": 1}, "pop.yaml: bogus: unknown key"),
    # what reaches ExaBGP's configuration or API lines must stay inside ExaBGP's grammar
    ({"neighbors": [{"address": "10.0.0.1", "peer_as": 1, "description": 'x"; peer-as 64999; description "y'}]},
     "pop.yaml: neighbors[0].description: may not contain '\"' (it would end ExaBGP's string)"),
    ({"neighbors": [{"address": "10.0.0.1", "peer_as": 1, "description": "it's"}]},
     "pop.yaml: neighbors[0].description: may not contain \"'\" (ExaBGP would start another string there)"),
    ({"neighbors": [{"address": "10.0.0.1", "peer_as": 1, "description": "a\\u0022b"}]},
     "pop.yaml: neighbors[0].description: may not contain '\\\\' (ExaBGP reads it as an escape)"),
    ({"neighbors": [{"address": "10.0.0.1", "peer_as": 1, "description": "Z\u00fcrich"}]},
     "pop.yaml: neighbors[0].description: may not contain '\u00fc' (only printable ASCII: ExaBGP reads its "
     "configuration in the locale's encoding)"),
    ({"neighbors": [{"address": "10.0.0.1", "peer_as": 1, "description": "up\x85stream"}]},
     "pop.yaml: neighbors[0].description: contains a control character (newline, tab, ...), which is not allowed"),
    ({"prefixes": [{"prefix": "198.51.100.1/32", "healthy": {"communities": ["\u0666\u0665\u0660\u0660\u0660:1"]}}]},
     "pop.yaml: prefixes[0].healthy.communities[0]: '\u0666\u0665\u0660\u0660\u0660:1' is not a community "
     "(ASN:VALUE, each 0..65535, or one of blackhole, graceful-shutdown, no-advertise, no-export, no-export-subconfed)"),
    ({"prefixes": [{"prefix": "198.51.100.1/32", "healthy": {"large_communities": ["1:\u0661:1"]}}]},
     "pop.yaml: prefixes[0].healthy.large_communities[0]: '1:\u0661:1' is not a large community "
     "(GLOBAL:LOCAL1:LOCAL2, each 0..4294967295)"),
    ({"neighbors": [{"address": "fe80::1%x; peer-as 5", "peer_as": 1}]},
     "pop.yaml: neighbors[0].address: 'fe80::1%x; peer-as 5' has an IPv6 zone ('%x; peer-as 5'), "
     "which is not allowed here"),
    ({"neighbors": [{"address": "10.0.0.1", "peer_as": 1}, {"address": "2001:db8::1", "peer_as": 1}],
      "prefixes": [{"prefix": "2001:db8:1::1/128", "next_hop": "fe80::1%eth0"}]},
     "pop.yaml: prefixes[0].next_hop: 'fe80::1%eth0' has an IPv6 zone ('%eth0'), which is not allowed here"),
    ({"neighbors": [{"address": "10.0.0.1", "peer_as": 1}, {"address": "2001:db8::1", "peer_as": 1}],
      "prefixes": ["2001:db8:1::1%x y/128"]},
     "pop.yaml: prefixes[0].prefix: '2001:db8:1::1%x y/128' has an IPv6 zone ('%x y'), which is not allowed here"),
    # tier 3
    ({"neighbors": [{"address": "10.0.0.1", "peer_as": 1, "local_address": "10.0.0.2"}],
      "external": {"beacons": ["198.51.100.0/24"]}},
     "pop.yaml: external.beacons[0]: 198.51.100.0/24 overlaps the anycast prefix 198.51.100.1/32: "
     "a beacon is never withdrawn"),
    ({"external": {"beacons": ["203.0.113.1/32"]}},
     "pop.yaml: neighbors[0].local_address: is required with external.beacons (ExaBGP's static routes need it "
     "for next-hop self)"),
    ({"neighbors": [{"address": "10.0.0.1", "peer_as": 1, "local_address": "10.0.0.2"}],
      "external": {"beacons": ["2001:db8::1/128"]}},
     "pop.yaml: external.beacons[0]: 2001:db8::1/128 is IPv6 but no neighbor is; it would never be announced"),
    ({"external": {"enabled": True, "key_file": "/k",
                   "agents": [{"name": "a", "address": "10.9.0.1"}, {"name": "a", "address": "10.9.0.2"}]}},
     "pop.yaml: external.agents[1].name: 'a' is already the name of another agent"),
])
def test_one_problem(sections: dict[str, object], expected: str) -> None:
    assert problems(with_(**sections)) == [expected]


def test_every_problem_is_reported_at_once() -> None:
    found = problems(with_(pool={"hold_down": "soon"}, status={"port": 0}, servers=[{"address": "x"}]))
    assert found == [
        "pop.yaml: servers[0].name: is required",
        "pop.yaml: servers[0].address: 'x' is not an IP address",
        "pop.yaml: pool.hold_down: must be a number, not a string",
        "pop.yaml: status.port: 0 is out of range 1..65535",
    ]


def test_cross_checks_name_the_original_server_index() -> None:
    key = "A" * 43 + "="
    found = problems(with_(checks={"wireguard": {"enabled": True}}, servers=[
        {"name": "broken", "address": "x", "wireguard": {"public_key": key}},
        {"name": "a", "address": "10.0.2.11", "wireguard": {"public_key": key}},
        {"name": "b", "address": "10.0.2.12"},
    ]))
    assert found == [
        "pop.yaml: servers[0].address: 'x' is not an IP address",
        "pop.yaml: servers[2].wireguard: is required when checks.wireguard.enabled is true (public_key of the server)",
    ]


def test_cross_checks_name_the_original_prefix_index() -> None:
    found = problems(with_(prefixes=["198.51.100.1/24", "198.51.100.1/32", "2001:db8::1/128"]))
    assert found == [
        "pop.yaml: prefixes[0].prefix: '198.51.100.1/24' is not a prefix (198.51.100.1/24 has host bits set)",
        "pop.yaml: prefixes[2]: 2001:db8::1/128 is IPv6 but no neighbor is IPv6; it would never be announced",
    ]


def test_communities_are_rendered_canonically() -> None:
    config = load(with_(prefixes=[{"prefix": "198.51.100.1/32", "healthy": {
        "communities": ["065101:007"], "large_communities": ["0065101:1:02"]}}]))
    assert config.prefixes[0].healthy.communities == ("65101:7",)
    assert config.prefixes[0].healthy.large_communities == ("65101:1:2",)


def test_well_known_community_names() -> None:
    config = load(with_(prefixes=[{"prefix": "198.51.100.1/32", "healthy": {"communities": ["graceful-shutdown"]}}]))
    assert config.prefixes[0].healthy.communities == ("65535:0",)


def test_config_is_frozen() -> None:
    config = load(MINIMAL)
    with pytest.raises(AttributeError):
        config.name = "other"  # type: ignore[misc]


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
yaml_values = st.recursive(yaml_scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.text(max_size=12), children, max_size=4)), max_leaves=20)
keys = st.sampled_from(["pop", "neighbors", "prefixes", "servers", "checks", "pool", "status", "exabgp",
                        "name", "asn", "router_id", "address", "peer_as", "prefix", "healthy", "med",
                        "communities", "l4", "wireguard", "public_key", "port", "rise", "fall"])
config_like = st.recursive(yaml_scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=6)), max_leaves=40)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.one_of(yaml_values, config_like))
def test_generated_documents_only_raise_config_error(document: object) -> None:
    try:
        load(yaml.safe_dump(document))
    except ConfigError as exc:
        assert exc.problems and all(p.startswith("pop.yaml: ") for p in exc.problems)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_generated_bytes_only_raise_config_error(data: bytes) -> None:
    try:
        load(data)
    except ConfigError as exc:
        assert exc.problems


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["pop", "neighbors", "prefixes", "servers", "checks", "pool", "status", "exabgp"]),
       yaml_values)
def test_mutated_minimal_config_only_raises_config_error(section: str, value: object) -> None:
    try:
        load(with_(**{section: value}))
    except ConfigError as exc:
        assert exc.problems


def _servers_text(*items: str) -> str:
    return MINIMAL.replace("servers: [{name: vpn1, address: 10.0.2.10}]", "servers: [" + ", ".join(items) + "]")


def test_a_reload_validates_only_the_servers_that_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server item with exactly the values of one validated before (a reload of 1,000 servers
    changes a few) is not validated again, and gives the same record."""
    import pop.config as config_module

    key = "'" + "A" * 43 + "='"
    validated: list[str] = []
    real = config_module._wireguard_target

    def counted(r: object, value: object, path: str) -> object:
        validated.append(path)
        return real(r, value, path)  # type: ignore[arg-type]

    monkeypatch.setattr(config_module, "_wireguard_target", counted)
    monkeypatch.setattr(config_module, "_VALIDATED", {})  # nothing from other tests' loads
    items = [f"{{name: vpn{i}, address: 10.0.2.{i}, wireguard: {{public_key: {key}, port: {51820 + i}}}}}"
             for i in range(1, 4)]
    first = load(_servers_text(*items), "pop.yaml")
    assert len(validated) == 3
    changed = [*items[:2], "{name: vpn3, address: 10.0.2.33, wireguard: {public_key: " + key + ", port: 51823}}"]
    second = load(_servers_text(*changed), "pop.yaml")
    assert len(validated) == 4  # only vpn3 again
    assert second.servers[:2] == first.servers[:2] and second.servers[2].address == "10.0.2.33"
    again = load(_servers_text(*reversed(items)), "pop.yaml")  # order and position do not matter
    assert len(validated) == 4 and [s.name for s in again.servers] == ["vpn3", "vpn2", "vpn1"]


def test_values_that_compare_equal_across_types_are_not_taken_for_one_another(monkeypatch: pytest.MonkeyPatch) -> None:
    """1, 1.0 and true are equal in Python; a server validated with `weight: 1` says nothing
    about one with `weight: true` or `weight: 1.0`, and an item with a problem is never
    remembered as good."""
    import pop.config as config_module

    monkeypatch.setattr(config_module, "_VALIDATED", {})
    assert load(_servers_text("{name: vpn1, address: 10.0.2.10, weight: 1}"), "pop.yaml").servers[0].weight == 1
    assert any("weight: must be an integer, not a boolean" in p
               for p in problems(_servers_text("{name: vpn1, address: 10.0.2.10, weight: true}")))
    assert any("weight: must be an integer" in p
               for p in problems(_servers_text("{name: vpn1, address: 10.0.2.10, weight: 1.0}")))
    bad = _servers_text("{name: vpn1, address: 10.0.2.10, weight: 999}")
    assert any("out of range" in p for p in problems(bad))
    assert any("out of range" in p for p in problems(bad))  # again: not remembered
    duplicate = _servers_text("{name: vpn1, address: 10.0.2.10}", "{name: vpn1, address: 10.0.2.11}")
    assert any("used twice" in p for p in problems(duplicate))  # the checks across items still run


def test_realtime_priority_is_off_unless_configured_and_bounded() -> None:
    assert load(MINIMAL).checks.realtime_priority == 0
    assert load(with_(checks={"realtime_priority": 10})).checks.realtime_priority == 10
    for bad in (100, -1, "high", 1.5):
        with pytest.raises(ConfigError) as caught:
            load(with_(checks={"realtime_priority": bad}))
        assert any("checks.realtime_priority" in p for p in caught.value.problems), caught.value.problems
