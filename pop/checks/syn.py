"""Tier 1 by SYN: the TCP check without a connection, from one raw socket (`checks.l4.kind: syn`).

A connect costs a socket, a setsockopt, the handshake, an epoll registration and a close
per probe; at 1,000 servers every 0.2 s that is most of the engine (issue 12). A SYN probe
is one sendto(): a bare SYN (pop.checks.tcpwire) from a raw IPv4 socket shared by every
probe of the event loop, and the answers are read from the same socket:

- SYN-ACK: the port listens, the check passes. The kernel answers that SYN-ACK with an RST
  by itself, because no socket of ours is connected on the port: the server's half-open
  entry is gone at once and it never sees a connection.
- RST: nothing listens, a definitive failure ("refused"), as for a connect.
- ICMP destination unreachable quoting our SYN (a second raw socket): definitive
  ("unreachable").
- silence until the timeout: loss-tolerant ("timeout").

The source ports are a block of PORTS consecutive ports that the prober holds bound (never
listening, never connected) for as long as it lives: the kernel gives them to no other
socket, and the SYN-ACKs that arrive for them find no socket, so the kernel resets them as
said above. A classic BPF program lets only TCP to that block through to the raw socket.
Probes to one server take the ports in turn, so a server's half-open entry of a lost
answer never meets the next probe's SYN.

IPv4 only; a server with an IPv6 address keeps the connect check (pop.checks.cascade). The
raw sockets need CAP_NET_RAW. The SYN's checksum covers the source address, which is the
one the kernel's routing picks for the server, asked at the first probe and again after
every probe that timed out.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import itertools
import random
import socket
import struct
import time
import weakref
from collections.abc import Callable

from pop.checks import tcpwire
from pop.checks.base import TIMEOUT, CheckResult
from pop.checks.l4 import Deadlines, PerLoop, os_failure, probe_by_begin

PORTS = 16  # source ports per prober: a server sees the same one again only every PORTS probes
_SO_ATTACH_FILTER = 26  # linux/asm-generic/socket.h; the socket module does not name it
_ATTEMPTS = 50


def available() -> bool:
    """Whether this process may open the raw socket a SYN probe needs (CAP_NET_RAW)."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP).close()
    except PermissionError:
        return False
    return True


class SynCheck:
    """SYN to host:port; success on a SYN-ACK. Same contract as pop.checks.l4.TcpCheck."""

    tier = 1

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.packed = socket.inet_aton(host)  # IPv4 only: the loader and the cascade see to it
        self._fixed: int | None = None  # the checksum's share of what every SYN to the server has
        self._ports = itertools.cycle(range(PORTS))

    @property
    def name(self) -> str:
        return "tcp"  # the same tier as a connect: the method is not the evidence

    def begin(self, done: Callable[[CheckResult], None]) -> Callable[[], None]:
        """Send one SYN; `done(result)` is called once, from the event loop, unless the returned
        function cancels the probe first."""
        try:
            prober = _probers.get()
        except PermissionError:
            return _answer_soon(done, CheckResult.failure("error", detail="SYN probing needs CAP_NET_RAW"))
        except OSError as exc:
            return _answer_soon(done, os_failure(exc))
        if self._fixed is None:
            try:
                self._fixed = tcpwire.fixed_sum(_source_for(self.host), self.packed, self.port)
            except OSError as exc:
                return _answer_soon(done, os_failure(exc))
        return prober.send(self, self._fixed, next(self._ports), done)

    async def probe(self) -> CheckResult:
        return await probe_by_begin(self.begin)

    def refused(self) -> CheckResult:
        return CheckResult.failure("refused", definitive=True, detail=f"port {self.port} refused (RST)")

    def forget_source(self) -> None:
        """Ask the routing for the source address again at the next probe."""
        self._fixed = None


