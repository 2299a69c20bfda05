"""The engine drives a real IPVS end to end: runs *inside* the microVM (Debian's kernel),
started by tests/kernel/test_engine_ipvs.py. In the guest, a missing IPVS is a failure.

The `Engine` runs in-process on its own event loop, in a thread that joined the director
(PoP) namespace, with the real `KernelDataplane` (VIP on lo, IPVS NAT services udp/51820 and
tcp/1194), the real L4 checks (TCP connect to each server's service port) and a BGP
speaker that looks at the kernel itself whenever the engine announces or withdraws. Real
UDP and TCP flows from 64 client addresses go through the director's IPVS into three server
namespaces that answer with their name (the server of tests/kernel/inner/test_ipvs_inner.py):

    client (10.80.0.2, .10-.73) --- director (engine; VIP on lo, IPVS NAT) --- sN (10.81.N.2)

The tests share one setup and run in order, each building on the state the previous left:
all servers take flows; s0 dies and leaves IPVS; s2 is drained (weight 0, its flows stay,
new ones avoid it, it leaves once its connections are gone); s2 (undrained) and s0
(restarted) take new flows again; drained by the operator, the PoP withdraws and keeps serving
through the dwell, and s1, dying during it, leaves IPVS at once (issue 8, defect 13); all die
and the PoP withdraws before the data plane goes, `withdraw_dwell` later.

The BGP side is pop's real ExaBgpSpeaker on a socket to a fake ExaBGP that acknowledges every
command and keeps it (`FakeExaBgp`), so tests count the commands pop really sends.
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
from pop.adapters.bgp import ExaBgpSpeaker
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
ADDRESS = {f"s{i}": f"10.81.{i}.2" for i in range(4)}  # s3: for the reload scenario
WITHDRAW_DWELL = 3.0
# The dwell of the step where a server dies during it: long enough, in the emulated guest, to
# see the server leave (about 0.6 s) and to open new flows (a few seconds) before the teardown.
LONG_DWELL = 12.0
# IPVS's own UDP idle timeout in the director (default 300 s): a drained server's UDP flows
# must be able to end within the test. TCP needs nothing: a client RST puts its entry in
# CLOSE, which IPVS expires after 10 s.
IPVS_UDP_TIMEOUT = 15
# Emulated guest: everything is 20-40x slower than on the host.
SLOW = 60.0
_LINGER_RESET = struct.pack("ii", 1, 0)


def pop_config(servers: Sequence[str] = NAMES, vips: Sequence[str] = (VIP,),
               withdraw_dwell: float = WITHDRAW_DWELL) -> Config:
    """The director's configuration: ipvs mode, NAT, udp and tcp services on every VIP."""
    text = f"""
pop: {{name: vm1, asn: 65101, router_id: 192.0.2.1}}
neighbors: [{{address: 10.80.0.1, peer_as: 65000}}]
prefixes: [{", ".join(f"{vip}/32" for vip in vips)}]
servers: [{", ".join(f"{{name: {n}, address: {ADDRESS[n]}}}" for n in servers)}]
checks: {{l4: {{port: {TCP_PORT}, interval: 0.5, fast_interval: 0.25, timeout: 1.0, rise: 2, fall: 3,
              fall_definitive: 1}}}}
# announce only with all servers up; stay announced down to one of three (s0 dead, s2 drained)
pool: {{low_watermark: 0.3, high_watermark: 1.0, hold_down: 0.5}}
dataplane:
  mode: ipvs
  forward: nat
  services: [{{protocol: udp, port: {UDP_PORT}}}, {{protocol: tcp, port: {TCP_PORT}}}]
  withdraw_dwell: {withdraw_dwell}
  drain_timeout: 600  # the drain must end because the connections are gone, not by time
drain: {{steps: [withdraw]}}  # a PoP drain here is about the withdraw dwell, not the ladder
"""
    return load(text, "engine-ipvs.yaml")


# --- the BGP speaker on a fake ExaBGP, and the engine thread -----------------------------------


