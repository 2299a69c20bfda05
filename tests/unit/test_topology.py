"""containerlab.yml and its node files: what containerlab needs, checked without containerlab.

The committed topology must load; each check below also has a broken variant that must be
refused, so that none of them passes by accident.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from lab import topology
from lab.frr import BgpConfig, BgpNeighbor
from lab.runner import wireguard_ifnames
from lab.topology import LabSpec, TopologyError, anycast_on_lo, load, parse, parse_frr
from pop import config as pop_config
from pop import wgkeys

REPO = Path(__file__).resolve().parents[2]
TOPOLOGY = REPO / "containerlab.yml"
FRR_IMAGE = re.compile(r"^quay\.io/frrouting/frr:\d+\.\d+\.\d+$")


@pytest.fixture(scope="module")
def spec() -> LabSpec:
    return load(TOPOLOGY)


@pytest.fixture
def doc() -> dict:
    return yaml.safe_load(TOPOLOGY.read_text())


def problems_of(document: dict) -> list[str]:
    with pytest.raises(TopologyError) as info:
        parse(yaml.safe_dump(document), "containerlab.yml", REPO)
    return list(info.value.problems)


# --- containerlab's schema -------------------------------------------------------------------


def test_top_level_keys_are_containerlabs(doc: dict) -> None:
    assert set(doc) <= {"name", "prefix", "mgmt", "topology"}
    assert set(doc["topology"]) <= {"kinds", "defaults", "nodes", "links", "groups"}
    assert re.match(r"^[A-Za-z0-9_-]+$", doc["name"])
    for name, node in doc["topology"]["nodes"].items():
        assert set(node) <= {"kind", "image", "labels", "env", "binds", "exec", "cmd", "ports", "group"}, name
        assert all(isinstance(line, str) for line in node.get("exec", [])), name
        assert all(isinstance(v, str) for v in node.get("env", {}).values()), name


def test_every_node_has_a_kind_and_an_image(spec: LabSpec, doc: dict) -> None:
    kinds = doc["topology"]["kinds"]
    for node in spec.topology.nodes.values():
        assert node.kind in kinds
        if node.role == "router":
            assert FRR_IMAGE.match(node.image), (node.name, node.image)
        else:  # built from lab/Dockerfile
            assert node.image == kinds["linux"]["image"] == "pop-lab:latest", node.name
    dockerfile = (REPO / "lab" / "Dockerfile").read_text()
    assert "pop-lab:latest" in dockerfile  # the build command the image name comes from
    for copied in re.findall(r"^COPY (.+) \S+$", dockerfile, re.MULTILINE):
        for path in copied.split():
            assert (REPO / path).exists(), f"Dockerfile copies {path}, which does not exist"
    assert os.access(REPO / "lab" / "nodes" / "entrypoint.sh", os.X_OK)


def test_every_link_end_names_a_node_and_an_interface_once(spec: LabSpec, doc: dict) -> None:
    ends = [end for link in doc["topology"]["links"] for end in link["endpoints"]]
    assert len(ends) == len(set(ends)) == 2 * len(spec.topology.links)
    for end in ends:
        node, ifname = end.split(":")
        assert node in doc["topology"]["nodes"]
        assert re.match(r"^eth[1-9][0-9]*$", ifname)


def test_every_bind_source_exists_and_node_files_load(spec: LabSpec) -> None:
    for node in spec.topology.nodes.values():
        for bind in node.binds:
            assert bind.source.is_file() or bind.source.is_dir(), (node.name, bind)
            assert bind.target.startswith("/") and bind.mode in ("", "ro", "rw")
    for name, pop in spec.pops.items():
        assert pop_config.load(pop.path.read_text(), str(pop.path)).name == name
    daemons = (REPO / "lab" / "nodes" / "daemons").read_text()
    assert "zebra=yes" in daemons.splitlines() and "bgpd=yes" in daemons.splitlines()


def test_the_issues_topology(spec: LabSpec) -> None:
    routers = spec.routers
    assert len(routers) >= 2 and len({r.asn for r in routers.values()}) == len(routers)
    # the upstreams peer with each other
    r1, r2 = routers["r1"], routers["r2"]
    assert any(spec.topology.owner_of(n.address) == "r2" for n in r1.neighbors)
    assert any(spec.topology.owner_of(n.address) == "r1" for n in r2.neighbors)
    assert len(spec.pops) == 3
    for pop in spec.pops:
        assert sum(1 for vpn in spec.vpns.values() if vpn.pop == pop) >= 2
        assert spec.pops[pop].config.checks.wireguard.enabled
    links = {frozenset((link.a.node, link.b.node)) for link in spec.topology.links}
    (client,) = spec.topology.by_role("client")
    assert any(frozenset((client.name, r)) in links for r in routers)
    assert spec.topology.by_role("probe")
    assert spec.anycast == ("198.51.100.1/32",)
    # both data plane modes a host kernel can run: pop1 routes the address to its servers
    # (ecmp), pop2 and pop3 hold it themselves (none)
    modes = {name: pop.config.dataplane.mode for name, pop in spec.pops.items()}
    assert modes == {"pop1": "ecmp", "pop2": "none", "pop3": "none"}
    holders = {node.name for node in spec.topology.nodes.values() if anycast_on_lo(node, spec.anycast)}
    assert holders == {"pop2", "pop3", "vpn11", "vpn12"}


def test_wireguard_keys_match_the_pop_configs(spec: LabSpec) -> None:
    nodes = REPO / "lab" / "nodes"
    probe = wgkeys.decode_key((nodes / "probe.key").read_text())
    assert wgkeys.encode_key(wgkeys.public_key_of(probe)) == (nodes / "probe.pub").read_text().strip()
    for pop in spec.pops.values():
        for server in pop.config.servers:
            private = wgkeys.decode_key((nodes / server.name / "wg.key").read_text())
            assert server.wireguard is not None
            assert wgkeys.encode_key(wgkeys.public_key_of(private)) == server.wireguard.public_key


def test_three_agents_behind_three_upstreams_with_keys_every_server_knows(spec: LabSpec) -> None:
    nodes = REPO / "lab" / "nodes"
    links = {frozenset((link.a.node, link.b.node)) for link in spec.topology.links}
    upstream = {agent: next(r for r in spec.routers if frozenset((agent, r)) in links) for agent in spec.agents}
    assert len(spec.agents) == 3 and len(set(upstream.values())) == 3, upstream
    peers = {(nodes / "peers" / f"{agent}.pub").read_text().strip() for agent in spec.agents}
    for agent in spec.agents:
        private = wgkeys.decode_key((nodes / agent / "probe.key").read_text())
        assert wgkeys.encode_key(wgkeys.public_key_of(private)) in peers
        # every server of every PoP, each with the server's own key
        targets = {t.address: t for pop in spec.agents[agent].config.pops for t in pop.targets}
        assert set(targets) == {vpn.address for vpn in spec.vpns.values()}
        for vpn in spec.vpns.values():
            public = wgkeys.decode_key((nodes / vpn.name / "wg.pub").read_text())
            assert targets[vpn.address].wireguard is not None and targets[vpn.address].wireguard.public_key == public
    for pop in spec.pops.values():
        assert pop.config.external.enabled and {a.name for a in pop.config.external.agents} == set(spec.agents)


def test_frr_conf_is_exactly_what_lab_frr_renders(spec: LabSpec) -> None:
    for name, config in spec.routers.items():
        text = (REPO / "lab" / "nodes" / name / "frr.conf").read_text()
        assert config.render() == text


def test_frr_conf_round_trips_every_neighbor_option() -> None:
    config = BgpConfig("rx", 65000, "10.255.0.9", (
        BgpNeighbor("10.0.0.2", 65010, description="a peer", passive=True, hold_time=30, keepalive=5,
                    connect_retry=2),
        BgpNeighbor("2001:db8::2", 65020, families=("ipv4", "ipv6")),
    ), ("10.9.0.0/24", "2001:db8:9::/48"), maximum_paths=4, extra_config="ip prefix-list x seq 5 permit any",
        graceful_shutdown_in=True)
    assert parse_frr(config.render(), "rx.conf") == config


def test_the_lab_routers_honour_graceful_shutdown(spec: LabSpec) -> None:
    """RFC 8326: a PoP's drain ladder adds 65535:0; every router sets local-preference 0 on it."""
    assert {name: config.graceful_shutdown_in for name, config in spec.routers.items()} == {
        "r1": True, "r2": True, "r3": True}


