"""HTTP control: the token file, the request body, the audit trail (pure), and the endpoints as
aiohttp serves them, driven by the real engine and by the `pop drain` command line."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from pop import audit, control
from pop.audit import AuditTrail, Entry
from pop.config import ConfigError
from pop.control_api import Control
from pop.runner import load_file
from pop.status import make_app
from tests.unit.test_engine import OK, engine_with, feed

TOKEN = "s3cr3t-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# --- the token file ------------------------------------------------------------------------


def test_token_file_with_comments_and_two_tokens_for_a_rotation() -> None:
    data = f"# rotated 2026-11\n\n  {TOKEN}  \n{'n' * 16}\n".encode()
    assert control.parse_tokens(data, "/etc/pop/control.token") == (TOKEN.encode(), b"n" * 16)


@pytest.mark.parametrize(("data", "problem"), [
    (b"", "/t: control token file: holds no token (e.g. `openssl rand -hex 32 > /t`)"),
    (b"# only a comment\n\n", "/t: control token file: holds no token"),
    (b"short\n", "/t: control token file: line 1: the token is 5 characters; it must be 16..512"),
    (b"# c\n" + b"x" * 513, "/t: control token file: line 2: the token is 513 characters; it must be 16..512"),
    (b"two words but long enough\n", "/t: control token file: line 1: a token is one word of visible ASCII"),
    ("caf\u00e9-token-0123456789".encode(), "/t: control token file: not ASCII text"),
])
def test_bad_token_files_name_the_file_and_the_problem(data: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match="^" + problem.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        control.parse_tokens(data, "/t")


@pytest.mark.parametrize(("header", "ok"), [
    (f"Bearer {TOKEN}", True),
    (f"bearer   {TOKEN} ", True),
    (None, False),
    ("", False),
    ("Bearer", False),
    (f"Basic {TOKEN}", False),
    (f"Bearer {TOKEN}x", False),
    (f"Bearer {TOKEN[:-1]}", False),
    ("Bearer n\u00e4me-0123456789abcdef", False),
])
def test_bearer_header(header: str | None, ok: bool) -> None:
    assert control.authorized(header, (b"other-token-0123456789", TOKEN.encode())) is ok


def test_no_token_configured_authorizes_nobody() -> None:
    assert control.authorized(f"Bearer {TOKEN}", ()) is False


# --- the body ------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    (b"", control.ActionRequest()),
    (b"  \n", control.ActionRequest()),
    (b"{}", control.ActionRequest()),
    (b'{"reason": "fibre cut", "who": "alice"}', control.ActionRequest("fibre cut", "alice")),
    ('{"reason": "Wartung \u00e4"}'.encode(), control.ActionRequest("Wartung \u00e4", "unknown")),
])
def test_good_bodies(raw: bytes, expected: control.ActionRequest) -> None:
    assert control.parse_body(raw) == expected


@pytest.mark.parametrize(("raw", "problem"), [
    (b"{", "body: not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
    (b"\xff\xfe{\x00}\x00", "body: not UTF-8 text"),
    (b"[" * 100000, "body: not valid JSON (nested too deeply)"),
    (b'["drain"]', "body: must be a JSON object like {\"reason\": \"...\", \"who\": \"...\"}, not a list"),
    (b'{"reason": "x", "expires": 5}', "body: unknown key 'expires' (allowed: reason, who, until)"),
    (b'{"reason": 5}', "body.reason: must be a string, not an integer"),
    (b'{"who": null}', "body.who: must be a string, not null"),
    (b'{"who": ""}', "body.who: must not be empty"),
    (json.dumps({"reason": "x" * 201}).encode(), "body.reason: 201 characters; at most 200"),
    (json.dumps({"who": "x" * 65}).encode(), "body.who: 65 characters; at most 64"),
    (b'{"reason": "a\\nb"}', "body.reason: contains a control character"),
    (b'{"who": "eve\\u001b[31m"}', "body.who: contains a control character"),
])
def test_bad_bodies_name_what_is_wrong(raw: bytes, problem: str) -> None:
    with pytest.raises(control.BodyError) as caught:
        control.parse_body(raw)
    assert str(caught.value).startswith(problem), caught.value


# --- the audit trail -----------------------------------------------------------------------


def entry(n: int, result: str = "accepted", status: int = 200) -> Entry:
    return Entry(audit.iso(1_800_000_000 + n), "drain", "pop1", f"op{n}", "127.0.0.1", f"reason {n}", result, status)


def test_iso_time_is_utc_with_milliseconds() -> None:
    assert audit.iso(1_800_000_000.25) == "2027-01-15T08:00:00.250Z"


def test_append_survives_a_restart_and_keeps_the_last_twenty(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    first = AuditTrail(path)
    for n in range(25):
        first.append(entry(n))
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(path.read_text().splitlines()) == 25
    again = AuditTrail(path)
    again.load()
    recent = again.recent()
    assert len(recent) == 20 and recent[0]["who"] == "op24" and recent[-1]["who"] == "op5"
    assert recent[0] == {"time": audit.iso(1_800_000_024), "action": "drain", "target": "pop1", "who": "op24",
                         "from": "127.0.0.1", "reason": "reason 24", "result": "accepted", "status": 200}
    again.append(entry(99, "unauthorized", 401))
    assert json.loads(path.read_text().splitlines()[-1])["status"] == 401


def test_corrupt_lines_are_skipped_with_a_warning_and_a_torn_last_line_is_not_glued_to_the_next(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "audit.log"
    good = audit.to_line(entry(1))
    path.write_text(good + "not json\n" + '{"time": 5}\n' + "[1]\n" + '{"status": true}\n' + good
                    + good[:30])  # a write torn by a crash
    trail = AuditTrail(path)
    with caplog.at_level(logging.WARNING, "pop.audit"):
        trail.load()
    assert len(trail.recent()) == 2
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 5 and all("audit.corrupt_line" in w for w in warned)
    assert "line=2" in warned[0] and "line=7" in warned[-1]
    trail.append(entry(2))
    again = AuditTrail(path)
    again.load()
    assert [e["who"] for e in again.recent()] == ["op2", "op1", "op1"]  # the new entry kept its own line


def test_only_the_tail_of_a_big_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "TAIL_BYTES", 1000)
    path = tmp_path / "audit.log"
    path.write_text("".join(audit.to_line(entry(n)) for n in range(100)))
    trail = AuditTrail(path)
    trail.load()
    assert trail.recent()[0]["who"] == "op99" and len(trail.recent()) < 20  # a cut first line is dropped quietly


def test_an_unwritable_log_never_stops_the_action(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    trail = AuditTrail(tmp_path / "missing-dir" / "audit.log")
    trail.append(entry(1))
    assert trail.recent()[0]["who"] == "op1" and "audit.unsaved" in caplog.text


# --- the configuration -----------------------------------------------------------------------


def pop_yaml(tmp_path: Path, control_section: str) -> Path:
    path = tmp_path / "pop.yaml"
    path.write_text(f"""
