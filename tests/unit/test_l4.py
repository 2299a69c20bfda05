"""Tier-1 checks against real listeners on loopback."""

import asyncio
import contextlib
import socket

from pop.checks.l4 import TcpCheck


def listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()  # bound, never listened, now closed: the kernel answers SYN with RST
    return port


def test_tcp_success_measures_latency() -> None:
    with listener() as sock:
        result = asyncio.run(TcpCheck("127.0.0.1", sock.getsockname()[1], timeout=1.0).probe())
    assert result.ok and result.latency is not None and 0 < result.latency < 1.0


def test_tcp_refused_is_definitive() -> None:
    result = asyncio.run(TcpCheck("127.0.0.1", closed_port(), timeout=1.0).probe())
    assert (result.ok, result.error, result.definitive) == (False, "refused", True)


def test_tcp_silence_is_a_timeout_and_really_returns_on_time() -> None:
    # a full accept queue with SYN cookies off drops further SYNs: the classic silent server
    with listener() as sock:
        sock.listen(0)
        port = sock.getsockname()[1]
        fillers = []
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)

        async def probe() -> tuple[object, float]:
            loop = asyncio.get_running_loop()
            started = loop.time()
            result = await TcpCheck("127.0.0.1", port, timeout=0.3).probe()
            return result, loop.time() - started

        result, took = asyncio.run(probe())
        for filler in fillers:
            filler.close()
    assert not result.ok and result.error == "timeout" and not result.definitive  # type: ignore[attr-defined]
    assert 0.25 < took < 1.0


def test_tcp_probe_is_cancellable() -> None:
    async def main() -> bool:
        # 192.0.2.0/24 (TEST-NET-1) has no route in a namespace-less unit test: use a listener
        # with a full backlog instead, and cancel the probe from outside
        with listener() as sock:
            sock.listen(0)
            port = sock.getsockname()[1]
            others = [socket.create_connection(("127.0.0.1", port), timeout=0.2) for _ in range(1)]
            task = asyncio.create_task(TcpCheck("127.0.0.1", port, timeout=30).probe())
            await asyncio.sleep(0.05)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return True
            finally:
                for other in others:
                    other.close()
            return False

    assert asyncio.run(main())
