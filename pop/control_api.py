"""The state-changing endpoints: POST /v1/drain, /v1/undrain, /v1/servers/{name}/{drain|undrain}
(and the same paths without /v1, kept as aliases).

Every request goes through the same steps, and every attempt lands in the audit trail
(pop.audit) and the `pop_control_requests_total` counter, whatever its outcome:

1. no `control.token_file` configured: 403, saying how to enable control;
2. no or a wrong `Authorization: Bearer` token: 401 with `WWW-Authenticate: Bearer`; the
   body of an unauthenticated client is never read;
3. the body: larger than 16 KiB: 413; not complete within `BODY_TIMEOUT`: 408; not what an
   action takes (pop.control.parse_body; `until` is for a PoP drain only): 400 naming the problem;
4. the action: an unknown server is 404; an undrain while the disable file exists is 409;
   otherwise it is done (200).

Nothing changes unless all four pass. A slow or oversized client costs one connection, never
the event loop: the engine's probes keep their schedule (tests/unit/test_control_process.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from pop import audit, control
from pop.audit import AuditTrail
from pop.ladder import DrainHeld

BODY_TIMEOUT = 3.0  # seconds for a body to arrive in full
LINGER = 1.0  # seconds aiohttp keeps reading what a refused client still sends before closing


class Operator(Protocol):
    """The operator actions the endpoints expose (the engine implements them)."""

    def drain(self, reason: str = ..., until: float | None = ...) -> None: ...
    def undrain(self, reason: str = ...) -> None: ...
    def drain_server(self, server: str) -> None: ...
    def undrain_server(self, server: str) -> None: ...


@dataclass
class Control:
    """What the endpoints need: the PoP's name, the tokens (replaced on reload), the trail."""

    pop: str
    tokens: tuple[bytes, ...]
    trail: AuditTrail = field(default_factory=lambda: AuditTrail(None))
    wall: Callable[[], float] = time.time


class _Refused(Exception):
    def __init__(self, status: int, result: str, error: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status, self.result, self.error, self.headers = status, result, error, headers or {}


Answer = Callable[[], dict[str, Any]]  # the action's JSON answer, built after it is done


def add_routes(app: web.Application, ctl: Control, operator: Operator, status: Callable[[], dict[str, Any]]) -> None:
    """Add the POST endpoints; ``status()`` is the PoP's /status, for the answers."""

    def pop_action(action: str) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            def act(ask: control.ActionRequest) -> Answer:
                if action == "drain":
                    operator.drain(_why("maintenance" if ask.until else "operator drain", ask), ask.until)
                else:
                    _no_until(ask)
                    try:
                        operator.undrain(_why("operator undrain", ask))
                    except DrainHeld as exc:
                        raise _Refused(409, "conflict", str(exc)) from None
                return lambda: {"drained": action == "drain", **{k: v for k, v in status().items()
                                                                   if k in ("state", "ladder")}}

            return await _attempt(ctl, request, action, ctl.pop, act)

        return handler

    async def server_action(request: web.Request) -> web.Response:
        name, action = request.match_info["name"], request.match_info["action"]

        def act(ask: control.ActionRequest) -> Answer:
            _no_until(ask)
            try:
                (operator.drain_server if action == "drain" else operator.undrain_server)(name)
            except KeyError:
                raise _Refused(404, "not-found", f"no server named {name!r}") from None
            return lambda: {"server": name,
                            "drain": next(s["drain"] for s in status()["servers"] if s["name"] == name)}

        return await _attempt(ctl, request, f"{action}-server", name, act)

    for prefix in ("/v1", ""):  # the paths without /v1 are kept for the tools written before it
        app.router.add_post(f"{prefix}/drain", pop_action("drain"))
        app.router.add_post(f"{prefix}/undrain", pop_action("undrain"))
        app.router.add_post(prefix + r"/servers/{name}/{action:drain|undrain}", server_action)


async def _attempt(ctl: Control, request: web.Request, action: str, target: str,
                   act: Callable[[control.ActionRequest], Answer]) -> web.Response:
    ask = control.ActionRequest()
    try:
        if not ctl.tokens:
            raise _Refused(403, "forbidden", "HTTP control is disabled on this PoP: set control.token_file in its "
                                             "configuration to a 0600 file holding a token, then reload")
        if not control.authorized(request.headers.get("Authorization"), ctl.tokens):
            raise _Refused(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer <token "
                                                "from control.token_file>)", {"WWW-Authenticate": "Bearer"})
        try:
            ask = control.parse_body(await _body(request), ctl.wall())
        except control.BodyError as exc:
            raise _Refused(400, "bad-request", str(exc)) from None
        answer = act(ask)
    except _Refused as refused:
        _record(ctl, request, action=action, target=target, ask=ask, result=refused.result, status=refused.status)
        return web.json_response({"error": refused.error}, status=refused.status, headers=refused.headers)
    _record(ctl, request, action=action, target=target, ask=ask, result="accepted", status=200)
    return web.json_response(answer())


async def _body(request: web.Request) -> bytes:
    """The whole body, at most MAX_BODY bytes, within BODY_TIMEOUT."""
    too_large = _Refused(413, "too-large", f"body: larger than {control.MAX_BODY} bytes")
    if (request.content_length or 0) > control.MAX_BODY:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            while chunk := await request.content.read(4096):
                size += len(chunk)
                if size > control.MAX_BODY:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise _Refused(408, "timeout", f"body: not complete within {BODY_TIMEOUT:g} s") from None
    return b"".join(chunks)


def _no_until(ask: control.ActionRequest) -> None:
    if ask.until is not None:
        raise _Refused(400, "bad-request", "body.until: only for a PoP drain (POST /drain): a maintenance")


def _why(what: str, ask: control.ActionRequest) -> str:
    return f"{what} by {ask.who}" + (f": {ask.reason}" if ask.reason else "")


def _record(ctl: Control, request: web.Request, *, action: str, target: str, ask: control.ActionRequest,
            result: str, status: int) -> None:
    ctl.trail.append(audit.Entry(audit.iso(ctl.wall()), action, target[:100], ask.who, request.remote or "",
                                 ask.reason, result, status, "" if ask.until is None else audit.iso(ask.until)))


class ControlCollector(Collector):
    """pop_control_requests_total{pop,action,result}, since the engine started."""

    def __init__(self, ctl: Control) -> None:
        self.ctl = ctl

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("pop_control_requests", "operator action attempts by outcome",
                                       labels=["pop", "action", "result"])
        for (action, result), count in sorted(self.ctl.trail.counts.items()):
            requests.add_metric([self.ctl.pop, action, result], float(count))
        yield requests
