"""ExaBgpSpeaker on a real socket, with this test playing ExaBGP at the other end.

What ExaBGP writes comes from tests/unit/captured (lines ExaBGP 5.0.15 really wrote).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from pop.adapters.bgp import ExaBgpSpeaker, PeerView
from pop.config import load
from pop.desired import Announcement
from pop.exabgp import SHOW_NEIGHBORS

CAPTURED = Path(__file__).parent / "captured"
PEER = "10.0.1.1"
CONFIG = load(f"""
pop: {{name: ams1, asn: 65101, router_id: 192.0.2.11}}
neighbors: [{{address: {PEER}, peer_as: 65000}}]
prefixes: [198.51.100.1/32]
servers: [{{name: vpn1, address: 10.0.2.10}}]
exabgp: {{ack_timeout: 2}}
""", "pop.yaml")
NOW = 1000.0


def captured(name: str) -> str:
    return (CAPTURED / name).read_text().strip()


@dataclass
class Channel:
    speaker: ExaBgpSpeaker
    exabgp_in: asyncio.StreamReader  # what the engine wrote
    exabgp_out: asyncio.StreamWriter  # what ExaBGP writes to the engine

    async def command(self) -> str:
        async with asyncio.timeout(2):
            return (await self.exabgp_in.readline()).decode().rstrip("\n")

    async def write(self, *lines: str) -> None:
        self.exabgp_out.write("".join(line + "\n" for line in lines).encode())
        await self.exabgp_out.drain()


@contextlib.asynccontextmanager
async def _channel() -> AsyncIterator[Channel]:
    engine_end, exabgp_end = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=engine_end)
    exabgp_in, exabgp_out = await asyncio.open_connection(sock=exabgp_end)
    speaker = ExaBgpSpeaker(CONFIG, reader, writer, clock=lambda: NOW)
    reading = asyncio.create_task(speaker.read_forever())
    try:
        yield Channel(speaker, exabgp_in, exabgp_out)
    finally:
        reading.cancel()
        for end in (writer, exabgp_out):
            end.close()
        await asyncio.gather(reading, writer.wait_closed(), exabgp_out.wait_closed(), return_exceptions=True)


def on_channel(scenario: Callable[[Channel], Awaitable[None]]) -> Callable[[], None]:
    """Turns `async def test_x(channel)` into a plain test run on a fresh channel."""
    async def run() -> None:
        async with _channel() as channel:
            await scenario(channel)

    def test() -> None:
        asyncio.run(run())

    test.__doc__ = scenario.__doc__
    return test


async def refresh(channel: Channel, *answer: str) -> None:
    """The engine asks for the sessions; ExaBGP answers with `answer`."""
    refreshing = asyncio.create_task(channel.speaker.refresh_sessions())
    assert await channel.command() == SHOW_NEIGHBORS
    await channel.write(*answer)
    await refreshing


@on_channel
async def test_refresh_sessions_learns_an_established_session_and_since_when(channel: Channel) -> None:
    await refresh(channel, captured("show-neighbor-json-up.json"), "done")
    assert channel.speaker.peers[PEER] == PeerView(state="up", since=NOW - 4)
    assert channel.speaker.unparsed == 0


@on_channel
async def test_refresh_sessions_learns_a_session_that_is_down(channel: Channel) -> None:
    await refresh(channel, captured("show-neighbor-json-down.json"), "done")
    assert channel.speaker.peers[PEER] == PeerView(state="down", since=NOW)


@on_channel
async def test_an_unreadable_answer_leaves_the_session_unknown(channel: Channel) -> None:
    await refresh(channel, '[{"state": "up", "fsm": "ESTABLISHED"}]', "done")
    assert channel.speaker.peers[PEER].state == "unknown"
    assert channel.speaker.unparsed == 1


@on_channel
async def test_a_refused_show_leaves_the_session_unknown_and_does_not_raise(channel: Channel) -> None:
    await refresh(channel, "error")
    assert channel.speaker.peers[PEER].state == "unknown"


@on_channel
async def test_a_closed_channel_leaves_the_session_unknown_and_does_not_raise(channel: Channel) -> None:
    channel.exabgp_out.close()
    await asyncio.wait_for(channel.speaker.closed.wait(), 2)
    await channel.speaker.refresh_sessions()
    assert channel.speaker.peers[PEER].state == "unknown"


@on_channel
async def test_a_refresh_between_other_commands_keeps_their_acks_paired(channel: Channel) -> None:
    speaker = channel.speaker
    refreshing = asyncio.create_task(speaker.refresh_sessions())
    assert await channel.command() == SHOW_NEIGHBORS
    announcing = asyncio.create_task(speaker.set([Announcement("198.51.100.1/32")]))
    assert (await channel.command()).startswith(f"neighbor {PEER} announce route 198.51.100.1/32")
    # ExaBGP answers in order: the report and its ack, then the announce's ack (refused)
    await channel.write(captured("show-neighbor-json-up.json"), "done", "error")
    await refreshing
    await asyncio.gather(announcing, return_exceptions=True)  # a refusal may also be raised
    assert speaker.peers[PEER].state == "up"
    assert speaker.announced() == ()  # the `error` went to the announce, not to the show


@on_channel
async def test_end_of_rib_is_recorded_per_family_and_forgotten_when_the_session_drops(channel: Channel) -> None:
    speaker = channel.speaker
    await channel.write('{"type": "state", "neighbor": {"address": {"peer": "10.0.1.1"}, "state": "up"}}',
                        captured("bird-end-of-rib.json"))
    await asyncio.wait_for(_until(lambda: bool(speaker.peers[PEER].eor_received)), 2)
    assert speaker.peers[PEER].eor_received == frozenset({"ipv4 unicast"})
    assert speaker.unparsed == 0
    await channel.write('{"type": "state", "neighbor": {"address": {"peer": "10.0.1.1"}, "state": "down"}}')
    await asyncio.wait_for(_until(lambda: speaker.peers[PEER].state == "down"), 2)
    assert speaker.peers[PEER].eor_received == frozenset()


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0)
