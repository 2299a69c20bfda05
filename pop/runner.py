"""`pop run`: render ExaBGP's configuration from the PoP's YAML, validate it with ExaBGP's own
validator, and run ExaBGP in the foreground with `pop engine` as its API process.

`pop run` stays ExaBGP's parent and owns the signals, because ExaBGP's own meanings are not
what an operator expects (SIGHUP stops ExaBGP):
- SIGTERM / SIGINT: forwarded to ExaBGP as SIGTERM; ExaBGP closes its sessions with a Cease
  and stops the engine. With graceful restart (`exabgp.graceful_restart`) ExaBGP closes them
  without a NOTIFICATION and the routers would keep the routes as stale, so the engine is
  stopped first: it withdraws, and only then is ExaBGP stopped.
- SIGUSR2: planned restart in place (an upgrade), graceful restart only: ExaBGP is SIGKILLed
  (the sessions close without a NOTIFICATION; the routers keep the routes as stale for the
  restart time), the engine's last handover is stamped planned (pop.handover), and `pop run`
  execs itself: the new code, a new ExaBGP, an engine that adopts the planned handover.
- SIGHUP: reload. The new YAML is checked first; a broken one is logged and changes nothing.
  A changed ExaBGP configuration (neighbors) is re-rendered and ExaBGP reloads it (SIGUSR1);
  the engine gets SIGHUP and reloads in place (health state and announcements are kept).
Watchdog: ExaBGP notices an engine that dies, not one that hangs. The engine's event loop
writes a heartbeat (engine.heartbeat in the runtime directory); when it is older than
`exabgp.watchdog` seconds, `pop run` kills the engine, ExaBGP respawns it, and the new engine
withdraws every prefix first, then re-announces once its servers have risen.
ExaBGP runs in its own session so that a terminal's signals reach it only through us.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from pop import config as config_module
from pop import exabgp, handover
from pop.config import Config, ConfigError

log = logging.getLogger("pop.run")
WATCHDOG_LOOK = 0.25  # how often `pop run` reads the engine's heartbeat


def exabgp_binary() -> str:
    beside = Path(sys.executable).parent / "exabgp"
    if beside.exists():
        return str(beside)
    found = shutil.which("exabgp")
    if found is None:
        raise FileNotFoundError("exabgp is not installed (pip install exabgp)")
    return found


def engine_argv(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "pop", "engine", "-c", str(config_path)]


def render(config: Config, config_path: Path) -> tuple[Path, Path]:
    """Write exabgp.conf and exabgp.env into the PoP's runtime directory."""
    directory = Path(config.runtime_dir) / config.name
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "exabgp.conf"
    env = directory / "exabgp.env"
    write_if_changed(conf, exabgp.render_config(config, engine_argv(config_path)))
    write_if_changed(env, exabgp.render_env(config))
    return conf, env


def write_if_changed(path: Path, text: str) -> bool:
    """Replace ``path`` atomically with ``text`` unless it already holds it; whether it wrote."""
    if path.exists() and path.read_text() == text:
        return False
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True


def validate(conf: Path, env: Path) -> tuple[bool, str]:
    """ExaBGP's own validator over the rendered configuration."""
    result = subprocess.run([exabgp_binary(), "--env-file", str(env), "validate", str(conf)],
                            capture_output=True, text=True, timeout=60, check=False)
    return result.returncode == 0, (result.stdout + result.stderr).strip()


def load_file(path: Path, *, with_keys: bool = False) -> Config:
    """Load and validate a PoP's YAML; `with_keys` also reads and checks the key files the
    checks need (what `check-config` and `pop run` do before anything starts)."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: (file): cannot read: {exc.strerror}"]) from None
    config = config_module.load(text, str(path))
    if with_keys:
        from pop.checks import cascade

        cascade.build(config)
        if config.external.enabled:
            read_agents_key(config)
        read_control_tokens(config)
    return config


def read_agents_key(config: Config) -> bytes:
    """The probe agents' shared key (tier 3); a bad key file is a configuration problem."""
    from pop.agent.auth import read_key

    try:
        return read_key(config.external.key_file)
    except ValueError as exc:
        raise ConfigError([f"{config.source}: external.key_file: {exc}"]) from None