def dataplane_problem(seen: DesiredState, prefixes: Sequence[str], *, need_reals: bool) -> str:
    """What is missing in the kernel for these prefixes' VIPs to be served ("" when nothing)."""
    for prefix in prefixes:
        vip = prefix.split("/")[0]
        if prefix not in seen.vips:
            return f"no {prefix} on lo"
        services = {(s.protocol, s.port): s for s in seen.services if s.address == vip}
        for key in (("udp", UDP_PORT), ("tcp", TCP_PORT)):
            if key not in services:
                return f"no IPVS service {vip} {key}"
            if need_reals and not any(r.weight > 0 for r in services[key].reals):
                return f"IPVS service {vip} {key} has no real server taking new flows"
    return ""


class FakeExaBgp:
    """ExaBGP's end of the API channel: answers `done` to every command and keeps it, so a
    test counts the announce and withdraw commands pop really sent (no BGP session behind)."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            self.commands.append(line.decode().rstrip("\n"))
            writer.write(b"done\n")
            await writer.drain()

    def count(self, prefix: str, since: int = 0) -> int:
        """Commands about `prefix` (announce or withdraw) from the `since`-th on."""
        return sum(f" route {prefix} " in command for command in self.commands[since:])


class KernelWitnessSpeaker:
    """pop's real ExaBgpSpeaker, with a witness in front that reads the kernel (its own
    sockets) at every announce and withdraw: an announce onto a missing data plane, or a data
    plane gone before the withdraw, fails the engine (the exception propagates out of
    Engine.run)."""

    def __init__(self, kernel: KernelDataplane, bgp: ExaBgpSpeaker) -> None:
        self.kernel = kernel
        self.bgp = bgp
        self.log: list[tuple[float, tuple[str, ...]]] = []  # (time.monotonic(), prefixes)
        self.passes = 0  # set() calls: one per applier pass

    async def set(self, announcements: Sequence[Announcement], *, force: bool = False) -> None:
        self.passes += 1
        wanted = tuple(a.prefix for a in announcements)
        leaving = [a.prefix for a in self.bgp.announced() if a.prefix not in wanted]
        if announcements or leaving:
            seen = await self.kernel.read()
            problem = (dataplane_problem(seen, wanted, need_reals=True)
                       or dataplane_problem(seen, leaving, need_reals=False))
            action = "announce" if announcements else "withdraw"
            assert not problem, f"{action} while the kernel lacks the data plane: {problem}; kernel: {seen}"
            if self.bgp.announced() != tuple(announcements) or force:
                self.log.append((time.monotonic(), wanted))
        await self.bgp.set(announcements, force=force)

    def announced(self) -> tuple[Announcement, ...]:
        return self.bgp.announced()

    def withdrawn_at(self) -> float | None:
        """When the last withdraw was sent, while nothing is announced since (None otherwise)."""
        return self.log[-1][0] if self.log and not self.log[-1][1] else None


class EngineThread:
    """The engine on its own event loop, in a thread inside the director namespace (so its
    L4 probes leave from there), until `stop()`."""

    def __init__(self, config: Config, director: Netns, on_engine: Callable[[Engine], None] | None = None) -> None:
        self.config = config
        self.director = director
        self.on_engine = on_engine  # called with the engine before it runs (e.g. to attach a load signal)
        self.error: BaseException | None = None
        self.exabgp = FakeExaBgp()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._engine: Engine | None = None
        self._speaker: KernelWitnessSpeaker | None = None
        self._witness: KernelDataplane | None = None
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
        engine_end, exabgp_end = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=engine_end)
        exabgp_reader, exabgp_writer = await asyncio.open_connection(sock=exabgp_end)
        bgp = ExaBgpSpeaker(self.config, reader, writer)
        dataplane = KernelDataplane(self.config.dataplane, self.config.prefixes, netns=ns)
        witness = self._witness = KernelDataplane(self.config.dataplane, self.config.prefixes, netns=ns)
        self._speaker = KernelWitnessSpeaker(witness, bgp)
        self._engine = Engine(self.config, self._speaker, cascade.build(self.config), dataplane=dataplane,
                              dataplane_errors=(DataplaneError,))
        if self.on_engine is not None:
            self.on_engine(self._engine)
        self._ready.set()
        tasks = {asyncio.create_task(self._engine.run(), name="engine"),
                 asyncio.create_task(bgp.read_forever(), name="acks"),
                 asyncio.create_task(self.exabgp.serve(exabgp_reader, exabgp_writer), name="fake ExaBGP")}
        stop = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait({*tasks, stop}, return_when=asyncio.FIRST_COMPLETED)
            for task in done - {stop}:
                task.result()  # the engine's failure, or a RuntimeError: none may end by itself
                raise RuntimeError(f"{task.get_name()} ended")
        finally:
            for task in (*tasks, stop):
                task.cancel()
            await asyncio.gather(*tasks, stop, return_exceptions=True)
            for end in (writer, exabgp_writer):
                end.close()
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

    def reload(self, config: Config) -> None:
        """What SIGHUP does (pop.service): the engine takes the new configuration and checks."""
        def reload(engine: Engine) -> None:
            assert self._witness is not None
            engine.reload(config, cascade.build(config))
            self._witness.reconfigure(config.dataplane, config.prefixes, [s.address for s in config.servers])

        self.call(reload)

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


def open_flows(client: Netns, kind: int, port: int, vip: str = VIP) -> Flows:
    """One socket per client address, from `port`, to the service of `kind` on `vip`.

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
            sock.connect((vip, UDP_PORT if kind == socket.SOCK_DGRAM else TCP_PORT))
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


