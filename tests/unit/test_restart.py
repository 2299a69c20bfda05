"""Restart without a withdrawal, the pure parts: the planned handover, what ExaBGP is told
(graceful restart, manual End-of-RIB) and the configuration key."""

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from pop import handover
from pop.config import ConfigError, load
from pop.desired import Announcement
from pop.exabgp import eor_commands, render_config, render_env
from tests.unit.test_exabgp import ENGINE, golden

ROUTE = Announcement("198.51.100.1/32", communities=("65101:1",))
NEXT_HOPS = {"198.51.100.1/32": "self"}
YAML = """
pop: {name: ams1, asn: 65101, router_id: 192.0.2.11}
neighbors:
  - {address: 10.0.1.1, peer_as: 65000, local_address: 10.0.1.2}
  - {address: "2001:db8:1::1", peer_as: 65000, local_address: "2001:db8:1::2"}
prefixes: [198.51.100.1/32]
servers: [{name: vpn1, address: 10.0.2.10}]
"""
GRACEFUL = load(YAML + "exabgp: {graceful_restart: 10}\n", "pop.yaml")


def stored(pid: int = 100, routes: tuple[Announcement, ...] = (ROUTE,), **extra: Any) -> dict[str, Any]:
    """The handover as the next engine reads it back from announced.json."""
    data: dict[str, Any] = json.loads(json.dumps(handover.to_dict(routes, pid)))
    return {**data, **extra}


@pytest.mark.parametrize(("data", "exabgp_pid", "now", "expected"), [
    (stored(), 100, 0.0, ((ROUTE,), False)),  # the engine died: same ExaBGP, it still announces
    (stored(), 200, 0.0, ((), False)),  # another ExaBGP, not planned: withdraw first
    (stored(planned_at=1000.0), 200, 1004.0, ((ROUTE,), True)),  # planned, within the restart time
    (stored(planned_at=1000.0), 200, 1010.0, ((ROUTE,), True)),  # at the restart time exactly
    (stored(planned_at=1000.0), 200, 1010.5, ((), False)),  # too late: the routers dropped it
    (stored(planned_at=1000.0), 200, 999.0, ((), False)),  # from the future: the clock jumped
    (stored(planned_at=1000.0), 100, 1004.0, ((ROUTE,), True)),  # a reused pid does not make it ours
    (stored(planned_at=1000.0), 100, 2000.0, ((), False)),
])
def test_which_handover_is_adopted(data: dict[str, Any], exabgp_pid: int, now: float,
                                   expected: tuple[tuple[Announcement, ...], bool]) -> None:
    assert handover.parse(data, exabgp_pid, NEXT_HOPS, now=now, restart_time=10) == expected


def test_a_planned_handover_keeps_only_prefixes_still_configured_with_the_same_next_hop() -> None:
    other = Announcement("198.51.100.2/32")
    data = stored(100, (ROUTE, other), planned_at=5.0)
    assert handover.parse(data, 1, NEXT_HOPS, now=6.0, restart_time=10) == ((ROUTE,), True)
    assert handover.parse(data, 1, {"198.51.100.1/32": "192.0.2.9"}, now=6.0, restart_time=10) == ((), True)


def test_mark_planned_stamps_only_the_handover_of_the_exabgp_that_stopped() -> None:
    marked = handover.mark_planned(stored(), 100, 42.5)
    assert marked == {**stored(), "planned_at": 42.5}
    with pytest.raises(handover.HandoverError, match="exabgp_pid: 100 is not the ExaBGP that stopped"):
        handover.mark_planned(stored(), 7, 42.5)


@pytest.mark.parametrize(("data", "problem"), [
    (stored(planned_at="soon"), "planned_at: must be a time in seconds"),
    (stored(planned_at=True), "planned_at: must be a time in seconds"),
    ([], "must be a JSON object"),
    ({**stored(), "version": 2}, "version: 2 is not 1"),
    ({**stored(), "exabgp_pid": "1"}, "exabgp_pid: must be a process id"),
    ({**stored(planned_at=1.0), "announcements": [{**asdict(ROUTE), "med": "x"}]}, r"announcements\[0\].med"),
])
def test_a_broken_handover_names_what_is_wrong(data: Any, problem: str) -> None:
    with pytest.raises(handover.HandoverError, match=problem):
        handover.parse(data, 1, NEXT_HOPS, now=1.0, restart_time=10)


def test_end_of_rib_per_neighbor_and_family() -> None:
    assert eor_commands(GRACEFUL) == ["neighbor 10.0.1.1 announce eor ipv4 unicast",
                                      "neighbor 2001:db8:1::1 announce eor ipv6 unicast"]
    assert eor_commands(GRACEFUL, "10.0.1.1") == ["neighbor 10.0.1.1 announce eor ipv4 unicast"]


def test_graceful_restart_config_golden_and_exabgp_accepts_it(tmp_path: Path) -> None:
    text = render_config(GRACEFUL, ENGINE)
    golden("exabgp-graceful-restart.conf", text)
    assert text.count("graceful-restart 10;") == 2 and text.count("manual-eor true;") == 2
    assert "graceful-restart" not in render_config(load(YAML, "pop.yaml"), ENGINE)  # off by default
    conf, env = tmp_path / "exabgp.conf", tmp_path / "exabgp.env"
    conf.write_text(text)
    env.write_text(render_env(GRACEFUL))
    exabgp = Path(sys.executable).parent / "exabgp"
    result = subprocess.run([str(exabgp), "--env-file", str(env), "validate", str(conf)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("value", "problem"), [
    ("61", "exabgp.graceful_restart"),
    ("-1", "exabgp.graceful_restart"),
    ("2.5", "exabgp.graceful_restart: must be an integer"),
    ("yes", "exabgp.graceful_restart: must be an integer"),
])
def test_a_bad_restart_time_is_refused(value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        load(YAML + f"exabgp: {{graceful_restart: {value}}}\n", "pop.yaml")
    assert any(problem in line for line in error.value.problems), error.value.problems


def test_a_reload_that_changes_the_restart_time_is_rejected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """ExaBGP would re-open its sessions with the new capability while the running engine sends
    End-of-RIB the old way; the change needs a stop and start."""
    from pop.runner import _reload

    path = tmp_path / "pop.yaml"
    path.write_text(YAML + "exabgp: {graceful_restart: 10}\n")
    current = load(YAML, str(path))
    child: Any = None  # never reached: the reload is rejected before ExaBGP is told anything
    assert _reload(current, path, child) is current
    assert "exabgp.graceful_restart cannot change on reload" in caplog.text
