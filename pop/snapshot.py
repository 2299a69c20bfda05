"""What the engine shows: immutable pictures for /status, the NOC page and /metrics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pop import pool, tails
from pop.applier import Applier, ApplyStatus
from pop.config import Config
from pop.desired import Announcement
from pop.drains import ServerDrain
from pop.durations import Durations
from pop.health import Health
from pop.hysteresis import ServerHealth, TierState
from pop.stretch import Schedule
from pop.verdict import PoolView, Verdict


@dataclass(frozen=True, slots=True)
class Event:
    """One state change, kept for /status ("why is this PoP withdrawn?")."""

    at: float  # monotonic
    wall: float  # time.time(), for people
    kind: str  # "server" | "verdict" | "admin" | "failure" | "recovered" | "repair"
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
    in_pool: bool = False  # pop.pool.in_pool: healthy and not drained
    tails: Mapping[str, tails.Tail] = field(default_factory=dict)  # per tier (pop.tails)
    degraded: str = ""  # why the tails mark it degraded ("" when not)
    factor: float = 1.0  # the load signal's factor times the degraded mark's
    load: Mapping[str, Any] | None = None  # what the load signal read (pop.adapters.telemetry)


@dataclass(frozen=True, slots=True)
class Snapshot:
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
    apply: ApplyStatus = field(default_factory=ApplyStatus)
    extra: Mapping[str, object] = field(default_factory=dict)
    external: Mapping[str, Any] | None = None  # tier 3 (pop.external.summary), when enabled
    ladder: Mapping[str, Any] | None = None  # the PoP drain in progress (pop.ladder.view)
    dampening: Mapping[str, Any] | None = None  # flap dampening, when enabled (pop.dampening.view)
    prefixes: tuple[str, ...] = ()  # configured, announced or not
    durations: Mapping[str, Durations] = field(default_factory=dict)  # probe durations per tier
    schedule: Schedule | None = None  # how the probe schedule holds (pop.stretch)
    fleet: Mapping[str, Any] | None = None  # the fleet guard and view, in a fleet (pop.fleet.summary)


def build(config: Config, *, now: float, started: float, verdict: Verdict, pool_view: PoolView, board: Health,
          drains: Mapping[str, ServerDrain], announced: tuple[Announcement, ...], events: tuple[Event, ...],
          applier: Applier, extra: Mapping[str, object], external: Mapping[str, Any] | None = None,
          ladder: Mapping[str, Any] | None = None, durations: Mapping[str, Durations] | None = None,
          dampening: Mapping[str, Any] | None = None, schedule: Schedule | None = None,
          marks: tails.Board | None = None, factors: Mapping[str, float] | None = None,
          load_view: Mapping[str, Mapping[str, Any]] | None = None,
          fleet: Mapping[str, Any] | None = None) -> Snapshot:
    """The engine's picture, assembled from its parts (read-only)."""
    factors = factors or {}
    load_view = load_view or {}
    servers = tuple(
        ServerSnapshot(s.name, s.address, s.weight, board.servers[s.name], dict(board.tiers[s.name]),
                       drains.get(s.name), pool.in_pool(board.servers[s.name], drains.get(s.name)),
                       {} if marks is None else marks.of(s.name, now),
                       "" if marks is None else marks.degraded.get(s.name, ""),
                       factors.get(s.address, 1.0), load_view.get(s.name))
        for s in config.servers)
    return Snapshot(pop=config.name, at=now, started=started, verdict=verdict, pool=pool_view,
                    degraded=pool.degraded(board.servers, board.tiers) and verdict.announce, servers=servers,
                    desired=applier.desired.announcements, announced=announced, events=events,
                    apply=applier.status(), extra=dict(extra), external=external,
                    ladder=ladder, prefixes=tuple(p.prefix for p in config.prefixes), durations=durations or {},
                    dampening=dampening, schedule=schedule, fleet=fleet)
