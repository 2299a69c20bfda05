"""A real Prometheus in the lab (Debian's prometheus, in the noc node, started by the runner)
scrapes every PoP, evaluates the shipped alert rules, and answers every query of the shipped
Grafana dashboard with data.

- every PoP's /metrics is up for Prometheus and passes `promtool check metrics`;
- pop2's servers are stopped: PopWithdrawn goes pending for pop2 (its `for: 1m` would page a
  minute later; the rule's logic is unit-tested with promtool in tests/unit/test_alerts.py);
- every target of every panel of docs/monitoring/grafana-dashboard.json returns data.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from lab import prometheus
from lab.prometheus import PrometheusNode
from lab.runner import REPO, Lab
from tests.netns.conftest import running_lab
from tests.netns.test_lab_runner import needs

__all__ = ["needs"]

DASHBOARD = REPO / "docs" / "monitoring" / "grafana-dashboard.json"


@pytest.fixture(scope="module")
def lab(needs: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if not prometheus.available() or shutil.which("promtool") is None:
        pytest.skip("needs prometheus and promtool (Debian's prometheus package; .ci/install installs it)")
    with running_lab("tpm", tmp_path_factory) as lab:
        yield lab


def prom(lab: Lab) -> PrometheusNode:
    assert lab.prometheus is not None, "the runner did not start Prometheus"
    return lab.prometheus


def test_prometheus_scrapes_every_pop_and_the_metrics_pass_promtool(lab: Lab) -> None:
    up = prom(lab).wait('up{job="pop"}', lambda r: len(r) == 3 and all(s["value"][1] == "1" for s in r))
    assert {s["metric"]["instance"] for s in up} == {"10.0.1.2:9180", "10.0.2.2:9180", "10.0.3.2:9180"}
    announced = prom(lab).wait("max by (pop) (pop_announced)", lambda r: len(r) == 3)
    assert {s["metric"]["pop"]: s["value"][1] for s in announced} == {"pop1": "1", "pop2": "1", "pop3": "1"}
    script = "import sys, urllib.request; sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1]).read())"
    body = lab.ns("noc1").run(sys.executable, "-c", script, "http://10.0.1.2:9180/metrics").stdout
    check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, text=True, timeout=30,
                           check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_withdrawn_pop_raises_its_alert(lab: Lab) -> None:
    fault = lab.faults.apply("server-down", "pop2")
    try:
        alerts = prom(lab).wait('ALERTS{alertname="PopWithdrawn"}', lambda r: any(
            s["metric"].get("pop") == "pop2" for s in r), timeout=30)
        assert {s["metric"]["alertstate"] for s in alerts} <= {"pending", "firing"}
        assert all(s["metric"]["pop"] == "pop2" for s in alerts)
    finally:
        lab.faults.undo(fault)
        lab.wait_converged()


def test_every_dashboard_panel_query_returns_data(lab: Lab) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(exprs) >= 10
    for title, expr in exprs:
        result = prom(lab).wait(expr, bool, timeout=30)
        assert result, (title, expr)
