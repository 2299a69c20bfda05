"""`pop engine`: the process ExaBGP runs as its API helper.

Wires the real adapters to the engine: ExaBGP's pipes (our stdin/stdout), the checks, the
status endpoint and the signals. The command channel is file descriptor 1 as inherited from
ExaBGP; we move it aside and point fd 1 at stderr, so that a stray print() from anywhere can
never inject a command into ExaBGP.

Lifecycle:
- start: if ExaBGP still holds what the previous engine announced (pop.handover: the engine
  died, ExaBGP respawned us), probe every server once and keep the announcement if the pool
  passes, else withdraw at once; withdraw every other configured prefix. A fresh ExaBGP holds
  nothing: withdraw everything, announce only after the servers have risen;
- SIGTERM / SIGINT: withdraw, wait `exabgp.withdraw_settle`, exit 0;
- ExaBGP closes the channel or stops acknowledging (`engine.channel_broken`): exit 1 at once
  (nothing left to talk to; if ExaBGP is still alive it respawns us);
- any other failure of an engine task: try to withdraw, then exit 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pop import adminstate, audit, availability, handover, load
from pop import history as history_file
from pop import priority as priority_
from pop.adapters.bgp import ChannelError, ExaBgpSpeaker
from pop.checks import cascade as check_builder
from pop.config import Config, ConfigError
from pop.desired import Announcement
from pop.engine import Engine
from pop.external import Policy as ExternalPolicy
from pop.external import Tier3
from pop.history import AnnounceHistory
from pop.runner import (
    HEARTBEAT_INTERVAL,
    engine_heartbeat,
    engine_pidfile,
    load_file,
    read_agents_key,
    read_control_tokens,
    write_if_changed,
)

if TYPE_CHECKING:
    from aiohttp import web

    from pop.adapters.dataplane import KernelDataplane
    from pop.control_api import Control

log = logging.getLogger("pop.service")
ALIVE_EVERY = 5  # seconds between alive marks: what a crash may add to the engine-down time


def take_stdout() -> int:
    """Return a private duplicate of the ExaBGP channel and send fd 1 to stderr."""
    sys.stdout.flush()
    channel = os.dup(1)
    os.dup2(2, 1)
    return channel


async def _open_channel(channel_fd: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=4 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", buffering=0))
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(channel_fd, "wb", buffering=0))
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    return reader, writer


def _reload(engine: Engine, config_path: Path, ctl: Control, reloads: dict[str, int]) -> None:
    """SIGHUP: re-read the YAML; a broken file (or token file) changes nothing. ``reloads``
    counts the outcomes (pop_reloads_total)."""
    reloads["refused"] += 1  # until it is taken
    try:
        new = load_file(config_path)
        checks = check_builder.build(new)
        tokens = read_control_tokens(new)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("reload.rejected %s", problem)
        return
    if new.status != engine.config.status or new.name != engine.config.name:
        log.warning("reload.partial pop.name and status changes take effect at the next restart")
    if new.external.enabled != engine.config.external.enabled:
        log.warning("reload.partial turning the external tier on or off takes effect at the next restart")
    elif engine.tier3 is not None:
        try:
            key = read_agents_key(new)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload.rejected %s", problem)
            return
        engine.tier3.reconfigure(new.name, _external_policy(new), key)
    if new.load.enabled and not engine.config.load.enabled and engine.load_signal is None:
        log.warning("reload.partial turning the load signal on takes effect at the next restart")
    if _kernel(new) != _kernel(engine.config):
        log.warning("reload.partial starting or stopping the kernel data plane (dataplane.mode none, no vip) "
                    "takes effect at the next restart")
    if (new.fleet.id, new.fleet.tag) != (engine.config.fleet.id, engine.config.fleet.tag):
        refused = "fleet.id and fleet.tag are how the other PoPs know this one: change them with a restart"
    else:
        refused = engine.fleet_refuses(new)
    if refused:
        log.error("reload.rejected %s: %s", config_path, refused)
        return
    ctl.tokens = tokens
    if new.checks.realtime_priority != engine.config.checks.realtime_priority:
        _realtime(new.checks.realtime_priority)
    engine.reload(new, checks)
    reloads["refused"] -= 1
    reloads["ok"] += 1


def _realtime(priority: int) -> None:
    """The event loop's thread at checks.realtime_priority (pop.priority); a refusal is logged."""
    refused = priority_.apply(priority)
    if refused:
        log.warning("engine.realtime_refused %s; the probes run at the normal priority", refused)
    else:
        policy, level = priority_.current()
        log.info("engine.realtime policy=%s priority=%d", policy, level)


