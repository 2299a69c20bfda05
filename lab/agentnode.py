"""A probe agent node inside a lab namespace, run with the real `pop probe-agent`.

- `AgentNode(ns, config, workdir)`: writes the agent.yaml, runs `pop probe-agent -c` in the
  namespace as a foreground child, and reads its signed report from inside the namespace.
- `lie(mode)` replaces the agent with `lab.liar` on the same address and port (a replay of a
  report the agent really signed, a stale one signed with the right key, or a forged one
  signed with a wrong key: docs/decisions.md says why the PoPs drop each); `start()` brings
  the real agent back.

Everything it starts is a child of the harness, so stopping the node reaps it; Netns.close()
sweeps anything left in the namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from lab.netns import Netns

LIES = ("replay", "stale", "forged")
REPO = Path(__file__).resolve().parent.parent

_FETCH = """
import base64, json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    print(json.dumps({"body": base64.b64encode(r.read()).decode(), "signature": r.headers["X-Pop-Signature"]}))
"""


class AgentNode:
    def __init__(self, ns: Netns, config: dict[str, Any], workdir: Path) -> None:
        self.ns = ns
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.config_path = workdir / "agent.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log = workdir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.lying: str | None = None

    @property
    def name(self) -> str:
        return str(self.config["name"])

    @property
    def url(self) -> str:
        return f"http://{self.config['listen']}:{self.config.get('port', 9190)}"

    def start(self) -> None:
        """Run the real agent (stopping a liar in its place)."""
        self.stop()
        pop = Path(sys.executable).parent / "pop"
        self.proc = self.ns.popen(str(pop), "probe-agent", "-c", str(self.config_path), log=self.log,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lying = None
        self.wait_serving()

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is not None:
            self.ns.stop(self.proc, timeout=timeout)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL: the agent is gone without a word."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def fetch(self) -> tuple[bytes, str]:
        """The signed report as served now: (body, X-Pop-Signature)."""
        import base64

        out = self.ns.run(sys.executable, "-c", _FETCH, self.url + "/v1/results", timeout=5).stdout
        data = json.loads(out)
        return base64.b64decode(data["body"]), str(data["signature"])

    def report(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.fetch()[0])
        return document

    def wait_serving(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.fetch()
                return
            except (subprocess.SubprocessError, ValueError, KeyError):
                time.sleep(0.1)
        raise TimeoutError(f"{self.name}: not serving {self.url} after {timeout} s\n{self.log_tail()}")

    def lie(self, mode: str) -> None:
        """Replace the agent with a liar on its address (see lab.liar)."""
        if mode not in LIES:
            raise ValueError(f"no lie {mode!r}; one of {', '.join(LIES)}")
        captured = self.workdir / "captured.json"
        if mode == "replay":
            body, signature = self.fetch()  # a report the agent really signed, served again forever
            captured.write_text(json.dumps({"body": body.decode(), "signature": signature}))
        self.stop()
        self.proc = self.ns.popen(sys.executable, "-m", "lab.liar", mode, str(self.config_path), str(captured),
                                  log=self.workdir / f"liar-{mode}.log", env={"PYTHONPATH": str(REPO)})
        self.lying = mode
        self.wait_serving()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
