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
        assert 'pop_state{pop="t1",state="degraded"} 1.0' in metrics
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


def serve_v1(check: Any, ready: str = "") -> None:
    """An engine whose BGP session carries its desired routes, with an announce history."""
    from pop import availability
    from pop.availability import Mark
    from tests.unit.test_engine import ManualClock

    async def main() -> None:
        engine, speaker, _ = engine_with(ManualClock())
        feed(engine, "a", OK, 2)
        feed(engine, "b", OK, 2)
        speaker.current = engine.desired
        engine.durations.observe("tcp", 0.003)
        engine.durations.observe("tcp", 7.0)
        history = [Mark(1000.0, False, "engine"), Mark(1010.0, True), Mark(1000.0 + 86400 - 60, False, "pool")]
        app = make_app(lambda: engine.snapshot({"sessions": {"10.0.0.1": "up", "10.0.0.2": "down"},
                                                "reloads": {"ok": 2, "refused": 1}}),
                       engine, Control("t1", (TOKEN.encode(),)), ready=lambda: ready,
                       availability=lambda: availability.report(history, 1000.0 + 86400, 0.999))
        async with TestClient(TestServer(app)) as client:
            await check(client, engine)

    asyncio.run(main())


def test_v1_status_is_the_status_with_its_version_and_availability() -> None:
    async def check(client: TestClient, _engine: Any) -> None:
        v1 = await (await client.get("/v1/status")).json()
        assert v1["api"] == 1 and v1["state"] == "announced" and v1["reloads"] == {"ok": 2, "refused": 1}
        assert v1 == await (await client.get("/status")).json()  # the alias answers the same
        day = v1["availability"]["windows"]["24h"]
        assert day["withdrawn_seconds"] == {"pool": 60.0, "external": 0.0, "operator": 0.0, "engine": 10.0}
        assert day["ratio"] == round(1 - 70 / 86400, 6) and v1["availability"]["slo"] == 0.999
        assert "  " in await (await client.get("/v1/status?pretty")).text()
        page = await (await client.get("/")).text()
        assert "Availability (SLO 99.9 %, drains excluded): 24h: 99.919 %" in page and "budget left 19 %" in page

    serve_v1(check)


def test_v1_servers_and_events() -> None:
    async def check(client: TestClient, _engine: Any) -> None:
        servers = await (await client.get("/v1/servers")).json()
        assert servers["api"] == 1 and [s["name"] for s in servers["servers"]] == ["a", "b"]
        await client.post("/v1/servers/a/drain", headers=AUTH, json={"who": "alice", "reason": "disk"})
        events = await (await client.get("/v1/events")).json()
        assert events["events"][0]["subject"] == "a" and events["events"][0]["to"] == "draining"
        assert events["audit"][0]["who"] == "alice" and events["audit"][0]["action"] == "drain-server"

    serve_v1(check)


def test_v1_control_paths_and_their_aliases_need_the_token() -> None:
    async def check(client: TestClient, engine: Any) -> None:
        assert (await client.post("/v1/drain")).status == 401
        assert not engine.verdict.drained
        # the drain ladder's first step (raise the MED) is in force at once
        assert (await (await client.post("/v1/drain", headers=AUTH)).json())["state"] == "draining"
        assert (await (await client.get("/v1/status")).json())["state"] == "draining"  # an action makes reads fresh
        assert (await client.post("/undrain", headers=AUTH)).status == 200
        assert (await client.post("/v1/servers/nope/drain", headers=AUTH)).status == 404

    serve_v1(check)


def test_healthz_answers_200_when_ready_and_503_with_the_reason() -> None:
    async def ok(client: TestClient, _engine: Any) -> None:
        response = await client.get("/healthz")
        assert response.status == 200 and (await response.json()) == {"ok": True}

    async def not_ready(client: TestClient, _engine: Any) -> None:
        response = await client.get("/healthz")
        assert response.status == 503
        assert (await response.json()) == {"ok": False, "reason": "the engine loop is not running"}

    serve_v1(ok)
    serve_v1(not_ready, ready="the engine loop is not running")


def test_metrics_use_the_agreed_names() -> None:
    async def check(client: TestClient, _engine: Any) -> None:
        metrics = await (await client.get("/metrics")).text()
        prefix = 'pop="t1",prefix="198.51.100.1/32"'
        for line in (f"pop_announced{{{prefix}}} 1.0", f"pop_prefix_med{{{prefix}}} 10.0",
                     f"pop_prefix_as_path_prepend{{{prefix}}} 0.0", f"pop_prefix_graceful_shutdown{{{prefix}}} 0.0",
                     'pop_state{pop="t1",state="announced"} 1.0', 'pop_state{pop="t1",state="withdrawn"} 0.0',
                     'pop_drained{pop="t1"} 0.0', 'pop_maintenance{pop="t1"} 0.0',
                     'pop_bgp_session_up{neighbor="10.0.0.1",pop="t1"} 1.0',
                     'pop_bgp_session_up{neighbor="10.0.0.2",pop="t1"} 0.0',
                     'pop_check_duration_seconds_bucket{le="0.005",pop="t1",tier="tcp"} 1.0',
                     'pop_check_duration_seconds_bucket{le="+Inf",pop="t1",tier="tcp"} 2.0',
                     'pop_check_duration_seconds_sum{pop="t1",tier="tcp"} 7.003',
                     'pop_reloads_total{pop="t1",result="ok"} 2.0', 'pop_reloads_total{pop="t1",result="refused"} 1.0',
                     'pop_pool_healthy_servers{pop="t1"} 2.0', 'pop_pool_servers{pop="t1"} 2.0',
                     'pop_apply_failing{pop="t1"} 0.0', 'pop_bgp_failures_total{pop="t1"} 0.0',
                     'pop_dataplane_failures_total{pop="t1"} 0.0', 'pop_dataplane_repairs_total{pop="t1"} 0.0',
                     'pop_verdict_changes_total{pop="t1"} 1.0', 'pop_up{pop="t1"} 1.0',
                     'pop_availability_ratio{pop="t1",window="24h"} 0.99919',
                     'pop_error_budget_remaining_ratio{pop="t1",window="24h"} 0.189',
                     'pop_slo_target_ratio{pop="t1"} 0.999'):
            assert line in metrics, line
        assert 'pop_build_info{python="' in metrics

    serve_v1(check)
