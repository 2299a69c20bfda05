"""Fixtures for tests that need root, network namespaces and real daemons.

- ``lab_prefix``: a name prefix unique to this test (``tlab-<hex>-``), so concurrent runs and
  other suites' namespaces never collide.
- ``netns_factory``: ``netns_factory("r1") -> Netns`` named ``<lab_prefix>r1``; every
  namespace it made is closed after the test, and ``cleanup_prefix`` sweeps up anything else
  carrying the prefix, also when the test failed. Skips (naming what is missing) without root
  or without ``ip``.
- ``frr_factory``: ``frr_factory(ns, name, asn, router_id, neighbors, networks=(), **kw)`` ->
  a started ``FrrRouter`` whose logs go to the test's tmp_path; stopped after the test. Skips
  when zebra, bgpd or vtysh is missing. With ``start=False`` the caller starts it, after the
  links to its neighbours exist (LINKS_FIRST below).

LINKS_FIRST: a router started before a link to a neighbour exists may never learn that link's
address in bgpd (seen once in CI: tests/netns/test_tier3.py). FRR 8.4's bgpd then fails every
connection of that neighbour in `bgp_connect_success`: `bgp_getsockname` finds no interface for
the local address while zebra is connected, and sends NOTIFICATION (5,0), an FSM error, each
time, for as long as it runs. The lab (lab.runner.Lab.up) builds the whole network before any
daemon; the fixtures here start their routers after the links as well.

Every test collected under tests/netns gets the ``netns`` marker.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from lab.frr import BGPD, VTYSH, ZEBRA, BgpNeighbor, FrrRouter
from lab.netns import Netns, cleanup_prefix
from lab.runner import REPO, Lab, new_prefix

NETNS_DIR = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if NETNS_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.netns)


def _missing_for_netns() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("root (euid 0)")
    if shutil.which("ip") is None:
        missing.append("the `ip` command (iproute2)")
    return missing


def _missing_for_frr() -> list[str]:
    missing = [str(path) for path in (ZEBRA, BGPD) if not os.access(path, os.X_OK)]
    if shutil.which(VTYSH) is None:
        missing.append(VTYSH)
    return [f"{what} (apt-get install frr)" for what in missing]


@pytest.fixture
def lab_prefix() -> str:
    return f"tlab-{secrets.token_hex(3)}-"


@pytest.fixture
def netns_factory(lab_prefix: str) -> Iterator[Callable[[str], Netns]]:
    if missing := _missing_for_netns():
        pytest.skip("network namespace tests need " + ", ".join(missing))
    created: list[Netns] = []

    def make(name: str) -> Netns:
        ns = Netns(lab_prefix + name)
        created.append(ns)
        return ns

    try:
        yield make
    finally:
        for ns in reversed(created):
            ns.close()
        cleanup_prefix(lab_prefix)


FrrFactory = Callable[..., FrrRouter]


@pytest.fixture
def frr_factory(netns_factory: Callable[[str], Netns], tmp_path: Path) -> Iterator[FrrFactory]:
    if missing := _missing_for_frr():
        pytest.skip("FRR tests need " + ", ".join(missing))
    routers: list[FrrRouter] = []

    def make(ns: Netns, name: str, asn: int, router_id: str,  # noqa: PLR0917 - mirrors FrrRouter
             neighbors: Sequence[BgpNeighbor],
             networks: Sequence[str] = (), *, start: bool = True, **kwargs: Any) -> FrrRouter:
        router = FrrRouter(ns, name, asn, router_id, neighbors, networks,
                           workdir=tmp_path / f"frr-{name}", **kwargs)
        routers.append(router)
        if start:  # start=False: the caller starts it once its links exist (see LINKS_FIRST)
            router.start()
        return router

    try:
        yield make
    finally:
        for router in routers:
            router.stop()


@contextmanager
def running_lab(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The lab of containerlab.yml, up for the block (namespaces ``<kind>-xxxx-*``), down after it
    whatever happened: the module-scoped ``lab`` fixtures of the lab tests."""
    lab = Lab.from_file(REPO / "containerlab.yml", prefix=new_prefix(kind),
                        statedir=tmp_path_factory.mktemp("lab") / "state")
    try:
        lab.up()
        yield lab
    finally:
        lab.down()