async def serve(config: Config, channel_fd: int, config_path: Path) -> int:
    try:
        checks = check_builder.build(config)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("engine.config %s", problem)
        return 2
    reader, writer = await _open_channel(channel_fd)
    speaker = ExaBgpSpeaker(config, reader, writer)
    runtime = Path(config.runtime_dir) / config.name
    try:
        tier3 = _tier3(config)
        ctl = _control(config, runtime)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("engine.config %s", problem)
        return 2
    history = AnnounceHistory(runtime / history_file.FILE_NAME)

    def announced(routes: tuple[Announcement, ...]) -> None:
        _save_handover(runtime / handover.FILE_NAME, routes)
        _account(engine, history)

    engine = Engine(config, speaker, checks, tier3=tier3, on_announced=announced)
    engine.fleet_source, speaker.on_fleet = speaker.fleet_paths, engine.fleet_changed
    if config.checks.realtime_priority:
        _realtime(config.checks.realtime_priority)
    _restore_drains(engine, runtime / adminstate.FILE_NAME, config)
    engine.on_admin_change = lambda: _save_drains(engine, runtime / adminstate.FILE_NAME)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reloads = {"ok": 0, "refused": 0}
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload(engine, config_path, ctl, reloads))
    # a fresh heartbeat before the pid file: the watchdog must never pair this pid with the
    # stale heartbeat of an engine that died
    _beat(config)
    _write_pid(config)
    history.load(time.time())
    _account(engine, history)
    background = [asyncio.create_task(_heartbeat(config), name="heartbeat"),
                  asyncio.create_task(_keep_accounts(engine, history), name="availability")]
    diagnostics: dict[str, object] = {}  # the kernel's view of the data plane, for /status
    dataplane: KernelDataplane | None = None
    identities: list[asyncio.Server] = []
    code = 0
    reading = asyncio.create_task(speaker.read_forever(), name="exabgp reader")
    # the status endpoint (aiohttp, prometheus_client: a third of the start-up's imports) comes
    # after the applier's first pass: a respawned engine that must withdraw does so first
    serving: dict[str, asyncio.Task[None]] = {}  # the engine's loop, once started (for /healthz)
    status = asyncio.create_task(_status_endpoint(config, engine, speaker, diagnostics, ctl,
                                                  shown=_Endpoint(history, reloads, serving)), name="status")
    try:
        await speaker.refresh_sessions()  # ExaBGP reports changes only: learn the sessions as they are
        await speaker.read_fleet()  # ... and passes on no route it received before: the other PoPs
        await _start(engine, speaker, config, runtime / handover.FILE_NAME)
        # the kernel's adapters (pyroute2) load after the routers were told what the round found
        dataplane, errors = _dataplane(config)
        if dataplane is not None:
            engine.applier.attach(dataplane, errors)
            background.append(asyncio.create_task(_diagnose(dataplane, diagnostics, errors), name="diagnostics"))
            if config.dataplane.load_weights:
                engine.load_signal = _connection_load(dataplane, engine)
            elif config.load.enabled:
                _telemetry_load(engine)
        if tier3 is not None:
            background.append(asyncio.create_task(_pull_agents(config, tier3, engine), name="agents"))
        identities += await _identity(config)
        log.info("engine.started pop=%s servers=%d prefixes=%d", config.name, len(config.servers),
                 len(config.prefixes))
        running = serving["engine"] = asyncio.create_task(engine.run(), name="engine")
        stopping = asyncio.create_task(stop.wait(), name="signals")
        closed = asyncio.create_task(speaker.closed.wait(), name="channel")
        done, _ = await asyncio.wait({running, stopping, closed}, return_when=asyncio.FIRST_COMPLETED)
        for task in (running, stopping, closed):
            task.cancel()
        failure = running.exception() if running in done and not running.cancelled() else None
        if failure is not None:
            broken = _channel_error(failure)
            if broken is not None:
                raise broken
            log.error("engine.failed error=%r", failure)
            code = 1
        if closed in done or speaker.closed.is_set():
            if speaker.shutting_down:
                log.info("engine.stopped: ExaBGP is shutting down")
                return code
            log.error("engine.exabgp_gone: ExaBGP closed the API channel")
            return 1
        await _withdraw(speaker, config)
    except ChannelError as exc:
        log.error("engine.channel_broken error=%s", exc)
        code = 1
    finally:
        history.stop(time.time())
        reading.cancel()
        for task in background:
            task.cancel()
        if dataplane is not None:
            await dataplane.close()
        for server in identities:
            server.close()
        if not status.done():
            status.cancel()
        elif not status.cancelled() and status.exception() is None and (runner := status.result()) is not None:
            await runner.cleanup()
        with contextlib.suppress(OSError):
            engine_pidfile(config).unlink()
        with contextlib.suppress(OSError):
            engine_heartbeat(config).unlink()
    return code


