"""The engine drives a real IPVS end to end: runs *inside* the microVM (Debian's kernel),
started by tests/kernel/test_engine_ipvs.py. In the guest, a missing IPVS is a failure.

The `Engine` runs in-process on its own event loop, in a thread that joined the director
(PoP) namespace, with the real `KernelDataplane` (VIP on lo, IPVS NAT services udp/51820 and
tcp/1194), the real L4 checks (TCP connect to each server's service port) and a fake BGP
speaker that looks at the kernel itself whenever the engine announces or withdraws. Real
UDP and TCP flows from 64 client addresses go through the director's IPVS into three server
namespaces that answer with their name (the server of tests/kernel/inner/test_ipvs_inner.py):

    client (10.80.0.2, .10-.73) --- director (engine; VIP on lo, IPVS NAT) --- sN (10.81.N.2)

The tests share one setup and run in order, each building on the state the previous left:
all servers take flows; s0 dies and leaves IPVS; s2 is drained (weight 0, its flows stay,
new ones avoid it, it leaves once its connections are gone); s2 (undrained) and s0
(restarted) take new flows again; all die and the PoP withdraws before the data plane goes,
`withdraw_dwell` later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from lab.netns import Netns, cleanup_prefix, veth
from pop.adapters.dataplane import KernelDataplane
from pop.adapters.routes import DataplaneError
from pop.checks import cascade
from pop.config import Config, load
from pop.desired import Announcement, DesiredState
from pop.engine import Engine
from pop.snapshot import Event
from tests.kernel.inner.test_ipvs_inner import CLIENT_IPS, SERVER, TCP_PORT, UDP_PORT, _require_ipvs, ipvsadm

pytestmark = pytest.mark.kernel

T = TypeVar("T")
VIP = "203.0.113.30"
NAMES = ("s0", "s1", "s2")
ADDRESS = {name: f"10.81.{i}.2" for i, name in enumerate(NAMES)}
WITHDRAW_DWELL = 3.0
# IPVS's own UDP idle timeout in the director (default 300 s): a drained server's UDP flows
# must be able to end within the test. TCP needs nothing: a client RST puts its entry in
# CLOSE, which IPVS expires after 10 s.
IPVS_UDP_TIMEOUT = 15
# Emulated guest: everything is 20-40x slower than on the host.
SLOW = 60.0
_LINGER_RESET = struct.pack("ii", 1, 0)

CONFIG = f"""
pop: {{name: vm1, asn: 65101, router_id: 192.0.2.1}}
neighbors: [{{address: 10.80.0.1, peer_as: 65000}}]
prefixes: [{VIP}/32]
servers: [{", ".join(f"{{name: {n}, address: {a}}}" for n, a in ADDRESS.items())}]
checks: {{l4: {{port: {TCP_PORT}, interval: 0.5, fast_interval: 0.25, timeout: 1.0, rise: 2, fall: 3,
              fall_definitive: 1}}}}
# announce only with all three up; stay announced down to one of three (s0 dead, s2 drained)
pool: {{low_watermark: 0.3, high_watermark: 1.0, hold_down: 0.5}}
dataplane:
  mode: ipvs
  forward: nat
  services: [{{protocol: udp, port: {UDP_PORT}}}, {{protocol: tcp, port: {TCP_PORT}}}]
  withdraw_dwell: {WITHDRAW_DWELL}
  drain_timeout: 600  # the drain must end because the connections are gone, not by time
