"""The systemd units in docs/examples/ pass `systemd-analyze verify` and keep a low exposure in
`systemd-analyze security --offline` (the repository stands in for /opt/pop, whose
.venv/bin/pop must exist for verify)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ANALYZE = shutil.which("systemd-analyze")
UNITS = {"pop.service": 3.0, "pop-probe-agent.service": 1.5, "pop-noc.service": 1.5}  # highest exposure allowed

pytestmark = pytest.mark.skipif(ANALYZE is None, reason="needs systemd-analyze (Debian's systemd package)")


@pytest.fixture
def units(tmp_path: Path) -> Path:
    if not (REPO / ".venv" / "bin" / "pop").exists():
        pytest.skip("needs the venv's pop (bash .ci/install)")
    for name in UNITS:
        text = (REPO / "docs" / "examples" / name).read_text()
        (tmp_path / name).write_text(text.replace("/opt/pop/", f"{REPO}/"))
    return tmp_path


@pytest.mark.parametrize("name", list(UNITS))
def test_the_unit_verifies(units: Path, name: str) -> None:
    result = subprocess.run([str(ANALYZE), "verify", "--man=no", f"./{name}"], cwd=units, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0 and not result.stderr.strip(), result.stdout + result.stderr


@pytest.mark.parametrize(("name", "highest"), list(UNITS.items()))
def test_the_unit_exposes_little(units: Path, name: str, highest: float) -> None:
    result = subprocess.run([str(ANALYZE), "security", "--offline=yes", f"./{name}"], cwd=units,
                            capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= highest, result.stdout


def test_pop_runs_with_only_the_capabilities_it_needs() -> None:
    text = (REPO / "docs" / "examples" / "pop.service").read_text()
    caps = re.search(r"^CapabilityBoundingSet=(.*)$", text, re.M)
    assert caps and set(caps[1].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"}
    assert "ProtectSystem=strict" in text and "ReadWritePaths=/run/pop /var/lib/pop" in text
    assert "NoNewPrivileges=yes" in text and "Restart=on-failure" in text
