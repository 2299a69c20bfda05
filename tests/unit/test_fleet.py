"""The fleet guard (pop.fleet): pure, time as input."""

from __future__ import annotations

import pytest

from pop import config, fleet
from pop.config_reader import ConfigError
from pop.fleet import HELD, LEAVING_PHASE, LEFT, NONE, Guard, Policy, Sighting, View

P = "198.51.100.1/32"
POLICY = Policy(id=2, tag=64496, min_pops=2, pace=10.0)


def seen(*pops: int, leaving: tuple[int, ...] = ()) -> View:
    return fleet.view([(P, Sighting(frozenset(pops), frozenset(leaving)))], me=POLICY.id)


def step(guard: Guard, view: View, now: float, policy: Policy = POLICY, **kw: bool) -> Guard:
    args = {"withdraw": True, "eligible": True, "hard_down": False, "announced": True} | kw
    return fleet.step(guard, policy, view, [P], now, **args)


def test_tags_mark_the_pop_and_its_leaving() -> None:
    assert fleet.tags(POLICY, leaving=False) == ("64496:1:2",)
    assert fleet.tags(POLICY, leaving=True) == ("64496:1:2", "64496:2:2")
    assert fleet.tags(Policy(), leaving=True) == ()


def test_sightings_read_only_the_fleets_marks() -> None:
    assert fleet.sighting([(64496, 1, 3), (64496, 2, 3), (65000, 1, 9), (64496, 7, 4)], 64496) == \
        Sighting(frozenset({3}), frozenset({3}))
    assert fleet.sighting([(65000, 1, 9)], 64496) is None
    # a leaving mark without the presence mark says nothing
    assert fleet.sighting([(64496, 2, 3)], 64496) is None


def test_the_view_leaves_this_pop_out_and_merges_paths() -> None:
    view = fleet.view([(P, Sighting(frozenset({1}))), (P, Sighting(frozenset({2}))),
                       (P, Sighting(frozenset({3}), frozenset({3})))], me=2)
    assert view.pops[P] == {1, 3} and view.leaving[P] == {3}


def test_a_pop_that_must_withdraw_first_leaves_de_preferenced_then_withdraws_after_the_pace() -> None:
    g = step(Guard(), seen(1, 3), 100.0)
    assert g.phase == LEAVING_PHASE and g.holding and "10s" in g.reason
    assert fleet.due(g, POLICY) == 110.0
    assert step(g, seen(1, 3), 109.9).holding
    g = step(g, seen(1, 3), 110.0)
    assert g.phase == LEFT and not g.holding


def test_when_every_pop_leaves_at_once_the_lowest_ids_stay_held() -> None:
    # all three saw the others staying at the moment they began to leave
    guards = {i: fleet.step(Guard(), Policy(id=i, tag=64496, min_pops=2), fleet.view(
        [(P, Sighting(frozenset({1, 2, 3})))], me=i), [P], 100.0, withdraw=True, eligible=True,
        hard_down=False) for i in (1, 2, 3)}
    assert all(g.phase == LEAVING_PHASE for g in guards.values())
    # a moment later each sees the others leave
    everyone_leaving = [(P, Sighting(frozenset({1, 2, 3}), frozenset({1, 2, 3})))]
    after = {i: fleet.step(g, Policy(id=i, tag=64496, min_pops=2), fleet.view(everyone_leaving, me=i), [P],
                           100.5, withdraw=True, eligible=True, hard_down=False) for i, g in guards.items()}
    assert after[1].phase == HELD and after[2].phase == HELD and after[3].phase == LEAVING_PHASE
    assert "0 other PoP(s) stay of min_pops 2" in after[1].reason
    # pop3 withdraws after the pace; pop1 and pop2 stay held
    assert fleet.step(after[3], Policy(id=3, tag=64496, min_pops=2), fleet.view(everyone_leaving, me=3), [P],
                      110.0, withdraw=True, eligible=True, hard_down=False).phase == LEFT


def test_a_withdrawn_pop_comes_back_de_preferenced_when_the_fleet_becomes_short() -> None:
    g = step(Guard(phase=LEFT, others=frozenset({1, 3})), seen(3, leaving=(3,)), 200.0)
    assert g.phase == HELD and g.holding and g.holds == 1
    # and leaves again once enough PoPs stay: only after the pace since pop1 disappeared
    g = step(g, seen(1, 3), 201.0)
    assert g.phase == LEAVING_PHASE
    assert step(g, seen(1, 3), 209.0).holding
    assert step(g, seen(1, 3), 210.0).phase == LEFT


def test_the_fleet_wide_pace_delays_a_withdrawal_after_another_pop_left() -> None:
    g = step(Guard(others=frozenset({1, 3, 4})), seen(1, 3, 4), 100.0)  # begins leaving
    g = step(g, seen(1, 3), 108.0)  # pop4 disappears at 108
    assert step(g, seen(1, 3), 110.0).phase == LEAVING_PHASE
    late = step(g, seen(1, 3), 117.0)
    assert late.phase == LEAVING_PHASE and "fleet-wide pace" in late.reason
    assert step(g, seen(1, 3), 118.0).phase == LEFT


def test_a_hard_down_pop_withdraws_at_once_whatever_the_fleet() -> None:
    g = step(Guard(), seen(), 100.0, hard_down=True)
    assert g.phase == LEFT and "tier 1" in g.reason


def test_a_pop_never_announced_since_start_is_not_brought_in() -> None:
    assert step(Guard(), seen(), 100.0, eligible=False).phase == NONE


def test_an_already_withdrawn_pop_does_not_start_leaving() -> None:
    assert step(Guard(), seen(1, 3), 100.0, announced=False).phase == LEFT


@pytest.mark.parametrize("policy", [Policy(), Policy(id=1, tag=64496, min_pops=0)])
def test_without_the_guard_nothing_is_held(policy: Policy) -> None:
    assert step(Guard(), seen(), 100.0, policy).phase == NONE


def test_an_announcing_verdict_clears_the_guard() -> None:
    assert step(Guard(phase=HELD, since=1.0), seen(), 100.0, withdraw=False) == \
        Guard(phase=NONE, since=None, reason="", others=frozenset(), departed_at=None)


BASE = """
pop: {name: p, asn: 65101, router_id: 192.0.2.1}
neighbors: [{address: 10.0.1.1, peer_as: 65000}]
prefixes: [{prefix: 198.51.100.1/32}]
servers: [{name: s, address: 10.1.1.2}]
"""


def test_the_fleet_section_is_read_with_defaults() -> None:
    c = config.load(BASE + "fleet: {id: 3, tag: 64496, min_pops: 2}\n")
    assert c.fleet == Policy(id=3, tag=64496, min_pops=2, pace=10.0, prepend=3)
    assert config.load(BASE).fleet == Policy()


@pytest.mark.parametrize(("text", "problem"), [
    ("fleet: {tag: 64496}", "fleet.id: is required"),
    ("fleet: {id: 0, tag: 64496}", "fleet.id: 0 is out of range"),
    ("fleet: {id: 1, tag: 64496, min_pops: -1}", "fleet.min_pops"),
    ("fleet: {id: 1, tag: 64496, paces: 3}", "fleet.paces: unknown key (did you mean 'pace'?)"),
])
def test_bad_fleet_sections_are_named(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(BASE + text + "\n")
    assert any(problem in p for p in caught.value.problems), caught.value.problems
