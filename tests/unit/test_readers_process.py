"""status.readers_port: /v1/status from a process of its own, fed by a real `pop engine`
(pop/readers.py). It serves what the engine's own endpoint serves, shows an operator's
action before its copy would have aged out, comes back when it dies, and ends with the
engine."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pop.readers import RESPAWN
from pop.status import AGE_HEADER, MAX_AGE, REFRESH
from tests.unit.test_control_process import TOKEN, engine_config, free_port
from tests.unit.test_engine_process import ANNOUNCE, FakeExaBGP, spawn, through_start


def read(port: int, gzipped: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/status",
                                     headers={"Accept-Encoding": "gzip" if gzipped else "identity"})
    with urllib.request.urlopen(request, timeout=2) as answer:
        body = answer.read()
        headers = dict(answer.headers)
    if headers.get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    data: dict[str, Any] = json.loads(body)
    return data, headers


def until(what: str, predicate: Any, timeout: float) -> float:
    """Seconds until ``predicate()`` is true (an OSError counts as not yet)."""
    started = time.monotonic()
    while True:
        try:
            if predicate():
                return time.monotonic() - started
        except OSError:
            pass
        assert time.monotonic() - started < timeout, f"{what} not within {timeout} s"
        time.sleep(0.02)


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(p) for p in (task / "children").read_text().split()}
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def announced_engine(tmp_path: Path) -> Iterator[tuple[FakeExaBGP, int, int]]:
    """A real `pop engine` with status.readers_port, announced: (its ExaBGP, status.port, readers_port)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)  # nobody accepts: the probes' connections wait in the backlog
    port, readers = free_port(), free_port()
    path = engine_config(tmp_path, "readers", listener.getsockname()[1], 0.1,
                         f"{{port: {port}, readers_port: {readers}}}")
    try:
        with spawn(tmp_path, path) as fake:
            through_start(fake)
            until("the readers' port", lambda: read(readers)[0]["state"] == "announced", 15)
            yield fake, port, readers
    finally:
        listener.close()


def test_the_readers_port_serves_what_the_engines_own_endpoint_serves_and_nothing_else(tmp_path: Path) -> None:
    with announced_engine(tmp_path) as (_, port, readers):
        own, _ = read(port)
        for gzipped in (False, True):
            theirs, headers = read(readers, gzipped)
            assert headers.get("Content-Encoding") == ("gzip" if gzipped else None)
            assert 0.0 <= float(headers[AGE_HEADER]) < MAX_AGE
            assert {k: theirs[k] for k in ("api", "pop", "state", "announced")} == \
                   {k: own[k] for k in ("api", "pop", "state", "announced")}
            assert [s["name"] for s in theirs["servers"]] == ["a"] and theirs["servers"][0]["in_pool"]
        assert read(readers)[0] == read(readers)[0]  # shared: the same status twice in a row
        for path, method in (("/metrics", "GET"), ("/v1/drain", "POST")):
            request = urllib.request.Request(f"http://127.0.0.1:{readers}{path}", method=method,
                                             data=b"{}" if method == "POST" else None,
                                             headers={"Authorization": f"Bearer {TOKEN}"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=2)
            refused.value.close()
            assert refused.value.code in (404, 405), (path, refused.value.code)
        assert read(port)[0]["state"] == "announced"


def test_an_action_shows_on_the_readers_port_before_the_copy_ages_out_and_the_process_follows_the_engine(
        tmp_path: Path) -> None:
    with announced_engine(tmp_path) as (fake, port, readers):
        # a copy just built: without STALE it would be served until it is REFRESH old
        until("a fresh copy", lambda: float(read(readers)[1][AGE_HEADER]) < 0.05, 5)
        drain = urllib.request.Request(f"http://127.0.0.1:{port}/v1/drain", method="POST", data=b"{}",
                                       headers={"Authorization": f"Bearer {TOKEN}",
                                                "Content-Type": "application/json"})
        with urllib.request.urlopen(drain, timeout=2) as answer:
            assert answer.status == 200
        assert fake.command().startswith(ANNOUNCE + " med ")  # the ladder's first step
        fake.send("done")
        shown = until("the drain on the readers' port", lambda: read(readers)[0]["state"] == "draining",
                      REFRESH / 2)
        print(f"\nMEASURED the drain showed on the readers' port {shown * 1000:.0f} ms after the POST")
        # the readers' process dies: the engine starts another one
        (first,) = children(fake.proc.pid)
        os.kill(first, signal.SIGKILL)
        until("a new readers' process", lambda: children(fake.proc.pid) - {first}, RESPAWN[0] + 10)
        until("the new process to serve", lambda: read(readers)[0]["state"] == "draining", 10)
        (second,) = children(fake.proc.pid)
    # the engine is gone (killed, as if it died): so is its readers' process
    until("the readers' process to end with the engine", lambda: not alive(second), 5)
