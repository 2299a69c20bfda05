"""The operator's drains, kept across engine restarts (pure: dict in, dict out).

An operator drains a PoP for maintenance; if the engine then dies (a crash, the watchdog)
ExaBGP respawns it, and a fresh engine that forgot the drain would announce the PoP in the
middle of the maintenance. So every drain and undrain is written to ``drains.json`` in the
PoP's runtime directory, and a new engine starts from it. The runtime directory belongs to
the host's boot (``/run`` by default): a reboot forgets drains, as it forgets everything else.

The file holds wall-clock times (``time.time()``), so that a drain's age survives the
process: the engine converts them to its own monotonic clock on restore.

    {"version": 1, "pop_drained": true,
     "servers": {"vpn1": {"since": 1763790000.5, "done": false, "reason": "draining: ..."}}}

``parse(data, servers)`` returns ``AdminState`` or raises ``AdminStateError`` naming what is
wrong; servers the configuration no longer has are dropped (and named in ``dropped``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pop.drains import ServerDrain

VERSION = 1
FILE_NAME = "drains.json"


class AdminStateError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ServerDrainRecord:
    since: float  # wall clock
    done: bool
    reason: str


@dataclass(frozen=True, slots=True)
class AdminState:
    pop_drained: bool = False
    servers: dict[str, ServerDrainRecord] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()  # drained servers the configuration no longer has


def to_dict(state: AdminState) -> dict[str, Any]:
    return {"version": VERSION, "pop_drained": state.pop_drained,
            "servers": {name: {"since": d.since, "done": d.done, "reason": d.reason}
                        for name, d in sorted(state.servers.items())}}


def parse(data: Any, servers: set[str]) -> AdminState:
    if not isinstance(data, dict):
        raise AdminStateError(f"must be a JSON object, not {type(data).__name__}")
    if data.get("version") != VERSION:
        raise AdminStateError(f"version: {data.get('version')!r} is not {VERSION}")
    pop_drained = data.get("pop_drained")
    if not isinstance(pop_drained, bool):
        raise AdminStateError("pop_drained: must be true or false")
    raw = data.get("servers", {})
    if not isinstance(raw, dict):
        raise AdminStateError("servers: must be an object")
    records: dict[str, ServerDrainRecord] = {}
    dropped: list[str] = []
    for name, item in raw.items():
        if not isinstance(item, dict):
            raise AdminStateError(f"servers.{name}: must be an object")
        since, done, reason = item.get("since"), item.get("done"), item.get("reason")
        if isinstance(since, bool) or not isinstance(since, int | float) or not math.isfinite(since):
            raise AdminStateError(f"servers.{name}.since: must be a time in seconds")
        if not isinstance(done, bool) or not isinstance(reason, str):
            raise AdminStateError(f"servers.{name}: needs done (true/false) and reason (text)")
        if name in servers:
            records[str(name)] = ServerDrainRecord(float(since), done, reason)
        else:
            dropped.append(str(name))
    return AdminState(pop_drained, records, tuple(dropped))


def record(pop_drained: bool, drains: Mapping[str, ServerDrain], wall: float, now: float) -> AdminState:
    """The engine's drains with wall-clock times (``wall`` is time.time() at the engine's ``now``)."""
    return AdminState(pop_drained, {name: ServerDrainRecord(wall - (now - d.since), d.done, d.reason)
                                    for name, d in drains.items()})


def restore(state: AdminState, wall: float, now: float) -> dict[str, ServerDrain]:
    """The server drains of a saved state on the engine's monotonic clock (ages kept)."""
    return {name: ServerDrain(now - max(0.0, wall - r.since), r.done, r.reason) for name, r in state.servers.items()}
