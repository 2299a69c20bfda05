"""What the engine shows: immutable pictures for /status, the NOC page and /metrics."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from pop import pool, tails
from pop.applier import Applier, ApplyStatus
from pop.config import Config
from pop.config_model import Server
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
    servers: Sequence[ServerSnapshot]  # Servers: each picture made when read
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
    servers = Servers(config.servers, board, drains, marks=marks, factors=factors or {}, load_view=load_view or {},
                      now=now)
    return Snapshot(pop=config.name, at=now, started=started, verdict=verdict, pool=pool_view,
                    degraded=pool.degraded(board.servers, board.tiers) and verdict.announce, servers=servers,
                    desired=applier.desired.announcements, announced=announced, events=events,
                    apply=applier.status(), extra=dict(extra), external=external,
                    ladder=ladder, prefixes=tuple(p.prefix for p in config.prefixes), durations=durations or {},
                    dampening=dampening, schedule=schedule, fleet=fleet)


class Servers(Sequence[ServerSnapshot]):
    """Every server's picture as of the snapshot, each made when it is read.

    Making 1,000 pictures at once held the engine's loop 5-10 ms, twice a second while the
    status is read, and the probes waited for it (issue 10); the status makes them a slice at
    a time (pop.status._render). What a picture is made of is taken here: the states are
    immutable, the dicts that hold them are copied, so a change after the snapshot does not
    show in it. The tails are worked out when read, as of the snapshot's time (tails.Later).
    """

    __slots__ = ("_configured", "_degraded", "_drains", "_factors", "_health", "_load", "_marks", "_now", "_tiers")

    def __init__(self, configured: tuple[Server, ...], board: Health, drains: Mapping[str, ServerDrain], *,
                 marks: tails.Board | None, factors: Mapping[str, float],
                 load_view: Mapping[str, Mapping[str, Any]], now: float) -> None:
        self._configured, self._now = configured, now
        self._health = dict(board.servers)
        self._tiers = {name: dict(tiers) for name, tiers in board.tiers.items()}
        self._drains, self._factors, self._load = dict(drains), dict(factors), dict(load_view)
        self._marks = marks
        self._degraded = {} if marks is None else dict(marks.degraded)

    def __len__(self) -> int:
        return len(self._configured)

    @overload
    def __getitem__(self, index: int) -> ServerSnapshot: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[ServerSnapshot, ...]: ...

    def __getitem__(self, index: int | slice) -> ServerSnapshot | tuple[ServerSnapshot, ...]:
        if isinstance(index, slice):
            return tuple(map(self._picture, self._configured[index]))
        return self._picture(self._configured[index])

    def __iter__(self) -> Iterator[ServerSnapshot]:
        return map(self._picture, self._configured)

    def _picture(self, s: Server) -> ServerSnapshot:
        health, drain = self._health[s.name], self._drains.get(s.name)
        return ServerSnapshot(s.name, s.address, s.weight, health, self._tiers[s.name], drain,
                              pool.in_pool(health, drain),
                              {} if self._marks is None else self._marks.of(s.name, self._now),
                              self._degraded.get(s.name, ""), self._factors.get(s.address, 1.0),
                              self._load.get(s.name))
