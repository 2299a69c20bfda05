"""Load-following weights: fewer new clients to a busy server. Pure.

A load signal maps each server address to a factor in (0, 1]; the data plane's weight of a
server is its configured weight times its factor (at least 1, so a busy server is never
drained by load alone). Signals are pluggable: anything that can produce the mapping (the
IPVS connection counts built in here, or a server's own telemetry) fits the engine's
`LoadSignal` protocol.

The built-in signal is relative: a server carrying more connections per unit of weight than
the pool's average gets a proportionally smaller share of new ones, never below `floor`.
Connection counts are noisy, so the factor moves smoothly (exponential smoothing) rather than
jumping on every reading.
"""

from __future__ import annotations

from collections.abc import Mapping


def connection_factors(connections: Mapping[str, int], weights: Mapping[str, int],
                       floor: float = 0.25) -> dict[str, float]:
    """Factor per server address from open connections per unit of configured weight."""
    loads = {address: connections.get(address, 0) / weight for address, weight in weights.items() if weight > 0}
    if not loads:
        return {}
    mean = sum(loads.values()) / len(loads)
    if mean <= 0:
        return dict.fromkeys(loads, 1.0)
    return {address: max(floor, min(1.0, mean / load)) if load > mean else 1.0 for address, load in loads.items()}


def smooth(previous: Mapping[str, float], current: Mapping[str, float], alpha: float = 0.3) -> dict[str, float]:
    """Exponential smoothing of factors; a server seen for the first time starts at its reading."""
    return {address: (previous[address] + alpha * (value - previous[address])) if address in previous else value
            for address, value in current.items()}


def weighted(weight: int, factor: float) -> int:
    """The data-plane weight: the configured weight scaled by the factor, at least 1."""
    return max(1, round(weight * factor))
