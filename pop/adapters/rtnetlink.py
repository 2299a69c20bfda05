"""A minimal rtnetlink route codec for the ECMP adapter: dump one (table, protocol) slice,
add/replace/delete one multipath route. Nothing else.

Why not pyroute2 here: its generic message codec spends ~50 ms encoding and ~35 ms
decoding one route with 1,000 next hops (measured, see bench/dataplane.py), which alone
misses the 50 ms budget for a membership change. The wire format of these three messages
is small and stable (linux/rtnetlink.h), so it is packed with `struct` directly.

The socket is a plain AF_NETLINK socket opened by a thread that joined the namespace; a
socket keeps the namespace it was created in.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import itertools
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_EXT_ACK = 11
NETLINK_GET_STRICT_CHK = 12

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x001
NLM_F_ACK = 0x004
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100  # in an ack
NLM_F_ACK_TLVS = 0x200  # in an ack
NLMSGERR_ATTR_MSG = 1

RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26
RTN_UNICAST = 1
RT_TABLE_COMPAT = 252
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RTA_MULTIPATH = 9
RTA_TABLE = 15
RTA_VIA = 18

_NLMSGHDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTNH = struct.Struct("=HBBi")
_NLA = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")
_RECV = 1 << 20
# The kernel accepts an RTA_MULTIPATH up to its 16-bit attribute length (4,095 IPv4 next
# hops), but dumps into buffers of at most 32 KiB and silently leaves out a route that does
# not fit (observed on 6.18: 2,020 IPv4 next hops read back, 2,033 vanish from the dump).
# A route we could not read back could not be reconciled, so the limit is the dump's,
# with a margin: 32,000 bytes = 2,000 IPv4 or 1,142 IPv6 next hops.
MAX_MULTIPATH_BYTES = 32000


class RtnlError(OSError):
    """The kernel's negative ack: errno plus its extended-ack message when it sent one."""


@dataclass(frozen=True, slots=True)
class RouteEntry:
    family: int
    prefix: str  # "addr/len"
    protocol: int
    table: int
    metric: int
    gateways: tuple[tuple[str, int], ...]  # (address, weight 1..256)


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, payload: bytes) -> bytes:
    return _NLA.pack(4 + len(payload), kind) + payload + b"\0" * (_align(len(payload)) - len(payload))


def _iter_attrs(data: bytes | memoryview, offset: int, end: int) -> list[tuple[int, memoryview]]:
    view = memoryview(data)
    attrs = []
    while offset + 4 <= end:
        length, kind = _NLA.unpack_from(view, offset)
        if length < 4:
            break
        attrs.append((kind & 0x3FFF, view[offset + 4 : offset + length]))
        offset += _align(length)
    return attrs


def _addr_text(family: int, raw: bytes | memoryview) -> str:
    return socket.inet_ntop(family, bytes(raw))


def _rtmsg(family: int, dst_len: int, table: int, protocol: int, kind: int = RTN_UNICAST) -> bytes:
    # Tables above 255 only fit RTA_TABLE; rtm_table then says RT_TABLE_COMPAT.
    return _RTMSG.pack(family, dst_len, 0, 0, table if table < 256 else RT_TABLE_COMPAT, protocol, 0, kind, 0)


def encode_route(
    family: int, prefix: str, table: int, protocol: int, gateways: Sequence[tuple[str, int]]
) -> bytes:
    """rtmsg + attributes of a unicast route; one gateway as RTA_GATEWAY, more as RTA_MULTIPATH."""
    net = ipaddress.ip_network(prefix)
    body = [_rtmsg(family, net.prefixlen, table, protocol), _attr(RTA_TABLE, _U32.pack(table))]
    body.append(_attr(RTA_DST, net.network_address.packed))
    if len(gateways) == 1:
        body.append(_attr(RTA_GATEWAY, socket.inet_pton(family, gateways[0][0])))
    elif gateways:
        hops = bytearray()
        for address, weight in gateways:
            gw = _attr(RTA_GATEWAY, socket.inet_pton(family, address))
            hops += _RTNH.pack(_RTNH.size + len(gw), 0, weight - 1, 0) + gw
        if len(hops) > MAX_MULTIPATH_BYTES:
            per_hop = len(hops) // len(gateways)
            raise ValueError(
                f"route {prefix}: {len(gateways)} next hops are more than the kernel can dump back "
                f"in one message (at most {MAX_MULTIPATH_BYTES // per_hop} for IPv{net.version})"
            )
        body.append(_attr(RTA_MULTIPATH, bytes(hops)))
    return b"".join(body)


