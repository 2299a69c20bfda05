"""Tier 3, pure: probe agents' reports -> the PoP's external view -> a gate on the PoP verdict.

The contract is docs/decisions.md ("Tier 3"); this module implements it and nothing else.
Time is an argument (`now`, the PoP's wall clock, seconds); nothing here does I/O.

    parse_report(json)            -> Report             (or ReportError: malformed)
    accept(ledger, report, now)   -> (Ledger, None)     (or (ledger, Rejection): stale, future,
                                                          replayed, old boot, duplicate)
    view(ledger, pop, now)        -> ExternalView       unknown | reachable | unreachable, U/N
    step(gate, view, now)         -> Gate               blocks once unreachable has lasted fall_for
    catchment(ledger, now)        -> who answers each anycast address, per fresh agent

The signature of a report is checked before `parse_report` (pop/agent/auth.py); a forged one
never reaches this module. A report that is rejected changes nothing: the ledger keeps the
agent's last accepted report until it, too, is older than `max_age`.

An agent is *fresh* while its last accepted report is younger than `max_age` (by the report's
own `generated_at`), and *competent* for a PoP while it is fresh, reports on that PoP and
reaches at least one other PoP. With N competent agents of which U say unreachable:
N < quorum -> unknown; U >= quorum and U/N >= unreachable_fraction -> unreachable; otherwise
reachable. Every agent seeing every PoP down makes no agent competent: unknown, fail open.

How the verdict uses the gate: `gate.blocks` is one more reason to withdraw an internally
healthy PoP (decided_by "external", reason `gate.reason`), never a reason to announce. When
`blocks` turns false (the view is reachable or unknown again) the PoP comes back like any
withdrawn PoP: after `pool.hold_down`, only if the internal verdict also says announce, and a
`blocks` that turns true again during the hold-down restarts it. The engine calls `step` on
every new view and again when `gate.due` passes (the moment fall_for will have elapsed).
"""

from __future__ import annotations

import collections
import enum
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NoReturn

from pop.agent import auth
from pop.config_reader import NAME, NAME_WHAT, Reader, join, shown

VERSION = 1
MAX_POPS = 1000
MAX_ANYCAST = 1000
MAX_CHECKS = 16
MAX_ERROR = 256  # characters of a probe's error text
MAX_TIME = 1e10  # seconds since the epoch (year 2286): any later date is a broken clock
MAX_RTT_MS = 600_000.0
MAX_SEQUENCE = 2**63 - 1

_BOOT_ID = re.compile(r"[A-Za-z0-9-]{1,64}")


class ReportError(ValueError):
    """A report that does not parse: `path: what is wrong`, the first problem found."""


@dataclass(frozen=True, slots=True)
class Check:
    """One probe of one PoP by one agent (tcp, wireguard, ...)."""

    ok: bool
    rtt_ms: float | None
    error: str | None


@dataclass(frozen=True, slots=True)
class Opinion:
    """An agent's opinion of one PoP's beacon, after the agent's own rise/fall counts."""

    reachable: bool
    streak: int  # consecutive rounds with this opinion
    rtt_ms: float | None
    since: float  # agent wall clock: when `reachable` last changed
    checks: Mapping[str, Check]


@dataclass(frozen=True, slots=True)
class Landing:
    """Who answered an anycast address for one agent: the PoP and server that said who they are."""

    pop: str | None
    server: str | None
    rtt_ms: float | None
    at: float  # agent wall clock
    error: str | None


@dataclass(frozen=True, slots=True)
class Report:
    agent: str
    boot_id: str  # one agent run; `sequence` counts up within it
    sequence: int
    generated_at: float  # agent wall clock
    pops: Mapping[str, Opinion]
    anycast: Mapping[str, Landing]  # address (normalised) -> landing


@dataclass(frozen=True, slots=True)
class Policy:
    quorum: int = 2
    unreachable_fraction: float = 0.5
    max_age: float = 5.0
    max_skew: float = 2.0
    fall_for: float = 2.0

    def __post_init__(self) -> None:
        problems = [f"{name}: {why}" for name, bad, why in (
            ("quorum", self.quorum < 1, "must be at least 1"),
            ("unreachable_fraction", not 0 < self.unreachable_fraction <= 1, "must be in (0, 1]"),
            ("max_age", not 0 < self.max_age < math.inf, "must be a positive number of seconds"),
            ("max_skew", not 0 <= self.max_skew < math.inf, "must be a non-negative number of seconds"),
            ("fall_for", not 0 <= self.fall_for < math.inf, "must be a non-negative number of seconds"),
        ) if bad]
        if problems:
            raise ValueError("external policy: " + "; ".join(problems))


