"""Every server's health: the state of each check tier, and their combination. Pure.

`fold(server, tier, result, now)` steps one tier through its hysteresis (pop.hysteresis) and
re-combines the server; it returns what moved, so that the engine can log it, record it and
re-decide. Time is an argument.

A reload builds the new table from the old one: a server whose identity (address, port,
WireGuard target) is unchanged keeps the state of every tier it still has; a new or changed
server starts from INIT, like at start-up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pop import hysteresis
from pop.checks.base import CheckResult
from pop.config import Server
from pop.hysteresis import Policy, ServerHealth, State, TierState

Policies = Mapping[str, Mapping[str, Policy]]
"""Per server name, per tier name (the check's name), the hysteresis policy of that tier."""


@dataclass(frozen=True, slots=True)
class Moved:
    """What one folded result moved."""

    tier: tuple[TierState, TierState]  # (before, after)
    server: tuple[ServerHealth, ServerHealth]

    @property
    def tier_state(self) -> bool:
        return self.tier[0].state is not self.tier[1].state

    @property
    def server_state(self) -> bool:
        return self.server[0].state is not self.server[1].state


class Health:
    def __init__(self, servers: Sequence[Server], policies: Policies, now: float,
                 previous: Health | None = None) -> None:
        self._servers = {s.name: s for s in servers}
        self._policies = policies
        kept: dict[str, dict[str, TierState]] = {}
        if previous is not None:
            kept = {s.name: previous.tiers[s.name] for s in servers
                    if (old := previous._servers.get(s.name)) is not None
                    and (old.address, old.port, old.wireguard) == (s.address, s.port, s.wireguard)}
        self.tiers: dict[str, dict[str, TierState]] = {
            s.name: {t: kept.get(s.name, {}).get(t, TierState(since=now)) for t in policies.get(s.name, {})}
            for s in servers}
        self.servers = {s.name: hysteresis.combine(self.tiers[s.name], s.enabled) for s in servers}

    def fold(self, server: str, tier: str, result: CheckResult, now: float) -> Moved | None:
        """One check result in; None when the server or its tier is not (any longer) configured."""
        if tier not in self.tiers.get(server, {}):
            return None
        old = self.tiers[server][tier]
        new = self.tiers[server][tier] = hysteresis.step(old, result, self._policies[server][tier], now)
        before = self.servers[server]
        if old.state is new.state is State.UP:
            # nearly every probe: combine() reads no more of an UP tier than its state
            return Moved((old, new), (before, before))
        after = self.servers[server] = hysteresis.combine(self.tiers[server], self._servers[server].enabled)
        return Moved((old, new), (before, after))

    def seed(self, results: Mapping[tuple[str, str], CheckResult], now: float) -> None:
        """Every tier from one probe round (an engine start that adopts its predecessor's routes)."""
        for (server, tier), result in results.items():
            if tier in self.tiers.get(server, {}):
                self.tiers[server][tier] = hysteresis.seed(result, now)
        for name, configured in self._servers.items():
            self.servers[name] = hysteresis.combine(self.tiers[name], configured.enabled)

    def pace(self, server: str, tier: str) -> float:
        """How soon the tier's next probe is due (fast while any tier of the server changes)."""
        return hysteresis.interval(self.tiers[server][tier], self._policies[server][tier],
                                   self.tiers[server].values())
