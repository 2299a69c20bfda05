"""Server drains: the quiescent-drain machine of one server. Pure; time is an argument.

An operator drains a server to take it out of service without cutting its users off:

    (none) --start--> draining --connections gone or drain_timeout--> drained --undrain--> (none)

While *draining*, the server keeps its open flows (IPVS weight 0, or pinned in ECMP mode)
and gets no new ones. Where the data plane has no quiescent state (ECMP without pinning: a
multipath route has no weight 0; mode none: no data plane at all) a drain is done at once,
and its reason says what that means for the flows.

(The PoP's own drain, withdraw and stay withdrawn, is the verdict's: pop.verdict.drain.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

DRAINING = "draining: no new flows, existing connections continue"


@dataclass(frozen=True, slots=True)
class ServerDrain:
    since: float
    done: bool = False  # connections gone or drain_timeout passed: out of the data plane
    reason: str = DRAINING


def quiescent(mode: str, pin_flows: bool) -> bool:
    """Whether the data plane can hold a server at weight 0 while its flows finish."""
    return mode == "ipvs" or (mode == "ecmp" and pin_flows)


def start(mode: str, pin_flows: bool, now: float) -> ServerDrain:
    if quiescent(mode, pin_flows):
        return ServerDrain(now)
    why = ("out of the multipath route at once; its flows move (ecmp has no quiescent weight 0)"
           if mode == "ecmp" else "out of the healthy count (no data plane)")
    return ServerDrain(now, done=True, reason=f"drained: {why}")


def finish(drains: Mapping[str, ServerDrain], addresses: Mapping[str, str], connections: Mapping[str, int],
           timeout: float, now: float) -> tuple[dict[str, ServerDrain], list[tuple[str, str]]]:
    """Mark done every drain whose server has no connections left or whose time is up.

    ``addresses``: server name -> address; ``connections``: open connections by address.
    Returns the new drains and (server, why) for each drain that finished now.
    """
    result = dict(drains)
    finished = []
    for name, drain in drains.items():
        if drain.done or name not in addresses:
            continue
        left = connections.get(addresses[name], 0)
        if left == 0 or now - drain.since >= timeout:
            why = "connections gone" if left == 0 else f"drain_timeout passed with {left} connections"
            result[name] = replace(drain, done=True, reason=f"drained: {why}")
            finished.append((name, why))
    return result, finished


def pending(drains: Iterable[ServerDrain]) -> bool:
    """Whether some drain still waits for its connections."""
    return any(not d.done for d in drains)
