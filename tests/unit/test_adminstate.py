"""Drains survive an engine restart: the engine's admin state round-trips through drains.json."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from pop.adminstate import AdminState, AdminStateError, ServerDrainRecord, parse, to_dict
from pop.config import load
from pop.engine import Engine
from tests.unit.test_engine_order import CONFIG_TEXT_NO_HOLD_DOWN, POLICY, FakeSpeaker, Scripted, World


def engine(clock: list[float]) -> Engine:
    config = load(CONFIG_TEXT_NO_HOLD_DOWN.replace("withdraw_dwell: 1.0", "withdraw_dwell: 1.0, drain_timeout: 60"))
    return Engine(config, FakeSpeaker(World()), {n: [(Scripted(), POLICY)] for n in ("a", "b")},
                  clock=lambda: clock[0])


def test_drains_round_trip_through_a_new_engine() -> None:
    async def main() -> None:
        clock = [100.0]
        old = engine(clock)
        saved: list[dict[str, Any]] = []
        old.on_admin_change = lambda: saved.append(to_dict(old.admin_state(wall=5000.0 + clock[0], now=clock[0])))
        old.drain()
        clock[0] = 110.0
        old.drain_server("b")
        assert saved[-1]["pop_drained"] is True and set(saved[-1]["servers"]) == {"b"}

        # the engine dies 30 s later; its successor (a fresh monotonic clock) reads the file
        new_clock = [7.0]
        new = engine(new_clock)
        new.restore_admin(parse(saved[-1], {"a", "b"}), wall=5000.0 + 140.0)
        assert new.verdict.drained and not new.verdict.announce
        drain = new.server_drains["b"]
        assert new_clock[0] - drain.since == pytest.approx(30.0) and not drain.done
        new.finish_drains({"10.0.2.2": 4})  # drain_timeout 60 s counts from the original drain
        assert not new.server_drains["b"].done
        new_clock[0] += 31.0
        new.finish_drains({"10.0.2.2": 4})
        assert new.server_drains["b"].done
        new.undrain()
        assert not new.verdict.drained

    asyncio.run(main())


def test_servers_no_longer_configured_are_dropped_and_named() -> None:
    state = parse({"version": 1, "pop_drained": False,
                   "servers": {"a": {"since": 1.0, "done": True, "reason": "drained: x"},
                               "gone": {"since": 1.0, "done": False, "reason": "draining"}}}, {"a", "b"})
    assert state == AdminState(False, {"a": ServerDrainRecord(1.0, True, "drained: x")}, ("gone",))


@pytest.mark.parametrize(("data", "message"), [
    ([], "must be a JSON object, not list"),
    ({"version": 2, "pop_drained": False}, "version: 2 is not 1"),
    ({"version": 1, "pop_drained": "yes"}, "pop_drained: must be true or false"),
    ({"version": 1, "pop_drained": False, "servers": []}, "servers: must be an object"),
    ({"version": 1, "pop_drained": False, "servers": {"a": {"since": "now", "done": False, "reason": ""}}},
     "servers.a.since: must be a time in seconds"),
    ({"version": 1, "pop_drained": False, "servers": {"a": {"since": 1.0, "done": 1, "reason": ""}}},
     "servers.a: needs done (true/false) and reason (text)"),
])
def test_a_broken_file_is_named_precisely(data: object, message: str) -> None:
    with pytest.raises(AdminStateError, match=re.escape(message)):
        parse(data, {"a"})
