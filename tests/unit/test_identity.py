"""`pop identity`: one JSON line per connection, and the client's answers and failures."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable

import pytest

from pop.identity import ask_identity, query_identity, serve_identity


def arun(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(main())  # type: ignore[arg-type]


def test_the_client_learns_pop_and_server() -> None:
    async def main() -> None:
        async with await serve_identity("127.0.0.1", 0, "pop1", "vpn11") as server:
            port = server.sockets[0].getsockname()[1]
            assert await ask_identity("127.0.0.1", port, 1.0) == ("pop1", "vpn11")
            assert await ask_identity("127.0.0.1", port, 1.0) == ("pop1", "vpn11")  # every connection
            result = await query_identity("127.0.0.1", port, 1.0)
            assert result.rtt is not None and result.error is None

    arun(main)


def test_a_pop_without_servers_says_server_null() -> None:
    async def main() -> None:
        async with await serve_identity("::1", 0, "pop2") as server:
            assert await ask_identity("::1", server.sockets[0].getsockname()[1], 1.0) == ("pop2", None)

    arun(main)


def test_the_responder_starts_before_its_address_exists() -> None:
    # a container gets its anycast address on lo after its command started: the responder binds
    # it anyway (IP_FREEBIND) and answers once the address is there. 192.0.2.77 is on no host.
    async def main() -> None:
        async with await serve_identity("192.0.2.77", 0, "pop1", "vpn11") as server:
            assert server.sockets[0].getsockname()[0] == "192.0.2.77"

    arun(main)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_refused_port_is_none_and_says_refused() -> None:
    async def main() -> None:
        port = free_port()
        assert await ask_identity("127.0.0.1", port, 1.0) is None
        assert (await query_identity("127.0.0.1", port, 1.0)).error == "refused"

    arun(main)


def test_a_listener_that_never_answers_times_out_within_the_timeout() -> None:
    async def main() -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.read()  # until the client gives up
            finally:
                writer.close()

        async with await asyncio.start_server(silent, "127.0.0.1", 0) as server:
            loop = asyncio.get_running_loop()
            started = loop.time()
            result = await query_identity("127.0.0.1", server.sockets[0].getsockname()[1], 0.2)
            assert result.error == "timeout" and loop.time() - started < 1.0

    arun(main)


@pytest.mark.parametrize(("line", "detail"), [
    (b"hello\n", "not a JSON line"),
    (b"[1]\n", "not a JSON object"),
    (b'{"pop": 7}\n', "pop must be a string"),
    (b'{"pop": "p", "server": 1}\n', "pop must be a string, server a string or null"),
    (b"x" * 5000 + b"\n", "answer longer than 1024 bytes"),
])
def test_a_bad_answer_is_named(line: bytes, detail: str) -> None:
    async def main() -> None:
        async def liar(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(line)
                await writer.drain()
            finally:
                writer.close()

        async with await asyncio.start_server(liar, "127.0.0.1", 0) as server:
            result = await query_identity("127.0.0.1", server.sockets[0].getsockname()[1], 1.0)
            assert result.error == "bad-answer" and detail in result.detail and result.pop is None

    arun(main)


def test_the_command_serves_until_stopped() -> None:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "pop", "identity", "--pop", "pop1", "--server", "vpn1",
                                "--listen", f"127.0.0.1:{port}"], stderr=subprocess.PIPE, text=True)
    try:
        async def main() -> None:
            deadline = asyncio.get_running_loop().time() + 20
            while (answer := await ask_identity("127.0.0.1", port, 0.5)) is None:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                assert asyncio.get_running_loop().time() < deadline, "pop identity did not start listening"
                await asyncio.sleep(0.05)
            assert answer == ("pop1", "vpn1")

        arun(main)
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stderr:
            process.stderr.close()


@pytest.mark.parametrize("listen", ["127.0.0.1", "127.0.0.1:http", ":9191", "[::1]:70000"])
def test_the_command_refuses_a_bad_listen_address(listen: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pop", "identity", "--pop", "p", "--listen", listen],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and f"--listen: {listen!r} is not ADDRESS:PORT" in result.stdout
