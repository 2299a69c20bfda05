"""Through the tunnel: WireGuard transport data messages carrying an ICMP echo, pure.

Contract: after a valid handshake (pop.checks.noise), `Session.of(handshake)` holds the
transport keys and both indices. `Session.seal(packet)` returns the next type-4 transport
data message (counter, ChaCha20-Poly1305 with the initiator's sending key, zero padding to
16 bytes) carrying `packet`; `Session.open(datagram)` returns the plaintext IP packet of a
data message addressed to this session, None for one addressed to another session or
replayed (to be ignored), or raises `BadData` for one that is addressed to us but fails
authentication.

`Echo(source, target)` is the inner packet: an ICMP echo request from the probe's tunnel
address to the target, laid out once with scapy (the template) and patched per send with
`struct` (identifier, sequence, checksum), because building it with scapy on every probe
would cost as much as the handshake's crypto. `Echo.judge(packet, ident, seqs)` classifies
what came back through the tunnel:

- OK: an echo reply from the target to our tunnel address with our identifier and one of
  our sequence numbers;
- UNREACHABLE: an ICMP destination unreachable or time exceeded quoting our request (the
  server, or a router beyond it, says the target cannot be reached);
- BAD_REPLY: anything else that came back for us (another protocol, an echo reply from
  the wrong address or with the wrong identifier, a truncated packet);
- FOREIGN: an ICMP error quoting some other packet (ignored, like a datagram for another
  handshake).

IPv4 only. Protocol reference: the WireGuard whitepaper, section 5.4.6 (transport data).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import Enum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from scapy.layers.inet import ICMP, IP

from pop.checks.noise import Handshake

TYPE_DATA = 4
DATA_HEADER = struct.Struct("<B3sIQ")  # type, reserved, receiver index, counter
TAG_LEN = 16
_RESERVED = b"\x00\x00\x00"
_NONCE_PREFIX = b"\x00\x00\x00\x00"
# a counter a responder's first messages can reach; anything beyond is not from this session
# (WireGuard rekeys long before 2^60 messages)
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1

ICMP_ECHO_REPLY, ICMP_UNREACHABLE, ICMP_ECHO_REQUEST, ICMP_TIME_EXCEEDED = 0, 3, 8, 11
_ECHO_HEADER = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence
PAYLOAD = b"pop tunnel probe"  # 16 bytes: the whole inner packet is 44 bytes, padded to 48

_UNREACHABLE_CODES = {
    0: "network unreachable", 1: "host unreachable", 2: "protocol unreachable", 3: "port unreachable",
    4: "fragmentation needed", 9: "network administratively prohibited",
    10: "host administratively prohibited", 13: "communication administratively prohibited",
}


class BadData(Exception):
    """A data message addressed to this session that is not a valid one."""


class Session:
    """One transport session, initiator side: seal what we send, open what comes back."""

    __slots__ = ("_receive", "_seen", "_send", "counter", "local_index", "remote_index")

    def __init__(self, local_index: int, remote_index: int, sending_key: bytes, receiving_key: bytes) -> None:
        self.local_index = local_index
        self.remote_index = remote_index
        self._send = ChaCha20Poly1305(sending_key)
        self._receive = ChaCha20Poly1305(receiving_key)
        self.counter = 0
        self._seen: set[int] = set()

    @classmethod
    def of(cls, handshake: Handshake) -> Session:
        if handshake.responder_index is None:
            raise ValueError("the handshake has no valid response: no session")
        sending, receiving = handshake.transport_keys()
        return cls(handshake.sender_index, handshake.responder_index, sending, receiving)

    def seal(self, packet: bytes) -> bytes:
        counter = self.counter
        self.counter += 1
        padded = packet + bytes(-len(packet) % 16)
        sealed = self._send.encrypt(_NONCE_PREFIX + counter.to_bytes(8, "little"), padded, None)
        return DATA_HEADER.pack(TYPE_DATA, _RESERVED, self.remote_index, counter) + sealed

    def open(self, datagram: bytes) -> bytes | None:
        """The padded plaintext of a data message for us; None: not ours, or a replay."""
        if len(datagram) < DATA_HEADER.size + TAG_LEN or datagram[0] != TYPE_DATA:
            return None
        _, reserved, receiver, counter = DATA_HEADER.unpack_from(datagram)
        if receiver != self.local_index:
            return None
        if reserved != _RESERVED:
            raise BadData("data message: reserved bytes are not zero")
        if counter in self._seen or counter >= REJECT_AFTER_MESSAGES:
            return None  # a duplicate in the network is not the server's fault
        try:
            plain = self._receive.decrypt(_NONCE_PREFIX + counter.to_bytes(8, "little"),
                                          datagram[DATA_HEADER.size:], None)
        except InvalidTag:
            raise BadData(f"data message (counter {counter}) does not decrypt with the session's keys") from None
        self._seen.add(counter)
        return plain


class Reply(Enum):
    OK = "ok"
    UNREACHABLE = "target-unreachable"
    BAD_REPLY = "bad-data-reply"
    FOREIGN = "foreign"
    KEEPALIVE = "keepalive"  # an empty data message: the responder has nothing to say yet


@dataclass(frozen=True, slots=True)
class Judgement:
    reply: Reply
    detail: str = ""
    seq: int = -1  # the sequence number an OK reply answers


class Echo:
    """ICMP echo requests from the probe's tunnel address to a target, and the judge of replies."""

    __slots__ = ("_source", "_target", "_template", "source", "target")

    def __init__(self, source: str, target: str) -> None:
        src, dst = ipaddress.ip_address(source), ipaddress.ip_address(target)
        if src.version != 4 or dst.version != 4:
            raise ValueError("the tunnel probe speaks IPv4 only: tunnel address and target must be IPv4")
        self.source, self.target = str(src), str(dst)
        self._source, self._target = src.packed, dst.packed
        # scapy lays out the packet (and the IP header checksum) once; only the ICMP part varies
        self._template = bytes(IP(src=self.source, dst=self.target, id=0, flags="DF", ttl=64)
                               / ICMP(type=ICMP_ECHO_REQUEST, id=0, seq=0) / PAYLOAD)

    def request(self, ident: int, seq: int) -> bytes:
        icmp = _ECHO_HEADER.pack(ICMP_ECHO_REQUEST, 0, 0, ident, seq) + PAYLOAD
        checksum = internet_checksum(icmp)
        return self._template[:20] + icmp[:2] + checksum.to_bytes(2, "big") + icmp[4:]

    def judge(self, packet: bytes, ident: int, seqs: range) -> Judgement:
        if not packet:
            return Judgement(Reply.KEEPALIVE)
        if len(packet) < 20 or packet[0] >> 4 != 4:
            return Judgement(Reply.BAD_REPLY, f"not an IPv4 packet ({len(packet)} bytes, version {packet[0] >> 4})")
        ihl = (packet[0] & 0x0F) * 4
        total = int.from_bytes(packet[2:4], "big")
        if ihl < 20 or total < ihl + 8 or total > len(packet):
            return Judgement(Reply.BAD_REPLY, f"truncated IPv4 packet (header {ihl}, total {total}, "
                                              f"{len(packet)} bytes decrypted)")
        src, dst, proto = packet[12:16], packet[16:20], packet[9]
        icmp = packet[ihl:total]
        if proto == 1 and icmp[0] == ICMP_ECHO_REPLY and src == self._target and dst == self._source:
            # the expected answer first, without building any text
            _, _, _, their_ident, seq = _ECHO_HEADER.unpack_from(icmp)
            if their_ident != ident or seq not in seqs:
                return Judgement(Reply.BAD_REPLY, f"echo reply with id {their_ident} seq {seq}, "
                                                  f"not id {ident} seq {seqs.start}-{seqs.stop - 1}")
            if icmp[8:] != PAYLOAD:
                return Judgement(Reply.BAD_REPLY, "echo reply with another payload than the request's")
            return Judgement(Reply.OK, seq=seq)
        sender = str(ipaddress.IPv4Address(src))
        if dst != self._source:
            return Judgement(Reply.BAD_REPLY, f"a packet for {ipaddress.IPv4Address(dst)}, not for the probe's "
                                              f"tunnel address {self.source}")
        if proto != 1:
            return Judgement(Reply.BAD_REPLY, f"IP protocol {proto} from {sender}, not ICMP")
        kind, code = icmp[0], icmp[1]
        if kind == ICMP_ECHO_REPLY:
            return Judgement(Reply.BAD_REPLY, f"echo reply from {sender}, not from the target {self.target}")
        if kind in (ICMP_UNREACHABLE, ICMP_TIME_EXCEEDED):
            if not self._quotes_ours(icmp[8:], ident):
                return Judgement(Reply.FOREIGN)
            what = (_UNREACHABLE_CODES.get(code, f"unreachable code {code}") if kind == ICMP_UNREACHABLE
                    else "time exceeded")
            return Judgement(Reply.UNREACHABLE, f"{what} for {self.target}, from {sender} inside the tunnel")
        return Judgement(Reply.BAD_REPLY, f"ICMP type {kind} code {code} from {sender}")

    def _quotes_ours(self, quoted: bytes, ident: int) -> bool:
        """An ICMP error quotes the IP header and the first 8 bytes of what it is about."""
        if len(quoted) < 28:
            return False
        ihl = (quoted[0] & 0x0F) * 4
        inner = quoted[ihl:ihl + 8]
        return (quoted[12:16] == self._source and quoted[16:20] == self._target and quoted[9] == 1
                and len(inner) == 8 and inner[0] == ICMP_ECHO_REQUEST and int.from_bytes(inner[4:6], "big") == ident)


def internet_checksum(data: bytes) -> int:
    """RFC 1071: the ones' complement of the ones' complement sum of 16-bit words."""
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
