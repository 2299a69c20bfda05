"""What a running lab looks like now: routes at the routers, the PoPs' verdicts, the data path.

Contract:

- ``LabStatus`` is an immutable snapshot (``lab.runner.Lab.status()`` assembles it):
  per router and anycast prefix the kernel route's next hops with the node holding each
  (``RouterRoute``), per PoP the engine's state and reason from its /status (``PopVerdict``,
  state "unreachable" when the engine does not answer), the active faults, and per client or
  probe node which PoP its connection reached and which node answered. ``as_dict()`` is the
  JSON the CLI prints (``python -m lab status --json``).
- ``pop_status(node)`` is GET /status of a PoP's engine, made in-process through a socket in
  the PoP's namespace; ``{}`` when the engine does not answer.
- ``log_tails(pops, routers)`` is the end of every ``pop run`` and bgpd log, for error messages.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lab.frr import FrrRouter
from lab.popnode import PopNode
from lab.routewatch import read_nexthops


@dataclass(frozen=True)
class RouterRoute:
    router: str
    prefix: str
    nexthops: tuple[tuple[str, str], ...]  # (address, node holding it), sorted


@dataclass(frozen=True)
class PopVerdict:
    pop: str
    state: str  # the engine's state, or "unreachable"
    reason: str


@dataclass(frozen=True)
class LabStatus:
    prefix: str
    routes: tuple[RouterRoute, ...]
    pops: tuple[PopVerdict, ...]
    faults: tuple[str, ...] = field(default=())
    # (client or probe node, the PoP its connection reached, the node that answered: that PoP or its server)
    answers: tuple[tuple[str, str | None, str | None], ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "routes": [{"router": r.router, "prefix": r.prefix,
                        "nexthops": [{"address": a, "node": n} for a, n in r.nexthops]} for r in self.routes],
            "pops": [{"pop": p.pop, "state": p.state, "reason": p.reason} for p in self.pops],
            "faults": list(self.faults),
            "answers": [{"node": node, "pop": pop, "answered_by": who} for node, pop, who in self.answers],
        }


def router_routes(routers: Mapping[str, FrrRouter], prefixes: Iterable[str],
                  owner_of: Callable[[str], str | None]) -> tuple[RouterRoute, ...]:
    """Each router's kernel route to each prefix, every next hop named by the node holding it."""
    return tuple(RouterRoute(name, prefix, tuple(sorted((hop, owner_of(hop) or "?")
                                                        for hop in read_nexthops(router.ns, prefix))))
                 for name, router in routers.items() for prefix in prefixes)


def pop_verdicts(pops: Mapping[str, PopNode]) -> tuple[PopVerdict, ...]:
    verdicts = []
    for name, node in pops.items():
        data = pop_status(node)
        verdicts.append(PopVerdict(name, str(data.get("state", "unreachable")),
                                   str(data.get("last_change_reason") or "")))
    return tuple(verdicts)


def pop_status(node: PopNode, timeout: float = 2.0) -> dict[str, Any]:
    """GET /status of a PoP's engine, in-process through a socket in its namespace.

    Cheaper than ``PopNode.status()`` (no interpreter started per request), which matters
    while polling during bring-up. ``{}`` when the engine does not answer.
    """
    with node.ns.enter():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with sock:
            sock.settimeout(timeout)
            sock.connect(("127.0.0.1", node.status_port))
            conn = http.client.HTTPConnection("127.0.0.1", node.status_port, timeout=timeout)
            conn.sock = sock
            try:
                conn.request("GET", "/status")
                response = conn.getresponse()
                data: dict[str, Any] = json.loads(response.read()) if response.status == 200 else {}
            finally:
                conn.close()
            return data
    except (OSError, ValueError, http.client.HTTPException):
        return {}


def log_tails(pops: Mapping[str, PopNode], routers: Mapping[str, FrrRouter], lines: int = 15) -> str:
    parts = [f"--- {name} ---\n{node.log_tail(lines)}" for name, node in pops.items()]
    parts += [f"--- {name} bgpd ---\n{router.log_tail('bgpd', lines)}" for name, router in routers.items()]
    return "\n".join(parts)
