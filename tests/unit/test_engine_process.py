"""`pop engine` as a real process, with this test playing ExaBGP on its pipes.

Checks the channel contract: stdout carries only commands, every command waits for its ack,
the engine withdraws first at start and on SIGTERM, garbage from ExaBGP changes nothing, and
an EOF on stdin (ExaBGP gone) ends the engine with a non-zero code.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def config(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "pop.yaml"
    path.write_text(f"""
pop: {{name: proc, asn: 65101, router_id: 192.0.2.1, runtime_dir: {tmp_path / "run"}}}
neighbors: [{{address: 127.0.0.2, peer_as: 65000}}]
prefixes: [198.51.100.1/32]
servers: [{{name: a, address: 127.0.0.1, port: {port}}}]
status: {{enabled: false}}
exabgp: {{withdraw_settle: 0.1}}
""")
    return path


class FakeExaBGP:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.buffer = b""

    def command(self, timeout: float = 5.0) -> str:
        """The next command, answering the engine's start-up question about the sessions."""
        line = self._line(timeout)
        if line == "show neighbor json":
            self.send("done")  # no neighbour configured in this ExaBGP: an empty answer
            line = self._line(timeout)
        return line

    def _line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no command from the engine; so far {self.buffer!r}")
            ready, _, _ = select.select([self.proc.stdout], [], [], remaining)
            if ready:
                chunk = self.proc.stdout.read1(4096)  # type: ignore[attr-defined]
                if not chunk:
                    raise EOFError(f"engine closed stdout; so far {self.buffer!r}")
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def silent(self, seconds: float) -> bool:
        """No command for `seconds` (the start-up question about the sessions is answered)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + seconds
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return True
            line = self._line(1.0)
            if line != "show neighbor json":
                self.buffer = line.encode() + b"\n" + self.buffer
                return False
            self.send("done")
        return False


@pytest.fixture
def server() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield sock
    sock.close()


@contextlib.contextmanager
def spawn(tmp_path: Path, path: Path) -> Iterator[FakeExaBGP]:
    """`pop engine` with this test as its ExaBGP; killed and reaped whatever happens."""
    with open(tmp_path / "engine.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pop", "engine", "-c", str(path)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    try:
        yield FakeExaBGP(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def engine(tmp_path: Path, server: socket.socket) -> Iterator[FakeExaBGP]:
    with spawn(tmp_path, config(tmp_path, server.getsockname()[1])) as fake:
        yield fake


WITHDRAW = "neighbor 127.0.0.2 withdraw route 198.51.100.1/32 next-hop self"
ANNOUNCE = "neighbor 127.0.0.2 announce route 198.51.100.1/32 next-hop self"


def through_start(fake: FakeExaBGP) -> None:
    """A fresh engine's first two commands, acknowledged: withdraw, then announce once its server rose."""
    assert fake.command(timeout=15) == WITHDRAW
    fake.send("done")
    assert fake.command() == ANNOUNCE
    fake.send("done")


def test_channel_contract(engine: FakeExaBGP, tmp_path: Path) -> None:
    # a fresh ExaBGP holds nothing the engine could adopt: it withdraws first
    assert engine.command(timeout=15) == WITHDRAW
    assert engine.silent(0.5), "the engine sent another command before the ack"
    engine.send("done")
    # the server rises (3 probes) and the PoP is announced
    assert engine.command() == ANNOUNCE
    engine.send("done")
    # ExaBGP chatter and garbage change nothing
    engine.send('{"exabgp": "5.0.0", "type": "state", "neighbor": {"address": {"peer": "127.0.0.2"}, "state": "up"}}')
    engine.send("this is not a message")
    engine.send('{"type": "update", "neighbor": {"address": 7}}')
    assert engine.silent(1.0), "garbage from ExaBGP made the engine send a command"
    assert engine.proc.poll() is None
    # SIGTERM: withdraw, wait for the ack, exit 0
    engine.proc.send_signal(signal.SIGTERM)
    assert engine.command() == WITHDRAW
    engine.send("done")
    assert engine.proc.wait(timeout=5) == 0
    log = (tmp_path / "engine.log").read_text()
    assert "bgp.unparsed" in log and "pop.announce" in log


