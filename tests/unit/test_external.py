"""Tier 3's pure core (pop/external.py) against docs/decisions.md, as tables."""

from __future__ import annotations

import contextlib
import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pop.external import (
    Gate,
    Landing,
    Ledger,
    Policy,
    Rejection,
    RejectionKind,
    Report,
    ReportError,
    ViewKind,
    accept,
    catchment,
    parse_report,
    step,
    view,
)

NOW = 1_764_460_000.0
POLICY = Policy()  # quorum 2, fraction 0.5, max_age 5, max_skew 2, fall_for 2


def body(agent: str = "probe1", *, boot_id: str = "4f1c-aa", sequence: int = 1, at: float = NOW,
         pops: dict[str, bool] | None = None) -> dict[str, Any]:
    """A report's JSON body as an agent serves it; `pops` maps PoP -> reachable."""
    opinions = {"pop1": True, "pop2": True} if pops is None else pops
    return {
        "version": 1, "agent": agent, "boot_id": boot_id, "sequence": sequence, "generated_at": at,
        "pops": {name: {"reachable": ok, "streak": 12, "rtt_ms": 0.8 if ok else None, "since": at - 10,
                        "checks": {"tcp": {"ok": ok, "rtt_ms": 0.8 if ok else None,
                                           "error": None if ok else "timeout"},
                                   "wireguard": {"ok": ok, "rtt_ms": 1.2 if ok else None,
                                                 "error": None if ok else "no handshake"}}}
                 for name, ok in opinions.items()},
        "anycast": {"198.51.100.1": {"pop": "pop1", "server": "vpn11", "rtt_ms": 0.9, "at": at - 0.1,
                                     "error": None}},
    }


def report(agent: str = "probe1", **kwargs: Any) -> Report:
    return parse_report(body(agent, **kwargs))


def ledger_of(*reports: Report) -> Ledger:
    ledger = Ledger()
    for item in reports:
        ledger, rejection = accept(ledger, item, NOW, POLICY)
        assert rejection is None, rejection
    return ledger


# --- parse_report --------------------------------------------------------------------------


def test_parse_report_reads_every_field() -> None:
    parsed = parse_report(json.loads(json.dumps(body())))
    assert (parsed.agent, parsed.boot_id, parsed.sequence, parsed.generated_at) == ("probe1", "4f1c-aa", 1, NOW)
    assert parsed.pops["pop1"].reachable and parsed.pops["pop1"].streak == 12
    assert parsed.pops["pop1"].checks["wireguard"].rtt_ms == 1.2
    assert parsed.anycast["198.51.100.1"] == Landing("pop1", "vpn11", 0.9, NOW - 0.1, None)


def test_parse_report_keeps_an_unreachable_pop_with_null_rtt_and_its_errors() -> None:
    parsed = report(pops={"pop1": False, "pop2": True})
    assert parsed.pops["pop1"].rtt_ms is None
    assert parsed.pops["pop1"].checks["tcp"].error == "timeout"


def test_parse_report_normalises_anycast_addresses() -> None:
    data = body()
    data["anycast"] = {"2001:DB8:0::1": {"pop": None, "server": None, "rtt_ms": None, "at": NOW, "error": "timeout"}}
    assert list(parse_report(data).anycast) == ["2001:db8::1"]


def _set(path: str, value: Any) -> dict[str, Any]:
    """A valid body with the value at a dotted path replaced (or deleted when value is ...)."""
    data = body()
    keys = path.split("|")
    target = data
    for key in keys[:-1]:
        target = target[key]
    if value is ...:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return data


