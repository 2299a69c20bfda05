"""Slow and oversized control requests against a real `pop engine` process: each is cut off
(408 / 413) and costs the engine nothing: its probes keep their schedule, /status answers."""

from __future__ import annotations

import contextlib
import json
import socket
import time
import urllib.request
from pathlib import Path

from pop.status import MAX_AGE
from tests.unit.test_engine_process import spawn, through_start

TOKEN = "slow-client-token-0123456789"
SLOW = 20  # clients that send their headers and then their body a byte at a time, too slowly
INTERVAL = 0.1  # the L4 check's interval while the server is up


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def status(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as answer:
        data: dict[str, object] = json.loads(answer.read())
    return data


def probes(port: int) -> int:
    server = status(port)["servers"][0]  # type: ignore[index]
    tcp = server["tiers"]["tcp"]
    return int(tcp["successes"]) + int(tcp["failures"])


def connect(port: int, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(head)
    return sock


def answer_of(sock: socket.socket) -> bytes:
    """The status line the engine answered, reading until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data.split(b"\r\n", 1)[0]


def engine_config(tmp_path: Path, name: str, server_port: int, interval: float, status: str) -> Path:
    """A one-server engine's configuration with a control token (TOKEN) and this `status`."""
    key = tmp_path / "control.token"
    key.write_text(TOKEN + "\n")
    key.chmod(0o600)
    path = tmp_path / "pop.yaml"
    path.write_text(f"""
pop: {{name: {name}, asn: 65101, router_id: 192.0.2.1, runtime_dir: {tmp_path / "run"}}}
neighbors: [{{address: 127.0.0.2, peer_as: 65000}}]
prefixes: [198.51.100.1/32]
servers: [{{name: a, address: 127.0.0.1, port: {server_port}}}]
checks: {{l4: {{interval: {interval}, fast_interval: 0.05}}}}
status: {status}
control: {{token_file: {key}}}
exabgp: {{withdraw_settle: 0.1}}
""")
    return path


def test_slow_and_oversized_requests_are_cut_off_while_the_probes_keep_their_schedule(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(256)
    port = free_port()
    path = engine_config(tmp_path, "proc", listener.getsockname()[1], INTERVAL, f"{{port: {port}}}")
    held: list[socket.socket] = []
    try:
        with spawn(tmp_path, path) as fake:
            through_start(fake)
            deadline = time.monotonic() + 10
            while True:
                try:
                    status(port)
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the status endpoint never came up"
                    time.sleep(0.05)
            head = (f"POST /drain HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                    f"Content-Type: application/json\r\n").encode()
            before, started = probes(port), time.monotonic()
            slow = [connect(port, head + b"Content-Length: 200\r\n\r\n{") for _ in range(SLOW)]
            declared = connect(port, head + b"Content-Length: 1000000\r\n\r\n")
            chunked = connect(port, head + b"Transfer-Encoding: chunked\r\n\r\n")
            held += [*slow, declared, chunked]
            chunked.sendall(b"".join(b"400\r\n" + b" " * 1024 + b"\r\n" for _ in range(17)))
            assert answer_of(declared) == b"HTTP/1.1 413 Request Entity Too Large"
            assert answer_of(chunked) == b"HTTP/1.1 413 Request Entity Too Large"
            # the slow ones dribble a byte now and then: that must not extend their time
            latencies = []
            while time.monotonic() - started < 4.0:
                for sock in slow:
                    with contextlib.suppress(OSError):  # already cut off
                        sock.send(b" ")
                asked = time.monotonic()
                status(port)
                latencies.append(time.monotonic() - asked)
                time.sleep(0.25)
            answers = {answer_of(sock) for sock in slow}
            elapsed = time.monotonic() - started
            done = probes(port) - before
            assert answers == {b"HTTP/1.1 408 Request Timeout"}
            # one probe every INTERVAL: 10 per second, less the time one probe takes, and less
            # the status's age (the counts are shared for up to MAX_AGE between readers)
            print(f"\nMEASURED {done} probes in {elapsed:.2f} s with {SLOW + 2} slow/oversized control requests "
                  f"open; /status max {max(latencies) * 1000:.0f} ms")
            assert done >= 0.8 * (elapsed - MAX_AGE) / INTERVAL, (done, elapsed)
            assert max(latencies) < 0.5, latencies
            data = status(port)
            assert data["state"] == "announced" and not data["drained"]
            assert {(a["result"], a["status"]) for a in data["audit"]} == {("timeout", 408)}  # type: ignore[union-attr]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
                metrics = answer.read().decode()
            assert f'pop_control_requests_total{{action="drain",pop="proc",result="timeout"}} {SLOW}.0' in metrics
            assert 'pop_control_requests_total{action="drain",pop="proc",result="too-large"} 2.0' in metrics
            assert fake.silent(0.3), "a refused request made the engine send a command"
    finally:
        for sock in held:
            sock.close()
        listener.close()