def _source_for(host: str) -> bytes:
    """The address the kernel would send from to host: a connected UDP socket sends nothing."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.connect((host, 9))
        return socket.inet_aton(udp.getsockname()[0])


def _answer_soon(done: Callable[[CheckResult], None], result: CheckResult) -> Callable[[], None]:
    handle = asyncio.get_running_loop().call_soon(done, result)
    return handle.cancel


class _Syn:
    """One SYN in flight."""

    __slots__ = ("check", "done", "key", "prober", "started")

    def __init__(self, prober: _Prober, check: SynCheck, key: tcpwire.Key,
                 done: Callable[[CheckResult], None], started: float) -> None:
        self.prober, self.check, self.key, self.done, self.started = prober, check, key, done, started

    def finish(self, result: CheckResult) -> None:
        if self._take():
            self.done(result)

    def expire(self) -> None:
        # every probe's deadline comes, answered or not (Deadlines): only a SYN still waiting
        # is silence, and a SYN whose checksum names a source address the host no longer sends
        # from is dropped in silence: ask the routing again for the next probe
        if self._take():
            self.check.forget_source()
            self.done(TIMEOUT)

    def cancel(self) -> None:
        self._take()

    def _take(self) -> bool:
        """Out of the probes in flight; False if it was out already (answered, expired, cancelled)."""
        if self.prober.pending.get(self.key) is self:
            del self.prober.pending[self.key]
            return True
        return False


class _Prober:
    """The raw sockets, the bound source ports and the probes in flight of one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.holders, self.base = _hold_ports()
        self.tcp = _raw(socket.IPPROTO_TCP, tcpwire.tcp_filter(self.base, self.base + PORTS - 1))
        self.icmp = _raw(socket.IPPROTO_ICMP, tcpwire.icmp_filter())
        self.pending: dict[tcpwire.Key, _Syn] = {}
        self.deadlines = Deadlines()
        self.sequence = random.getrandbits(32)
        loop.add_reader(self.tcp.fileno(), self._read, self.tcp, tcpwire.read_tcp)
        loop.add_reader(self.icmp.fileno(), self._read, self.icmp, tcpwire.read_icmp)
        # the prober keeps no reference to its loop: once the loop is gone, so are its sockets
        weakref.finalize(loop, _close, [self.tcp, self.icmp, *self.holders])

    def send(self, check: SynCheck, fixed: int, turn: int,
             done: Callable[[CheckResult], None]) -> Callable[[], None]:
        # an odd step through the sequence space: every probe of the prober has its own
        self.sequence = sequence = (self.sequence + 0x9E3779B1) & 0xFFFFFFFF
        source_port = self.base + turn
        key = tcpwire.Key(check.packed, check.port, source_port, (sequence + 1) & 0xFFFFFFFF)
        started = time.monotonic()
        probe = _Syn(self, check, key, done, started)
        try:
            self.tcp.sendto(tcpwire.syn_from(fixed, source_port, check.port, sequence), (check.host, 0))
        except OSError as exc:  # a local route saying unreachable, or a full send buffer
            return _answer_soon(done, os_failure(exc) if exc.errno != errno.EAGAIN else TIMEOUT)
        self.pending[key] = probe
        self.deadlines.add(started + check.timeout, probe.expire)
        return probe.cancel

    def _read(self, sock: socket.socket, read: Callable[[bytes], tcpwire.Answer | None]) -> None:
        pending = self.pending
        for _ in range(1024):  # then let the loop serve others; the socket stays readable
            try:
                packet = sock.recv(tcpwire.SNAP)
            except (BlockingIOError, InterruptedError):
                return
            answer = read(packet)
            if answer is None:
                continue
            probe = pending.get(answer.key)
            if probe is None:
                continue  # a late answer to a probe that timed out, or not ours
            if answer.kind == "syn-ack":
                probe.finish(CheckResult.success(time.monotonic() - probe.started))
            elif answer.kind == "rst":
                probe.finish(probe.check.refused())
            else:
                probe.finish(CheckResult.failure("unreachable", definitive=True,
                                                 detail=f"ICMP unreachable code {answer.code}"))


def _close(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def _raw(protocol: int, program: bytes) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW | socket.SOCK_NONBLOCK, protocol)
    try:
        buffer = ctypes.create_string_buffer(program)
        fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(buffer))
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
        while True:  # what arrived before the filter was attached
            try:
                sock.recv(tcpwire.SNAP)
            except BlockingIOError:
                break
    except BaseException:
        sock.close()
        raise
    return sock


def _hold_ports() -> tuple[list[socket.socket], int]:
    """Bind PORTS consecutive TCP ports (from where the kernel puts the first) and keep them."""
    for _ in range(_ATTEMPTS):
        first = socket.socket()
        first.bind(("0.0.0.0", 0))
        base = first.getsockname()[1]
        holders = [first]
        try:
            for port in range(base + 1, base + PORTS):
                holder = socket.socket()
                holders.append(holder)
                holder.bind(("0.0.0.0", port))
        except OSError:
            for holder in holders:
                holder.close()
            continue
        return holders, base
    raise OSError(errno.EADDRINUSE, f"no {PORTS} consecutive free TCP ports for SYN probes")


_probers = PerLoop(_Prober)
