"""What operators see: the /v1 API (JSON), / (the NOC page), /metrics (Prometheus), /healthz.

Everything here reads an immutable `Snapshot`; nothing here changes a decision. The GETs are
open (read-only); the operator actions (POST /v1/drain, /v1/undrain,
/v1/servers/{name}/{drain|undrain}, and the same without /v1) need a bearer token and are
audited: pop/control_api.py. docs/api.md describes every endpoint.

"Why is this PoP withdrawn?" is answered by `verdict.reason` plus the recent `events`, each
of which names the server, the tier and the evidence that moved it.

The status is built at most every `REFRESH` seconds and shared by every reader in between
(any event or operator action makes the next read fresh): with a thousand servers, building
it takes milliseconds of the event loop that also runs the probes, and fifty pollers must not
multiply that.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import math
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from pop import control, control_api
from pop.control_api import Control, Operator
from pop.metrics import Availability, PopCollector
from pop.snapshot import ServerSnapshot, Snapshot
from pop.tails import Tail

log = logging.getLogger("pop.status")

API = 1  # the "api" field of every /v1 answer; raised only for an incompatible change
MAX_AGE = 1.0  # seconds a built status is shared between readers (an event makes the next read fresh)
REFRESH = 0.5  # from this age on, a read starts the next build (50-100 ms of CPU at 1,000 servers, in slices)
AGE_HEADER = "Pop-Status-Age"  # seconds since the shared status's snapshot was taken
SLICE = 10  # servers pictured, built and encoded between two turns of the event loop (~1 ms; 50 held it 5-6 ms)
SnapshotSource = Callable[[], Snapshot]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Ready = Callable[[], str]  # "" while the engine serves, else why not (GET /healthz)


def to_json(snap: Snapshot, servers: Any = None) -> dict[str, Any]:
    """The status; ``servers`` stands in for servers_json(snap) when given (the shared status
    builds that part a slice at a time)."""
    now_wall = time.time()

    def ago(t: float) -> float:
        return round(snap.at - t, 3)

    return {
        "pop": snap.pop,
        "uptime_seconds": round(snap.at - snap.started, 3),
        "announced": snap.verdict.announce,
        "state": _pop_state(snap),
        "reason": snap.verdict.reason,
        "last_change_reason": snap.verdict.cause or None,
        "last_change_by": snap.verdict.decided_by or None,
        "since_seconds": ago(snap.verdict.since) if snap.verdict.changes else None,
        "hold_down_remaining": (round(max(0.0, snap.verdict.hold_down_until - snap.at), 3)
                                if snap.verdict.hold_down_until is not None else None),
        "drained": snap.verdict.drained,
        "dampening": snap.dampening,
        "fleet": snap.fleet,
        "ladder": snap.ladder,
        "pool": {"healthy": snap.pool.healthy, "total": snap.pool.total,
                 "fraction": round(snap.pool.fraction, 4)},
        "servers": servers_json(snap) if servers is None else servers,
        "schedule": _schedule(snap),
        "external": snap.external,
        "reloads": snap.extra.get("reloads", {"ok": 0, "refused": 0}),
        "apply": _apply(snap),
        "dataplane": {**_dataplane(snap), "diagnostics": snap.extra.get("dataplane")},
        "bgp": {
            "desired": [_announcement(a) for a in snap.desired],
            "announced": [_announcement(a) for a in snap.announced],
            **{k: v for k, v in snap.extra.items() if k not in ("dataplane", "reloads")},
        },
        "events": [
            {"time": round(e.wall, 3), "ago_seconds": round(now_wall - e.wall, 3), "kind": e.kind,
             "subject": e.subject, "from": e.old, "to": e.new, "reason": e.reason}
            for e in reversed(snap.events)
        ],
    }


def servers_json(snap: Snapshot, first: int = 0, end: int | None = None) -> list[dict[str, Any]]:
    """The servers part of /v1/status (most of it: 1,000 servers are ~0.8 MB), or the slice
    [first:end] of it."""
    return [_server_dict(s, snap.at) for s in snap.servers[first:end]]


def _server_dict(s: ServerSnapshot, at: float) -> dict[str, Any]:
    def ago(t: float) -> float:
        return round(at - t, 3)

    return {
        "name": s.name,
        "address": s.address,
        "weight": s.weight,
        "state": s.health.state.value,
        "in_pool": s.health.in_pool and s.drain is None,
        "drain": None if s.drain is None else {
            "state": "drained" if s.drain.done else "draining", "since_seconds": ago(s.drain.since),
            "reason": s.drain.reason},
        "decided_by": s.health.tier or None,
        "reason": s.health.reason,
        "tiers": {
            name: {
                "state": t.state.value,
                "since_seconds": ago(t.since),
                "streak": t.streak,
                "reason": t.reason,
                "last": None if t.last is None else {
                    "ok": t.last.ok, "error": t.last.error or None, "definitive": t.last.definitive,
                    "latency_ms": None if t.last.latency is None else round(t.last.latency * 1000, 3),
                    "detail": t.last.detail or None,
                },
                "successes": t.successes,
                "failures": t.failures,
            }
            for name, t in s.tiers.items()
        },
        "tails": {tier: _tail(t) for tier, t in s.tails.items()},
        "degraded": s.degraded or None,
        "load_factor": round(s.factor, 4),
        "load": s.load,
    }


def servers_text(snap: Snapshot, first: int = 0, end: int | None = None) -> str:
    """servers_json's slice as JSON text, `json.dumps(servers_json(...), separators=(",", ":"))`
    without its brackets, written directly: the dicts and their pass through json.dumps were
    ~38 of the ~40 µs a server's part cost, twice a second for every server while the status is
    read (issue 10). tests/unit/test_status_text.py holds the two to the same bytes."""
    at = snap.at
    return ",".join([_server_text(s, at) for s in snap.servers[first:end]])


def _server_text(s: ServerSnapshot, at: float) -> str:
    """One server's JSON; numbers are written by repr(), which is what json.dumps writes for
    an int and a finite float (every float here comes out of round(): an int or a float). A
    server with a number that is not finite is written by json.dumps itself."""
    health, drain, q = s.health, s.drain, _q
    numbers = [factor := round(s.factor, 4)]
    tiers = []
    for name, t in s.tiers.items():
        since, last = round(at - t.since, 3), t.last
        numbers.append(since)
        if last is None:
            seen = "null"
        else:
            latency = "null" if last.latency is None else repr(_counted(numbers, round(last.latency * 1000, 3)))
            seen = (f'{{"ok":{"true" if last.ok else "false"},"error":{q(last.error) if last.error else "null"},'
                    f'"definitive":{"true" if last.definitive else "false"},"latency_ms":{latency},'
                    f'"detail":{q(last.detail) if last.detail else "null"}}}')
        tiers.append(f'{q(name)}:{{"state":{q(t.state.value)},"since_seconds":{since!r},"streak":{t.streak!r},'
                     f'"reason":{q(t.reason)},"last":{seen},"successes":{t.successes!r},"failures":{t.failures!r}}}')
    tails = []
    for tier, tail in s.tails.items():
        rate = round(tail.failure_rate, 4)
        numbers.append(rate)
        p50, p95, p99 = ("null" if v is None else repr(_counted(numbers, round(v * 1000, 3)))
                         for v in (tail.p50, tail.p95, tail.p99))
        tails.append(f'{q(tier)}:{{"count":{tail.count!r},"failures":{tail.failures!r},"failure_rate":{rate!r},'
                     f'"p50_ms":{p50},"p95_ms":{p95},"p99_ms":{p99}}}')
    if drain is None:
        drained = "null"
    else:
        since = _counted(numbers, round(at - drain.since, 3))
        drained = (f'{{"state":{_DRAINED if drain.done else _DRAINING},"since_seconds":{since!r},'
                   f'"reason":{q(drain.reason)}}}')
    if not math.isfinite(sum(numbers)):  # an infinity or a NaN among them (or a sum past the largest float)
        return json.dumps(_server_dict(s, at), separators=(",", ":"))
    return (f'{{"name":{q(s.name)},"address":{q(s.address)},"weight":{s.weight!r},'
            f'"state":{q(health.state.value)},"in_pool":{"true" if health.in_pool and drain is None else "false"},'
            f'"drain":{drained},"decided_by":{q(health.tier) if health.tier else "null"},'
            f'"reason":{q(health.reason)},"tiers":{{{",".join(tiers)}}},"tails":{{{",".join(tails)}}},'
            f'"degraded":{q(s.degraded) if s.degraded else "null"},"load_factor":{factor!r},'
            f'"load":{"null" if s.load is None else json.dumps(s.load, separators=(",", ":"))}}}')


def _counted(numbers: list[float], value: float) -> float:
    numbers.append(value)
    return value


_q: Callable[[str], str] = json.encoder.encode_basestring_ascii  # a string as json.dumps writes it
_DRAINED, _DRAINING = '"drained"', '"draining"'


def _tail(t: Tail) -> dict[str, Any]:
    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 3)

    return {"count": t.count, "failures": t.failures, "failure_rate": round(t.failure_rate, 4),
            "p50_ms": ms(t.p50), "p95_ms": ms(t.p95), "p99_ms": ms(t.p99)}


def _apply(snap: Snapshot) -> dict[str, Any]:
    """Whether what was decided is also what the session and the kernel hold (pop.applier)."""
    a = snap.apply
    return {"ok": not (a.bgp_error or a.dataplane_error), "bgp_error": a.bgp_error or None,
            "dataplane_error": a.dataplane_error or None,
            "retry_in_seconds": None if a.retry_at is None else round(max(0.0, a.retry_at - snap.at), 3),
            "bgp_failures": a.bgp_failures, "dataplane_failures": a.dataplane_failures,
            "repairs": a.repairs, "last_repair": a.last_repair or None,
            "teardown_in_seconds": None if a.dwell_until is None else round(max(0.0, a.dwell_until - snap.at), 3)}


def _dataplane(snap: Snapshot) -> dict[str, Any]:
    """The data plane as last applied in full."""
    applied = snap.apply.applied
    return {"vips": list(applied.vips),
            "routes": [{"prefix": r.prefix, "nexthops": [f"{h.address}*{h.weight}" for h in r.nexthops]}
                       for r in applied.routes],
            "services": [{"service": f"{s.protocol}/{s.address}:{s.port}",
                          "reals": [f"{x.address}:{x.port}*{x.weight}" for x in s.reals]} for s in applied.services],
            "pins": list(applied.pins)}


def _schedule(snap: Snapshot) -> dict[str, Any] | None:
    """Whether the probes keep their schedule (pop.stretch): stretched while the engine cannot."""
    s = snap.schedule
    if s is None:
        return None
    return {"behind": s.behind, "stretch": round(s.stretch, 3), "window_probes": s.window.probes,
            "lateness_p50_ms": round(s.window.p50 * 1000, 3), "lateness_p99_ms": round(s.window.p99 * 1000, 3),
            "busy": s.window.busy}


def _pop_state(snap: Snapshot) -> str:
    if snap.verdict.drained:
        return "drained"
    if snap.ladder is not None:
        return "draining"
    if snap.verdict.announce:
        return "degraded" if snap.degraded else "announced"
    if snap.fleet is not None and snap.fleet["holding"]:
        return "guarded"  # the verdict withdraws; the fleet guard keeps it announced, de-preferenced
    if snap.verdict.hold_down_until is not None and snap.verdict.hold_down_until > snap.at:
        return "hold-down"  # past it, only tier 3 or flap dampening holds the PoP: withdrawn, with their reason
    return "withdrawn"


def _announcement(a: Any) -> dict[str, Any]:
    return {"prefix": a.prefix, "next_hop": a.next_hop, "med": a.med, "local_pref": a.local_pref,
            "communities": list(a.communities), "large_communities": list(a.large_communities),
            "as_path_prepend": a.as_path_prepend}


_SERVERS = "\u0000servers\u0000"  # where the servers' JSON goes into the rest (no config text has a NUL)


class _Shared:
    """The status as last built, shared by every reader for MAX_AGE seconds (monotonic).

    A status is never served older than MAX_AGE, nor once the engine recorded an event after it
    was built (a withdrawal, a server's change) or what the session or the kernel holds changed
    (`revision`: Engine.status_revision). Once it is REFRESH old the next reader
    starts a rebuild and is sent the current bytes meanwhile, so under steady reading nobody
    waits for a build; a reader after a quiet spell (older than MAX_AGE), the first one, and
    the first after an operator action (`forget()`) wait for a fresh one. The snapshot is taken
    on the event loop (~1 ms at 1,000 servers: each server's picture is made by its slice,
    pop.snapshot.Servers); the servers' pictures, their JSON and a gzip copy are made on the
    loop too, SLICE servers at a time with a turn of the loop in between (`_render`), so the
    probes wait for a slice (about a millisecond) instead of the 50-100 ms of CPU the whole
    build takes with 1,000 servers; a reader that accepts gzip is sent a tenth of the bytes.
    """

    def __init__(self, snapshot: Callable[[], Snapshot], rest: Callable[[Snapshot, Any], dict[str, Any]],
                 clock: Callable[[], float] = time.monotonic, revision: Callable[[], int] = lambda: 0) -> None:
        self.snapshot, self.rest, self.clock, self.revision = snapshot, rest, clock, revision
        self.seen = revision()  # the engine's revision when the shared status was built
        self.at = -1e9  # when the snapshot of `built` was taken; -1e9: none since the last forget()
        self.built: tuple[Mapping[str, Any], bytes, bytes] | None = None  # data, body, gzip'd body
        self.building: asyncio.Future[None] | None = None
        self.forgotten = 0  # forget() calls: a build started before one is not fresh after it

    async def get(self) -> tuple[Mapping[str, Any], bytes, bytes]:
        if self.revision() != self.seen:  # something changed since: the verdict, a server, a step
            self.seen = self.revision()
            self.forget()
        while True:
            age = self.clock() - self.at
            if self.building is None and age >= REFRESH:
                self.building = asyncio.ensure_future(self._build())
                self.building.add_done_callback(self._built)
            if self.built is not None and age < MAX_AGE:
                return self.built
            assert self.building is not None
            await asyncio.shield(self.building)

    async def _build(self) -> None:
        at, forgotten = self.clock(), self.forgotten
        snap = self.snapshot()
        rest = self.rest(snap, _SERVERS)
        head = json.dumps(rest, separators=(",", ":"))
        self.built = await _render(snap, rest, head)
        self.at = at if forgotten == self.forgotten else -1e9

    def age(self) -> float:
        """How old the status get() just returned is, in seconds (the AGE_HEADER's value)."""
        return max(0.0, self.clock() - self.at)

    def _built(self, done: asyncio.Future[None]) -> None:
        self.building = None
        if not done.cancelled() and done.exception() is not None:
            log.error("status.build_failed error=%r", done.exception())

    def forget(self) -> None:
        self.forgotten += 1
        self.at = -1e9


async def _render(snap: Snapshot, rest: dict[str, Any], head: str) -> tuple[Mapping[str, Any], bytes, bytes]:
    """The servers' JSON spliced into the rest, and its gzip copy, SLICE servers at a time
    with a turn of the event loop after each slice.

    Not in a worker thread: that thread takes the GIL whenever the loop's thread releases it
    for a system call, and the probes make thousands a second, each then waiting up to the
    switch interval to go on (a convoy: with 50 clients reading a 1,000-server status, probes
    started up to 200 ms late, issue 10)."""
    before, after = head.encode().split(json.dumps(_SERVERS).encode(), 1)
    packer = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip framing, as gzip.compress level 1
    servers, packed = [b"["], [packer.compress(before + b"[")]
    for first in range(0, len(snap.servers), SLICE):
        await asyncio.sleep(0)  # the probes' turn, also between the snapshot with the rest and the first slice
        if first:
            servers.append(b",")
            packed.append(packer.compress(b","))
        encoded = servers_text(snap, first, first + SLICE).encode()
        servers.append(encoded)
        packed.append(packer.compress(encoded))
    servers.append(b"]")
    packed += [packer.compress(b"]" + after), packer.flush()]
    listed = b"".join(servers)
    return _Data(rest, listed), b"".join((before, listed, after)), b"".join(packed)


class _Data(Mapping[str, Any]):
    """A built status as values: the rest as built, the servers' list read back from their
    JSON when first asked for (?pretty and /v1/servers; every other reader is sent the bytes)."""

    __slots__ = ("_listed", "_rest", "_servers")

    def __init__(self, rest: dict[str, Any], listed: bytes) -> None:
        self._rest, self._listed = rest, listed
        self._servers: list[dict[str, Any]] | None = None

    def __getitem__(self, key: str) -> Any:
        if key != "servers":
            return self._rest[key]
        if self._servers is None:
            self._servers = json.loads(self._listed)
        return self._servers

    def __iter__(self) -> Iterator[str]:
        return iter(self._rest)  # its "servers" stands for the list, in its place

    def __len__(self) -> int:
        return len(self._rest)


def prebuilt(request: web.Request, body: bytes, packed: bytes, age: float) -> web.Response:
    """A built status as its reader accepts it: gzip'd (`packed`) or plain, with its age."""
    headers = {"Vary": "Accept-Encoding", AGE_HEADER: f"{age:.3f}"}
    if "gzip" in request.headers.get("Accept-Encoding", ""):
        return web.Response(body=packed, content_type="application/json",
                            headers={**headers, "Content-Encoding": "gzip"})
    return web.Response(body=body, content_type="application/json", headers=headers)


SHARED: web.AppKey[_Shared] = web.AppKey("shared", _Shared)  # the app's shared status (pop.readers feeds from it)


def make_app(source: SnapshotSource, operator: Operator, ctl: Control, *, ready: Ready = lambda: "",
             availability: Availability | None = None, revision: Callable[[], int] = lambda: 0) -> web.Application:
    """The endpoints; ``ready`` answers /healthz, ``availability`` is pop.availability.report now,
    ``revision`` changes with every event (a shared status built before it is not served)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PopCollector(source, _pop_state, availability))
    registry.register(control_api.ControlCollector(ctl))

    def rest(snap: Snapshot, servers: Any) -> dict[str, Any]:
        return {"api": API, **to_json(snap, servers), "audit": ctl.trail.recent(),
                "availability": None if availability is None else availability()}

    shared = _Shared(source, rest, revision=revision)

    def answer(data: Mapping[str, Any], request: web.Request) -> web.Response:
        return web.json_response(dict(data),
                                 dumps=lambda v: json.dumps(v, indent=2 if "pretty" in request.query else None),
                                 headers={AGE_HEADER: f"{shared.age():.3f}"})

    async def status(request: web.Request) -> web.Response:
        data, body, packed = await shared.get()
        if "pretty" in request.query:
            return answer(data, request)
        return prebuilt(request, body, packed, shared.age())

    async def servers(request: web.Request) -> web.Response:
        data, _, _ = await shared.get()
        return answer({"api": API, "pop": data["pop"], "servers": data["servers"]}, request)

    async def events(request: web.Request) -> web.Response:
        data, _, _ = await shared.get()
        return answer({"api": API, "pop": data["pop"], "events": data["events"], "audit": data["audit"]}, request)

    async def healthz(_request: web.Request) -> web.Response:
        why = ready()
        if why:
            return web.json_response({"ok": False, "reason": why}, status=503)
        return web.json_response({"ok": True})

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain", charset="utf-8")

    async def page(_request: web.Request) -> web.Response:
        data, _, _ = await shared.get()
        return web.Response(text=render_page(data), content_type="text/html")

    @web.middleware
    async def fresh_after_actions(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "POST":
            shared.forget()  # whoever acted reads what they did
        return await handler(request)

    # a refused client's unread body is drained for LINGER seconds at most, not aiohttp's 10
    app = web.Application(client_max_size=control.MAX_BODY, handler_args={"lingering_time": control_api.LINGER},
                          middlewares=[fresh_after_actions])
    app.router.add_get("/", page)
    for prefix in ("/v1", ""):  # the paths without /v1 are kept for the tools written before it
        app.router.add_get(f"{prefix}/status", status)
    app.router.add_get("/v1/servers", servers)
    app.router.add_get("/v1/events", events)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app[SHARED] = shared
    control_api.add_routes(app, ctl, operator, lambda: to_json(source()))
    return app


_COLORS = {"announced": "#1a7f37", "degraded": "#bf8700", "hold-down": "#bf8700", "withdrawn": "#cf222e",
           "guarded": "#cf222e",
           "drained": "#6e7781", "draining": "#bf8700", "up": "#1a7f37", "falling": "#bf8700", "rising": "#bf8700",
           "init": "#6e7781", "down": "#cf222e", "disabled": "#6e7781"}


def render_page(data: Mapping[str, Any]) -> str:
    """The NOC page: one glance answers "is this PoP announced, and if not, why?"."""
    e = html.escape

    def badge(state: str) -> str:
        return f'<span class="b" style="background:{_COLORS.get(state, "#6e7781")}">{e(state)}</span>'

    rows = []
    for s in data["servers"]:
        tiers = " ".join(
            f"{e(name)}: {badge(t['state'])} "
            + (f"{t['last']['latency_ms']} ms" if t["last"] and t["last"]["latency_ms"] is not None else "")
            for name, t in s["tiers"].items())
        rows.append(f"<tr><td>{e(s['name'])}</td><td>{e(s['address'])}</td><td>{badge(s['state'])}</td>"
                    f"<td>{tiers}</td><td>{e(s['reason'])}</td></tr>")
    events = "".join(
        f"<tr><td>{time.strftime('%H:%M:%S', time.gmtime(ev['time']))}</td><td>{e(ev['kind'])}</td>"
        f"<td>{e(ev['subject'])}</td><td>{e(ev['from'])} → {e(ev['to'])}</td><td>{e(ev['reason'])}</td></tr>"
        for ev in data["events"][:30])
    routes = "".join(f"<li><code>{e(a['prefix'])}</code> med={a['med']} prepend={a['as_path_prepend']} "
                     f"communities={e(' '.join(a['communities'])) or '-'}</li>" for a in data["bgp"]["announced"])
    peers = "".join(f"<li>{e(p)}: {badge(v)}</li>" for p, v in data["bgp"].get("sessions", {}).items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<title>pop {e(data['pop'])}: {e(data['state'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#1f2328}}
.b{{color:#fff;border-radius:4px;padding:1px 6px;font-size:90%}}
table{{border-collapse:collapse}}td,th{{padding:3px 10px;border-bottom:1px solid #d0d7de;text-align:left}}
h1 .b{{font-size:70%}}</style></head><body>
<h1>PoP {e(data['pop'])} {badge(data['state'])}</h1>
<p><b>Why:</b> {e(data['reason'])}</p>
<p>Last change: {e(data['last_change_reason'] or '-')}
{'' if data['since_seconds'] is None else f"({data['since_seconds']:.0f}s ago)"}</p>
{_ladder_line(data['ladder'])}
{_apply_line(data['apply'])}
{_external_line(data['external'])}
{_fleet_line(data.get('fleet'))}
<p>Pool: {data['pool']['healthy']}/{data['pool']['total']} healthy · up {data['uptime_seconds']:.0f}s</p>
{_availability_line(data.get("availability"))}
<h2>Announced</h2><ul>{routes or '<li>nothing</li>'}</ul>
<h2>BGP sessions</h2><ul>{peers or '<li>unknown</li>'}</ul>
<h2>Servers</h2><table><tr><th>server</th><th>address</th><th>state</th><th>tiers</th><th>reason</th></tr>
{''.join(rows)}</table>
<h2>Recent events (UTC)</h2><table><tr><th>time</th><th>kind</th><th>subject</th><th>change</th><th>reason</th></tr>
{events}</table>
{_audit_table(data.get("audit", []))}
</body></html>"""


def _ladder_line(drain: dict[str, Any] | None) -> str:
    """The drain ladder (pop.ladder): who and why, until when, the step in force and the next."""
    if drain is None:
        return ""
    e = html.escape
    until = "" if drain["until"] is None else (
        f" · until {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(drain['until']))} UTC "
        f"(in {drain['until_in_seconds']:.0f}s)")
    following = ("" if drain["next"] is None
                 else f" · next: {e(drain['next'])} in {drain['next_in_seconds']:.0f}s")
    early = "" if drain["finished_early"] is None else f" · finished early: {e(drain['finished_early'])}"
    return (f'<p id="ladder"><b>{e(drain["source"])}:</b> {e(drain["reason"])}{until}<br>'
            f'Step {drain["step"]}/{drain["steps"]}: {e(drain["current"])} '
            f'({drain["step_since_seconds"]:.0f}s){following}{early}<br>'
            f'Ladder: {e(" → ".join(drain["ladder"]))}</p>')


def _availability_line(report: dict[str, Any] | None) -> str:
    """Availability per window against the SLO, with the error budget left (red once spent)."""
    if report is None:
        return ""

    def one(name: str, w: dict[str, Any]) -> str:
        ratio = "-" if w["ratio"] is None else f"{w['ratio'] * 100:.3f} %"
        left = w["error_budget_remaining"]
        color = "#cf222e" if left <= 0 else "#1f2328"
        return f'{name}: {ratio} (<span style="color:{color}">budget left {left * 100:.0f} %</span>)'

    windows = " · ".join(one(name, w) for name, w in report["windows"].items())
    return f"<p>Availability (SLO {report['slo'] * 100:g} %, drains excluded): {windows}</p>"


def _apply_line(apply: dict[str, Any]) -> str:
    if apply["ok"]:
        return ""
    e = html.escape
    errors = "; ".join(e(str(apply[k])) for k in ("bgp_error", "dataplane_error") if apply[k])
    retry = "" if apply["retry_in_seconds"] is None else f" (retry in {apply['retry_in_seconds']:.1f}s)"
    return f'<p style="color:#cf222e"><b>Not applied:</b> {errors}{retry}</p>'


def _fleet_line(shown: dict[str, Any] | None) -> str:
    """The fleet guard: whether it holds this PoP and why, and the other PoPs it sees."""
    if shown is None:
        return ""
    e = html.escape
    seen = "; ".join(f"{e(p)}: {', '.join(map(str, ids)) or 'none'}" for p, ids in shown["announcing"].items())
    guard = (f"min_pops {shown['min_pops']}, pace {shown['pace']:g}s" if shown["guarding"] else "off (min_pops 0)")
    held = ""
    if shown["holding"] or shown["phase"] == "left":
        held = f'<br><b style="color:#cf222e">{e(shown["phase"])}</b>: {e(shown["reason"])}'
    return (f'<p class="fleet"><b>Fleet:</b> PoP id {shown["id"]}, guard {guard}; other PoPs announcing: '
            f"{seen or 'none seen'}{held}</p>")


def _external_line(external: dict[str, Any] | None) -> str:
    """Tier 3 at a glance: the view, each agent (standing, RTT, last seen), who lands where on
    the anycast address, and the catchment's recent moves."""
    if external is None:
        return ""
    e = html.escape
    color = "#cf222e" if external["blocking"] else "#1f2328"

    def number(value: Any, unit: str) -> str:
        return "-" if value is None else f"{value:g} {unit}"

    agents = "".join(f"<tr><td>{e(name)}</td><td>{e(str(agent['standing']))}</td>"
                     f"<td>{number(agent['rtt_ms'], 'ms')}</td><td>{number(agent['report_age_seconds'], 's ago')}</td>"
                     f"<td>{e(str(agent['problem'] or ''))}</td></tr>" for name, agent in external["agents"].items())
    landings = "; ".join(f"{e(agent)} → {e(str(where.get('pop')))}" for agent, seen in external["catchment"].items()
                         for where in seen.values())
    moves = "; ".join(f"{e(m['agent'])}: {e(str(m['from']))} → {e(str(m['to']))} ({m['ago_seconds']:.0f} s ago)"
                      for m in external.get("catchment_changes", [])[:5])
    return (f'<p style="color:{color}"><b>From outside:</b> {e(external["reason"])}'
            f'{" — withdrawn by tier 3" if external["blocking"] else ""}</p>'
            + (f"<table><tr><th>agent</th><th>sees this PoP</th><th>RTT</th><th>last report</th><th>problem</th></tr>"
               f"{agents}</table>" if agents else "")
            + f"<p>Catchment: {landings or 'no fresh report'}</p>"
            + (f"<p>Catchment moves: {moves}</p>" if moves else ""))


def _audit_table(entries: list[dict[str, Any]]) -> str:
    """The last operator actions, refused ones too: every field came from a client, so all escaped."""
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(a['time'])}</td><td>{e(a['action'])}</td><td>{e(a['target'])}</td><td>{e(a['who'])}</td>"
        f"<td>{e(a['from'])}</td><td>{e(a['reason']) or '-'}</td>"
        f'<td style="color:{"#1a7f37" if a["status"] == 200 else "#cf222e"}">{e(a["result"])} ({a["status"]})</td>'
        f"</tr>" for a in entries)
    return ("<h2>Operator actions (UTC)</h2><table><tr><th>time</th><th>action</th><th>target</th><th>who</th>"
            f"<th>from</th><th>reason</th><th>result</th></tr>{rows or '<tr><td>none</td></tr>'}</table>")