async def _diagnose(dataplane: KernelDataplane, into: dict[str, object],
                    errors: tuple[type[Exception], ...]) -> None:
    """Keep the kernel's own view (e.g. the multipath hash policy) fresh for /status."""
    while True:
        try:
            into.update(await dataplane.diagnostics())
        except errors as exc:
            into.update({"error": str(exc)})
        await asyncio.sleep(2.0)


def _control(config: Config, runtime: Path) -> Control:
    """The tokens for HTTP control (a bad token file is a config error) and the audit trail."""
    from pop.control_api import Control

    trail = audit.AuditTrail(runtime / audit.FILE_NAME)
    trail.load()
    return Control(config.name, read_control_tokens(config), trail)


def _tier3(config: Config) -> Tier3 | None:
    """Tier 3's state, with the agents' shared key read now (a bad key file is a config error)."""
    if not config.external.enabled:
        return None
    return Tier3(config.name, _external_policy(config), read_agents_key(config))


def _external_policy(config: Config) -> ExternalPolicy:
    x = config.external
    return ExternalPolicy(x.quorum, x.unreachable_fraction, x.max_age, x.max_skew, x.fall_for)


async def _pull_agents(config: Config, tier3: Tier3, engine: Engine) -> None:
    """Tier 3's puller; monitoring that breaks is logged and restarted, never the engine's end."""
    from pop.adapters.agents import pull_forever

    while True:
        try:
            await pull_forever(lambda: engine.config.external, tier3, engine.external_changed)
        except Exception:
            log.exception("external.puller_failed; restarting in 1 s")
            await asyncio.sleep(1.0)


async def _identity(config: Config) -> list[asyncio.Server]:
    """A PoP that answers on the anycast addresses itself (mode none) says who it is there, for
    the agents' catchment map (pop.identity); with a data plane the servers answer instead."""
    port = config.external.identity_port
    if not port or config.dataplane.mode != "none":
        return []
    from pop.desired import host_addresses
    from pop.identity import serve_identity

    servers = []
    for address in host_addresses(config.prefixes):
        host = address.split("/")[0]
        try:
            servers.append(await serve_identity(host, port, config.name))
        except OSError as exc:  # the address is not on this host (yet): the catchment lacks us
            log.warning("identity.unavailable address=%s port=%d error=%s", host, port, exc.strerror or exc)
    return servers


def _connection_load(dataplane: KernelDataplane, engine: Engine) -> Callable[[], Awaitable[dict[str, float]]]:
    async def factors() -> dict[str, float]:
        return load.connection_factors(await dataplane.connections(), engine.pool_weights())

    return factors


def _telemetry_load(engine: Engine) -> None:
    """The load signal from the servers' node exporters (pop.adapters.telemetry): it smooths
    the CPU itself, so the engine takes its factors as they are."""
    from pop.adapters.telemetry import NodeExporterLoad

    signal = NodeExporterLoad(lambda: engine.config)
    engine.load_signal = signal
    engine.load_smoothing = 1.0
    engine.load_view = signal.view


def _channel_error(failure: BaseException) -> ChannelError | None:
    """The ChannelError inside an engine failure (the TaskGroup wraps it in an ExceptionGroup)."""
    if isinstance(failure, ChannelError):
        return failure
    if isinstance(failure, BaseExceptionGroup):
        match, _ = failure.split(ChannelError)
        if match is not None:
            return _channel_error(match.exceptions[0])
    return None


