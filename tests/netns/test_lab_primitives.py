"""The lab primitives against the real kernel and real FRR: namespaces, veth, routers, watcher."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lab.frr import BgpConfig, BgpNeighbor, FrrError, FrrRouter
from lab.netns import NETNS_DIR, CommandError, Netns, cleanup_prefix, run_host, veth
from lab.routewatch import RouteWatcher, read_nexthops
from tests.netns.conftest import FrrFactory

GOLDEN = Path(__file__).parent / "golden"
ANYCAST = "198.51.100.1/32"
ANYCAST6 = "2001:db8:100::1/128"
NsFactory = Callable[[str], Netns]


def _dead(pid: int) -> bool:
    """Gone or a zombie (PID 1 here reaps orphans only after seconds)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] in {"Z", "X"}


def _netns_inode(path: str) -> int:
    return os.stat(path).st_ino


def _link_local(ns: Netns, ifname: str) -> str:
    addrs = json.loads(ns.run("ip", "-j", "-6", "address", "show", "dev", ifname, "scope", "link").stdout)
    return next(str(info["local"]) for info in addrs[0]["addr_info"] if "local" in info)


# --- netns -----------------------------------------------------------------------------------


def test_run_failure_names_command_and_stderr(netns_factory: NsFactory) -> None:
    ns = netns_factory("run")
    assert ns.run("ip", "-o", "link", "show", "lo").stdout.count("UP") >= 1
    with pytest.raises(CommandError) as err:
        ns.run("ip", "link", "show", "nosuchdev0")
    assert "nosuchdev0" in str(err.value)
    assert "does not exist" in str(err.value)
    assert ns.run("false", check=False).returncode == 1


def test_namespace_name_collision_fails_clearly(netns_factory: NsFactory) -> None:
    ns = netns_factory("dup")
    with pytest.raises(FileExistsError, match=ns.name):
        Netns(ns.name)


def test_veth_links_two_namespaces_only(netns_factory: NsFactory) -> None:
    a, b = netns_factory("va"), netns_factory("vb")
    host_links = run_host(["ip", "-o", "link"]).stdout
    veth(a, "eth0", "10.0.0.1/30", b, "eth0", "10.0.0.2/30")
    veth(a, "eth1", "2001:db8::1/64", b, "eth1", "2001:db8::2/64")
    assert run_host(["ip", "-o", "link"]).stdout == host_links
    for ns, ifname, addr in ((a, "eth0", "10.0.0.1"), (b, "eth1", "2001:db8::2")):
        info = json.loads(ns.run("ip", "-j", "address", "show", "dev", ifname).stdout)[0]
        assert "UP" in info["flags"]
        assert addr in {entry["local"] for entry in info["addr_info"]}
    # Traffic crosses the link: a UDP datagram from a to b over IPv6 (no DAD delay).
    with b.enter():
        rx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with rx:
        rx.bind(("2001:db8::2", 0))
        rx.settimeout(5)
        a.run(sys.executable, "-c", "import socket,sys; socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)"
              f".sendto(b'ping', ('2001:db8::2', {rx.getsockname()[1]}))")
        data, peer = rx.recvfrom(64)
    assert (data, peer[0]) == (b"ping", "2001:db8::1")


def test_enter_moves_only_the_calling_thread(netns_factory: NsFactory) -> None:
    ns = netns_factory("enter")
    own = _netns_inode("/proc/thread-self/ns/net")
    target = _netns_inode(str(NETNS_DIR / ns.name))
    inside, looked = threading.Event(), threading.Event()
    seen_by_other_thread: list[int] = []

    def other_thread() -> None:
        inside.wait(5)
        seen_by_other_thread.append(_netns_inode("/proc/thread-self/ns/net"))
        looked.set()

    # A thread that already exists stays where it is (new threads inherit the creator's).
    other = threading.Thread(target=other_thread)
    other.start()
    with ns.enter():
        assert _netns_inode("/proc/thread-self/ns/net") == target
        inside.set()
        assert looked.wait(5)
    other.join()
    assert seen_by_other_thread == [own]
    assert _netns_inode("/proc/thread-self/ns/net") == own