def new_flows(client: Netns, kind: int, port: int, vip: str = VIP) -> dict[str, str | None]:
    """Fresh flows from every client address: which server each one reached."""
    flows = open_flows(client, kind, port, vip)
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
    reached: dict[str, str | None] = field(default_factory=dict)  # kept flow -> the server it reached

    def ipvs(self, vip: str = VIP) -> dict[str, Reals]:
        """The director's IPVS as ipvsadm sees it (a witness independent of pop's adapter):
        "udp"/"tcp" -> the real servers of `vip`'s service."""
        table: dict[str, Reals] = {}
        current: Reals | None = None
        for line in ipvsadm(self.director).splitlines():
            fields = line.split()
            if fields[:1] in (["UDP"], ["TCP"]):
                current = table.setdefault(fields[0].lower(), {}) if fields[1].startswith(f"{vip}:") else None
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

    def wait_withdrawn(self) -> float:
        """When the engine withdrew (the speaker saw the kernel still serving then)."""
        at = self.wait_for("withdraw", self.engine.speaker.withdrawn_at, timeout=SLOW, pause=0.05)
        assert at is not None
        return at

    def wait_torn_down(self, dwell: float) -> float:
        """When the VIP's IPVS services were gone (polled every 50 ms)."""
        self.wait_for("the IPVS services torn down", lambda: not self.ipvs(), timeout=dwell + SLOW, pause=0.05)
        return time.monotonic()

    def start(self, name: str) -> None:
        """The server answers UDP and TCP (the L4-checked port) with its name."""
        self.processes[name] = self.servers[name].popen(sys.executable, "-c", SERVER, name, str(UDP_PORT),
                                                        str(TCP_PORT), log=self.logs / f"{name}.log")

    def kill(self, name: str) -> None:
        """The server dies: its L4-checked TCP listener and its UDP/TCP service with it."""
        self.servers[name].stop(self.processes.pop(name))

    def events(self, subject: str, new: str) -> list[Event]:
        return self.engine.call(lambda e: [ev for ev in e.events if ev.subject == subject and ev.new == new])


@contextlib.contextmanager
def running_lab(logs: Path, config: Config, names: Sequence[str] = NAMES,
                udp_timeout: int = IPVS_UDP_TIMEOUT, on_engine: Callable[[Engine], None] | None = None) -> Iterator[Lab]:
    """Client, director and one namespace per server of `names` (each server answering), and
    the engine on `config`; all of it removed on the way out, failure or not."""
    _require_ipvs()
    logging.getLogger("pop").setLevel(logging.INFO)  # engine events in the report of a failure
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
        director.run("ipvsadm", "--set", "0", "0", str(udp_timeout))  # 0: keep the TCP timeouts
        servers: dict[str, Netns] = {}
        for name in names:
            i = int(name[1:])
            ns = servers[name] = Netns(f"{prefix}{name}")
            made.append(ns)
            veth(director, f"sv{i}", f"10.81.{i}.1/24", ns, "eth0", f"{ADDRESS[name]}/24")
            ns.run("ip", "route", "add", "default", "via", f"10.81.{i}.1")
        engine = EngineThread(config, director, on_engine)
        lab = Lab(director, client, servers, {}, engine, time.monotonic(), logs)
        for name in names:
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


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(tmp_path_factory.mktemp("engine-ipvs"), pop_config()) as lab:
        yield lab


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