@pytest.mark.parametrize(("data", "message"), [
    ([], "(top level): must be a mapping, not a list"),
    (None, "version: is required"),
    (_set("version", 2), "version: 2 is not supported (this PoP reads version 1)"),
    (_set("version", True), "version: must be an integer, not a boolean"),
    (_set("agent", "probe 1"), "agent: 'probe 1' is not a name"),
    (_set("agent", "x" * 64), "is not a name"),
    (_set("agent", ...), "agent: is required"),
    (_set("boot_id", "a/b"), "boot_id: 'a/b' is not a boot id"),
    (_set("sequence", -1), "sequence: -1 is out of range"),
    (_set("sequence", 1.0), "sequence: must be an integer, not a number"),
    (_set("generated_at", "now"), "generated_at: must be a number, not a string"),
    (_set("generated_at", float("nan")), "generated_at: nan is out of range"),
    (_set("generated_at", float("inf")), "generated_at: inf is out of range"),
    (_set("generated_at", 0), "generated_at: 0 is out of range"),
    (_set("generated_at", 10**400), "generated_at: a huge integer is out of range"),
    (_set("sequence", 10**5000), "sequence: a huge integer is out of range"),
    (_set("pops|pop1|rtt_ms", "fast"), "pops.pop1.rtt_ms: must be a number, not a string"),
    (_set("pops|pop1|rtt_ms", -1), "pops.pop1.rtt_ms: -1 is out of range"),
    (_set("pops|pop1|reachable", 1), "pops.pop1.reachable: must be true or false, not an integer"),
    (_set("pops|pop1|reachable", ...), "pops.pop1.reachable: is required"),
    (_set("pops|pop1|streak", -3), "pops.pop1.streak: -3 is out of range"),
    (_set("pops|pop1|checks", []), "pops.pop1.checks: must be a mapping, not a list"),
    (_set("pops|pop1|checks", None), "pops.pop1.checks: is required"),
    (_set("pops|pop1|checks|tcp|error", "line\nforged log line"), "pops.pop1.checks.tcp.error: contains a control character"),
    (_set("pops|pop1|checks|tcp|error", "x" * 257), "pops.pop1.checks.tcp.error: is 257 characters long, at most 256"),
    (_set("pops|pop1|checks|tcp|ok", "yes"), "pops.pop1.checks.tcp.ok: must be true or false"),
    (_set("pops|pop1|checks|tcp|latency", 1), "pops.pop1.checks.tcp.latency: unknown key"),
    (_set("pops|pop1|checks", {f"c{i}": {"ok": True} for i in range(17)}), "pops.pop1.checks: has 17 entries, at most 16"),
    (_set("pops|pop1|sinse", NOW), "pops.pop1.sinse: unknown key (did you mean 'since'?)"),
    (_set("pops|bad name", {}), "pops: key 'bad name' is not a name"),
    (_set("pops", {f"pop{i}": {} for i in range(1001)}), "pops: has 1001 entries, at most 1000"),
    (_set("pops", None), "pops: is required"),
    (_set("pops", "pop1"), "pops: must be a mapping, not a string"),
    (_set("anycast", None), "anycast: is required"),
    (_set("anycast", [1]), "anycast: must be a mapping, not a list"),
    (_set("anycast|not-an-ip", {}), "anycast: 'not-an-ip' is not an IP address"),
    (_set("anycast|fe80::1%eth0", {}), "anycast: 'fe80::1%eth0' has an IPv6 zone"),
    (_set("anycast|198.51.100.01", {}), "anycast: '198.51.100.01' is not an IP address"),
    (_set("anycast|198.51.100.1|pop", "pop 1"), "anycast.198.51.100.1.pop: 'pop 1' is not a name"),
    (_set("anycast|198.51.100.1|at", None), "anycast.198.51.100.1.at: is required"),
    (_set("extra", 1), "extra: unknown key"),
])
def test_parse_report_rejects_bad_input_naming_path_and_problem(data: Any, message: str) -> None:
    with pytest.raises(ReportError) as error:
        parse_report(data)
    assert message in str(error.value)


def test_parse_report_rejects_the_same_anycast_address_spelt_twice() -> None:
    data = _set("anycast|2001:db8::1", {"pop": "pop1", "server": "vpn11", "rtt_ms": 1.0, "at": NOW, "error": None})
    data["anycast"]["2001:DB8::1"] = data["anycast"]["2001:db8::1"]
    with pytest.raises(ReportError, match=r"anycast\.2001:db8::1: is given twice"):
        parse_report(data)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_parse_report_raises_only_report_error_on_any_json(data: Any) -> None:
    with contextlib.suppress(ReportError):
        parse_report(data)


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(data, dict):
        for key, value in data.items():
            found += _paths(value, (*prefix, key))
    return found


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_parse_report_raises_only_report_error_on_a_mutated_report(data: st.DataObject) -> None:
    """A valid report with one value replaced, one key added or one key removed, anywhere."""
    mutated = copy.deepcopy(body(pops={"pop1": True, "pop2": False}))
    path = data.draw(st.sampled_from(_paths(mutated)[1:]))
    parent = mutated
    for key in path[:-1]:
        parent = parent[key]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace":
        parent[path[-1]] = data.draw(JSON)
    elif action == "delete":
        del parent[path[-1]]
    else:
        parent[data.draw(st.text(max_size=12))] = data.draw(JSON)
    with contextlib.suppress(ReportError):
        parse_report(mutated)


