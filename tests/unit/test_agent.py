"""A running probe agent, in-process on 127.0.0.1:0, against real listeners opened here.

pop1 is alive (a TCP listener and a WireGuard responder, the whitepaper-after responder of
test_wireguard), pop2's port refuses; an identity responder answers on the "anycast" address.
The agent's /v1/results must verify, show the rise/fall opinions, map the anycast address,
carry a strictly increasing sequence, and keep being served when everything dies.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from pop import wgkeys
from pop.agent import auth
from pop.agent.config import AgentConfig, PopTarget, Target, WireGuardProbe
from pop.agent.daemon import Agent
from pop.identity import serve_identity
from tests.unit.test_wireguard import one, pair, serve

KEY = b"a shared key of 32 bytes exactly"
DEADLINE = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def fetch(http: aiohttp.ClientSession, url: str) -> tuple[dict[str, Any], int]:
    async with http.get(url + "/v1/results") as response:
        body = await response.read()
        assert response.status == 200
        assert response.headers[auth.AGENT_HEADER] == "probe1"
        assert auth.verify(KEY, body, response.headers[auth.SIGNATURE_HEADER])
        assert not auth.verify(b"not the key, but 16 bytes+", body, response.headers[auth.SIGNATURE_HEADER])
        report: dict[str, Any] = json.loads(body)
        return report, report["sequence"]


async def wait_report(http: aiohttp.ClientSession, url: str, condition: Callable[[dict[str, Any]], bool],
                      sequences: list[int]) -> dict[str, Any]:
    """Poll until a report meets `condition` (no fixed sleep: the agent's interval is 50 ms)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while True:
        report, sequence = await fetch(http, url)
        sequences.append(sequence)
        if condition(report):
            return report
        assert loop.time() < deadline, f"no report met the condition; last: {report}"
        await asyncio.sleep(0.02)


async def healthz(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with http.get(url + "/healthz") as response:
        return response.status, await response.json()


def test_running_agent_serves_signed_results_after_rise_and_fall() -> None:
    async def main() -> None:
        alive = await asyncio.start_server(accept, "127.0.0.1", 0)
        alive_port = alive.sockets[0].getsockname()[1]
        wg = pair()
        wg_server, wg_port = await serve(one(wg.responder))
        identity = await serve_identity("127.0.0.1", 0, "pop1", "vpn11")
        config = AgentConfig(
            name="probe1", key_file="(given directly)", listen="127.0.0.1", port=0,
            pops=(PopTarget("pop1", (Target("127.0.0.1", alive_port, WireGuardProbe(wg.responder.public, wg_port)),)),
                  PopTarget("pop2", (Target("127.0.0.1", free_port()),))),
            interval=0.05, timeout=0.3, rise=2, fall=3,
            identity_port=identity.sockets[0].getsockname()[1], anycast=("127.0.0.1",))
        agent = Agent(config, KEY, wg.probe)
        sequences: list[int] = []
        try:
            async with agent.serving(), aiohttp.ClientSession() as http:
                url = f"http://127.0.0.1:{agent.port}"
                report = await wait_report(http, url, lambda r: r["pops"]["pop1"]["reachable"]
                                           and r["anycast"].get("127.0.0.1", {}).get("pop") == "pop1", sequences)
                assert report["version"] == 1 and report["agent"] == "probe1" and report["boot_id"] == agent.boot_id
                pop1, pop2 = report["pops"]["pop1"], report["pops"]["pop2"]
                assert pop1["checks"]["tcp"]["ok"] and pop1["checks"]["wireguard"]["ok"]
                assert pop1["rtt_ms"] is not None and pop1["streak"] >= 1
                assert len(wg.responder.consumed) >= 2  # real handshakes, rise = 2
                assert not pop2["reachable"] and pop2["checks"]["tcp"] == {"ok": False, "rtt_ms": None,
                                                                           "error": "refused"}
                assert report["anycast"]["127.0.0.1"]["server"] == "vpn11"
                assert report["anycast"]["127.0.0.1"]["error"] is None
                assert (await healthz(http, url))[0] == 200

                # pop1 and the anycast responder die: the opinion falls, the agent keeps serving
                alive.close()
                identity.close()
                wg_server.transport.close()
                report = await wait_report(http, url, lambda r: not r["pops"]["pop1"]["reachable"]
                                           and r["anycast"]["127.0.0.1"]["error"] == "refused", sequences)
                assert report["pops"]["pop1"]["since"] > report["pops"]["pop2"]["since"]
                assert report["anycast"]["127.0.0.1"]["pop"] is None
                status, body = await healthz(http, url)
                assert status == 503 and body["healthy"] is False and body["reachable"] == []
        finally:
            alive.close()
            identity.close()
            wg_server.transport.close()
            # A connection the servers accepted just before they closed has a handler task that
            # has not run yet; asyncio.run() would cancel it unstarted, and a cancelled handler
            # leaves its transport open (streams.py closes it only on an exception) until the
            # collector finds it during some later test: an unraisable ResourceWarning there.
            if pending := asyncio.all_tasks() - {asyncio.current_task()}:
                await asyncio.wait(pending, timeout=DEADLINE)
        # one sequence per report served, no gaps, no repeats
        assert sequences == list(range(sequences[0], sequences[0] + len(sequences))) and len(sequences) >= 2

    asyncio.run(main())


def test_a_pop_that_never_rose_is_unreachable_and_the_agent_unhealthy() -> None:
    async def main() -> None:
        config = AgentConfig(name="probe1", key_file="-", listen="127.0.0.1", port=0,
                             pops=(PopTarget("pop1", (Target("127.0.0.1", free_port()),)),), interval=0.05, timeout=0.2)
        agent = Agent(config, KEY)
        async with agent.serving(), aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{agent.port}"
            report = await wait_report(http, url, lambda r: r["pops"]["pop1"]["checks"]["tcp"]["error"] == "refused",
                                       [])
            assert report["pops"]["pop1"]["reachable"] is False and report["anycast"] == {}
            assert (await healthz(http, url))[0] == 503

    asyncio.run(main())


def write_config(tmp_path: Path, key_mode: int) -> Path:
    key = tmp_path / "agent.key"
    key.write_bytes(KEY)
    key.chmod(key_mode)
    probe = tmp_path / "probe.key"
    probe.write_text(wgkeys.encode_key(X25519PrivateKey.generate().private_bytes_raw()))
    probe.chmod(0o600)
    public = wgkeys.encode_key(X25519PrivateKey.generate().public_key().public_bytes_raw())
    path = tmp_path / "agent.yaml"
    path.write_text(f"name: probe1\nkey_file: {key}\nprobe_key_file: {probe}\n"
                    f"pops: [{{name: pop1, address: 192.0.2.1, tcp_port: 443, wireguard: {{public_key: '{public}'}}}}]\n")
    return path


def check(path: Path) -> tuple[int, str]:
    result = subprocess.run([sys.executable, "-m", "pop", "probe-agent", "--check", "-c", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    return result.returncode, result.stdout + result.stderr


def test_probe_agent_check_accepts_good_files(tmp_path: Path) -> None:
    assert check(write_config(tmp_path, 0o600)) == (0, "ok\n")


def test_probe_agent_check_refuses_a_readable_key_file(tmp_path: Path) -> None:
    code, output = check(write_config(tmp_path, 0o644))
    assert code == 2 and "key file mode 0644 lets group/others access it" in output


def test_probe_agent_check_names_config_problems(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("name: probe1\nkey_file: k\npops: [{name: pop1, address: nowhere, tcp_port: 443}]\n")
    assert check(path) == (2, "agent.yaml: pops[0].address: 'nowhere' is not an IP address\n")
