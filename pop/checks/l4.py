"""Tier 1: the fast L4 checks, a TCP connect or an ICMP echo to one server.

Both keep their own timeout (so they work alone, e.g. from a diagnostic command) and are
cancellable at every await. A refused connection (TCP RST) and an ICMP unreachable are
definitive failures: packet loss never produces them.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import ipaddress
import itertools
import os
import select
import socket
import struct
import time
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

from pop.checks.base import TIMEOUT, CheckResult
from pop.checks.tcpwire import checksum

T = TypeVar("T")

# errors the kernel reports when an ICMP unreachable (or a local no-route) answered the SYN
_UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN}
# SO_LINGER with a zero timeout: close() sends RST instead of FIN, so a probe that runs
# every 200 ms leaves no TIME_WAIT sockets behind on either side
_LINGER_RESET = struct.pack("ii", 1, 0)


class TcpCheck:
    """Connect to host:port; success when the three-way handshake completes.

    `begin(done)` is the probe without a coroutine: a non-blocking connect watched by the
    loop's connector (one epoll set and one timer for every TCP probe in flight), the form
    the schedule (pop.probes) uses so that 5,000 probes a second cost no task, timeout
    context, future, reader callback or timer each. `probe()` is the same probe awaited.
    """

    tier = 1

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        self._address = (host, port)

    @property
    def name(self) -> str:
        return "tcp"

    def begin(self, done: Callable[[CheckResult], None]) -> Callable[[], None]:
        """Start one probe; `done(result)` is called once, from the event loop, unless the
        returned function cancels the probe first."""
        return _Connect(self, done).cancel

    async def probe(self) -> CheckResult:
        return await probe_by_begin(self.begin)

    def refused(self) -> CheckResult:
        return CheckResult.failure("refused", definitive=True, detail=f"port {self.port} refused")


class Deadlines:
    """The timeouts of every probe in flight on one event loop: one heap, served by one timer
    (a call_later() per probe costs about as much as the probe itself at 5,000 a second).
    `expire` is called at the deadline; for a probe that is over by then it must do nothing."""

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, Callable[[], None]]] = []
        self.order = itertools.count()
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = float("inf")

    def add(self, deadline: float, expire: Callable[[], None]) -> None:
        heapq.heappush(self.heap, (deadline, next(self.order), expire))
        if deadline < self.timer_at:
            self._arm(deadline)

    def _arm(self, deadline: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = deadline
        loop = asyncio.get_running_loop()  # add() and _expire() run on the loop; no reference kept
        self.timer = loop.call_at(loop.time() + max(0.0, deadline - time.monotonic()), self._expire)

    def _expire(self) -> None:
        self.timer, self.timer_at = None, float("inf")
        now = time.monotonic()
        heap = self.heap
        while heap and heap[0][0] <= now:
            heapq.heappop(heap)[2]()
        if heap:
            self._arm(heap[0][0])


class _Connector:
    """Every TCP probe in flight on one event loop: an epoll set of their sockets, registered
    once with the loop, and their deadlines.

    asyncio's add_writer()/remove_writer() and call_later() per probe cost about as much as
    the connect itself; here a probe costs one epoll_ctl (one-shot: closing the socket takes
    it out of the set) and one heap entry.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.epoll = select.epoll()
        self.pending: dict[int, _Connect] = {}
        self.deadlines = Deadlines()
        loop.add_reader(self.epoll.fileno(), self._ready)

    def watch(self, probe: _Connect, fd: int, deadline: float) -> None:
        self.epoll.register(fd, select.EPOLLOUT | select.EPOLLONESHOT)
        self.pending[fd] = probe
        self.deadlines.add(deadline, probe.expire)

    def forget(self, probe: _Connect, fd: int) -> None:
        if self.pending.get(fd) is probe:
            del self.pending[fd]

    def _ready(self) -> None:
        for fd, _ in self.epoll.poll(0):
            probe = self.pending.pop(fd, None)
            if probe is not None:
                probe.connected()


class PerLoop(Generic[T]):
    """One T per event loop, made on first use there (the connector, the SYN prober)."""

    def __init__(self, make: Callable[[asyncio.AbstractEventLoop], T]) -> None:
        self._make = make
        self._all: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = weakref.WeakKeyDictionary()
        self._last: tuple[weakref.ref[asyncio.AbstractEventLoop], T] | None = None  # nearly always the one wanted

    def get(self) -> T:
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0]() is loop:
            return last[1]
        value = self._all.get(loop)
        if value is None:
            value = self._all[loop] = self._make(loop)
        self._last = (weakref.ref(loop), value)
        return value


_connectors = PerLoop(_Connector)


