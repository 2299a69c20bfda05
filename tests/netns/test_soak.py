"""The soak in CI: five minutes of random faults of every kind on the lab of containerlab.yml,
with lab.soak's invariants checked all along (bench/soak.py runs it for an hour)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from lab.runner import Lab
from lab.soak import Soak, summary
from tests.netns.conftest import running_lab
from tests.netns.test_lab_runner import needs

__all__ = ["needs"]

SECONDS = float(os.environ.get("POP_SOAK_SECONDS", "300"))


@pytest.fixture(scope="module")
def lab(needs: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab("tsk", tmp_path_factory) as lab:
        yield lab


def test_random_faults_for_five_minutes_break_no_invariant(lab: Lab) -> None:
    seed = int(os.environ.get("POP_SOAK_SEED", "0")) or int.from_bytes(os.urandom(4), "big")
    result = summary(Soak(lab, seed).run(SECONDS))
    print("\nMEASURED soak " + json.dumps(result))
    assert result["faults"] >= SECONDS / 20, result  # it really injected faults
    assert result["checks"] >= SECONDS, result  # and really watched
    assert result["violations"] == [], result["violations"]