def read_control_tokens(config: Config) -> tuple[bytes, ...]:
    """The bearer tokens for HTTP control (pop.control); none without `control.token_file`."""
    from pop.control import parse_tokens
    from pop.wgkeys import read_secret_file

    path = config.control.token_file
    if not path:
        return ()
    try:
        return parse_tokens(read_secret_file(path, "control token"), path)
    except ValueError as exc:
        raise ConfigError([f"{config.source}: control.token_file: {exc}"]) from None


def run(config_path: Path) -> int:
    config_path = config_path.resolve()
    try:
        config = load_file(config_path, with_keys=True)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    try:
        conf, env = render(config, config_path)
    except ValueError as exc:  # the engine's path cannot be written into ExaBGP's `run` line
        print(f"{config_path}: {exc}", file=sys.stderr)
        return 2
    ok, output = validate(conf, env)
    if not ok:
        print(f"{conf}: ExaBGP rejects the rendered configuration:\n{output}", file=sys.stderr)
        return 2
    log.info("run.start pop=%s exabgp_config=%s", config.name, conf)
    child = subprocess.Popen([exabgp_binary(), "--env-file", str(env), "server", str(conf)],
                             start_new_session=True, stdin=subprocess.DEVNULL)
    state = {"config": config}
    asked: list[str] = []  # stop / restart: done by the loop, not inside a signal handler

    def forward_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("run.stop signal=%s", signal.Signals(signum).name)
        if state["config"].exabgp.graceful_restart:
            asked.append("stop")
        else:
            child.send_signal(signal.SIGTERM)

    def reload(_signum: int, _frame: FrameType | None) -> None:
        state["config"] = _reload(state["config"], config_path, child)

    def restart(_signum: int, _frame: FrameType | None) -> None:
        asked.append("restart")

    signal.signal(signal.SIGTERM, forward_stop)
    signal.signal(signal.SIGINT, forward_stop)
    signal.signal(signal.SIGHUP, reload)
    signal.signal(signal.SIGUSR2, restart)
    while True:
        try:
            code = child.wait(timeout=WATCHDOG_LOOK)
            break
        except subprocess.TimeoutExpired:
            if "stop" in asked:
                asked.clear()
                _stop_engine_first(state["config"], child)
            elif "restart" in asked:
                asked.clear()
                if _planned_stop(state["config"], child):
                    log.info("restart.exec argv=%s", " ".join(sys.argv))
                    logging.shutdown()
                    os.execv(sys.executable, [sys.executable, "-m", "pop", *sys.argv[1:]])
            watchdog(state["config"], child.pid)
    log.info("run.exit exabgp_code=%d", code)
    return code


def _stop_engine_first(config: Config, child: subprocess.Popen[bytes]) -> None:
    """A stop with graceful restart: ExaBGP would close the sessions without a NOTIFICATION and
    the routers would keep the routes as stale, so the engine withdraws first (it exits on
    SIGTERM once the withdraw left; ExaBGP may respawn it, and we stop ExaBGP right after)."""
    pid = _our_engine(config, child.pid)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        _wait_gone(pid, config.exabgp.ack_timeout + config.exabgp.withdraw_settle + 1.0)
    child.send_signal(signal.SIGTERM)


def _planned_stop(config: Config, child: subprocess.Popen[bytes]) -> bool:
    """Stop ExaBGP for a planned restart and stamp the engine's handover planned; whether to exec.

    SIGKILL, not SIGTERM: nothing at all goes out after it (no Cease whatever ExaBGP's version
    does, no late withdraw of a dying engine), and the routers, as graceful-restart helpers,
    keep the routes as stale for the restart time. The engine sees its channel close and
    exits without withdrawing.
    """
    if not config.exabgp.graceful_restart:
        log.error("restart.refused exabgp.graceful_restart is 0: a restart would withdraw the PoP; "
                  "set it, or stop and start instead")
        return False
    engine = _our_engine(config, child.pid)
    log.info("restart.planned exabgp_pid=%d engine_pid=%s restart_time=%ds", child.pid, engine,
             config.exabgp.graceful_restart)
    child.kill()
    child.wait()
    if engine is not None and not _wait_gone(engine, 5.0):
        with contextlib.suppress(ProcessLookupError):
            os.kill(engine, signal.SIGKILL)
    path = Path(config.runtime_dir) / config.name / handover.FILE_NAME
    try:
        marked = handover.mark_planned(json.loads(path.read_text()), child.pid, time.time())
        write_if_changed(path, json.dumps(marked, indent=1) + "\n")
    except (OSError, ValueError) as exc:  # HandoverError is a ValueError
        log.error("restart.no_handover path=%s error=%s: the new engine withdraws first", path, exc)
    return True


