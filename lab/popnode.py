"""A PoP node and its VPN servers inside lab namespaces, run with the real `pop run`.

- `TcpService(ns, address, port)`: a TCP listener that accepts and closes, the stand-in for a
  VPN server's L4 port. `stop()` kills it (connections are then refused), `start()` again.
- `PopNode(ns, config_text, workdir)`: writes the YAML, runs `pop run -c` in the namespace as a
  foreground child (ExaBGP, which runs the engine), reads /status from inside the namespace,
  can kill the engine or ExaBGP to inject those faults, and restart `pop run` in place
  (`restart()`: SIGUSR2, a planned restart with BGP graceful restart). A config without `control` gets a
  fresh 0600 token file in the workdir (HTTP control needs one); `post()` sends its token.

Everything the node starts is a child of the harness (or of ExaBGP, which is our child), so
stopping the node reaps every process; Netns.close() sweeps anything left in the namespace.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lab.netns import Netns

_LISTENER = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(128)
while True:
    c, _ = s.accept()
    c.close()
"""

_REQUEST = """
import json, sys, urllib.error, urllib.request
given = json.load(sys.stdin)
r = urllib.request.Request(sys.argv[1], method=sys.argv[2], headers=given["headers"],
                           data=given["body"].encode("latin-1") or None)
try:
    with urllib.request.urlopen(r, timeout=10) as answer:
        code, text = answer.status, answer.read().decode()
except urllib.error.HTTPError as exc:
    code, text = exc.code, exc.read().decode()
sys.stdout.write(json.dumps([code, text]))
"""


def write_token(path: Path) -> str:
    """A fresh control token in a new 0600 file (pop refuses a token file others can read)."""
    token = secrets.token_hex(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    return token


class TcpService:
    def __init__(self, ns: Netns, address: str, port: int, log: Path | None = None) -> None:
        self.ns = ns
        self.address = address
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.proc = self.ns.popen(sys.executable, "-c", _LISTENER, self.address, str(self.port), log=self.log)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            probe = self.ns.run("ss", "-Hltn", f"sport = :{self.port}", check=False)
            if probe.stdout.strip():
                return
            time.sleep(0.02)
        raise RuntimeError(f"TCP service {self.address}:{self.port} in {self.ns.name} did not start")

    def stop(self) -> None:
        """Kill the listener: from now on the kernel answers SYNs with RST."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


class PopNode:
    def __init__(self, ns: Netns, config: dict[str, Any], workdir: Path) -> None:
        self.ns = ns
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        config.setdefault("pop", {}).setdefault("runtime_dir", str(workdir / "run"))
        if "control" not in config:
            write_token(workdir / "control.token")
            config["control"] = {"token_file": str(workdir / "control.token")}
        self.config = config
        self.config_path = workdir / "pop.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log = workdir / "pop.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return str(self.config["pop"]["name"])

    @property
    def status_port(self) -> int:
        return int(self.config.get("status", {}).get("port", 9180))

    def start(self) -> None:
        pop = Path(sys.executable).parent / "pop"
        self.proc = self.ns.popen(str(pop), "run", "-c", str(self.config_path), log=self.log,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def reload(self, change: Callable[[dict[str, Any]], None], taken: Callable[[dict[str, Any]], bool],
               timeout: float = 15.0) -> None:
        """Edit this PoP's pop.yaml with ``change``, SIGHUP `pop run`, and wait until /status
        says ``taken`` (a restart of `pop run` later reads the edited file too)."""
        document = yaml.safe_load(self.config_path.read_text())
        change(document)
        self.config_path.write_text(yaml.safe_dump(document, sort_keys=False))
        assert self.proc is not None and self.proc.poll() is None, f"{self.name}: pop run is not running"
        self.proc.send_signal(signal.SIGHUP)
        self.wait_status(taken, timeout=timeout)

    def set_fleet(self, **fleet: Any) -> None:
        """Reload with these keys of the fleet section changed (e.g. ``min_pops=2``)."""
        self.reload(lambda d: d["fleet"].update(fleet),
                    lambda s: all(s["fleet"][k] == v for k, v in fleet.items()))

    def restart(self) -> float:
        """A planned restart in place (SIGUSR2 to `pop run`: it execs itself, same pid); returns
        the monotonic moment the signal was sent. Needs `exabgp.graceful_restart`."""
        assert self.proc is not None and self.proc.poll() is None, f"{self.name}: pop run is not running"
        sent = time.monotonic()
        self.proc.send_signal(signal.SIGUSR2)
        return sent

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        code = self.ns.stop(self.proc, timeout=timeout)
        self.proc = None
        return code

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """GET /status from inside the PoP's namespace."""
        script = ("import sys, urllib.request; "
                  "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())")
        result = self.ns.run(sys.executable, "-c", script, f"http://127.0.0.1:{self.status_port}/status",
                             timeout=timeout)
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def request(self, path: str, *, method: str = "GET", headers: dict[str, str] | None = None,
                body: bytes = b"") -> tuple[int, dict[str, Any]]:
        """An HTTP request from inside the PoP's namespace: the status code and the JSON answer,
        also for an error answer (headers and body go through stdin, not the command line)."""
        result = self.ns.run(sys.executable, "-c", _REQUEST, f"http://127.0.0.1:{self.status_port}{path}", method,
                             input=json.dumps({"headers": headers or {}, "body": body.decode("latin-1")}))
        code, text = json.loads(result.stdout)
        return int(code), json.loads(text)

    def post(self, path: str, **body: str) -> dict[str, Any]:
        """An operator action with the PoP's control token (if it has one) and ``body`` as JSON."""
        headers = {"Content-Type": "application/json"}
        token_file = (self.config.get("control") or {}).get("token_file")
        if token_file:
            headers["Authorization"] = "Bearer " + Path(token_file).read_text().split()[0]
        code, data = self.request(path, method="POST", headers=headers, body=json.dumps(body).encode())
        if code != 200:
            raise RuntimeError(f"{self.name}: POST {path}: HTTP {code}: {data}")
        return data

    def wait_status(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                status = self.status()
                last = status
                if predicate(status):
                    return status
            except (subprocess.SubprocessError, ValueError, OSError) as exc:
                last = exc
            time.sleep(0.1)
        raise TimeoutError(f"{self.name}: status condition not met in {timeout}s; last {last!r}\n"
                           f"log tail:\n{self.log_tail()}")

    def engine_pid(self) -> int:
        run = Path(self.config["pop"]["runtime_dir"]) / self.name / "engine.pid"
        return int(run.read_text())

    def exabgp_pid(self) -> int:
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return int(children[0])

    def kill_engine(self) -> int:
        pid = self.engine_pid()
        os.kill(pid, signal.SIGKILL)
        return pid

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