def test_popen_runs_in_namespace_as_user_and_logs(netns_factory: NsFactory, tmp_path: Path) -> None:
    ns = netns_factory("pop")
    log = tmp_path / "child.log"
    proc = ns.popen("sh", "-c", "id -un; readlink /proc/self/ns/net; echo $LABVAR", log=log,
                    env={"LABVAR": "hello"}, user="nobody")
    assert proc.wait(10) == 0
    user, netns, var = log.read_text().split()
    assert (user, var) == ("nobody", "hello")
    assert netns == f"net:[{_netns_inode(str(NETNS_DIR / ns.name))}]"


def _wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_stop_kills_a_child_that_ignores_sigterm(netns_factory: NsFactory, tmp_path: Path) -> None:
    ns = netns_factory("stop")
    log = tmp_path / "child.log"
    proc = ns.popen("sh", "-c", "trap '' TERM; echo ready; sleep 60", log=log)
    _wait_until(lambda: log.exists() and "ready" in log.read_text())
    started = time.monotonic()
    assert ns.stop(proc, timeout=0.5) == -9
    assert time.monotonic() - started < 3
    assert proc not in ns.children


def test_close_leaves_no_namespace_and_no_process(netns_factory: NsFactory, frr_factory: FrrFactory) -> None:
    ns = netns_factory("close")
    router = frr_factory(ns, "rc", 65010, "10.9.9.9", [BgpNeighbor("10.9.9.10", 65011)])
    sleeper = ns.popen("sleep", "300")
    # An untracked process (e.g. started by a test with `ip netns exec ... &`) must die too.
    stray = subprocess.Popen(["ip", "netns", "exec", ns.name, "sleep", "300"])
    _wait_until(lambda: {sleeper.pid, stray.pid} <= set(ns.pids()))
    pids = ns.pids()
    assert len(pids) >= 4  # zebra, bgpd, two sleeps
    ns.close()
    ns.close()  # idempotent
    stray.wait(5)
    assert not (NETNS_DIR / ns.name).exists()
    assert ns.name not in run_host(["ip", "netns", "list"]).stdout
    assert all(_dead(pid) for pid in pids)
    assert not router.rundir.exists()
    router.stop()  # after close: nothing left to stop, must not raise


def test_cleanup_prefix_recovers_a_crashed_run(lab_prefix: str, netns_factory: NsFactory) -> None:
    netns_factory("keep")  # also makes the fixture skip without root
    crashed = f"{lab_prefix}crash"
    # A separate interpreter creates a namespace and a daemon, then dies without cleaning up.
    # It waits until the daemon runs inside the namespace: Popen returns once `ip netns exec`
    # has started, and an `ip` that has not yet opened the namespace when cleanup deletes it
    # only exits a moment later, by itself (what failed CI once, checked too early).
    script = (
        "import os, time\n"
        "from pathlib import Path\n"
        "from lab.netns import Netns\n"
        f"ns = Netns({crashed!r})\n"
        "proc = ns.popen('sleep', '300', log=Path(os.devnull))\n"
        "deadline = time.monotonic() + 20\n"
        "while Path(f'/proc/{proc.pid}/comm').read_text().strip() != 'sleep':\n"
        "    assert time.monotonic() < deadline, 'the daemon never started'\n"
        "    time.sleep(0.01)\n"
        "print(proc.pid, flush=True)\n"
        "os._exit(3)\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root,
                            timeout=30, check=False)
    assert result.returncode == 3, result.stderr
    orphan = int(result.stdout)
    assert (NETNS_DIR / crashed).exists()
    assert not _dead(orphan)
    removed = cleanup_prefix(lab_prefix)
    assert crashed in removed
    assert not (NETNS_DIR / crashed).exists()
    assert _dead(orphan)
    with pytest.raises(ValueError):
        cleanup_prefix("")


# --- routewatch ------------------------------------------------------------------------------


