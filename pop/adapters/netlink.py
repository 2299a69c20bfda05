"""Minimal netlink codecs for the ECMP and IPVS adapters, and the socket they share.

- rtnetlink routes: dump one (table, protocol) slice, add/replace/delete one multipath route.
- IPVS generic netlink: resolve the family, dump services and their real servers, add /
  edit / delete a service or a real server.

Nothing else. Why not pyroute2 here: its generic message codec spends ~50 ms encoding and
~35 ms decoding one route with 1,000 next hops, and about as much per 1,000 IPVS real
servers (measured, see bench/dataplane.py), which alone misses the 50 ms budget for a
membership change. These wire formats (linux/rtnetlink.h, linux/ip_vs.h) are small and
stable, so they are packed with `struct` directly.

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
NETLINK_GENERIC = 16
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


class NetlinkError(OSError):
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
    # The hot loop of every dump (a 1,000-server IPVS dump is ~15,000 attributes): locals
    # and inline arithmetic instead of helper calls.
    view = data if isinstance(data, memoryview) else memoryview(data)
    unpack = _NLA.unpack_from
    attrs: list[tuple[int, memoryview]] = []
    append = attrs.append
    while offset + 4 <= end:
        length, kind = unpack(view, offset)
        if length < 4:
            break
        append((kind & 0x3FFF, view[offset + 4 : offset + length]))
        offset += (length + 3) & ~3
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


class NetlinkSocket:
    """One netlink socket in one namespace; requests are sent one at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._seq = itertools.count(1)
        self._lock = asyncio.Lock()

    @staticmethod
    def make_route() -> socket.socket:
        return NetlinkSocket.make(NETLINK_ROUTE)

    @staticmethod
    def make_generic() -> socket.socket:
        return NetlinkSocket.make(NETLINK_GENERIC)

    @staticmethod
    def make(protocol: int) -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
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

    async def exchange(self, msg_type: int, flags: int, payload: bytes) -> list[memoryview]:
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
                        raise NetlinkError(errno.EBADMSG, "truncated netlink message")
                    body = view[offset + _NLMSGHDR.size : offset + length]
                    offset += _align(length)
                    if mseq != seq:
                        continue  # a late answer to an abandoned request
                    if kind == NLMSG_DONE:
                        # A dump that failed midway (e.g. EMSGSIZE: one route larger than
                        # the kernel's 32 KiB dump buffer) ends with DONE carrying -errno.
                        code = -_I32.unpack_from(body, 0)[0] if len(body) >= 4 else 0
                        if code > 0:
                            raise NetlinkError(code, _extack(body, mflags, 4) or os.strerror(code))
                        return answers
                    if kind == NLMSG_ERROR:
                        code = -_I32.unpack_from(body, 0)[0]
                        if code == 0:
                            return answers
                        orig_len = _NLMSGHDR.unpack_from(body, 4)[0]
                        skip = 4 + (_NLMSGHDR.size if mflags & NLM_F_CAPPED else _align(orig_len))
                        raise NetlinkError(code, _extack(body, mflags, skip) or os.strerror(code))
                    answers.append(body)

    async def request(self, msg_type: int, flags: int, payload: bytes) -> None:
        await self.exchange(msg_type, flags | NLM_F_REQUEST | NLM_F_ACK, payload)

    async def dump(self, msg_type: int, payload: bytes) -> list[memoryview]:
        return await self.exchange(msg_type, NLM_F_REQUEST | NLM_F_DUMP, payload)


def _extack(body: memoryview, flags: int, offset: int) -> str:
    """The kernel's extended-ack message, in the TLVs after `offset` (struct nlmsgerr: int
    error and the original header, plus its payload unless capped; DONE: int error)."""
    if not flags & NLM_F_ACK_TLVS:
        return ""
    for kind, value in _iter_attrs(body, offset, len(body)):
        if kind == NLMSGERR_ATTR_MSG:
            return bytes(value).split(b"\0", 1)[0].decode(errors="replace")
    return ""