# --- accept --------------------------------------------------------------------------------

LAST = report(boot_id="run-a", sequence=10, at=NOW - 1)


@pytest.mark.parametrize(("incoming", "now", "expected"), [
    (report(boot_id="run-a", sequence=11, at=NOW), NOW, None),
    (report(boot_id="run-a", sequence=11, at=NOW - 4.9), NOW, None),
    (report(boot_id="run-a", sequence=11, at=NOW - 5.0), NOW, RejectionKind.STALE),
    (report(boot_id="run-a", sequence=11, at=NOW - 60), NOW, RejectionKind.STALE),
    (report(boot_id="run-a", sequence=11, at=NOW + 2.0), NOW, None),  # within max_skew
    (report(boot_id="run-a", sequence=11, at=NOW + 2.5), NOW, RejectionKind.FUTURE),
    (report(boot_id="run-a", sequence=10, at=NOW - 1), NOW, RejectionKind.DUPLICATE),
    (report(boot_id="run-a", sequence=10, at=NOW), NOW, RejectionKind.REPLAYED),  # same sequence, other content
    (report(boot_id="run-a", sequence=9, at=NOW), NOW, RejectionKind.REPLAYED),
    (report(boot_id="run-b", sequence=1, at=NOW - 0.5), NOW, None),  # agent restarted
    (report(boot_id="run-b", sequence=1, at=NOW - 1), NOW, RejectionKind.OLD_BOOT),
    (report(boot_id="run-b", sequence=99, at=NOW - 2), NOW, RejectionKind.OLD_BOOT),
    (report("probe2", boot_id="run-a", sequence=1, at=NOW), NOW, None),  # another agent's own ledger
])
def test_accept(incoming: Report, now: float, expected: RejectionKind | None) -> None:
    before = ledger_of(LAST)
    after, rejection = accept(before, incoming, now, POLICY)
    if expected is None:
        assert rejection is None
        assert after.reports[incoming.agent] is incoming
    else:
        assert rejection is not None and rejection.kind is expected and rejection.agent == incoming.agent
        assert after is before  # a dropped report changes nothing


def test_accept_takes_the_first_report_of_an_agent_whatever_its_run() -> None:
    ledger, rejection = accept(Ledger(), report(boot_id="x", sequence=0), NOW, POLICY)
    assert rejection is None and ledger.reports["probe1"].boot_id == "x"


def test_accept_does_not_change_the_ledger_it_was_given() -> None:
    before = ledger_of(LAST)
    accept(before, report(boot_id="run-a", sequence=11), NOW, POLICY)
    assert before.reports["probe1"] is LAST


def test_rejection_reads_as_a_log_line() -> None:
    _, rejection = accept(ledger_of(LAST), report(boot_id="run-a", sequence=3), NOW, POLICY)
    assert str(rejection) == "replayed report from probe1: sequence 3 of run run-a is not newer than 10"
    assert isinstance(rejection, Rejection)


def test_a_lying_agent_cannot_move_the_ledger_back() -> None:
    """Stale, future-dated, replayed and old-run reports in turn: the last good one stays."""
    good = report(boot_id="run-b", sequence=5, at=NOW - 0.2, pops={"pop1": True, "pop2": True})
    ledger = ledger_of(report(boot_id="run-a", sequence=50, at=NOW - 3), good)
    lies = [report(boot_id="run-b", sequence=6, at=NOW - 30, pops={"pop1": False, "pop2": True}),
            report(boot_id="run-b", sequence=6, at=NOW + 60, pops={"pop1": False, "pop2": True}),
            report(boot_id="run-b", sequence=4, at=NOW, pops={"pop1": False, "pop2": True}),
            report(boot_id="run-a", sequence=51, at=NOW - 2.9, pops={"pop1": False, "pop2": True})]
    kinds = []
    for lie in lies:
        ledger, rejection = accept(ledger, lie, NOW, POLICY)
        kinds.append(rejection.kind if rejection else None)
    assert kinds == [RejectionKind.STALE, RejectionKind.FUTURE, RejectionKind.REPLAYED, RejectionKind.OLD_BOOT]
    assert ledger.reports["probe1"] is good


# --- view ----------------------------------------------------------------------------------

