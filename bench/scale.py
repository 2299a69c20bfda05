"""One PoP's engine with N servers: what it costs and whether it keeps its times (issue 12).

    flock /tmp/pop-netns.lock .venv/bin/python bench/scale.py --json bench/results/scale.json \
        [--sizes 2,10,100,1000,5000] [--seconds 10] [--trials 10] [--l4-kind syn|tcp] [--profile FILE] [--steer]
        [--readers]

(~10 min, root: the default tier 1 is `checks.l4.kind: syn`, a raw socket; `--l4-kind tcp
--no-dataplane` runs without root, `--dataplane-into JSON` adds the ECMP step to a run)

For each N, side by side in one run:

- the servers: one process (`--servers`) holding, for each of N servers (and one spare for
  the reload), a real TCP listener on its own loopback address (127.20.x.y:18443, with
  TCP_DEFER_ACCEPT: the kernel completes the handshake the probe asks for, nobody needs to
  accept) and a WireGuard responder on the same address (udp/18820) with the server's own
  key: a real Noise_IKpsk2 responder after the whitepaper, built on pop.checks.noise's
  primitives, that answers every valid initiation (wireguard-go needs one process per key,
  and 1,000 of them do not fit on this machine). A dead server is both closed: the kernel
  answers its SYNs with RST and its UDP port with ICMP port unreachable.
- the engine: `pop.engine.Engine` in a process of its own (`--engine`), with the real checks
  from the configuration (pop.checks.cascade: the TCP check every 0.2 s, a SYN from one raw
  socket or a connect, the WireGuard handshake every 5 s), the /v1 status endpoint on the same
  event loop as `pop run` serves it, and a fake BGP speaker that holds what it is told.

On loopback the listeners' and responders' kernel side of every probe (the SYN handled, the
SYN-ACK sent, our kernel's RST) runs inside the engine's own system calls and is charged to it.
`--steer` runs everything in a namespace of its own with the engine pinned to CPU 0, the
servers to CPU 1 and lo's receive steered to CPU 1 (RPS): the engine then pays what it would
pay with its servers on other hosts.

Measured per N: the engine process's CPU (% of one core, utime + stime from /proc over
--seconds of steady state, the kernel's side of the probes' connects included) and RSS;
probe lateness (a probe's start minus the time it was due, every probe of the next --seconds:
recording every start costs the engine CPU, so it is not done in the CPU's window);
detection of one dead server (its listeners closed) until the engine logs it down, over
--trials servers; /v1/status latency under 50 clients asking back to back (bench/api.py's
load process; with `--readers` they read the readers' process of `status.readers_port`,
pop/readers.py, instead of the engine's own endpoint) and the probe lateness meanwhile; the
configuration's load time (YAML to checks); a reload in which one server changes address and
key (the SIGHUP path: read, build the checks, Engine.reload), and whether every other server kept its state; and the
data-plane apply when one server leaves (an ECMP route of N next hops in a namespace,
pop.adapters.routes, as bench/dataplane.py measures it; the kernel takes at most 4,095).

And the floor, in the same run, on the engine's CPU, against the same servers, once the
engine has stopped (`--floor`, floor_process): a bare Python SYN loop that sends the same
SYNs at the same rate from the same raw socket and matches every answer to its probe, with
nothing else (no asyncio, schedule, hysteresis or state), plus the handshakes' cryptography
alone at their rate (bench/wg_probe.py's crypto_floor). The engine's CPU over that floor is
what pop's own machinery costs; the floor itself is what any Python prober pays here.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import logging
import os
import queue
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from bench.api import Speaker
from bench.failover import percentile

TCP_PORT, WG_PORT = 18443, 18820
CLIENTS = 50
UP_WITHIN = 120.0  # seconds for every server to rise after the engine starts
GOALS = {"cpu_percent": 25.0, "rss_mb": 120.0, "lateness_p99_ms": 20.0, "status_p99_ms": 50.0, "reload_ms": 100.0}


def address(i: int) -> str:
    return f"127.20.{i // 250}.{i % 250 + 1}"


def config_text(n: int, keys: list[bytes], probe_key_file: Path, changed: bool = False, kind: str = "syn", *,
                realtime: int = 0) -> str:
    """N servers; `changed`: server s0 replaced by the spare (another address and key)."""
    rows = []
    for i in range(n):
        j = n if (changed and i == 0) else i
        public = base64.b64encode(_public(keys[j])).decode()
        rows.append(f"  - {{name: s{i}, address: {address(j)}, port: {TCP_PORT}, "
                    f"wireguard: {{public_key: '{public}', port: {WG_PORT}}}}}")
    return f"""
pop: {{name: scale, asn: 65101, router_id: 192.0.2.1}}
neighbors: [{{address: 10.255.0.1, peer_as: 65000}}]
prefixes: [198.51.100.1/32]
checks:
  l4: {{kind: {kind}}}
  wireguard: {{enabled: true, probe_key_file: {probe_key_file}, interval: 5.0}}
  realtime_priority: {realtime}
