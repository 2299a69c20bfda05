"""Who answers on this address: a one-line TCP identity responder and its client.

A probe agent connects to the anycast address and learns which PoP (and which server behind
it) its packets land on, which maps the catchments. The responder writes one JSON line,
`{"pop": "pop1", "server": "vpn11"}` (`server` is null when not given), as soon as a
connection is accepted, and closes; it reads nothing, so there is nothing to parse and
nothing to hold open. Servers behind an ECMP/IPVS PoP run it on the anycast address (`pop
identity --pop P --server S --listen ADDR:PORT`); a PoP without a data plane runs it itself.

`query_identity` never raises for a failed target: the failure is the result's `error`
("timeout", "refused", "unreachable", "bad-answer", "error"), like the health checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import socket
import time
from dataclasses import dataclass

_MAX_ANSWER = 1024
_IP_FREEBIND = 15  # linux/in.h; not exported by the socket module (also valid on IPv6 sockets)


@dataclass(frozen=True, slots=True)
class IdentityResult:
    pop: str | None = None
    server: str | None = None
    rtt: float | None = None  # seconds from connect to the answer
    error: str | None = None
    detail: str = ""


def answer_line(pop: str, server: str | None) -> bytes:
    return json.dumps({"pop": pop, "server": server}).encode() + b"\n"


async def serve_identity(host: str, port: int, pop: str, server: str | None = None) -> asyncio.Server:
    """Listen on host:port (port 0: any free port) and answer every connection with who we are."""
    line = answer_line(pop, server)

    async def answer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(line)
            async with asyncio.timeout(2.0):  # a client that never reads cannot hold the task
                await writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(2.0):
                    await writer.wait_closed()

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR: a restarted responder binds at once despite the last one's TIME_WAITs;
        # IP_FREEBIND: the anycast address may be added to lo after the responder starts (a
        # container's addresses come after its command), and it must answer once it is there
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_IP, _IP_FREEBIND, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return await asyncio.start_server(answer, sock=sock)


# a timeout parameter, not asyncio.timeout around the call: running out of time is a result
# ("timeout"), like a health check's, not an exception
async def query_identity(address: str, port: int, timeout: float) -> IdentityResult:  # noqa: ASYNC109
    """Connect to address:port and read who answered, within `timeout` seconds in all."""
    started = time.monotonic()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(address, port, limit=_MAX_ANSWER)
            data = await reader.readline()
    except TimeoutError:
        return IdentityResult(error="timeout", detail=f"no answer within {timeout:g} s")
    except ValueError:  # a line longer than the limit
        return IdentityResult(error="bad-answer", detail=f"answer longer than {_MAX_ANSWER} bytes")
    except ConnectionRefusedError:
        return IdentityResult(error="refused", detail=f"port {port} refused")
    except OSError as exc:
        unreachable = exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)
        return IdentityResult(error="unreachable" if unreachable else "error", detail=str(exc))
    finally:
        if writer is not None:
            writer.close()
    rtt = time.monotonic() - started
    return _parse(data, rtt)


async def ask_identity(address: str, port: int, timeout: float) -> tuple[str, str | None] | None:  # noqa: ASYNC109
    """(pop, server) of whoever answers on address:port, or None when nobody answers properly."""
    result = await query_identity(address, port, timeout)
    return None if result.pop is None else (result.pop, result.server)


def _parse(data: bytes, rtt: float) -> IdentityResult:
    try:
        answer = json.loads(data)
    except ValueError:
        return IdentityResult(rtt=rtt, error="bad-answer", detail=f"not a JSON line: {data[:80]!r}")
    if not isinstance(answer, dict):
        return IdentityResult(rtt=rtt, error="bad-answer", detail="not a JSON object")
    pop, server = answer.get("pop"), answer.get("server")
    if not isinstance(pop, str) or not (server is None or isinstance(server, str)):
        return IdentityResult(rtt=rtt, error="bad-answer", detail="pop must be a string, server a string or null")
    return IdentityResult(pop=pop, server=server, rtt=rtt)