def test_a_refused_announce_is_retried_until_exabgp_accepts_it(engine: FakeExaBGP, tmp_path: Path) -> None:
    assert engine.command(timeout=15) == WITHDRAW
    engine.send("done")
    assert engine.command() == ANNOUNCE
    engine.send("error")  # ExaBGP refused it: nothing else will change, the engine must try again
    refused = time.monotonic()
    assert engine.command(timeout=5) == ANNOUNCE
    assert time.monotonic() - refused >= 0.4  # after the first backoff step, not in a tight loop
    engine.send("error")
    assert engine.command(timeout=5) == ANNOUNCE  # backoff doubles, the retries go on
    engine.send("done")
    assert engine.silent(1.5), "the engine re-sent an acknowledged announcement"
    log = (tmp_path / "engine.log").read_text()
    assert "bgp.failed" in log and "bgp.recovered" in log
    engine.proc.send_signal(signal.SIGTERM)
    assert engine.command() == WITHDRAW
    engine.send("done")
    assert engine.proc.wait(timeout=5) == 0


def test_a_refused_first_announce_is_not_withdrawn_on_exit(engine: FakeExaBGP) -> None:
    assert engine.command(timeout=15) == WITHDRAW
    engine.send("done")
    assert engine.command() == ANNOUNCE
    engine.send("error")  # ExaBGP refused it: the engine must not believe it is announced
    engine.proc.send_signal(signal.SIGTERM)
    # nothing was acknowledged as announced, so there is nothing to withdraw
    assert engine.proc.wait(timeout=5) == 0


def test_no_ack_while_running_is_a_broken_channel_and_ends_the_engine_at_once(tmp_path: Path,
                                                                             server: socket.socket) -> None:
    path = config(tmp_path, server.getsockname()[1])
    path.write_text(path.read_text().replace("exabgp: {withdraw_settle: 0.1}",
                                             "exabgp: {withdraw_settle: 0.1, ack_timeout: 2}"))
    with spawn(tmp_path, path) as fake:
        proc = fake.proc
        assert fake.command(timeout=15) == WITHDRAW
        fake.send("done")
        assert fake.command() == ANNOUNCE
        sent = time.monotonic()  # ExaBGP hangs: no ack comes
        assert proc.wait(timeout=10) == 1
        # 2 s to notice; another 2 s would be a withdraw tried on the dead channel
        assert time.monotonic() - sent < 3.5, "the engine waited another ack timeout on a dead channel"
        text = (tmp_path / "engine.log").read_text()
        assert "engine.channel_broken" in text and "engine.failed" not in text, text
        assert proc.stdout is not None
        assert fake.buffer + proc.stdout.read() == b"", "the engine tried to withdraw on a dead channel"


def test_exabgp_gone_ends_the_engine_with_an_error(engine: FakeExaBGP) -> None:
    assert engine.command(timeout=15) == WITHDRAW
    engine.send("done")
    assert engine.proc.stdin is not None
    engine.proc.stdin.close()
    assert engine.proc.wait(timeout=5) == 1


def handover_file(tmp_path: Path, exabgp_pid: int) -> None:
    """What an engine that died left: ExaBGP (this test's process) announces 198.51.100.1/32."""
    runtime = tmp_path / "run" / "proc"
    runtime.mkdir(parents=True, exist_ok=True)
    (runtime / "announced.json").write_text(json.dumps({"version": 1, "exabgp_pid": exabgp_pid, "announcements": [
        {"prefix": "198.51.100.1/32", "next_hop": "self", "med": None, "local_pref": None, "communities": [],
         "large_communities": [], "as_path_prepend": 0}]}))


def test_a_respawned_engine_adopts_the_announcement_when_its_servers_answer(tmp_path: Path,
                                                                            server: socket.socket) -> None:
    handover_file(tmp_path, os.getpid())
    with spawn(tmp_path, config(tmp_path, server.getsockname()[1])) as fake:
        assert fake.silent(3.0), "a healthy PoP's respawned engine withdrew or re-announced"
        assert "adopted the previous engine's announcement" in (tmp_path / "engine.log").read_text()
        fake.proc.send_signal(signal.SIGTERM)  # it knows what it holds: SIGTERM withdraws it
        assert fake.command() == WITHDRAW
        fake.send("done")
        assert fake.proc.wait(timeout=5) == 0


def test_a_respawned_engine_withdraws_at_once_when_its_servers_are_dead(tmp_path: Path) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    handover_file(tmp_path, os.getpid())
    with spawn(tmp_path, config(tmp_path, closed.getsockname()[1])) as fake:
        started = time.monotonic()
        assert fake.command(timeout=15) == WITHDRAW
        assert time.monotonic() - started < 3.0
        fake.send("done")
    closed.close()


def test_an_engine_under_another_exabgp_does_not_adopt(engine: FakeExaBGP, tmp_path: Path) -> None:
    handover_file(tmp_path, 1)  # the file of an ExaBGP that is gone: nothing is held
    assert engine.command(timeout=15) == WITHDRAW