"""


# --- the fake BGP speaker and the engine thread ----------------------------------------------


def dataplane_problem(seen: DesiredState, *, need_reals: bool) -> str:
    """What is missing in the kernel for the VIP to be served ("" when nothing)."""
    if f"{VIP}/32" not in seen.vips:
        return f"no {VIP}/32 on lo"
    services = {(s.protocol, s.port): s for s in seen.services if s.address == VIP}
    for key in (("udp", UDP_PORT), ("tcp", TCP_PORT)):
        if key not in services:
            return f"no IPVS service {key}"
        if need_reals and not any(r.weight > 0 for r in services[key].reals):
            return f"IPVS service {key} has no real server taking new flows"
    return ""


class KernelWitnessSpeaker:
    """A fake BGP session that reads the kernel (its own sockets) at every announce and withdraw:
    an announce onto a missing data plane, or a data plane gone before the withdraw, fails the
    engine (the exception propagates out of Engine.run)."""

    def __init__(self, kernel: KernelDataplane) -> None:
        self.kernel = kernel
        self.log: list[tuple[float, tuple[str, ...]]] = []  # (time.monotonic(), prefixes)
        self._announced: tuple[Announcement, ...] = ()

    async def set(self, announcements: Sequence[Announcement], *, force: bool = False) -> None:
        if announcements or self._announced:
            seen = await self.kernel.read()
            problem = dataplane_problem(seen, need_reals=bool(announcements))
            action = "announce" if announcements else "withdraw"
            assert not problem, f"{action} while the kernel lacks the data plane: {problem}; kernel: {seen}"
            self.log.append((time.monotonic(), tuple(a.prefix for a in announcements)))
        self._announced = tuple(announcements)

    def announced(self) -> tuple[Announcement, ...]:
        return self._announced

    def withdrawn_at(self) -> float | None:
        return next((at for at, prefixes in reversed(self.log) if not prefixes), None)


class EngineThread:
    """The engine on its own event loop, in a thread inside the director namespace (so its
    L4 probes leave from there), until `stop()`."""

    def __init__(self, config: Config, director: Netns) -> None:
        self.config = config
        self.director = director
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._engine: Engine | None = None
        self._speaker: KernelWitnessSpeaker | None = None
        self._thread = threading.Thread(target=self._main, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(SLOW):
            raise AssertionError("the engine thread did not start")
        self.check()

    def _main(self) -> None:
        try:
            with self.director.enter():
                asyncio.run(self._run())
        except BaseException as exc:  # handed to the test thread by check()
            self.error = exc
        finally:
            self._ready.set()

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        ns = self.director.name
        dataplane = KernelDataplane(self.config.dataplane, self.config.prefixes, netns=ns)
        witness = KernelDataplane(self.config.dataplane, self.config.prefixes, netns=ns)
        self._speaker = KernelWitnessSpeaker(witness)
        self._engine = Engine(self.config, self._speaker, cascade.build(self.config), dataplane=dataplane,
                              dataplane_errors=(DataplaneError,))
        self._ready.set()
        run = asyncio.create_task(self._engine.run(), name="engine")
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({run, stop}, return_when=asyncio.FIRST_COMPLETED)
            if run.done():
                run.result()  # the engine's failure, or a RuntimeError: it must not end by itself
                raise RuntimeError("Engine.run() returned")
        finally:
            for task in (run, stop):
                task.cancel()
            await asyncio.gather(run, stop, return_exceptions=True)
            await dataplane.close()
            await witness.close()

    def check(self) -> None:
        """Raise if the engine has died (with its exception)."""
        if self.error is not None:
            raise AssertionError(f"the engine died: {self.error!r}") from self.error
        if not self._thread.is_alive():
            raise AssertionError("the engine thread ended")

    def call(self, fn: Callable[[Engine], T]) -> T:
        """Run `fn(engine)` on the engine's loop (its state belongs to that thread)."""
        self.check()
        assert self._loop is not None and self._engine is not None
        engine = self._engine

        async def on_loop() -> T:
            return fn(engine)

        return asyncio.run_coroutine_threadsafe(on_loop(), self._loop).result(SLOW)

    @property
    def speaker(self) -> KernelWitnessSpeaker:
        assert self._speaker is not None
        return self._speaker

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(SLOW)


# --- the client side: real sockets opened inside the client namespace -------------------------

Flows = dict[str, socket.socket]  # "client-ip:port" -> a connected socket


def open_flows(client: Netns, kind: int, port: int) -> Flows:
    """One socket per client address, from `port`, to the VIP's service of `kind`.

    TCP connects here (a refused or silent connect leaves the flow out: the caller counts
    answers, so a missing flow shows as a missing answer)."""
    flows: Flows = {}
    with client.enter():
        socks = [(ip, socket.socket(socket.AF_INET, kind)) for ip in CLIENT_IPS]
    for ip, sock in socks:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.settimeout(5)
        sock.bind((ip, port))
        try:
            sock.connect((VIP, UDP_PORT if kind == socket.SOCK_DGRAM else TCP_PORT))
        except OSError:
            sock.close()
            continue
        flows[f"{ip}:{port}"] = sock
    return flows