def _kernel(config: Config) -> bool:
    """Whether the PoP programs the kernel at all."""
    return config.dataplane.mode != "none" or config.dataplane.vip


def _dataplane(config: Config) -> tuple[KernelDataplane | None, tuple[type[Exception], ...]]:
    if not _kernel(config):
        return None, ()
    # pyroute2 loads only for PoPs that program the kernel
    from pop.adapters.dataplane import KernelDataplane
    from pop.adapters.routes import DataplaneError

    return (KernelDataplane(config.dataplane, config.prefixes, servers=[s.address for s in config.servers]),
            (DataplaneError,))


async def _start(engine: Engine, speaker: ExaBgpSpeaker, config: Config, path: Path) -> None:
    """Adopt what the previous engine left announced, if ExaBGP still holds it (or the routers
    do, as stale routes of a planned restart) and one probe round says the pool passes;
    withdraw every other configured prefix (pop.handover). Then End-of-RIB (graceful restart
    only): the routers drop whatever stale route we did not announce again."""
    adopted, planned = _read_handover(path, config)
    await speaker.withdraw_configured(keep={a.prefix for a in adopted})
    if adopted:
        if not planned:
            speaker.adopt(adopted)
        results = await engine.probes.round(engine.checks, [s.name for s in config.servers if s.enabled])
        if not engine.adopt(results):
            await speaker.withdraw_configured()  # at once: the servers under the route are gone
        elif planned:
            await speaker.set(adopted)  # as the routers hold them: a refresh, no change
    await speaker.end_of_rib()


def _read_handover(path: Path, config: Config) -> tuple[tuple[Announcement, ...], bool]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return (), False
    except OSError as exc:
        log.error("handover.unreadable path=%s error=%s; withdrawing first", path, exc.strerror)
        return (), False
    try:
        adopted, planned = handover.parse(json.loads(text), os.getppid(),
                                          {p.prefix: p.next_hop for p in config.prefixes},
                                          now=time.time(), restart_time=config.exabgp.graceful_restart)
    except (ValueError, handover.HandoverError) as exc:
        log.error("handover.invalid path=%s error=%s; withdrawing first", path, exc)
        return (), False
    if planned:
        log.info("handover.planned prefixes=%s: the routers keep them as stale until End-of-RIB",
                 ",".join(a.prefix for a in adopted) or "-")
    return adopted, planned


def _save_handover(path: Path, routes: tuple[Announcement, ...]) -> None:
    try:
        write_if_changed(path, json.dumps(handover.to_dict(routes, os.getppid()), indent=1) + "\n")
    except OSError as exc:
        log.error("handover.unsaved path=%s error=%s: a respawned engine would withdraw first", path, exc.strerror)


@dataclass(frozen=True)
class _Endpoint:
    """What the status endpoint shows beyond the engine's snapshot."""

    history: AnnounceHistory
    reloads: dict[str, int]
    serving: dict[str, asyncio.Task[None]]

    def ready(self, engine: Engine) -> str:
        """/healthz: "" while the engine's loop runs and the applier has made its first pass."""
        running = self.serving.get("engine")
        if running is None or running.done():
            return "the engine loop is not running"
        if not engine.applier.first_pass.is_set():
            return "starting: the applier has not made its first pass"
        return ""


async def _status_endpoint(config: Config, engine: Engine, speaker: ExaBgpSpeaker,
                           diagnostics: dict[str, object], ctl: Control, *, shown: _Endpoint) -> web.AppRunner | None:
    if not config.status.enabled:
        return None
    await engine.applier.first_pass.wait()
    from aiohttp import web

    from pop.status import make_app

    def extra() -> dict[str, object]:
        return {"sessions": {peer: view.state for peer, view in speaker.peers.items()},
                "exabgp_command_errors": speaker.errors, "exabgp_unparsed_messages": speaker.unparsed,
                "dataplane": diagnostics or None, "reloads": dict(shown.reloads)}

    def report() -> dict[str, object]:
        return availability.report(shown.history.marks, time.time(), engine.config.availability.slo)

    app = make_app(lambda: engine.snapshot(extra()), engine, ctl, ready=lambda: shown.ready(engine),
                   revision=engine.status_revision,
                   availability=report)
    if config.status.readers_port is not None:
        _serve_readers(app, config, engine)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.status.listen, config.status.port, reuse_address=True).start()
    except OSError as exc:  # monitoring that cannot start is no reason to stop serving
        log.error("status.failed address=%s port=%d error=%s", config.status.listen, config.status.port,
                  exc.strerror or exc)
        await runner.cleanup()
        return None
    log.info("status.listening address=%s port=%d", config.status.listen, config.status.port)
    return runner


