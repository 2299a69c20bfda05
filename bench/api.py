"""/v1/status under load, and what that load does to the probe schedule (issue 10's goal).

One engine in this process, as `pop engine` runs it: 1,000 servers with the default L4
timing (a probe every 0.2 s per server: 5,000 probes a second), their checks scripted (each
answers after 1 ms, the time a LAN connect takes) so that the figures are the engine's and
not the network's, and the status endpoint served by aiohttp on the same event loop. The
speaker is a fake that holds what it is told.

1. idle: for --seconds, every probe's start is recorded; jitter = the time between two
   probes of one server minus the interval it should be.
2. loaded: the same, while a separate process runs --clients concurrent clients, each
   asking GET /v1/status back to back (a new request as soon as the last answer is read
   in full); their latencies are measured by the clients, from the request to the body's
   last byte. The clients ask for gzip, as aiohttp does, and keep the gzip'd body as it
   came: inflating 0.8 MB 1,500 times a second took the load process a whole core of this
   machine's two, and its own wait for that core was counted as the server's latency.

    .venv/bin/python bench/api.py [--servers 1000] [--clients 50] [--seconds 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.failover import percentile
from pop.checks.base import CheckResult
from pop.config import load
from pop.control_api import Control
from pop.desired import Announcement
from pop.engine import Engine
from pop.hysteresis import Policy

GOAL_P99 = 0.050


class Speaker:
    def __init__(self) -> None:
        self.current: tuple[Announcement, ...] = ()

    async def set(self, announcements: Any, *, force: bool = False) -> None:
        self.current = tuple(announcements)

    def announced(self) -> tuple[Announcement, ...]:
        return self.current


class Check:
    """Answers OK after 1 ms; remembers when each probe started."""

    tier = 1
    name = "tcp"
    timeout = 0.25

    def __init__(self, starts: list[float]) -> None:
        self.starts = starts

    async def probe(self) -> CheckResult:
        self.starts.append(time.monotonic())
        await asyncio.sleep(0.001)
        return CheckResult.success(0.001)


def config_text(servers: int) -> str:
    rows = "\n".join(f"  - {{name: s{i}, address: 10.{i // 250}.{i % 250}.1}}" for i in range(servers))
    return f"""
pop: {{name: bench, asn: 65101, router_id: 192.0.2.1}}
neighbors: [{{address: 10.255.0.1, peer_as: 65000}}]
prefixes: [198.51.100.1/32]
servers:
{rows}
"""


def jitter(starts: dict[str, list[float]], since: float, until: float, interval: float) -> list[float]:
    """Every gap between two probes of one server within [since, until), less the interval."""
    gaps = []
    for times in starts.values():
        inside = [t for t in times if since <= t < until]
        gaps += [b - a - interval for a, b in itertools.pairwise(inside)]
    return gaps


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": percentile(values, 0.5) * 1000, "p99_ms": percentile(values, 0.99) * 1000,
            "max_ms": max(values) * 1000}


async def serve_status(engine: Engine) -> tuple[Any, int]:
    """The engine's /v1 endpoint on 127.0.0.1 (a free port), as `pop run` serves it: (runner, port)."""
    from aiohttp import web

    from pop.status import make_app

    runner = web.AppRunner(make_app(lambda: engine.snapshot({"sessions": {"10.255.0.1": "up"}}), engine,
                                    Control("bench", ())), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # aiohttp keeps it private


async def bench(servers: int, clients: int, seconds: float) -> dict[str, Any]:
    config = load(config_text(servers))
    l4 = config.checks.l4
    policy = Policy(rise=l4.rise, fall=l4.fall, fall_definitive=l4.fall_definitive, interval=l4.interval,
                    fast_interval=l4.fast_interval)
    starts: dict[str, list[float]] = {s.name: [] for s in config.servers}
    checks = {s.name: [(Check(starts[s.name]), policy)] for s in config.servers}
    engine = Engine(config, Speaker(), checks)  # type: ignore[arg-type]  # the fake holds what it is told
    runner, port = await serve_status(engine)
    running = asyncio.create_task(engine.run())
    try:
        while engine.pool.healthy < servers:  # noqa: ASYNC110  # a benchmark polls; the engine has no event for it
            await asyncio.sleep(0.5)
        await asyncio.sleep(2.0)  # then at the steady interval
        idle_from = time.monotonic()
        await asyncio.sleep(seconds)
        idle_to = loaded_from = time.monotonic()
        load_process = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--client", str(port), "--clients", str(clients), "--seconds", str(seconds),
            stdout=subprocess.PIPE)
        out, _ = await load_process.communicate()
        loaded_to = time.monotonic()
    finally:
        running.cancel()
        await runner.cleanup()
    latencies = json.loads(out)
    return {"servers": servers, "clients": clients, "seconds": seconds,
            "status": {**summary(latencies["latencies"]), "requests_per_second": latencies["rate"],
                       "body_bytes": latencies["bytes"]},
            "jitter_idle": summary(jitter(starts, idle_from, idle_to, l4.interval)),
            "jitter_loaded": summary(jitter(starts, loaded_from, loaded_to, l4.interval))}


async def client_load(port: int, clients: int, seconds: float) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    size = 0
    url = f"http://127.0.0.1:{port}/v1/status"
    deadline = time.monotonic() + seconds

    errors: collections.Counter[str] = collections.Counter()

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal size
        while time.monotonic() < deadline:
            asked = time.monotonic()
            try:
                async with session.get(url) as response:
                    body = await response.read()
            # counted and shown, not a reason to lose the run
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                errors[type(exc).__name__] += 1
                continue
            if response.status != 200:
                errors[f"HTTP {response.status}"] += 1
                continue
            latencies.append(time.monotonic() - asked)
            size = len(body)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        started = time.monotonic()
        await asyncio.gather(*(one(session) for _ in range(clients)))
        elapsed = time.monotonic() - started
    return {"latencies": latencies, "rate": len(latencies) / elapsed, "bytes": size, "errors": dict(errors)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)  # the load process: the port to load
    args = parser.parse_args()
    if args.client:
        print(json.dumps(asyncio.run(client_load(args.client, args.clients, args.seconds))))
        return 0
    result = asyncio.run(bench(args.servers, args.clients, args.seconds))
    s, idle, loaded = result["status"], result["jitter_idle"], result["jitter_loaded"]
    print(f"/v1/status, {result['servers']} servers, {result['clients']} clients back to back, "
          f"{result['seconds']:g} s: p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms, max {s['max_ms']:.1f} ms, "
          f"{s['requests_per_second']:.0f} requests/s, {s['body_bytes']} bytes each "
          f"(goal p99 <= {GOAL_P99 * 1000:.0f} ms: {'met' if s['p99_ms'] <= GOAL_P99 * 1000 else 'MISSED'})")
    print("probe schedule jitter (gap between two probes of one server minus the 0.2 s interval):")
    print(f"  {'':8} {'probes':>8} {'p50':>9} {'p99':>9} {'max':>9}")
    for name, j in (("idle", idle), ("loaded", loaded)):
        print(f"  {name:8} {j['n']:>8} {j['p50_ms']:>6.2f} ms {j['p99_ms']:>6.2f} ms {j['max_ms']:>6.2f} ms")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