def test_a_server_that_dies_during_the_withdraw_dwell_leaves_ipvs_before_the_teardown(lab: Lab) -> None:
    # Issue 8, defect 13: the dwell is there so that traffic still in flight after the withdraw
    # reaches a live server; a server dying during it must leave IPVS at once (mh would keep
    # sending it new flows, refused), the others stay until the teardown.
    lab.engine.reload(pop_config(withdraw_dwell=LONG_DWELL))
    lab.engine.call(lambda e: e.drain())
    withdrawn = lab.wait_withdrawn()
    teardown = withdrawn + LONG_DWELL
    table = lab.ipvs()
    assert all(set(reals) == {ADDRESS[n] for n in NAMES} for reals in table.values()) and len(table) == 2, table

    lab.kill("s1")
    killed = time.monotonic()
    lab.wait_for("s1 out of both IPVS services while the others stay, within the dwell",
                 lambda: all(set(reals) == {ADDRESS["s0"], ADDRESS["s2"]} for reals in lab.ipvs().values())
                 and len(lab.ipvs()) == 2,
                 timeout=max(0.0, teardown - time.monotonic()), pause=0.05)
    left = time.monotonic()
    print(f"\nMEASURED server dies during the dwell -> leaves IPVS: {(left - killed) * 1000:.0f} ms, "
          f"{teardown - left:.1f}s before the teardown")
    for kind, port in ((socket.SOCK_DGRAM, 33000), (socket.SOCK_STREAM, 34000)):
        counts = spread(new_flows(lab.client, kind, port))
        assert None not in counts and counts["s1"] == 0, counts
        assert counts["s0"] >= 10 and counts["s2"] >= 10, counts
    assert time.monotonic() < teardown, f"the new flows took past the dwell ({LONG_DWELL}s): lengthen LONG_DWELL"
    assert len(lab.ipvs()) == 2, "the services went before the dwell ended"

    gone = lab.wait_torn_down(LONG_DWELL)
    assert gone - withdrawn >= LONG_DWELL, (withdrawn, gone)
    assert not lab.engine.speaker.announced()

    # back to three servers announced, on the short dwell, for the last step
    lab.engine.reload(pop_config())
    lab.start("s1")
    lab.engine.call(lambda e: e.undrain())
    lab.wait_for("re-announced with all three in both services at weight 1",
                 lambda: lab.engine.speaker.announced() and all(
                     {a: r[0] for a, r in reals.items()} == {ADDRESS[n]: 1 for n in NAMES}
                     for reals in lab.ipvs().values()))


def test_all_servers_dead_withdraw_first_then_the_dataplane_after_the_dwell(lab: Lab) -> None:
    for name in NAMES:
        lab.kill(name)
    withdrawn = lab.wait_withdrawn()
    # the speaker checked the kernel at the withdraw: VIP and services were still there
    gone = lab.wait_torn_down(WITHDRAW_DWELL)
    print(f"\nMEASURED withdraw -> IPVS services gone: {gone - withdrawn:.2f}s (withdraw_dwell {WITHDRAW_DWELL}s)")
    assert gone - withdrawn >= WITHDRAW_DWELL, (withdrawn, gone)
    lab.wait_for(f"{VIP} off lo", lambda: f"{VIP}/" not in lab.director.run(
        "ip", "-o", "addr", "show", "dev", "lo").stdout)
    assert not lab.engine.speaker.announced()
    assert lab.engine.call(lambda e: e.applier.status().dataplane_error) == ""
