"""`python -m lab`: the containerlab.yml topology as namespaces, run from the repository root.

    python -m lab up                  build the lab, start a supervisor that keeps it running
    python -m lab status [--json]     per router: the anycast route and its next hops;
                                      per PoP: the engine's verdict (state, reason);
                                      per client/probe node: which PoP answers it
    python -m lab fault KIND TARGET [--percent N] [--period S] [--down S] [--for S]
    python -m lab fault list | undo ID | clear
    python -m lab down [--all]        stop everything and remove every trace, also after a crash
                                      (--all: every lab recorded under .lab/, API users' too)

`up` forks a detached supervisor (`python -m lab supervise`, not for direct use) that owns
every daemon as a foreground child, records the lab in `<state>/state.json` and serves a
control socket (`<state>/control.sock`, one JSON request and one JSON answer per connection)
through which `status` and `fault` reach it. `down` sends it SIGTERM, waits for it to tear
the lab down, and then sweeps by the recorded prefix whatever a crashed supervisor left.
The default state directory is `.lab/<topology name>` in the repository; one lab per
directory. Fault kinds and targets: see lab/faults.py. Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lab.datapath import WHOAMI_PORT
from lab.faults import KINDS, FaultError
from lab.runner import REPO, Lab, new_prefix
from lab.state import STATE_FILE, STATE_ROOT, pid_alive, read_state, sweep
from lab.topology import TopologyError, load

CONTROL = "control.sock"


def default_statedir(topology_file: Path) -> Path:
    try:
        name = load(topology_file).topology.name
    except (OSError, TopologyError):
        name = "lab"
    return STATE_ROOT / name


# --- the supervisor --------------------------------------------------------------------------


class _Handler(socketserver.StreamRequestHandler):
    server: _ControlServer

    def handle(self) -> None:
        try:
            request = json.loads(self.rfile.readline())
            answer = {"ok": True, **self.server.dispatch(request)}
        except (FaultError, KeyError, ValueError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        self.wfile.write(json.dumps(answer).encode() + b"\n")


class _ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, lab: Lab) -> None:
        self.lab = lab
        path.unlink(missing_ok=True)
        super().__init__(str(path), _Handler)
        path.chmod(0o600)

    def dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        faults = self.lab.faults
        if op == "status":
            return {"status": self.lab.status().as_dict()}
        if op == "fault":
            params = {k: float(v) for k, v in (request.get("params") or {}).items()}
            fault = faults.apply(str(request["kind"]), str(request["target"]), **params)
            if request.get("hold") is not None:
                time.sleep(max(0.0, fault.at + float(request["hold"]) - time.monotonic()))
                faults.undo(fault)
            return {"fault": fault.as_dict()}
        if op == "undo":
            fault = faults.get(int(request["id"]))
            faults.undo(fault)
            return {"fault": fault.as_dict()}
        if op == "clear":
            return {"faults": [f.as_dict() for f in faults.clear()]}
        if op == "list":
            return {"faults": [f.as_dict() for f in faults.active()]}
        raise ValueError(f"unknown op {op!r}")


def supervise(topology_file: Path, statedir: Path, prefix: str) -> int:
    stop = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    lab = Lab.from_file(topology_file, prefix=prefix, statedir=statedir)
    lab.supervised = True
    try:
        seconds = lab.up()
    except (TimeoutError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"lab.up failed: {exc}", file=sys.stderr, flush=True)
        return 1
    server = _ControlServer(statedir / CONTROL, lab)
    thread = threading.Thread(target=server.serve_forever, name="control", daemon=True)
    thread.start()
    lab.write_state(ready=True, control=str(statedir / CONTROL), bringup_seconds=round(seconds, 3),
                    phases={k: round(v, 3) for k, v in lab.phases.items()}, noc_url=lab.noc_url)
    print(f"lab.up prefix={prefix} seconds={seconds:.2f}", file=sys.stderr, flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.shutdown()
        server.server_close()
        lab.down()
    return 0


# --- the client side -------------------------------------------------------------------------


def request(statedir: Path, message: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    state = read_state(statedir)
    if state is None or not state.get("ready"):
        raise SystemExit(f"no lab is running for {statedir} (python -m lab up)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(statedir / CONTROL))
        except OSError as exc:
            raise SystemExit(f"the lab's supervisor does not answer ({exc}); `python -m lab down` cleans up") from None
        sock.sendall(json.dumps(message).encode() + b"\n")
        answer: dict[str, Any] = json.loads(sock.makefile("rb").readline())
    if not answer.get("ok"):
        raise SystemExit(f"error: {answer.get('error')}")
    return answer


def cmd_up(args: argparse.Namespace) -> int:
    statedir: Path = args.state
    state = read_state(statedir)
    if state is not None and pid_alive(int(state.get("owner_pid", 0))):
        print(f"a lab already runs from {statedir} (prefix {state['prefix']}); `python -m lab down` first",
              file=sys.stderr)
        return 1
    if state is not None:
        sweep(statedir)
    load(args.file)  # fail here, with the problems listed, rather than in the supervisor
    statedir.mkdir(parents=True, exist_ok=True)
    prefix = new_prefix()
    log = statedir / "supervisor.log"
    with log.open("ab") as out:
        child = subprocess.Popen([sys.executable, "-m", "lab", "--file", str(args.file), "--state", str(statedir),
                                  "supervise", "--prefix", prefix],
                                 cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        state = read_state(statedir)
        if state is not None and state.get("ready"):
            print(f"lab {state['topology']} up in {state['bringup_seconds']:.1f} s "
                  f"(namespaces {prefix}*, supervisor pid {child.pid}, state {statedir})")
            print_status(request(statedir, {"op": "status"})["status"])
            if state.get("noc_url"):
                print(f"fleet page (pop noc): {state['noc_url']}  (open it in a browser on this host)")
            return 0
        if child.poll() is not None:
            print(f"lab up failed; supervisor log:\n{log.read_text(errors='replace')[-4000:]}", file=sys.stderr)
            sweep(statedir)
            return 1
        time.sleep(0.1)
    print(f"lab not up after {args.timeout} s; tearing down", file=sys.stderr)
    sweep(statedir)
    return 1


def print_status(data: dict[str, Any]) -> None:
    print("routers (kernel route to the anycast prefix):")
    for route in data["routes"]:
        hops = ", ".join(f"{h['address']} ({h['node']})" for h in route["nexthops"]) or "no route"
        print(f"  {route['router']:<8} {route['prefix']:<18} via {hops}")
    print("pops (the engine's verdict from /status):")
    for pop in data["pops"]:
        print(f"  {pop['pop']:<8} {pop['state']:<10} {pop['reason']}")
    print(f"data path (who answers TCP {WHOAMI_PORT} on the anycast address):")
    for answer in data.get("answers", []):
        who = answer.get("answered_by")
        server = f" (server {who})" if who and who != answer["pop"] else ""
        print(f"  {answer['node']:<8} -> {answer['pop'] or 'no answer'}{server}")
    if data.get("faults"):
        print("active faults:")
    for fault in data.get("faults", []):
        print(f"  {fault}")


def cmd_status(args: argparse.Namespace) -> int:
    data = request(args.state, {"op": "status"})["status"]
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        print_status(data)
    return 0


def _print_fault(fault: dict[str, Any]) -> None:
    params = "".join(f" {k}={v:g}" for k, v in fault["params"].items())
    undone = f" undone={fault['undone_at']:.6f}" if fault.get("undone_at") else ""
    print(f"fault #{fault['id']} {fault['kind']} {fault['target']}{params} at={fault['at']:.6f}{undone}")


def cmd_fault(args: argparse.Namespace) -> int:
    if args.kind in ("list", "clear"):
        for fault in request(args.state, {"op": args.kind})["faults"]:
            _print_fault(fault)
        return 0
    if args.kind == "undo":
        _print_fault(request(args.state, {"op": "undo", "id": int(args.target)})["fault"])
        return 0
    if args.target is None:
        raise SystemExit(f"fault {args.kind}: name a target")
    params = {k: v for k, v in (("percent", args.percent), ("period", args.period), ("down", args.down))
              if v is not None}
    message = {"op": "fault", "kind": args.kind, "target": args.target, "params": params, "hold": args.hold}
    _print_fault(request(args.state, message, timeout=max(120.0, (args.hold or 0) + 60))["fault"])
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    statedirs = sorted(p.parent for p in STATE_ROOT.glob(f"*/{STATE_FILE}")) if args.all else [args.state]
    for statedir in statedirs:
        state = read_state(statedir)
        if state is None:
            print(f"no lab recorded in {statedir}")
            continue
        supervised = bool(state.get("supervised")) and pid_alive(int(state.get("owner_pid", 0)))
        started = time.monotonic()
        left = sweep(statedir)
        how = "its supervisor tore it down" if supervised else f"swept {len(left)} namespaces by prefix"
        print(f"lab {state['prefix']} down in {time.monotonic() - started:.1f} s ({how})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", type=Path, default=REPO / "containerlab.yml", help="the topology")
    parser.add_argument("--state", type=Path, default=None, help="state directory (default .lab/<name>)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build the lab and leave it running")
    up.add_argument("--timeout", type=float, default=120.0)
    status = sub.add_parser("status", help="routes at the routers, verdicts of the PoPs")
    status.add_argument("--json", action="store_true")
    fault = sub.add_parser("fault", help=f"inject a fault: {', '.join(KINDS)}; or list, undo ID, clear")
    fault.add_argument("kind", choices=[*KINDS, "list", "undo", "clear"])
    fault.add_argument("target", nargs="?")
    fault.add_argument("--percent", type=float, help="loss: percent of packets dropped each way")
    fault.add_argument("--period", type=float, help="flap: seconds per down+up cycle (default 4)")
    fault.add_argument("--down", type=float, help="flap: seconds down per cycle (default period/2)")
    fault.add_argument("--for", dest="hold", type=float, help="undo after this many seconds (0: restart)")
    down = sub.add_parser("down", help="tear the lab down (also after a crash)")
    down.add_argument("--all", action="store_true", help="every lab recorded under .lab/ (crashed API users too)")
    supervisor = sub.add_parser("supervise", help=argparse.SUPPRESS)
    supervisor.add_argument("--prefix", required=True)
    args = parser.parse_args(argv)
    if args.state is None:
        args.state = default_statedir(args.file)
    if os.geteuid() != 0:
        print("python -m lab needs root (network namespaces)", file=sys.stderr)
        return 1
    if args.command == "supervise":
        return supervise(args.file, args.state, args.prefix)
    try:
        return {"up": cmd_up, "status": cmd_status, "fault": cmd_fault, "down": cmd_down}[args.command](args)
    except TopologyError as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
