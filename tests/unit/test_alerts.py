"""The shipped alert rules (docs/monitoring/alerts.yml) pass `promtool check rules` and their unit
tests (docs/monitoring/alerts.test.yml: each alert fires when it should, and not before its `for`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

MONITORING = Path(__file__).resolve().parents[2] / "docs" / "monitoring"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="needs promtool (Debian's prometheus package; "
                                                              ".ci/install installs it)")


@needs_promtool
def test_the_rules_are_valid() -> None:
    result = subprocess.run([str(PROMTOOL), "check", "rules", "alerts.yml"], cwd=MONITORING, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 12 rules found" in result.stdout


@needs_promtool
def test_every_alert_fires_when_it_should() -> None:
    result = subprocess.run([str(PROMTOOL), "test", "rules", "alerts.test.yml"], cwd=MONITORING,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_every_alert_has_a_test() -> None:
    import yaml

    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    names = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    tests = yaml.safe_load((MONITORING / "alerts.test.yml").read_text())
    tested = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]}
    assert names == tested, names ^ tested
