"""pop/readers.py without processes: the engine's answers and the readers' copy."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import pytest

from pop import readers
from pop.status import MAX_AGE, REFRESH
from tests.unit.test_engine import ManualClock


async def frames(sock: socket.socket, count: int) -> list[tuple[bytes, bytes]]:
    """(kind, body) of the next ``count`` frames on the child's end of the feed."""
    reader, writer = await asyncio.open_connection(sock=sock)
    found = []
    for _ in range(count):
        kind = await reader.readexactly(1)
        body = b""
        if kind == readers.BUILT:
            _, plain, gzipped = struct.unpack("!dII", await reader.readexactly(16))
            body = await reader.readexactly(plain)
            await reader.readexactly(gzipped)
        found.append((kind, body))
    writer.close()
    return found


def test_a_build_that_an_event_overtook_is_made_again_and_one_overtaken_every_time_goes_with_stale() -> None:
    async def main(changes_per_build: int) -> list[tuple[bytes, bytes]]:
        revision = [0]
        builds = []

        async def shared() -> tuple[dict[str, Any], bytes, bytes]:
            builds.append(revision[0])
            revision[0] += changes_per_build  # an event while it was made
            return {}, b"r%d" % builds[-1], b""

        feed = readers.Feed("127.0.0.1", 0, shared, lambda: 0.0, lambda: revision[0])
        ours, theirs = socket.socketpair()
        _, writer = await asyncio.open_connection(sock=ours)
        await feed._answer(writer)
        got = await frames(theirs, 2 if changes_per_build else 1)
        writer.close()
        return got

    assert asyncio.run(main(0)) == [(readers.BUILT, b"r0")]
    assert asyncio.run(main(1)) == [(readers.BUILT, b"r2"), (readers.STALE, b"")]  # three tries, then STALE


def test_the_readers_copy_is_served_until_refresh_then_refreshed_and_never_past_max_age_or_stale() -> None:
    async def main() -> None:
        clock = ManualClock()
        asks: list[float] = []
        copy = readers.Copy(lambda: asks.append(clock.now), clock)
        waiting = asyncio.create_task(copy.get())  # nothing yet: asks and waits
        await asyncio.sleep(0)
        assert not waiting.done() and len(asks) == 1
        copy.built(0.1, b"one", b"1")
        body, packed, age = await waiting
        assert (body, packed) == (b"one", b"1") and age == pytest.approx(0.1)
        clock.now += REFRESH  # old enough to refresh, young enough to serve: asks once, serves
        assert (await copy.get())[0] == b"one" and (await copy.get())[0] == b"one" and len(asks) == 2
        clock.now += MAX_AGE  # too old: waits for the build asked for
        late = asyncio.create_task(copy.get())
        await asyncio.sleep(0)
        assert not late.done() and len(asks) == 2
        copy.built(0.0, b"two", b"2")
        assert (await late)[0] == b"two"
        copy.outdated()  # STALE: the next reader waits for a build after it
        after = asyncio.create_task(copy.get())
        await asyncio.sleep(0)
        assert not after.done() and len(asks) == 3
        copy.built(0.0, b"three", b"3")
        assert (await after)[0] == b"three"

    asyncio.run(main())
