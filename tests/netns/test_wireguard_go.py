"""The handshake check against real wireguard-go, in network namespaces.

Topology (namespaces from the netns_factory fixture): namespace "wgs" runs wireguard-go
(foreground, configured with `wg`) on 10.203.0.1; namespace "wgc" (10.203.0.2) runs the
probes, from a thread that setns()'d into it. The wireguard-go interface name is random:
its UAPI socket /var/run/wireguard/<ifname>.sock is global across namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lab.netns import Netns, veth
from lab.wgserver import WireGuardServer, keypair, write_key
from pop import wgkeys
from pop.checks import noise
from pop.checks.base import CheckResult
from pop.checks.wireguard import MIN_GAP_AFTER_ANSWER, MIN_INITIATION_INTERVAL, WireGuardCheck

SERVER_IP, CLIENT_IP, PORT = "10.203.0.1", "10.203.0.2", 51820


@dataclass
class Lab:
    server: WireGuardServer
    client: Netns
    timeout: float = 0.5  # per answer; the microVM's emulated CPU needs more
    # initiations that put the responder "under load": wireguard-go is from 128 queued (of
    # 1024, and drops when full); the kernel from 512 (of 4096; past 2048 it rate-limits the
    # source address, which the probe shares with the flood)
    flood: int = 800

    def run(self, coro: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """Run an async function on its own event loop, in a thread inside the client namespace."""
        out: dict[str, Any] = {}

        def target() -> None:
            try:
                with self.client.enter():
                    out["value"] = asyncio.run(coro())
            except BaseException as exc:
                out["error"] = exc

        thread = threading.Thread(target=target)
        thread.start()
        thread.join(60)
        assert not thread.is_alive(), "probe thread hung"
        if "error" in out:
            raise out["error"]
        return out["value"]

    def probe(self, check: WireGuardCheck, count: int = 1) -> list[CheckResult]:
        async def many() -> list[CheckResult]:
            return [await check.probe() for _ in range(count)]

        return list(self.run(many))

    def check(self, probe_private: bytes, **kwargs: Any) -> WireGuardCheck:
        server_key = kwargs.pop("server_key", self.server.public)
        kwargs.setdefault("timeout", self.timeout)
        return WireGuardCheck(SERVER_IP, PORT, server_key, probe_private, **kwargs)


@pytest.fixture
def lab(netns_factory: Callable[[str], Netns], tmp_path: Path) -> Iterator[Lab]:
    missing = [tool for tool in ("wireguard-go", "wg") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {' and '.join(missing)} (apt-get install wireguard-go wireguard-tools)")
    if not Path("/dev/net/tun").exists():
        pytest.skip("needs /dev/net/tun for wireguard-go")
    server_ns, client_ns = netns_factory("wgs"), netns_factory("wgc")
    veth(server_ns, "twg-s", f"{SERVER_IP}/24", client_ns, "twg-c", f"{CLIENT_IP}/24")
    # wireguard-go's UAPI socket is named after the interface in a directory shared by all
    # namespaces: the name must be unique on the host
    server = WireGuardServer(server_ns, f"twg{secrets.token_hex(4)}", tmp_path, PORT)
    try:
        server.start()
        yield Lab(server, client_ns)
    finally:
        server.stop()  # before netns_factory deletes the namespaces


@pytest.fixture
def probe_key(lab: Lab) -> bytes:
    private, public = keypair()
    lab.server.add_peer(public)
    return private


def test_right_key_succeeds_with_rtt(lab: Lab, probe_key: bytes) -> None:
    results = lab.probe(lab.check(probe_key), count=3)
    assert all(r.ok for r in results), results
    assert all(r.latency is not None and 0 < r.latency < lab.timeout for r in results), results


def test_wrong_server_key_is_silence(lab: Lab, probe_key: bytes) -> None:
    (result,) = lab.probe(lab.check(probe_key, server_key=keypair()[1]))
    assert (result.ok, result.error, result.definitive) == (False, "timeout", False)
    assert "wrong server public key" in result.detail


def test_probe_key_unknown_to_the_server_is_silence(lab: Lab, probe_key: bytes) -> None:
    (result,) = lab.probe(lab.check(keypair()[0]))
    assert (result.ok, result.error, result.definitive) == (False, "timeout", False)
    # the same responder still answers the configured key: the silence is about the key
    assert lab.probe(lab.check(probe_key))[0].ok


def test_psk_on_both_sides_succeeds(lab: Lab) -> None:
    private, public = keypair()
    psk = os.urandom(32)
    lab.server.add_peer(public, psk)
    results = lab.probe(lab.check(private, psk=psk), count=2)
    assert all(r.ok for r in results), results


@pytest.mark.parametrize(
    ("server_has", "probe_has", "why"),
    [
        (True, False, "none was given"),
        (False, True, "server has no preshared key"),
        (True, True, "differs"),
    ],
)
def test_psk_mismatch_is_reported_as_such(lab: Lab, server_has: bool, probe_has: bool, why: str) -> None:
    private, public = keypair()
    lab.server.add_peer(public, os.urandom(32) if server_has else None)
    (result,) = lab.probe(lab.check(private, psk=os.urandom(32) if probe_has else None))
    assert (result.ok, result.error, result.definitive) == (False, "psk-mismatch", True), result
    assert why in result.detail


def test_closed_port_is_icmp_unreachable(lab: Lab, probe_key: bytes) -> None:
    check = WireGuardCheck(SERVER_IP, PORT + 1, lab.server.public, probe_key, timeout=lab.timeout)
    (result,) = lab.probe(check)
    assert (result.ok, result.error, result.definitive) == (False, "icmp-unreachable", True), result


def test_server_stopped_mid_run_fails_after_success(lab: Lab, probe_key: bytes) -> None:
    check = lab.check(probe_key)
    before = lab.probe(check, count=2)
    lab.server.stop()
    after = lab.probe(check, count=2)
    assert all(r.ok for r in before), before
    assert [(r.ok, r.error, r.definitive) for r in after] == [(False, "icmp-unreachable", True)] * 2, after


def test_rapid_probes_respect_the_per_peer_rate_limit(lab: Lab, probe_key: bytes) -> None:
    # a generous answer timeout: on a loaded machine a queued answer can take longer than the
    # default, and only the responder's rate rule (silence however long we wait) must fail this
    check = lab.check(probe_key, timeout=3.0)

    async def burst() -> tuple[list[CheckResult], float]:
        start = time.monotonic()
        results = await asyncio.gather(*(check.probe() for _ in range(8)))
        return list(results), time.monotonic() - start

    results, elapsed = lab.run(burst)
    assert all(r.ok for r in results), results  # none fell to the responder's flood rule
    assert elapsed >= 7 * MIN_GAP_AFTER_ANSWER  # one in flight at a time, 20 ms after each answer


def test_the_rate_limit_is_real_without_pacing(lab: Lab, probe_key: bytes) -> None:
    """Negative control: a second initiation right after the first answer, bypassing the pacer."""
    initiator = noise.Initiator(probe_key, lab.server.public)
    clock = noise.Tai64nClock()

    async def answer(loop: asyncio.AbstractEventLoop, sock: socket.socket, wait: float) -> bytes | None:
        try:
            async with asyncio.timeout(wait):
                return await loop.sock_recv(sock, 2048)
        except TimeoutError:
            return None

    async def attempts() -> list[tuple[noise.Outcome | None, bytes | None]]:
        loop = asyncio.get_running_loop()
        seen = []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.connect((SERVER_IP, PORT))
            for index in range(0, 6, 2):
                await asyncio.sleep(0.05)
                msg, first = initiator.initiation(index, clock.next())
                sock.send(msg)
                data = await answer(loop, sock, lab.timeout)
                outcome = first.validate(data).outcome if data else None
                sock.send(initiator.initiation(index + 1, clock.next())[0])
                seen.append((outcome, await answer(loop, sock, 0.3)))
        return seen

    seen = lab.run(attempts)
    assert all(outcome is noise.Outcome.VALID for outcome, _ in seen), seen
    # the consumption of the second is well within 20 ms of the first's (which preceded its
    # answer); a loaded machine may stretch one attempt past that, not all three
    assert any(second is None for _, second in seen), seen


def test_replayed_timestamp_is_silence(lab: Lab, probe_key: bytes) -> None:
    """Why timestamps must increase per key: an older one (a restart after a clock step) is dropped."""
    assert lab.probe(lab.check(probe_key))[0].ok
    initiator = noise.Initiator(probe_key, lab.server.public)

    async def stale() -> bytes | None:
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.connect((SERVER_IP, PORT))
            await asyncio.sleep(MIN_INITIATION_INTERVAL)
            msg, _ = initiator.initiation(3, noise.tai64n(time.time_ns() - 10_000_000_000))
            sock.send(msg)
            try:
                async with asyncio.timeout(lab.timeout):
                    return await loop.sock_recv(sock, 2048)
            except TimeoutError:
                return None

    assert lab.run(stale) is None
    assert lab.probe(lab.check(probe_key))[0].ok  # the shared per-key clock is still ahead


def test_cookie_reply_under_load_then_success_with_mac2(lab: Lab, probe_key: bytes) -> None:
    """A responder is "under load" while many handshakes queue (Lab.flood), and for a second after.

    Flood it with initiations that carry a valid mac1 (anyone who knows the server's public
    key can compute it) from another socket, then probe: it must answer with a cookie reply,
    and the retry with mac2 must succeed.
    """
    mac1_key = noise.hash_(noise.LABEL_MAC1, lab.server.public)
    junk = []
    for _ in range(lab.flood):
        body = b"\x01\x00\x00\x00" + os.urandom(112)
        junk.append(body + noise.mac(mac1_key, body) + bytes(16))
    check = lab.check(probe_key)

    async def flood_then_probe() -> CheckResult:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood:
            flood.setblocking(False)
            flood.connect((SERVER_IP, PORT))
            for datagram in junk:
                with contextlib.suppress(BlockingIOError):
                    flood.send(datagram)
            # let the server's socket buffer drain (it drops what overflows, our probe too);
            # the under-load state lasts a second
            await asyncio.sleep(0.05)
            return await check.probe()

    results = [lab.run(flood_then_probe) for _ in range(3)]
    # on a busy machine the flood can still fill the responder's queue when the probe
    # arrives, and the probe is dropped with it: silence, never a wrong verdict
    assert all(r.ok or r.error in ("timeout", "cookie") for r in results), results
    assert any(r.ok and "cookie" in r.detail for r in results), results


# --- the one-shot diagnostic -------------------------------------------------------------------


def wg_probe(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    """`pop wg-probe ...` as an engineer runs it (pop is installed in the venv, editable)."""
    return lab.client.run(sys.executable, "-m", "pop", "wg-probe", *args, check=False, timeout=30)


def test_wg_probe_exit_codes(lab: Lab, tmp_path: Path) -> None:
    private, public = keypair()
    lab.server.add_peer(public)
    keyfile = write_key(tmp_path / "probe.key", private)
    common = ["--probe-key-file", str(keyfile), "--count", "3", "--interval", "0.05", "--timeout", "0.3"]
    server_key = wgkeys.encode_key(lab.server.public)

    good = wg_probe(lab, f"{SERVER_IP}:{PORT}", "--server-key", server_key, *common)
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.count("handshake ok") == 3 and "3 sent, 3 ok" in good.stdout, good.stdout

    wrong = wg_probe(lab, f"{SERVER_IP}:{PORT}", "--server-key", wgkeys.encode_key(keypair()[1]), *common)
    assert wrong.returncode == 1 and "0 ok" in wrong.stdout and "timeout" in wrong.stdout, wrong.stdout

    closed = wg_probe(lab, f"{SERVER_IP}:{PORT + 1}", "--server-key", server_key, *common)
    assert closed.returncode == 1 and "icmp-unreachable" in closed.stdout, closed.stdout

    keyfile.chmod(0o644)
    unsafe = wg_probe(lab, f"{SERVER_IP}:{PORT}", "--server-key", server_key, *common)
    assert unsafe.returncode == 2 and "chmod 600" in unsafe.stderr, unsafe.stderr
