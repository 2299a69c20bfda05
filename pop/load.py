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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


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


# --- the servers' own telemetry (pop/telemetry.py reads it, pop/config_load.py configures it) ---


DEFAULT_STEPS = ((0.75, 0.8), (0.85, 0.5))  # -20 % at 75 % CPU, -50 % at 85 %


@dataclass(frozen=True, slots=True)
class Policy:
    """`load:` in pop.yaml: weights from each server's node exporter."""

    enabled: bool = False
    port: int = 9100  # the exporter on each server's address
    path: str = "/metrics"
    period: float = 5.0  # one scrape per period: the weights change at most once per period
    timeout: float = 1.0  # per scrape
    steps: tuple[tuple[float, float], ...] = DEFAULT_STEPS  # (cpu 0..1, factor), ascending cpu
    smoothing: float = 0.5  # weight of the newest CPU reading when it falls (rises count at once; 1 = none)
    margin: float = 0.05  # a server leaves a step only this far below its threshold
    floor: float = 0.25  # never below this factor (and never weight 0)


def step_factor(cpu: float, steps: Sequence[tuple[float, float]], previous: float = 1.0,
                margin: float = 0.0) -> float:
    """The factor of the highest step whose CPU threshold ``cpu`` (0..1) reaches.

    ``steps`` are (cpu, factor) pairs in ascending cpu, e.g. ((0.75, 0.8), (0.85, 0.5)): -20 %
    at 75 % CPU, -50 % at 85 %. ``margin`` is the hysteresis: a server stays on a lower step
    (``previous``) until its CPU is ``margin`` below that step's threshold, so a reading that
    hovers at a threshold does not move the weight back and forth.
    """
    factor = 1.0
    for threshold, value in steps:
        if cpu >= threshold:
            factor = value
        elif value >= previous and cpu >= threshold - margin:
            factor = value  # still held on the step it reached
    return factor


def telemetry_factors(cpu: Mapping[str, float | None], previous: Mapping[str, float],
                      steps: Sequence[tuple[float, float]], floor: float, margin: float) -> dict[str, float]:
    """Factor per server address from its CPU (smoothed already), or 1.0 where the server's
    exporter did not answer (None): fail-open, the server keeps its configured weight."""
    return {address: 1.0 if busy is None
            else max(floor, step_factor(busy, steps, previous.get(address, 1.0), margin))
            for address, busy in cpu.items()}