class RejectionKind(enum.StrEnum):
    STALE = "stale"  # older than max_age on arrival
    FUTURE = "future"  # dated ahead of the PoP's clock by more than max_skew
    REPLAYED = "replayed"  # same agent run, sequence not newer than the last accepted one
    OLD_BOOT = "old_boot"  # a new agent run dated no later than the last accepted report
    DUPLICATE = "duplicate"  # the last accepted report itself, served again: not a lie


@dataclass(frozen=True, slots=True)
class Rejection:
    kind: RejectionKind
    agent: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} report from {self.agent}: {self.detail}"


@dataclass(frozen=True, slots=True)
class Ledger:
    """Per agent, the last accepted report (it holds the agent's boot_id and sequence)."""

    reports: Mapping[str, Report] = field(default_factory=lambda: MappingProxyType({}))


class ViewKind(enum.StrEnum):
    UNKNOWN = "unknown"
    REACHABLE = "reachable"
    UNREACHABLE = "unreachable"


@dataclass(frozen=True, slots=True)
class ExternalView:
    kind: ViewKind
    reaching: tuple[str, ...]  # competent agents saying reachable
    not_reaching: tuple[str, ...]  # competent agents saying unreachable
    ignored: tuple[tuple[str, str], ...]  # (agent, why it does not count)
    reason: str

    @property
    def n(self) -> int:
        """N in docs/decisions.md: the competent agents."""
        return len(self.reaching) + len(self.not_reaching)

    @property
    def u(self) -> int:
        """U in docs/decisions.md: the competent agents saying unreachable."""
        return len(self.not_reaching)


@dataclass(frozen=True, slots=True)
class Gate:
    blocks: bool = False
    reason: str = "no external view yet"
    unreachable_since: float | None = None  # when the current unreachable spell began
    due: float | None = None  # call `step` again then: fall_for will have elapsed


# --- parsing -------------------------------------------------------------------------------


class _Reader(Reader):
    """The configuration's checks, stopping at the first problem: a report is dropped whole."""

    def __init__(self) -> None:
        super().__init__("report")

    def error(self, path: str, message: str) -> NoReturn:
        raise ReportError(f"{path or '(top level)'}: {message}")

    def name(self, value: Any, path: str) -> str:
        return self.string(value, path, pattern=NAME, what=NAME_WHAT) or ""

    def time(self, value: Any, path: str) -> float:
        return self.number(value, path, 0.0, MAX_TIME, low_open=True) or 0.0

    def rtt(self, value: Any, path: str) -> float | None:
        return self.number(value, path, 0.0, MAX_RTT_MS)

    def text(self, value: Any, path: str) -> str:
        text = self.string(value, path) or ""
        if len(text) > MAX_ERROR:
            self.error(path, f"is {len(text)} characters long, at most {MAX_ERROR}")
        return text

    def names(self, value: Any, path: str, most: int) -> dict[str, Any]:
        """An object keyed by names (PoPs, checks), at most `most` of them."""
        if not isinstance(value, dict):
            self.mapping(value, path, set())  # the configuration's "must be a mapping, not ..." error
            self.error(path, "must be a mapping, not null")  # mapping() takes null for empty
        if len(value) > most:
            self.error(path, f"has {len(value)} entries, at most {most}")
        for key in value:
            if not isinstance(key, str) or not NAME.fullmatch(key):
                self.error(path, f"key {shown(key)} is not {NAME_WHAT}")
        return value