UP = {"pop1": True, "pop2": True}
CUT = {"pop1": False, "pop2": True}  # pop1 cut off, the agent still reaches pop2
BLIND = {"pop1": False, "pop2": False}  # the agent reaches nothing: its own network is broken


def agents(*opinions: dict[str, bool], at: float = NOW) -> Ledger:
    return ledger_of(*(report(f"probe{i + 1}", pops=pops, at=at) for i, pops in enumerate(opinions)))


@pytest.mark.parametrize(("ledger", "policy", "kind", "n", "u"), [
    # N < quorum -> unknown
    (Ledger(), POLICY, ViewKind.UNKNOWN, 0, 0),
    (agents(CUT), POLICY, ViewKind.UNKNOWN, 1, 1),
    (agents(UP), POLICY, ViewKind.UNKNOWN, 1, 0),
    (agents(CUT, CUT, CUT), Policy(quorum=4), ViewKind.UNKNOWN, 3, 3),
    # U >= quorum and U/N >= fraction -> unreachable
    (agents(CUT, CUT), POLICY, ViewKind.UNREACHABLE, 2, 2),
    (agents(CUT, CUT, UP, UP), POLICY, ViewKind.UNREACHABLE, 4, 2),  # 2/4 = the fraction exactly
    (agents(CUT, CUT, CUT, UP), POLICY, ViewKind.UNREACHABLE, 4, 3),
    (agents(CUT, UP), Policy(quorum=1), ViewKind.UNREACHABLE, 2, 1),
    # otherwise reachable
    (agents(UP, UP), POLICY, ViewKind.REACHABLE, 2, 0),
    (agents(CUT, UP, UP), POLICY, ViewKind.REACHABLE, 3, 1),  # U < quorum
    (agents(CUT, CUT, UP, UP, UP), POLICY, ViewKind.REACHABLE, 5, 2),  # 2/5 below the fraction
    (agents(CUT, CUT, UP), Policy(unreachable_fraction=0.75), ViewKind.REACHABLE, 3, 2),
    # fail open: every agent sees every PoP down -> nobody competent -> unknown
    (agents(BLIND, BLIND, BLIND), POLICY, ViewKind.UNKNOWN, 0, 0),
    # one agent's own network broken: it does not count, the others decide
    (agents(BLIND, UP, UP), POLICY, ViewKind.REACHABLE, 2, 0),
    (agents(BLIND, CUT), POLICY, ViewKind.UNKNOWN, 1, 1),
    # an agent that only probes this PoP cannot show it is competent
    (agents({"pop1": False}, {"pop1": False}), POLICY, ViewKind.UNKNOWN, 0, 0),
    # an agent silent about this PoP has no opinion of it
    (agents({"pop2": True, "pop3": True}, CUT, CUT), POLICY, ViewKind.UNREACHABLE, 2, 2),
])
def test_view(ledger: Ledger, policy: Policy, kind: ViewKind, n: int, u: int) -> None:
    seen = view(ledger, "pop1", NOW, policy)
    assert (seen.kind, seen.n, seen.u) == (kind, n, u)


def test_view_of_stale_agents_is_unknown() -> None:
    ledger = agents(CUT, CUT, CUT, at=NOW - 1)
    assert view(ledger, "pop1", NOW + 3.9, POLICY).kind is ViewKind.UNREACHABLE
    later = view(ledger, "pop1", NOW + 4.0, POLICY)  # 5 s after the reports: no longer fresh
    assert later.kind is ViewKind.UNKNOWN
    assert later.ignored == (("probe1", "stale (5.0s old)"), ("probe2", "stale (5.0s old)"),
                             ("probe3", "stale (5.0s old)"))


def test_view_names_the_agents_in_each_group_and_why_others_do_not_count() -> None:
    ledger = agents(CUT, UP, BLIND, {"pop2": True}, CUT)
    seen = view(ledger, "pop1", NOW, POLICY)
    assert seen.reaching == ("probe2",)
    assert seen.not_reaching == ("probe1", "probe5")
    assert seen.ignored == (("probe3", "reaches no other PoP"), ("probe4", "does not report pop1"))
    assert seen.reason == "unreachable from outside: 2/3 agents (probe1, probe5)"