# ---------------------------------------------------------------------------------------
# IPVS over generic netlink (linux/ip_vs.h, linux/genetlink.h)

GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
NLA_F_NESTED = 0x8000

IPVS_GENL_VERSION = 1
IPVS_CMD_NEW_SERVICE = 1
IPVS_CMD_SET_SERVICE = 2
IPVS_CMD_DEL_SERVICE = 3
IPVS_CMD_GET_SERVICE = 4
IPVS_CMD_NEW_DEST = 5
IPVS_CMD_SET_DEST = 6
IPVS_CMD_DEL_DEST = 7
IPVS_CMD_GET_DEST = 8
IPVS_CMD_ATTR_SERVICE = 1
IPVS_CMD_ATTR_DEST = 2

SVC_AF, SVC_PROTOCOL, SVC_ADDR, SVC_PORT, SVC_FWMARK, SVC_SCHED_NAME, SVC_FLAGS, SVC_TIMEOUT, SVC_NETMASK = (
    range(1, 10)
)
DEST_ADDR, DEST_PORT, DEST_FWD_METHOD, DEST_WEIGHT, DEST_U_THRESH, DEST_L_THRESH = range(1, 7)
DEST_ACTIVE_CONNS, DEST_INACT_CONNS, DEST_PERSIST_CONNS, _DEST_STATS, DEST_ADDR_FAMILY = range(7, 12)

_GENL = struct.Struct("=BBH")
_U16 = struct.Struct("=H")
_BE16 = struct.Struct("!H")
_FLAGS = struct.Struct("=II")


@dataclass(frozen=True, slots=True)
class IpvsServiceKey:
    family: int
    protocol: int  # IPPROTO_*
    address: str
    port: int


@dataclass(frozen=True, slots=True)
class IpvsServiceRecord:
    key: IpvsServiceKey | None  # None for fwmark services
    scheduler: str
    flags: int


@dataclass(frozen=True, slots=True)
class IpvsDestRecord:
    address: str
    port: int
    forward: int  # IP_VS_CONN_F_FWD_MASK bits
    weight: int
    active: int
    inactive: int
    persistent: int


def genl(cmd: int, attrs: bytes, version: int = IPVS_GENL_VERSION) -> bytes:
    return _GENL.pack(cmd, version, 0) + attrs


def _nested(kind: int, payload: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, payload)


def _attrs_of(body: memoryview) -> dict[int, memoryview]:
    return dict(_iter_attrs(body, 0, len(body)))


