"""What we say to ExaBGP (golden files, and ExaBGP's own validator) and what we understand of it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pop.config import load
from pop.desired import Announcement
from pop.exabgp import (
    Ack,
    EndOfRib,
    NeighborReport,
    NeighborState,
    NeighborSummary,
    Other,
    RibEntry,
    Shutdown,
    Unparsed,
    Update,
    announce_commands,
    parse_line,
    render_config,
    render_env,
    withdraw_commands,
)

GOLDEN = Path(__file__).parent / "golden"
CAPTURED = Path(__file__).parent / "captured"  # lines ExaBGP 5.0.15 really wrote to its API process
CONFIG = load("""
pop: {name: ams1, asn: 65101, router_id: 192.0.2.11}
neighbors:
  - {address: 10.0.1.1, peer_as: 65000, local_address: 10.0.1.2, description: upstream-a}
  - {address: 10.0.9.1, peer_as: 65101, hold_time: 30, local_address: 10.0.9.2}
  - {address: "2001:db8:1::1", peer_as: 65000, local_address: "2001:db8:1::2"}
prefixes: [198.51.100.1/32, "2001:db8:100::1/128"]
servers: [{name: vpn1, address: 10.0.2.10}]
external: {beacons: [203.0.113.11/32, "2001:db8:ff::11/128"]}
""", "pop.yaml")
ENGINE = ["/usr/bin/python3", "-m", "pop", "engine", "-c", "/etc/pop/pop.yaml"]


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("POP_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs; regenerate with POP_UPDATE_GOLDEN=1 if intended"


def test_config_golden() -> None:
    golden("exabgp.conf", render_config(CONFIG, ENGINE))
    golden("exabgp.env", render_env(CONFIG))


def test_exabgp_accepts_rendered_config(tmp_path: Path) -> None:
    conf = tmp_path / "exabgp.conf"
    env = tmp_path / "exabgp.env"
    conf.write_text(render_config(CONFIG, ENGINE))
    env.write_text(render_env(CONFIG))
    exabgp = Path(sys.executable).parent / "exabgp"
    result = subprocess.run([str(exabgp), "--env-file", str(env), "validate", str(conf)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_exabgp_rejects_a_broken_config(tmp_path: Path) -> None:
    """The validator we rely on in `pop run` really fails on bad input."""
    conf = tmp_path / "exabgp.conf"
    env = tmp_path / "exabgp.env"
    conf.write_text(render_config(CONFIG, ENGINE).replace("peer-as 65000;", "peer-as banana;", 1))
    env.write_text(render_env(CONFIG))
    exabgp = Path(sys.executable).parent / "exabgp"
    result = subprocess.run([str(exabgp), "--env-file", str(env), "validate", str(conf)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0


def test_commands_golden() -> None:
    full = Announcement("198.51.100.1/32", med=100, local_pref=200, communities=("65101:100", "65535:0"),
                        large_communities=("65101:0:1",), as_path_prepend=2)
    lines = [
        *announce_commands(CONFIG, Announcement("198.51.100.1/32")),
        *announce_commands(CONFIG, full),
        *announce_commands(CONFIG, Announcement("2001:db8:100::1/128", med=5)),
        *withdraw_commands(CONFIG, "198.51.100.1/32"),
        *withdraw_commands(CONFIG, "2001:db8:100::1/128"),
    ]
    golden("commands.txt", "\n".join(lines) + "\n")


def test_prepend_leads_with_our_as_only_on_ebgp() -> None:
    ebgp, ibgp = announce_commands(CONFIG, Announcement("198.51.100.1/32", as_path_prepend=1))
    assert ebgp.endswith("as-path [ 65101 65101 ]")
    assert ibgp.endswith("as-path [ 65101 ]")


@pytest.mark.parametrize(("line", "expected"), [
    ("done\n", Ack(True)),
    ("error", Ack(False)),
    ('{ "answer": "done", "message": "command completed" }', Ack(True)),
    ('{ "answer": "error", "message": "nope" }', Ack(False)),
    ("shutdown", Shutdown()),
    ('{"exabgp": "5.0.0", "type": "notification", "notification": "shutdown"}', Shutdown()),
    ('{"exabgp": "5.0.0", "type": "state", "neighbor": {"address": {"local": "10.0.1.2", "peer": "10.0.1.1"},'
     ' "asn": {"local": 65101, "peer": 65000}, "state": "up"}}', NeighborState("10.0.1.1", "up")),
    ('{"type": "state", "neighbor": {"address": {"peer": "10.0.1.1"}, "state": "down", "reason": "peer reset"}}',
     NeighborState("10.0.1.1", "down", "peer reset")),
    ('{"type": "update", "neighbor": {"address": {"peer": "10.0.1.1"}, "message": {"update": {'
     '"announce": {"ipv4 unicast": {"10.0.1.1": [{"nlri": "198.51.100.1/32"}]}},'
     '"withdraw": {"ipv4 unicast": [{"nlri": "203.0.113.0/24"}]}}}}}',
     Update("10.0.1.1", ("198.51.100.1/32",), ("203.0.113.0/24",), (("198.51.100.1/32", ""),),
            (("203.0.113.0/24", ""),))),
    # ADD-PATH: every path its own id; the fleet's marks come as large communities
    ('{"type": "update", "neighbor": {"address": {"peer": "10.0.1.1"}, "message": {"update": {'
     '"attribute": {"origin": "igp", "large-community": [ [ 64496, 1 , 3 ], [ 64496, 2 , 3 ] ]},'
     '"announce": {"ipv4 unicast": {"10.0.1.1": [{"nlri": "198.51.100.1/32", "path-information": "0.0.0.2"}]}}}}}}',
     Update("10.0.1.1", ("198.51.100.1/32",), (), (("198.51.100.1/32", "0.0.0.2"),), (),
            ((64496, 1, 3), (64496, 2, 3)))),
    ('{"type": "keepalive", "neighbor": {}}', Other("keepalive")),
    # the answer to SHOW_ADJ_RIB_IN: one text line per path held as received
    ("neighbor 10.0.1.1 local-ip 10.0.1.2 local-as 65101 peer-as 65000 router-id 192.0.2.1 family-allowed in-open "
     "ipv4 unicast 198.51.100.1/32 path-information 0.0.0.3 next-hop 10.0.1.1 origin igp as-path [ 65000 65103 ] "
     "community 65103:1 large-community [ 64496:1:3 64496:2:3 ]",
     RibEntry("10.0.1.1", "198.51.100.1/32", "0.0.0.3", ((64496, 1, 3), (64496, 2, 3)))),
    ("neighbor 10.0.1.1 local-ip 10.0.1.2 family-allowed in-open ipv4 unicast 198.51.100.1/32 next-hop 10.0.1.1 "
     "large-community 64496:1:2", RibEntry("10.0.1.1", "198.51.100.1/32", "", ((64496, 1, 2),))),
    ("neighbor 10.0.1.1 family-allowed in-open ipv4 unicast 10.9.1.0/24 next-hop 10.0.1.1 origin igp",
     RibEntry("10.0.1.1", "10.9.1.0/24", "", ())),
])
def test_parse(line: str, expected: object) -> None:
    assert parse_line(line) == expected


@pytest.mark.parametrize("line", [
    "garbage", "{not json", "[1,2]", '{"type": "state"}', '{"type": "update", "neighbor": {"address": 5}}',
    '{"answer": "maybe"}', "[" * 100000, "neighbor 10.0.1.1 with no family",
    "neighbor 10.0.1.1 x ipv4 unicast 192.0.2.0/24 large-community 1:2",
    "neighbor 10.0.1.1 x ipv4 unicast 192.0.2.0/24 large-community 1:2:99999999999",
    '{"type": "update", "neighbor": {"address": {"peer": "10.0.1.1"}, "message": {"update": {'
    '"attribute": {"large-community": [[1, 2]]}, "announce": {"ipv4 unicast": {"10.0.1.1": ["192.0.2.0/24"]}}}}}}',
    '{"type": "update", "neighbor": {"address": {"peer": "10.0.1.1"}, "message": {"update": {'
    '"announce": {"ipv4 unicast": {"10.0.1.1": [{"nlri": "192.0.2.0/24", "path-information": 7}]}}}}}}',
])
def test_bad_messages_are_values_not_exceptions(line: str) -> None:
    assert isinstance(parse_line(line), Unparsed)


def captured(name: str) -> str:
    return (CAPTURED / name).read_text()


@pytest.mark.parametrize(("name", "expected"), [
    ("bird-end-of-rib.json", EndOfRib("10.0.1.1", "ipv4 unicast")),
    ("frr-update.json", Update("10.0.1.1", ("203.0.113.0/24",), (), (("203.0.113.0/24", ""),))),
    ("show-neighbor-json-up.json", NeighborReport((NeighborSummary("10.0.1.1", "up", 4),))),
    # an idle session's "duration" counts something else (ExaBGP's reset - creation): not kept
    ("show-neighbor-json-down.json", NeighborReport((NeighborSummary("10.0.1.1", "down", 0),))),
])
def test_parse_captured(name: str, expected: object) -> None:
    assert parse_line(captured(name)) == expected


@pytest.mark.parametrize(("fsm", "state"), [
    ("ESTABLISHED", "up"), ("OPENCONFIRM", "connected"), ("OPENSENT", "connected"), ("ACTIVE", "down"),
    ("CONNECT", "down"), ("IDLE", "down"),
])
def test_neighbor_report_state_follows_the_fsm(fsm: str, state: str) -> None:
    """ExaBGP's own "state" says down for a session up less than a second (duration 0)."""
    line = f'[{{"state": "down", "duration": 0, "fsm": "{fsm}", "peer": {{"address": "10.0.1.1"}}}}]'
    assert parse_line(line) == NeighborReport((NeighborSummary("10.0.1.1", state, 0),))


def test_an_empty_neighbor_report_is_a_report() -> None:
    assert parse_line("[]") == NeighborReport(())


@pytest.mark.parametrize("line", [
    '{"type": "update", "neighbor": {"address": {"peer": "10.0.1.1"}, "message": {"eor": {"afi": "ipv4"}}}}',
    '{"type": "update", "neighbor": {"address": {"peer": "10.0.1.1"}, "message": {"eor": "ipv4 unicast"}}}',
    '[{"fsm": "ESTABLISHED", "duration": 3}]',
    '[{"fsm": "ESTABLISHED", "duration": "long", "peer": {"address": "10.0.1.1"}}]',
    '[{"fsm": 7, "duration": 3, "peer": {"address": "10.0.1.1"}}]',
    '[{"fsm": "ESTABLISHED", "duration": 3, "peer": {"address": null}}]',
    '[{"fsm": "ESTABLISHED", "duration": true, "peer": {"address": "10.0.1.1"}}]',
])
def test_malformed_end_of_rib_and_reports_are_unparsed(line: str) -> None:
    assert isinstance(parse_line(line), Unparsed)