def test_routewatch_records_add_replace_delete(netns_factory: NsFactory) -> None:
    a, b = netns_factory("wa"), netns_factory("wb")
    veth(a, "eth0", "10.0.0.1/24", b, "eth0", "10.0.0.2/24")
    a.run("ip", "route", "add", "192.0.2.0/24", "via", "10.0.0.2")  # a neighbouring prefix, ignored
    with RouteWatcher(a, "192.0.2.7/32") as watch:
        assert watch.initial == frozenset()
        before = time.monotonic()
        a.run("ip", "route", "add", "192.0.2.7/32", "via", "10.0.0.2")
        added = watch.wait_for(lambda hops: hops == {"10.0.0.2"}, timeout=5)
        a.run("ip", "route", "replace", "192.0.2.7/32", "nexthop", "via", "10.0.0.2",
              "nexthop", "via", "10.0.0.3")
        ecmp = watch.wait_for(lambda hops: len(hops) == 2, timeout=5)
        a.run("ip", "route", "add", "192.0.2.7/32", "via", "10.0.0.4", "metric", "50")  # backup
        a.run("ip", "route", "del", "192.0.2.7/32", "metric", "0")
        backup = watch.wait_for(lambda hops: hops == {"10.0.0.4"}, timeout=5)
        a.run("ip", "route", "del", "192.0.2.7/32")
        gone = watch.wait_for(lambda hops: not hops, timeout=5, since=backup)
        after = time.monotonic()
    assert before < added < ecmp < backup < gone < after
    kinds = [(e.kind, set(e.nexthops)) for e in watch.events]
    assert kinds == [("add", {"10.0.0.2"}), ("change", {"10.0.0.2", "10.0.0.3"}),
                     ("add", {"10.0.0.2", "10.0.0.3"}),  # the metric-50 route hides behind ECMP
                     ("del", {"10.0.0.4"}), ("del", set())]
    assert all(e.prefix == "192.0.2.7/32" for e in watch.events)
    # Waiting for a state that held at `since` returns `since` itself; without `since`, the
    # current state counts from when it began, and earlier states never match.
    assert watch.wait_for(lambda hops: not hops, timeout=1, since=gone) == gone
    assert watch.wait_for(lambda hops: not hops, timeout=1) == gone
    assert watch.wait_for(lambda hops: hops == {"10.0.0.2"}, timeout=1, since=before) == added
    with pytest.raises(TimeoutError, match=r"192\.0\.2\.7/32"):
        watch.wait_for(bool, timeout=0.2)


def test_routewatch_sees_existing_route_and_ipv6_ecmp(netns_factory: NsFactory) -> None:
    a, b = netns_factory("w6a"), netns_factory("w6b")
    veth(a, "eth0", "2001:db8::1/64", b, "eth0", "2001:db8::2/64")
    a.run("ip", "-6", "route", "add", "2001:db8:7::/48", "via", "2001:db8::2")
    assert read_nexthops(a, "2001:db8:7::/48") == {"2001:db8::2"}
    assert read_nexthops(a, "2001:db8:7::/64") == frozenset()
    with RouteWatcher(a, "2001:db8:7::/48") as watch:
        assert watch.initial == {"2001:db8::2"}
        a.run("ip", "-6", "route", "replace", "2001:db8:7::/48", "nexthop", "via", "2001:db8::2",
              "nexthop", "via", "2001:db8::3")
        watch.wait_for(lambda hops: hops == {"2001:db8::2", "2001:db8::3"}, timeout=5)
        assert read_nexthops(a, "2001:db8:7::/48") == {"2001:db8::2", "2001:db8::3"}
        a.run("ip", "-6", "route", "del", "2001:db8:7::/48")
        watch.wait_for(lambda hops: not hops, timeout=5)
    assert read_nexthops(a, "2001:db8:7::/48") == frozenset()


# --- FRR -------------------------------------------------------------------------------------


