"""Flap dampening at the origin (pop.dampening): the figure of merit, suppression and reuse as
tables with time passed in; the verdict holding a suppressed PoP; the engine charging only
withdrawals caused by health; the config section's errors."""

from __future__ import annotations

import asyncio

import pytest

from pop.config import ConfigError, load
from pop.dampening import Damping, Policy, figure, flap, reason, reusable_at, step, view
from pop.engine import Engine
from pop.verdict import PoolView, Verdict, VerdictPolicy, decide
from tests.unit.test_engine import CONFIG_TEXT, DOWN, OK, POLICY, FakeSpeaker, ManualClock, Scripted

P = Policy(enabled=True, penalty=1000, suppress=3000, reuse=750, half_life=300, max_suppress=1800)


def test_the_figure_halves_every_half_life() -> None:
    state = flap(Damping(), 0.0, P)
    assert [round(figure(state, t, P)) for t in (0, 300, 600, 900)] == [1000, 500, 250, 125]


@pytest.mark.parametrize(("flaps_at", "suppressed"), [
    ([0, 10, 20], False),  # 2999.x: not above 3000
    ([0, 10, 20, 30], True),  # the fourth quick withdrawal
    ([0, 400, 800, 1200], False),  # the same four, spread out: the figure decays in between
])
def test_suppression_needs_flaps_close_together(flaps_at: list[float], suppressed: bool) -> None:
    state = Damping()
    for at in flaps_at:
        state = flap(state, at, P)
    assert (state.suppressed_since is not None) == suppressed
    assert state.flaps == len(flaps_at)


def test_a_suppression_lifts_once_the_figure_is_below_reuse_and_says_when() -> None:
    state = Damping()
    for at in (0, 10, 20, 30):
        state = flap(state, at, P)
    until = reusable_at(state, P)
    assert until is not None and 30 + 2 * 300 < until < 30 + 3 * 300  # ~3990 -> 750: 2.4 half-lives
    assert step(state, until - 1, P).suppressed_since is not None
    assert "suppressed by flap dampening: 4 flaps" in reason(state, until - 1, P)
    lifted = step(state, until + 0.001, P)
    assert lifted.suppressed_since is None and reason(lifted, until + 1, P) == ""
    assert view(lifted, until + 1, P) == {"figure": pytest.approx(750, abs=2), "flaps": 4, "suppressed": False,
                                          "reusable_in_seconds": None, "suppress": 3000, "reuse": 750,
                                          "half_life": 300}


def test_a_suppression_never_outlasts_max_suppress() -> None:
    short = Policy(enabled=True, max_suppress=600)
    state = Damping()
    for at in range(0, 200, 10):  # 20 flaps: a figure that would take 22 minutes to decay
        state = flap(state, float(at), short)
    since = state.suppressed_since
    assert since is not None and reusable_at(state, short) == since + 600
    assert step(state, since + 599, short).suppressed_since is not None
    assert step(state, since + 600, short).suppressed_since is None


def test_disabled_dampening_charges_nothing() -> None:
    off = Policy(enabled=False)
    assert flap(Damping(), 0.0, off) == Damping() and view(Damping(), 0.0, off) is None


WITHDRAWN = Verdict(announce=False, since=0.0, reason="x", ever_announced=True, changes=2, decided_by="pool")
VP = VerdictPolicy(low_watermark=0.5, high_watermark=0.75, hold_down=5.0)
HELD = "suppressed by flap dampening"


@pytest.mark.parametrize(("current", "suppressed", "announce", "reason", "hold_down_until"), [
    # the hold-down starts while suppressed ...
    (WITHDRAWN, HELD, False, "4/4 healthy, hold-down 5s before re-announcing", 15.0),
    # ... and once it has passed, only the suppression holds the PoP
    (Verdict(announce=False, ever_announced=True, hold_down_until=10.0), HELD, False,
     f"{HELD}; the pool would announce", 10.0),
    (Verdict(announce=False, ever_announced=True, hold_down_until=10.0), "", True,
     "4/4 healthy, stayed healthy through hold-down 5s", None),
    # dampening never withdraws
    (Verdict(announce=True, ever_announced=True), HELD, True, "4/4 healthy, servers up", None),
])
def test_the_verdict_holds_a_suppressed_pop_but_never_withdraws_for_it(
        current: Verdict, suppressed: str, announce: bool, reason: str, hold_down_until: float | None) -> None:
    new = decide(current, PoolView(4, 4), VP, 10.0, suppressed=suppressed)
    assert (new.announce, new.reason, new.hold_down_until) == (announce, reason, hold_down_until)


DAMPED = CONFIG_TEXT + "dampening: {enabled: true, penalty: 1000, suppress: 2500, reuse: 750, half_life: 60}\n"


def test_the_engine_suppresses_a_pop_whose_health_flaps_and_brings_it_back_later() -> None:
    async def main() -> None:
        clock = ManualClock()
        checks = {"a": Scripted(), "b": Scripted()}
        engine = Engine(load(DAMPED), FakeSpeaker(), {name: [(check, POLICY)] for name, check in checks.items()},
                        clock=clock)

        def servers(result: object, times: int = 2) -> None:
            for _ in range(times):
                for name in ("a", "b"):
                    engine.observe(name, "tcp", result)  # type: ignore[arg-type]

        for flap_number in range(3):
            servers(OK)
            clock.now += 0.5  # past the 0.3 s hold-down
            engine.reevaluate()
            assert engine.verdict.announce, (flap_number, engine.verdict.reason)
            servers(DOWN, 1)
            assert not engine.verdict.announce
            clock.now += 1.0
        assert engine.damping.flaps == 3 and engine.damping.suppressed_since is not None
        servers(OK)
        clock.now += 5.0
        engine.reevaluate()
        assert not engine.verdict.announce and "suppressed by flap dampening: 3 flaps" in engine.verdict.reason
        assert any(e.kind == "dampening" and e.new == "suppressed" for e in engine.events)
        status = engine.snapshot().dampening
        assert status is not None and status["suppressed"] and status["reusable_in_seconds"] > 0
        until = reusable_at(engine.damping, engine.config.dampening)
        assert until is not None
        clock.now = until + 0.01
        engine.reevaluate()
        assert engine.verdict.announce and engine.damping.suppressed_since is None

    asyncio.run(main())


@pytest.mark.parametrize(("section", "problem"), [
    ("{enabled: true, reuse: 3000}", "pop.yaml: dampening.reuse: 3000 must be below suppress (3000)"),
    ("{penalty: 5000}", "pop.yaml: dampening.penalty: 5000 is above suppress (3000)"),
    ("{half_life: 0}", "pop.yaml: dampening.half_life: 0 is out of range"),
    ("{halflife: 60}", "pop.yaml: dampening.halflife: unknown key (did you mean 'half_life'?)"),
])
def test_bad_dampening_settings_are_named(section: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(CONFIG_TEXT + f"dampening: {section}\n", "pop.yaml")
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_dampening_is_off_unless_configured() -> None:
    assert not load(CONFIG_TEXT).dampening.enabled
