"""Tier 3 in the engine: signed reports offered as pulled -> the gate -> the PoP verdict.

The reports are signed with the real HMAC (pop.agent.auth) and go through Tier3.offer exactly
as pop.adapters.agents hands them over; time is an argument (no sleeps)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pop.agent import auth
from pop.config import load
from pop.engine import Engine
from pop.external import Policy, Tier3
from pop.external import summary as external_summary
from tests.unit.test_engine import CONFIG_TEXT, OK, POLICY, FakeSpeaker, ManualClock, Scripted, feed
from tests.unit.test_external import NOW, body

KEY = b"0123456789abcdef0123456789abcdef"
AGENTS = ("probe1", "probe2", "probe3")


class Outside:
    """Three agents whose opinion of pop t1 the test sets; every report signed and sequenced."""

    def __init__(self, tier3: Tier3) -> None:
        self.tier3 = tier3
        self.sequence = 0

    def say(self, at: float, t1: bool, *, others: bool = True, agents: tuple[str, ...] = AGENTS) -> list[str | None]:
        problems = []
        for agent in agents:
            self.sequence += 1
            data: dict[str, Any] = body(agent, sequence=self.sequence, at=at, pops={"t1": t1, "t2": others})
            raw = json.dumps(data).encode()
            problems.append(self.tier3.offer(agent, raw, auth.sign(KEY, raw), at))
        return problems


def engine_with_tier3() -> tuple[Engine, Outside, ManualClock]:
    clock = ManualClock()
    tier3 = Tier3("t1", Policy(), KEY)
    engine = Engine(load(CONFIG_TEXT), FakeSpeaker(), {n: [(Scripted(), POLICY)] for n in ("a", "b")},
                    clock=clock, tier3=tier3, wall=lambda: NOW)
    feed(engine, "a", OK, 2)
    feed(engine, "b", OK, 2)
    assert engine.verdict.announce
    return engine, Outside(tier3), clock


def tick(engine: Engine, at: float) -> None:
    assert engine.tier3 is not None
    if engine.tier3.tick(at):
        engine.external_changed()


def test_cut_off_from_outside_withdraws_after_fall_for_and_returns_after_the_hold_down() -> None:
    engine, outside, clock = engine_with_tier3()
    assert outside.say(NOW, t1=False) == [None, None, None]
    tick(engine, NOW)
    assert engine.verdict.announce  # unreachable, but not yet for fall_for (2 s)
    outside.say(NOW + 2.0, t1=False)
    tick(engine, NOW + 2.0)
    assert not engine.verdict.announce and engine.verdict.decided_by == "external"
    assert engine.verdict.reason.startswith("unreachable from outside: 3/3 agents")
    assert engine.events[-1].kind == "verdict" and engine.events[-2].kind == "external"
    # reachable again: the gate clears, the PoP waits out the hold-down (0.3 s here) like any other
    outside.say(NOW + 3.0, t1=True)
    tick(engine, NOW + 3.0)
    assert not engine.verdict.announce and engine.verdict.hold_down_until is not None
    clock.now = engine.verdict.hold_down_until + 0.01
    engine.reevaluate()
    assert engine.verdict.announce


@pytest.mark.parametrize(("case", "t1", "others", "agents"), [
    ("every agent dead (no report at all)", False, True, ()),
    ("one agent alone says unreachable", False, True, ("probe1",)),
    ("every agent sees every PoP down", False, False, AGENTS),
])
def test_monitoring_that_broke_never_withdraws(case: str, t1: bool, others: bool, agents: tuple[str, ...]) -> None:
    engine, outside, _ = engine_with_tier3()
    for second in range(10):
        outside.say(NOW + second, t1=t1, others=others, agents=agents)
        tick(engine, NOW + second)
    assert engine.verdict.announce, case
    assert engine.tier3 is not None and not engine.tier3.gate.blocks


def test_forged_stale_and_replayed_reports_change_nothing() -> None:
    engine, _, _ = engine_with_tier3()
    assert engine.tier3 is not None
    tier3 = engine.tier3
    raw = json.dumps(body("probe1", sequence=1, at=NOW, pops={"t1": False, "t2": True})).encode()
    assert tier3.offer("probe1", raw, auth.sign(b"another key of sixteen+", raw), NOW).startswith("forged")
    assert tier3.offer("probe2", raw, auth.sign(KEY, raw), NOW).startswith("impostor")
    assert tier3.offer("probe1", raw + b" ", auth.sign(KEY, raw), NOW).startswith("forged")  # tampered
    assert tier3.offer("probe1", b"{not json", auth.sign(KEY, b"{not json"), NOW).startswith("malformed")
    old = json.dumps(body("probe1", sequence=2, at=NOW - 60, pops={"t1": False, "t2": True})).encode()
    assert tier3.offer("probe1", old, auth.sign(KEY, old), NOW).startswith("stale")
    assert tier3.offer("probe1", raw, auth.sign(KEY, raw), NOW) is None
    assert tier3.offer("probe1", raw, auth.sign(KEY, raw), NOW + 1).startswith("duplicate")
    tick(engine, NOW + 5)
    assert engine.verdict.announce and tier3.view.kind == "unknown"
    assert tier3.dropped == {"duplicate": 1, "forged": 2, "impostor": 1, "malformed": 1, "stale": 1}


def test_status_shows_the_view_from_outside_and_the_catchment() -> None:
    engine, outside, _ = engine_with_tier3()
    outside.say(NOW, t1=True)
    tick(engine, NOW)
    snap = engine.snapshot()
    assert snap.external is not None
    assert (snap.external["view"], snap.external["competent"], snap.external["blocking"]) == ("reachable", 3, False)
    assert snap.external["catchment"]["probe2"]["198.51.100.1"]["pop"] == "pop1"


def test_the_catchment_keeps_its_recent_changes() -> None:
    engine, _, _ = engine_with_tier3()
    assert engine.tier3 is not None
    for second, lands in enumerate(("pop1", "pop1", "t2", "t2")):
        data = body("probe1", sequence=second + 1, at=NOW + second, pops={"t1": True, "t2": True})
        data["anycast"]["198.51.100.1"]["pop"] = lands
        raw = json.dumps(data).encode()
        assert engine.tier3.offer("probe1", raw, auth.sign(KEY, raw), NOW + second) is None
    changes = external_summary(engine.tier3, NOW + 4)["catchment_changes"]
    assert changes == [{"ago_seconds": 2.0, "agent": "probe1", "address": "198.51.100.1", "from": "pop1", "to": "t2"}]