def ask(flows: Flows) -> dict[str, str | None]:
    """Send one ping on every flow; which server answered each (None: no answer)."""
    answers: dict[str, str | None] = dict.fromkeys(flows)
    waiting: dict[socket.socket, str] = {}
    for key, sock in flows.items():
        try:
            sock.send(b"ping")
            waiting[sock] = key
        except OSError:
            pass
    deadline = time.monotonic() + 5
    while waiting and time.monotonic() < deadline:
        ready, _, _ = select.select(list(waiting), [], [], 0.2)
        for sock in ready:
            key = waiting.pop(sock)
            try:
                answers[key] = sock.recv(64).decode() or None
            except OSError:  # ICMP port unreachable from a dead server, RST
                answers[key] = None
    return answers


def new_flows(client: Netns, kind: int, port: int) -> dict[str, str | None]:
    """Fresh flows from every client address: which server each one reached."""
    flows = open_flows(client, kind, port)
    try:
        answers = ask(flows)
    finally:
        close(flows)
    return {**dict.fromkeys(f"{ip}:{port}" for ip in CLIENT_IPS), **answers}


def close(flows: Flows) -> None:
    """Close with RST (TCP): IPVS expires the entry after its CLOSE timeout, not TIME_WAIT's 2 min."""
    for sock in flows.values():
        with contextlib.suppress(OSError):
            if sock.type == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.close()


# --- the lab ----------------------------------------------------------------------------------

Reals = dict[str, tuple[int, int, int]]  # real address -> (weight, active, inactive)


@dataclass
class Lab:
    director: Netns
    client: Netns
    servers: dict[str, Netns]
    processes: dict[str, subprocess.Popen[bytes]]
    engine: EngineThread
    started: float  # time.monotonic() when the engine started
    logs: Path
    kept: dict[str, Flows] = field(default_factory=dict)

    def ipvs(self) -> dict[str, Reals]:
        """The director's IPVS as ipvsadm sees it (a witness independent of pop's adapter):
        "udp"/"tcp" -> the VIP service's real servers."""
        table: dict[str, Reals] = {}
        current: Reals | None = None
        for line in ipvsadm(self.director).splitlines():
            fields = line.split()
            if fields[:1] in (["UDP"], ["TCP"]):
                current = table.setdefault(fields[0].lower(), {}) if fields[1].startswith(f"{VIP}:") else None
            elif fields[:1] == ["->"] and fields[1] != "RemoteAddress:Port" and current is not None:
                current[fields[1].rsplit(":", 1)[0]] = (int(fields[3]), int(fields[4]), int(fields[5]))
        return table

    def wait_for(self, what: str, probe: Callable[[], T], timeout: float = SLOW, pause: float = 0.1) -> T:
        """Poll `probe` until it returns something true; fail naming `what` and its last value."""
        deadline = time.monotonic() + timeout
        while True:
            self.engine.check()
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout:.0f}s; last: {value!r}")
            time.sleep(pause)

    def start(self, name: str) -> None:
        """The server answers UDP and TCP (the L4-checked port) with its name."""
        self.processes[name] = self.servers[name].popen(sys.executable, "-c", SERVER, name, str(UDP_PORT),
                                                        str(TCP_PORT), log=self.logs / f"{name}.log")

    def kill(self, name: str) -> None:
        """The server dies: its L4-checked TCP listener and its UDP/TCP service with it."""
        self.servers[name].stop(self.processes.pop(name))

    def events(self, subject: str, new: str) -> list[Event]:
        return self.engine.call(lambda e: [ev for ev in e.events if ev.subject == subject and ev.new == new])


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    _require_ipvs()
    logging.getLogger("pop").setLevel(logging.INFO)  # engine events in the report of a failure
    logs = tmp_path_factory.mktemp("engine-ipvs")
    prefix = f"tei{os.getpid() % 100000}"
    made: list[Netns] = []
    engine: EngineThread | None = None
    lab: Lab | None = None
    try:
        director, client = Netns(f"{prefix}d"), Netns(f"{prefix}c")
        made += [director, client]
        veth(client, "eth0", "10.80.0.2/24", director, "cl0", "10.80.0.1/24")
        client.run("ip", "-batch", "-", input="".join(f"addr add {ip}/24 dev eth0\n" for ip in CLIENT_IPS))
        client.run("ip", "route", "add", "default", "via", "10.80.0.1")
        director.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        director.run("ipvsadm", "--set", "0", "0", str(IPVS_UDP_TIMEOUT))  # 0: keep the TCP timeouts
        servers: dict[str, Netns] = {}
        for i, name in enumerate(NAMES):
            ns = servers[name] = Netns(f"{prefix}{name}")
            made.append(ns)
            veth(director, f"sv{i}", f"10.81.{i}.1/24", ns, "eth0", f"{ADDRESS[name]}/24")
            ns.run("ip", "route", "add", "default", "via", f"10.81.{i}.1")
        engine = EngineThread(load(CONFIG, "engine-ipvs.yaml"), director)
        lab = Lab(director, client, servers, {}, engine, time.monotonic(), logs)
        for name in NAMES:
            lab.start(name)
        engine.start()
        yield lab
    finally:
        if lab is not None:
            for flows in lab.kept.values():
                close(flows)
        if engine is not None:
            engine.stop()
        for ns in reversed(made):
            ns.close()
        cleanup_prefix(prefix)