status: {{enabled: false}}
servers:
""" + "\n".join(rows) + "\n"


def _public(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


# --- the servers: TCP listeners and WireGuard responders -----------------------------------------


class Responder:
    """The responder side of WireGuard's handshake (whitepaper 5.4.2-5.4.3) for one server key.

    It answers every initiation whose mac1 and AEADs hold: no replay or rate rule, which a
    benchmark that wants every probe answered does not need.
    """

    def __init__(self, private: bytes) -> None:
        from pop.checks import noise

        self.noise = noise
        self.key = X25519PrivateKey.from_private_bytes(private)
        public = self.key.public_key().public_bytes_raw()
        self.mac1_key = noise.hash_(noise.LABEL_MAC1, public)
        self.chain0 = noise.hash_(noise.CONSTRUCTION)
        self.hash0 = noise.hash_(noise.hash_(self.chain0, noise.IDENTIFIER), public)
        self.peers: dict[bytes, tuple[X25519PublicKey, bytes, bytes]] = {}  # static DH and mac1 key, per peer

    def answer(self, msg: bytes) -> bytes | None:
        n = self.noise
        if len(msg) != 148 or msg[0] != 1 or msg[116:132] != n.mac(self.mac1_key, msg[:116]):
            return None
        zero = bytes(12)
        e_i = msg[8:40]
        e_key = X25519PublicKey.from_public_bytes(e_i)
        chain, h = n.kdf1(self.chain0, e_i), n.hash_(self.hash0, e_i)
        chain, key = n.kdf2(chain, self.key.exchange(e_key))
        peer = ChaCha20Poly1305(key).decrypt(zero, msg[40:88], h)
        h = n.hash_(h, msg[40:88])
        if peer not in self.peers:
            peer_key = X25519PublicKey.from_public_bytes(peer)
            self.peers[peer] = (peer_key, self.key.exchange(peer_key), n.hash_(n.LABEL_MAC1, peer))
        peer_key, static, mac1_key = self.peers[peer]
        chain, key = n.kdf2(chain, static)
        ChaCha20Poly1305(key).decrypt(zero, msg[88:116], h)  # the timestamp: must open
        h = n.hash_(h, msg[88:116])
        ephemeral = X25519PrivateKey.generate()
        e_r = ephemeral.public_key().public_bytes_raw()
        chain, h = n.kdf1(chain, e_r), n.hash_(h, e_r)
        chain = n.kdf1(chain, ephemeral.exchange(e_key))
        chain = n.kdf1(chain, ephemeral.exchange(peer_key))
        chain, tau, key = n.kdf3(chain, bytes(32))
        empty = ChaCha20Poly1305(key).encrypt(zero, b"", n.hash_(h, tau))
        body = b"\x02\x00\x00\x00" + os.urandom(4) + msg[4:8] + e_r + empty
        return body + n.mac(mac1_key, body) + bytes(16)


def servers_process(keys_file: Path) -> int:
    """Serve every server until stdin closes; `kill I` / `revive I` close and reopen server I."""
    keys = [base64.b64decode(k) for k in json.loads(keys_file.read_text())]
    responders = [Responder(k) for k in keys]
    selector = selectors.DefaultSelector()
    open_sockets: dict[int, tuple[socket.socket, socket.socket]] = {}

    def up(i: int) -> None:
        tcp = socket.socket()
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 30)
        tcp.bind((address(i), TCP_PORT))
        tcp.listen(1024)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((address(i), WG_PORT))
        udp.setblocking(False)
        selector.register(udp, selectors.EVENT_READ, i)
        open_sockets[i] = (tcp, udp)

    def down(i: int) -> None:
        tcp, udp = open_sockets.pop(i)
        selector.unregister(udp)
        tcp.close()
        udp.close()

    for i in range(len(keys)):
        up(i)
    selector.register(sys.stdin, selectors.EVENT_READ, None)
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            if key.data is None:
                line = sys.stdin.readline()
                if not line:
                    return 0
                verb, index = line.split()
                (down if verb == "kill" else up)(int(index))
                print("ok", flush=True)
                continue
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            while True:
                try:
                    msg, source = sock.recvfrom(2048)
                except BlockingIOError:
                    break
                reply = responders[key.data].answer(msg)
                if reply is not None:
                    sock.sendto(reply, source)


# --- the engine ----------------------------------------------------------------------------------


class Starts:
    """When each TCP probe started, per server address: the gaps between two probes of one
    server, less the interval, are the schedule's jitter (measurable on any version of the
    engine); where the engine counts lateness itself (pop.stretch) every sample is kept too.

    Recording costs the engine ~5 µs a probe (a wrapper around every start and every
    lateness sample): on an engine with a schedule of slots it is attached only once the CPU
    window is over (`attach`); an older engine has it from its start (`install`)."""

    def __init__(self) -> None:
        self.starts: dict[str, list[float]] = {}
        self.lateness: list[float] = []

    def attach(self, engine: Any) -> bool:
        """Record from now on: every slot's start wrapped where the schedule keeps it, and the
        lateness book's samples; False for an engine without such slots (install() it)."""
        slots = getattr(engine.probes, "_slots", None)
        if slots is None:
            return False
        for server_slots in slots.values():
            for slot in server_slots:
                if slot.begin is not None and hasattr(slot.check, "host"):
                    slot.begin = self._wrap(self.starts.setdefault(slot.check.host, []), slot.begin)
        self._hook_lateness(engine)
        return True

    @staticmethod
    def _wrap(times: list[float], begin: Any) -> Any:
        def recorded(done: Any) -> Any:
            times.append(time.monotonic())
            return begin(done)

        return recorded

    def install(self, engine: Any) -> None:
        from pop.checks.l4 import TcpCheck

        kinds: list[Any] = [TcpCheck]
        try:
            from pop.checks.syn import SynCheck
            kinds.append(SynCheck)
        except ImportError:  # an engine from before SYN probing
            pass
        for kind in kinds:
            self._record(kind)
        self._hook_lateness(engine)

    def _hook_lateness(self, engine: Any) -> None:
        book = getattr(engine.probes, "lateness", None)
        if book is not None:
            original_observe = book.observe

            def observe(seconds: float) -> None:
                original_observe(seconds)
                self.lateness.append(seconds)

            book.observe = observe

    def _record(self, kind: Any) -> None:
        starts = self.starts
        method = "begin" if hasattr(kind, "begin") else "probe"
        original = getattr(kind, method)

        def recorded(check: Any, *args: Any) -> Any:
            starts.setdefault(check.host, []).append(time.monotonic())
            return original(check, *args)

        setattr(kind, method, recorded)

    def take(self, interval: float) -> dict[str, Any]:
        jitter = [b - a - interval for times in self.starts.values() for a, b in itertools.pairwise(times)]
        lateness, self.lateness = self.lateness, []
        pauses, self.gc_pauses = self.gc_pauses, []
        for times in self.starts.values():  # in place: the wrappers of attach() hold these lists
            times.clear()
        return {"jitter": _quantiles(jitter), "lateness": _quantiles(lateness) if lateness else None,
                "gc": {"collections": len(pauses), "seconds": sum(pauses), "max_ms": max(pauses, default=0.0) * 1000}}

    def watch_gc(self) -> None:
        """The garbage collector's pauses: a full collection of a big heap stops the loop."""
        import gc

        self.gc_pauses: list[float] = []
        began = [0.0]

        def callback(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                began[0] = time.perf_counter()
            else:
                self.gc_pauses.append(time.perf_counter() - began[0])

        gc.callbacks.append(callback)


class Events(logging.Handler):
    """The engine's server.up/down log events, with the monotonic time they happened, on stdout."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(("server.", "probes.")):
            _say({"event": message.split()[0], "words": message.split()[1:], "at": time.monotonic()})


def _say(value: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


async def engine_process(directory: Path) -> None:
    from bench.api import serve_status
    from pop.checks import cascade
    from pop.config import load
    from pop.engine import Engine

    logging.getLogger().addHandler(Events())
    logging.getLogger().setLevel(logging.INFO)
    import pop.checks.wireguard  # noqa: F401  # the imports are start-up, not the configuration's load
    started = time.perf_counter()
    config = load((directory / "pop.yaml").read_text(), "pop.yaml")
    checks = cascade.build(config)
    load_seconds = time.perf_counter() - started
    engine = Engine(config, Speaker(), checks)  # type: ignore[arg-type]  # the fake holds what it is told
    if getattr(config.checks, "realtime_priority", 0):  # as `pop run` does (pop.service._realtime)
        from pop import priority

        if refused := priority.apply(config.checks.realtime_priority):
            raise SystemExit(refused)
    starts = Starts()
    if not hasattr(engine.probes, "_slots"):  # an engine from before the schedule of slots
        starts.install(engine)
    starts.watch_gc()
    runner, port = await serve_status(engine)
    feed = feeding = None
    if (directory / "readers").exists():  # --readers: the clients read status.readers_port's process
        feed, port = await _readers(runner, engine)
        feeding = asyncio.create_task(feed.run())
        await _listening(port)
        if len(os.sched_getaffinity(0)) == 1 and feed.process is not None:  # --steer: the engine has a core
            os.sched_setaffinity(feed.process.pid, set(range(os.cpu_count() or 1)) - os.sched_getaffinity(0))
    running = asyncio.create_task(engine.run())
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    _say({"ready": port, "load_seconds": load_seconds, "pid": os.getpid()})
    try:
        while line := (await reader.readline()).decode().strip():
            if line == "healthy":
                _say({"healthy": engine.pool.healthy})
            elif line == "record":  # the CPU window is over: record every probe's start from now on
                _say({"record": starts.attach(engine)})
            elif line == "lateness":
                _say({**starts.take(config.checks.l4.interval), "stretch": getattr(engine.probes, "stretch", 1.0)})
            elif line == "counts":  # probes answered so far, per tier
                counts: dict[str, int] = {}
                for tiers in engine.tiers.values():
                    for name, tier in tiers.items():
                        counts[name] = counts.get(name, 0) + tier.successes + tier.failures
                _say(counts)
            elif line == "reload":
                _say(_reload(engine, directory, cascade.build, load))
            elif line.startswith("profile "):  # profile start | profile FILE: the loop thread's calls
                _profile(line.split(maxsplit=1)[1])
                _say({"profile": line})
    finally:
        running.cancel()
        if feed is not None and feeding is not None:
            feeding.cancel()
            await feed.stop()
        await runner.cleanup()


async def _readers(runner: Any, engine: Any) -> tuple[Any, int]:
    """A readers' process (pop.readers) fed from the endpoint's shared status, as `pop run`
    starts it for status.readers_port: (its feed, its port)."""
    from pop.readers import Feed
    from pop.status import SHARED

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    shared = runner.app[SHARED]
    return Feed("127.0.0.1", port, shared.get, shared.age, engine.status_revision), port


async def _listening(port: int) -> None:
    for _ in range(100):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise RuntimeError(f"the readers' process never listened on {port}")


_profiler: list[Any] = []


def _profile(what: str) -> None:
    import cProfile

    if what == "start":
        _profiler[:] = [cProfile.Profile()]
        _profiler[0].enable()
    elif _profiler:
        _profiler[0].disable()
        _profiler.pop().dump_stats(what)


def _reload(engine: Any, directory: Path, build: Any, load: Any) -> dict[str, Any]:
    """The SIGHUP path with s0 replaced: its time, and whether every other server kept its state."""
    before = {name: dict(tiers) for name, tiers in engine.tiers.items() if name != "s0"}
    started, cpu = time.perf_counter(), time.thread_time()
    config = load((directory / "pop2.yaml").read_text(), "pop2.yaml")
    loaded = time.perf_counter()
    checks = build(config)
    built = time.perf_counter()
    engine.reload(config, checks)
    took, cpu = time.perf_counter() - started, time.thread_time() - cpu
    kept = sum(all(engine.tiers[name][t] is state for t, state in tiers.items()) for name, tiers in before.items())
    return {"reload_seconds": took, "reload_cpu_seconds": cpu, "load_seconds": loaded - started,
            "build_seconds": built - loaded, "engine_seconds": took - (built - started), "others": len(before),
            "others_kept": kept,
            "s0": engine.tiers["s0"]["tcp"].state.value}


def _quantiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"n": 0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    return {"n": len(samples), "p50_ms": percentile(samples, 0.5) * 1000,
            "p99_ms": percentile(samples, 0.99) * 1000, "max_ms": max(samples) * 1000}


# --- the floor ----------------------------------------------------------------------------------


def floor_process(directory: Path, seconds: float) -> int:
    """Child (`--floor`): the least a Python SYN prober does for the configuration's tier 1 at
    its rate, against the same servers: pop's packet codec and raw sockets (pop.checks.syn,
    pop.checks.tcpwire), one epoll loop without asyncio, one SYN per server every interval,
    every answer matched to its probe, silence expired at the timeout. No schedule, no
    hysteresis, no state, no event loop: what is left of the engine's CPU above it is pop's.
    Prints its CPU over `seconds` (after a second of warm-up) as one JSON line."""
    import collections
    import resource
    import select

    from pop.checks import syn, tcpwire
    from pop.config import load

    config = load((directory / "pop.yaml").read_text(), "pop.yaml")
    l4 = config.checks.l4
    ports = [s.port or l4.port for s in config.servers]
    targets = [(s.address, socket.inet_aton(s.address), port,
                tcpwire.fixed_sum(syn._source_for(s.address), socket.inet_aton(s.address), port))
               for s, port in zip(config.servers, ports, strict=True)]
    holders, base = syn._hold_ports()
    raw = syn._raw(socket.IPPROTO_TCP, tcpwire.tcp_filter(base, base + syn.PORTS - 1))
    poller = select.epoll()
    poller.register(raw.fileno(), select.EPOLLIN)
    pending: dict[Any, float] = {}
    deadlines: collections.deque[tuple[float, Any]] = collections.deque()
    rate, n = len(targets) / l4.interval, len(targets)
    sent = answered = expired = 0
    sequence = 0
    began = time.monotonic()
    warm, end = began + 1.0, began + 1.0 + seconds
    usage: Any = None
    counted = (0, 0, 0)
    while (now := time.monotonic()) < end:
        if usage is None and now >= warm:
            usage, counted = resource.getrusage(resource.RUSAGE_SELF), (sent, answered, expired)
        while sent < (now - began) * rate:
            host, packed, port, fixed = targets[sent % n]
            sequence = (sequence + 0x9E3779B1) & 0xFFFFFFFF
            source_port = base + sent % syn.PORTS
            raw.sendto(tcpwire.syn_from(fixed, source_port, port, sequence), (host, 0))
            key = tcpwire.Key(packed, port, source_port, (sequence + 1) & 0xFFFFFFFF)
            pending[key] = now
            deadlines.append((now + l4.timeout, key))
            sent += 1
        # sleep until the next SYN is due, but start those due within a millisecond together (as the engine does)
        poller.poll(max(0.001, began + (sent + 1) / rate - time.monotonic()))
        while True:
            try:
                packet = raw.recv(tcpwire.SNAP)
            except BlockingIOError:
                break
            answer = tcpwire.read_tcp(packet)
            if answer is not None and pending.pop(answer.key, None) is not None:
                answered += 1
        while deadlines and deadlines[0][0] <= now:
            if pending.pop(deadlines.popleft()[1], None) is not None:
                expired += 1
    after = resource.getrusage(resource.RUSAGE_SELF)
    took = time.monotonic() - warm
    user, system = after.ru_utime - usage.ru_utime, after.ru_stime - usage.ru_stime
    _say({"floor": {"cpu_percent": (user + system) / took * 100, "cpu_sys_percent": system / took * 100,
                    "probes_per_second": (sent - counted[0]) / took,
                    "answered_per_second": (answered - counted[1]) / took, "expired": expired - counted[2]}})
    for sock in (raw, *holders):
        sock.close()
    return 0


def wireguard_floor(config_text_: str) -> float:
    """% of one core for the configuration's handshakes a second, their cryptography alone
    (bench/wg_probe.py's crypto_floor, best of 5)."""
    from bench.wg_probe import crypto_floor
    from pop.config import load

    config = load(config_text_, "pop.yaml")
    per_second = len(config.servers) / config.checks.wireguard.interval
    return min(crypto_floor(200) for _ in range(5)) * per_second * 100


# --- the run -------------------------------------------------------------------------------------


class Child:
    """A child process spoken to in lines; JSON event lines are queued apart from the answers."""

    def __init__(self, *args: str, prefix: tuple[str, ...] = ()) -> None:
        self.process = subprocess.Popen([*prefix, sys.executable, __file__, *args], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, bufsize=1)
        self.answers: queue.Queue[str] = queue.Queue()
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith('{"event"'):
                self.events.put(json.loads(line))
            else:
                self.answers.put(line.strip())

    def ask(self, line: str, timeout: float = 60.0) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return self.answers.get(timeout=timeout)

    def wait_event(self, name: str, server: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while True:
            event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if event["event"] == name and f"server={server}" in event["words"]:
                return float(event["at"])

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def cpu_seconds(pid: int) -> float:
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def one_size(n: int, seconds: float, trials: int, kind: str = "syn", profile: Path | None = None, *,
             steer: bool = False, readers: bool = False, realtime: int = 0) -> dict[str, Any]:
    if not steer:
        return _one_size(n, seconds, trials, kind, profile, inside=(), readers=readers, realtime=realtime)
    # The engine on CPU 0, the servers on CPU 1, and every packet's receive (the listeners'
    # SYN-ACKs, our RSTs, the responders' datagrams) steered to CPU 1 by lo's RPS map: the
    # engine's CPU is then its own, as with servers on other hosts whose kernels answer.
    from lab.netns import Netns

    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("--steer needs two CPUs")
    with Netns(f"tscale-{os.getpid():x}") as ns:
        ns.run("sh", "-c", "echo 2 > /sys/class/net/lo/queues/rx-0/rps_cpus")
        result = _one_size(n, seconds, trials, kind, profile, inside=("ip", "netns", "exec", ns.name),
                           readers=readers, realtime=realtime)
        return {**result, "steer": True}


def _one_size(n: int, seconds: float, trials: int, kind: str, profile: Path | None, *,
              inside: tuple[str, ...], readers: bool = False, realtime: int = 0) -> dict[str, Any]:
    """One N; ``inside`` prefixes the children's commands (a namespace whose lo is steered)."""
    from pop import wgkeys

    engine_cpu = ("taskset", "-c", "0") if inside else ()
    servers_cpu = ("taskset", "-c", "1") if inside else ()
    with tempfile.TemporaryDirectory(prefix="pop-scale-") as tmp:
        directory = Path(tmp)
        keys = [X25519PrivateKey.generate().private_bytes_raw() for _ in range(n + 1)]
        (directory / "keys.json").write_text(json.dumps([base64.b64encode(k).decode() for k in keys]))
        probe_key = directory / "probe.key"
        probe_key.write_text(wgkeys.encode_key(X25519PrivateKey.generate().private_bytes_raw()) + "\n")
        probe_key.chmod(0o600)
        (directory / "pop.yaml").write_text(config_text(n, keys, probe_key, kind=kind, realtime=realtime))
        (directory / "pop2.yaml").write_text(config_text(n, keys, probe_key, changed=True, kind=kind,
                                                         realtime=realtime))
        if readers:
            (directory / "readers").touch()
        servers = Child("--servers", str(directory / "keys.json"), prefix=(*inside, *servers_cpu))
        engine: Child | None = None
        try:
            assert servers.answers.get(timeout=120) == "ready"
            engine = Child("--engine", str(directory), prefix=(*inside, *engine_cpu))
            started = time.monotonic()
            ready = json.loads(engine.answers.get(timeout=120))
            pid, port = ready["pid"], ready["ready"]
            deadline, up = time.monotonic() + UP_WITHIN, 0
            while (up := json.loads(engine.ask("healthy"))["healthy"]) < n and time.monotonic() < deadline:
                time.sleep(0.5)
            if up < n:  # the engine cannot bring them all up: that is the result for this N
                return {"servers": n, "load_seconds": ready["load_seconds"], "up_within": UP_WITHIN, "up": up,
                        "cpu_percent": (cpu_seconds(pid) / (time.monotonic() - started)) * 100, "rss_mb": rss_mb(pid)}
            up_seconds = time.monotonic() - started
            # The start is a stampede (every server INIT probes at the fast pace: 4x the steady
            # rate) that stretches the schedule; measure once it is back as configured.
            while json.loads(engine.ask("lateness"))["stretch"] > 1.0 and time.monotonic() < deadline + 60:
                time.sleep(1.0)
            steady_seconds = time.monotonic() - started
            time.sleep(2.0)
            engine.ask("lateness")
            (user0, sys0), wall0, counts0 = cpu_split(pid), time.monotonic(), json.loads(engine.ask("counts"))
            time.sleep(seconds)
            (user1, sys1), wall = cpu_split(pid), time.monotonic() - wall0
            counts1 = json.loads(engine.ask("counts"))
            rates = {tier: (counts1[tier] - counts0.get(tier, 0)) / wall for tier in counts1}
            cpu, cpu_sys = (user1 + sys1 - user0 - sys0) / wall, (sys1 - sys0) / wall
            rss = rss_mb(pid)
            engine.ask("record")  # then the lateness and jitter, in a window of their own
            engine.ask("lateness")
            time.sleep(seconds)
            idle = json.loads(engine.ask("lateness"))
            if profile is not None:  # after the CPU window: the profiler's own cost is not counted
                engine.ask("profile start")
                time.sleep(seconds)
                engine.ask(f"profile {profile}.{n}")
                engine.ask("profile start")  # and the window with the status load, below
            # with --steer the clients share the servers' CPU, as clients on other hosts would
            # leave the engine's core alone
            load = subprocess.run([*inside, *servers_cpu, sys.executable, str(Path(__file__).with_name("api.py")),
                                   "--client", str(port), "--clients", str(CLIENTS), "--seconds", str(seconds)],
                                  capture_output=True, text=True, check=False)
            if load.returncode != 0:
                raise RuntimeError(f"the /v1/status load process failed: {load.stderr.strip()[-2000:]}")
            latencies = json.loads(load.stdout)
            if profile is not None:
                engine.ask(f"profile {profile}.{n}.status")
            loaded = json.loads(engine.ask("lateness"))
            detection = []
            for trial in range(trials):
                victim = (trial * 7919) % n
                servers.ask(f"kill {victim}")
                killed = time.monotonic()
                detection.append(engine.wait_event("server.down", f"s{victim}", 30) - killed)
                servers.ask(f"revive {victim}")
                engine.wait_event("server.up", f"s{victim}", 30)
            time.sleep(1.0)
            reload = json.loads(engine.ask("reload"))
            result = {
                "servers": n, "readers": readers, "realtime": realtime, "load_seconds": ready["load_seconds"],
                "up": up,
                "up_seconds": up_seconds,
                "steady_seconds": steady_seconds,
                "cpu_percent": cpu * 100, "cpu_sys_percent": cpu_sys * 100, "probes_per_second": rates,
                "rss_mb": rss,
                "lateness_idle": idle["lateness"], "jitter_idle": idle["jitter"], "stretch_idle": idle["stretch"],
                "gc_idle": idle.get("gc"),
                "lateness_loaded": loaded["lateness"], "jitter_loaded": loaded["jitter"],
                "stretch_loaded": loaded["stretch"],
                "status": {**_quantiles(latencies["latencies"]), "requests_per_second": latencies["rate"],
                           "body_bytes": latencies["bytes"], "errors": latencies.get("errors", {})},
                "detection": {"n": len(detection), "p50_ms": percentile(detection, 0.5) * 1000,
                              "p95_ms": percentile(detection, 0.95) * 1000, "max_ms": max(detection) * 1000},
                "reload": reload,
            }
            engine.close()
            engine = None
            if kind == "syn":  # the floor of the same tier 1 in Python, on the same CPU, against the same servers
                floor = Child("--floor", str(directory), "--seconds", str(seconds), prefix=(*inside, *engine_cpu))
                try:
                    result["floor"] = json.loads(floor.answers.get(timeout=seconds + 60))["floor"]
                finally:
                    floor.close()
                result["floor"]["wireguard_cpu_percent"] = wireguard_floor((directory / "pop.yaml").read_text())
            return result
        finally:
            if engine is not None:
                engine.close()
            servers.close()


async def dataplane(sizes: list[int], repeat: int) -> dict[str, Any]:
    """One server leaving an ECMP route of N next hops: new desired set to kernel acknowledged."""
    from bench.dataplane import ecmp_route, ms, time_changes
    from lab.netns import Netns, veth
    from pop.adapters.routes import RouteTable

    tag = f"tscl{os.getpid() % 100000}"
    results: dict[str, Any] = {}
    with Netns(f"{tag}a") as pop, Netns(f"{tag}b") as peer:
        veth(pop, "bench0", "10.200.0.1/16", peer, "bench1", "10.200.0.2/16")
        async with RouteTable(netns=pop.name, hash_policy=1) as rt:
            for n in sizes:
                if n > 4095:
                    results[str(n)] = None  # RTA_MULTIPATH's 16-bit length: 4,095 IPv4 next hops at most
                    continue
                members = list(range(n))
                await rt.set([ecmp_route(members)])
                wall, _ = await time_changes(lambda m: [ecmp_route(m)], rt.set, members, repeat)
                results[str(n)] = ms(wall)
                await rt.set([])
    return results


def floor_ratio(result: dict[str, Any]) -> float:
    """The engine's CPU over the floor's (the bare SYN loop and the handshakes' cryptography)."""
    floor = result["floor"]
    return float(result["cpu_percent"]) / float(floor["cpu_percent"] + floor["wireguard_cpu_percent"])


def table(results: list[dict[str, Any]], apply: dict[str, Any]) -> str:
    def row(label: str, cell: Any) -> str:
        def safe(r: dict[str, Any]) -> str:
            try:
                return str(cell(r))
            except (KeyError, TypeError):  # this N never had every server up
                return "-"
        return f"| {label} | " + " | ".join(safe(r) for r in results) + " |"

    def f(value: float, digits: int = 1) -> str:
        return f"{value:,.{digits}f}"

    def quantiles(q: dict[str, float] | None) -> str:
        return "-" if q is None else f"{f(q['p50_ms'], 2)} / {f(q['p99_ms'])}"

    lines = ["| servers | " + " | ".join(f"{r['servers']:,}" for r in results) + " |",
             "|---|" + "---|" * len(results),
             row("every server up after the start, s", lambda r: f(r["up_seconds"]) if r["up"] == r["servers"]
                 else f"only {r['up']:,} within {r['up_within']:.0f}"),
             row("schedule as configured again after the start, s", lambda r: f(r["steady_seconds"])),
             row("engine CPU, % of one core", lambda r: f(r["cpu_percent"])),
             row("servers' kernel side on the other core (--steer)", lambda r: "yes" if r.get("steer") else "no"),
             row("  of which in the kernel", lambda r: f(r["cpu_sys_percent"]) if "cpu_sys_percent" in r else "-"),
             row("probes a second in that window, per tier", lambda r: " / ".join(
                 f"{tier} {rate:,.0f}" for tier, rate in r["probes_per_second"].items())
                 if "probes_per_second" in r else "-"),
             row("floor: a bare Python SYN loop at that rate (bench/scale.py floor_process), % of one core",
                 lambda r: f"{f(r['floor']['cpu_percent'])} (kernel {f(r['floor']['cpu_sys_percent'])}, "
                 f"{r['floor']['answered_per_second']:,.0f} answers/s)"),
             row("  + the handshakes' cryptography alone at their rate, % of one core",
                 lambda r: f(r["floor"]["wireguard_cpu_percent"])),
             row("engine / that floor", lambda r: f"{floor_ratio(r):.2f}x"),
             row("engine RSS, MB", lambda r: f(r["rss_mb"], 0)),
             row("probe lateness p50 / p99, ms", lambda r: quantiles(r["lateness_idle"])),
             row("TCP probe jitter p50 / p99, ms", lambda r: quantiles(r["jitter_idle"])),
             row("schedule stretch (1 = as configured)", lambda r: f(r["stretch_idle"], 2)),
             row("GC collections / longest pause ms, in that window", lambda r: f"{r['gc_idle']['collections']:,} / "
                 f"{f(r['gc_idle']['max_ms'])}"),
             row("one dead server detected, p50 / p95 ms", lambda r: f"{f(r['detection']['p50_ms'], 0)} / "
                 f"{f(r['detection']['p95_ms'], 0)}"),
             row("/v1/status read from the readers' process (--readers)",
                 lambda r: "yes" if r.get("readers") else "no"),
             row("engine's thread under SCHED_RR (--realtime, checks.realtime_priority)",
                 lambda r: str(r["realtime"]) if r.get("realtime") else "no"),
             row(f"/v1/status p50 / p99 ms ({CLIENTS} clients)", lambda r: f"{f(r['status']['p50_ms'])} / "
                 f"{f(r['status']['p99_ms'])}"),
             row("/v1/status requests/s", lambda r: f(r["status"]["requests_per_second"], 0)),
             row("probe lateness p50 / p99 under that load, ms", lambda r: quantiles(r["lateness_loaded"])),
             row("TCP probe jitter p50 / p99 under that load, ms", lambda r: quantiles(r["jitter_loaded"])),
             row("config load (YAML to checks), ms", lambda r: f(r["load_seconds"] * 1000)),
             row("reload, one server changed, ms", lambda r: f(r["reload"]["reload_seconds"] * 1000)),
             row("reload's CPU time (the rest of its time the machine ran others), ms",
                 lambda r: f(r["reload"]["reload_cpu_seconds"] * 1000)),
             row("of which YAML and validation / checks / engine, ms", lambda r: " / ".join(
                 f(r["reload"][k] * 1000) for k in ("load_seconds", "build_seconds", "engine_seconds"))),
             row("others kept their state", lambda r: f"{r['reload']['others_kept']}/{r['reload']['others']}"),
             row("data plane: one server leaves, ms (p50)",
                 lambda r: "-" if apply.get(str(r["servers"])) is None else f(apply[str(r["servers"])]["median"], 2))]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2,10,100,1000")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--no-dataplane", action="store_true", help="skip the ECMP step (it needs root)")
    parser.add_argument("--dataplane-into", type=Path, help="only the ECMP step, added to this JSON of a run")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--l4-kind", default="syn", choices=("syn", "tcp"),
                        help="how tier 1 probes: a SYN from one raw socket (needs root) or a connect")
    parser.add_argument("--steer", action="store_true",
                        help="in a namespace of its own: the engine on CPU 0, the servers on CPU 1 and lo's "
                             "receive steered to CPU 1 (RPS), so that the engine is not charged the servers' "
                             "kernel side of every probe (root)")
    parser.add_argument("--readers", action="store_true",
                        help="the 50 clients read /v1/status from a readers' process (status.readers_port, "
                             "pop.readers) instead of the engine's own endpoint")
    parser.add_argument("--realtime", type=int, default=0, metavar="PRIORITY",
                        help="checks.realtime_priority in the engine's configuration (pop.priority; 0: off)")
    parser.add_argument("--profile", type=Path, help="cProfile the engine's loop for --seconds to PROFILE.N, and "
                                                     "under the status load to PROFILE.N.status")
    parser.add_argument("--servers", type=Path, help=argparse.SUPPRESS)  # child: the servers
    parser.add_argument("--engine", type=Path, help=argparse.SUPPRESS)  # child: the engine
    parser.add_argument("--floor", type=Path, help=argparse.SUPPRESS)  # child: the bare SYN loop
    args = parser.parse_args()
    if args.servers:
        return servers_process(args.servers)
    if args.floor:
        return floor_process(args.floor, args.seconds)
    if args.engine:
        asyncio.run(engine_process(args.engine))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.dataplane_into:  # the step that needs the namespace lock, apart from the rest
        run = json.loads(args.dataplane_into.read_text())
        run["dataplane"] = asyncio.run(dataplane([r["servers"] for r in run["sizes"]], 20))
        args.dataplane_into.write_text(json.dumps(run, indent=1) + "\n")
        print(table(run["sizes"], run["dataplane"]))
        return 0
    results = []
    for n in sizes:
        results.append(one_size(n, args.seconds, args.trials, args.l4_kind, args.profile, steer=args.steer,
                                readers=args.readers, realtime=args.realtime))
        print(json.dumps(results[-1]), flush=True)
    apply = {} if args.no_dataplane else asyncio.run(dataplane(sizes, 20))
    print(table(results, apply))
    if args.json:
        args.json.write_text(json.dumps({"sizes": results, "dataplane": apply, "goals": GOALS, "l4_kind": args.l4_kind,
                                         "steer": args.steer, "readers": args.readers}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
