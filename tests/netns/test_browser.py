"""The NOC page of a PoP and the fleet page (`pop noc`), loaded in headless Chromium against the
lab of containerlab.yml: assertions on what a person sees, and screenshots kept as artifacts.

- pop2's servers are stopped: pop2 is withdrawn. On the fleet page (served by `pop noc` from
  the lab's noc node on the host's loopback, as an operator opens it) pop2's row is red, says
  "withdrawn" in red and gives the reason (0/2 healthy); the headline counts it out.
- pop3 is put in maintenance by "alice" with a reason for two hours: the fleet page says who
  drained it, the step of its drain ladder, and until when; pop3's own NOC page, loaded from
  inside the lab's noc node, shows the drain and alice's action in its operator log.
Screenshots go to $POP_TEST_ARTIFACTS (default .artifacts/ in the checkout).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.netns import Netns
from lab.runner import REPO, Lab
from tests.netns.conftest import running_lab
from tests.netns.test_lab_runner import needs

__all__ = ["needs"]

CHROMIUM = shutil.which("chromium")
ARTIFACTS = Path(os.environ.get("POP_TEST_ARTIFACTS", REPO / ".artifacts"))


@pytest.fixture(scope="module")
def lab(needs: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if CHROMIUM is None:
        pytest.skip("needs chromium (Debian's chromium package; .ci/install installs it)")
    with running_lab("tbr", tmp_path_factory) as lab:
        yield lab


def browse(url: str, shot: Path, ns: Netns | None = None) -> str:
    """The DOM Chromium renders for url, and a screenshot of it (in a namespace if given)."""
    shot.parent.mkdir(parents=True, exist_ok=True)
    profile = shot.parent / f".chromium-{shot.stem}"
    base = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={profile}", "--window-size=1400,900"]
    prefix = ["ip", "netns", "exec", ns.name] if ns is not None else []
    runs = [[*prefix, *base, "--dump-dom", url], [*prefix, *base, f"--screenshot={shot}", url]]
    outputs = []
    try:
        for argv in runs:
            outputs.append(subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert shot.stat().st_size > 10_000, f"{shot}: no screenshot"
    return outputs[0]


def fleet(lab: Lab) -> dict[str, Any]:
    assert lab.noc_url is not None
    with urllib.request.urlopen(lab.noc_url + "v1/fleet", timeout=2) as response:
        data: dict[str, Any] = json.loads(response.read())
    return data


def row(dom: str, pop: str) -> str:
    match = re.search(rf'<tr class="pop [a-z]+" data-pop="{pop}".*?</tr>', dom, re.S)
    assert match, f"no row for {pop} on the page"
    return html.unescape(match[0])


def test_a_withdrawn_pop_is_red_with_its_reason_and_a_drained_one_says_who(lab: Lab) -> None:
    lab.faults.apply("server-down", "pop2")
    lab.pop("pop2").wait_status(lambda s: s["state"] == "withdrawn")
    # a maintenance: the ladder (MED, prepend, 65535:0, withdraw), ending by itself in 2 hours
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 7200))
    lab.pop("pop3").post("/v1/drain", who="alice", reason="fibre work at the site", until=until)
    deadline = time.monotonic() + 15
    while not ({"pop2"} <= set((view := fleet(lab))["red"])
               and any(p["name"] == "pop3" and p["drain"] for p in view["pops"])):
        assert time.monotonic() < deadline, view
        time.sleep(0.2)

    # the fleet page, as an operator on the host opens it
    assert lab.noc_url is not None
    dom = browse(lab.noc_url, ARTIFACTS / "fleet-page.png")
    pop2 = row(dom, "pop2")
    assert 'class="pop red"' in pop2 and 'color:#cf222e;font-weight:bold">withdrawn<' in pop2
    assert "0/2 healthy" in pop2  # the reason: none of its servers is healthy
    pop3 = row(dom, "pop3")
    assert re.search(r"drain(ing|ed) by alice \(step \d/\d: [^)]+\): fibre work at the site, until "
                     + until[:10] + r" \d\d:\d\d:\d\d UTC", pop3), pop3
    assert re.search(r"Fleet: [12]/3 PoPs announcing", dom) and "Red: pop2" in dom  # pop3 announces until its withdraw step

    # pop3's own NOC page, from inside the lab (it serves on its link address)
    page = browse("http://10.0.3.2:9180/", ARTIFACTS / "pop3-noc-page.png", ns=lab.ns("noc1"))
    text = html.unescape(re.sub(r"<[^>]+>", " ", page))
    assert re.search(r"pop3\s*:?\s*drain(ing|ed)", text) and "alice" in text and "fibre work at the site" in text
    lab.pop("pop3").post("/v1/undrain", who="alice", reason="done")
    lab.faults.clear()
