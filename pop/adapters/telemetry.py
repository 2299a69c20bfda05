"""The load signal from the servers' node exporters: the I/O (the decisions are pop/load.py's).

Once per `load.period` the engine calls the signal: every configured server's exporter
(`http://ADDRESS:load.port/load.path`) is fetched at once, each within `load.timeout` and a
bound on the body's size; pop.telemetry turns two successive scrapes into a smoothed CPU
utilisation and pop.load's step table into a factor. A server whose exporter does not answer
(or answers nonsense) gets factor 1.0: fail-open, it keeps its configured weight.
`readings` is what the last round saw, for /v1/status and the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

import aiohttp

from pop import load, telemetry
from pop.config import Config

log = logging.getLogger("pop.telemetry")

MAX_BODY = 4 * 1024 * 1024  # node-exporter's full default output is ~100 KB


def url(address: str, policy: load.Policy) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{policy.port}{policy.path}"


class NodeExporterLoad:
    """The engine's LoadSignal: ``await signal()`` -> factor per server address."""

    def __init__(self, config: Callable[[], Config], *, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config  # read every round: a reload changes the servers and the policy
        self.clock = clock
        self.readings: dict[str, telemetry.Reading] = {}  # by server name
        self.factors: dict[str, float] = {}  # by server address, as last handed to the engine

    async def __call__(self) -> Mapping[str, float]:
        config = self._config()
        policy = config.load
        if not policy.enabled:  # turned off by a reload: every server back to its configured weight
            self.readings, self.factors = {}, {}
            return self.factors
        servers = [s for s in config.servers if s.enabled]
        # a session per round (one every few seconds): nothing to close when the engine stops
        async with aiohttp.ClientSession(trust_env=False) as session:
            results = await asyncio.gather(*(self._scrape(session, s.address, policy) for s in servers))
        cpu: dict[str, float | None] = {}
        readings: dict[str, telemetry.Reading] = {}
        for server, (scrape, error) in zip(servers, results, strict=True):
            before = self.readings.get(server.name, telemetry.Reading())
            reading = readings[server.name] = telemetry.fold(before, scrape, error, policy.smoothing)
            cpu[server.address] = reading.cpu
            if bool(reading.error) != bool(before.error):
                if reading.error:
                    log.warning("load.exporter_failed server=%s error=%s (keeps its configured weight)",
                                server.name, reading.error)
                else:
                    log.info("load.exporter_ok server=%s", server.name)
        self.readings = readings
        self.factors = load.telemetry_factors(cpu, self.factors, policy.steps, policy.floor, policy.margin)
        return self.factors

    async def _scrape(self, session: aiohttp.ClientSession, address: str,
                      policy: load.Policy) -> tuple[telemetry.Scrape | None, str]:
        try:
            async with asyncio.timeout(policy.timeout):
                async with session.get(url(address, policy), allow_redirects=False) as response:
                    if response.status != 200:
                        return None, f"HTTP {response.status}"
                    body = await response.content.read(MAX_BODY + 1)
            if len(body) > MAX_BODY:
                return None, f"answer larger than {MAX_BODY} bytes"
            return telemetry.parse(body.decode("utf-8", "replace"), self.clock()), ""
        except (OSError, TimeoutError, aiohttp.ClientError, telemetry.ParseError) as exc:
            return None, str(exc) or type(exc).__name__

    def view(self) -> dict[str, dict[str, object]]:
        """Per server: CPU (smoothed and last), WireGuard peers, the factor, the last error."""
        addresses = {s.name: s.address for s in self._config().servers}
        return {name: {"cpu": r.cpu, "cpu_last": r.raw,
                       "wireguard_peers": None if r.scrape is None else r.scrape.wireguard_peers,
                       "factor": self.factors.get(addresses.get(name, ""), 1.0), "error": r.error or None}
                for name, r in self.readings.items()}
