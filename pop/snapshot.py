"""What the engine shows: immutable pictures for /status, the NOC page and /metrics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pop.applier import ApplyStatus
from pop.desired import Announcement
from pop.drains import ServerDrain
from pop.hysteresis import ServerHealth, TierState
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