def spread(answers: dict[str, str | None]) -> Counter[str | None]:
    return Counter(answers.values())


# --- the scenario, in order -------------------------------------------------------------------


def test_announced_after_the_dataplane_and_every_server_takes_new_flows(lab: Lab) -> None:
    lab.wait_for("announcement", lab.engine.speaker.announced, timeout=2 * SLOW)
    print(f"\nMEASURED engine start -> announced (3 servers risen, IPVS programmed): "
          f"{time.monotonic() - lab.started:.1f}s")
    table = lab.ipvs()
    weights = {proto: {address: w for address, (w, _, _) in reals.items()} for proto, reals in table.items()}
    assert weights == {proto: {ADDRESS[n]: 1 for n in NAMES} for proto in ("udp", "tcp")}, table
    scheduler = lab.director.run("ipvsadm", "-Ln").stdout
    assert f"UDP  {VIP}:{UDP_PORT} mh (mh-fallback)" in scheduler and "Masq" in scheduler, scheduler
    lo = lab.director.run("ip", "-d", "-o", "addr", "show", "dev", "lo").stdout
    assert f"{VIP}/32" in lo, lo

    for kind, port in ((socket.SOCK_DGRAM, 20000), (socket.SOCK_STREAM, 21000)):
        counts = spread(new_flows(lab.client, kind, port))
        assert None not in counts, counts
        # mh over 64 client addresses: about 21 each; 7 is more than 4 standard deviations below
        assert all(counts[n] >= 7 for n in NAMES), counts


def test_a_dead_server_leaves_ipvs_and_new_flows_avoid_it(lab: Lab) -> None:
    lab.kill("s0")
    killed = time.monotonic()
    lab.wait_for("s0 out of both IPVS services",
                 lambda: all(ADDRESS["s0"] not in reals for reals in lab.ipvs().values()), pause=0.05)
    print(f"\nMEASURED server dies -> leaves IPVS: {(time.monotonic() - killed) * 1000:.0f} ms")
    table = lab.ipvs()
    assert set(table["udp"]) == set(table["tcp"]) == {ADDRESS["s1"], ADDRESS["s2"]}, table
    assert lab.engine.speaker.announced(), "one dead server of three must not withdraw the PoP"

    for kind, port in ((socket.SOCK_DGRAM, 22000), (socket.SOCK_STREAM, 23000)):
        counts = spread(new_flows(lab.client, kind, port))
        assert None not in counts and counts["s0"] == 0, counts
        assert counts["s1"] >= 10 and counts["s2"] >= 10, counts


