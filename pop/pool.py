"""The pool: which servers carry traffic, and with what weight. Pure.

One definition, used by the verdict, the data plane, /status and the metrics:

- a server is *in the pool* while its health is in the pool (every tier UP or merely
  FALLING) and no operator drain is on it; the pool's healthy count is the number of those;
- a server is *a member of the data plane* while it is in the pool, and also while it is
  being drained quiescently (weight 0: its open flows stay, new ones go elsewhere) until its
  drain is done;
- a member's weight is its configured weight scaled by the load signal (pop.load), or 0
  while it drains.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pop import load
from pop.drains import ServerDrain
from pop.hysteresis import ServerHealth, State, TierState
from pop.verdict import PoolView


@dataclass(frozen=True, slots=True)
class Server:
    """What the pool needs of a configured server (pop.config.Server has more)."""

    name: str
    address: str
    weight: int


def in_pool(health: ServerHealth, drain: ServerDrain | None) -> bool:
    return health.in_pool and drain is None


def view(servers: Iterable[Server], health: Mapping[str, ServerHealth],
         drains: Mapping[str, ServerDrain]) -> PoolView:
    servers = tuple(servers)
    healthy = sum(1 for s in servers if in_pool(health[s.name], drains.get(s.name)))
    settled = all(health[s.name].state is not State.INIT for s in servers)
    return PoolView(healthy, len(servers), settled)


def weight(server: Server, drain: ServerDrain | None, factors: Mapping[str, float]) -> int:
    """The data-plane weight: 0 while drained, else the configured weight scaled by load."""
    if drain is not None:
        return 0
    return load.weighted(server.weight, factors.get(server.address, 1.0))


def members(servers: Iterable[Server], health: Mapping[str, ServerHealth], drains: Mapping[str, ServerDrain],
            factors: Mapping[str, float]) -> tuple[tuple[str, int], ...]:
    """(address, weight) of every server the data plane should hold, in configuration order."""
    result = []
    for s in servers:
        drain = drains.get(s.name)
        if health[s.name].in_pool and (drain is None or not drain.done):
            result.append((s.address, weight(s, drain, factors)))
    return tuple(result)


ALIVE = (State.UP, State.FALLING)  # a tier's states in which the server counts


def alive(servers: Iterable[Server], tiers: Mapping[str, Mapping[str, TierState]], first_tier: Mapping[str, str],
          drains: Mapping[str, ServerDrain], factors: Mapping[str, float]) -> tuple[tuple[str, int], ...]:
    """(address, weight) of every server that answers at tier 1, drained ones excepted: the
    data plane while the fleet guard holds a PoP its later tiers would withdraw (pop.fleet)."""
    result = []
    for s in servers:
        drain = drains.get(s.name)
        tier = tiers.get(s.name, {}).get(first_tier.get(s.name, ""))
        if tier is not None and tier.state in ALIVE and drain is None:
            result.append((s.address, weight(s, drain, factors)))
    return tuple(result)


def load_weights(servers: Iterable[Server], health: Mapping[str, ServerHealth],
                 drains: Mapping[str, ServerDrain]) -> dict[str, int]:
    """Configured weights of the servers in the pool, by address (what a load signal scales)."""
    return {s.address: s.weight for s in servers if in_pool(health[s.name], drains.get(s.name))}


def degraded(health: Mapping[str, ServerHealth], tiers: Mapping[str, Mapping[str, TierState]]) -> bool:
    """Some server is not fully UP: the PoP announces with its degraded attributes.

    A server that has never failed and is still rising for the first time (just configured
    by a reload, or at start-up) is not a loss of capacity: it does not degrade the PoP, so
    adding a server never sends an UPDATE for the prefixes.
    """
    return any(h.state is not State.UP and not _new(tiers.get(name, {})) for name, h in health.items())


def _new(tiers: Mapping[str, TierState]) -> bool:
    # some tiers may have risen already (TCP answers before the handshake is confirmed)
    return bool(tiers) and all(t.state in (State.INIT, State.RISING, State.UP) and t.failures == 0
                               for t in tiers.values())
