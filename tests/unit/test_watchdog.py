"""`pop run`'s watchdog: an engine whose event loop stopped beating is killed (ExaBGP respawns it)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pop.config import Config, load
from pop.runner import engine_heartbeat, engine_pidfile, silent_for, watchdog

CONFIG = """
pop: {{name: w1, asn: 65101, router_id: 192.0.2.1, runtime_dir: {runtime}}}
neighbors: [{{address: 10.0.0.1, peer_as: 65000}}]
prefixes: [198.51.100.1/32]
servers: [{{name: a, address: 10.0.2.1}}]
exabgp: {{watchdog: {limit}}}
"""


def config(tmp_path: Path, limit: float = 2.0) -> Config:
    return load(CONFIG.format(runtime=tmp_path, limit=limit))


@pytest.fixture
def engine() -> Iterator[subprocess.Popen[bytes]]:
    """A stand-in for the engine: a child of this process, as the engine is ExaBGP's child."""
    proc = subprocess.Popen(["sleep", "30"])
    yield proc
    proc.kill()
    proc.wait()


def place(cfg: Config, pid: int, beat_age: float | None) -> None:
    engine_pidfile(cfg).parent.mkdir(parents=True, exist_ok=True)
    engine_pidfile(cfg).write_text(f"{pid}\n")
    if beat_age is not None:
        engine_heartbeat(cfg).write_text(f"{time.monotonic() - beat_age:.3f}\n")


def test_silence_is_measured_from_the_monotonic_heartbeat() -> None:
    assert silent_for("100.0\n", 103.5) == 3.5
    assert silent_for("", 103.5) is None  # being written: no judgement
    assert silent_for("garbage", 103.5) is None
    assert silent_for("200.0", 103.5) == 0.0


def test_a_silent_engine_is_killed_and_its_heartbeat_removed(tmp_path: Path, engine: subprocess.Popen[bytes]) -> None:
    cfg = config(tmp_path)
    place(cfg, engine.pid, beat_age=2.5)
    assert watchdog(cfg, exabgp_pid=os.getpid()) == engine.pid
    assert engine.wait(timeout=5) == -9
    assert not engine_heartbeat(cfg).exists()


@pytest.mark.parametrize(("limit", "beat_age", "parent_is_exabgp"), [
    pytest.param(2.0, 1.0, True, id="beating"),
    pytest.param(2.0, None, True, id="no heartbeat yet (starting)"),
    pytest.param(0, 30.0, True, id="watchdog off"),
    pytest.param(2.0, 30.0, False, id="the pid is not ExaBGP's child (a stale pid file)"),
])
def test_the_watchdog_leaves_alone(tmp_path: Path, engine: subprocess.Popen[bytes], limit: float,
                                   beat_age: float | None, parent_is_exabgp: bool) -> None:
    cfg = config(tmp_path, limit)
    place(cfg, engine.pid, beat_age)
    assert watchdog(cfg, exabgp_pid=os.getpid() if parent_is_exabgp else 1) is None
    assert engine.poll() is None