async def resolve_family(sock: NetlinkSocket, name: str) -> int:
    """The generic netlink family id of `name` (ENOENT: not registered, i.e. module missing)."""
    answers = await sock.exchange(
        GENL_ID_CTRL,
        NLM_F_REQUEST | NLM_F_ACK,
        genl(CTRL_CMD_GETFAMILY, _attr(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0"), 1),
    )
    for body in answers:
        attrs = dict(_iter_attrs(body, _GENL.size, len(body)))
        if CTRL_ATTR_FAMILY_ID in attrs:
            return int(_U16.unpack_from(attrs[CTRL_ATTR_FAMILY_ID], 0)[0])
    raise NetlinkError(errno.ENOENT, f"generic netlink family {name} not found")


def _packed(family: int, address: str) -> bytes:
    return socket.inet_pton(family, address)


def encode_service_key(key: IpvsServiceKey) -> bytes:
    return b"".join(
        (
            _attr(SVC_AF, _U16.pack(key.family)),
            _attr(SVC_PROTOCOL, _U16.pack(key.protocol)),
            _attr(SVC_ADDR, _packed(key.family, key.address)),
            _attr(SVC_PORT, _BE16.pack(key.port)),
        )
    )


def encode_service_key_attr(key: IpvsServiceKey) -> bytes:
    """IPVS_CMD_ATTR_SERVICE with only the key: for DEL_SERVICE and GET_DEST."""
    return _nested(IPVS_CMD_ATTR_SERVICE, encode_service_key(key))


def encode_service(key: IpvsServiceKey, scheduler: str, flags: int, mask: int) -> bytes:
    """IPVS_CMD_ATTR_SERVICE for NEW/SET_SERVICE (only the key for the others)."""
    # The kernel takes the netmask as a raw be32 and, for IPv6, wants a prefix length
    # 1..128 in it: the value 128 in host order, not a mask.
    netmask = b"\xff\xff\xff\xff" if key.family == socket.AF_INET else _U32.pack(128)
    full = b"".join(
        (
            encode_service_key(key),
            _attr(SVC_SCHED_NAME, scheduler.encode() + b"\0"),
            _attr(SVC_FLAGS, _FLAGS.pack(flags, mask)),
            _attr(SVC_TIMEOUT, _U32.pack(0)),
            _attr(SVC_NETMASK, netmask),
        )
    )
    return _nested(IPVS_CMD_ATTR_SERVICE, full)


def encode_dest(key: IpvsServiceKey, address: str, port: int, forward: int, weight: int) -> bytes:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    dest = b"".join(
        (
            _attr(DEST_ADDR_FAMILY, _U16.pack(family)),
            _attr(DEST_ADDR, _packed(family, address)),
            _attr(DEST_PORT, _BE16.pack(port)),
            _attr(DEST_FWD_METHOD, _U32.pack(forward)),
            _attr(DEST_WEIGHT, _U32.pack(weight)),
            _attr(DEST_U_THRESH, _U32.pack(0)),
            _attr(DEST_L_THRESH, _U32.pack(0)),
        )
    )
    return _nested(IPVS_CMD_ATTR_SERVICE, encode_service_key(key)) + _nested(IPVS_CMD_ATTR_DEST, dest)


def _u32(attrs: dict[int, memoryview], kind: int) -> int:
    value = attrs.get(kind)
    return int(_U32.unpack_from(value, 0)[0]) if value is not None and len(value) >= 4 else 0


def _address(family: int, raw: memoryview) -> str:
    # The kernel sends the whole union nf_inet_addr (16 bytes) for IPv4 too.
    return socket.inet_ntop(family, bytes(raw[: 4 if family == socket.AF_INET else 16]))


def decode_service(body: memoryview) -> IpvsServiceRecord:
    outer = dict(_iter_attrs(body, _GENL.size, len(body)))
    attrs = _attrs_of(outer[IPVS_CMD_ATTR_SERVICE])
    scheduler = bytes(attrs.get(SVC_SCHED_NAME, b"")).split(b"\0", 1)[0].decode()
    flags = int(_FLAGS.unpack_from(attrs[SVC_FLAGS], 0)[0]) if SVC_FLAGS in attrs else 0
    if SVC_ADDR not in attrs or SVC_PORT not in attrs:
        return IpvsServiceRecord(None, scheduler, flags)
    family = int(_U16.unpack_from(attrs[SVC_AF], 0)[0])
    key = IpvsServiceKey(
        family,
        int(_U16.unpack_from(attrs[SVC_PROTOCOL], 0)[0]),
        _address(family, attrs[SVC_ADDR]),
        int(_BE16.unpack_from(attrs[SVC_PORT], 0)[0]),
    )
    return IpvsServiceRecord(key, scheduler, flags)


def decode_dest(body: memoryview, service_family: int) -> IpvsDestRecord:
    outer = dict(_iter_attrs(body, _GENL.size, len(body)))
    attrs = _attrs_of(outer[IPVS_CMD_ATTR_DEST])
    family = (
        int(_U16.unpack_from(attrs[DEST_ADDR_FAMILY], 0)[0]) if DEST_ADDR_FAMILY in attrs else service_family
    )
    return IpvsDestRecord(
        _address(family, attrs[DEST_ADDR]),
        int(_BE16.unpack_from(attrs[DEST_PORT], 0)[0]),
        _u32(attrs, DEST_FWD_METHOD),
        _u32(attrs, DEST_WEIGHT),
        _u32(attrs, DEST_ACTIVE_CONNS),
        _u32(attrs, DEST_INACT_CONNS),
        _u32(attrs, DEST_PERSIST_CONNS),
    )
