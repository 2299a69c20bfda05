"""`pop noc`: noc.yaml, the fleet view and page (pure), and the poller against real status apps."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from pop.config_reader import ConfigError
from pop.control_api import Control
from pop.noc import FleetState, Noc, NocConfig, Seen, Target, fleet, load, render
from pop.status import make_app
from tests.unit.test_engine import OK, engine_with, feed

A, B, C = (Target(n, f"http://192.0.2.{i}:9180") for i, n in enumerate(("ams1", "fra1", "lon1"), 1))


def status(pop: str, state: str, reason: str, **extra: Any) -> dict[str, Any]:
    announced = [{"prefix": "198.51.100.1/32"}] if state in ("announced", "degraded") else []
    return {"pop": pop, "state": state, "reason": reason, "drained": state == "drained",
            "bgp": {"announced": announced}, "events": [], **extra}


def test_noc_yaml_defaults_and_problems() -> None:
    config = load("pops: [{name: ams1, url: 'http://192.0.2.1:9180/'}]")
    assert config == NocConfig(pops=(Target("ams1", "http://192.0.2.1:9180"),))
    with pytest.raises(ConfigError) as caught:
        load("pops: [{name: a, url: 'ftp://x'}, {name: a, url: 'http://192.0.2.1:9180'}]\nport: 70000\nintervall: 1")
    assert sorted(caught.value.problems) == sorted([
        "noc.yaml: intervall: unknown key (did you mean 'interval'?)",
        "noc.yaml: pops[0].url: 'ftp://x' is not http(s)://host:port of a PoP's status endpoint",
        "noc.yaml: port: 70000 is out of range 0..65535"])


def test_the_fleet_view_says_what_is_red_why_and_who_drained() -> None:
    drained = status("fra1", "drained", "drained by operator", audit=[
        {"action": "drain", "target": "fra1", "result": "accepted", "who": "alice", "reason": "fibre work",
         "time": "2026-11-30T01:00:00Z", "until": "2026-11-30T03:00:00Z"},
        {"action": "drain", "target": "fra1", "result": "unauthorized", "who": "mallory", "reason": "x",
         "time": "2026-11-30T00:59:00Z"}])
    state = FleetState({"ams1": Seen(status("ams1", "withdrawn", "0/2 healthy, below low watermark 0.5"), at=90.0),
                        "fra1": Seen(drained, at=99.0),
                        "lon1": Seen(status("lon1", "announced", "2/2 healthy"), at=80.0, error="timeout")})
    view = fleet((A, B, C), state, 100.0)
    assert view["red"] == ["ams1", "lon1"] and view["announcing"] == 0 and view["prefixes"] == {}
    lon1 = view["pops"][2]
    assert (lon1["state"], lon1["reason"], lon1["last_answer_seconds"]) == ("no answer", "timeout", 20.0)
    page = render(view)
    assert '<tr class="pop red" data-pop="ams1" data-state="withdrawn">' in page
    assert "0/2 healthy, below low watermark 0.5" in page
    assert "drained by alice: fibre work, until 2026-11-30T03:00:00Z" in page
    assert "timeout (last answer 20.0 s ago)" in page


def test_a_pop_on_its_drain_ladder_says_the_step_and_until_when() -> None:
    draining = status("fra1", "draining", "2/2 healthy", ladder={
        "source": "operator", "reason": "fibre work", "step": 2, "steps": 4, "current": "prepend 3",
        "until": 1796004000.0}, audit=[{"action": "drain", "target": "fra1", "result": "accepted", "who": "alice",
                                        "reason": "fibre work", "time": "2026-11-30T01:00:00Z"}])
    view = fleet((B,), FleetState({"fra1": Seen(draining, at=99.0)}), 100.0)
    assert view["red"] == []
    page = render(view)
    assert "draining by alice (step 2/4: prepend 3): fibre work, until 2026-11-30 02:00:00 UTC" in page


def test_everything_a_pop_says_is_escaped() -> None:
    state = FleetState({"ams1": Seen(status("ams1", "withdrawn", "<script>alert(1)</script>"), at=1.0)})
    page = render(fleet((A,), state, 2.0))
    assert "<script>" not in page and "&lt;script&gt;" in page


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_noc_polls_real_status_apps_and_tolerates_one_that_does_not_answer() -> None:
    async def main() -> None:
        engine, _, _ = engine_with()
        feed(engine, "a", OK, 2)
        feed(engine, "b", OK, 2)
        app = make_app(lambda: engine.snapshot({"sessions": {"10.0.0.1": "up"}}), engine, Control("t1", ()))
        async with TestServer(app, host="127.0.0.1") as server:
            config = NocConfig(pops=(Target("t1", f"http://127.0.0.1:{server.port}"),
                                     Target("dead", f"http://127.0.0.1:{free_port()}")),
                               listen="127.0.0.1", port=0, interval=0.05, timeout=0.5)
            noc = Noc(config)
            async with noc.serving(), aiohttp.ClientSession() as http:
                url = f"http://127.0.0.1:{noc.port}"
                for _ in range(100):
                    async with http.get(url + "/v1/fleet") as response:
                        view = await response.json()
                    if view["pops"][0]["answering"] and view["pops"][1]["reason"]:
                        break
                    await asyncio.sleep(0.05)
                t1, dead = view["pops"]
                assert t1["answering"] and t1["state"] in ("announced", "degraded") and t1["reason"]
                assert dead["state"] == "no answer" and "connect" in dead["reason"].lower()
                async with http.get(url + "/") as response:
                    page = await response.text()
                assert 'data-pop="t1"' in page and 'data-pop="dead" data-state="no answer"' in page

    asyncio.run(main())
