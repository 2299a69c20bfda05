"""The PoP verdict: watermarks, hold-down, drain — as tables."""

from dataclasses import replace

import pytest

from pop.verdict import PoolView, Verdict, VerdictPolicy, adopt, decide, drain, undrain

POLICY = VerdictPolicy(low_watermark=0.5, high_watermark=0.75, hold_down=5.0)
ANNOUNCED = Verdict(announce=True, since=0.0, reason="x", ever_announced=True, changes=1)
WITHDRAWN = Verdict(announce=False, since=0.0, reason="x", ever_announced=True, changes=2)


@pytest.mark.parametrize(("current", "healthy", "total", "announce", "hold_down_until"), [
    # start: withdrawn until the servers have risen, then announce at once (no history)
    (Verdict(), 0, 4, False, None),
    (Verdict(), 2, 4, False, None),  # 0.5 < high
    (Verdict(), 3, 4, True, None),
    # announced: stays down to the low watermark, withdraws below it
    (ANNOUNCED, 4, 4, True, None),
    (ANNOUNCED, 2, 4, True, None),  # 0.5 is not below 0.5
    (ANNOUNCED, 1, 4, False, None),
    (ANNOUNCED, 0, 4, False, None),
    # withdrawn after a failure: between the marks nothing happens, at the high mark the hold-down starts
    (WITHDRAWN, 2, 4, False, None),
    (WITHDRAWN, 3, 4, False, 15.0),
    # hold-down running: not yet, then announce; falling back cancels it
    (Verdict(ever_announced=True, hold_down_until=12.0), 4, 4, False, 12.0),
    (Verdict(ever_announced=True, hold_down_until=10.0), 4, 4, True, None),
    (Verdict(ever_announced=True, hold_down_until=12.0), 2, 4, False, None),
])
def test_decide(current: Verdict, healthy: int, total: int, announce: bool, hold_down_until: float | None) -> None:
    new = decide(current, PoolView(healthy, total), POLICY, now=10.0)
    assert (new.announce, new.hold_down_until) == (announce, hold_down_until)
    if new.announce != current.announce:
        assert new.since == 10.0
        assert new.changes == current.changes + 1


def test_reasons_say_why() -> None:
    withdrawn = decide(ANNOUNCED, PoolView(1, 4), POLICY, 1.0)
    assert withdrawn.reason == withdrawn.cause == "1/4 healthy, below low watermark 0.5"
    assert decide(withdrawn, PoolView(2, 4), POLICY, 1.5).cause == withdrawn.cause
    holding = decide(withdrawn, PoolView(4, 4), POLICY, 2.0)
    assert holding.reason == "4/4 healthy, hold-down 5s before re-announcing"
    back = decide(holding, PoolView(4, 4), POLICY, 7.0)
    assert back.announce and back.reason == "4/4 healthy, stayed healthy through hold-down 5s"


def test_empty_pool_never_announces() -> None:
    assert not decide(Verdict(), PoolView(0, 0), POLICY, 1.0).announce


def test_zero_hold_down_re_announces_at_once() -> None:
    policy = VerdictPolicy(0.5, 0.75, hold_down=0.0)
    assert decide(WITHDRAWN, PoolView(4, 4), policy, 1.0).announce


def test_drain_withdraws_and_holds_until_undrain() -> None:
    drained = drain(ANNOUNCED, 3.0)
    assert not drained.announce and drained.drained and drained.reason == "drained by operator"
    assert not decide(drained, PoolView(4, 4), POLICY, 4.0).announce
    resumed = decide(undrain(drained), PoolView(4, 4), POLICY, 5.0)
    assert not resumed.announce and resumed.hold_down_until == 10.0  # the hold-down applies after a drain
    assert decide(resumed, PoolView(4, 4), POLICY, 10.0).announce


def test_drain_before_first_announce_keeps_it_withdrawn() -> None:
    drained = drain(Verdict(), 1.0)
    assert not decide(drained, PoolView(4, 4), POLICY, 2.0).announce


@pytest.mark.parametrize(("healthy", "reason"), [
    (4, "4/4 healthy, servers up"),
    (3, "3/4 healthy, degraded: not below low watermark 0.5"),
    (2, "2/4 healthy, degraded: not below low watermark 0.5"),
])
def test_reason_follows_the_pool_while_announced(healthy: int, reason: str) -> None:
    announced = Verdict(announce=True, since=0.0, reason="4/4 healthy, servers up", cause="4/4 healthy, servers up",
                        ever_announced=True, changes=1)
    new = decide(announced, PoolView(healthy, 4), POLICY, 10.0)
    assert (new.announce, new.reason, new.cause, new.changes) == (True, reason, "4/4 healthy, servers up", 1)


@pytest.mark.parametrize(("healthy", "drained", "announce"), [
    (4, False, True),
    (2, False, True),  # not below the low watermark: the previous engine's announcement stays
    (1, False, False),
    (0, False, False),
    (4, True, False),  # an operator drain outlives the engine
])
def test_adopt_keeps_the_announcement_only_if_the_pool_passes(healthy: int, drained: bool, announce: bool) -> None:
    new = adopt(Verdict(drained=drained), PoolView(healthy, 4), POLICY, 10.0)
    assert (new.announce, new.ever_announced, new.changes) == (announce, True, 0)
    assert "at engine start" in new.reason


BLOCK = "unreachable from outside: 3/3 agents"
BY_TIER3 = replace(WITHDRAWN, decided_by="external")


@pytest.mark.parametrize(("current", "healthy", "external", "announce", "reason", "hold_down_until"), [
    # an internally healthy PoP cut off from outside is withdrawn by tier 3 ...
    (ANNOUNCED, 4, BLOCK, False, BLOCK, None),
    # ... and held withdrawn while the block lasts, whatever the pool says
    (BY_TIER3, 4, BLOCK, False, BLOCK, None),
    (replace(BY_TIER3, hold_down_until=12.0), 4, BLOCK, False, BLOCK, None),  # cancels a hold-down
    # a PoP the pool withdrew: held while the block lasts, but its own hold-down runs meanwhile
    (WITHDRAWN, 4, BLOCK, False, "4/4 healthy, hold-down 5s before re-announcing", 15.0),
    (replace(WITHDRAWN, hold_down_until=10.0), 4, BLOCK, False, BLOCK + "; the pool would announce", 10.0),
    (replace(WITHDRAWN, hold_down_until=10.0), 4, "", True, "4/4 healthy, stayed healthy through hold-down 5s", None),
    (Verdict(), 4, BLOCK, False, BLOCK + "; the pool would announce", None),  # never announced: held too
    # tier 3 never announces: a withdrawn PoP without the block follows the pool and its hold-down
    (WITHDRAWN, 4, "", False, "4/4 healthy, hold-down 5s before re-announcing", 15.0),
    (BY_TIER3, 4, "", False, "4/4 healthy, hold-down 5s before re-announcing", 15.0),
    (WITHDRAWN, 1, "", False, "1/4 healthy, below high watermark 0.75", None),
    # the pool still withdraws on its own, the block or not
    (ANNOUNCED, 1, BLOCK, False, "1/4 healthy, below low watermark 0.5", None),
])
def test_tier_3_may_withdraw_alone_but_never_announce(current: Verdict, healthy: int, external: str, *,
                                                      announce: bool, reason: str,
                                                      hold_down_until: float | None) -> None:
    new = decide(current, PoolView(healthy, 4), POLICY, 10.0, external)
    assert (new.announce, new.reason, new.hold_down_until) == (announce, reason, hold_down_until)
    if current.announce and not announce:
        assert new.decided_by == ("external" if reason == BLOCK else "pool")
