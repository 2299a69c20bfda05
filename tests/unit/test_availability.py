"""Availability accounting: the pure module as tables, and the history file across restarts."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pop import availability
from pop.availability import DAY, Mark
from pop.history import AnnounceHistory

H = 3600.0
T0 = 1_000_000_000.0
UP = Mark(T0, True)


def down(at: float, cause: str) -> Mark:
    return Mark(at, False, cause)


@pytest.mark.parametrize(("history", "now", "seconds", "expected"), [
    # a whole day announced
    ([UP], T0 + DAY, DAY, (DAY, {}, DAY)),
    # younger than the window: only the observed hour counts
    ([UP], T0 + H, DAY, (H, {}, H)),
    # one hour withdrawn by the pool in the middle of a day
    ([UP, down(T0 + 10 * H, "pool"), Mark(T0 + 11 * H, True)], T0 + DAY, DAY, (23 * H, {"pool": H}, DAY)),
    # the window's start cuts the first mark's interval
    ([down(T0, "engine"), Mark(T0 + H, True)], T0 + DAY + 2 * H, DAY, (DAY, {}, DAY)),
    ([down(T0, "engine"), Mark(T0 + H, True)], T0 + DAY, DAY, (23 * H, {"engine": H}, DAY)),
    # the last mark lasts until now
    ([UP, down(T0 + H, "operator")], T0 + 3 * H, DAY, (H, {"operator": 2 * H}, 3 * H)),
    # a mark in the future (the clock stepped back) counts nothing beyond now
    ([UP, down(T0 + 5 * H, "external")], T0 + 2 * H, DAY, (2 * H, {}, 2 * H)),
])
def test_window_adds_the_seconds_in_each_state(history: list[Mark], now: float, seconds: float,
                                               expected: tuple[float, dict[str, float], float]) -> None:
    announced, down_by_cause, observed = expected
    w = availability.window(history, now, "w", seconds, 0.999)
    assert w.announced == pytest.approx(announced)
    assert w.observed == pytest.approx(observed)
    assert w.down == pytest.approx({c: down_by_cause.get(c, 0.0) for c in availability.CAUSES})


@pytest.mark.parametrize(("history", "ratio", "raw_ratio", "remaining"), [
    # 30 s of pool outage in a day, SLO 99.9 %: budget 86.4 s, 30 s spent
    ([UP, down(T0 + H, "pool"), Mark(T0 + H + 30, True)], 1 - 30 / DAY, 1 - 30 / DAY, 1 - 30 / 86.4),
    # a 2 h operator drain is planned: neither an outage nor budget spent, but users had no PoP
    ([UP, down(T0 + H, "operator"), Mark(T0 + 3 * H, True)], 1.0, 22 / 24, 1.0),
    # the engine not running counts as down (unknown), and spends budget
    ([UP, down(T0 + H, "engine"), Mark(T0 + H + 172.8, True)], 1 - 172.8 / DAY, 1 - 172.8 / DAY, -1.0),
    # nothing eligible (drained all day): no ratio, the budget is untouched
    ([down(T0, "operator")], None, 0.0, 1.0),
])
def test_ratios_and_error_budget_leave_planned_maintenance_out(history: list[Mark], ratio: float | None,
                                                               raw_ratio: float, remaining: float) -> None:
    w = availability.window(history, T0 + DAY, "24h", DAY, 0.999)
    assert w.ratio == (None if ratio is None else pytest.approx(ratio))
    assert w.raw_ratio == pytest.approx(raw_ratio)
    assert w.budget_remaining == pytest.approx(remaining)


@pytest.mark.parametrize(("announced", "wanted", "drained", "decided_by", "cause"), [
    (True, True, False, "pool", ""),
    (False, False, True, "pool", "operator"),  # a drain trumps what withdrew it first
    (False, False, False, "operator", "operator"),
    (False, False, False, "pool", "pool"),
    (False, False, False, "external", "external"),
    (False, False, False, "", "engine"),  # started, nothing decided yet
    (False, True, False, "pool", "engine"),  # decided to announce, not (yet) made true
])
def test_cause_of_a_withdrawal(announced: bool, wanted: bool, drained: bool, decided_by: str, cause: str) -> None:
    assert availability.cause(announced=announced, wanted=wanted, drained=drained, decided_by=decided_by) == cause


@pytest.mark.parametrize(("history", "now", "expected"), [
    ([], T0, []),
    ([UP], T0 + H, [UP]),
    # older than 30 d: the state at the cut-off stays, moved to it
    ([UP, down(T0 + H, "pool"), Mark(T0 + 2 * H, True), down(T0 + 40 * DAY, "operator")], T0 + 50 * DAY,
     [Mark(T0 + 20 * DAY, True), down(T0 + 40 * DAY, "operator")]),
])
def test_compact_keeps_the_state_at_the_cutoff(history: list[Mark], now: float, expected: list[Mark]) -> None:
    assert availability.compact(history, now) == expected


@pytest.mark.parametrize(("line", "problem"), [
    ('{"t": 1, "announced": true, "cause": ""}', None),
    ('{"t": 1, "announced": false, "cause": "pool"}', None),
    ('{"t": 1, "announced": false, "cause": "lunch"}', "cause: must be one of pool, external, operator, engine"),
    ('{"t": 1, "announced": true, "cause": "pool"}', "cause: must be empty while announced"),
    ('{"t": "1", "announced": true, "cause": ""}', "t: must be a time in seconds"),
    ('{"t": 1, "announced": 1, "cause": ""}', "announced: must be true or false"),
    ('[1]', "not a JSON object"),
    ('{"t": 1, "annou', "Unterminated string"),
])
def test_parse_skips_what_is_not_a_mark(line: str, problem: str | None) -> None:
    marks, problems = availability.parse(line + "\n")
    if problem is None:
        assert len(marks) == 1 and problems == []
    else:
        assert marks == [] and problems[0][0] == 1 and problem in problems[0][1]


def test_history_survives_a_restart_and_counts_the_gap_as_engine_down(tmp_path: Path) -> None:
    path = tmp_path / "availability.log"
    first = AnnounceHistory(path)
    first.load(T0)
    first.note(down(T0, "engine"))
    first.note(Mark(T0 + 10, True))
    first.note(Mark(T0 + 20, True))  # no change: not recorded
    first.alive(T0 + 100)
    # the engine is SIGKILLed: no stop mark; the next one starts at T0 + 160
    second = AnnounceHistory(path)
    second.load(T0 + 160)
    assert second.marks == [down(T0, "engine"), Mark(T0 + 10, True), down(T0 + 100, "engine")]
    second.note(Mark(T0 + 170, True))
    second.stop(T0 + 200)
    third = AnnounceHistory(path)
    third.load(T0 + 300)  # a clean stop: nothing to add
    w = availability.window(third.marks, T0 + 300, "24h", DAY, 0.999)
    assert (w.announced, w.down["engine"]) == (90 + 30, 10 + 70 + 100)


def test_corrupt_lines_are_skipped_with_a_warning_and_old_marks_compacted(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "availability.log"
    old = availability.to_line(Mark(T0, True))
    path.write_text(old + "{torn\n" + availability.to_line(down(T0 + 40 * DAY, "pool")))
    history = AnnounceHistory(path)
    with caplog.at_level(logging.WARNING):
        history.load(T0 + 40 * DAY + 10)
    assert "availability.corrupt_line" in caplog.text and "line=2" in caplog.text
    cutoff = T0 + 10 * DAY + 10
    # no alive mark was left: the previous engine is known to have run until its last mark only
    assert history.marks == [Mark(cutoff, True), down(T0 + 40 * DAY, "pool"), down(T0 + 40 * DAY, "engine")]
    assert availability.parse(path.read_text()) == (history.marks, [])  # the file was rewritten
