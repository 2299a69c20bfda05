"""Tier 2: a synthetic WireGuard handshake against one VPN server.

Contract: `WireGuardCheck(host, port, server_public_key, probe_private_key, *, psk, timeout)`
implements the Check protocol (name "wireguard", tier 2). Each `probe()` sends one
Noise_IKpsk2 handshake initiation from the probe key (a peer configured on every VPN
server) from a fresh connected UDP socket and validates the response completely
(pop.checks.noise). A valid response proves the daemon, its keys and its crypto path work;
WireGuard answers nothing else, so no other check can tell a live server from a dead one.

Results (`CheckResult.error`), as observed against wireguard-go and the kernel module:
- ok, latency = round trip of the handshake that succeeded;
- "timeout": no answer. Not definitive. WireGuard is silent to a wrong server public key
  (mac1 fails), to a probe key that is not a peer, to a replayed timestamp and to an
  initiation within 20 ms of the last one it consumed from the same peer;
- "icmp-unreachable": the kernel reported an ICMP error (nothing listens on the port:
  ECONNREFUSED on the connected socket; host or network unreachable). Definitive;
- "bad-response": an answer that fails validation (length/type, reserved bytes, mac1, a
  mac2 we gave no cookie for, a low-order ephemeral, an undecryptable cookie reply).
  Definitive;
- "psk-mismatch": an intact response (mac1 valid, addressed to us) whose empty payload does
  not decrypt: the server keyed it with another preshared key. Definitive;
- "cookie": the responder is under load and answered with a cookie reply twice (the retry
  carries mac2 as the protocol requires) or not at all to the retry. Not definitive. A
  retry that succeeds is a success whose detail mentions the cookie. The cookie is bound to
  the source port, so it is not kept across probes (each has its own socket);
- "socket-error": a local socket error (not the target's fault). Not definitive.

With `through` (an Echo: the probe's tunnel address and a target), a valid handshake is
followed by an ICMP echo through the tunnel (pop.checks.tunnel), sent DATA_SENDS times within
`data_timeout`, and the result is the tunnel's (`probe_exchange()` also returns both round
trips, for `pop wg-probe`):
- ok, latency = handshake round trip + data round trip;
- "no-data-reply": no reply to any echo, although the handshake just succeeded: "alive but
  useless" (forwarding, NAT, routing to the target, or the probe peer's allowed-ips).
  Definitive: loss would have to take every one of the data round trips right after a
  handshake round trip on the same path got through;
- "target-unreachable": ICMP unreachable or time exceeded from inside the tunnel. Definitive;
- "bad-data-reply": an authenticated reply that is not our echo's, or a data message for our
  session that fails authentication. Definitive.

Every wait ends with a read of the socket, also when it timed out: on a busy host this
process can be descheduled past a deadline while the answer sits in the socket, and an
answer that came in time is not silence (the round trip it reports then includes the stall).

`timeout` bounds the wait for each answer; a probe sends at most two initiations (the
second only after a cookie reply), each after its turn from the pacer, so the engine's own
deadline should allow 2 * timeout + 50 ms, plus data_timeout with `through` (the engine runs
one probe per server at a time; a second concurrent probe of the same key and server waits
for the first one's turn to end).

Two rules of the responder shape the state shared by all checks in this process (and one
cost: the Initiator of each probe key and server key, with its static-static DH, is computed
once per process, `initiator_for`): the
timestamp of a probe key must always increase (one Tai64nClock per probe key), and a
responder consumes at most one initiation per peer every 20 ms (one pacer per probe key and
responder address, one initiation in flight at a time, see MIN_GAP_AFTER_ANSWER). Both live
in module registries, so check objects rebuilt on a config reload keep them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from pop.checks.base import CheckResult
from pop.checks.noise import Handshake, Initiator, Outcome, Tai64nClock, Verdict
from pop.checks.tunnel import BadData, Echo, Reply, Session

# data messages sent within `data_timeout` after a valid handshake: each a fresh counter and
# echo sequence number, any answer counts, so loss must take all of them (see NO_DATA_REPLY)
DATA_SENDS = 3

# wireguard-go and the kernel drop an initiation that arrives within 20 ms (50 per second)
# of the last one they *consumed* from the same peer, and one whose timestamp is not newer
# than the last consumed. Both are judged when a handshake worker gets to the packet, and
# wireguard-go runs one worker per CPU: two initiations in flight at once can be consumed
# late, close together, or in the wrong order, however far apart they were sent. So one
# initiation per probe key and responder is in flight at a time, and the next is sent 21 ms
# after the answer (the responder consumed the previous one before it answered), or after
# the previous one's answer timeout plus MIN_INITIATION_INTERVAL when there was no answer.
MIN_INITIATION_INTERVAL = 0.025
MIN_GAP_AFTER_ANSWER = 0.021
# how often a probe waiting for another one's answer looks again (the answer lowers the wait)
_PACER_POLL = 0.005

_UNREACHABLE = {
    errno.ECONNREFUSED: "ICMP port unreachable: nothing listens on udp/{port} at {host}",
    errno.EHOSTUNREACH: "host unreachable (ICMP or failed neighbour resolution) for {host}",
    errno.ENETUNREACH: "network unreachable for {host}",
}

NO_DATA_REPLY = (
    "alive but useless: {handshake} ok, then no answer through the tunnel to {sends} echo requests "
    "to {target} within {wait:g} s (the server's forwarding, NAT, routing to the target or the "
    "allowed-ips of the probe peer)"
)

_SILENCE = (
    "no handshake response within {timeout:g} s: loss, a daemon that does not answer, a wrong "
    "server public key, or a probe key that is not a peer on the server (WireGuard is silent to all)"
)


class Pacer:
    """One initiation in flight per probe key and responder, spaced (see MIN_GAP_AFTER_ANSWER).

    `wait_turn(hold)` returns when a send may go and claims the responder until `answered()`
    or, without an answer, for `hold` seconds; the caller sends without awaiting anything in
    between. Shared by checks in any thread or event loop, hence a lock and not an asyncio
    primitive.
    """

    __slots__ = ("_lock", "_next")

    def __init__(self) -> None:
        self._next = 0.0
        self._lock = threading.Lock()

    def claim(self, hold: float) -> float:
        """0 and the responder claimed for `hold` seconds, or how long until the next look."""
        with self._lock:
            now = time.monotonic()
            if now >= self._next:
                self._next = now + hold
                return 0.0
            return self._next - now

    async def wait_turn(self, hold: float) -> None:
        # waiting for a point in time that the holder's answer may bring forward, not an event
        while (delay := self.claim(hold)) > 0:  # noqa: ASYNC110
            await asyncio.sleep(min(delay, _PACER_POLL))

    def answered(self) -> None:
        with self._lock:
            self._next = time.monotonic() + MIN_GAP_AFTER_ANSWER


_CLOCKS: dict[bytes, Tai64nClock] = {}
_PACERS: dict[tuple[bytes, str, int], Pacer] = {}
_INITIATORS: dict[tuple[bytes, bytes, bytes | None], Initiator] = {}


def clock_for(probe_public_key: bytes) -> Tai64nClock:
    return _CLOCKS.setdefault(probe_public_key, Tai64nClock())


def pacer_for(probe_public_key: bytes, host: str, port: int) -> Pacer:
    return _PACERS.setdefault((probe_public_key, host, port), Pacer())


def initiator_for(probe_private_key: bytes, server_public_key: bytes, psk: bytes | None) -> Initiator:
    """The Initiator of a probe key and a server key: its static-static DH and MAC keys never
    change, so a reload (or a second check of the same server) does not compute them again; a
    thousand servers cost two X25519 operations each otherwise."""
    key = (probe_private_key, server_public_key, psk)
    initiator = _INITIATORS.get(key)
    if initiator is None:
        initiator = _INITIATORS[key] = Initiator(probe_private_key, server_public_key, psk)
    return initiator


@dataclass(frozen=True, slots=True)
class Exchange:
    """One probe as a person reads it: the handshake, then the data round trip (if any)."""

    result: CheckResult
    handshake_rtt: float | None = None  # None: no valid handshake
    data_rtt: float | None = None  # None: no tunnel exchange, or no answer to it
    data_sent: int = 0


class WireGuardCheck:
    """A Noise_IKpsk2 handshake initiation from the probe key, validated end to end."""

    def __init__(
        self,
        host: str,
        port: int,
        server_public_key: bytes,
        probe_private_key: bytes,
        *,
        psk: bytes | None = None,
        timeout: float = 1.0,
        through: Echo | None = None,
        data_timeout: float = 0.3,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.through = through
        self.data_timeout = data_timeout
        self._initiator = initiator_for(probe_private_key, server_public_key, psk)
        self._clock = clock_for(self._initiator.public_key)
        self._pacer = pacer_for(self._initiator.public_key, host, port)
        self._numeric = _numeric_address(host, port)

    @property
    def name(self) -> str:
        return "wireguard"

    @property
    def tier(self) -> int:
        return 2

    def __repr__(self) -> str:
        through = f" through {self.through.target}" if self.through else ""
        return f"WireGuardCheck({self.host}:{self.port}{through})"

    async def probe(self) -> CheckResult:
        return (await self.probe_exchange()).result

    async def probe_exchange(self) -> Exchange:
        """The handshake and, with `through`, the data exchange after it."""
        try:
            family, address = self._numeric or await self._resolve()
        except OSError as exc:
            return Exchange(CheckResult.failure("socket-error", detail=f"cannot resolve {self.host}: {exc}"))
        sock = socket.socket(family, socket.SOCK_DGRAM)
        handshake_rtt: float | None = None
        try:
            sock.setblocking(False)
            # a connected socket receives only the server's datagrams and its ICMP errors
            sock.connect(address)
            result, handshake = await self._handshake(sock)
            if handshake is None or self.through is None:
                return Exchange(result, result.latency)
            handshake_rtt = result.latency
            try:
                return await self._through(sock, handshake, result)
            finally:
                self._pacer.answered()
        except OSError as exc:
            return Exchange(self._socket_failure(exc), handshake_rtt)
        finally:
            sock.close()

    async def _through(self, sock: socket.socket, handshake: Handshake, shook: CheckResult) -> Exchange:
        """Send an ICMP echo through the session the handshake established; judge the reply."""
        assert self.through is not None and shook.latency is not None
        handshake_rtt = shook.latency
        loop = asyncio.get_running_loop()
        session = Session.of(handshake)
        echo, ident = self.through, secrets.randbits(16)
        first = 1 + secrets.randbelow(0x8000)
        seqs = range(first, first + DATA_SENDS)
        sent_at: dict[int, float] = {}
        handshake_ms = f"handshake {handshake_rtt * 1000:.2f} ms"
        deadline = loop.time() + self.data_timeout
        foreign = 0

        def judge(sent: int) -> Exchange | None:
            """What the socket holds now: the verdict on the first answer for us, if any."""
            nonlocal foreign
            for data in _drain(sock):
                try:
                    plain = session.open(data)
                except BadData as exc:
                    return Exchange(_bad_data(str(exc), handshake_ms), handshake_rtt, None, sent)
                if plain is None:
                    foreign += 1
                    continue
                judged = echo.judge(plain, ident, range(seqs.start, seqs.start + sent))
                if judged.reply is Reply.OK:
                    rtt = time.perf_counter() - sent_at[judged.seq]
                    detail = f"{handshake_ms}, data {rtt * 1000:.2f} ms through {echo.target}"
                    if shook.detail:
                        detail += f"; {shook.detail}"
                    return Exchange(CheckResult.success(handshake_rtt + rtt, detail), handshake_rtt, rtt, sent)
                if judged.reply is Reply.UNREACHABLE:
                    result = CheckResult.failure(judged.reply.value, definitive=True,
                                                 detail=f"{handshake_ms}, then {judged.detail}")
                    return Exchange(result, handshake_rtt, None, sent)
                if judged.reply is Reply.BAD_REPLY:
                    return Exchange(_bad_data(judged.detail, handshake_ms), handshake_rtt, None, sent)
                foreign += 1  # a keepalive, or an ICMP error about another packet
            return None

        for n, seq in enumerate(seqs):
            sent_at[seq] = time.perf_counter()
            sock.send(session.seal(echo.request(ident, seq)))
            # the next send goes out at its share of the wait, unless an answer comes first
            next_send = deadline - self.data_timeout * (DATA_SENDS - 1 - n) / DATA_SENDS
            while True:
                if (left := next_send - loop.time()) > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(left):
                            await _readable(loop, sock.fileno())
                # read the socket also when the wait ran out: after a stall of this process
                # (a busy host) the answer can be there, in time, though the wake-up came late
                if (answer := judge(n + 1)) is not None:
                    return answer
                if loop.time() >= next_send:
                    break
        detail = NO_DATA_REPLY.format(handshake=handshake_ms, sends=DATA_SENDS, wait=self.data_timeout,
                                      target=echo.target)
        if foreign:
            detail += f"; ignored {foreign} datagram(s) for another session or packet"
        return Exchange(CheckResult.failure("no-data-reply", definitive=True, detail=detail), handshake_rtt, None,
                        DATA_SENDS)

    async def _handshake(self, sock: socket.socket) -> tuple[CheckResult, Handshake | None]:
        loop = asyncio.get_running_loop()
        cookie: bytes | None = None
        ignored = 0
        while True:
            # with `through` the claim covers the data exchange too: another handshake from
            # the same key meanwhile would give the responder a newer session, and once that
            # one is confirmed the reply to our echo would go out in it, to the other socket
            data_hold = self.data_timeout if self.through is not None else 0.0
            await self._pacer.wait_turn(self.timeout + MIN_INITIATION_INTERVAL + data_hold)
            message, handshake = self._initiator.initiation(secrets.randbits(32), self._clock.next(), cookie)
            start = time.perf_counter()
            sock.send(message)
            try:
                async with asyncio.timeout(self.timeout):
                    verdict, rtt, skipped = await _receive(loop, sock, handshake, start)
            except TimeoutError:
                # what came while this process did not run (a stall on a busy host) came in time
                late, rtt, skipped = _answered(sock, handshake, start)
                if late is None:
                    return self._silence(cookie, ignored + skipped), None
                verdict = late
            ignored += skipped
            if verdict.outcome is not Outcome.VALID or self.through is None:
                self._pacer.answered()  # else once the data exchange is over (probe_exchange)
            if verdict.outcome is Outcome.VALID:
                detail = "after a cookie reply (responder under load)" if cookie else ""
                return CheckResult.success(rtt, detail=detail), handshake
            if verdict.outcome is not Outcome.COOKIE:
                return CheckResult.failure(verdict.outcome.value, definitive=True, detail=verdict.detail), None
            if cookie is not None:
                detail = "responder under load: cookie reply again to the retry with mac2"
                return CheckResult.failure("cookie", detail=detail), None
            # Under load the responder wants mac2 keyed by this cookie before it spends a DH
            # on us; the cookie is bound to our source address and port, i.e. to this socket.
            cookie = verdict.cookie

    def _silence(self, cookie: bytes | None, ignored: int) -> CheckResult:
        if cookie is not None:
            detail = "responder under load: cookie reply, then no response to the retry with mac2"
            return CheckResult.failure("cookie", detail=detail)
        detail = _SILENCE.format(timeout=self.timeout)
        if ignored:
            detail += f"; ignored {ignored} datagram(s) addressed to another handshake"
        return CheckResult.failure("timeout", detail=detail)

    def _socket_failure(self, exc: OSError) -> CheckResult:
        template = _UNREACHABLE.get(exc.errno or 0)
        if template is not None:
            detail = template.format(host=self.host, port=self.port)
            return CheckResult.failure("icmp-unreachable", definitive=True, detail=detail)
        return CheckResult.failure("socket-error", detail=f"{self.host}:{self.port}: {exc}")

    async def _resolve(self) -> tuple[int, Any]:
        infos = await asyncio.get_running_loop().getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
        return infos[0][0], infos[0][4]


async def _receive(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, handshake: Handshake, start: float
) -> tuple[Verdict, float, int]:
    """The first datagram that belongs to this handshake, its verdict and round trip."""
    skipped = 0
    while True:
        # nothing is there right after the send: wait first, then drain what arrived
        await _readable(loop, sock.fileno())
        verdict, rtt, more = _answered(sock, handshake, start)
        skipped += more
        if verdict is not None:
            return verdict, rtt, skipped


def _answered(sock: socket.socket, handshake: Handshake, start: float) -> tuple[Verdict | None, float, int]:
    """Without waiting: the first datagram in the socket that belongs to this handshake (None
    if none is there), its round trip, and how many datagrams for other handshakes came first."""
    skipped = 0
    while True:
        try:
            data = sock.recv(2048)
        except BlockingIOError:
            return None, 0.0, skipped
        verdict = handshake.validate(data)
        if verdict.outcome is not Outcome.FOREIGN:
            return verdict, time.perf_counter() - start, skipped
        skipped += 1


async def _readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    # loop.sock_recv() does the same with more bookkeeping per call; this is the hot path
    ready = loop.create_future()
    loop.add_reader(fd, _wake, ready)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def _drain(sock: socket.socket) -> list[bytes]:
    datagrams = []
    while True:
        try:
            datagrams.append(sock.recv(2048))
        except BlockingIOError:
            return datagrams


def _bad_data(detail: str, handshake_ms: str) -> CheckResult:
    return CheckResult.failure(Reply.BAD_REPLY.value, definitive=True, detail=f"{handshake_ms}, then {detail}")


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def _numeric_address(host: str, port: int) -> tuple[int, Any] | None:
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        return None  # a name: resolved asynchronously on every probe
    return info[0][0], info[0][4]
