"""The `pop` command line: run, engine, check-config, drain, undrain, maintenance, status,
wg-probe, probe-agent, identity.

`check-config` reads the key files the checks need too (a world-readable probe key is a
configuration error); the loader itself stays free of side effects.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from pop import __version__
from pop.config import Config, ConfigError

DEFAULT_CONFIG = Path("/etc/pop/pop.yaml")


def _setup_logging(verbose: bool) -> None:
    # stderr only: in the engine, stdout is ExaBGP's command channel
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


def _load(path: Path, *, with_keys: bool = False) -> Config | None:
    from pop.runner import load_file

    try:
        return load_file(path, with_keys=with_keys)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return None


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config, with_keys=True)
    if config is None:
        return 2
    print("ok")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pop.runner import run

    return run(args.config)


def cmd_engine(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 2
    from pop.service import main

    return main(config, args.config.resolve())


def _endpoint(args: argparse.Namespace, path: str, method: str = "GET", body: dict[str, object] | None = None) -> int:
    """Ask the running engine; a POST carries the token from the config's control.token_file."""
    from pop.runner import read_control_tokens

    config = _load(args.config)
    if config is None:
        return 2
    host = config.status.listen
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{config.status.port}{path}"
    headers = {"Content-Type": "application/json"}
    try:
        tokens = read_control_tokens(config)
    except ConfigError as exc:
        if method != "GET":  # the GETs are open: someone who may not read the token may still look
            print(*exc.problems, sep="\n", file=sys.stderr)
            return 2
        tokens = ()
    if tokens:
        headers["Authorization"] = "Bearer " + tokens[0].decode()
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, method=method, headers=headers, data=data)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        print(f"{method} {url}: {_refusal(exc, config)}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    return 0


def _refusal(exc: urllib.error.HTTPError, config: Config) -> str:
    """What the engine refused and why, with what to do about the credentials."""
    try:
        error = str(json.loads(exc.read())["error"])
    except (ValueError, KeyError, TypeError, OSError):
        error = exc.reason
    text = f"refused ({exc.code}): {error}"
    if exc.code == 401 and not config.control.token_file:
        text += f"; no token was sent: set control.token_file in {config.source} (the file the engine uses)"
    elif exc.code == 401:
        text += (f"; the token in {config.control.token_file} is not one the engine holds (a changed file "
                 f"takes effect on reload: systemctl reload pop, or SIGHUP to `pop run`)")
    return text


def cmd_status(args: argparse.Namespace) -> int:
    return _endpoint(args, "/v1/status")


def _action(args: argparse.Namespace, action: str, until: float | str | None = None) -> int:
    path = f"/v1/servers/{getattr(args, 'server', None)}/{action}" if getattr(args, "server", None) else f"/v1/{action}"
    body: dict[str, object] = {"reason": args.reason, "who": args.who}
    if until is not None:
        body["until"] = until
    return _endpoint(args, path, "POST", body)


def _until(text: str) -> float | str:
    """--until: an ISO 8601 time (sent as it is, the engine checks it) or a duration from now."""
    from pop.control import parse_duration

    try:
        return parse_duration(text)
    except ValueError:
        return text


def cmd_drain(args: argparse.Namespace) -> int:
    if args.until and args.server:
        print("--until: only for a PoP drain (a maintenance), not with --server", file=sys.stderr)
        return 2
    return _action(args, "drain", None if args.until is None else _until(args.until))


def cmd_maintenance(args: argparse.Namespace) -> int:
    from pop.control import parse_duration

    try:
        seconds = parse_duration(args.duration)
    except ValueError as exc:
        print(f"--for: {exc}", file=sys.stderr)
        return 2
    return _action(args, "drain", seconds)


def cmd_undrain(args: argparse.Namespace) -> int:
    return _action(args, "undrain")


def _operator() -> str:
    return os.environ.get("SUDO_USER") or os.environ.get("USER") or "unknown"


def cmd_probe_agent(args: argparse.Namespace) -> int:
    import asyncio

    from pop.agent import auth, config
    from pop.agent.daemon import Agent, run
    from pop.wgkeys import read_private_key

    try:
        agent_config = config.load(args.config.read_bytes(), args.config.name)
        key = auth.read_key(agent_config.key_file)
        probe_key = read_private_key(agent_config.probe_key_file) if agent_config.probe_key_file else None
    except config.ConfigError as exc:
        print(*exc.problems, sep="\n")
        return 2
    except OSError as exc:
        print(f"{args.config}: cannot read: {exc.strerror}")
        return 2
    except ValueError as exc:  # a key file that is missing, readable by others or malformed
        print(exc)
        return 2
    if args.check:
        print("ok")
        return 0
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(Agent(agent_config, key, probe_key)))
    return 0