def test_a_hand_edited_frr_conf_is_refused() -> None:
    text = (REPO / "lab" / "nodes" / "r1" / "frr.conf").read_text()
    edited = text.replace(" no bgp ebgp-requires-policy\n", "")
    with pytest.raises(TopologyError, match=r"not in the form lab\.frr\.BgpConfig renders"):
        parse_frr(edited, "r1/frr.conf")


# --- broken variants ---------------------------------------------------------------------------


def test_link_to_an_unknown_node_or_a_reused_interface(doc: dict) -> None:
    doc["topology"]["links"].append({"endpoints": ["r1:eth9", "nowhere:eth1"]})
    doc["topology"]["links"].append({"endpoints": ["r1:eth1", "client1:eth7"]})
    found = problems_of(doc)
    assert any("no node named 'nowhere'" in p for p in found)
    assert any("'r1:eth1': interface already used" in p for p in found)


def test_management_interface_and_bad_names(doc: dict) -> None:
    doc["topology"]["links"].append({"endpoints": ["r1:eth0", "client1:eth5"]})
    doc["topology"]["nodes"]["Bad_Name"] = {"kind": "linux", "labels": {topology.ROLE_LABEL: "client"}}
    found = problems_of(doc)
    assert any("eth0 is containerlab's management interface" in p for p in found)
    assert any("topology.nodes.Bad_Name" in p for p in found)


