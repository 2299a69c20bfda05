"""The API of a real `pop engine` process (this test plays ExaBGP): /healthz, /metrics as
`promtool check metrics` sees it, and the announce history across a restart."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_control_process import free_port
from tests.unit.test_engine_process import ANNOUNCE, WITHDRAW, FakeExaBGP, spawn


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            get(port, "/healthz")
            return
        except OSError:
            assert time.monotonic() < deadline, "the status endpoint never came up"
            time.sleep(0.05)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)  # never accepted: the backlog must outlast two engines' probes
    yield sock
    sock.close()


def config(tmp_path: Path, server_port: int, port: int) -> Path:
    path = tmp_path / "pop.yaml"
    path.write_text(f"""
pop: {{name: api, asn: 65101, router_id: 192.0.2.1, runtime_dir: {tmp_path / "run"}}}
neighbors: [{{address: 127.0.0.2, peer_as: 65000}}]
prefixes: [198.51.100.1/32]
servers: [{{name: a, address: 127.0.0.1, port: {server_port}}}]
checks: {{l4: {{interval: 0.1, fast_interval: 0.05}}}}
status: {{port: {port}}}
availability: {{slo: 0.999}}
exabgp: {{withdraw_settle: 0.1}}
""")
    return path


def announced(fake: FakeExaBGP) -> None:
    assert fake.command(timeout=15) == WITHDRAW
    fake.send("done")
    assert fake.command() == ANNOUNCE
    fake.send("done")


def test_healthz_and_promtool_accept_a_real_engines_metrics(tmp_path: Path, listener: socket.socket) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is missing: Debian's `prometheus` package ships it (.ci/install installs it)")
    port = free_port()
    with spawn(tmp_path, config(tmp_path, listener.getsockname()[1], port)) as fake:
        announced(fake)
        wait_listening(port)
        assert get(port, "/healthz") == (200, b'{"ok": true}')
        time.sleep(0.3)  # a few probes, so that the histogram has counts
        status, metrics = get(port, "/metrics")
        assert status == 200 and b'pop_announced{pop="api",prefix="198.51.100.1/32"} 1.0' in metrics
        assert b'pop_check_duration_seconds_count{pop="api",tier="tcp"}' in metrics
        checked = subprocess.run([promtool, "check", "metrics"], input=metrics, capture_output=True, timeout=30,
                                 check=False)
        assert checked.returncode == 0 and not checked.stdout and not checked.stderr, checked


def test_the_announce_history_survives_a_restart_and_counts_the_gap(tmp_path: Path,
                                                                    listener: socket.socket) -> None:
    port = free_port()
    path = config(tmp_path, listener.getsockname()[1], port)
    with spawn(tmp_path, path) as fake:
        announced(fake)
        wait_listening(port)
        time.sleep(1.0)
        fake.proc.send_signal(signal.SIGTERM)
        assert fake.command() == WITHDRAW
        fake.send("done")
        assert fake.proc.wait(timeout=10) == 0
    time.sleep(1.0)  # no engine: unknown, counted as down
    with spawn(tmp_path, path) as fake:
        # this test is still the same ExaBGP, which holds the route: the new engine adopts it
        assert fake.silent(3.0)
        wait_listening(port)
        day = json.loads(get(port, "/v1/status")[1])["availability"]["windows"]["24h"]
    assert day["announced_seconds"] >= 1.0  # the first run's second announced is remembered
    assert day["withdrawn_seconds"]["engine"] >= 1.0  # the second without an engine, and both start-ups
    marks = [json.loads(line) for line in (tmp_path / "run" / "api" / "availability.log").read_text().splitlines()]
    assert [(m["announced"], m["cause"]) for m in marks] == [(False, "engine"), (True, ""), (False, "engine"),
                                                             (True, "")]
