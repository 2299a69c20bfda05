"""The BGP adapter: makes ExaBGP announce exactly the desired set of routes.

The engine runs as ExaBGP's API process: commands go out on stdout, and ExaBGP answers each
one with an ack line (`done` / `error`) on stdin, interleaved with JSON messages about the
sessions. `ExaBgpSpeaker.set(announcements)` takes the whole desired set, sends only the
difference from what ExaBGP has acknowledged, and waits for the acks. A command that ExaBGP
rejects leaves the route in its previous state in our books, so the next `set()` retries it.

stdout belongs to ExaBGP: this module is the only writer of it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from pop import fleet
from pop.config import Config
from pop.desired import Announcement
from pop.exabgp import (
    SHOW_ADJ_RIB_IN,
    SHOW_NEIGHBORS,
    Ack,
    EndOfRib,
    Message,
    NeighborReport,
    NeighborState,
    RibEntry,
    Shutdown,
    Unparsed,
    Update,
    announce_commands,
    eor_commands,
    parse_line,
    withdraw_commands,
)

log = logging.getLogger("pop.bgp")


class ChannelError(Exception):
    """The command channel to ExaBGP is broken (EOF, no ack in time)."""


class BgpRefused(Exception):
    """ExaBGP answered `error` to some commands of a `set()`; the others were applied."""


@dataclass(frozen=True, slots=True)
class PeerView:
    state: str = "unknown"
    since: float = 0.0
    reason: str = ""
    received: frozenset[str] = frozenset()  # prefixes this peer announces to us
    eor_received: frozenset[str] = frozenset()  # families the peer has sent End-of-RIB for


class ExaBgpSpeaker:
    """Owns the ExaBGP API channel: writes commands, matches acks, tracks sessions."""

    def __init__(
        self,
        config: Config,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._reader = reader
        self._writer = writer
        self._clock = clock
        self._pending: collections.deque[asyncio.Future[bool]] = collections.deque()
        self._announced: dict[str, Announcement] = {}  # acknowledged by ExaBGP
        self._lock = asyncio.Lock()
        self.peers: dict[str, PeerView] = {n.address: PeerView() for n in config.neighbors}
        self.closed = asyncio.Event()
        self.shutting_down = False  # ExaBGP announced its own shutdown
        self.errors = 0  # commands ExaBGP answered with `error`
        self.unparsed = 0
        self.foreign = 0  # messages about peers that are not ours
        self._eor_ready = False  # End-of-RIB goes out only once the start-up has decided
        self._eor_tasks: set[asyncio.Task[None]] = set()
        # the paths peers send that carry the fleet's marks (pop.fleet), per peer and (prefix,
        # path id); `on_fleet` is called whenever they change
        self.paths: dict[str, dict[tuple[str, str], fleet.Sighting]] = {}
        self.on_fleet: Callable[[], None] | None = None

    def announced(self) -> tuple[Announcement, ...]:
        """Read-back: what ExaBGP has acknowledged announcing."""
        return tuple(self._announced.values())

    async def set(self, announcements: Sequence[Announcement], *, force: bool = False) -> None:
        """Make ExaBGP announce exactly `announcements`. `force` re-sends unchanged ones too.

        Every difference is tried; a refused command leaves its route as it was in our books
        (so the next `set()` tries it again) and, once all were tried, raises BgpRefused
        naming the refused prefixes.
        """
        refused: list[str] = []
        async with self._lock:
            desired = {a.prefix: a for a in announcements}
            for prefix, old in list(self._announced.items()):
                if prefix in desired:
                    continue
                if await self._send_all(withdraw_commands(self.config, prefix, old.next_hop)):
                    del self._announced[prefix]
                    log.info("bgp.withdraw prefix=%s", prefix)
                else:
                    refused.append(f"withdraw {prefix}")
            for prefix, new in desired.items():
                if not force and self._announced.get(prefix) == new:
                    continue
                if await self._send_all(announce_commands(self.config, new)):
                    self._announced[prefix] = new
                    log.info(
                        "bgp.announce prefix=%s med=%s communities=%s prepend=%d",
                        prefix,
                        new.med,
                        ",".join(new.communities) or "-",
                        new.as_path_prepend,
                    )
                else:
                    refused.append(f"announce {prefix}")
        if refused:
            raise BgpRefused("ExaBGP refused: " + ", ".join(refused))

    def adopt(self, announcements: Sequence[Announcement]) -> None:
        """Take into our books what ExaBGP already announces for us (a previous engine's
        routes, pop.handover): an equal `set()` then sends nothing, a different one the
        difference."""
        for announcement in announcements:
            self._announced[announcement.prefix] = announcement

    async def withdraw_configured(self, keep: Collection[str] = ()) -> None:
        """Withdraw every configured prefix but `keep`, announced by us or not.

        A respawned engine does not know what its predecessor left in ExaBGP's RIB beyond what
        it adopts (`keep`: pop.service), so it starts from a clean slate for the rest:
        withdrawing a route that is not announced is harmless.
        """
        async with self._lock:
            for prefix in self.config.prefixes:
                if prefix.prefix in keep:
                    continue
                await self._send_all(withdraw_commands(self.config, prefix.prefix, prefix.next_hop))
                if self._announced.pop(prefix.prefix, None) is not None:
                    log.info("bgp.withdraw prefix=%s", prefix.prefix)  # one we had adopted

    async def end_of_rib(self, peer: str | None = None) -> None:
        """Graceful restart (ExaBGP runs with `manual-eor`): End-of-RIB to every session, or to
        ``peer``, and from now on to each session that comes up. ExaBGP sends it after the
        routes it holds, so a router drops only the stale routes we did not announce again.
        ExaBGP ignores it for a session that is not up; that one gets it when it comes up."""
        if not self.config.exabgp.graceful_restart:
            return
        self._eor_ready = True
        async with self._lock:
            if await self._send_all(eor_commands(self.config, peer)):
                log.info("bgp.end_of_rib_sent peer=%s", peer or "all")

    def _end_of_rib_later(self, peer: str) -> None:
        """A session came up (its routes are in ExaBGP's queue ahead of anything we send now)."""
        if not self._eor_ready or not self.config.exabgp.graceful_restart:
            return

        async def send() -> None:
            with contextlib.suppress(ChannelError, OSError):
                await self.end_of_rib(peer)

        task = asyncio.get_running_loop().create_task(send(), name=f"end-of-rib {peer}")
        self._eor_tasks.add(task)
        task.add_done_callback(self._eor_tasks.discard)

    async def _send_all(self, commands: list[str]) -> bool:
        results = [await self._send(command) for command in commands]
        return all(results)

    async def _send(self, command: str) -> bool:
        if self.closed.is_set():
            raise ChannelError("ExaBGP closed the API channel")
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append(future)
        self._writer.write(command.encode() + b"\n")
        await self._writer.drain()
        try:
            async with asyncio.timeout(self.config.exabgp.ack_timeout):
                ok = await future
        except TimeoutError:
            raise ChannelError(
                f"no ack from ExaBGP within {self.config.exabgp.ack_timeout:g}s for: {command}"
            ) from None
        if not ok:
            self.errors += 1
            log.error("bgp.rejected command=%r", command)
        return ok

    async def refresh_sessions(self) -> None:
        """Ask ExaBGP for every session's state: a respawned engine has seen no change yet.

        `handle()` applies the answer when it arrives, in the stream's order, so it is in
        `peers` once the ack is. An answer we cannot read leaves the sessions as they were
        (counted as unparsed); a refusal or a broken channel is logged, never raised: the
        commands that follow find out about the channel themselves.
        """
        await self._ask(SHOW_NEIGHBORS, "bgp.sessions_unknown")

    async def _ask(self, command: str, event: str) -> None:
        """Send a question whose answer `handle()` takes in; log, never raise, when it fails."""
        try:
            ok = await self._send(command)
        except (ChannelError, OSError) as exc:
            log.warning("%s error=%s", event, exc)
            return
        if not ok:
            log.warning("%s error=ExaBGP refused %r", event, command)

    async def read_fleet(self) -> None:
        """In a fleet, read back every path ExaBGP holds as received (adj-rib-in): ExaBGP passes a
        respawned or restarted engine nothing it received before, and without them the engine
        would see no other PoP (pop.fleet) until their routes change. The answer's lines arrive
        before the ack and go through `handle()` like UPDATEs; a refusal is logged, not raised."""
        if self.config.fleet.id:
            await self._ask(SHOW_ADJ_RIB_IN, "bgp.fleet_unknown")

    async def read_forever(self) -> None:
        """Consume ExaBGP's stdin stream until EOF. Must always run: ExaBGP blocks otherwise."""
        try:
            while True:
                try:
                    line = await self._reader.readline()
                except ValueError:  # a line longer than the stream limit
                    self._note_unparsed(Unparsed("", "line too long"))
                    continue
                if not line:
                    break
                self.handle(parse_line(line.decode(errors="replace")))
        finally:
            self.closed.set()
            while self._pending:
                future = self._pending.popleft()
                if not future.done():
                    future.set_exception(ChannelError("ExaBGP closed the API channel"))

    def handle(self, message: Message) -> None:
        if isinstance(message, Ack):
            while self._pending:
                future = self._pending.popleft()
                if not future.done():
                    future.set_result(message.ok)
                    return
            log.warning("bgp.unexpected_ack ok=%s", message.ok)
        elif isinstance(message, NeighborState):
            if self._ours(message.peer):
                self._set_state(message.peer, message.state, self._clock(), message.reason)
                log.info("bgp.session peer=%s state=%s reason=%s", message.peer, message.state, message.reason or "-")
                if message.state == "up":
                    self._end_of_rib_later(message.peer)
        elif isinstance(message, NeighborReport):
            for neighbor in message.neighbors:
                old = self.peers.get(neighbor.peer, PeerView())
                if not self._ours(neighbor.peer) or old.state == neighbor.state:
                    continue  # what we saw happen is more precise than ExaBGP's whole seconds
                self._set_state(neighbor.peer, neighbor.state, self._clock() - neighbor.up_for, "")
                log.info("bgp.session peer=%s state=%s reason=reported by ExaBGP up_for=%ds",
                         neighbor.peer, neighbor.state, neighbor.up_for)
        elif isinstance(message, Update):
            if self._ours(message.peer):
                old = self.peers[message.peer]
                received = (old.received - set(message.withdrawn)) | set(message.announced)
                self.peers[message.peer] = dataclasses.replace(old, received=frozenset(received))
                self._see_fleet(message)
        elif isinstance(message, RibEntry):
            if self._ours(message.peer):
                self._see_fleet(Update(message.peer, (message.prefix,), (), ((message.prefix, message.path_id),), (),
                                       message.large_communities))
        elif isinstance(message, EndOfRib):
            if self._ours(message.peer):
                old = self.peers[message.peer]
                self.peers[message.peer] = dataclasses.replace(old, eor_received=old.eor_received | {message.family})
                log.info("bgp.end_of_rib peer=%s family=%s", message.peer, message.family)
        elif isinstance(message, Shutdown):
            log.info("bgp.exabgp_shutdown")
            self.shutting_down = True
            self.closed.set()
        elif isinstance(message, Unparsed):
            self._note_unparsed(message)

    def fleet_paths(self) -> list[tuple[str, fleet.Sighting]]:
        """Every fleet-marked path the sessions carry now: (prefix, what it says)."""
        return [(prefix, seen) for paths in self.paths.values() for (prefix, _), seen in paths.items()]

    def _see_fleet(self, message: Update) -> None:
        """Keep the paths that carry the fleet's marks, of any prefix (a reload may add one to
        this PoP's): a handful of anycast prefixes, whatever else the table holds."""
        tag = self.config.fleet.tag
        if not tag:
            return
        paths = self.paths.setdefault(message.peer, {})
        before = dict(paths)
        for path in message.withdrawn_paths:
            paths.pop(path, None)
        seen = fleet.sighting(message.large_communities, tag)
        for path in message.announced_paths:
            if seen is None:
                paths.pop(path, None)  # a path replaced by one without the marks
            else:
                paths[path] = seen
        if paths != before:
            self._fleet_changed()

    def _fleet_changed(self) -> None:
        if self.on_fleet is not None:
            self.on_fleet()

    def _ours(self, peer: str) -> bool:
        """Only the configured sessions are tracked: a message about any other peer is counted
        and dropped, so what ExaBGP (or anything on its pipe) says cannot grow our books."""
        if peer in self.peers:
            return True
        self.foreign += 1
        log.warning("bgp.unknown_peer peer=%r (not in neighbors: ignored)", peer[:100])
        return False

    def _set_state(self, peer: str, state: str, since: float, reason: str) -> None:
        old = self.peers.get(peer, PeerView())
        up = state == "up"  # what a peer sent belongs to its session
        if not up and self.paths.pop(peer, {}):
            self._fleet_changed()
        self.peers[peer] = PeerView(state, since, reason, old.received if up else frozenset(),
                                    old.eor_received if up else frozenset())

    def _note_unparsed(self, message: Unparsed) -> None:
        self.unparsed += 1
        log.warning("bgp.unparsed problem=%s line=%r", message.problem, message.line)
