"""`pop noc -c noc.yaml`: one page over many PoPs, for the NOC.

It pulls every PoP's `/v1/status` (falling back to `/status` on a PoP that predates /v1) every
`interval` seconds, each request bounded by `timeout`, and serves:

- `GET /`: the fleet page. Which PoPs announce which prefixes; per PoP its state, why, who
  drained it (and until when); what is red and why; the recent transitions across the fleet.
  A PoP that does not answer is shown grey with the last error and when it last answered:
  the page never waits for it and never hides it.
- `GET /v1/fleet`: the same as JSON (what the page shows, for automation).
- `GET /healthz`: 200 while the poller runs.

Why the PoPs' own API and not Prometheus: the page must answer "why" (the verdict's reason,
the operator who drained, the transitions), which the API carries and metrics do not, and it
must work where there is no Prometheus; Prometheus is for history and alerts (docs/alerts.yml).

`load(text, source)` and `fleet(...)`/`render(...)` are pure; `Noc` holds the state and the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from pop.config_reader import U16, ConfigError, Reader, join, parse_yaml

log = logging.getLogger("pop.noc")

_TOP = {"listen", "port", "interval", "timeout", "pops"}
_MAX_BODY = 4 * 1024 * 1024  # a PoP's /v1/status with thousands of servers stays well below
RED = {"withdrawn", "hold-down", "guarded"}
_COLORS = {"announced": "#1a7f37", "degraded": "#bf8700", "draining": "#bf8700", "hold-down": "#cf222e",
           "withdrawn": "#cf222e", "guarded": "#cf222e",
           "drained": "#6e7781", "no answer": "#6e7781"}


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    url: str  # http://host:port of the PoP's status endpoint


@dataclass(frozen=True, slots=True)
class NocConfig:
    pops: tuple[Target, ...]
    listen: str = "127.0.0.1"
    port: int = 9300
    interval: float = 2.0
    timeout: float = 1.0


def load(text: str | bytes, source: str = "noc.yaml") -> NocConfig:
    """Parse noc.yaml; ConfigError lists every problem as `noc.yaml: pops[1].url: ...`."""
    document = parse_yaml(text, source)
    r = Reader(source)
    top = r.mapping(document, "", _TOP) if document is not None else None
    if top is None:
        raise ConfigError(r.problems or [f"{source}: (top level): the file is empty"])
    pops: list[Target] = []
    items = r.need(top, "pops", "", r.sequence) or []
    if not items and "pops" in top:
        r.error("pops", "at least one PoP is required")
    for index, item in enumerate(items):
        path = join("pops", index)
        data = r.mapping(item, path, {"name", "url"})
        if data is None:
            continue
        name = r.need(data, "name", path, r.name)
        url = r.need(data, "url", path, lambda v, p: _url(r, v, p))
        if name is not None and any(t.name == name for t in pops):
            r.error(join(path, "name"), f"{name!r} is listed twice")
        elif name is not None and url is not None:
            pops.append(Target(name, url))
    default = NocConfig(pops=())
    config = NocConfig(
        pops=tuple(pops),
        listen=r.optional(top, "listen", "", r.address, default.listen),
        port=r.optional(top, "port", "", lambda v, p: r.integer(v, p, 0, U16), default.port),
        interval=r.optional(top, "interval", "", lambda v, p: r.number(v, p, 0.0, 3600.0, low_open=True),
                            default.interval),
        timeout=r.optional(top, "timeout", "", lambda v, p: r.number(v, p, 0.0, 60.0, low_open=True),
                           default.timeout),
    )
    if r.problems:
        raise ConfigError(r.problems)
    return config


def _url(r: Reader, value: Any, path: str) -> str | None:
    text = r.string(value, path)
    if text is None:
        return None
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment:
        r.error(path, f"{text!r} is not http(s)://host:port of a PoP's status endpoint")
        return None
    return text.rstrip("/")


# --- what the page shows (pure) ------------------------------------------------------------


@dataclass
class Seen:
    """The last answer of one PoP and when; `error` while it does not answer."""

    status: Mapping[str, Any] | None = None
    at: float | None = None  # wall clock of the last good answer
    error: str | None = None
    tried: float | None = None


@dataclass
class FleetState:
    seen: dict[str, Seen] = field(default_factory=dict)


def fleet(targets: tuple[Target, ...], state: FleetState, now: float) -> dict[str, Any]:
    """The fleet as the page shows it: per PoP, per prefix, what is red, the transitions."""
    pops = []
    prefixes: dict[str, list[str]] = {}
    transitions = []
    for target in targets:
        seen = state.seen.get(target.name, Seen())
        status = seen.status or {}
        answering = seen.error is None and seen.status is not None
        announced = [a["prefix"] for a in (status.get("bgp") or {}).get("announced", [])]
        for prefix in announced if answering else []:
            prefixes.setdefault(prefix, []).append(target.name)
        drain = _drain(status)
        pops.append({
            "name": target.name, "url": target.url, "answering": answering,
            "state": str(status.get("state", "unknown")) if answering else "no answer",
            "reason": status.get("reason") if answering else seen.error,
            "announced": announced if answering else [],
            "last_change_by": status.get("last_change_by"),
            "since_seconds": status.get("since_seconds"),
            "pool": status.get("pool"), "drain": drain,
            "external": (status.get("external") or {}).get("reason"),
            "guard": _guard(status),
            "last_answer_seconds": None if seen.at is None else round(now - seen.at, 1),
        })
        for event in status.get("events", [])[:20]:
            if event.get("kind") == "pop" or event.get("subject") == status.get("pop"):
                transitions.append({"pop": target.name, "time": event.get("time"), "from": event.get("from"),
                                    "to": event.get("to"), "reason": event.get("reason")})
    transitions.sort(key=lambda t: t["time"] or 0.0, reverse=True)
    red = [p for p in pops if p["state"] in RED or not p["answering"]]
    return {"generated_at": now, "pops": pops, "prefixes": prefixes, "red": [p["name"] for p in red],
            "announcing": sum(1 for p in pops if p["announced"]), "transitions": transitions[:30]}


def _guard(status: Mapping[str, Any]) -> str | None:
    """Why the fleet guard holds the PoP (or let it leave), if it does."""
    shown = status.get("fleet") or {}
    if not shown.get("holding"):
        return None
    return f"held by the fleet guard: {shown.get('reason')}"


def _drain(status: Mapping[str, Any]) -> dict[str, Any] | None:
    """Who drained the PoP, why, until when and how far its ladder is: from its audit trail
    (newest first: the last accepted drain of the PoP itself, not of one of its servers) and
    its ladder (pop.ladder)."""
    ladder = status.get("ladder") or {}
    if not status.get("drained") and not ladder:
        return None
    found: dict[str, Any] = {"who": None, "reason": status.get("reason"), "at": None, "until": None}
    for entry in status.get("audit", []):
        if entry.get("action") == "drain" and entry.get("result") == "accepted" \
                and entry.get("target") == status.get("pop"):
            found = {"who": entry.get("who"), "reason": entry.get("reason"), "at": entry.get("time"),
                     "until": entry.get("until")}
            break
    if ladder.get("until") is not None:
        found["until"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ladder["until"]))
    if ladder:
        found["step"] = f"step {ladder.get('step')}/{ladder.get('steps')}: {ladder.get('current')}"
        if ladder.get("source") and not found["who"]:
            found["who"] = ladder.get("source")
    return found


def render(view: Mapping[str, Any]) -> str:
    """The fleet page: red first; every value from a PoP is escaped."""
    e = html.escape

    def cell(value: Any) -> str:
        return e("" if value is None else str(value))

    rows = []
    for pop in sorted(view["pops"], key=lambda p: (p["state"] not in RED and p["answering"], p["name"])):
        color = _COLORS.get(pop["state"], "#1f2328")
        drain = pop["drain"]
        drained = "" if drain is None else (
            f"{'draining' if pop['state'] == 'draining' else 'drained'} by {cell(drain['who'] or 'unknown')}"
            + (f" ({cell(drain['step'])})" if drain.get("step") else "")
            + (f": {cell(drain['reason'])}" if drain.get("reason") else "")
            + (f", until {cell(drain['until'])}" if drain.get("until") else ", until undrained"))
        answered = "" if pop["answering"] else (
            f" (last answer {cell(pop['last_answer_seconds'])} s ago)" if pop["last_answer_seconds"] is not None
            else " (never answered)")
        rows.append(
            f'<tr class="pop {"red" if pop["state"] in RED or not pop["answering"] else "ok"}" '
            f'data-pop="{cell(pop["name"])}" data-state="{cell(pop["state"])}">'
            f'<td><a href="{cell(pop["url"])}/">{cell(pop["name"])}</a></td>'
            f'<td style="color:{color};font-weight:bold">{cell(pop["state"])}</td>'
            f"<td>{cell(', '.join(pop['announced']) or '-')}</td>"
            f'<td class="why">{cell(pop["reason"])}{answered}'
            + (f'<br><b class="guard">{cell(pop["guard"])}</b>' if pop.get("guard") else "") + "</td>"
            f'<td class="drain">{drained}</td>'
            f"<td>{cell(pop['external'] or '')}</td></tr>")
    prefixes = "".join(f"<li>{cell(prefix)}: {cell(', '.join(names))}</li>"
                       for prefix, names in sorted(view["prefixes"].items()))
    transitions = "".join(
        f"<tr><td>{cell(time.strftime('%H:%M:%S', time.gmtime(t['time'])) if t['time'] else '')}</td>"
        f"<td>{cell(t['pop'])}</td><td>{cell(t['from'])} &rarr; {cell(t['to'])}</td><td>{cell(t['reason'])}</td></tr>"
        for t in view["transitions"])
    red = ", ".join(e(name) for name in view["red"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="2"><title>pop fleet</title>
<style>body{{font-family:sans-serif;margin:1.5em}} td,th{{padding:.3em .8em;text-align:left}}
tr.red{{background:#ffebe9}}</style></head><body>
<h1>Fleet: {view['announcing']}/{len(view['pops'])} PoPs announcing</h1>
<p class="summary">{f'<b style="color:#cf222e">Red: {red}</b>' if red else 'Nothing is red.'}</p>
<table><tr><th>PoP</th><th>state</th><th>announces</th><th>why</th><th>drain</th><th>from outside</th></tr>
{''.join(rows)}</table>
<h2>Prefixes</h2><ul>{prefixes or '<li>no PoP announces anything</li>'}</ul>
<h2>Recent transitions</h2><table><tr><th>UTC</th><th>PoP</th><th>change</th><th>why</th></tr>{transitions}</table>
</body></html>"""