def encode_dump_request(family: int, table: int, protocol: int) -> bytes:
    # With NETLINK_GET_STRICT_CHK the kernel filters the dump by table and protocol itself,
    # so a PoP that also carries a full BGP table does not ship it to us on every set().
    return _rtmsg(family, 0, table, protocol, 0) + _attr(RTA_TABLE, _U32.pack(table))


def decode_route(payload: memoryview) -> RouteEntry:
    family, dst_len, _src_len, _tos, table, protocol, _scope, _kind, _flags = _RTMSG.unpack_from(payload, 0)
    dst = "0.0.0.0" if family == socket.AF_INET else "::"
    metric = 0
    gateways: list[tuple[str, int]] = []
    for kind, value in _iter_attrs(payload, _RTMSG.size, len(payload)):
        if kind == RTA_DST:
            dst = _addr_text(family, value)
        elif kind == RTA_TABLE:
            table = _U32.unpack_from(value, 0)[0]
        elif kind == RTA_PRIORITY:
            metric = _U32.unpack_from(value, 0)[0]
        elif kind == RTA_GATEWAY:
            gateways.append((_addr_text(family, value), 1))
        elif kind == RTA_MULTIPATH:
            offset = 0
            while offset + _RTNH.size <= len(value):
                length, _nh_flags, hops, _ifindex = _RTNH.unpack_from(value, offset)
                if length < _RTNH.size:
                    break
                for nkind, nvalue in _iter_attrs(value, offset + _RTNH.size, offset + length):
                    if nkind == RTA_GATEWAY:
                        gateways.append((_addr_text(family, nvalue), hops + 1))
                    elif nkind == RTA_VIA:  # struct rtvia: u16 family + address
                        gateways.append((_addr_text(family, nvalue[2:]), hops + 1))
                offset += _align(length)
    return RouteEntry(family, f"{dst}/{dst_len}", protocol, table, metric, tuple(gateways))


class RtnlSocket:
    """One NETLINK_ROUTE socket in one namespace; requests are sent one at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._seq = itertools.count(1)
        self._lock = asyncio.Lock()

    @staticmethod
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECV)
            sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
            sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
            sock.bind((0, 0))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        self._sock.close()

    async def _exchange(self, msg_type: int, flags: int, payload: bytes) -> list[memoryview]:
        """Send one request; return the payloads of its answers until DONE or the ack."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            seq = next(self._seq)
            header = _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), msg_type, flags, seq, 0)
            await loop.sock_sendall(self._sock, header + payload)
            answers: list[memoryview] = []
            while True:
                data = await loop.sock_recv(self._sock, _RECV)
                view = memoryview(data)
                offset = 0
                while offset + _NLMSGHDR.size <= len(data):
                    length, kind, mflags, mseq, _pid = _NLMSGHDR.unpack_from(view, offset)
                    if length < _NLMSGHDR.size:
                        raise RtnlError(errno.EBADMSG, "truncated netlink message")
                    body = view[offset + _NLMSGHDR.size : offset + length]
                    offset += _align(length)
                    if mseq != seq:
                        continue  # a late answer to an abandoned request
                    if kind == NLMSG_DONE:
                        # A dump that failed midway (e.g. EMSGSIZE: one route larger than
                        # the kernel's 32 KiB dump buffer) ends with DONE carrying -errno.
                        code = -_I32.unpack_from(body, 0)[0] if len(body) >= 4 else 0
                        if code > 0:
                            raise RtnlError(code, _extack(body, mflags, 4) or os.strerror(code))
                        return answers
                    if kind == NLMSG_ERROR:
                        code = -_I32.unpack_from(body, 0)[0]
                        if code == 0:
                            return answers
                        orig_len = _NLMSGHDR.unpack_from(body, 4)[0]
                        skip = 4 + (_NLMSGHDR.size if mflags & NLM_F_CAPPED else _align(orig_len))
                        raise RtnlError(code, _extack(body, mflags, skip) or os.strerror(code))
                    answers.append(body)

    async def request(self, msg_type: int, flags: int, payload: bytes) -> None:
        await self._exchange(msg_type, flags | NLM_F_REQUEST | NLM_F_ACK, payload)

    async def dump(self, msg_type: int, payload: bytes) -> list[memoryview]:
        return await self._exchange(msg_type, NLM_F_REQUEST | NLM_F_DUMP, payload)


def _extack(body: memoryview, flags: int, offset: int) -> str:
    """The kernel's extended-ack message, in the TLVs after `offset` (struct nlmsgerr: int
    error and the original header, plus its payload unless capped; DONE: int error)."""
    if not flags & NLM_F_ACK_TLVS:
        return ""
    for kind, value in _iter_attrs(body, offset, len(body)):
        if kind == NLMSGERR_ATTR_MSG:
            return bytes(value).split(b"\0", 1)[0].decode(errors="replace")
    return ""