GOLDEN_CONFIG = BgpConfig(
    "edge1", 65000, "192.0.2.254",
    (BgpNeighbor("10.0.0.2", 65001, description="pop-a exabgp", passive=True, hold_time=3),
     BgpNeighbor("10.0.0.6", 65002, hold_time=9, keepalive=1, connect_retry=None),
     BgpNeighbor("2001:db8::2", 65001, families=("ipv6", "ipv4"))),
    ("203.0.113.0/24", "2001:db8:ffff::/48"),
    maximum_paths=4, extra_config="ip prefix-list ANY seq 5 permit any")


def test_render_config_matches_golden() -> None:
    rendered = GOLDEN_CONFIG.render()
    golden = GOLDEN / "frr_bgpd.conf"
    if os.environ.get("POP_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(rendered)
    assert rendered == golden.read_text(), "run with POP_UPDATE_GOLDEN=1 to accept the change"


def test_config_values_are_validated() -> None:
    with pytest.raises(ValueError, match="control character"):
        BgpNeighbor("10.0.0.1", 65001, description="x\nneighbor 10.0.0.9 shutdown")
    with pytest.raises(ValueError):
        BgpNeighbor("10.0.0.300", 65001)
    with pytest.raises(ValueError, match="hold_time"):
        BgpNeighbor("10.0.0.1", 65001, hold_time=2)
    with pytest.raises(ValueError, match="router_id"):
        BgpConfig("r", 65000, "2001:db8::1", ())
    with pytest.raises(ValueError):
        BgpConfig("r", 65000, "10.0.0.1", (), ("10.0.0.1/24",))  # host bits set


def test_frr_loads_the_rendered_config(netns_factory: NsFactory, frr_factory: FrrFactory,
                                       tmp_path: Path) -> None:
    # vtysh's dry run knows every daemon's grammar; prove first that it rejects nonsense.
    bad = tmp_path / "bad.conf"
    bad.write_text("router bgp 65000\n no such command\nexit\n")
    assert run_host(["vtysh", "-C", "-f", str(bad)], check=False).returncode != 0
    good = tmp_path / "golden.conf"
    good.write_text(GOLDEN_CONFIG.render())
    dry = run_host(["vtysh", "-C", "-f", str(good)], check=False)
    assert dry.returncode == 0, dry.stdout + dry.stderr

    ns = netns_factory("load")
    cfg = GOLDEN_CONFIG
    router = frr_factory(ns, cfg.name, cfg.asn, cfg.router_id, cfg.neighbors, cfg.networks,
                         maximum_paths=cfg.maximum_paths, extra_config=cfg.extra_config)
    assert router.config_errors() == []
    assert router.config == cfg
    assert FrrRouter.from_config(ns, cfg, workdir=tmp_path / "unused").config == cfg
    running = router.vtysh("show running-config", daemon="bgpd")
    for line in cfg.render().splitlines():
        if line.strip().startswith(("neighbor", "network", "maximum-paths", "bgp router-id")):
            assert line.strip() in running, line
    with pytest.raises(FrrError, match="no such command"):
        frr_factory(netns_factory("bad"), "bad", 65000, "10.0.0.1", [],
                    extra_config="router bgp 65000\n no such command")


def _pair(netns_factory: NsFactory, frr_factory: FrrFactory, ipv6: bool
          ) -> tuple[FrrRouter, FrrRouter, str]:
    """Router a (AS 65001) announcing the anycast prefix to router b (AS 65002) over a veth."""
    a, b = netns_factory("a"), netns_factory("b")
    if ipv6:
        veth(a, "eth0", "2001:db8::1/64", b, "eth0", "2001:db8::2/64")
        addr_a, addr_b, prefix = "2001:db8::1", "2001:db8::2", ANYCAST6
    else:
        veth(a, "eth0", "10.0.0.1/30", b, "eth0", "10.0.0.2/30")
        addr_a, addr_b, prefix = "10.0.0.1", "10.0.0.2", ANYCAST
    ra = frr_factory(a, "ra", 65001, "10.0.0.1", [BgpNeighbor(addr_b, 65002, hold_time=3)], [prefix])
    rb = frr_factory(b, "rb", 65002, "10.0.0.2", [BgpNeighbor(addr_a, 65001, hold_time=3)])
    return ra, rb, prefix


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_ebgp_announcement_reaches_kernel_and_withdraw_removes_it(
        netns_factory: NsFactory, frr_factory: FrrFactory, ipv6: bool) -> None:
    ra, rb, prefix = _pair(netns_factory, frr_factory, ipv6)
    peer_of_b = ra.config.neighbors[0].address
    peer_of_a = rb.config.neighbors[0].address
    # eBGP over IPv6 installs the peer's link-local address as next hop.
    expected = {_link_local(ra.ns, "eth0")} if ipv6 else {peer_of_a}
    with RouteWatcher(rb.ns, prefix) as watch:
        rb.wait_established(peer_of_a)
        ra.wait_established(peer_of_b)
        watch.wait_for(lambda hops: hops == expected, timeout=15)
        assert rb.kernel_nexthops(prefix) == expected
        paths = rb.bgp_routes(prefix)["paths"]
        assert [p["aspath"]["string"] for p in paths] == ["65001"]

        t0 = time.monotonic()
        ra.withdraw(prefix)
        gone = watch.wait_for(lambda hops: not hops, timeout=10, since=t0)
        assert rb.kernel_nexthops(prefix) == set()
        assert rb.bgp_routes(prefix) == {}
        assert gone - t0 < 5

        ra.announce(prefix)
        back = watch.wait_for(lambda hops: hops == expected, timeout=10, since=gone)
        t1 = time.monotonic()
        ra.stop()  # bgpd sends a Cease: b drops the session and the route at once
        stopped = watch.wait_for(lambda hops: not hops, timeout=10, since=t1)
        assert stopped - t1 < 3
    kinds = [e.kind for e in watch.events]
    # the first route can be installed before the watcher subscribed: then it is the initial
    # state (read from the dump), not an event
    assert kinds[-3:] == ["del", "add", "del"] and kinds[:-3] in ([], ["add"]), kinds
    assert back < stopped


def test_ecmp_across_two_peers_with_different_asns(netns_factory: NsFactory,
                                                    frr_factory: FrrFactory) -> None:
    core, pop1, pop2 = netns_factory("core"), netns_factory("pop1"), netns_factory("pop2")
    veth(core, "to-pop1", "10.0.1.1/30", pop1, "eth0", "10.0.1.2/30")
    veth(core, "to-pop2", "10.0.2.1/30", pop2, "eth0", "10.0.2.2/30")
    with RouteWatcher(core, ANYCAST) as watch:
        rcore = frr_factory(core, "core", 65000, "10.0.0.100",
                            [BgpNeighbor("10.0.1.2", 65001, hold_time=3),
                             BgpNeighbor("10.0.2.2", 65002, hold_time=3)])
        rpop1 = frr_factory(pop1, "pop1", 65001, "10.0.1.2", [BgpNeighbor("10.0.1.1", 65000, hold_time=3)],
                            [ANYCAST])
        frr_factory(pop2, "pop2", 65002, "10.0.2.2", [BgpNeighbor("10.0.2.1", 65000, hold_time=3)], [ANYCAST])
        both = {"10.0.1.2", "10.0.2.2"}
        watch.wait_for(lambda hops: hops == both, timeout=20)
        assert rcore.kernel_nexthops(ANYCAST) == both
        multipath = [p for p in rcore.bgp_routes(ANYCAST)["paths"] if p.get("multipath") or
                     p.get("bestpath")]
        assert len(multipath) == 2

        t0 = time.monotonic()
        rpop1.stop()
        shrunk = watch.wait_for(lambda hops: hops == {"10.0.2.2"}, timeout=10, since=t0)
        assert shrunk - t0 < 3
    # Losing one of two paths replaces the ECMP route; it never blackholes in between.
    after_ecmp = [e for e in watch.events if e.timestamp > t0]
    assert after_ecmp
    assert all(e.nexthops for e in after_ecmp)
    assert after_ecmp[-1].kind == "change"