class _Connect:
    """One non-blocking connect in flight (see TcpCheck.begin)."""

    __slots__ = ("__weakref__", "_check", "_connector", "_done", "_fd", "_sock", "_started")

    def __init__(self, check: TcpCheck, done: Callable[[CheckResult], None]) -> None:
        self._check, self._done = check, done
        self._connector = connector = _connectors.get()
        self._fd = -1
        sock = self._sock = socket.socket(check.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self._started = time.monotonic()
        code = sock.connect_ex(check._address)
        if code == errno.EINPROGRESS:
            self._fd = sock.fileno()
            connector.watch(self, self._fd, self._started + check.timeout)
        else:
            # loopback answers at once; the result still arrives from the loop, never from begin()
            connector.loop.call_soon(self.finish, self._result(code))

    def connected(self) -> None:
        self.finish(self._result(self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)))

    def _result(self, code: int) -> CheckResult:
        if code == 0:
            return CheckResult.success(time.monotonic() - self._started)
        if code == errno.ECONNREFUSED:
            return self._check.refused()
        host, port = self._check._address
        return os_failure(OSError(code, f"{os.strerror(code)}: connect to {host}:{port}"))

    def finish(self, result: CheckResult) -> None:
        if self._close():
            self._done(result)

    def expire(self) -> None:
        self.finish(TIMEOUT)

    def cancel(self) -> None:
        self._close()

    def _close(self) -> bool:
        """Release the socket (which leaves the epoll set with it); False if that was done already."""
        if self._sock.fileno() < 0:
            return False
        if self._fd >= 0:
            self._connector.forget(self, self._fd)
        self._sock.close()
        return True


async def probe_by_begin(begin: Callable[[Callable[[CheckResult], None]], Callable[[], None]]) -> CheckResult:
    """One probe of a check that offers begin(done), awaited."""
    answer: asyncio.Future[CheckResult] = asyncio.get_running_loop().create_future()
    cancel = begin(answer.set_result)  # called once, and never after cancel()
    try:
        return await answer
    finally:
        cancel()


def os_failure(exc: OSError) -> CheckResult:
    if exc.errno in _UNREACHABLE:
        return CheckResult.failure("unreachable", definitive=True, detail=os.strerror(exc.errno or 0))
    return CheckResult.failure("error", detail=str(exc))


_ICMP_ECHO = {4: (8, 0), 6: (128, 129)}  # request type, reply type
_ICMP_UNREACH = {4: 3, 6: 1}
_ids = itertools.count(os.getpid() & 0xFFFF)


class IcmpCheck:
    """ICMP echo to the server's address over a raw socket (needs CAP_NET_RAW).

    The raw socket sees every ICMP packet on the host, so replies are matched on the source
    address, the identifier and the sequence number.
    """

    tier = 1

    def __init__(self, host: str, timeout: float) -> None:
        self.host = host
        self.timeout = timeout
        self.version = ipaddress.ip_address(host).version
        self._seq = itertools.count(1)

    @property
    def name(self) -> str:
        return "icmp"

    def _socket(self) -> socket.socket:
        if self.version == 6:
            return socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)

    async def probe(self) -> CheckResult:
        loop = asyncio.get_running_loop()
        try:
            sock = self._socket()
        except PermissionError:
            return CheckResult.failure("error", detail="ICMP needs CAP_NET_RAW (run as root)")
        sock.setblocking(False)
        ident = next(_ids) & 0xFFFF
        seq = next(self._seq) & 0xFFFF
        request_type, reply_type = _ICMP_ECHO[self.version]
        payload = struct.pack("!d", time.monotonic())
        header = struct.pack("!BBHHH", request_type, 0, 0, ident, seq)
        # the kernel computes the ICMPv6 checksum itself (it needs the pseudo-header)
        total = 0 if self.version == 6 else checksum(header + payload)
        packet = struct.pack("!BBHHH", request_type, 0, total, ident, seq) + payload
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                await loop.sock_sendto(sock, packet, (self.host, 0))
                while True:
                    data, source = await loop.sock_recvfrom(sock, 2048)
                    result = self._match(data, source[0], (ident, seq), reply_type, started)
                    if result is not None:
                        return result
        except TimeoutError:
            return TIMEOUT
        except OSError as exc:
            return os_failure(exc)
        finally:
            sock.close()

    def _match(self, data: bytes, source: str, ours: tuple[int, int], reply_type: int,
               started: float) -> CheckResult | None:
        if self.version == 4:
            data = data[(data[0] & 0x0F) * 4:]  # a raw IPv4 socket hands us the IP header too
        if len(data) < 8:
            return None
        kind, _code, _sum, got_ident, got_seq = struct.unpack("!BBHHH", data[:8])
        if kind == reply_type and source == self.host and (got_ident, got_seq) == ours:
            return CheckResult.success(time.monotonic() - started)
        if kind == _ICMP_UNREACH[self.version] and self._quotes_us(data[8:], ours):
            return CheckResult.failure("unreachable", definitive=True, detail=f"ICMP unreachable from {source}")
        return None

    def _quotes_us(self, quoted: bytes, ours: tuple[int, int]) -> bool:
        """An ICMP error carries the start of the packet that caused it: was it our echo?"""
        if self.version == 4:
            if not quoted:
                return False
            quoted = quoted[(quoted[0] & 0x0F) * 4:]
        else:
            quoted = quoted[40:]
        return len(quoted) >= 8 and struct.unpack("!HH", quoted[4:8]) == ours