def _serve_readers(app: web.Application, config: Config, engine: Engine) -> None:
    """/v1/status on status.readers_port from a process of its own (pop.readers), fed from the
    app's shared status; it ends with the app."""
    from pop.readers import Feed
    from pop.status import SHARED

    assert config.status.readers_port is not None
    shared = app[SHARED]
    feed = Feed(config.status.listen, config.status.readers_port, shared.get, shared.age, engine.status_revision)
    feeding = asyncio.create_task(feed.run(), name="readers")

    async def stop(_app: web.Application) -> None:
        feeding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeding
        await feed.stop()

    app.on_cleanup.append(stop)


async def _withdraw(speaker: ExaBgpSpeaker, config: Config) -> None:
    try:
        async with asyncio.timeout(config.exabgp.ack_timeout):
            await speaker.set(())
        log.info("engine.withdrawn settle=%.1fs", config.exabgp.withdraw_settle)
        await asyncio.sleep(config.exabgp.withdraw_settle)
    except (TimeoutError, ChannelError) as exc:
        log.error("engine.withdraw_failed error=%s", exc or "timeout")


def _restore_drains(engine: Engine, path: Path, config: Config) -> None:
    """A respawned engine keeps the operator's drains (pop.adminstate)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return
    except OSError as exc:
        log.error("drains.unreadable path=%s error=%s; starting without drains", path, exc.strerror)
        return
    try:
        state = adminstate.parse(json.loads(text), {s.name for s in config.servers})
    except (ValueError, adminstate.AdminStateError) as exc:
        log.error("drains.invalid path=%s error=%s; starting without drains", path, exc)
        return
    if state.dropped:
        log.warning("drains.dropped servers=%s: no longer in the configuration", ",".join(state.dropped))
    if state.pop_drained or state.servers:
        log.info("drains.restored pop_drained=%s servers=%s", state.pop_drained, ",".join(state.servers) or "-")
    engine.restore_admin(state, time.time())


def _save_drains(engine: Engine, path: Path) -> None:
    state = engine.admin_state(time.time(), engine.clock())
    try:
        write_if_changed(path, json.dumps(adminstate.to_dict(state), indent=1) + "\n")
    except OSError as exc:
        log.error("drains.unsaved path=%s error=%s: a restarted engine would not know them", path, exc.strerror)


def _account(engine: Engine, history: AnnounceHistory) -> None:
    """Note the PoP's state in its announce history (pop.availability): what the session
    carries, and why not from the verdict."""
    announced = bool(engine.speaker.announced())
    v = engine.verdict
    cause = availability.cause(announced=announced, wanted=v.announce, drained=v.drained, decided_by=v.decided_by)
    history.note(availability.Mark(time.time(), announced, cause))


async def _keep_accounts(engine: Engine, history: AnnounceHistory) -> None:
    """Catch the changes of cause no BGP pass reports (a drain of a withdrawn PoP), and leave
    the alive mark the next engine closes the history with if this one dies."""
    beats = 0
    while True:
        await asyncio.sleep(1.0)
        _account(engine, history)
        if beats % ALIVE_EVERY == 0:
            history.alive(time.time())
        beats += 1


async def _heartbeat(config: Config) -> None:
    """The watchdog's proof that this event loop still runs (see pop.runner.watchdog)."""
    while True:
        await asyncio.sleep(HEARTBEAT_INTERVAL)
        _beat(config)


def _beat(config: Config) -> None:
    _write_runtime_file(engine_heartbeat(config), f"{time.monotonic():.3f}\n", "heartbeat")


def _write_pid(config: Config) -> None:
    _write_runtime_file(engine_pidfile(config), f"{os.getpid()}\n", "pidfile")


def _write_runtime_file(path: Path, text: str, what: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        log.warning("engine.%s path=%s error=%s", what, path, exc.strerror)


def main(config: Config, config_path: Path) -> int:
    channel = take_stdout()
    return asyncio.run(serve(config, channel, config_path))