def parse_report(data: Any) -> Report:
    """A report from its decoded JSON body; every field checked, unknown keys refused."""
    r = _Reader()
    top = r.mapping(data, "", {"version", "agent", "boot_id", "sequence", "generated_at", "pops", "anycast"}) or {}
    version = r.need(top, "version", "", lambda v, p: r.integer(v, p, 0, MAX_SEQUENCE))
    if version != VERSION:
        r.error("version", f"{version} is not supported (this PoP reads version {VERSION})")
    pops = r.need(top, "pops", "", lambda v, p: r.names(v, p, MAX_POPS)) or {}
    return Report(
        agent=r.need(top, "agent", "", r.name) or "",
        boot_id=r.need(top, "boot_id", "", lambda v, p: r.string(
            v, p, pattern=_BOOT_ID, what="a boot id (letters, digits, '-'; at most 64)")) or "",
        sequence=r.need(top, "sequence", "", lambda v, p: r.integer(v, p, 0, MAX_SEQUENCE)) or 0,
        generated_at=r.need(top, "generated_at", "", r.time) or 0.0,
        pops=MappingProxyType({name: _opinion(r, value, join("pops", name)) for name, value in pops.items()}),
        anycast=r.need(top, "anycast", "", lambda v, p: _anycast(r, v, p)) or MappingProxyType({}),
    )


def _opinion(r: _Reader, value: Any, path: str) -> Opinion:
    data = r.mapping(value, path, {"reachable", "streak", "rtt_ms", "since", "checks"}) or {}
    checks = r.need(data, "checks", path, lambda v, p: r.names(v, p, MAX_CHECKS)) or {}
    return Opinion(
        reachable=bool(r.need(data, "reachable", path, r.boolean)),
        streak=r.need(data, "streak", path, lambda v, p: r.integer(v, p, 0, MAX_SEQUENCE)) or 0,
        rtt_ms=r.optional(data, "rtt_ms", path, r.rtt, None),
        since=r.need(data, "since", path, r.time) or 0.0,
        checks=MappingProxyType({name: _check(r, item, join(join(path, "checks"), name))
                                 for name, item in checks.items()}),
    )


def _check(r: _Reader, value: Any, path: str) -> Check:
    data = r.mapping(value, path, {"ok", "rtt_ms", "error"}) or {}
    return Check(ok=bool(r.need(data, "ok", path, r.boolean)),
                 rtt_ms=r.optional(data, "rtt_ms", path, r.rtt, None),
                 error=r.optional(data, "error", path, r.text, None))


def _anycast(r: _Reader, value: Any, top: str) -> Mapping[str, Landing]:
    if not isinstance(value, dict):
        r.mapping(value, top, set())  # the configuration's "must be a mapping, not ..." error
        r.error(top, "must be a mapping, not null")  # mapping() takes null for empty
    if len(value) > MAX_ANYCAST:
        r.error(top, f"has {len(value)} entries, at most {MAX_ANYCAST}")
    landings: dict[str, Landing] = {}
    for key, item in value.items():
        address = r.address(key, top) or ""
        path = join(top, address)
        if address in landings:
            r.error(path, f"is given twice (as {shown(key)} too)")
        data = r.mapping(item, path, {"pop", "server", "rtt_ms", "at", "error"}) or {}
        landings[address] = Landing(pop=r.optional(data, "pop", path, r.name, None),
                                    server=r.optional(data, "server", path, r.name, None),
                                    rtt_ms=r.optional(data, "rtt_ms", path, r.rtt, None),
                                    at=r.need(data, "at", path, r.time) or 0.0,
                                    error=r.optional(data, "error", path, r.text, None))
    return MappingProxyType(landings)


# --- the ledger ----------------------------------------------------------------------------


def fresh(report: Report, now: float, policy: Policy) -> bool:
    return now - report.generated_at < policy.max_age


def accept(ledger: Ledger, report: Report, now: float, policy: Policy) -> tuple[Ledger, Rejection | None]:
    """The ledger with `report` accepted, or the same ledger and why the report is dropped."""
    last = ledger.reports.get(report.agent)
    rejection = _rejection(last, report, now, policy)
    if rejection is not None:
        return ledger, Rejection(rejection[0], report.agent, rejection[1])
    return Ledger(MappingProxyType({**ledger.reports, report.agent: report})), None


