"""The PoP verdict: should this PoP attract traffic? Pure.

Inputs are the pool (how many servers are in it, of how many) and the time; the output is
whether to announce, with the reason. The pool itself has hysteresis: two watermarks on the
healthy fraction (withdraw below the low one, re-announce only at or above the high one) and
a hold-down (the pool must stay above the high watermark this long before a re-announce).

A PoP starts withdrawn and announces as soon as its servers have risen: the hold-down guards
against re-announcing a PoP that just failed, and a fresh start has no such history.
A drain overrides everything once its ladder (pop.ladder) reaches the withdraw; before
that the PoP announces as the pool decides, with the ladder's attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class PoolView:
    healthy: int  # servers in the pool (weight-free count)
    total: int  # servers configured, enabled or not
    settled: bool = True  # False while some server has no verdict yet (INIT)

    @property
    def fraction(self) -> float:
        return self.healthy / self.total if self.total else 0.0


@dataclass(frozen=True, slots=True)
class VerdictPolicy:
    low_watermark: float
    high_watermark: float
    hold_down: float


@dataclass(frozen=True, slots=True)
class Verdict:
    announce: bool = False
    since: float = 0.0  # when `announce` last changed
    reason: str = "starting: waiting for servers to rise"  # why the verdict is what it is now
    cause: str = ""  # why it last flipped (kept while `reason` follows the pool)
    hold_down_until: float | None = None  # set while waiting out the hold-down
    ever_announced: bool = False
    drained: bool = False  # operator drain in force
    changes: int = 0  # announce/withdraw decisions so far
    decided_by: str = ""  # what made the last flip: "pool", "external" (tier 3), "operator"


def decide(current: Verdict, pool: PoolView, policy: VerdictPolicy, now: float, external: str = "", *,
           suppressed: str = "") -> Verdict:
    """The next verdict. Call on every pool change, when `hold_down_until` passes, and when
    tier 3's gate changes (docs/decisions.md).

    ``external``: while tier 3 blocks the PoP (pop.external: unreachable from outside for
    `fall_for`), the gate's reason; "" otherwise. It withdraws an internally healthy PoP and
    holds it withdrawn; it never announces one. When it lifts, a PoP tier 3 withdrew comes
    back like any withdrawn PoP: after the hold-down. A PoP the pool withdrew is held while
    the block lasts, but its hold-down runs meanwhile: tier 3 agreeing that dead servers are
    unreachable must not add a second hold-down to their recovery.

    ``suppressed``: while flap dampening suppresses the PoP (pop.dampening), its reason; "" otherwise.
    It never withdraws; a withdrawn PoP waits for it to lift like for tier 3 (its hold-down runs
    meanwhile), then comes back.
    """
    share = f"{pool.healthy}/{pool.total} healthy"
    if current.drained:
        if current.announce:
            return _flip(current, False, now, "drained by operator", "operator")
        return current
    if current.announce:
        if pool.fraction < policy.low_watermark:
            return _flip(current, False, now, f"{share}, below low watermark {policy.low_watermark:g}")
        if external:
            return _flip(current, False, now, external, "external")
        reason = (f"{share}, servers up" if pool.healthy == pool.total
                  else f"{share}, degraded: not below low watermark {policy.low_watermark:g}")
        return current if current.reason == reason else replace(current, reason=reason)
    if external and current.decided_by == "external":
        # tier 3's own withdrawal: held while the block lasts, the hold-down only after it lifts
        if current.reason == external and current.hold_down_until is None:
            return current
        return replace(current, hold_down_until=None, reason=external)
    if pool.fraction < policy.high_watermark:
        if current.hold_down_until is not None:
            return replace(current, hold_down_until=None,
                           reason=f"{share}, fell back below high watermark during hold-down")
        if current.ever_announced or pool.settled:
            reason = f"{share}, below high watermark {policy.high_watermark:g}"
            return current if current.reason == reason else replace(current, reason=reason)
        return current
    blocked = external or suppressed
    if not current.ever_announced:
        return _come_back(current, now, f"{share}, servers up", blocked)
    if current.hold_down_until is None:
        if policy.hold_down <= 0:
            return _come_back(current, now, f"{share}, at or above high watermark {policy.high_watermark:g}", blocked)
        return replace(current, hold_down_until=now + policy.hold_down,
                       reason=f"{share}, hold-down {policy.hold_down:g}s before re-announcing")
    if now >= current.hold_down_until:
        return _come_back(current, now, f"{share}, stayed healthy through hold-down {policy.hold_down:g}s", blocked)
    return current


def _come_back(current: Verdict, now: float, reason: str, blocked: str) -> Verdict:
    """Announce, unless tier 3 or flap dampening blocks: a PoP the pool withdrew waits for the
    block to lift, but adds no second hold-down after it (docs/decisions.md)."""
    if blocked:
        held = f"{blocked}; the pool would announce"
        return current if current.reason == held else replace(current, reason=held)
    return _flip(current, True, now, reason)


def adopt(current: Verdict, pool: PoolView, policy: VerdictPolicy, now: float) -> Verdict:
    """An engine that starts while ExaBGP still holds its predecessor's announcement: keep it
    if the pool (from one probe round) is not below the low watermark, else stay withdrawn
    with the hold-down ahead (the PoP was serving moments ago and has just failed)."""
    share = f"{pool.healthy}/{pool.total} healthy"
    if current.drained or pool.healthy == 0 or pool.fraction < policy.low_watermark:
        return replace(current, ever_announced=True,
                       reason=f"{share} at engine start: not adopting the previous engine's announcement")
    reason = f"{share} at engine start: adopted the previous engine's announcement"
    # not a change of the route (ExaBGP kept announcing it): `changes` stays
    return replace(current, announce=True, since=now, reason=reason, cause=reason, hold_down_until=None,
                   ever_announced=True)


def drain(current: Verdict, now: float, reason: str = "drained by operator") -> Verdict:
    """The last step of a drain (pop.ladder): withdraw and stay withdrawn until `undrain`."""
    drained = replace(current, drained=True, hold_down_until=None)
    return _flip(drained, False, now, reason, "operator") if current.announce else replace(drained, reason=reason)


def undrain(current: Verdict) -> Verdict:
    """End a drain; the next `decide` applies the watermarks and the hold-down as after a withdraw."""
    return replace(current, drained=False, reason="drain ended")


def _flip(current: Verdict, announce: bool, now: float, reason: str, by: str = "pool") -> Verdict:
    return replace(current, announce=announce, since=now, reason=reason, cause=reason, hold_down_until=None,
                   ever_announced=current.ever_announced or announce, changes=current.changes + 1, decided_by=by)
