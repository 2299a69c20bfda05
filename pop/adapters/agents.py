"""Pulling the probe agents' reports: tier 3's I/O (the decisions are pop/external.py's).

Every `external.pull_interval` each configured agent's `GET /v1/results` is fetched, with
`external.timeout` for the whole exchange and a bound on the body's size, and handed as
received (bytes and signature header) to `Tier3.offer`, which verifies, parses and accepts or
drops it; an agent that does not answer is `Tier3.failed`. Then `Tier3.tick` re-reads the view
and steps the gate, and `on_change()` runs when the gate opened or closed (the engine decides
again). An agent that is down, slow or lying costs one pull's timeout, never the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp

from pop.agent.auth import SIGNATURE_HEADER
from pop.config_model import External, ExternalAgent
from pop.external import Tier3

log = logging.getLogger("pop.agents")

MAX_BODY = 1024 * 1024  # a report of 1,000 PoPs is ~200 KB


async def fetch(session: aiohttp.ClientSession, agent: ExternalAgent) -> tuple[bytes, str | None]:
    """One agent's report as received; raises OSError/aiohttp errors (the caller bounds the time)."""
    async with session.get(agent.url, allow_redirects=False) as response:
        if response.status != 200:
            raise aiohttp.ClientResponseError(response.request_info, (), status=response.status,
                                              message=f"HTTP {response.status}")
        body = await response.content.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            raise ValueError(f"report larger than {MAX_BODY} bytes")
        return body, response.headers.get(SIGNATURE_HEADER)


async def pull_forever(settings: Callable[[], External], tier3: Tier3, on_change: Callable[[], None], *,
                       wall: Callable[[], float] = time.time) -> None:
    """Pull, offer, tick; forever (cancel to stop). `settings()` is read every round (reloads)."""
    async with aiohttp.ClientSession(trust_env=False) as session:
        while True:
            started = time.monotonic()
            config = settings()
            await pull_once(session, config, tier3, wall)
            if tier3.tick(wall()):
                on_change()
            await asyncio.sleep(max(0.0, config.pull_interval - (time.monotonic() - started)))


async def pull_once(session: aiohttp.ClientSession, config: External, tier3: Tier3,
                    wall: Callable[[], float]) -> None:
    async def one(agent: ExternalAgent) -> None:
        before = tier3.last_problem.get(agent.name)
        try:
            async with asyncio.timeout(config.timeout):
                body, signature = await fetch(session, agent)
        except (OSError, TimeoutError, aiohttp.ClientError, ValueError) as exc:
            tier3.failed(agent.name, str(exc) or type(exc).__name__)
        else:
            tier3.offer(agent.name, body, signature, wall())
        problem = tier3.last_problem.get(agent.name)
        if problem != before:  # log changes, not every pull of an agent that stays down
            if problem is None:
                log.info("external.agent_ok agent=%s", agent.name)
            else:
                log.warning("external.dropped agent=%s reason=%s", agent.name, problem)

    await asyncio.gather(*(one(agent) for agent in config.agents))