pop: {{name: ams1, asn: 65101, router_id: 192.0.2.1, runtime_dir: {tmp_path / "run"}}}
neighbors: [{{address: 10.0.0.1, peer_as: 65000}}]
prefixes: [198.51.100.1/32]
servers: [{{name: vpn1, address: 10.0.2.10}}]
{control_section}
""")
    return path


def token_file(tmp_path: Path, text: str = TOKEN + "\n", mode: int = 0o600) -> Path:
    path = tmp_path / "control.token"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_the_token_file_is_read_by_check_config(tmp_path: Path) -> None:
    key = token_file(tmp_path)
    assert load_file(pop_yaml(tmp_path, f"control: {{token_file: {key}}}"), with_keys=True).control.token_file == str(key)
    key.chmod(0o640)
    path = pop_yaml(tmp_path, f"control: {{token_file: {key}}}")
    with pytest.raises(ConfigError) as caught:
        load_file(path, with_keys=True)
    assert caught.value.problems == (f"{path}: control.token_file: {key}: key file mode 0640 lets group/others "
                                     f"access it; refusing to use it (fix: chmod 600 {key})",)
    token_file(tmp_path, "short\n")
    with pytest.raises(ConfigError, match=r"control\.token_file: .*control\.token: control token file: line 1"):
        load_file(path, with_keys=True)


@pytest.mark.parametrize(("section", "problem"), [
    ("control: {token_file: control.token}", "control.token_file: 'control.token' must be an absolute path"),
    ("control: {token: x}", "control.token: unknown key"),
    ("control: [x]", "control: must be a mapping, not a list"),
])
def test_control_section_problems(tmp_path: Path, section: str, problem: str) -> None:
    path = pop_yaml(tmp_path, section)
    with pytest.raises(ConfigError) as caught:
        load_file(path)
    assert any(p.startswith(f"{path}: {problem}") for p in caught.value.problems), caught.value.problems


# --- the endpoints ---------------------------------------------------------------------------


def serve(check: Any, tokens: tuple[bytes, ...] = (TOKEN.encode(),), trail: AuditTrail | None = None) -> None:
    async def main() -> None:
        engine, _, _ = engine_with()
        feed(engine, "a", OK, 2)
        feed(engine, "b", OK, 2)
        ctl = Control("t1", tokens, trail or AuditTrail(None), wall=lambda: 1_800_000_000.0)
        app = make_app(lambda: engine.snapshot({"sessions": {}}), engine, ctl)
        async with TestClient(TestServer(app)) as client:
            await check(client, engine)

    asyncio.run(main())


def untouched(engine: Any) -> bool:
    return not engine.verdict.drained and not engine.server_drains and engine.desired != ()


def test_without_a_token_configured_control_is_forbidden_and_says_how_to_enable_it() -> None:
    async def check(client: TestClient, engine: Any) -> None:
        answer = await client.post("/drain", headers=AUTH)
        assert answer.status == 403 and "control.token_file" in (await answer.json())["error"]
        assert untouched(engine)
        status = await (await client.get("/status")).json()
        assert status["audit"][0]["result"] == "forbidden" and status["audit"][0]["status"] == 403

    serve(check, tokens=())


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-0123456789"},
                                     {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}])
@pytest.mark.parametrize("path", ["/drain", "/undrain", "/servers/a/drain", "/servers/a/undrain"])
def test_a_missing_or_wrong_token_is_401_and_nothing_changes(headers: dict[str, str], path: str) -> None:
    async def check(client: TestClient, engine: Any) -> None:
        engine.drain_server("b")
        before = (engine.verdict.drained, dict(engine.server_drains))
        answer = await client.post(path, headers=headers, json={"reason": "x"})
        assert answer.status == 401 and answer.headers["WWW-Authenticate"] == "Bearer"
        assert "bearer token" in (await answer.json())["error"]
        assert (engine.verdict.drained, dict(engine.server_drains)) == before

    serve(check)


def test_a_bad_body_is_400_naming_the_problem_and_nothing_changes() -> None:
    async def check(client: TestClient, engine: Any) -> None:
        for body, problem in ((b"{nope", "body: not valid JSON"), (b'{"why": "x"}', "body: unknown key 'why'"),
                              (b'{"reason": ["x"]}', "body.reason: must be a string, not a list")):
            answer = await client.post("/servers/a/drain", headers=AUTH, data=body)
            assert answer.status == 400 and (await answer.json())["error"].startswith(problem)
        assert untouched(engine)

    serve(check)


def test_an_oversized_body_is_413_and_nothing_changes() -> None:
    async def check(client: TestClient, engine: Any) -> None:
        answer = await client.post("/drain", headers=AUTH, data=b"{" + b" " * 20000 + b"}")
        assert answer.status == 413
        async def chunks() -> Any:  # no Content-Length: the limit holds while reading
            for _ in range(20):
                yield b" " * 1024
        answer = await client.post("/drain", headers=AUTH, data=chunks())
        assert answer.status == 413
        assert untouched(engine)

    serve(check)


def test_accepted_and_refused_actions_are_audited_shown_escaped_and_counted(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path / "audit.log")

    async def check(client: TestClient, engine: Any) -> None:
        answer = await client.post("/drain", headers=AUTH, json={"reason": "<b>fibre</b> cut", "who": "alice"})
        answered = await answer.json()
        assert answer.status == 200 and (answered["drained"], answered["state"]) == (True, "draining")
        assert answered["ladder"]["current"] == "med 1000" and answered["ladder"]["next_in_seconds"] == 10.0
        assert engine.events[-1].reason == "operator drain by alice: <b>fibre</b> cut: step 1/4 med 1000"
        assert (await client.post("/servers/nope/drain", headers=AUTH)).status == 404
        assert (await client.post("/undrain")).status == 401
        answer = await client.post("/servers/b/drain", headers=AUTH, json={"who": "bob"})
        assert answer.status == 200 and (await answer.json())["drain"] is not None
        status = await (await client.get("/status")).json()
        assert [(a["action"], a["target"], a["who"], a["result"], a["status"]) for a in status["audit"]] == [
            ("drain-server", "b", "bob", "accepted", 200),
            ("undrain", "t1", "unknown", "unauthorized", 401),
            ("drain-server", "nope", "unknown", "not-found", 404),
            ("drain", "t1", "alice", "accepted", 200)]
        assert status["audit"][-1]["time"] == "2027-01-15T08:00:00.000Z" and status["audit"][-1]["from"] == "127.0.0.1"
        page = await (await client.get("/")).text()
        assert "Operator actions" in page and "<b>fibre" not in page and "&lt;b&gt;fibre&lt;/b&gt; cut" in page
        metrics = await (await client.get("/metrics")).text()
        assert 'pop_control_requests_total{action="drain",pop="t1",result="accepted"} 1.0' in metrics
        assert 'pop_control_requests_total{action="undrain",pop="t1",result="unauthorized"} 1.0' in metrics

    serve(check, trail=trail)
    assert len((tmp_path / "audit.log").read_text().splitlines()) == 4


def test_the_gets_stay_open() -> None:
    async def check(client: TestClient, _engine: Any) -> None:
        for path in ("/", "/status", "/metrics"):
            assert (await client.get(path)).status == 200

    serve(check, tokens=())


# --- the command line --------------------------------------------------------------------------


def test_pop_drain_sends_the_token_who_and_reason_and_explains_a_refusal(tmp_path: Path) -> None:
    trail = AuditTrail(None)

    async def check(client: TestClient, engine: Any) -> None:
        key = token_file(tmp_path)
        port = client.port
        path = pop_yaml(tmp_path, f"status: {{port: {port}}}\ncontrol: {{token_file: {key}}}")

        async def pop(*argv: str, user: str = "carol") -> tuple[int, str, str]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pop", *argv, "-c", str(path), env={"USER": user, "PATH": "/usr/bin"},
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate()
            assert proc.returncode is not None
            return proc.returncode, out.decode(), err.decode()

        code, out, _ = await pop("drain", "--reason", "maintenance")
        assert code == 0 and json.loads(out)["drained"] is True and engine.pop_drain is not None
        assert (trail.recent()[0]["who"], trail.recent()[0]["reason"]) == ("carol", "maintenance")
        code, _, _ = await pop("undrain", "--server", "b", "--who", "dave")
        assert code == 0 and trail.recent()[0]["who"] == "dave" and trail.recent()[0]["action"] == "undrain-server"
        code, _, err = await pop("drain", "--server", "zz")
        assert code == 1 and "refused (404): no server named 'zz'" in err
        code, _, err = await pop("drain", "--reason", "x" * 300)
        assert code == 1 and "refused (400): body.reason: 300 characters; at most 200" in err
        token_file(tmp_path, "another-token-0123456789\n")
        code, _, err = await pop("undrain")
        assert code == 1 and "refused (401)" in err and f"the token in {key} is not one the engine holds" in err
        assert engine.pop_drain is not None  # refused: still draining
        key.chmod(0o644)
        code, _, err = await pop("undrain")
        assert code == 2 and "control.token_file" in err and "chmod 600" in err
        code, out, _ = await pop("status")  # open: it needs no readable token
        assert code == 0 and json.loads(out)["state"] == "draining"

    serve(check, trail=trail)
