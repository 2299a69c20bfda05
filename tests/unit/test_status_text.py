"""The servers' part of /v1/status written as text directly (pop.status.servers_text) is the
same bytes as the dicts of servers_json passed through json.dumps, for every kind of value a
server's picture holds: states, drains, tiers with and without a last result, tails,
reasons with quotes, control and non-ASCII characters, odd numbers, load readings."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pop import status
from pop.checks.base import CheckResult
from pop.drains import ServerDrain
from pop.hysteresis import ServerHealth, State, TierState
from pop.snapshot import ServerSnapshot
from pop.tails import Tail
from tests.unit.test_engine import DOWN, OK, engine_with, feed

text = st.text(max_size=12)
seconds = st.floats(min_value=-1e6, max_value=1e9, allow_nan=False, allow_infinity=False)
odd = st.one_of(seconds, st.integers(-10**6, 10**12), st.sampled_from([math.inf, -math.inf, math.nan, 0.0, -0.0, 1e-9, 1e21]))
maybe = st.one_of(st.none(), odd)
counts = st.integers(0, 10**9)
results = st.builds(CheckResult, ok=st.booleans(), latency=maybe, error=text, definitive=st.booleans(), detail=text)
tier_states = st.builds(TierState, state=st.sampled_from(State), streak=counts, definitive=counts, since=odd,
                        reason=text, last=st.one_of(st.none(), results), successes=counts, failures=counts)
tail_values = st.builds(Tail, count=counts, failures=counts, p50=maybe, p95=maybe, p99=maybe)
loads = st.one_of(st.none(), st.dictionaries(text, st.one_of(st.none(), st.booleans(), odd, text), max_size=3))
pictures = st.builds(
    ServerSnapshot, name=text, address=text, weight=st.integers(0, 1000),
    health=st.builds(ServerHealth, state=st.sampled_from(State), tier=text, reason=text),
    tiers=st.dictionaries(text, tier_states, max_size=3),
    drain=st.one_of(st.none(), st.builds(ServerDrain, since=odd, done=st.booleans(), reason=text)),
    in_pool=st.booleans(), tails=st.dictionaries(text, tail_values, max_size=3), degraded=text,
    factor=odd, load=loads)


def as_dumps(snap: Any, first: int = 0, end: int | None = None) -> str:
    return json.dumps(status.servers_json(snap, first, end), separators=(",", ":"))[1:-1]


@settings(max_examples=300, deadline=None)
@given(at=odd, servers=st.lists(pictures, max_size=4))
def test_any_picture_is_written_as_json_dumps_writes_its_dicts(at: float, servers: list[ServerSnapshot]) -> None:
    snap = SimpleNamespace(at=at, servers=tuple(servers))
    assert status.servers_text(snap) == as_dumps(snap)  # type: ignore[arg-type]  # what the two read of a Snapshot


def test_an_engine_s_servers_in_every_state_are_written_as_json_dumps_writes_them() -> None:
    engine, _, _ = engine_with()
    feed(engine, "a", OK, 3)
    feed(engine, "b", DOWN, 3)
    engine.drain_server("a")
    snap = engine.snapshot({})
    written = status.servers_text(snap)
    assert written == as_dumps(snap) and written.count('"name":') == len(snap.servers)
    assert [s["name"] for s in json.loads(f"[{written}]")] == [s.name for s in snap.servers]
    assert status.servers_text(snap, 1, 2) == as_dumps(snap, 1, 2)
    assert status.servers_text(snap, 5, 9) == "" == as_dumps(snap, 5, 9)
