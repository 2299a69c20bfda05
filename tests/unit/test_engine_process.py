"""`pop engine` as a real process, with this test playing ExaBGP on its pipes.

Checks the channel contract: stdout carries only commands, every command waits for its ack,
the engine withdraws first at start and on SIGTERM, garbage from ExaBGP changes nothing, and
an EOF on stdin (ExaBGP gone) ends the engine with a non-zero code.
"""

from __future__ import annotations

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
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], seconds)
        return not ready and b"\n" not in self.buffer


@pytest.fixture
def server() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield sock
    sock.close()


@pytest.fixture
def engine(tmp_path: Path, server: socket.socket) -> Iterator[FakeExaBGP]:
    with open(tmp_path / "engine.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pop", "engine", "-c", str(config(tmp_path, server.getsockname()[1]))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    yield FakeExaBGP(proc)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


WITHDRAW = "neighbor 127.0.0.2 withdraw route 198.51.100.1/32 next-hop self"
ANNOUNCE = "neighbor 127.0.0.2 announce route 198.51.100.1/32 next-hop self"


def test_channel_contract(engine: FakeExaBGP, tmp_path: Path) -> None:
    # a respawned engine cannot know what is announced: it withdraws first
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


def test_rejected_command_is_retried_not_lost(engine: FakeExaBGP) -> None:
    assert engine.command(timeout=15) == WITHDRAW
    engine.send("done")
    assert engine.command() == ANNOUNCE
    engine.send("error")  # ExaBGP refused it: the engine must not believe it is announced
    engine.proc.send_signal(signal.SIGTERM)
    # nothing was acknowledged as announced, so there is nothing to withdraw
    assert engine.proc.wait(timeout=5) == 0


def test_exabgp_gone_ends_the_engine_with_an_error(engine: FakeExaBGP) -> None:
    assert engine.command(timeout=15) == WITHDRAW
    engine.send("done")
    assert engine.proc.stdin is not None
    engine.proc.stdin.close()
    assert engine.proc.wait(timeout=5) == 1
