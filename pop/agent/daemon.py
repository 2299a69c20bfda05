"""The probe agent's shell: the probe schedule, the anycast identity loop, the HTTP endpoints.

`Agent(config, key, probe_key)` holds the state; `async with agent.serving():` runs it (tests
run it in-process on 127.0.0.1:0 and read `agent.port`); `run(agent)` serves until cancelled.

- Each PoP's checks run on pop.probes' schedule (one loop per PoP and check, a probe started
  every `interval` even while an earlier one still waits for its timeout, every probe under a
  deadline), and every result is folded into the PoP's view (pop.agent.view). A dead PoP, or
  a dead network under the agent, only produces failures: no probe can stop a loop.
- Every `interval`, each anycast address is asked who answers (pop.identity), all at once,
  each bounded by `timeout`.
- `GET /v1/results`: the report, signed (pop.agent.auth). `sequence` increases by one for every
  report served, so no two responses of one agent run (`boot_id`) carry the same sequence and
  a replayed response is never newer than one the PoP already accepted.
- `GET /healthz`: 200 while the agent reaches at least one PoP, else 503.

Memory is bounded by the configuration: one view per PoP and check, one landing per anycast
address, no history, and requests carry no body we read.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from aiohttp import web

from pop.agent import auth, view
from pop.agent.config import AgentConfig
from pop.checks.base import Check, CheckResult
from pop.checks.l4 import TcpCheck
from pop.checks.wireguard import WireGuardCheck
from pop.hysteresis import Policy
from pop.identity import query_identity
from pop.probes import Probes

log = logging.getLogger("pop.agent")


class Agent:
    def __init__(self, config: AgentConfig, key: bytes, probe_key: bytes | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.boot_id = secrets.token_hex(8)
        self.port: int | None = None  # bound port, once serving
        self._key = key
        self._sequence = 0
        # the agent's counts apply to every check; fall_definitive = fall: a refusal seen from
        # outside proves the path to the PoP works, so it earns no faster verdict than silence
        self.policy = Policy(config.rise, config.fall, config.fall, config.interval, config.interval)
        self.checks: dict[str, list[tuple[Check, Policy]]] = {}
        for pop in config.pops:
            checks: list[tuple[Check, Policy]] = []
            for target in pop.targets:
                checks.append((_Named(TcpCheck(target.address, target.tcp_port, config.timeout),
                                      target.check_name("tcp")), self.policy))
                if target.wireguard is not None:
                    if probe_key is None:
                        raise ValueError(f"pops {pop.name}: a WireGuard probe needs the probe key")
                    check = WireGuardCheck(target.address, target.wireguard.port, target.wireguard.public_key,
                                           probe_key, timeout=config.timeout)
                    checks.append((_Named(check, target.check_name("wireguard")), self.policy))
            self.checks[pop.name] = checks
        now = clock()
        self.views = {name: view.start((check.name for check, _ in checks), now)
                      for name, checks in self.checks.items()}
        self.landings: dict[str, view.Landing] = {}

    def observe(self, pop: str, check: str, result: CheckResult) -> None:
        before = self.views[pop]
        after = self.views[pop] = view.fold(before, check, result, self.policy, self.clock())
        if after.reachable != before.reachable:
            log.info("pop.%s agent=%s pop=%s check=%s reason=%s", "reachable" if after.reachable else "unreachable",
                     self.config.name, pop, check, after.tiers[check].reason)

    def results(self) -> tuple[bytes, str]:
        """The next report's bytes and their signature header."""
        self._sequence += 1
        body = view.encode(view.report(self.config.name, self.boot_id, self._sequence, self.clock(),
                                       views=self.views, landings=self.landings))
        return body, auth.sign(self._key, body)

    async def _handle_results(self, _request: web.Request) -> web.Response:
        body, signature = self.results()
        return web.Response(body=body, content_type="application/json",
                            headers={auth.SIGNATURE_HEADER: signature, auth.AGENT_HEADER: self.config.name})

    async def _handle_healthz(self, _request: web.Request) -> web.Response:
        reachable = sorted(name for name, pop in self.views.items() if pop.reachable)
        healthy = view.healthy(self.views)
        return web.json_response({"agent": self.config.name, "healthy": healthy, "reachable": reachable,
                                  "pops": len(self.views)}, status=200 if healthy else 503)

    async def _anycast_loop(self) -> None:
        addresses = self.config.anycast
        while addresses:
            started = time.monotonic()
            answers = await asyncio.gather(*(query_identity(address, self.config.identity_port, self.config.timeout)
                                             for address in addresses))
            now = self.clock()
            for address, answer in zip(addresses, answers, strict=True):
                before = self.landings.get(address)
                self.landings[address] = view.Landing(now, answer.pop, answer.server, answer.rtt, answer.error)
                if before is None or (before.pop, before.server) != (answer.pop, answer.server):
                    log.info("anycast.lands agent=%s address=%s pop=%s server=%s error=%s", self.config.name, address,
                             answer.pop, answer.server, answer.error)
            await asyncio.sleep(max(0.0, started + self.config.interval - time.monotonic()))

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[Agent]:
        """Probe and serve until the block ends."""
        app = web.Application()
        app.router.add_get("/v1/results", self._handle_results)
        app.router.add_get("/healthz", self._handle_healthz)
        runner = web.AppRunner(app, access_log=None)  # one request per PoP per second: no access log
        await runner.setup()
        probes = Probes(self.observe, lambda _pop, _check: self.policy.interval)
        try:
            site = web.TCPSite(runner, self.config.listen, self.config.port)
            await site.start()
            self.port = int(runner.addresses[0][1])
            log.info("agent.start agent=%s boot_id=%s listen=%s port=%d pops=%d anycast=%d", self.config.name,
                     self.boot_id, self.config.listen, self.port, len(self.checks), len(self.config.anycast))
            async with asyncio.TaskGroup() as group:
                probes.start(group, self.checks, list(self.checks))
                anycast = group.create_task(self._anycast_loop(), name="anycast identity")
                try:
                    yield self
                finally:
                    probes.stop()
                    anycast.cancel()
        finally:
            await runner.cleanup()


class _Named:
    """A check under its name in the report (`tcp`, or `vpn11.tcp` for a named target)."""

    def __init__(self, check: Check, name: str) -> None:
        self.check = check
        self.name = name
        self.tier = check.tier

    async def probe(self) -> CheckResult:
        return await self.check.probe()


async def run(agent: Agent) -> None:
    async with agent.serving():
        await asyncio.Event().wait()
