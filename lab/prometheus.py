"""A real Prometheus (Debian's `prometheus`) in the lab's noc node, scraping every PoP.

`PrometheusNode(ns, targets, workdir, listen)` writes prometheus.yml (job "pop", every target's
/metrics each second, the shipped alert rules docs/monitoring/alerts.yml evaluated each second)
and runs `prometheus` in the namespace as a foreground child, its TSDB in the workdir.
`query(expr)` runs an instant query from inside the namespace and returns the result vector;
`wait(expr, predicate)` polls until the result satisfies the predicate.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from lab.netns import Netns

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "docs" / "monitoring" / "alerts.yml"
PORT = 9090

_GET = ("import sys, urllib.request; "
        "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())")


def available() -> bool:
    return shutil.which("prometheus") is not None


class PrometheusNode:
    def __init__(self, ns: Netns, targets: Sequence[str], workdir: Path, listen: str) -> None:
        self.ns = ns
        self.workdir = workdir
        self.listen = listen
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "pop", "static_configs": [{"targets": list(targets)}]}],
        }, sort_keys=False))
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.listen}:{PORT}"

    def start(self) -> None:
        prometheus = shutil.which("prometheus")
        if prometheus is None:
            raise RuntimeError("prometheus is not installed (Debian's prometheus package)")
        self.proc = self.ns.popen(prometheus, f"--config.file={self.config}",
                                  f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                                  f"--web.listen-address={self.listen}:{PORT}", "--log.level=warn", log=self.log)

    def stop(self) -> None:
        if self.proc is not None:
            self.ns.stop(self.proc, timeout=10)
            self.proc = None

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        answer = json.loads(self.ns.run(sys.executable, "-c", _GET, url, timeout=10).stdout)
        if answer.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params}: {answer}")
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (``[{"metric": {...}, "value": [t, "v"]}, ...]``)."""
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait(self, expr: str, predicate: Callable[[list[dict[str, Any]]], bool] = bool,
             timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                last = result = self.query(expr)
                if predicate(result):
                    return result
            except (subprocess.SubprocessError, RuntimeError, ValueError) as exc:
                last = exc
            time.sleep(0.5)
        raise TimeoutError(f"prometheus: {expr!r} not as expected after {timeout} s; last {last!r}\n"
                           f"{self.log.read_text(errors='replace')[-2000:] if self.log.exists() else ''}")
