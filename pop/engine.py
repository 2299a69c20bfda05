"""The engine: folds check results through the pure decisions into one desired state.

    probes (pop.probes) --observe()--> hysteresis --> pool --> verdict
        --> DesiredState (pop.desired) --want()--> applier (pop.applier) --> adapters

Everything that decides lives in the pure modules (hysteresis, pool, drains, verdict,
desired); everything that makes it true lives in the applier. This class only wires them:
it keeps the per-server state, re-decides when something changes, and hands the applier the
newest desired state. All state changes happen on the event loop thread, so no locks.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace

from pop import adminstate, dampening, drains, external, fleet, ladder, load, pool, snapshot, tails, verdict
from pop import desired as plan
from pop.adminstate import AdminState
from pop.applier import Applier, Dataplane, DataplaneFailure, Speaker
from pop.checks.base import Check, CheckResult
from pop.config import Config
from pop.desired import Announcement, DesiredState
from pop.drains import ServerDrain
from pop.durations import DurationBook
from pop.external import Tier3
from pop.health import Health
from pop.hysteresis import Policy, ServerHealth, TierState
from pop.ladder import DrainHeld, PopDrain
from pop.probes import Probes
from pop.snapshot import Event, Snapshot
from pop.verdict import Verdict, VerdictPolicy

__all__ = ["DataplaneFailure", "DrainHeld", "Engine"]

log = logging.getLogger("pop.engine")

LoadSignal = Callable[[], Awaitable[Mapping[str, float]]]
"""Pluggable load signal: a factor in (0, 1] per server address (pop/load.py)."""
Checks = Mapping[str, Sequence[tuple[Check, Policy]]]


class Engine:
    def __init__(self, config: Config, speaker: Speaker, checks: Checks, *,
                 clock: Callable[[], float] = time.monotonic, dataplane: Dataplane | None = None,
                 dataplane_errors: tuple[type[Exception], ...] = (DataplaneFailure,),
                 load_signal: LoadSignal | None = None, tier3: Tier3 | None = None,
                 wall: Callable[[], float] = time.time,
                 on_announced: Callable[[tuple[Announcement, ...]], None] | None = None) -> None:
        self._clock = clock
        self.started = clock()
        self.speaker = speaker
        self.applier = Applier(speaker, dataplane, config, clock=clock, dataplane_errors=dataplane_errors,
                               on_event=self._applier_event,
                               on_announced=on_announced)
        self.probes = Probes(self.observe, self._pace, clock=clock)
        self.durations = DurationBook()
        self.probes.on_duration = self.durations.observe
        self.load_signal = load_signal
        self.tier3 = tier3  # the view from outside (pop.external), fed by pop.adapters.agents
        self.wall = wall  # agents date their reports by the wall clock
        self.load_factors: dict[str, float] = {}
        self.load_view: Callable[[], Mapping[str, Mapping[str, object]]] | None = None  # /status: what it read
        self.load_smoothing = 0.3  # the connection signal is noisy; the telemetry signal smooths itself (1.0)
        self.server_drains: dict[str, ServerDrain] = {}
        self.pop_drain: PopDrain | None = None  # the drain ladder in progress (pop.ladder)
        self.damping = dampening.Damping()  # flap dampening at the origin (pop.dampening)
        self.revision = 0  # counts the events: every change of state the status shows is one
        self.drain_connections: int | None = None  # the PoP's open connections, where the data plane counts
        self.on_admin_change: Callable[[], None] | None = None  # the service persists drains
        self.verdict = Verdict()
        self.guard = fleet.Guard()  # the fleet guard (pop.fleet): holds a PoP the fleet cannot spare
        self.fleet_view = fleet.View()  # the other PoPs, as the BGP sessions show them
        self.fleet_source: Callable[[], Sequence[tuple[str, fleet.Sighting]]] | None = None  # the speaker's paths
        self.events: collections.deque[Event] = collections.deque(maxlen=200)
        self._wake_timer = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None
        self._configure(config, checks)

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        """One clock for the engine, its applier and its probes (tests hand in the loop's)."""
        self._clock = self.applier.clock = self.probes.clock = clock

    def _configure(self, config: Config, checks: Checks) -> None:
        self.config = config
        self.checks = checks
        policies = {name: {c.name: p for c, p in pairs} for name, pairs in checks.items()}
        self.board = Health(config.servers, policies, self.clock(), getattr(self, "board", None))
        self.tails = tails.Board(config.tails, (s.name for s in config.servers), getattr(self, "tails", None))
        self._servers = tuple(pool.Server(s.name, s.address, s.weight) for s in config.servers)
        self._addresses = {s.name: s.address for s in config.servers}
        self._enabled = [s.name for s in config.servers if s.enabled]
        self._first_tier = {name: pairs[0][0].name for name, pairs in checks.items() if pairs}
        self._verdict_policy = VerdictPolicy(config.pool.low_watermark, config.pool.high_watermark,
                                             config.pool.hold_down)
        self.server_drains = {n: d for n, d in self.server_drains.items() if n in self.health}
        if self.pop_drain is not None:
            self.pop_drain = ladder.fit(self.pop_drain, config.drain.steps)
        self.pool = pool.view(self._servers, self.health, self.server_drains)

    @property
    def tiers(self) -> dict[str, dict[str, TierState]]:
        return self.board.tiers

    @property
    def health(self) -> dict[str, ServerHealth]:
        return self.board.servers

    # --- decisions -------------------------------------------------------------------------

    def observe(self, server: str, tier: str, result: CheckResult) -> None:
        """Fold one check result in; re-decide if the server's health changed."""
        now = self.clock()
        moved = self.board.fold(server, tier, result, now)
        if moved is None:
            return  # the server or its tier went away in a reload
        if self.tails.observe(server, tier, result, now):
            self._degraded_moved(server)
        (old, new), (before, after) = moved.tier, moved.server
        if moved.tier_state:
            log.info("server.tier server=%s tier=%s %s->%s reason=%s", server, tier, old.state.value,
                     new.state.value, new.reason)
            self.probes.wake(server)  # one tier changing speeds up the others
        if moved.server_state:
            log.info("server.%s server=%s tier=%s reason=%s", after.state.value, server, after.tier or "-",
                     after.reason)
            self._record("server", server, before.state.value, after.state.value,
                         f"{after.tier}: {after.reason}" if after.tier else after.reason)
        if after is not before and after != before:  # nearly every probe: the very same object
            self.reevaluate()

    def _degraded_moved(self, server: str) -> None:
        """The tails marked a server degraded (its weight is lowered) or cleared it (pop.tails)."""
        why = self.tails.degraded[server]
        log.info("server.%s server=%s reason=%s", "degraded" if why else "recovered", server, why or "-")
        self._record("tails", server, "" if why else "degraded", "degraded" if why else "", why or "tails recovered")
        self.reevaluate()

    def reevaluate(self) -> None:
        now = self.clock()
        self.pool = pool.view(self._servers, self.health, self.server_drains)
        self._climb(now)
        old = self.verdict
        damping = self.config.dampening
        lifted = self.damping.suppressed_since is not None
        self.damping = dampening.step(self.damping, now, damping)
        if lifted and self.damping.suppressed_since is None:
            self._record("dampening", self.config.name, "suppressed", "reusable", "flap dampening lifted")
        self.verdict = verdict.decide(old, self.pool, self._verdict_policy, now,
                                      self.tier3.blocking if self.tier3 is not None else "",
                                      suppressed=dampening.reason(self.damping, now, damping))
        if old.announce and not self.verdict.announce and self.verdict.decided_by in ("pool", "external"):
            before = self.damping.suppressed_since
            self.damping = dampening.flap(self.damping, now, damping)
            if before is None and self.damping.suppressed_since is not None:
                log.warning("pop.suppressed pop=%s %s", self.config.name, dampening.reason(self.damping, now, damping))
                self._record("dampening", self.config.name, "reusable", "suppressed",
                             dampening.reason(self.damping, now, damping))
        if self.verdict.announce != old.announce:
            action = "announce" if self.verdict.announce else "withdraw"
            log.info("pop.%s pop=%s reason=%s", action, self.config.name, self.verdict.reason)
            self._record("verdict", self.config.name, _word(old.announce), _word(self.verdict.announce),
                         self.verdict.reason)
        elif self.verdict.hold_down_until != old.hold_down_until and self.verdict.hold_down_until is not None:
            log.info("pop.hold_down pop=%s until=+%.1fs reason=%s", self.config.name,
                     self.verdict.hold_down_until - now, self.verdict.reason)
        self._guard(now, old.announce)
        self._wake_timer.set()
        held = self.guard.holding
        if held:  # the fleet cannot spare this PoP: every server that answers at tier 1 serves
            members = pool.alive(self._servers, self.tiers, self._first_tier, self.server_drains, self.factors())
        else:
            members = pool.members(self._servers, self.health, self.server_drains, self.factors())
        state = plan.dataplane(self.config.prefixes, members, self.config.dataplane)
        effect = ladder.effect(self.pop_drain, self.config.drain.steps)
        if held:
            effect = replace(effect, prepend=effect.prepend + self.config.fleet.prepend, graceful_shutdown=True)
        self.applier.want(replace(state, announcements=plan.announcements(
            self.config.prefixes, self.verdict.announce or held, pool.degraded(self.health, self.tiers) or held,
            effect, fleet.tags(self.config.fleet, leaving=held))))

    def _guard(self, now: float, was_announced: bool) -> None:
        """The fleet guard's turn, after the verdict's (pop.fleet)."""
        old, policy = self.guard, self.config.fleet
        withdraw = not self.verdict.announce and not self.verdict.drained
        hard_down = policy.guarding and withdraw and not pool.alive(
            self._servers, self.tiers, self._first_tier, self.server_drains, {})
        self.guard = fleet.step(old, policy, self.fleet_view, [p.prefix for p in self.config.prefixes],
                                now, withdraw=withdraw,
                                eligible=self.verdict.ever_announced, hard_down=hard_down,
                                announced=was_announced or old.holding)
        if self.guard.phase != old.phase:
            log.log(logging.WARNING if self.guard.holding else logging.INFO, "fleet.%s pop=%s reason=%s",
                    self.guard.phase or "clear", self.config.name, self.guard.reason)
            self._record("fleet", self.config.name, old.phase or "none", self.guard.phase or "none",
                         self.guard.reason or "the verdict announces")

    def fleet_changed(self) -> None:
        """The BGP sessions show another picture of the fleet: decide again if it differs."""
        if self.fleet_source is None:
            return
        new = fleet.view(self.fleet_source(), self.config.fleet.id)
        if new == self.fleet_view:
            return
        self.fleet_view = new
        log.info("fleet.view pop=%s %s", self.config.name,
                 " ".join(f"{p}={','.join(map(str, sorted(s))) or '-'}" for p, s in sorted(new.pops.items())) or "-")
        self.revision += 1
        self.reevaluate()

    def fleet_refuses(self, new: Config) -> str:
        """Why a reload must be refused because of the fleet guard, or "": it would remove a
        prefix this PoP announces that fewer than min_pops other PoPs announce. Setting
        fleet.min_pops to 0 in the same reload says the removal is meant."""
        policy = new.fleet
        if not policy.guarding or not (self.verdict.announce or self.guard.holding):
            return ""
        kept, view = {p.prefix for p in new.prefixes}, self.fleet_view
        problems = []
        for prefix in (p.prefix for p in self.config.prefixes if p.prefix not in kept):
            others = len(view.pops.get(prefix, frozenset()) - view.leaving.get(prefix, frozenset()))
            if others < policy.min_pops:
                problems.append(f"it removes {prefix}, which only {others} other PoP(s) announce "
                                f"(fleet.min_pops {policy.min_pops})")
        if not problems:
            return ""
        return "; ".join(problems) + ": set fleet.min_pops to 0 in the same reload to remove it on purpose"

    def _climb(self, now: float) -> None:
        """Move the drain ladder to the step in force now; end a maintenance whose time is up."""
        current = self.pop_drain
        if current is None:
            return
        steps = self.config.drain.steps
        if ladder.expired(current, now):
            self._end_drain(f"maintenance ended ({current.reason})")
            return
        new = ladder.advance(current, steps, now, self.drain_connections, announced=self.verdict.announce)
        if new == current:
            return
        self.pop_drain = new
        step = ladder.describe(steps[new.step])
        why = f"{current.reason}: step {new.step + 1}/{len(steps)} {step}" + (f" ({new.early})" if new.early else "")
        log.info("pop.drain_step pop=%s step=%d/%d %s early=%s", self.config.name, new.step + 1, len(steps), step,
                 new.early or "-")
        self._record("ladder", self.config.name, ladder.describe(steps[current.step]), step, why)
        if ladder.withdrawn(new, steps):
            self.verdict = verdict.drain(self.verdict, now, f"drained: {new.reason}")
        self._admin_changed()

    @property
    def desired(self) -> tuple[Announcement, ...]:
        return self.applier.desired.announcements

    @property
    def desired_state(self) -> DesiredState:
        return self.applier.desired

    def adopt(self, results: Mapping[tuple[str, str], CheckResult]) -> bool:
        """Start from one probe round while ExaBGP still holds the previous engine's routes:
        seed every tier from its result, and keep announcing if the pool passes."""
        now = self.clock()
        self.board.seed(results, now)
        self.pool = pool.view(self._servers, self.health, self.server_drains)
        self.verdict = verdict.adopt(self.verdict, self.pool, self._verdict_policy, now)
        log.info("engine.adopt announce=%s reason=%s", self.verdict.announce, self.verdict.reason)
        self._record("verdict", self.config.name, "restarted", _word(self.verdict.announce), self.verdict.reason)
        self.reevaluate()
        return self.verdict.announce

    def external_changed(self) -> None:
        """Tier 3's gate opened or closed: decide again (docs/decisions.md)."""
        assert self.tier3 is not None
        gate = self.tier3.gate
        log.log(logging.WARNING if gate.blocks else logging.INFO, "external.%s pop=%s reason=%s",
                "blocks" if gate.blocks else "clear", self.config.name, gate.reason)
        self._record("external", self.config.name, "clear" if gate.blocks else "blocks",
                     "blocks" if gate.blocks else "clear", gate.reason)
        self.reevaluate()

    def observe_load(self, factors: Mapping[str, float]) -> None:
        """Fold a load reading in; re-decide only when a data-plane weight actually changes."""
        before = pool.members(self._servers, self.health, self.server_drains, self.factors())
        self.load_factors = load.smooth(self.load_factors, factors, self.load_smoothing)
        after = pool.members(self._servers, self.health, self.server_drains, self.factors())
        if after != before:
            log.info("dataplane.weights %s", " ".join(f"{a}={w}" for a, w in after))
            self.revision += 1  # the weights are on /v1/status: a status built before is stale
            self.reevaluate()

    def factors(self) -> dict[str, float]:
        """The weight factor per server address: the load signal's times the degraded mark's (pop.tails)."""
        marked = self.tails.factors(self._addresses)
        if not marked:
            return self.load_factors
        return {a: self.load_factors.get(a, 1.0) * marked.get(a, 1.0) for a in {*self.load_factors, *marked}}

    def pool_weights(self) -> dict[str, int]:
        return pool.load_weights(self._servers, self.health, self.server_drains)

    # --- operator actions ------------------------------------------------------------------

    def drain_server(self, server: str) -> None:
        """Quiescent drain of one server: no new clients, existing ones stay until they leave."""
        if server not in self.health:
            raise KeyError(server)
        if server not in self.server_drains:
            dp = self.config.dataplane
            self.server_drains[server] = drains.start(dp.mode, dp.pin_flows, self.clock())
            self._admin("server", server, "", "draining", "operator drain of the server")

    def undrain_server(self, server: str) -> None:
        if server not in self.health:
            raise KeyError(server)
        if self.server_drains.pop(server, None) is not None:
            self._admin("server", server, "draining", "", "operator undrain of the server")

    def finish_drains(self, connections: Mapping[str, int]) -> None:
        """Take drained servers whose connections are gone, or whose time is up, out of the data plane."""
        addresses = {s.name: s.address for s in self.config.servers}
        self.server_drains, finished = drains.finish(self.server_drains, addresses, connections,
                                                     self.config.dataplane.drain_timeout, self.clock())
        for server, why in finished:
            self._record("admin", server, "draining", "drained", why)
            log.info("server.drained server=%s reason=%s", server, why)
        if finished:
            self._admin_changed()
            self.reevaluate()

    def drain(self, reason: str = "operator drain", until: float | None = None,
              source: str = ladder.OPERATOR) -> None:
        """Start the drain ladder (pop.ladder); ``until`` (wall clock) makes it a maintenance
        that ends by itself. Draining a draining PoP keeps its step and takes the new
        reason and expiry (an operator extending a maintenance)."""
        now = self.clock()
        expiry = None if until is None else now + (until - self.wall())
        if until is not None and source == ladder.OPERATOR:
            source = ladder.MAINTENANCE
        steps = self.config.drain.steps
        if self.pop_drain is None:
            self.drain_connections = None
            self.pop_drain = ladder.start(steps, now, reason, source=source, until=expiry,
                                          announced=self.verdict.announce)
            if ladder.withdrawn(self.pop_drain, steps):
                self.verdict = verdict.drain(self.verdict, now, f"drained: {reason}")
        else:
            self.pop_drain = replace(self.pop_drain, reason=reason, source=source, until=expiry)
        step = ladder.describe(steps[self.pop_drain.step])
        self._admin("pop", self.config.name, "", "draining", f"{reason}: step {self.pop_drain.step + 1}/"
                                                              f"{len(steps)} {step}")

    def undrain(self, reason: str = "operator undrain") -> None:
        """End the drain: the attributes go at once; a withdrawn PoP returns after the hold-down.
        Refused (DrainHeld) while the disable file exists."""
        path = self.config.drain.disable_file
        if path and _exists(path):
            raise DrainHeld(f"the disable file {path} exists: remove it to undrain (it drains the PoP while it "
                            f"exists)")
        self._end_drain(reason)
        self._admin_changed()
        self.reevaluate()

    def _end_drain(self, reason: str) -> None:
        was = "drained" if self.verdict.drained else "draining" if self.pop_drain is not None else ""
        self.pop_drain = None
        self.drain_connections = None
        self.verdict = verdict.undrain(self.verdict)
        self._record("admin", self.config.name, was, "", reason)
        log.info("pop.undrain pop=%s reason=%s", self.config.name, reason)
        self._admin_changed()

    def check_disable_file(self) -> None:
        """The disable file (drain.disable_file, like ExaBGP healthcheck's --disable): while it
        exists the PoP is drained through the ladder; removing it ends that drain (not an
        operator's)."""
        path = self.config.drain.disable_file
        exists = bool(path) and _exists(path)
        if exists and self.pop_drain is None:
            self.drain(f"disable file {path}", source=ladder.DISABLE_FILE)
        elif not exists and self.pop_drain is not None and self.pop_drain.source == ladder.DISABLE_FILE:
            self._end_drain(f"disable file {self.pop_drain.reason.removeprefix('disable file ')} removed")
            self.reevaluate()

    def _admin(self, what: str, subject: str, old: str, new: str, reason: str) -> None:
        self._record("admin", subject, old, new, reason)
        log.info("%s.%s %s=%s", what, new or "undrain", what, subject)
        self._admin_changed()
        self.reevaluate()

    def admin_state(self, wall: float, now: float) -> AdminState:
        """The drains, with wall-clock times (``wall`` is time.time() at the engine's ``now``)."""
        return adminstate.record(self.pop_drain, self.server_drains, wall, now)

    def restore_admin(self, state: AdminState, wall: float) -> None:
        """Take up the drains a previous engine left (before run(): nothing is announced yet)."""
        self.server_drains.update(adminstate.restore(state, wall, self.clock()))
        for name, drain in self.server_drains.items():
            self._record("admin", name, "", "drained" if drain.done else "draining", f"restored: {drain.reason}")
        restored = adminstate.restore_pop_drain(state, wall, self.clock())
        if restored is not None:
            self.pop_drain = ladder.fit(restored, self.config.drain.steps)
            if ladder.withdrawn(self.pop_drain, self.config.drain.steps):
                self.verdict = verdict.drain(self.verdict, self.clock(), f"drained: {restored.reason}")
            self._record("admin", self.config.name, "", "draining", f"restored: {restored.reason}")
        self.reevaluate()

    def _admin_changed(self) -> None:
        if self.on_admin_change is not None:
            self.on_admin_change()

    def status_revision(self) -> int:
        """Changes with everything /v1/status shows that is not a counter: every event, and what
        the session and the kernel hold after each pass of the applier."""
        return self.revision + self.applier.changes

    def _record(self, kind: str, subject: str, old: str, new: str, reason: str) -> None:
        self.events.append(Event(self.clock(), self.wall(), kind, subject, old, new, reason))
        self.revision += 1  # a shared /v1/status built before this is no longer served (pop.status)

    def _applier_event(self, kind: str, subject: str, reason: str) -> None:
        self._record(kind, subject, "", kind, reason)

    # --- the loops -------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until cancelled or until an adapter fails (the exception propagates)."""
        self.check_disable_file()
        self.reevaluate()
        async with asyncio.TaskGroup() as group:
            self._group = group
            group.create_task(self.applier.run(), name="applier")
            group.create_task(self._timer(), name="hold-down timer")
            group.create_task(self._every(1.0, self._drain_watch), name="server drains")
            group.create_task(self._every(1.0, self._disable_watch), name="disable file")
            if self.load_signal is not None:
                group.create_task(self._load_loop(), name="load signal")
            self.probes.start(group, self.checks, self._enabled)

    def reload(self, config: Config, checks: Checks) -> None:
        """Take a new configuration without losing health state or flapping routes.

        Servers whose identity is unchanged keep their state (pop.health), and those whose checks
        are unchanged keep their probes on the schedule (pop.probes.update); the probes of the
        others, in flight or not, are cancelled and their results dropped. The verdict
        is kept, so unchanged prefixes stay announced; the applier is reconfigured and sends
        only what differs.
        """
        self._configure(config, checks)
        self.applier.reconfigure(config)
        self._record("admin", config.name, "", "reloaded", f"configuration reloaded from {config.source}")
        log.info("engine.reloaded servers=%d prefixes=%d", len(config.servers), len(config.prefixes))
        if self._group is not None:
            self.probes.update(checks, self._enabled)
        self.reevaluate()

    def _pace(self, server: str, tier: str) -> float:
        return self.board.pace(server, tier)  # the board is replaced on reload: look it up each time

    async def _timer(self) -> None:
        """Re-decide when a hold-down expires, a drain step is due or a maintenance ends
        (nothing else would wake the verdict then)."""
        while True:
            self._wake_timer.clear()
            times = [self.verdict.hold_down_until, dampening.reusable_at(self.damping, self.config.dampening),
                     fleet.due(self.guard, self.config.fleet),
                     None if self.pop_drain is None else ladder.due(self.pop_drain, self.config.drain.steps)]
            until = min((t for t in times if t is not None), default=None)
            try:
                async with asyncio.timeout(None if until is None else max(0.0, until - self.clock())):
                    await self._wake_timer.wait()
            except TimeoutError:
                self.reevaluate()

    async def _every(self, seconds: float, work: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            await work()

    async def _drain_watch(self) -> None:
        """While a server or the PoP drains, read the connection counts from the data plane."""
        climbing = self.pop_drain is not None and not ladder.withdrawn(self.pop_drain, self.config.drain.steps)
        counted = self.counts_connections
        if not (drains.pending(self.server_drains.values()) or (climbing and counted)):
            return
        try:
            connections = await self.applier.connections()
        except self.applier.dataplane_errors as exc:
            log.warning("dataplane.connections error=%s", exc)
            return
        if climbing and counted:
            self.drain_connections = sum(connections.values())
            self.reevaluate()
        self.finish_drains(connections)

    @property
    def counts_connections(self) -> bool:
        """Whether the data plane can tell the PoP's traffic is gone: IPVS, or pinned flows (ecmp)."""
        dp = self.config.dataplane
        return self.applier.dataplane is not None and drains.quiescent(dp.mode, dp.pin_flows)

    async def _disable_watch(self) -> None:
        self.check_disable_file()

    async def _load_loop(self) -> None:
        """One reading per load period (load.period, read each time: a reload may change it), so
        the load moves the data plane at most once per period."""
        while True:
            await asyncio.sleep(self.config.load.period if self.config.load.enabled else 2.0)
            await self._load_watch()

    async def _load_watch(self) -> None:
        assert self.load_signal is not None
        try:
            factors = await self.load_signal()
        except self.applier.dataplane_errors as exc:
            log.warning("load.signal error=%s", exc)
            return
        self.observe_load(factors)

    # --- introspection ---------------------------------------------------------------------

    def snapshot(self, extra: Mapping[str, object] | None = None) -> Snapshot:
        return snapshot.build(self.config, now=self.clock(), started=self.started, verdict=self.verdict,
                              pool_view=self.pool, board=self.board, drains=self.server_drains,
                              announced=self.speaker.announced(), events=tuple(self.events),
                              applier=self.applier, extra=extra or {}, durations=self.durations.snapshot(),
                              schedule=self.probes.schedule(), marks=self.tails, factors=self.factors(),
                              load_view=None if self.load_view is None else self.load_view(),
                              ladder=ladder.view(self.pop_drain, self.config.drain.steps, self.clock(), self.wall()),
                              dampening=dampening.view(self.damping, self.clock(), self.config.dampening),
                              external=None if self.tier3 is None else external.summary(self.tier3, self.wall()),
                              fleet=None if not self.config.fleet.id else fleet.summary(
                                  self.guard, self.config.fleet, self.fleet_view, self.clock()))


def _exists(path: str) -> bool:
    # a stat on the event loop: local and cheap, once a second
    return os.path.lexists(path)


def _word(announce: bool) -> str:
    return "announced" if announce else "withdrawn"