def _our_engine(config: Config, exabgp_pid: int) -> int | None:
    """The engine's pid, if the pid file names a child of our ExaBGP (it could be stale)."""
    try:
        pid = int(engine_pidfile(config).read_text())
    except (OSError, ValueError):
        return None
    return pid if _parent_of(pid) == exabgp_pid else None


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited (a zombie counts: it holds nothing any more)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        if stat.rpartition(")")[2].split()[0] in {"Z", "X"}:
            return True
        time.sleep(0.02)
    return False


def _reload(current: Config, config_path: Path, child: subprocess.Popen[bytes]) -> Config:
    try:
        new = load_file(config_path, with_keys=True)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("reload.rejected %s", problem)
        return current
    if new.name != current.name or new.runtime_dir != current.runtime_dir:
        log.error("reload.rejected pop.name and pop.runtime_dir cannot change on reload; restart instead")
        return current
    if new.exabgp.graceful_restart != current.exabgp.graceful_restart:
        # ExaBGP would re-open the sessions with the new capability while the running engine
        # still sends End-of-RIB (or not) the old way: routers could keep stale routes
        log.error("reload.rejected exabgp.graceful_restart cannot change on reload; stop and start instead")
        return current
    old_text = exabgp.render_config(current, engine_argv(config_path))
    new_text = exabgp.render_config(new, engine_argv(config_path))
    conf, env = render(new, config_path)
    if new_text != old_text:
        ok, output = validate(conf, env)
        if not ok:
            log.error("reload.rejected ExaBGP rejects the new configuration: %s", output)
            render(current, config_path)
            return current
        child.send_signal(signal.SIGUSR1)
        log.info("reload.exabgp neighbors changed; ExaBGP reloads")
    _signal_engine(new, signal.SIGHUP)
    return new


def engine_pidfile(config: Config) -> Path:
    return Path(config.runtime_dir) / config.name / "engine.pid"


def engine_heartbeat(config: Config) -> Path:
    """Where the engine's event loop writes time.monotonic() while it runs (the watchdog reads it)."""
    return Path(config.runtime_dir) / config.name / "engine.heartbeat"


HEARTBEAT_INTERVAL = 0.25  # the engine beats this often, whatever the watchdog's limit (reloads change it)


def silent_for(heartbeat: str, now: float) -> float | None:
    """Seconds since the heartbeat ``heartbeat`` (file text) was written; None: cannot tell."""
    try:
        beat = float(heartbeat)
    except ValueError:
        return None  # being written, or garbage: judge on the next look
    return max(0.0, now - beat)


def watchdog(config: Config, exabgp_pid: int) -> int | None:
    """Kill an engine whose event loop stopped beating; ExaBGP respawns it. The killed pid, or None.

    The new engine withdraws every configured prefix before anything else, so a hung engine
    cannot keep a PoP announced on servers nobody checks any more. Only an engine that is
    ExaBGP's child is ever killed (the pid file could be stale).
    """
    limit = config.exabgp.watchdog
    if limit <= 0:
        return None
    path = engine_heartbeat(config)
    try:
        silent = silent_for(path.read_text(), time.monotonic())
        pid = int(engine_pidfile(config).read_text())
    except (OSError, ValueError):
        return None  # no engine yet (starting, or between a death and the respawn)
    if silent is None or silent <= limit or _parent_of(pid) != exabgp_pid:
        return None
    log.error("watchdog.engine_hung pid=%d silent=%.1fs limit=%.1fs: killing it; ExaBGP restarts it and the "
              "new engine withdraws first", pid, silent, limit)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        path.unlink()
    return pid


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


def _signal_engine(config: Config, signum: int) -> None:
    """The engine reloads in place on SIGHUP, keeping health state and announcements."""
    try:
        pid = int(engine_pidfile(config).read_text())
        os.kill(pid, signum)
        log.info("reload.engine signalled pid=%d", pid)
    except (OSError, ValueError) as exc:
        log.error("reload.engine cannot signal the engine: %s", exc)
