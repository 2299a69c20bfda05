"""The PoP drain ladder (RFC 8326): the pure machine as tables, its config, and the engine's use of it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pop import adminstate, control, ladder
from pop.config import ConfigError, DrainStep, load
from pop.desired import announcements
from pop.engine import Engine
from pop.ladder import Effect, PopDrain
from tests.unit.test_engine import CONFIG_TEXT, OK, POLICY, FakeSpeaker, ManualClock, Scripted, feed

STEPS = (DrainStep("med", 1000, 10.0), DrainStep("prepend", 3, 10.0), DrainStep("graceful_shutdown", 0, 20.0),
         DrainStep("withdraw"))
AT_0 = PopDrain(since=100.0, step=0, step_since=100.0, reason="r")


# --- the pure machine --------------------------------------------------------------------------


@pytest.mark.parametrize(("drain", "now", "seen", "expected"), [  # seen: (connections, announced)
    (AT_0, 105.0, (None, True), (0, 100.0, "")),  # dwell not over
    (AT_0, 110.0, (None, True), (1, 110.0, "")),  # exactly at its time
    (AT_0, 125.0, (None, True), (2, 120.0, "")),  # a late wake-up: scheduled times, not the wake-up's
    (AT_0, 140.0, (None, True), (3, 140.0, "")),  # med 10 + prepend 10 + gshut 20: withdraw
    (AT_0, 999.0, (None, True), (3, 140.0, "")),
    (AT_0, 101.0, (5, True), (0, 100.0, "")),  # traffic still there
    (AT_0, 101.0, (0, True), (3, 101.0, "no connections left on the data plane")),  # gone: finish early
    (AT_0, 101.0, (None, False), (3, 101.0, "the PoP was withdrawn during the drain")),  # the pool withdrew it
    (PopDrain(100.0, 3, 140.0, "r"), 500.0, (0, False), (3, 140.0, "")),  # withdrawn: stays
])
def test_advance(drain: PopDrain, now: float, seen: tuple[int | None, bool], expected: tuple[int, float, str]) -> None:
    new = ladder.advance(drain, STEPS, now, seen[0], announced=seen[1])
    assert (new.step, new.step_since, new.early) == expected


@pytest.mark.parametrize(("step", "expected"), [
    (0, Effect(med=1000)),
    (1, Effect(med=1000, prepend=3)),  # cumulative: the MED stays raised
    (2, Effect(med=1000, prepend=3, graceful_shutdown=True)),
    (3, Effect(med=1000, prepend=3, graceful_shutdown=True)),
])
def test_effect_adds_up(step: int, expected: Effect) -> None:
    assert ladder.effect(PopDrain(0.0, step, 0.0, "r"), STEPS) == expected


def test_start_due_expiry_and_a_pop_that_announces_nothing() -> None:
    drain = ladder.start(STEPS, 100.0, "r", until=130.0)
    assert (drain.step, ladder.due(drain, STEPS)) == (0, 110.0)
    assert ladder.due(ladder.advance(drain, STEPS, 125.0, None, announced=True), STEPS) == 130.0  # until first
    assert ladder.due(PopDrain(100.0, 3, 140.0, "r", until=150.0), STEPS) == 150.0  # the maintenance's end
    assert not ladder.expired(drain, 129.9) and ladder.expired(drain, 130.0)
    assert ladder.due(PopDrain(100.0, 3, 140.0, "r"), STEPS) is None
    idle = ladder.start(STEPS, 100.0, "r", announced=False)
    assert ladder.withdrawn(idle, STEPS) and idle.early == "not announced when the drain began"
    # dwell 0 steps are taken together
    assert ladder.start((DrainStep("med", 5, 0.0), DrainStep("withdraw")), 1.0, "r").step == 1
    assert ladder.fit(PopDrain(0.0, 1 << 16, 0.0, "r"), STEPS).step == 3


def test_the_attributes_only_ever_make_the_route_worse() -> None:
    config = load(CONFIG_TEXT.replace("healthy: {med: 10}", "healthy: {med: 2000, as_path_prepend: 1, "
                                                                  "communities: ['65101:1']}"))
    full = ladder.effect(PopDrain(0.0, 2, 0.0, "r"), STEPS)
    (route,) = announcements(config.prefixes, True, False, full)
    assert (route.med, route.as_path_prepend, route.communities, route.local_pref) == (
        2000, 4, ("65101:1", "65535:0"), 0)
    assert announcements(config.prefixes, False, False, full) == ()


def test_view_for_status() -> None:
    view = ladder.view(PopDrain(100.0, 1, 110.0, "maintenance by alice", "maintenance", until=1900.0), STEPS,
                       now=112.0, wall=5000.0)
    assert view is not None
    assert (view["step"], view["steps"], view["current"], view["next"], view["next_in_seconds"]) == (
        2, 4, "prepend 3", "graceful_shutdown (65535:0)", 8.0)
    assert (view["until"], view["until_in_seconds"], view["source"]) == (6788.0, 1788.0, "maintenance")
    assert view["ladder"] == ["med 1000 for 10s", "prepend 3 for 10s", "graceful_shutdown (65535:0) for 20s",
                              "withdraw"]
    assert ladder.view(None, STEPS, 0.0, 0.0) is None


# --- configuration -----------------------------------------------------------------------------

BASE = """
pop: {name: t1, asn: 65101, router_id: 192.0.2.1}
neighbors: [{address: 10.0.0.1, peer_as: 65000}]
prefixes: [198.51.100.1/32]
servers: [{name: a, address: 10.0.2.1}]
"""


def test_the_default_ladder_and_a_configured_one() -> None:
    assert load(BASE).drain.steps == STEPS
    drain = load(BASE + "drain: {steps: [{med: 5, dwell: 1.5}, {withdraw: true}], disable_file: /run/x}").drain
    assert drain.steps == (DrainStep("med", 5, 1.5), DrainStep("withdraw")) and drain.disable_file == "/run/x"


@pytest.mark.parametrize(("section", "problem"), [
    ("drain: {steps: []}", "drain.steps: needs at least the withdraw step"),
    ("drain: {steps: [{med: 5}, withdraw]}", "drain.steps[0].dwell: is required"),
    ("drain: {steps: [{med: 5, dwell: 1}]}", "drain.steps: must end with withdraw"),
    ("drain: {steps: [withdraw, {med: 1, dwell: 1}]}", "drain.steps[1]: comes after withdraw (drain.steps[0])"),
    ("drain: {steps: [{med: 1, prepend: 2, dwell: 1}, withdraw]}",
     "drain.steps[0]: needs exactly one of med, prepend, graceful_shutdown, withdraw (found: med, prepend)"),
    ("drain: {steps: [{dwell: 1}, withdraw]}", "drain.steps[0]: needs exactly one of"),
    ("drain: {steps: [{med: 1, dwell: 1}, {med: 2, dwell: 1}, withdraw]}",
     "drain.steps[1]: med is already drain.steps[0]; each kind at most once"),
    ("drain: {steps: [{prepend: 0, dwell: 1}, withdraw]}", "drain.steps[0].prepend: 0 is out of range 1..16"),
    ("drain: {steps: [{med: -1, dwell: 1}, withdraw]}", "drain.steps[0].med: -1 is out of range"),
    ("drain: {steps: [{med: 1, dwell: -1}, withdraw]}", "drain.steps[0].dwell: -1 is out of range"),
    ("drain: {steps: [{graceful_shutdown: false, dwell: 1}, withdraw]}",
     "drain.steps[0].graceful_shutdown: must be true"),
    ("drain: {steps: [{withdraw: true, dwell: 3}]}", "drain.steps[0].dwell: withdraw is the last step"),
    ("drain: {steps: [3]}", "drain.steps[0]: must be a mapping like {med: 1000, dwell: 10}"),
    ("drain: {steps: [{med: 1, dwell: 1, hold: 2}, withdraw]}", "drain.steps[0].hold: unknown key"),
    ("drain: {disable_file: disable}", "drain.disable_file: 'disable' must be an absolute path"),
    ("drain: {step: []}", "drain.step: unknown key (did you mean 'steps'?)"),
])
def test_bad_ladders_name_what_is_wrong(section: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(BASE + section)
    assert any(p.startswith(f"pop.yaml: {problem}") for p in caught.value.problems), caught.value.problems


# --- the request's until -----------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "until"), [
    (b'{"until": 1800}', 1_800_001_800.0),
    (b'{"until": "2027-01-15T08:30:00Z"}', 1_800_001_800.0),
    (b'{"until": "2027-01-15T09:30:00+01:00"}', 1_800_001_800.0),
    (b'{"until": null}', None),
])
def test_until_is_an_iso_time_or_seconds_from_now(raw: bytes, until: float | None) -> None:
    assert control.parse_body(raw, 1_800_000_000.0).until == until


@pytest.mark.parametrize(("raw", "problem"), [
    (b'{"until": "2027-01-15T08:30:00"}', "body.until: needs a time zone"),
    (b'{"until": "tomorrow"}', "body.until: 'tomorrow' is not an ISO 8601 time"),
    (b'{"until": -5}', "body.until: is not in the future"),
    (b'{"until": "2020-01-01T00:00:00Z"}', "body.until: is not in the future"),
    (b'{"until": 99999999}', "body.until: more than 30 days ahead"),
    (b'{"until": true}', "body.until: must be an ISO 8601 time or seconds from now, not a boolean"),
])
def test_bad_until_names_what_is_wrong(raw: bytes, problem: str) -> None:
    with pytest.raises(control.BodyError, match=problem):
        control.parse_body(raw, 1_800_000_000.0)


@pytest.mark.parametrize(("text", "seconds"), [("90", 90.0), ("90s", 90.0), ("30m", 1800.0), ("2h", 7200.0),
                                               ("1h30m", 5400.0), ("1d", 86400.0), ("0.5s", 0.5)])
def test_durations(text: str, seconds: float) -> None:
    assert control.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "30x", "0", "1m1h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        control.parse_duration(text)


# --- the engine walks it -----------------------------------------------------------------------


def engine_for(clock: ManualClock, extra: str = "", wall: float = 5000.0) -> tuple[Engine, FakeSpeaker]:
    speaker = FakeSpeaker()
    config = load(CONFIG_TEXT + "drain: {steps: [{med: 1000, dwell: 10}, {prepend: 2, dwell: 10}, "
                                "{graceful_shutdown: true, dwell: 20}, withdraw]" + extra + "}")
    checks = {"a": Scripted(), "b": Scripted()}
    engine = Engine(config, speaker, {name: [(check, POLICY)] for name, check in checks.items()}, clock=clock,
                    wall=lambda: wall + clock.now)
    feed(engine, "a", OK, 2)
    feed(engine, "b", OK, 2)
    return engine, speaker


def attributes(engine: Engine) -> tuple[int | None, int, tuple[str, ...]] | None:
    if not engine.desired:
        return None
    (route,) = engine.desired
    return route.med, route.as_path_prepend, route.communities


def test_the_engine_announces_each_step_then_withdraws_and_undrain_returns_after_the_hold_down() -> None:
    async def main() -> None:
        clock = ManualClock()
        engine, _ = engine_for(clock)
        assert attributes(engine) == (10, 0, ())
        engine.drain("operator drain by alice")
        seen = [(clock.now, attributes(engine), engine.snapshot().ladder["current"])]  # type: ignore[index]
        for now in (110.0, 120.0, 140.0):
            clock.now = now
            engine.reevaluate()
            seen.append((now, attributes(engine), engine.snapshot().ladder["current"]))  # type: ignore[index]
        assert seen == [(100.0, (1000, 0, ()), "med 1000"), (110.0, (1000, 2, ()), "prepend 2"),
                        (120.0, (1000, 2, ("65535:0",)), "graceful_shutdown (65535:0)"),
                        (140.0, None, "withdraw")]
        assert engine.verdict.drained and engine.verdict.reason == "drained: operator drain by alice"
        assert [e.new for e in engine.events if e.kind == "ladder"] == [
            "prepend 2", "graceful_shutdown (65535:0)", "withdraw"]
        engine.undrain()
        assert engine.desired == () and engine.verdict.hold_down_until == pytest.approx(140.3)
        clock.now = 140.31
        engine.reevaluate()
        assert attributes(engine) == (10, 0, ())  # back without the drain's attributes

    asyncio.run(main())


def test_undrain_before_the_withdraw_drops_the_attributes_at_once() -> None:
    clock = ManualClock()
    engine, _ = engine_for(clock)
    engine.drain()
    clock.now = 111.0
    engine.reevaluate()
    assert attributes(engine) == (1000, 2, ())
    engine.undrain()
    assert attributes(engine) == (10, 0, ()) and engine.pop_drain is None  # never withdrawn: no hold-down


def test_traffic_gone_finishes_the_drain_early() -> None:
    clock = ManualClock()
    engine, _ = engine_for(clock)
    engine.drain()
    engine.drain_connections = 3
    engine.reevaluate()
    assert attributes(engine) == (1000, 0, ())
    engine.drain_connections = 0
    clock.now = 101.0
    engine.reevaluate()
    assert engine.desired == () and engine.verdict.drained
    assert engine.snapshot().ladder["finished_early"] == "no connections left on the data plane"  # type: ignore[index]


def test_a_maintenance_ends_by_itself() -> None:
    clock = ManualClock()
    engine, _ = engine_for(clock, wall=5000.0)
    engine.drain("maintenance by bob", until=5000.0 + 160.0)
    assert engine.snapshot().ladder["source"] == "maintenance"  # type: ignore[index]
    assert ladder.due(engine.pop_drain, engine.config.drain.steps) == 110.0  # type: ignore[arg-type]
    clock.now = 150.0
    engine.reevaluate()
    assert engine.desired == () and engine.verdict.drained
    assert ladder.due(engine.pop_drain, engine.config.drain.steps) == 160.0  # type: ignore[arg-type]
    clock.now = 160.0
    engine.reevaluate()
    assert engine.pop_drain is None and not engine.verdict.drained
    assert engine.events[-1].reason == "maintenance ended (maintenance by bob)"
    clock.now = 160.31
    engine.reevaluate()
    assert attributes(engine) == (10, 0, ())


def test_the_disable_file_drains_through_the_ladder_and_holds_off_an_undrain(tmp_path: Path) -> None:
    flag = tmp_path / "disable"
    clock = ManualClock()
    engine, _ = engine_for(clock, f", disable_file: {flag}")
    engine.check_disable_file()
    assert engine.pop_drain is None
    flag.touch()
    engine.check_disable_file()
    assert attributes(engine) == (1000, 0, ()) and engine.pop_drain is not None
    assert engine.pop_drain.reason == f"disable file {flag}" and engine.pop_drain.source == "disable-file"
    with pytest.raises(ladder.DrainHeld, match="remove it to undrain"):
        engine.undrain()
    flag.unlink()
    engine.check_disable_file()
    assert engine.pop_drain is None and attributes(engine) == (10, 0, ())
    assert engine.events[-1].reason == f"disable file {flag} removed"


def test_the_ladder_survives_the_engine_dying() -> None:
    clock = ManualClock()
    old, _ = engine_for(clock, wall=5000.0)
    old.drain("maintenance by bob", until=5000.0 + 300.0)
    clock.now = 115.0
    old.reevaluate()
    saved = adminstate.to_dict(old.admin_state(wall=5000.0 + clock.now, now=clock.now))
    assert saved["pop_drained"] is True and saved["pop_drain"]["step"] == 1

    # a successor with a fresh monotonic clock, 10 s later by the wall clock
    new_clock = ManualClock()
    new_clock.now = 7.0
    new, _ = engine_for(new_clock, wall=5000.0 + 125.0 - 7.0)
    new.restore_admin(adminstate.parse(saved, {"a", "b"}), wall=5000.0 + 125.0)
    restored = new.pop_drain
    assert restored is not None and restored.step == 2  # the prepend's dwell ended during the gap
    assert restored.until == pytest.approx(7.0 + 175.0) and attributes(new) == (1000, 2, ("65535:0",))


# --- the endpoints -----------------------------------------------------------------------------


def test_drain_with_until_is_a_maintenance_on_status_the_page_and_in_the_audit(tmp_path: Path) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from pop.audit import AuditTrail
    from pop.control_api import Control
    from pop.status import make_app

    flag = tmp_path / "disable"
    token = "t" * 32
    auth = {"Authorization": f"Bearer {token}"}

    async def main() -> None:
        clock = ManualClock()
        engine, _ = engine_for(clock, f", disable_file: {flag}", wall=1_800_000_000.0 - 100.0)
        ctl = Control("t1", (token.encode(),), AuditTrail(None), wall=lambda: 1_800_000_000.0)
        app = make_app(lambda: engine.snapshot({"sessions": {}}), engine, ctl)
        async with TestClient(TestServer(app)) as client:
            answer = await client.post("/drain", headers=auth, json={"who": "alice", "reason": "kernel upgrade",
                                                                     "until": "2027-01-15T08:30:00Z"})
            assert answer.status == 200, await answer.text()
            status = await (await client.get("/status")).json()
            assert status["state"] == "draining"
            assert {k: status["ladder"][k] for k in ("source", "reason", "current", "next", "until_in_seconds")} == {
                "source": "maintenance", "reason": "maintenance by alice: kernel upgrade", "current": "med 1000",
                "next": "prepend 2", "until_in_seconds": 1800.0}
            assert status["audit"][0]["until"] == "2027-01-15T08:30:00.000Z"
            page = await (await client.get("/")).text()
            assert "maintenance by alice: kernel upgrade" in page and "until 2027-01-15 08:30:00 UTC" in page
            assert "Step 1/4: med 1000" in page and "next: prepend 2 in 10s" in page
            refused = await client.post("/undrain", headers=auth, json={"until": 60})
            assert refused.status == 400 and "only for a PoP drain" in (await refused.json())["error"]
            flag.touch()
            held = await client.post("/undrain", headers=auth)
            assert held.status == 409 and f"the disable file {flag} exists" in (await held.json())["error"]
            assert engine.pop_drain is not None
            flag.unlink()
            assert (await client.post("/undrain", headers=auth)).status == 200 and engine.pop_drain is None

    asyncio.run(main())


def test_pop_maintenance_for_and_drain_until_from_the_command_line(tmp_path: Path) -> None:
    import json
    import sys

    from aiohttp.test_utils import TestClient, TestServer

    from pop.audit import AuditTrail
    from pop.control_api import Control
    from pop.status import make_app
    from tests.unit.test_control import TOKEN, pop_yaml, token_file

    async def main() -> None:
        clock = ManualClock()
        engine, _ = engine_for(clock, wall=1_800_000_000.0 - 100.0)
        ctl = Control("t1", (TOKEN.encode(),), AuditTrail(None), wall=lambda: 1_800_000_000.0)
        app = make_app(lambda: engine.snapshot({"sessions": {}}), engine, ctl)
        async with TestClient(TestServer(app)) as client:
            path = pop_yaml(tmp_path, f"status: {{port: {client.port}}}\ncontrol: {{token_file: {token_file(tmp_path)}}}")

            async def pop(*argv: str) -> tuple[int, str, str]:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "pop", *argv, "-c", str(path), env={"USER": "carol", "PATH": "/usr/bin"},
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                out, err = await proc.communicate()
                assert proc.returncode is not None
                return proc.returncode, out.decode(), err.decode()

            code, out, err = await pop("maintenance", "--for", "30m", "--reason", "kernel upgrade")
            assert code == 0, err
            assert json.loads(out)["ladder"]["until_in_seconds"] == 1800.0
            assert ctl.trail.recent()[0]["until"] == "2027-01-15T08:30:00.000Z"
            code, out, err = await pop("drain", "--until", "2027-01-15T09:00:00Z")  # extends it
            assert code == 0 and json.loads(out)["ladder"]["until_in_seconds"] == 3600.0, err
            code, _, err = await pop("maintenance", "--for", "soon")
            assert code == 2 and "--for: 'soon' is not a duration" in err
            code, _, err = await pop("drain", "--until", "yesterday")
            assert code == 1 and "refused (400): body.until: 'yesterday' is not an ISO 8601 time" in err

    asyncio.run(main())
