"""/v1/status for many readers, from a process of its own (`status.readers_port`).

Every reader of the engine's own endpoint is served on the engine's event loop, the one that
runs the probes: fifty dashboards polling a 1,000-server status back to back fill it, and the
probes start late (docs/decisions.md, "The API stays on the engine's loop"). With
`status.readers_port` the engine starts this module as a child process that serves `GET
/v1/status` and `GET /status` on that port from statuses the engine feeds it, at a lower CPU
priority (nice 10) than the engine: readers then cost the engine a status build at most twice
a second, whatever their number, and never its loop or its GIL.

The feed is a socket pair between the two processes. The child asks for a build with one
byte (ASK) when a reader finds its copy too old; the engine answers with a frame (BUILT, the
status's age at sending, the plain and the gzip'd body), built by the same shared status its
own endpoint serves (pop.status._Shared: never older than MAX_AGE, fresh after every event).
When anything the status shows changes (Engine.status_revision) the engine sends STALE, and
the child's next reader waits for a build made after it, as on the engine's own endpoint.
The child serves nothing else (control, /metrics and the NOC page stay on `status.port`) and
ends when the feed closes (the engine stopped or died); the engine starts it again if it dies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pop.status import MAX_AGE, REFRESH

log = logging.getLogger("pop.readers")

ASK, BUILT, STALE = b"?", b"B", b"S"
_FRAME = struct.Struct("!dII")  # age of the status in seconds, length of the body, of its gzip copy
WATCH = 0.02  # seconds between two looks at the engine's revision
RESPAWN = (1.0, 10.0)  # the first and the longest wait before the child is started again
NICE = 10

Shared = Callable[[], Awaitable[tuple[Mapping[str, Any], bytes, bytes]]]  # pop.status._Shared.get
Age = Callable[[], float]


# --- the engine's side ------------------------------------------------------------------------


class Feed:
    """Starts the readers' process, answers its asks, tells it when its copy is stale, and
    starts it again if it dies."""

    def __init__(self, listen: str, port: int, shared: Shared, age: Age, revision: Callable[[], int]) -> None:
        self.listen, self.port = listen, port
        self.shared, self.age, self.revision = shared, age, revision
        self.process: asyncio.subprocess.Process | None = None
        self._shown: int | None = None  # the revision the child's copy shows; None: none, or told STALE

    async def run(self) -> None:
        wait = RESPAWN[0]
        while True:
            started = time.monotonic()
            await self._once()
            if time.monotonic() - started > RESPAWN[1]:
                wait = RESPAWN[0]  # it ran a while: a new failure, not the same one again
            log.error("readers.exited port=%d restart_in=%.0fs", self.port, wait)
            await asyncio.sleep(wait)
            wait = min(wait * 2, RESPAWN[1])

    async def _once(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pop.readers", "--listen", self.listen, "--port", str(self.port),
                "--fd", str(theirs.fileno()), pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # stdout is ExaBGP's channel
        finally:
            theirs.close()
        log.info("readers.started pid=%d address=%s port=%d", self.process.pid, self.listen, self.port)
        reader, writer = await asyncio.open_connection(sock=ours)
        self._shown = None
        watching = asyncio.create_task(self._watch(writer))
        try:
            while await reader.read(1):  # ASK
                await self._answer(writer)
        except (ConnectionError, OSError) as exc:
            log.error("readers.feed_failed error=%s", exc)
        finally:
            watching.cancel()
            writer.close()
            await self.stop()

    async def _answer(self, writer: asyncio.StreamWriter) -> None:
        """A build that shows the revision it is sent with: one that an event overtook while it
        was made (it is made a slice at a time) is made again, three times at the most; then
        it goes with a STALE after it."""
        for _ in range(3):
            before = self.revision()
            _, body, packed = await self.shared()
            if self.revision() == before:
                break
        writer.write(BUILT + _FRAME.pack(self.age(), len(body), len(packed)) + body + packed)
        self._shown = before
        self._tell(writer)
        await writer.drain()

    async def _watch(self, writer: asyncio.StreamWriter) -> None:
        while True:
            await asyncio.sleep(WATCH)
            self._tell(writer)

    def _tell(self, writer: asyncio.StreamWriter) -> None:
        """STALE once the status shows something the child's copy does not."""
        if self._shown is not None and self.revision() != self._shown:
            self._shown = None
            writer.write(STALE)

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            async with asyncio.timeout(2.0):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


# --- the readers' process -----------------------------------------------------------------------


class Copy:
    """The last status the engine sent, and whether it may still be served (pop.status's rules:
    never older than MAX_AGE, never after STALE; from REFRESH on a reader asks for the next)."""

    def __init__(self, ask: Callable[[], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.ask, self.clock = ask, clock
        self.body = self.packed = b""
        self.at = -1e9  # when the status was built, by our clock
        self.stale = True
        self.asked = False
        self.arrived = asyncio.Event()

    def built(self, age: float, body: bytes, packed: bytes) -> None:
        self.body, self.packed, self.at = body, packed, self.clock() - age
        self.stale = self.asked = False
        self.arrived.set()
        self.arrived = asyncio.Event()

    def outdated(self) -> None:
        self.stale = True

    async def get(self) -> tuple[bytes, bytes, float]:
        """(body, gzip'd body, age) as they may be served now; waits for a build if they may not."""
        while True:
            age = self.clock() - self.at
            if age >= REFRESH or self.stale:
                self._ask()
            if not self.stale and age < MAX_AGE:
                return self.body, self.packed, age
            await self.arrived.wait()

    def _ask(self) -> None:
        if not self.asked:
            self.asked = True
            self.ask()


async def serve(listen: str, port: int, feed: socket.socket) -> None:
    from aiohttp import web

    from pop.status import prebuilt

    reader, writer = await asyncio.open_connection(sock=feed)
    copy = Copy(lambda: writer.write(ASK))

    async def status(request: web.Request) -> web.Response:
        body, packed, age = await copy.get()
        return prebuilt(request, body, packed, max(0.0, age))

    app = web.Application()
    for path in ("/v1/status", "/status"):
        app.router.add_get(path, status)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    for attempt in range(50):  # a predecessor that has not let go of the port yet
        try:
            await web.TCPSite(runner, listen, port, reuse_address=True).start()
            break
        except OSError as exc:
            if attempt == 49:
                log.error("readers.failed address=%s port=%d error=%s", listen, port, exc.strerror or exc)
                return
            await asyncio.sleep(0.1)
    try:
        while kind := await reader.read(1):
            if kind == STALE:
                copy.outdated()
            elif kind == BUILT:
                age, plain, gzipped = _FRAME.unpack(await reader.readexactly(_FRAME.size))
                copy.built(age, await reader.readexactly(plain), await reader.readexactly(gzipped))
            else:
                log.error("readers.bad_frame kind=%r", kind)
                return
    except asyncio.IncompleteReadError:
        pass
    finally:
        await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description="the readers' process of status.readers_port (the engine starts it)")
    parser.add_argument("--listen", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fd", type=int, required=True, help="the engine's end of the feed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    with contextlib.suppress(OSError):
        os.nice(NICE)  # readers wait; the engine's probes do not
    asyncio.run(serve(args.listen, args.port, socket.socket(fileno=args.fd)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
