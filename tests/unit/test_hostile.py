"""Hostile input, fuzzed: what ExaBGP sends the engine, what HTTP clients send the control API,
and configuration reloads. Only the documented error paths, never an unhandled exception, and a
rejected input changes nothing (probe-agent reports: tests/unit/test_external.py; first loads of
pop.yaml: tests/unit/test_config.py)."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pop import control
from pop.adapters.bgp import ExaBgpSpeaker, PeerView
from pop.control_api import Control
from pop.exabgp import (
    Ack,
    EndOfRib,
    NeighborReport,
    NeighborState,
    Other,
    Shutdown,
    Unparsed,
    Update,
    parse_line,
)
from pop.service import _reload
from tests.unit.test_engine import CONFIG, CONFIG_TEXT, engine_with

CAPTURED = Path(__file__).resolve().parent / "captured"
MESSAGES = (Ack, Shutdown, NeighborState, Update, EndOfRib, NeighborReport, Other, Unparsed)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                    max_leaves=30)
SAMPLES = [json.loads(path.read_text()) for path in sorted(CAPTURED.glob("*.json"))]


# --- ExaBGP's messages ---------------------------------------------------------------------


@given(st.text(max_size=400))
@example("done\x00")
@example("{" * 100_000)
@example("[" * 100_000)
@example('{"type": "state", "neighbor": null}')
def test_any_line_parses_to_a_message(line: str) -> None:
    assert isinstance(parse_line(line), MESSAGES)


@given(JSON)
def test_any_json_parses_to_a_message(data: Any) -> None:
    assert isinstance(parse_line(json.dumps(data)), MESSAGES)


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*path, index))
    return found


@given(st.data())
def test_a_real_message_mutated_anywhere_parses_to_a_message(data: st.DataObject) -> None:
    """ExaBGP's own messages (captured from the real thing), with one value replaced anywhere."""
    message = copy.deepcopy(data.draw(st.sampled_from(SAMPLES)))
    path = data.draw(st.sampled_from(_paths(message)[1:]))
    holder = message
    for key in path[:-1]:
        holder = holder[key]
    holder[path[-1]] = data.draw(JSON)
    assert isinstance(parse_line(json.dumps(message)), MESSAGES)


class _Sink:
    """The write end of the API channel: what the speaker sent ExaBGP."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, data: bytes) -> None:
        self.lines += data.decode().splitlines()

    async def drain(self) -> None:
        return None


def speaker(reader: asyncio.StreamReader | None = None) -> ExaBgpSpeaker:
    return ExaBgpSpeaker(CONFIG, reader or asyncio.StreamReader(), _Sink(), clock=lambda: 5.0)  # type: ignore[arg-type]


@given(st.lists(st.text(max_size=200) | JSON.map(json.dumps), max_size=20))
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_messages_about_peers_we_do_not_have_change_nothing(lines: list[str]) -> None:
    """Whatever arrives, the speaker tracks only the configured sessions (its memory stays bounded)."""
    async def main() -> None:
        s = speaker()
        for line in lines:
            s.handle(parse_line(line))
        s.handle(NeighborState("192.0.2.99", "up", ""))
        s.handle(Update("192.0.2.99", ("203.0.113.0/24",), ()))
        s.handle(EndOfRib("192.0.2.99", "ipv4 unicast"))
        assert set(s.peers) == {n.address for n in CONFIG.neighbors} and s.foreign >= 3

    asyncio.run(main())


def test_garbage_and_a_huge_line_between_a_command_and_its_ack_lose_nothing() -> None:
    async def main() -> None:
        reader = asyncio.StreamReader(limit=64 * 1024)
        s = speaker(reader)
        reading = asyncio.create_task(s.read_forever())
        from pop.desired import Announcement

        want = [Announcement("198.51.100.1/32", med=10)]
        setting = asyncio.create_task(s.set(want))
        await asyncio.sleep(0.01)
        reader.feed_data(b"garbage\n" + b"{" * 200_000 + b"\n" + b'{"type": "state"}\n' + b"\xff\xfe\n")
        reader.feed_data(b"done\n")
        await asyncio.wait_for(setting, 2)
        assert s.announced() == tuple(want) and s.unparsed == 4
        assert s.peers == {"10.0.0.1": PeerView()}
        reader.feed_eof()
        await reading

    asyncio.run(main())


# --- the control API -----------------------------------------------------------------------


@given(st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v).encode()))
@example(b"\xef\xbb\xbf{}")
@example(b'{"reason": "' + b"x" * 5000 + b'"}')
@example(b"[" * 50_000)
def test_any_body_is_a_request_or_a_body_error(raw: bytes) -> None:
    try:
        request = control.parse_body(raw)
    except control.BodyError as exc:
        assert str(exc).startswith("body")
        return
    assert request.who and request.who.isprintable() and len(request.reason) <= control.MAX_REASON


@given(st.none() | st.text(max_size=100))
@example("Bearer " + "t" * 32)
@example("bearer   " + "t" * 32)
@example("Bearer\x00" + "t" * 32)
def test_any_authorization_header_is_yes_or_no(header: str | None) -> None:
    assert control.authorized(header, ("t" * 32).encode().split()) in (True, False)


# --- configuration reloads -----------------------------------------------------------------


@given(st.one_of(st.binary(max_size=200), JSON.map(lambda v: json.dumps(v).encode()),
                 st.sampled_from(["servers", "pool", "prefixes", "neighbors", "checks", "external", "control"]).flatmap(
                     lambda key: JSON.map(lambda v, key=key: (CONFIG_TEXT + f"\n{key}: {json.dumps(v)}\n").encode()))))
@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_a_reload_with_a_broken_file_changes_nothing(tmp_path: Path, text: bytes) -> None:
    engine, _, _ = engine_with()
    ctl = Control("t1", (b"t" * 32,))
    path = tmp_path / "pop.yaml"
    path.write_bytes(text)
    before = (engine.config, engine.verdict, dict(engine.health), ctl.tokens)
    reloads = {"ok": 0, "refused": 0}
    try:
        _reload(engine, path, ctl, reloads)
    except Exception as exc:
        raise AssertionError(f"reload raised {exc!r} for {text[:80]!r}") from exc
    if engine.config is not before[0]:
        assert reloads == {"ok": 1, "refused": 0}
        return  # the file happened to be valid: a reload that was not rejected
    assert (engine.config, engine.verdict, dict(engine.health), ctl.tokens) == before
    assert reloads == {"ok": 0, "refused": 1}