@pytest.mark.parametrize(("ledger", "reason"), [
    (agents(UP, UP), "reachable from outside: 0/2 agents say unreachable"),
    (agents(CUT, UP, UP), "reachable from outside: 1/3 agents say unreachable (probe1)"),
    (agents(BLIND, UP), "unknown from outside: 1 competent agents, quorum 2 (probe1 reaches no other PoP)"),
    (Ledger(), "unknown from outside: 0 competent agents, quorum 2"),
])
def test_view_reason(ledger: Ledger, reason: str) -> None:
    assert view(ledger, "pop1", NOW, POLICY).reason == reason


# --- the gate ------------------------------------------------------------------------------

REACHABLE = view(agents(UP, UP), "pop1", NOW, POLICY)
UNREACHABLE = view(agents(CUT, CUT), "pop1", NOW, POLICY)
UNKNOWN = view(Ledger(), "pop1", NOW, POLICY)


def run(views: list[tuple[float, Any]], policy: Policy = POLICY) -> list[tuple[bool, float | None]]:
    gate = Gate()
    seen = []
    for at, current in views:
        gate = step(gate, current, at, policy)
        seen.append((gate.blocks, gate.due))
    return seen


@pytest.mark.parametrize(("views", "expected"), [
    ([(0, REACHABLE), (5, REACHABLE)], [(False, None), (False, None)]),
    ([(0, UNKNOWN), (100, UNKNOWN)], [(False, None), (False, None)]),  # unknown never blocks
    ([(0, UNREACHABLE), (1.9, UNREACHABLE), (2.0, UNREACHABLE), (9, UNREACHABLE)],
     [(False, 2.0), (False, 2.0), (True, None), (True, None)]),
    # released when the view is reachable or unknown again
    ([(0, UNREACHABLE), (2, UNREACHABLE), (3, REACHABLE)], [(False, 2.0), (True, None), (False, None)]),
    ([(0, UNREACHABLE), (2, UNREACHABLE), (3, UNKNOWN)], [(False, 2.0), (True, None), (False, None)]),
    # a break in the unreachable spell restarts fall_for
    ([(0, UNREACHABLE), (1.5, UNKNOWN), (2, UNREACHABLE), (3.9, UNREACHABLE), (4, UNREACHABLE)],
     [(False, 2.0), (False, None), (False, 4.0), (False, 4.0), (True, None)]),
])
def test_step(views: list[tuple[float, Any]], expected: list[tuple[bool, float | None]]) -> None:
    assert run(views) == expected


def test_step_with_fall_for_zero_blocks_at_once() -> None:
    assert run([(0, UNREACHABLE)], Policy(fall_for=0)) == [(True, None)]


@pytest.mark.parametrize(("views", "reason"), [
    ([(0, UNREACHABLE)], "unreachable from outside: 2/2 agents (probe1, probe2), blocks after 2s"),
    ([(0, UNREACHABLE), (2, UNREACHABLE)], "unreachable from outside: 2/2 agents (probe1, probe2), for 2s or more"),
    ([(0, UNREACHABLE), (2, UNREACHABLE), (3, UNKNOWN)], "unknown from outside: 0 competent agents, quorum 2"),
])
def test_step_reason(views: list[tuple[float, Any]], reason: str) -> None:
    gate = Gate()
    for at, current in views:
        gate = step(gate, current, at, POLICY)
    assert gate.reason == reason


# --- catchment -----------------------------------------------------------------------------


def test_catchment_lists_fresh_agents_only() -> None:
    ledger = ledger_of(report("probe1", at=NOW - 4), report("probe2", at=NOW))
    assert catchment(ledger, NOW, POLICY) == {
        "probe1": {"198.51.100.1": Landing("pop1", "vpn11", 0.9, NOW - 4.1, None)},
        "probe2": {"198.51.100.1": Landing("pop1", "vpn11", 0.9, NOW - 0.1, None)},
    }
    assert list(catchment(ledger, NOW + 1, POLICY)) == ["probe2"]
    assert catchment(ledger, NOW + 5, POLICY) == {}


# --- policy --------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"quorum": 0}, "quorum: must be at least 1"),
    ({"unreachable_fraction": 0}, "unreachable_fraction: must be in (0, 1]"),
    ({"unreachable_fraction": 1.5}, "unreachable_fraction: must be in (0, 1]"),
    ({"max_age": 0}, "max_age: must be a positive number of seconds"),
    ({"max_skew": -1}, "max_skew: must be a non-negative number of seconds"),
    ({"fall_for": float("nan")}, "fall_for: must be a non-negative number of seconds"),
])
def test_policy_rejects_bad_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        Policy(**kwargs)
