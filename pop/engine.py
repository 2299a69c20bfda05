"""The engine: runs the checks, folds their results through the pure decisions, and has the
adapters make the outcome true.

    probers (one per server and tier) --observe()--> hysteresis --> pool --> verdict
        --> desired announcements --> applier --> bgp.set()

Everything that decides lives in the pure modules; this module only schedules. All state
changes happen on the event loop thread in `observe()` / `reevaluate()`, so no locks are
needed. The applier coalesces: if the desired state changes while a `set()` is in flight,
only the newest state is sent next.

Probes run on a schedule, not back to back: a new probe starts every interval even while an
earlier one waits for its timeout, so silence is detected at the pace of the interval rather
than of the timeout. A result older than one already folded in is dropped as stale.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from pop import desired as plan
from pop import hysteresis, load, verdict
from pop.adminstate import AdminState, ServerDrainRecord
from pop.checks.base import Check, CheckResult
from pop.config import Config
from pop.desired import Announcement, DesiredState, announcements
from pop.hysteresis import Policy, ServerHealth, State, TierState
from pop.verdict import PoolView, Verdict, VerdictPolicy

log = logging.getLogger("pop.engine")


class Speaker(Protocol):
    async def set(self, announcements: Sequence[Announcement], *, force: bool = False) -> None: ...

    def announced(self) -> tuple[Announcement, ...]: ...


class Dataplane(Protocol):
    """VIPs, IPVS services and ECMP routes; `set()` takes them whole (pop.adapters.dataplane)."""

    async def set(self, state: DesiredState) -> None: ...

    async def connections(self) -> Mapping[str, int]:
        """Open connections per real-server address (IPVS); empty when the mode has none."""
        ...


@dataclass(frozen=True, slots=True)
class ServerDrain:
    """An operator drain of one server: quiescent (weight 0) until its connections are gone."""

    since: float
    done: bool = False  # connections gone or drain_timeout passed: out of the data plane
    reason: str = "draining: no new flows, existing connections continue"


LoadSignal = Callable[[], Awaitable[Mapping[str, float]]]
"""Pluggable load signal: a factor in (0, 1] per server address (pop/load.py)."""


class DataplaneFailure(Exception):
    """What a data plane adapter raises for a kernel error (pop.adapters.routes.DataplaneError)."""


@dataclass(frozen=True, slots=True)
class Event:
    """One state change, kept for /status ("why is this PoP withdrawn?")."""

    at: float  # monotonic
    wall: float  # time.time(), for people
    kind: str  # "server" | "verdict" | "admin"
    subject: str
    old: str
    new: str
    reason: str


@dataclass(frozen=True, slots=True)
class ServerSnapshot:
    name: str
    address: str
    weight: int
    health: ServerHealth
    tiers: Mapping[str, TierState]
    drain: ServerDrain | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An immutable picture of the engine for /status, the NOC page and /metrics."""

    pop: str
    at: float
    started: float
    verdict: Verdict
    pool: PoolView
    degraded: bool
    servers: tuple[ServerSnapshot, ...]
    desired: tuple[Announcement, ...]
    announced: tuple[Announcement, ...]
    events: tuple[Event, ...]
    extra: Mapping[str, object] = field(default_factory=dict)


