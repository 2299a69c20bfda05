"""The packets of a SYN probe, built and read as bytes. Pure.

A SYN probe (pop.checks.syn) sends a bare TCP SYN from a raw IPv4 socket (the kernel adds
the IP header) and reads what comes back: a SYN-ACK (the port listens), an RST (nothing
listens: refused), or an ICMP destination unreachable that quotes our SYN. Every answer is
matched to its probe by a `Key`: the server's address and port, our source port, and the
acknowledgement number the server's answer carries (our sequence number + 1); an ICMP error
quotes the SYN's sequence number, from which the same key follows.

The classic BPF programs keep the raw sockets from copying every TCP segment and ICMP
message of the host to user space: only TCP to our own source ports, only ICMP
unreachables.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

SYN, RST, ACK = 0x02, 0x04, 0x10
ICMP_UNREACHABLE = 3
PROTO_TCP = 6

# MSS 1460: a SYN without options is legal, but real stacks always send one, and a middlebox
# that drops the unusual must not make a live server look dead
_OPTIONS = struct.pack("!BBH", 2, 4, 1460)
_HEADER = struct.Struct("!HHIIHHHH")
SYN_LENGTH = _HEADER.size + len(_OPTIONS)
_OFFSET_FLAGS = (SYN_LENGTH // 4) << 12 | SYN
_WINDOW = 64240


class Key(NamedTuple):
    """What ties an answer to its probe."""

    server: bytes  # the server's IPv4 address, 4 bytes
    port: int  # the server's port
    source_port: int  # ours
    ack: int  # our sequence number + 1 (mod 2**32)


class Answer(NamedTuple):
    key: Key
    kind: str  # "syn-ack", "rst" or "unreachable"
    code: int = 0  # the ICMP code of an unreachable


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of data."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def syn(source: bytes, server: bytes, source_port: int, port: int, sequence: int) -> bytes:
    """A TCP SYN with an MSS option, its checksum over the IPv4 pseudo-header (RFC 793 3.1)."""
    return syn_from(fixed_sum(source, server, port), source_port, port, sequence)


def fixed_sum(source: bytes, server: bytes, port: int) -> int:
    """The ones' complement sum of what every SYN to one server shares: the pseudo-header, the
    port, the flags, the window and the options (a probe adds its source port and sequence)."""
    fixed = (source + server + struct.pack("!BBH", 0, PROTO_TCP, SYN_LENGTH)
             + _HEADER.pack(0, port, 0, 0, _OFFSET_FLAGS, _WINDOW, 0, 0) + _OPTIONS)
    return ~checksum(fixed) & 0xFFFF


def syn_from(fixed: int, source_port: int, port: int, sequence: int) -> bytes:
    """The SYN of `syn()`, its checksum completed from `fixed_sum()` (RFC 1624's incremental
    update): a few additions instead of summing 36 bytes for every probe."""
    total = fixed + source_port + (sequence >> 16) + (sequence & 0xFFFF)
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return _HEADER.pack(source_port, port, sequence, 0, _OFFSET_FLAGS, _WINDOW, ~total & 0xFFFF, 0) + _OPTIONS


def read_tcp(packet: bytes) -> Answer | None:
    """An IPv4 packet as a raw TCP socket hands it over: a SYN-ACK or an RST, or None."""
    if len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] != PROTO_TCP:
        return None
    start = (packet[0] & 0x0F) * 4
    if len(packet) < start + 14:
        return None
    port, source_port, _seq, ack = struct.unpack_from("!HHII", packet, start)
    flags = packet[start + 13]
    if flags & RST:
        kind = "rst"
    elif flags & (SYN | ACK) == SYN | ACK:
        kind = "syn-ack"
    else:
        return None
    return Answer(Key(packet[12:16], port, source_port, ack), kind)


def read_icmp(packet: bytes) -> Answer | None:
    """An IPv4 packet as a raw ICMP socket hands it over: an unreachable quoting a TCP SYN, or None."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    start = (packet[0] & 0x0F) * 4
    if len(packet) < start + 8 + 20 or packet[start] != ICMP_UNREACHABLE:
        return None
    code = packet[start + 1]
    quoted = start + 8
    if packet[quoted] >> 4 != 4 or packet[quoted + 9] != PROTO_TCP:
        return None
    tcp = quoted + (packet[quoted] & 0x0F) * 4
    if len(packet) < tcp + 8:  # ICMP quotes at least the first 8 bytes of the datagram (RFC 792)
        return None
    source_port, port, sequence = struct.unpack_from("!HHI", packet, tcp)
    server = packet[quoted + 16:quoted + 20]
    return Answer(Key(server, port, source_port, (sequence + 1) & 0xFFFFFFFF), "unreachable", code)


# --- classic BPF (linux/filter.h), run on the packet from its IPv4 header --------------------

_LDX_MSH = 0xB1  # X = 4 * (P[k] & 0xf): the IPv4 header's length
_LDH_IND, _LDB_IND = 0x48, 0x50  # A = P[X + k]
_JGE, _JGT, _JEQ = 0x35, 0x25, 0x15
_RET = 0x06
SNAP = 256  # bytes of a packet worth copying: its headers and, for ICMP, the quoted ones


def _program(*instructions: tuple[int, int, int, int]) -> bytes:
    return b"".join(struct.pack("HBBI", *i) for i in instructions)


def tcp_filter(low: int, high: int) -> bytes:
    """Accept TCP segments to a destination port in [low, high] (the sock_filter array)."""
    return _program((_LDX_MSH, 0, 0, 0), (_LDH_IND, 0, 0, 2), (_JGE, 0, 2, low), (_JGT, 1, 0, high),
                    (_RET, 0, 0, SNAP), (_RET, 0, 0, 0))


def icmp_filter() -> bytes:
    """Accept ICMP destination unreachables (the sock_filter array)."""
    return _program((_LDX_MSH, 0, 0, 0), (_LDB_IND, 0, 0, 0), (_JEQ, 0, 1, ICMP_UNREACHABLE),
                    (_RET, 0, 0, SNAP), (_RET, 0, 0, 0))
