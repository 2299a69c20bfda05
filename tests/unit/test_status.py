"""The operator surfaces: /status JSON, the NOC page, /metrics, drain — served for real by aiohttp."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from pop.checks.base import CheckResult
from pop.control_api import Control
from pop.status import make_app
from tests.unit.test_engine import OK, engine_with, feed

TOKEN = "t" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def serve(check: Any, tokens: tuple[bytes, ...] = (TOKEN.encode(),)) -> None:
    async def main() -> None:
        engine, _, _ = engine_with()
        feed(engine, "a", OK, 2)
        feed(engine, "b", OK, 2)
        feed(engine, "b", CheckResult.failure("refused", definitive=True, detail="port 443 refused"))
        app = make_app(lambda: engine.snapshot({"sessions": {"10.0.0.1": "up"}}), engine, Control("t1", tokens))
        async with TestClient(TestServer(app)) as client:
            await check(client, engine)

    asyncio.run(main())


def test_status_answers_why() -> None:
    async def check(client: TestClient, _engine: Any) -> None:
        response = await client.get("/status")
        assert response.status == 200
        data = await response.json()
        assert data["state"] == "degraded" and data["announced"] is True
        assert data["pool"] == {"healthy": 1, "total": 2, "fraction": 0.5}
        b = data["servers"][1]
        assert (b["state"], b["decided_by"], b["reason"]) == ("down", "tcp", "refused: port 443 refused; fell after 1 definitive failures")
        assert data["bgp"]["desired"][0]["med"] == 50
        assert data["events"][0]["subject"] == "b" and data["events"][0]["to"] == "down"

    serve(check)


def test_noc_page_and_metrics() -> None:
    async def check(client: TestClient, _engine: Any) -> None:
        page = await (await client.get("/")).text()
        assert "PoP t1" in page and "degraded" in page and "refused: port 443 refused" in page
        metrics = await (await client.get("/metrics")).text()
        assert 'pop_announced{pop="t1"} 1.0' in metrics
        assert 'pop_server_up{pop="t1",server="b"} 0.0' in metrics
        assert 'pop_server_state{pop="t1",server="b",state="down"} 1.0' in metrics
        assert 'pop_check_results_total{outcome="fail",pop="t1",server="b",tier="tcp"} 1.0' in metrics
        assert 'pop_verdict_changes_total{pop="t1"} 1.0' in metrics

    serve(check)


def test_drain_and_undrain() -> None:
    async def check(client: TestClient, engine: Any) -> None:
        # the default ladder's first step: still announced, with the MED raised
        drained = await (await client.post("/drain", headers=AUTH)).json()
        assert (drained["drained"], drained["state"], drained["ladder"]["step"]) == (True, "draining", 1)
        assert engine.desired[0].med == 1000
        assert (await client.get("/drain")).status == 405  # a GET never changes anything
        undrained = await (await client.post("/undrain", headers=AUTH)).json()
        assert undrained == {"drained": False, "state": "degraded", "ladder": None}  # never withdrawn: no hold-down
        assert engine.desired[0].med == 50 and not engine.verdict.drained

    serve(check)


def test_html_is_escaped() -> None:
    async def check(client: TestClient, engine: Any) -> None:
        engine.observe("a", "tcp", CheckResult.failure("error", detail="<script>alert(1)</script>"))
        page = await (await client.get("/")).text()
        assert "<script>" not in page and "&lt;script&gt;" in page

    serve(check)


def test_noc_page_shows_the_external_view_its_agents_and_the_catchment_moves() -> None:
    from pop.status import _external_line

    external = {"reason": "unreachable from outside: 2/3 agents", "blocking": True,
                "agents": {"probe1": {"standing": "unreachable", "rtt_ms": None, "report_age_seconds": 0.4,
                                      "problem": None},
                           "probe<2>": {"standing": "reachable", "rtt_ms": 0.8, "report_age_seconds": 0.2,
                                        "problem": "forged"}},
                "catchment": {"probe1": {"198.51.100.1": {"pop": "pop3"}}},
                "catchment_changes": [{"agent": "probe1", "address": "198.51.100.1", "from": "pop1", "to": "pop3",
                                       "ago_seconds": 3.2}]}
    line = _external_line(external)
    assert "withdrawn by tier 3" in line and "unreachable from outside: 2/3 agents" in line
    assert "<td>probe1</td><td>unreachable</td><td>-</td><td>0.4 s ago</td>" in line
    assert "<td>probe&lt;2&gt;</td><td>reachable</td><td>0.8 ms</td>" in line  # escaped
    assert "Catchment: probe1 → pop3" in line and "probe1: pop1 → pop3 (3 s ago)" in line