class Engine:
    def __init__(self, config: Config, speaker: Speaker, checks: Mapping[str, Sequence[tuple[Check, Policy]]], *,
                 clock: Callable[[], float] = time.monotonic, dataplane: Dataplane | None = None,
                 dataplane_errors: tuple[type[Exception], ...] = (DataplaneFailure,),
                 load_signal: LoadSignal | None = None) -> None:
        self.config = config
        self.speaker = speaker
        self.dataplane = dataplane
        self._dataplane_errors = dataplane_errors
        self.desired_dataplane = DesiredState()
        self.applied_dataplane = DesiredState()
        self.dataplane_error = ""
        self.dataplane_failures = 0
        self._withdrawn_at: float | None = None
        self.server_drains: dict[str, ServerDrain] = {}
        self.on_admin_change: Callable[[], None] | None = None  # the service persists drains
        self.load_signal = load_signal
        self.load_factors: dict[str, float] = {}
        self.checks = checks
        self.clock = clock
        self.started = clock()
        self.verdict = Verdict()
        self.tiers: dict[str, dict[str, TierState]] = {
            s.name: {check.name: TierState(since=self.started) for check, _ in checks.get(s.name, ())}
            for s in config.servers
        }
        self.health: dict[str, ServerHealth] = {
            s.name: hysteresis.combine(self.tiers[s.name], s.enabled) for s in config.servers
        }
        self.pool = PoolView(0, len(config.servers), settled=False)
        self.desired: tuple[Announcement, ...] = ()
        self.events: collections.deque[Event] = collections.deque(maxlen=200)
        self._dirty = asyncio.Event()
        self._wake_timer = asyncio.Event()
        self._wake_prober: dict[tuple[str, str], asyncio.Event] = {}
        self._latest: dict[tuple[str, str], int] = {}
        self._sequence = itertools.count(1)
        self._group: asyncio.TaskGroup | None = None
        self._probers: list[asyncio.Task[None]] = []
        self._verdict_policy = VerdictPolicy(config.pool.low_watermark, config.pool.high_watermark,
                                             config.pool.hold_down)

    # --- decisions -------------------------------------------------------------------------

    def observe(self, server: str, tier: str, result: CheckResult, sequence: int | None = None) -> None:
        """Fold one check result in; re-decide if the server's health changed."""
        key = (server, tier)
        if sequence is not None:
            if sequence < self._latest.get(key, 0):
                return  # a newer probe of this server and tier already answered
            self._latest[key] = sequence
        if server not in self.tiers or tier not in self.tiers[server]:
            return  # the server or its tier went away in a reload while this probe ran
        now = self.clock()
        old = self.tiers[server][tier]
        policy = next(p for c, p in self.checks[server] if c.name == tier)
        new = hysteresis.step(old, result, policy, now)
        self.tiers[server][tier] = new
        if new.state is not old.state:
            log.info("server.tier server=%s tier=%s %s->%s reason=%s", server, tier, old.state.value,
                     new.state.value, new.reason)
            # every tier of the server re-reads its pace: one tier changing speeds up the others
            for other in self.tiers[server]:
                wake = self._wake_prober.get((server, other))
                if wake is not None:
                    wake.set()
        enabled = next(s.enabled for s in self.config.servers if s.name == server)
        health = hysteresis.combine(self.tiers[server], enabled)
        previous = self.health[server]
        if health != previous:
            self.health[server] = health
            if health.state is not previous.state:
                log.info("server.%s server=%s tier=%s reason=%s", health.state.value, server, health.tier or "-",
                         health.reason)
                self._record("server", server, previous.state.value, health.state.value,
                             f"{health.tier}: {health.reason}" if health.tier else health.reason)
            self.reevaluate()

    def reevaluate(self) -> None:
        now = self.clock()
        healthy = sum(1 for name, h in self.health.items() if h.in_pool and name not in self.server_drains)
        settled = all(h.state is not State.INIT for h in self.health.values())
        self.pool = PoolView(healthy, len(self.config.servers), settled)
        old = self.verdict
        self.verdict = verdict.decide(old, self.pool, self._verdict_policy, now)
        if self.verdict.announce != old.announce:
            action = "announce" if self.verdict.announce else "withdraw"
            log.info("pop.%s pop=%s reason=%s", action, self.config.name, self.verdict.reason)
            self._record("verdict", self.config.name, "announced" if old.announce else "withdrawn",
                         "announced" if self.verdict.announce else "withdrawn", self.verdict.reason)
        elif self.verdict.hold_down_until != old.hold_down_until and self.verdict.hold_down_until is not None:
            log.info("pop.hold_down pop=%s until=+%.1fs reason=%s", self.config.name,
                     self.verdict.hold_down_until - now, self.verdict.reason)
        self._wake_timer.set()
        desired = announcements(self.config.prefixes, self.verdict.announce, self.degraded)
        members = [(s.address, self._weight(s.name, s.address, s.weight)) for s in self.config.servers
                   if self.health[s.name].in_pool and not self._drained(s.name)]
        dataplane = plan.dataplane(self.config.prefixes, members, self.config.dataplane)
        if desired != self.desired or dataplane != self.desired_dataplane:
            self.desired = desired
            self.desired_dataplane = dataplane
            self._dirty.set()

    def _weight(self, server: str, address: str, weight: int) -> int:
        if server in self.server_drains:
            return 0
        return load.weighted(weight, self.load_factors.get(address, 1.0))

    def pool_weights(self) -> dict[str, int]:
        """Configured weights of the servers in the pool, by address (what a load signal scales)."""
        return {s.address: s.weight for s in self.config.servers
                if self.health[s.name].in_pool and s.name not in self.server_drains}

    def observe_load(self, factors: Mapping[str, float]) -> None:
        """Fold a load reading in; re-decide only when a data-plane weight actually changes."""
        before = {s.address: self._weight(s.name, s.address, s.weight) for s in self.config.servers}
        self.load_factors = load.smooth(self.load_factors, factors)
        after = {s.address: self._weight(s.name, s.address, s.weight) for s in self.config.servers}
        if after != before:
            log.info("dataplane.weights %s", " ".join(f"{a}={w}" for a, w in sorted(after.items())))
            self.reevaluate()

    def _drained(self, server: str) -> bool:
        drain = self.server_drains.get(server)
        return drain is not None and drain.done

    def drain_server(self, server: str) -> None:
        """Quiescent drain of one server: no new clients, existing ones stay until they leave."""
        if server not in self.health:
            raise KeyError(server)
        if server not in self.server_drains:
            if self.config.dataplane.mode == "ipvs" or self.config.dataplane.pin_flows:
                # quiescent: IPVS weight 0, or out of the multipath route but still pinned
                self.server_drains[server] = ServerDrain(self.clock())
            else:
                # a multipath route has no weight 0: the server leaves it at once, and the flows
                # it carried rehash onto the others (mode none: it only leaves the pool count)
                why = ("out of the multipath route at once; its flows move (ecmp has no quiescent weight 0)"
                       if self.config.dataplane.mode == "ecmp" else "out of the healthy count (no data plane)")
                self.server_drains[server] = ServerDrain(self.clock(), done=True, reason=f"drained: {why}")
            self._record("admin", server, "", "draining", "operator drain of the server")
            log.info("server.drain server=%s", server)
            self._admin_changed()
            self._wake_timer.set()
            self.reevaluate()

    def undrain_server(self, server: str) -> None:
        if server not in self.health:
            raise KeyError(server)
        if self.server_drains.pop(server, None) is not None:
            self._record("admin", server, "draining", "", "operator undrain of the server")
            log.info("server.undrain server=%s", server)
            self._admin_changed()
            self.reevaluate()

    def finish_drains(self, connections: Mapping[str, int]) -> None:
        """Take drained servers whose connections are gone, or whose time is up, out of the data plane."""
        now = self.clock()
        changed = False
        for server in self.config.servers:
            drain = self.server_drains.get(server.name)
            if drain is None or drain.done:
                continue
            left = connections.get(server.address, 0)
            if left == 0 or now - drain.since >= self.config.dataplane.drain_timeout:
                why = "connections gone" if left == 0 else f"drain_timeout passed with {left} connections"
                self.server_drains[server.name] = replace(drain, done=True, reason=f"drained: {why}")
                self._record("admin", server.name, "draining", "drained", why)
                log.info("server.drained server=%s reason=%s", server.name, why)
                changed = True
        if changed:
            self._admin_changed()
            self.reevaluate()

    @property
    def degraded(self) -> bool:
        return any(h.state is not State.UP for h in self.health.values())

    def drain(self, reason: str = "operator drain") -> None:
        self.verdict = verdict.drain(self.verdict, self.clock())
        self._record("admin", self.config.name, "", "drained", reason)
        self._admin_changed()
        self.reevaluate()

    def undrain(self) -> None:
        self.verdict = verdict.undrain(self.verdict)
        self._record("admin", self.config.name, "drained", "", "operator undrain")
        self._admin_changed()
        self.reevaluate()

    def admin_state(self, wall: float, now: float) -> AdminState:
        """The drains, with wall-clock times (``wall`` is time.time() at the engine's ``now``)."""
        servers = {name: ServerDrainRecord(wall - (now - d.since), d.done, d.reason)
                   for name, d in self.server_drains.items()}
        return AdminState(self.verdict.drained, servers)

    def restore_admin(self, state: AdminState, wall: float) -> None:
        """Take up the drains a previous engine left (before run(): nothing is announced yet)."""
        now = self.clock()
        for name, record in state.servers.items():
            self.server_drains[name] = ServerDrain(now - max(0.0, wall - record.since), record.done, record.reason)
            self._record("admin", name, "", "drained" if record.done else "draining", f"restored: {record.reason}")
        if state.pop_drained:
            self.drain("restored: operator drain")
        self.reevaluate()

    def _admin_changed(self) -> None:
        if self.on_admin_change is not None:
            self.on_admin_change()

    def _record(self, kind: str, subject: str, old: str, new: str, reason: str) -> None:
        self.events.append(Event(self.clock(), time.time(), kind, subject, old, new, reason))

    # --- the loops -------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until cancelled or until an adapter fails (the exception propagates)."""
        self.reevaluate()
        async with asyncio.TaskGroup() as group:
            self._group = group
            group.create_task(self._applier(), name="applier")
            group.create_task(self._timer(), name="hold-down timer")
            group.create_task(self._drain_watch(), name="server drains")
            if self.load_signal is not None:
                group.create_task(self._load_watch(self.load_signal), name="load signal")
            self._start_probers()

    def _start_probers(self) -> None:
        assert self._group is not None
        for server in self.config.servers:
            if not server.enabled:
                continue
            for check, policy in self.checks.get(server.name, ()):
                self._probers.append(self._group.create_task(
                    self._prober(server.name, check, policy), name=f"probe {server.name} {check.name}"))

    def reload(self, config: Config, checks: Mapping[str, Sequence[tuple[Check, Policy]]]) -> None:
        """Take a new configuration without losing health state or flapping routes.

        A server whose identity (address, ports, keys) is unchanged keeps the state of every
        tier it still has; a new or changed server starts from INIT like at start-up. The
        verdict is kept, so unchanged prefixes stay announced; the next `set()` sends only
        what differs (new attributes, added or removed prefixes).
        """
        now = self.clock()
        old_servers = {s.name: s for s in self.config.servers}
        tiers: dict[str, dict[str, TierState]] = {}
        for server in config.servers:
            previous = old_servers.get(server.name)
            same = previous is not None and (previous.address, previous.port, previous.wireguard) == (
                server.address, server.port, server.wireguard)
            tiers[server.name] = {
                check.name: (self.tiers[server.name].get(check.name, TierState(since=now)) if same
                             else TierState(since=now))
                for check, _ in checks.get(server.name, ())
            }
        for task in self._probers:
            task.cancel()
        self._probers.clear()
        self._latest.clear()
        self.config = config
        self.checks = checks
        self.tiers = tiers
        self.health = {s.name: hysteresis.combine(tiers[s.name], s.enabled) for s in config.servers}
        self._verdict_policy = VerdictPolicy(config.pool.low_watermark, config.pool.high_watermark,
                                             config.pool.hold_down)
        self._record("admin", config.name, "", "reloaded", f"configuration reloaded from {config.source}")
        log.info("engine.reloaded servers=%d prefixes=%d", len(config.servers), len(config.prefixes))
        if self._group is not None:
            self._start_probers()
        self.reevaluate()

    async def _applier(self) -> None:
        reassert = self.config.exabgp.reassert_interval
        last_full = self.clock()
        while True:
            timeout = None if reassert <= 0 else max(0.0, last_full + reassert - self.clock())
            try:
                async with asyncio.timeout(timeout):
                    await self._dirty.wait()
            except TimeoutError:
                pass
            self._dirty.clear()
            force = reassert > 0 and self.clock() >= last_full + reassert
            if force:
                last_full = self.clock()
            await self._apply(force)

    async def _apply(self, force: bool) -> bool:
        """One pass of making the adapters hold the newest desired state, in the safe order.

        Announcing: the data plane first (VIP, IPVS service, routes), then BGP, so that the
        first packet attracted finds a way to a server. Withdrawing: BGP first, then the data
        plane only after `dataplane.withdraw_dwell`, so that traffic already on its way while
        the withdraw propagates is still delivered. A re-announce during the dwell cancels the
        teardown. Returns False when the pass must be retried.
        """
        if self.dataplane is None:
            await self.speaker.set(self.desired, force=force)
            return True
        if self.desired:
            self._withdrawn_at = None
            if not await self._set_dataplane(self.desired_dataplane) and not self.speaker.announced():
                return False  # never attract traffic onto a data plane that is not there
            await self.speaker.set(self.desired, force=force)
            return True
        await self.speaker.set((), force=force)
        if self.applied_dataplane == DesiredState():
            return True
        if self._withdrawn_at is None:
            self._withdrawn_at = self.clock()
        remaining = self._withdrawn_at + self.config.dataplane.withdraw_dwell - self.clock()
        if remaining > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._dirty.wait()
            if self._dirty.is_set():
                return False  # something changed during the dwell: decide again
        return await self._set_dataplane(DesiredState())

    async def _set_dataplane(self, state: DesiredState) -> bool:
        assert self.dataplane is not None
        if state == self.applied_dataplane and not self.dataplane_error:
            return True
        try:
            await self.dataplane.set(state)
        except self._dataplane_errors as exc:
            self.dataplane_failures += 1
            if str(exc) != self.dataplane_error:
                log.error("dataplane.failed error=%s", exc)
            self.dataplane_error = str(exc)
            asyncio.get_running_loop().call_later(1.0, self._dirty.set)  # retry: the kernel may recover
            return False
        if self.dataplane_error:
            log.info("dataplane.recovered")
        self.dataplane_error = ""
        self.applied_dataplane = state
        return True

    async def _timer(self) -> None:
        """Re-decide when a hold-down expires (nothing else would wake the verdict then)."""
        while True:
            self._wake_timer.clear()
            until = self.verdict.hold_down_until
            timeout = None if until is None else max(0.0, until - self.clock())
            try:
                async with asyncio.timeout(timeout):
                    await self._wake_timer.wait()
            except TimeoutError:
                self.reevaluate()

    async def _drain_watch(self) -> None:
        """While a server drains, read its connection count from the data plane every second."""
        while True:
            await asyncio.sleep(1.0)
            if not any(not d.done for d in self.server_drains.values()):
                continue
            connections: Mapping[str, int] = {}
            if self.dataplane is not None:
                try:
                    connections = await self.dataplane.connections()
                except self._dataplane_errors as exc:
                    log.warning("dataplane.connections error=%s", exc)
                    continue
            self.finish_drains(connections)

    async def _load_watch(self, signal: LoadSignal) -> None:
        while True:
            await asyncio.sleep(2.0)
            try:
                factors = await signal()
            except self._dataplane_errors as exc:
                log.warning("load.signal error=%s", exc)
                continue
            self.observe_load(factors)

    async def _prober(self, server: str, check: Check, policy: Policy) -> None:
        key = (server, check.name)
        wake = self._wake_prober[key] = asyncio.Event()
        timeout = getattr(check, "timeout", 1.0)
        in_flight: set[asyncio.Task[None]] = set()
        # spread the first probes over one interval: no thundering herd at start
        await asyncio.sleep(random.uniform(0, policy.fast_interval))
        last_start = -1e9
        while True:
            pace = hysteresis.interval(self.tiers[server][check.name], policy, self.tiers[server].values())
            delay = last_start + pace - self.clock()
            if delay > 0:
                wake.clear()
                try:
                    async with asyncio.timeout(delay):
                        await wake.wait()
                except TimeoutError:
                    pass
                continue  # re-read the pace: the state may have changed while we slept
            # never more probes in flight than fit into one timeout at the fast pace
            if len(in_flight) > timeout / policy.fast_interval + 1:
                await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                continue
            last_start = self.clock()
            task = asyncio.create_task(self._probe_once(server, check, timeout * 2 + 0.5, next(self._sequence)))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)

    async def _probe_once(self, server: str, check: Check, deadline: float, sequence: int) -> None:
        try:
            # the check keeps its own timeout; this deadline is the backstop for a check that
            # does not, so that a hung probe can never hold a server's state hostage
            async with asyncio.timeout(deadline):
                result = await check.probe()
        except TimeoutError:
            result = CheckResult.failure("timeout", detail="check did not return by its deadline")
        except Exception as exc:  # a broken check is a failed check, never a dead engine
            log.exception("check.crashed server=%s tier=%s", server, check.name)
            result = CheckResult.failure("error", detail=f"check raised {exc!r}")
        self.observe(server, check.name, result, sequence)

    # --- introspection ---------------------------------------------------------------------

    def snapshot(self, extra: Mapping[str, object] | None = None) -> Snapshot:
        servers = tuple(
            ServerSnapshot(s.name, s.address, s.weight, self.health[s.name], dict(self.tiers[s.name]),
                           self.server_drains.get(s.name))
            for s in self.config.servers
        )
        return Snapshot(pop=self.config.name, at=self.clock(), started=self.started, verdict=self.verdict,
                        pool=self.pool, degraded=self.degraded and self.verdict.announce, servers=servers,
                        desired=self.desired, announced=self.speaker.announced(), events=tuple(self.events),
                        extra=dict(extra or {}))