def _rejection(last: Report | None, report: Report, now: float, policy: Policy) -> tuple[RejectionKind, str] | None:
    ahead = report.generated_at - now
    if ahead > policy.max_skew:
        return RejectionKind.FUTURE, (f"dated {ahead:.3f}s ahead of this PoP's clock, more than max_skew "
                                      f"{policy.max_skew:g}s")
    if not fresh(report, now, policy):
        return RejectionKind.STALE, f"generated {-ahead:.3f}s ago, max_age {policy.max_age:g}s"
    if last is None:
        return None
    if report.boot_id == last.boot_id:
        if report == last:
            return RejectionKind.DUPLICATE, f"sequence {report.sequence} already accepted"
        if report.sequence <= last.sequence:
            return RejectionKind.REPLAYED, (f"sequence {report.sequence} of run {report.boot_id} is not newer "
                                            f"than {last.sequence}")
        return None
    if report.generated_at <= last.generated_at:
        # a replay of an earlier run, or an agent whose clock went back: either way not news
        return RejectionKind.OLD_BOOT, (f"new run {report.boot_id} dated {report.generated_at:.3f}, not after "
                                        f"the last accepted report of run {last.boot_id} ({last.generated_at:.3f})")
    return None


# --- the view ------------------------------------------------------------------------------


def view(ledger: Ledger, pop: str, now: float, policy: Policy) -> ExternalView:
    """The external view of `pop` from the agents' last accepted reports (docs/decisions.md)."""
    reaching: list[str] = []
    not_reaching: list[str] = []
    ignored: list[tuple[str, str]] = []
    for agent, report in sorted(ledger.reports.items()):
        opinion = report.pops.get(pop)
        if not fresh(report, now, policy):
            ignored.append((agent, f"stale ({now - report.generated_at:.1f}s old)"))
        elif opinion is None:
            ignored.append((agent, f"does not report {pop}"))
        elif not any(seen.reachable for other, seen in report.pops.items() if other != pop):
            ignored.append((agent, "reaches no other PoP"))
        else:
            (reaching if opinion.reachable else not_reaching).append(agent)
    n, u = len(reaching) + len(not_reaching), len(not_reaching)
    if n < policy.quorum:
        kind = ViewKind.UNKNOWN
        why = "; ".join(f"{agent} {reason}" for agent, reason in ignored)
        reason = f"unknown from outside: {n} competent agents, quorum {policy.quorum}" + (f" ({why})" if why else "")
    elif u >= policy.quorum and u / n >= policy.unreachable_fraction:
        kind = ViewKind.UNREACHABLE
        reason = f"unreachable from outside: {u}/{n} agents ({', '.join(not_reaching)})"
    else:
        kind = ViewKind.REACHABLE
        reason = f"reachable from outside: {u}/{n} agents say unreachable" + (
            f" ({', '.join(not_reaching)})" if not_reaching else "")
    return ExternalView(kind, tuple(reaching), tuple(not_reaching), tuple(ignored), reason)


# --- the gate ------------------------------------------------------------------------------


def step(gate: Gate, current: ExternalView, now: float, policy: Policy) -> Gate:
    """The gate after `current`: blocks once the view has been unreachable for `fall_for`."""
    if current.kind is not ViewKind.UNREACHABLE:
        # reachable is evidence the PoP is fine; unknown is no evidence, and must not keep it out
        return Gate(reason=current.reason)
    since = now if gate.unreachable_since is None else gate.unreachable_since
    if now - since >= policy.fall_for:
        return Gate(True, f"{current.reason}, for {policy.fall_for:g}s or more", since)
    return Gate(False, f"{current.reason}, blocks after {policy.fall_for:g}s", since, since + policy.fall_for)


# --- the catchment -------------------------------------------------------------------------


def catchment(ledger: Ledger, now: float, policy: Policy) -> dict[str, Mapping[str, Landing]]:
    """Per fresh agent: who answers each anycast address it probes (for /status)."""
    return {agent: report.anycast for agent, report in sorted(ledger.reports.items()) if fresh(report, now, policy)}


# --- the PoP's tier-3 state ----------------------------------------------------------------


