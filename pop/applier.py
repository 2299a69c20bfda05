"""The applier: makes the adapters hold the newest desired state, and keeps them holding it.

The engine decides; the applier makes it so (Seesaw's network-control side). The engine hands
it one immutable DesiredState at a time with `want()`; the applier alone talks to the BGP
speaker and the kernel data plane, and owns everything about *how*:

- order: announcing, the data plane first (VIP, IPVS services, pins, routes), then BGP, so
  the first packet attracted finds a server; withdrawing, BGP first, and the data plane
  stays for `dataplane.withdraw_dwell`, still following health (a server that dies during
  the dwell leaves it), then is torn down. A re-announce during the dwell cancels the
  teardown. Never announce onto a data plane that failed to come up; never tear the data
  plane down while the withdraw was refused.
- coalescing: only the newest desired state is applied; states wanted while a pass runs
  are folded into the next pass.
- retry with backoff: a step that failed (a kernel error) or was refused (ExaBGP answered
  `error`) is retried after 0.5 s, doubling up to 30 s, until it succeeds; meanwhile the
  failure is on /status (`status()`) and in the metrics.
- read-back: every `verify_interval` the data plane is set again with `verify=True`, which
  bypasses the adapters' caches and compares with what the kernel really holds; whatever
  was changed behind pop's back is repaired and logged (`dataplane.repaired`). Every
  `exabgp.reassert_interval` (if set) every announcement is re-sent.
- reconfigure: on a reload the adapters are rebuilt for the new configuration before the
  next pass, so adding or removing servers, prefixes and services works in every mode.

A broken command channel (pop.adapters.bgp.ChannelError) is not retried: it propagates, and
the engine ends (ExaBGP respawns a fresh one).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from pop.adapters.bgp import BgpRefused
from pop.config import Config, Prefix
from pop.config import Dataplane as DataplaneConfig
from pop.desired import Announcement, DesiredState

log = logging.getLogger("pop.applier")

EMPTY = DesiredState()
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0


class Speaker(Protocol):
    async def set(self, announcements: Sequence[Announcement], *, force: bool = False) -> None:
        """Make the session carry exactly these; raise BgpRefused if ExaBGP refused a command."""
        ...

    def announced(self) -> tuple[Announcement, ...]: ...


class Dataplane(Protocol):
    """VIPs, IPVS services, pins and ECMP routes, taken whole (pop.adapters.dataplane)."""

    async def set(self, state: DesiredState, *, verify: bool = False) -> tuple[str, ...]:
        """Make the kernel hold `state`; return the changes made. `verify` reads the kernel back."""
        ...

    async def connections(self) -> Mapping[str, int]:
        """Open connections per real-server address; empty when the mode has none."""
        ...

    def reconfigure(self, config: DataplaneConfig, prefixes: tuple[Prefix, ...], servers: Sequence[str]) -> None: ...


class DataplaneFailure(Exception):
    """What a fake data plane raises in tests (the kernel's is pop.adapters.routes.DataplaneError)."""


@dataclass(frozen=True, slots=True)
class ApplyStatus:
    """What /status and /metrics show of the applier."""

    bgp_error: str = ""  # the last refusal, until a pass succeeds
    dataplane_error: str = ""
    bgp_failures: int = 0
    dataplane_failures: int = 0
    retry_at: float | None = None  # when the next retry runs, while something failed
    repairs: int = 0  # verify passes that found and repaired drift
    last_repair: str = ""
    applied: DesiredState = EMPTY  # the data plane as last applied in full
    dwell_until: float | None = None  # teardown time while withdrawn with the data plane up


class Applier:
    def __init__(self, speaker: Speaker, dataplane: Dataplane | None, config: Config, *,
                 clock: Callable[[], float] = time.monotonic,
                 dataplane_errors: tuple[type[Exception], ...] = (DataplaneFailure,),
                 on_event: Callable[[str, str, str], None] | None = None,
                 on_announced: Callable[[tuple[Announcement, ...]], None] | None = None) -> None:
        self.speaker = speaker
        self.dataplane = dataplane
        self.config = config
        self.clock = clock
        self.dataplane_errors = dataplane_errors
        self.verify_interval = config.dataplane.verify_interval
        self._on_event = on_event  # (kind, subject, reason) for the engine's event list
        self._on_announced = on_announced  # the service persists what ExaBGP holds
        self._told: tuple[Announcement, ...] | None = None  # what ExaBGP held after the last BGP pass
        self._desired = EMPTY
        self._wake = asyncio.Event()
        self._dirty = False
        self._backoff = BACKOFF_FIRST
        self._withdrawn_at: float | None = None
        self._next_verify = self._next_reassert = 0.0  # set when run() starts
        self._status = ApplyStatus()
        self.changes = 0  # counts the changes of what the session or the kernel holds (pop.status)
        self.first_pass = asyncio.Event()  # set once the first pass has run (whatever its outcome)

    # --- what the engine calls -------------------------------------------------------------

    def want(self, state: DesiredState) -> None:
        """The newest desired state; applied by the next pass (coalesced)."""
        if state != self._desired:
            self._desired = state
            self._dirty = True
            self._wake.set()

    def attach(self, dataplane: Dataplane, errors: tuple[type[Exception], ...]) -> None:
        """The kernel's data plane, before run() (the engine process loads it after its start-up
        round, so that a withdraw never waits for pyroute2 to import)."""
        self.dataplane = dataplane
        self.dataplane_errors = errors

    def reconfigure(self, config: Config) -> None:
        """A reload: rebuild what depends on the configuration; the next pass applies the rest."""
        self.config = config
        self.verify_interval = config.dataplane.verify_interval
        if self.dataplane is not None:
            try:
                self.dataplane.reconfigure(config.dataplane, config.prefixes, [s.address for s in config.servers])
            except self.dataplane_errors as exc:
                self._failed("dataplane", str(exc))
        self._dirty = True
        self._wake.set()

    def status(self) -> ApplyStatus:
        dwell = None
        if self._withdrawn_at is not None and self._status.applied != EMPTY:
            dwell = self._withdrawn_at + self.config.dataplane.withdraw_dwell
        return replace(self._status, dwell_until=dwell)

    @property
    def desired(self) -> DesiredState:
        return self._desired

    async def connections(self) -> Mapping[str, int]:
        return {} if self.dataplane is None else await self.dataplane.connections()

    # --- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Apply until cancelled; a broken ExaBGP channel propagates."""
        self._dirty = True
        self._next_verify = self.clock() + self.verify_interval
        self._next_reassert = self.clock() + self.config.exabgp.reassert_interval
        while True:
            now = self.clock()
            due = self._due()
            if not self._dirty and (due is None or due > now):
                self._wake.clear()
                try:
                    async with asyncio.timeout(None if due is None else due - now):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            self._dirty = False
            now = self.clock()
            verify = self.dataplane is not None and self.verify_interval > 0 and now >= self._next_verify
            if verify:
                self._next_verify = now + self.verify_interval
            reassert = self.config.exabgp.reassert_interval
            force = reassert > 0 and now >= self._next_reassert
            if force:
                self._next_reassert = now + reassert
            if await self._pass(force=force, verify=verify):
                self._backoff = BACKOFF_FIRST
                self._status = replace(self._status, retry_at=None)
            else:
                retry = self.clock() + self._backoff
                self._backoff = min(self._backoff * 2, BACKOFF_MAX)
                self._status = replace(self._status, retry_at=retry)
            self.first_pass.set()

    def _due(self) -> float | None:
        """The next time a pass must run although nothing new was wanted."""
        times = [self._status.retry_at]
        if self.dataplane is not None and self.verify_interval > 0:
            times.append(self._next_verify)
        if self.config.exabgp.reassert_interval > 0:
            times.append(self._next_reassert)
        if self._withdrawn_at is not None and self._status.applied != EMPTY:
            times.append(self._withdrawn_at + self.config.dataplane.withdraw_dwell)
        return min((t for t in times if t is not None), default=None)

    async def _pass(self, *, force: bool, verify: bool) -> bool:
        """One pass toward the newest desired state, in the safe order. False: retry later."""
        state = self._desired
        serving = replace(state, announcements=())
        if state.announcements:
            self._withdrawn_at = None
            dataplane_ok = await self._set_dataplane(serving, verify)
            if not dataplane_ok and not self.speaker.announced():
                return False  # never attract traffic onto a data plane that is not there
            return await self._set_bgp(state.announcements, force) and dataplane_ok
        if not await self._set_bgp((), force):
            return False  # still announced: the data plane must stay
        if self.dataplane is None or (self._status.applied == EMPTY and not verify):
            return True
        now = self.clock()
        if self._withdrawn_at is None:
            self._withdrawn_at = now
        if now < self._withdrawn_at + self.config.dataplane.withdraw_dwell:
            # traffic in flight still arrives: keep delivering it, to the servers alive now
            return await self._set_dataplane(serving, verify)
        return await self._set_dataplane(EMPTY, verify)

    async def _set_dataplane(self, state: DesiredState, verify: bool) -> bool:
        if self.dataplane is None:
            return True
        previous = self._status.applied
        if state == previous and not self._status.dataplane_error and not verify:
            return True
        try:
            changes = await self.dataplane.set(state, verify=verify)
        except self.dataplane_errors as exc:
            self._failed("dataplane", str(exc))
            return False
        if verify and state == previous and changes:
            text = "; ".join(changes)
            log.warning("dataplane.repaired changes=%s", text)
            self._event("repair", "dataplane", f"drift repaired: {text}")
            self._status = replace(self._status, repairs=self._status.repairs + 1, last_repair=text)
        if self._status.dataplane_error:
            log.info("dataplane.recovered")
            self._event("recovered", "dataplane", "data plane applied after failures")
        self._status = replace(self._status, dataplane_error="", applied=state)
        self.changes += state != previous
        return True

    async def _set_bgp(self, announcements: tuple[Announcement, ...], force: bool) -> bool:
        try:
            await self.speaker.set(announcements, force=force)
        except BgpRefused as exc:
            self._failed("bgp", str(exc))
            return False
        if self._status.bgp_error:
            log.info("bgp.recovered")
            self._event("recovered", "bgp", "ExaBGP accepted the commands it refused before")
            self._status = replace(self._status, bgp_error="")
        held = self.speaker.announced()
        if held != self._told:
            self.changes += 1
            if self._on_announced is not None:  # a file write, only on a change
                self._on_announced(held)
            self._told = held
        return True

    def _failed(self, what: str, error: str) -> None:
        status = self._status
        if what == "bgp":
            new = replace(status, bgp_error=error, bgp_failures=status.bgp_failures + 1)
            old_error = status.bgp_error
        else:
            new = replace(status, dataplane_error=error, dataplane_failures=status.dataplane_failures + 1)
            old_error = status.dataplane_error
        self._status = new
        if error != old_error:
            log.error("%s.failed error=%s retry_in=%.1fs", what, error, self._backoff)
            self._event("failure", what, error)

    def _event(self, kind: str, subject: str, reason: str) -> None:
        if self._on_event is not None:
            self._on_event(kind, subject, reason)
