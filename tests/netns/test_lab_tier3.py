"""Tier 3 in the lab of containerlab.yml: three real probe agents behind three upstreams (r1,
r2, r3), three PoPs with beacons, FRR, ExaBGP, wireguard-go, and the faults of lab.faults.

    client1 probe2 - r1 ----------- r2 - probe1       the agents probe every server of every
                      | \\         / |                  PoP through its beacon (TCP 443 and a
                    pop1  `-pop3-'  pop2               real WireGuard handshake) and ask who
                      |             |                  answers on the anycast address
                      `---- r3 ----'
                             |
                           probe3

- the PoP the agent beside client1 lands on, cut off from outside (its upstreams drop its
  anycast and beacon traffic; its BGP sessions, servers and checks stay green), is withdrawn by
  the agents' quorum within 10 s, the catchment map shows that agent moved and landing where
  the client lands, and the PoP comes back within its hold-down + 10 s of the cut being undone;
- every agent dead, every agent lying (a replay, a stale report, a forged one), one agent's
  own network broken, every agent seeing every PoP down: no announcement changes at any router.
The scenarios are lab.tier3's; bench/tier3.py runs them many times and prints the figures.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lab import tier3
from lab.runner import Lab
from tests.netns.conftest import running_lab
from tests.netns.test_lab_runner import needs

__all__ = ["needs"]  # the fixture that skips, naming what the machine lacks


@pytest.fixture(scope="module")
def lab(needs: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab("tt3", tmp_path_factory) as lab:
        try:
            tier3.settled(lab)
            yield lab
        finally:
            print("\n" + lab.log_tails())


def test_the_lab_has_three_agents_behind_three_upstreams(lab: Lab) -> None:
    upstreams = {agent: {router for router, _ in lab.faults.upstreams(agent)} for agent in lab.agents}
    assert len(lab.agents) == 3 and len(set.union(*upstreams.values())) == 3, upstreams
    report = lab.agent("probe3").report()
    for pop in lab.pops:  # every PoP reachable by TCP and a real WireGuard handshake, per server
        checks = report["pops"][pop]["checks"]
        assert report["pops"][pop]["reachable"], checks
        assert {name.rpartition(".")[2] for name, check in checks.items() if check["ok"]} == {"tcp", "wireguard"}


def test_a_pop_cut_off_from_outside_is_withdrawn_and_comes_back(lab: Lab) -> None:
    # the PoP cut off is the one the agent beside client1 lands on: the catchment map must move
    result = tier3.cut_off(lab, None, "client1")
    print(f"\nMEASURED {result.pop} cut off from outside -> out of its upstream's route: {result.withdrawn:.2f} s; "
          f"catchment: {result.moved} moved off {result.pop}, the agent beside client1 lands with it on "
          f"{result.landing} {result.catchment:.2f} s later; "
          f"back {result.back:.2f} s after the cut was undone (hold-down {result.hold_down:g} s)")
    assert result.moved
    # withdrawn by tier 3 while green inside (a loaded machine may see a server merely falling)
    assert result.by == "external" and "down" not in result.servers, (result.by, result.servers)
    assert result.withdrawn <= 10.0
    assert result.catchment <= 10.0 and result.landing not in (None, result.pop)
    assert result.hold_down <= result.back <= result.hold_down + 10.0


@pytest.mark.parametrize("scenario", list(tier3.SCENARIOS))
def test_monitoring_that_fails_changes_no_announcement(lab: Lab, scenario: str) -> None:
    result = tier3.monitoring_fails(lab, scenario)
    print(f"\nMEASURED {scenario}: {result['changes']} announcement changes in {tier3.HOLD:g} s; "
          f"views {result['view']} after {result['view_after']:.1f} s; dropped {result['dropped']}")
    assert result["changes"] == 0, result["events"]
    assert result["states"] == ["announced"]
    if scenario == "all agents lie":
        for dropped in result["dropped"].values():  # each lie dropped for what it is, and counted
            assert dropped.get("forged", 0) > 0 and dropped.get("stale", 0) > 0, dropped
            assert dropped.get("duplicate", 0) + dropped.get("stale", 0) > 0, dropped
    if scenario == "one agent's network broken":
        assert set(result["competent"].values()) == {2}
    if scenario == "every agent sees every PoP down":
        assert set(result["competent"].values()) == {0}