class Tier3:
    """What one PoP knows from outside: the ledger, its view, the gate, and what was dropped.

    `offer(agent, body, signature, now)` takes one pulled report as received (the exact body
    bytes and the X-Pop-Signature header): verified with the shared key (pop.agent.auth),
    parsed, checked to come from the agent it was pulled from (a shared key would let one
    agent speak for another), then accepted or rejected; `failed(agent, why)` counts a pull
    that got no report. `tick(now)` re-reads the view (freshness is a matter of time) and
    steps the gate; it returns True when `gate.blocks` changed, so the verdict must be decided
    again with `blocking` as its external reason. Nothing here raises for bad input.
    """

    def __init__(self, pop: str, policy: Policy, key: bytes) -> None:
        self.pop = pop
        self.policy = policy
        self._key = key
        self.ledger = Ledger()
        self.view = ExternalView(ViewKind.UNKNOWN, (), (), (), "unknown from outside: no report yet")
        self.gate = Gate()
        self.dropped: dict[str, int] = {}  # by reason: forged, malformed, impostor, stale, replayed, ...
        # the catchment's recent changes, oldest first: (when, agent, address, from PoP, to PoP)
        self.moves: collections.deque[tuple[float, str, str, str | None, str | None]] = collections.deque(maxlen=50)
        self._landed: dict[tuple[str, str], str | None] = {}
        self.last_problem: dict[str, str] = {}  # per agent, the last reason its report was not taken

    @property
    def blocking(self) -> str:
        """The gate's reason while it blocks the PoP, else ""."""
        return self.gate.reason if self.gate.blocks else ""

    def offer(self, agent: str, body: bytes, signature: str | None, now: float) -> str | None:
        """Take one pulled report; None when accepted, else why it was dropped."""
        if not auth.verify(self._key, body, signature):
            return self._drop(agent, "forged", "signature does not verify with the shared key")
        try:
            report = parse_report(_json(body))
        except ReportError as exc:
            return self._drop(agent, "malformed", str(exc))
        if report.agent != agent:
            return self._drop(agent, "impostor", f"report says it is from {report.agent!r}")
        self.ledger, rejection = accept(self.ledger, report, now, self.policy)
        if rejection is not None:
            return self._drop(agent, str(rejection.kind), rejection.detail)
        self.last_problem.pop(agent, None)
        for address, landing in report.anycast.items():
            before = self._landed.get((agent, address), landing.pop)
            if landing.pop != before:
                self.moves.append((report.generated_at, agent, address, before, landing.pop))
            self._landed[(agent, address)] = landing.pop
        return None

    def reconfigure(self, pop: str, policy: Policy, key: bytes) -> None:
        """A reload: new thresholds or key; the ledger and the gate are kept (no flap)."""
        self.pop, self.policy, self._key = pop, policy, key

    def failed(self, agent: str, why: str) -> None:
        self._drop(agent, "unreachable", why)

    def tick(self, now: float) -> bool:
        blocked = self.gate.blocks
        self.view = view(self.ledger, self.pop, now, self.policy)
        self.gate = step(self.gate, self.view, now, self.policy)
        return self.gate.blocks != blocked

    def _drop(self, agent: str, kind: str, detail: str) -> str:
        self.dropped[kind] = self.dropped.get(kind, 0) + 1
        self.last_problem[agent] = f"{kind}: {detail}"
        return f"{kind}: {detail}"


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ReportError(f"(body): not JSON: {exc}") from None


def summary(tier3: Tier3, now: float) -> dict[str, Any]:
    """Tier 3 for /status and the NOC page: the view, every agent's standing, the catchment."""
    standing: dict[str, str] = {a: "reachable" for a in tier3.view.reaching}
    standing |= {a: "unreachable" for a in tier3.view.not_reaching}
    standing |= {a: f"ignored: {why}" for a, why in tier3.view.ignored}
    agents = {}
    for name in sorted(set(standing) | set(tier3.last_problem)):
        report = tier3.ledger.reports.get(name)
        opinion = report.pops.get(tier3.pop) if report is not None else None
        agents[name] = {"standing": standing.get(name, "no report"),
                        "report_age_seconds": None if report is None else round(now - report.generated_at, 3),
                        "rtt_ms": None if opinion is None else opinion.rtt_ms,
                        "problem": tier3.last_problem.get(name)}
    return {"view": str(tier3.view.kind), "reason": tier3.view.reason, "competent": tier3.view.n,
            "unreachable": tier3.view.u, "quorum": tier3.policy.quorum, "blocking": tier3.gate.blocks,
            "gate": tier3.gate.reason, "agents": agents, "dropped": dict(sorted(tier3.dropped.items())),
            "catchment_changes": [{"ago_seconds": round(now - at, 3), "agent": agent, "address": address,
                                   "from": old, "to": new} for at, agent, address, old, new in reversed(tier3.moves)],
            "catchment": {agent: {address: {"pop": landing.pop, "server": landing.server, "rtt_ms": landing.rtt_ms,
                                            "error": landing.error}
                                  for address, landing in landings.items()}
                          for agent, landings in catchment(tier3.ledger, now, tier3.policy).items()}}