def cmd_identity(args: argparse.Namespace) -> int:
    import asyncio

    from pop.identity import serve_identity

    host, _, port = args.listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) <= 0xFFFF:
        print(f"--listen: {args.listen!r} is not ADDRESS:PORT (e.g. 198.51.100.1:9191 or [2001:db8::1]:9191)")
        return 2

    async def serve() -> None:
        server = await serve_identity(host, int(port), args.pop, args.server)
        logging.getLogger("pop.identity").info("identity.start listen=%s pop=%s server=%s", args.listen, args.pop,
                                               args.server)
        async with server:
            await server.serve_forever()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"--listen {args.listen}: {exc.strerror or exc}")
        return 1
    return 0


def cmd_noc(args: argparse.Namespace) -> int:
    import asyncio
    import socket

    from pop.config_reader import ConfigError
    from pop.noc import Noc, load, run

    try:
        config = load(args.config.read_bytes(), args.config.name)
    except ConfigError as exc:
        print(*exc.problems, sep="\n")
        return 2
    except OSError as exc:
        print(f"{args.config}: cannot read: {exc.strerror}")
        return 2
    if args.check:
        print("ok")
        return 0
    # --listen-fd: a listening socket handed over by whoever started us (the lab passes one bound
    # on the host's loopback to a `pop noc` that runs in the lab's network namespace)
    sock = socket.socket(fileno=args.listen_fd) if args.listen_fd is not None else None
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(Noc(config), sock))
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="pop", description="anycast/BGP edge PoP controller for VPN providers")
    top.add_argument("--version", action="version", version=f"pop {__version__}")
    top.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = top.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text)
        command.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG,
                             help=f"the PoP's YAML file (default {DEFAULT_CONFIG})")
        return command

    with_config("run", "render ExaBGP's configuration and run ExaBGP with the engine").set_defaults(func=cmd_run)
    with_config("engine", "the health engine (ExaBGP's API process)").set_defaults(func=cmd_engine)
    with_config("check-config", "validate the YAML; prints ok or every problem").set_defaults(
        func=cmd_check_config)
    with_config("status", "print the running engine's /v1/status").set_defaults(func=cmd_status)
    drain = with_config("drain", "walk this PoP's drain ladder (MED, prepend, 65535:0, withdraw) and keep it "
                                 "withdrawn, or drain one server (--server)")
    drain.add_argument("--server", help="quiescent drain of one server: no new clients, existing ones stay")
    drain.add_argument("--until", help="a maintenance: undrain by itself at this ISO 8601 time "
                                       "(2026-11-30T03:00:00Z) or after this long (30m, 2h, 1h30m)")
    drain.set_defaults(func=cmd_drain)
    maintenance = with_config("maintenance", "drain this PoP for a while: it comes back by itself")
    maintenance.add_argument("--for", dest="duration", required=True, help="how long: 90s, 30m, 2h, 1h30m")
    maintenance.set_defaults(func=cmd_maintenance)
    undrain = with_config("undrain", "end a drain; a PoP re-announces after the hold-down")
    undrain.add_argument("--server", help="end the drain of one server")
    undrain.set_defaults(func=cmd_undrain)
    for command in (drain, undrain, maintenance):
        command.add_argument("--reason", default="", help="why, for the audit log (at most 200 characters)")
        command.add_argument("--who", default=_operator(),
                             help="who, for the audit log (default $SUDO_USER or $USER: %(default)s)")
    agent = sub.add_parser("probe-agent", help="the external vantage daemon: probe every PoP, serve signed results")
    agent.add_argument("-c", "--config", type=Path, default=Path("/etc/pop/agent.yaml"),
                       help="the agent's YAML file (default /etc/pop/agent.yaml)")
    agent.add_argument("--check", action="store_true", help="validate the YAML and the key files, print ok or why not")
    agent.set_defaults(func=cmd_probe_agent)
    identity = sub.add_parser("identity", help="answer every TCP connection with this PoP's (and server's) name")
    identity.add_argument("--pop", required=True, help="the PoP's name")
    identity.add_argument("--server", help="the server's name (omit on a PoP without servers behind it)")
    identity.add_argument("--listen", required=True, help="ADDRESS:PORT, e.g. the anycast address and port 9191")
    identity.set_defaults(func=cmd_identity)
    noc = sub.add_parser("noc", help="the fleet page: one page over many PoPs' status")
    noc.add_argument("-c", "--config", type=Path, default=Path("/etc/pop/noc.yaml"),
                     help="the fleet's YAML file (default /etc/pop/noc.yaml)")
    noc.add_argument("--check", action="store_true", help="validate the YAML, print ok or every problem")
    noc.add_argument("--listen-fd", type=int, help="serve on this inherited listening socket instead of listen:port")
    noc.set_defaults(func=cmd_noc)
    # listed for --help; main() hands `pop wg-probe ...` to pop.wgprobe before parsing
    sub.add_parser("wg-probe", help="send WireGuard handshakes to one server and print each like ping")
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["wg-probe"]:
        # the diagnostic owns its whole command line (and its --help)
        from pop.wgprobe import main as wg_probe

        _setup_logging(False)
        return wg_probe(argv[1:])
    args = parser().parse_args(argv)
    _setup_logging(args.verbose)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