def test_unknown_role_kind_and_non_ip_exec(doc: dict) -> None:
    nodes = doc["topology"]["nodes"]
    nodes["client1"]["labels"][topology.ROLE_LABEL] = "toaster"
    nodes["probe1"]["kind"] = "nokia_srlinux"
    nodes["r1"]["exec"].append("rm -rf /")
    found = problems_of(doc)
    assert any("client1.labels.pop.lab.role: must be one of" in p for p in found)
    assert any("probe1.kind" in p for p in found)
    assert any("only `ip` commands" in p for p in found)


def test_address_on_an_interface_no_link_creates(doc: dict) -> None:
    doc["topology"]["nodes"]["client1"]["exec"].append("ip addr add 10.77.0.1/24 dev eth3")
    assert any("10.77.0.1/24 on eth3, which no link creates" in p for p in problems_of(doc))


def _copy_lab(tmp_path: Path) -> Path:
    shutil.copy(TOPOLOGY, tmp_path / "containerlab.yml")
    shutil.copytree(REPO / "lab" / "nodes", tmp_path / "lab" / "nodes")
    return tmp_path / "containerlab.yml"


def test_missing_bind_source(tmp_path: Path) -> None:
    path = _copy_lab(tmp_path)
    (tmp_path / "lab" / "nodes" / "pop2" / "pop.yaml").unlink()
    with pytest.raises(TopologyError, match=r"pop2.binds: .*pop2/pop.yaml does not exist"):
        load(path)


def test_pop_config_that_does_not_fit_the_topology(tmp_path: Path) -> None:
    path = _copy_lab(tmp_path)
    pop_yaml = tmp_path / "lab" / "nodes" / "pop1" / "pop.yaml"
    text = pop_yaml.read_text()
    pop_yaml.write_text(text.replace("address: 10.1.2.2", "address: 10.1.2.9").replace("peer_as: 65000", "peer_as: 65999"))
    with pytest.raises(TopologyError) as info:
        load(path)
    found = info.value.problems
    assert any("vpn12's address 10.1.2.9 is not on node vpn12" in p for p in found)
    assert any("10.0.1.1 (r1) is AS 65000" in p for p in found)