# --- the daemon ----------------------------------------------------------------------------


class Noc:
    def __init__(self, config: NocConfig) -> None:
        self.config = config
        self.state = FleetState({t.name: Seen() for t in config.pops})
        self.port: int | None = None

    def view(self) -> dict[str, Any]:
        return fleet(self.config.pops, self.state, time.time())

    async def poll(self, http: aiohttp.ClientSession, target: Target) -> None:
        seen = self.state.seen[target.name]
        seen.tried = time.time()
        try:
            async with asyncio.timeout(self.config.timeout):
                status = await _get(http, target.url + "/v1/status")
                if status is None:  # a PoP without /v1
                    status = await _get(http, target.url + "/status")
            if not isinstance(status, dict) or "state" not in status:
                raise ValueError("the answer is not a PoP status")
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
            error = "timeout" if isinstance(exc, TimeoutError) else (str(exc) or type(exc).__name__)
            if seen.error != error:
                log.warning("noc.unreachable pop=%s url=%s error=%s", target.name, target.url, error)
            seen.error = error
            return
        if seen.error is not None:
            log.info("noc.answers pop=%s", target.name)
        seen.status, seen.at, seen.error = status, time.time(), None

    async def _loop(self) -> None:
        async with aiohttp.ClientSession() as http:
            while True:
                started = time.monotonic()
                await asyncio.gather(*(self.poll(http, t) for t in self.config.pops))
                await asyncio.sleep(max(0.0, started + self.config.interval - time.monotonic()))

    @asynccontextmanager
    async def serving(self, sock: socket.socket | None = None) -> AsyncIterator[Noc]:
        async def page(_request: web.Request) -> web.Response:
            return web.Response(text=render(self.view()), content_type="text/html")

        async def fleet_json(_request: web.Request) -> web.Response:
            return web.json_response(self.view())

        async def healthz(_request: web.Request) -> web.Response:
            return web.json_response({"ok": True, "pops": len(self.config.pops)})

        app = web.Application()
        app.router.add_get("/", page)
        app.router.add_get("/v1/fleet", fleet_json)
        app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        loop = asyncio.create_task(self._loop(), name="noc poller")
        try:
            site: web.BaseSite = (web.SockSite(runner, sock) if sock is not None
                                  else web.TCPSite(runner, self.config.listen, self.config.port))
            await site.start()
            self.port = int(runner.addresses[0][1])
            log.info("noc.start listen=%s pops=%d", runner.addresses[0], len(self.config.pops))
            yield self
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
            await runner.cleanup()


async def _get(http: aiohttp.ClientSession, url: str) -> Any:
    """The decoded JSON at url; None for a 404 (the endpoint does not exist there)."""
    async with http.get(url) as response:
        if response.status == 404:
            return None
        if response.status != 200:
            raise ValueError(f"HTTP {response.status}")
        body = await response.content.read(_MAX_BODY + 1)
        if len(body) > _MAX_BODY:
            raise ValueError(f"answer larger than {_MAX_BODY} bytes")
        return json.loads(body)


async def run(noc: Noc, sock: socket.socket | None = None) -> None:
    async with noc.serving(sock):
        await asyncio.Event().wait()
