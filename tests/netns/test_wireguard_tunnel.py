"""Through the tunnel against real wireguard-go: every named outcome, in network namespaces.

Topology (namespaces from netns_factory; the microVM twin builds the same with the kernel
module, tests/kernel/inner/test_wg_tunnel_kernel_inner.py):

    client 10.206.0.2 ---- 10.206.0.1 server ---- 10.207.0.1 ... 10.207.0.2 internet
                                wg: 10.255.0.1/16                 (route back to 10.255/16)
                                probe peer allowed-ips 10.255.255.1/32

The probe's tunnel address is 10.255.255.1 (the probe peer's allowed-ips on the server);
targets are the server's own tunnel address and the internet node beyond it, which the
server reaches by forwarding (net.ipv4.ip_forward=1).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.netns import Netns, veth
from lab.wgserver import WireGuardServer, keypair, write_key
from pop import wgkeys
from pop.checks import wireguard
from pop.checks.tunnel import Echo, Session
from pop.checks.wireguard import Exchange, WireGuardCheck
from tests.netns.test_wireguard_go import Lab

SERVER_IP, CLIENT_IP, PORT = "10.206.0.1", "10.206.0.2", 51820
SERVER_OUT, INTERNET = "10.207.0.1", "10.207.0.2"
SERVER_TUNNEL, PROBE_TUNNEL = "10.255.0.1", "10.255.255.1"


@dataclass
class TunnelLab:
    lab: Lab  # the server and the client, as the handshake tests have them
    internet: Netns
    probe_private: bytes
    data_timeout: float = 0.3

    @property
    def server(self) -> WireGuardServer:
        return self.lab.server

    def check(self, target: str) -> WireGuardCheck:
        return WireGuardCheck(SERVER_IP, PORT, self.server.public, self.probe_private, timeout=self.lab.timeout,
                              through=Echo(PROBE_TUNNEL, target), data_timeout=self.data_timeout)

    def exchange(self, target: str, count: int = 1) -> list[Exchange]:
        check = self.check(target)

        async def many() -> list[Exchange]:
            return [await check.probe_exchange() for _ in range(count)]

        return list(self.lab.run(many))

    def forwarding(self, on: bool) -> None:
        self.server.ns.run("sysctl", "-qw", f"net.ipv4.ip_forward={int(on)}")


@contextlib.contextmanager
def tunnel_lab(make_ns: Callable[[str], Netns], workdir: Path, *, kernel: bool = False,
               timeout: float = 0.5, data_timeout: float = 0.3) -> Iterator[TunnelLab]:
    """Server, client and internet namespaces; the caller removes the namespaces."""
    server_ns, client_ns, internet = make_ns("wts"), make_ns("wtc"), make_ns("wti")
    veth(server_ns, "twt-s", f"{SERVER_IP}/24", client_ns, "twt-c", f"{CLIENT_IP}/24")
    veth(server_ns, "twt-o", f"{SERVER_OUT}/24", internet, "twt-i", f"{INTERNET}/24")
    internet.run("ip", "route", "add", "10.255.0.0/16", "via", SERVER_OUT)
    server_ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    # wireguard-go's UAPI socket is named after the interface in a directory shared by all
    # namespaces: the name must be unique on the host
    ifname = "wtk0" if kernel else f"twt{secrets.token_hex(4)}"
    server = WireGuardServer(server_ns, ifname, workdir, PORT, kernel=kernel, tunnel_address=f"{SERVER_TUNNEL}/16")
    try:
        server.start()
        probe_private, probe_public = keypair()
        server.add_peer(probe_public, allowed_ips=f"{PROBE_TUNNEL}/32")
        yield TunnelLab(Lab(server, client_ns, timeout=timeout), internet, probe_private, data_timeout)
    finally:
        server.stop()  # before the namespaces go


@pytest.fixture
def tunnel(netns_factory: Callable[[str], Netns], tmp_path: Path) -> Iterator[TunnelLab]:
    missing = [tool for tool in ("wireguard-go", "wg") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {' and '.join(missing)} (apt-get install wireguard-go wireguard-tools)")
    with tunnel_lab(netns_factory, tmp_path) as lab:
        yield lab


def outcome(exchange: Exchange) -> tuple[bool, str, bool]:
    return exchange.result.ok, exchange.result.error, exchange.result.definitive


def test_echo_to_the_servers_tunnel_address_is_ok(tunnel: TunnelLab) -> None:
    exchanges = tunnel.exchange(SERVER_TUNNEL, count=3)
    assert all(e.result.ok for e in exchanges), exchanges
    for e in exchanges:
        assert e.handshake_rtt is not None and e.data_rtt is not None and 0 < e.data_rtt < tunnel.data_timeout
        assert f"through {SERVER_TUNNEL}" in e.result.detail


def test_echo_to_a_target_beyond_the_server_is_ok(tunnel: TunnelLab) -> None:
    exchanges = tunnel.exchange(INTERNET, count=3)
    assert all(e.result.ok for e in exchanges), exchanges


def test_forwarding_off_is_no_data_reply_while_the_handshake_succeeds(tunnel: TunnelLab) -> None:
    tunnel.forwarding(False)
    (broken,) = tunnel.exchange(INTERNET)
    assert outcome(broken) == (False, "no-data-reply", True), broken
    assert broken.handshake_rtt is not None and "alive but useless" in broken.result.detail
    # the server itself still answers through the tunnel: it is the forwarding that broke
    assert tunnel.exchange(SERVER_TUNNEL)[0].result.ok
    tunnel.forwarding(True)
    assert tunnel.exchange(INTERNET)[0].result.ok


def test_target_without_a_route_back_is_no_data_reply(tunnel: TunnelLab) -> None:
    tunnel.internet.run("ip", "route", "del", "10.255.0.0/16")
    (broken,) = tunnel.exchange(INTERNET)
    assert outcome(broken) == (False, "no-data-reply", True), broken


def test_probe_address_outside_the_peers_allowed_ips_is_no_data_reply(tunnel: TunnelLab) -> None:
    # what an operator who forgot the probe peer's allowed-ips sees: the server drops what
    # the peer sends from an address it is not allowed to use
    tunnel.server.set_allowed_ips(wgkeys.public_key_of(tunnel.probe_private), "10.255.254.1/32")
    (broken,) = tunnel.exchange(SERVER_TUNNEL)
    assert outcome(broken) == (False, "no-data-reply", True), broken


@pytest.mark.parametrize(("route", "why"), [
    ("unreachable", "host unreachable"),
    ("prohibit", "administratively prohibited"),
])
def test_server_without_a_way_to_the_target_answers_target_unreachable(tunnel: TunnelLab, route: str,
                                                                       why: str) -> None:
    tunnel.server.ns.run("ip", "route", "add", route, f"{INTERNET}/32")
    (refused,) = tunnel.exchange(INTERNET)
    assert outcome(refused) == (False, "target-unreachable", True), refused
    assert why in refused.result.detail, refused


def test_stopped_server_is_still_icmp_unreachable_with_through(tunnel: TunnelLab) -> None:
    tunnel.server.stop()
    (dead,) = tunnel.exchange(INTERNET)
    assert outcome(dead) == (False, "icmp-unreachable", True), dead
    assert dead.handshake_rtt is None


# --- a stalled engine: the answer came in time, the probe read it late ------------------------


def stall_once(monkeypatch: pytest.MonkeyPatch, seconds: float, *, after_data: bool) -> list[float]:
    """The probe's event loop stands still for ``seconds`` (a CPU-starved engine) at its first
    wait for an answer: the first one after a data message was sealed, or else the handshake's.
    Returns the list the stall appends its length to."""
    real_readable, real_seal = wireguard._readable, Session.seal
    sealed, stalls = [False], list[float]()

    def seal(self: Session, packet: bytes) -> bytes:
        sealed[0] = True
        return real_seal(self, packet)

    async def readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
        if not stalls and sealed[0] is after_data:
            time.sleep(seconds)  # noqa: ASYNC251 -- the loop is blocked: nothing runs, the answer waits in the socket
            stalls.append(seconds)
        await real_readable(loop, fd)

    monkeypatch.setattr(Session, "seal", seal)
    monkeypatch.setattr(wireguard, "_readable", readable)
    return stalls


def test_an_echo_reply_that_came_while_the_probe_was_stalled_is_ok(tunnel: TunnelLab,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The CI run on 9ab33b6 (two suites on two cores) removed a healthy server with two
    # no-data-reply in a row: a reply read after the wait's deadline was never read at all.
    stalls = stall_once(monkeypatch, 2 * tunnel.data_timeout, after_data=True)
    (late,) = tunnel.exchange(INTERNET)
    assert stalls, "the stall never happened"
    assert late.result.ok, late


def test_a_handshake_response_that_came_while_the_probe_was_stalled_is_ok(tunnel: TunnelLab,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    stalls = stall_once(monkeypatch, 2 * tunnel.lab.timeout, after_data=False)
    (late,) = tunnel.exchange(INTERNET)
    assert stalls, "the stall never happened"
    assert late.result.ok, late


# --- `pop wg-probe --through` ------------------------------------------------------------------


def wg_probe(tunnel: TunnelLab, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    keyfile = write_key(tmp_path / "probe.key", tunnel.probe_private)
    return tunnel.lab.client.run(
        sys.executable, "-m", "pop", "wg-probe", f"{SERVER_IP}:{PORT}", "--server-key",
        wgkeys.encode_key(tunnel.server.public), "--probe-key-file", str(keyfile), "--count", "2",
        "--interval", "0.05", "--timeout", str(tunnel.lab.timeout), "--tunnel-address", PROBE_TUNNEL, *args,
        check=False, timeout=30)


def test_wg_probe_through_shows_handshake_and_data_round_trips(tunnel: TunnelLab, tmp_path: Path) -> None:
    good = wg_probe(tunnel, tmp_path, "--through", INTERNET)
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.count(f"tunnel ok to {INTERNET}") == 2, good.stdout
    assert "handshake=" in good.stdout and "data=" in good.stdout, good.stdout
    tunnel.forwarding(False)
    bad = wg_probe(tunnel, tmp_path, "--through", INTERNET)
    assert bad.returncode == 1 and "no-data-reply" in bad.stdout and "handshake=" in bad.stdout, bad.stdout
    assert "alive but useless" in bad.stdout, bad.stdout