@pytest.mark.parametrize(("path", "old", "new", "message"), [
    ("pop3/pop.yaml", "asn: 65103", "asn: banana", r"pop3/pop.yaml: pop.asn: must be an integer"),
    ("r2/frr.conf", "neighbor 10.0.2.2 remote-as 65102", "neighbor 10.0.2.2 remote-as 65199",
     r"router r2: neighbor 10.0.2.2 \(pop2\) is AS 65102, not 65199"),
    ("r1/frr.conf", " neighbor 10.0.1.2 remote-as 65101\n", "",
     r"r1/frr.conf: neighbor 10.0.1.2: no remote-as line"),
    ("probe2/agent.yaml", "address: 10.2.2.2", "address: 10.2.2.9",
     r"probe2/agent.yaml: pops: pop2: 10.2.2.9 is not a server of pop2"),
    ("pop2/pop.yaml", "beacons: [10.2.0.0/16]", "beacons: [10.2.1.0/24]",
     r"probe1/agent.yaml: pops: pop2: 10.2.2.2 is outside pop2's external.beacons"),
    ("pop3/pop.yaml", "{name: probe3, address: 10.9.4.2}", "{name: probe9, address: 10.9.4.2}",
     r"pop3/pop.yaml: external.agents: 10.9.4.2 runs agent 'probe3', not 'probe9'"),
    ("probe1/agent.yaml", "listen: 10.9.2.2", "listen: 10.9.3.2",
     r"probe1/agent.yaml: listen: 10.9.3.2 is not on node probe1"),
])
def test_a_node_file_that_does_not_fit(tmp_path: Path, path: str, old: str, new: str, message: str) -> None:
    topology_file = _copy_lab(tmp_path)
    node_file = tmp_path / "lab" / "nodes" / path
    assert old in node_file.read_text()
    node_file.write_text(node_file.read_text().replace(old, new))
    with pytest.raises(TopologyError, match=message):
        load(topology_file)


@pytest.mark.parametrize(("old", "new", "message"), [
    # the PoP in ecmp mode also holding the address: it would answer instead of its servers
    ("- ip addr add 10.0.1.2/30 dev eth1", "- ip addr add 198.51.100.1/32 dev lo\n        - ip addr add 10.0.1.2/30 dev eth1",
     r"pop1.exec: 198.51.100.1 on lo would take the traffic that pop1's ecmp data plane routes"),
    # a server of the PoP in ecmp mode without the address: its share of the flows would be lost
    ("- ip addr add 198.51.100.1/32 dev lo\n        - ip addr add 10.1.2.2/30", "- ip addr add 10.1.2.2/30",
     r"vpn12.exec: serves pop1 in ecmp mode, so it must hold 198.51.100.1 on lo"),
])
def test_the_anycast_address_sits_where_the_data_plane_mode_delivers(tmp_path: Path, old: str, new: str,
                                                                     message: str) -> None:
    path = _copy_lab(tmp_path)
    text = path.read_text()
    assert text.count(old) == 1
    path.write_text(text.replace(old, new))
    with pytest.raises(TopologyError, match=message):
        load(path)


def test_wireguard_interface_names_are_unique_and_fit(spec: LabSpec) -> None:
    names = wireguard_ifnames("plab-a1b2-", list(spec.vpns))
    assert names["vpn11"] == "wpa1b2vpn11"
    assert wireguard_ifnames("tlr-a1b2-", ["vpn11"])["vpn11"] != names["vpn11"]  # CLI lab and test lab
    long = wireguard_ifnames("plab-a1b2-", ["vpnserver001", "vpnserver002"])
    assert long == {"vpnserver001": "wpa1b2v0", "vpnserver002": "wpa1b2v1"}


def test_no_default_route_anywhere(spec: LabSpec) -> None:
    """Under containerlab eth0's default route leads out of the lab: lab routes stay specific."""
    anycast_range, clients, lab, internet = "198.51.100.0/24", "10.9.0.0/16", "10.0.0.0/12", "10.8.255.1/32"
    for node in spec.topology.nodes.values():
        routes = [argv for argv in node.exec if argv[1] == "route"]
        for argv in routes:
            assert argv[3] in (anycast_range, clients, lab, internet), (node.name, argv)
        # a probe agent also reaches the PoPs' beacons and links (the lab's 10.0.0.0/12), the noc their links,
        # a VPN server the internet node behind it (the tunnel checks' target)
        wanted = {"client": [anycast_range], "probe": [anycast_range, lab], "noc": [lab], "pop": [clients],
                  "vpn": [clients, internet]}.get(node.role, [])
        assert [argv[3] for argv in routes] == wanted, node.name
