"""The pure modules stay pure: they import no I/O library and no adapter."""

import ast
from pathlib import Path

import pytest

POP = Path(__file__).resolve().parents[2] / "pop"
PURE = ["adminstate.py", "config.py", "config_model.py", "config_reader.py", "hysteresis.py", "verdict.py", "desired.py",
        "ladder.py", "config_drain.py", "availability.py", "dampening.py", "config_dampening.py",
        "exabgp.py", "load.py", "checks/base.py", "pool.py", "drains.py", "health.py", "handover.py",
        "external.py", "agent/config.py", "agent/view.py", "agent/auth.py", "control.py", "tails.py",
        "telemetry.py", "config_load.py"]
FORBIDDEN = {"asyncio", "pyroute2", "aiohttp", "subprocess", "socket", "prometheus_client", "pop.adapters",
             "pop.engine", "pop.service", "pop.runner", "scapy"}


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io(module: str) -> None:
    bad = {name for name in imported(POP / module)
           if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)}
    assert not bad, f"pop/{module} imports {sorted(bad)}"


def test_the_rule_would_catch_a_violation(tmp_path: Path) -> None:
    sample = tmp_path / "x.py"
    sample.write_text("import asyncio\nfrom pyroute2 import IPRoute\n")
    assert {"asyncio", "pyroute2"} <= imported(sample)