def test_a_drained_server_keeps_its_flows_and_leaves_when_they_end(lab: Lab) -> None:
    udp = open_flows(lab.client, socket.SOCK_DGRAM, 24000)
    tcp = open_flows(lab.client, socket.SOCK_STREAM, 25000)
    lab.kept |= {"udp": udp, "tcp": tcp}
    before = {"udp": ask(udp), "tcp": ask(tcp)}
    on_s2: dict[str, Flows] = {}
    for proto, flows in (("udp", udp), ("tcp", tcp)):
        on_s2[proto] = {k: s for k, s in flows.items() if before[proto][k] == "s2"}
        close({k: s for k, s in flows.items() if k not in on_s2[proto]})
        lab.kept[proto] = on_s2[proto]
        assert len(on_s2[proto]) >= 10, before[proto]

    lab.engine.call(lambda e: e.drain_server("s2"))
    drained_at = time.monotonic()
    lab.wait_for("s2 at weight 0 in both services",
                 lambda: all(reals.get(ADDRESS["s2"], (None,))[0] == 0 for reals in lab.ipvs().values()),
                 pause=0.05)
    print(f"\nMEASURED drain_server -> weight 0 in IPVS: {(time.monotonic() - drained_at) * 1000:.0f} ms")
    # existing flows stay on s2: the same UDP flows and the open TCP connections
    assert set(ask(on_s2["udp"]).values()) == {"s2"}
    assert set(ask(on_s2["tcp"]).values()) == {"s2"}
    # new flows avoid it
    for kind, port in ((socket.SOCK_DGRAM, 26000), (socket.SOCK_STREAM, 27000)):
        counts = spread(new_flows(lab.client, kind, port))
        assert counts == Counter({"s1": len(CLIENT_IPS)}), counts
    # while its connections are open, s2 stays (quiescent) and the engine's drain is not done
    table = lab.ipvs()
    s2 = {proto: reals.get(ADDRESS["s2"]) for proto, reals in table.items()}
    assert s2["tcp"] is not None and s2["udp"] is not None, f"s2 left IPVS while its flows are open: {table}"
    assert s2["tcp"][:2] == (0, len(on_s2["tcp"])), table  # weight 0, active connections = ours
    assert s2["udp"][0] == 0 and sum(s2["udp"][1:]) >= len(on_s2["udp"]), table
    assert not lab.events("s2", "drained"), "s2's drain finished with its connections still open"
    assert set(ask(on_s2["tcp"]).values()) == {"s2"}  # still served after all that

    for proto in ("udp", "tcp"):
        close(lab.kept.pop(proto))
    closed = time.monotonic()
    lab.wait_for("s2 out of IPVS once its connections are gone",
                 lambda: all(ADDRESS["s2"] not in reals for reals in lab.ipvs().values()),
                 timeout=IPVS_UDP_TIMEOUT + SLOW, pause=0.5)
    print(f"\nMEASURED drained server's flows closed -> leaves IPVS: {time.monotonic() - closed:.1f}s "
          f"(IPVS expires UDP after {IPVS_UDP_TIMEOUT}s idle, TCP CLOSE after 10s)")
    drained = lab.events("s2", "drained")
    assert [e.reason for e in drained] == ["connections gone"], drained
    assert drained[0].at >= closed, (drained[0].at, closed)
    assert lab.engine.speaker.announced()
    counts = spread(new_flows(lab.client, socket.SOCK_DGRAM, 28000))
    assert counts == Counter({"s1": len(CLIENT_IPS)}), counts


def test_an_undrained_and_a_recovered_server_take_new_flows_again(lab: Lab) -> None:
    lab.engine.call(lambda e: e.undrain_server("s2"))
    lab.start("s0")
    lab.wait_for("all three back in both services at weight 1",
                 lambda: all({a: r[0] for a, r in reals.items()} == {ADDRESS[n]: 1 for n in NAMES}
                             for reals in lab.ipvs().values()))
    for kind, port in ((socket.SOCK_DGRAM, 29000), (socket.SOCK_STREAM, 30000)):
        counts = spread(new_flows(lab.client, kind, port))
        assert None not in counts and all(counts[n] >= 7 for n in NAMES), counts
    assert lab.engine.speaker.announced()


def test_all_servers_dead_withdraw_first_then_the_dataplane_after_the_dwell(lab: Lab) -> None:
    for name in NAMES:
        lab.kill(name)
    withdrawn = lab.wait_for("withdraw", lab.engine.speaker.withdrawn_at, timeout=SLOW, pause=0.05)
    # the speaker checked the kernel at the withdraw: VIP and services were still there
    gone = lab.wait_for("the IPVS services torn down", lambda: not lab.ipvs() and time.monotonic(),
                        timeout=WITHDRAW_DWELL + SLOW, pause=0.05)
    print(f"\nMEASURED withdraw -> IPVS services gone: {gone - withdrawn:.2f}s (withdraw_dwell {WITHDRAW_DWELL}s)")
    assert gone - withdrawn >= WITHDRAW_DWELL, (withdrawn, gone)
    lab.wait_for(f"{VIP} off lo", lambda: f"{VIP}/" not in lab.director.run(
        "ip", "-o", "addr", "show", "dev", "lo").stdout)
    assert not lab.engine.speaker.announced()
    assert lab.engine.call(lambda e: e.applier.status().dataplane_error) == ""
