"""The operator's drains, kept across engine restarts (pure: dict in, dict out).

An operator drains a PoP for maintenance; if the engine then dies (a crash, the watchdog)
ExaBGP respawns it, and a fresh engine that forgot the drain would announce the PoP in the
middle of the maintenance. So every drain and undrain is written to ``drains.json`` in the
PoP's runtime directory, and a new engine starts from it. The runtime directory belongs to
the host's boot (``/run`` by default): a reboot forgets drains, as it forgets everything else.

The file holds wall-clock times (``time.time()``), so that a drain's age survives the
process: the engine converts them to its own monotonic clock on restore.

    {"version": 1, "pop_drained": true,
     "pop_drain": {"since": 1763790000.5, "step": 1, "step_since": 1763790010.5, "reason": "...",
                   "source": "maintenance", "until": 1763791800.5, "early": ""},
     "servers": {"vpn1": {"since": 1763790000.5, "done": false, "reason": "draining: ..."}}}

``pop_drain`` (the ladder, pop.ladder) is optional: a file without it but with ``pop_drained``
(written before the ladder existed) restores a drain at its withdraw.

``parse(data, servers)`` returns ``AdminState`` or raises ``AdminStateError`` naming what is
wrong; servers the configuration no longer has are dropped (and named in ``dropped``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pop.drains import ServerDrain
from pop.ladder import PopDrain

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
    pop_drain: PopDrain | None = None  # the ladder, with wall-clock times


WITHDRAWN = 1 << 16  # a step past any ladder's end: pop.ladder.fit makes it the withdraw


def to_dict(state: AdminState) -> dict[str, Any]:
    data: dict[str, Any] = {"version": VERSION, "pop_drained": state.pop_drained}
    if state.pop_drain is not None:
        d = state.pop_drain
        data["pop_drain"] = {"since": d.since, "step": d.step, "step_since": d.step_since, "reason": d.reason,
                             "source": d.source, "until": d.until, "early": d.early}
    data["servers"] = {name: {"since": d.since, "done": d.done, "reason": d.reason}
                       for name, d in sorted(state.servers.items())}
    return data


def _pop_drain(raw: Any) -> PopDrain | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise AdminStateError("pop_drain: must be an object")
    since, step_since = (_seconds(raw.get(key), f"pop_drain.{key}") for key in ("since", "step_since"))
    until = None if raw.get("until") is None else _seconds(raw["until"], "pop_drain.until")
    step = raw.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise AdminStateError("pop_drain.step: must be a step number (0 or more)")
    texts = [raw.get(key) for key in ("reason", "source", "early")]
    if not all(isinstance(text, str) for text in texts):
        raise AdminStateError("pop_drain: needs reason, source and early (text)")
    return PopDrain(since, step, step_since, str(texts[0]), str(texts[1]), until, str(texts[2]))


def _seconds(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AdminStateError(f"{where}: must be a time in seconds")
    return float(value)


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
        since, done, reason = _seconds(item.get("since"), f"servers.{name}.since"), item.get("done"), item.get("reason")
        if not isinstance(done, bool) or not isinstance(reason, str):
            raise AdminStateError(f"servers.{name}: needs done (true/false) and reason (text)")
        if name in servers:
            records[str(name)] = ServerDrainRecord(since, done, reason)
        else:
            dropped.append(str(name))
    return AdminState(pop_drained, records, tuple(dropped), _pop_drain(data.get("pop_drain")))


def record(pop_drain: PopDrain | None, drains: Mapping[str, ServerDrain], wall: float, now: float) -> AdminState:
    """The engine's drains with wall-clock times (``wall`` is time.time() at the engine's ``now``)."""
    return AdminState(pop_drain is not None, {name: ServerDrainRecord(wall - (now - d.since), d.done, d.reason)
                                              for name, d in drains.items()},
                      pop_drain=None if pop_drain is None else _shift(pop_drain, wall - now))


def restore_pop_drain(state: AdminState, wall: float, now: float) -> PopDrain | None:
    """The ladder of a saved state on the engine's monotonic clock (None: no PoP drain)."""
    if state.pop_drain is not None:
        return _shift(state.pop_drain, now - wall)
    if state.pop_drained:  # a file from before the ladder: the drain had withdrawn
        return PopDrain(now, WITHDRAWN, now, "restored: operator drain")
    return None


def _shift(drain: PopDrain, offset: float) -> PopDrain:
    return replace(drain, since=drain.since + offset, step_since=drain.step_since + offset,
                   until=None if drain.until is None else drain.until + offset)


def restore(state: AdminState, wall: float, now: float) -> dict[str, ServerDrain]:
    """The server drains of a saved state on the engine's monotonic clock (ages kept)."""
    return {name: ServerDrain(now - max(0.0, wall - r.since), r.done, r.reason) for name, r in state.servers.items()}
