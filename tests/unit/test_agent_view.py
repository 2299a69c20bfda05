"""A PoP's reachable opinion after rise/fall, and the report built from it (pure, times passed in)."""

from __future__ import annotations

import json

import pytest

from pop.agent import view
from pop.checks.base import TIMEOUT, CheckResult
from pop.hysteresis import Policy

POLICY = Policy(rise=2, fall=3, fall_definitive=3, interval=0.5, fast_interval=0.5)
OK = CheckResult.success(0.001)
REFUSED = CheckResult.failure("refused", definitive=True)


def run(view_: view.PopView, results: list[tuple[str, CheckResult]], start: float = 100.0) -> list[view.PopView]:
    seen = []
    for i, (check, result) in enumerate(results):
        view_ = view.fold(view_, check, result, POLICY, start + i)
        seen.append(view_)
    return seen


@pytest.mark.parametrize(("results", "reachable", "streak"), [
    ([OK], [False], [1]),  # rising: not yet
    ([OK, OK], [False, True], [1, 1]),  # rise = 2
    ([OK, OK, TIMEOUT, TIMEOUT], [False, True, True, True], [1, 1, 2, 3]),  # falling is still reachable
    ([OK, OK, TIMEOUT, TIMEOUT, TIMEOUT], [False, True, True, True, False], [1, 1, 2, 3, 1]),  # fall = 3
    ([OK, OK, TIMEOUT, OK, TIMEOUT, TIMEOUT], [False, True, True, True, True, True], [1, 1, 2, 3, 4, 5]),
    ([REFUSED, REFUSED], [False, False], [1, 2]),  # never seen rise: unreachable from the start
    # a refusal proves the path works: no faster fall than silence (fall_definitive = fall)
    ([OK, OK, REFUSED, REFUSED], [False, True, True, True], [1, 1, 2, 3]),
])
def test_one_check_rise_and_fall(results: list[CheckResult], reachable: list[bool], streak: list[int]) -> None:
    seen = run(view.start(["tcp"], 99.0), [("tcp", r) for r in results])
    assert [v.reachable for v in seen] == reachable
    assert [v.streak for v in seen] == streak


def test_since_is_when_the_opinion_last_changed() -> None:
    seen = run(view.start(["tcp"], 99.0), [("tcp", r) for r in (OK, OK, OK, TIMEOUT, TIMEOUT, TIMEOUT)])
    assert [v.since for v in seen] == [99.0, 101.0, 101.0, 101.0, 101.0, 105.0]


def test_every_check_must_be_up_or_falling() -> None:
    seen = run(view.start(["tcp", "wireguard"], 99.0),
               [("tcp", OK), ("tcp", OK), ("wireguard", OK), ("wireguard", OK), ("wireguard", TIMEOUT),
                ("wireguard", TIMEOUT), ("wireguard", TIMEOUT)])
    assert [v.reachable for v in seen] == [False, False, False, True, True, True, False]


def test_one_target_fully_up_is_enough_and_the_rtt_is_the_best_of_them() -> None:
    fast, slow = CheckResult.success(0.001), CheckResult.success(0.004)
    seen = run(view.start(["vpn11.tcp", "vpn11.wireguard", "vpn12.tcp"], 99.0),
               [("vpn11.tcp", slow), ("vpn11.tcp", slow), ("vpn12.tcp", fast), ("vpn12.tcp", fast),
                # vpn12 dies; vpn11 is reachable by tcp but its wireguard never rises
                ("vpn12.tcp", TIMEOUT), ("vpn12.tcp", TIMEOUT), ("vpn12.tcp", TIMEOUT),
                ("vpn11.wireguard", OK), ("vpn11.wireguard", OK)])
    assert [v.reachable for v in seen] == [False, False, False, True, True, True, False, False, True]
    report = view.report("a", "b", 1, 109.0, views={"pop1": seen[3]}, landings={})
    assert report["pops"]["pop1"]["rtt_ms"] == 1.0


def test_report_has_exactly_the_documented_fields() -> None:
    views = {"pop1": run(view.start(["tcp"], 99.0), [("tcp", OK), ("tcp", OK)])[-1], "pop2": view.start(["tcp"], 99.0)}
    landings = {"198.51.100.1": view.Landing(at=102.5, pop="pop1", server="vpn11", rtt=0.0009),
                "198.51.100.2": view.Landing(at=102.5, error="timeout")}
    report = view.report("probe1", "ab12", 7, 103.25, views=views, landings=landings)
    assert report == {
        "version": 1, "agent": "probe1", "boot_id": "ab12", "sequence": 7, "generated_at": 103.25,
        "pops": {
            "pop1": {"reachable": True, "streak": 1, "rtt_ms": 1.0, "since": 101.0,
                     "checks": {"tcp": {"ok": True, "rtt_ms": 1.0, "error": None}}},
            "pop2": {"reachable": False, "streak": 0, "rtt_ms": None, "since": 99.0,
                     "checks": {"tcp": {"ok": False, "rtt_ms": None, "error": "no result yet"}}},
        },
        "anycast": {
            "198.51.100.1": {"pop": "pop1", "server": "vpn11", "rtt_ms": 0.9, "at": 102.5, "error": None},
            "198.51.100.2": {"pop": None, "server": None, "rtt_ms": None, "at": 102.5, "error": "timeout"},
        },
    }
    assert view.healthy(views) and not view.healthy({"pop2": views["pop2"]})


def test_the_report_parses_on_the_pop_side() -> None:
    external = pytest.importorskip("pop.external")
    views = {"pop1": run(view.start(["tcp"], 99.0), [("tcp", OK), ("tcp", OK), ("tcp", REFUSED)])[-1]}
    landings = {"198.51.100.1": view.Landing(at=102.5, pop="pop1", server=None, rtt=0.0009)}
    body = view.encode(view.report("probe1", "ab12", 7, 103.25, views=views, landings=landings))
    parsed = external.parse_report(json.loads(body))
    assert parsed.sequence == 7 and parsed.pops["pop1"].reachable  # falling: still reachable
    assert parsed.pops["pop1"].checks["tcp"].error == "refused"
