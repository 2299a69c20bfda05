"""IPVS virtual services and their real servers, programmed over generic netlink (pyroute2).

Contract:

- An `IpvsTable` owns the virtual services whose address lies in one of its `owned`
  prefixes (the PoP's anycast/VIP ranges, from configuration); every other service in the
  kernel is left exactly as it is. IPVS has no owner mark, hence ownership by address.
- `await ipvs.set(services)` takes the whole desired set for the owned addresses, reads the
  kernel back and sends only the difference: new services with their real servers, a
  changed scheduler or flags edited in place (IPVS_CMD_SET_SERVICE keeps the connection
  table), real servers added / re-weighted / removed, services no longer desired deleted.
  New capacity is added before old is removed. Nothing is sent when the kernel matches,
  so a restarted engine adopts what it programmed before without a flap.
- Quiescent drain is weight 0 in the desired state: IPVS keeps forwarding existing
  connections but schedules no new ones to that real server. When to remove it is the
  engine's decision; `loads()` reports active/inactive connection counts per real server
  (UDP "connections" are counted as inactive).
- Scheduler flags (`mh-fallback`, `mh-port`, `sh-...`) are set per adapter until the
  desired state carries them per service; each applies to services of its scheduler only.
  The default is `mh-fallback`: mh builds its lookup table from each real server's last
  non-zero weight (ip_vs_mh.c, `last_weight`), so a server drained to weight 0 keeps its
  slots (nobody else's flows move) and is merely "unavailable"; without fallback, new flows
  that hash to it are dropped instead of going elsewhere (seen in the microVM test).
- Forwarding is per real server in the kernel: a service read back without real servers
  reports forward="dr". For dr/tunnel the real server's port is the service's port (0
  in the desired state means the same).
- Errors (no IPVS module, unknown scheduler, EPERM, ...) raise `DataplaneError`.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from socket import AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP
from typing import Any

from pyroute2.ipvs import AsyncIPVS
from pyroute2.netlink.exceptions import NetlinkError

from pop.adapters.routes import DataplaneError, kernel_error
from pop.desired import RealServer, VirtualService

log = logging.getLogger(__name__)

PROTOCOLS = {"udp": IPPROTO_UDP, "tcp": IPPROTO_TCP}
_PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}
# ip_vs.h: IP_VS_CONN_F_MASQ / _TUNNEL / _DROUTE
FORWARD = {"nat": 0, "tunnel": 2, "dr": 3}
_FORWARD_NAMES = {v: k for k, v in FORWARD.items()}
# ip_vs.h: IP_VS_SVC_F_SCHED1/2/3, named as ipvsadm names them for mh (and sh).
SCHED_FLAGS = {"mh-fallback": 0x0008, "mh-port": 0x0010, "sh-fallback": 0x0008, "sh-port": 0x0010}
# The bits this adapter manages. The kernel reports others too (IP_VS_SVC_F_HASHED on every
# service), and IP_VS_SVC_F_PERSISTENT / ONEPACKET are not ours to change.
SCHED_FLAG_MASK = 0x0038
_ENOENT = 2
_ESRCH = 3
_EEXIST = 17

ServiceKey = tuple[str, str, int]  # (protocol, address, port)


def sched_flags(names: Iterable[str], scheduler: str | None = None) -> int:
    """The flag bits of `names`; with `scheduler`, only the names meant for it ("mh-...")."""
    value = 0
    for name in names:
        if name not in SCHED_FLAGS:
            raise ValueError(f"scheduler flag {name!r}: not one of {sorted(SCHED_FLAGS)}")
        if scheduler is None or name.startswith(f"{scheduler}-"):
            value |= SCHED_FLAGS[name]
    return value


# ---------------------------------------------------------------------------------------
# Pure part.


def service_key(service: VirtualService) -> ServiceKey:
    return (service.protocol, str(ipaddress.ip_address(service.address)), service.port)


def normalize_service(service: VirtualService) -> VirtualService:
    """Canonical form, validated: reals sorted, dr/tunnel real ports equal the service's."""
    if service.protocol not in PROTOCOLS:
        raise ValueError(f"service {service.address}:{service.port}: protocol {service.protocol!r}")
    if service.forward not in FORWARD:
        raise ValueError(f"service {service.address}:{service.port}: forward {service.forward!r}")
    if not 0 < service.port < 65536:
        raise ValueError(f"service {service.address}: port {service.port}")
    address = ipaddress.ip_address(service.address)
    reals: dict[tuple[str, int], RealServer] = {}
    for real in service.reals:
        raddr = ipaddress.ip_address(real.address)
        port = real.port
        if service.forward != "nat":
            # The kernel forwards dr/tunnel packets unchanged, to the service's port.
            if port not in (0, service.port):
                raise ValueError(
                    f"service {address}:{service.port}: real {real.address}:{port}: "
                    f"{service.forward} cannot change the port"
                )
            port = service.port
        if not 0 < port < 65536:
            raise ValueError(f"service {address}:{service.port}: real {real.address} port {port}")
        if not 0 <= real.weight <= 65535:
            raise ValueError(f"service {address}:{service.port}: real {real.address} weight {real.weight}")
        if service.forward != "nat" and raddr.version != address.version:
            raise ValueError(f"service {address}:{service.port}: real {real.address}: address family")
        key = (str(raddr), port)
        if key in reals:
            raise ValueError(f"service {address}:{service.port}: real {key[0]}:{port} listed twice")
        reals[key] = RealServer(str(raddr), port, real.weight)
    ordered = tuple(reals[k] for k in sorted(reals, key=lambda k: (ipaddress.ip_address(k[0]), k[1])))
    return replace(service, address=str(address), reals=ordered)


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    """A virtual service together with what the desired-state value does not carry."""

    service: VirtualService
    flags: int = 0


@dataclass(frozen=True, slots=True)
class IpvsOp:
    kind: str  # add-service | edit-service | add-real | edit-real | del-real | del-service
    entry: ServiceEntry
    real: RealServer | None = None

    def __str__(self) -> str:
        s = self.entry.service
        text = f"{self.kind} {s.protocol} {s.address}:{s.port}"
        if self.real is None:
            return f"{text} {s.scheduler} flags={self.entry.flags:#x}"
        r = self.real
        return f"{text} {r.address}:{r.port} w{r.weight} {s.forward}"


_ORDER = {"add-service": 0, "edit-service": 1, "add-real": 2, "edit-real": 3, "del-real": 4, "del-service": 5}


def plan_services(desired: Iterable[ServiceEntry], current: Iterable[ServiceEntry]) -> tuple[IpvsOp, ...]:
    """Operations that turn `current` into `desired`. Pure; both sides already owned-only.

    Order: services created, then real servers added or re-weighted, then removals, so that
    a membership change never leaves a service with less capacity than both ends.
    """
    want: dict[ServiceKey, ServiceEntry] = {}
    for entry in desired:
        norm = ServiceEntry(normalize_service(entry.service), entry.flags)
        key = service_key(norm.service)
        if key in want:
            raise ValueError(f"service {key[0]} {key[1]}:{key[2]} desired twice")
        want[key] = norm
    have = {service_key(e.service): ServiceEntry(normalize_service(e.service), e.flags) for e in current}
    ops: list[IpvsOp] = []
    for key, entry in want.items():
        old = have.get(key)
        if old is None:
            ops.append(IpvsOp("add-service", entry))
            ops.extend(IpvsOp("add-real", entry, r) for r in entry.service.reals)
            continue
        if old.service.scheduler != entry.service.scheduler or old.flags != entry.flags:
            ops.append(IpvsOp("edit-service", entry))
        old_reals = {(r.address, r.port): r for r in old.service.reals}
        new_reals = {(r.address, r.port): r for r in entry.service.reals}
        for rkey, real in new_reals.items():
            prev = old_reals.get(rkey)
            if prev is None:
                ops.append(IpvsOp("add-real", entry, real))
            elif prev.weight != real.weight or old.service.forward != entry.service.forward:
                ops.append(IpvsOp("edit-real", entry, real))
        ops.extend(IpvsOp("del-real", old, r) for k, r in old_reals.items() if k not in new_reals)
    ops.extend(IpvsOp("del-service", entry) for key, entry in have.items() if key not in want)
    return tuple(sorted(ops, key=lambda op: (_ORDER[op.kind], service_key(op.entry.service), str(op))))


# ---------------------------------------------------------------------------------------
# Kernel side.


@dataclass(frozen=True, slots=True)
class RealServerLoad:
    """Connection counts of one real server, for the engine's drain decision."""

    protocol: str
    address: str  # the service's
    port: int
    real: RealServer
    active: int
    inactive: int
    persistent: int

    @property
    def connections(self) -> int:
        return self.active + self.inactive


class _Attrs:
    """The duck type pyroute2's AsyncIPVS.service()/dest() expect: prebuilt NLA lists."""

    def __init__(self, attrs: list[tuple[str, Any]], key: list[tuple[str, Any]] | None = None) -> None:
        self._attrs = attrs
        self._key = key if key is not None else attrs

    def dump_nla(self) -> dict[str, Any]:
        return {"attrs": self._attrs}

    def dump_key(self) -> dict[str, Any]:
        return {"attrs": self._key}


def _family(address: str) -> int:
    return AF_INET if ipaddress.ip_address(address).version == 4 else AF_INET6


def _service_key_attrs(service: VirtualService) -> list[tuple[str, Any]]:
    return [
        ("IPVS_SVC_ATTR_AF", _family(service.address)),
        ("IPVS_SVC_ATTR_PROTOCOL", PROTOCOLS[service.protocol]),
        ("IPVS_SVC_ATTR_ADDR", service.address),
        ("IPVS_SVC_ATTR_PORT", service.port),
    ]


def _service_attrs(entry: ServiceEntry) -> _Attrs:
    s = entry.service
    key = _service_key_attrs(s)
    # The kernel reads the netmask as a raw be32 and, for IPv6, wants a prefix length
    # 1..128 in it; pyroute2 encodes this attribute as a dotted quad, so 128 is "128.0.0.0".
    netmask = "255.255.255.255" if _family(s.address) == AF_INET else "128.0.0.0"
    full = [
        *key,
        ("IPVS_SVC_ATTR_SCHED_NAME", s.scheduler),
        ("IPVS_SVC_ATTR_FLAGS", {"flags": entry.flags, "mask": SCHED_FLAG_MASK}),
        ("IPVS_SVC_ATTR_TIMEOUT", 0),
        ("IPVS_SVC_ATTR_NETMASK", netmask),
    ]
    return _Attrs(full, key)


def _dest_attrs(service: VirtualService, real: RealServer) -> _Attrs:
    return _Attrs(
        [
            ("IPVS_DEST_ATTR_ADDR_FAMILY", _family(real.address)),
            ("IPVS_DEST_ATTR_ADDR", real.address),
            ("IPVS_DEST_ATTR_PORT", real.port),
            ("IPVS_DEST_ATTR_FWD_METHOD", FORWARD[service.forward]),
            ("IPVS_DEST_ATTR_WEIGHT", real.weight),
            ("IPVS_DEST_ATTR_U_THRESH", 0),
            ("IPVS_DEST_ATTR_L_THRESH", 0),
        ]
    )


class IpvsTable:
    """The IPVS services on the owned addresses of one network namespace."""

    def __init__(
        self,
        *,
        owned: Sequence[str],
        netns: str | None = None,
        flags: Iterable[str] = ("mh-fallback",),
    ) -> None:
        self.owned = tuple(ipaddress.ip_network(p, strict=True) for p in owned)
        if not self.owned:
            raise ValueError("an IpvsTable needs the prefixes of the services it owns")
        self.netns = netns
        self.flags = tuple(flags)
        sched_flags(self.flags)  # validate now, not at the first set()
        self._sock: AsyncIPVS | None = None

    def owns(self, address: str) -> bool:
        addr = ipaddress.ip_address(address)
        return any(addr in net for net in self.owned)

    async def _socket(self) -> AsyncIPVS:
        if self._sock is None:
            sock = AsyncIPVS(netns=self.netns, flags=0, ext_ack=True)
            try:
                await sock.setup_endpoint()
            except NetlinkError as exc:
                sock.close()
                if exc.code == _ENOENT:
                    raise DataplaneError(
                        "open IPVS generic netlink",
                        "no IPVS in this kernel (module ip_vs not loaded)",
                        exc.code,
                    ) from exc
                raise kernel_error("open IPVS generic netlink", exc) from exc
            except OSError as exc:
                sock.close()
                raise kernel_error(f"open IPVS generic netlink netns={self.netns}", exc) from exc
            self._sock = sock
        return self._sock

    async def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def __aenter__(self) -> IpvsTable:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _dump(self) -> tuple[list[ServiceEntry], list[RealServerLoad]]:
        sock = await self._socket()
        entries: list[ServiceEntry] = []
        loads: list[RealServerLoad] = []
        try:
            for msg in await sock.service("dump"):
                svc = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
                proto = _PROTOCOL_NAMES.get(svc.get_attr("IPVS_SVC_ATTR_PROTOCOL"))
                address = svc.get_attr("IPVS_SVC_ATTR_ADDR")
                if proto is None or address is None or not self.owns(address):
                    continue  # fwmark services, SCTP, other owners' addresses
                port = int(svc.get_attr("IPVS_SVC_ATTR_PORT"))
                base = VirtualService(
                    proto, str(address), port, str(svc.get_attr("IPVS_SVC_ATTR_SCHED_NAME"))
                )
                flags = int((svc.get_attr("IPVS_SVC_ATTR_FLAGS") or {}).get("flags", 0))
                reals: list[RealServer] = []
                forward = "dr"
                for dmsg in await sock.dest("dump", service=_Attrs(_service_key_attrs(base))):
                    d = dmsg.get_attr("IPVS_CMD_ATTR_DEST")
                    real = RealServer(
                        str(d.get_attr("IPVS_DEST_ATTR_ADDR")),
                        int(d.get_attr("IPVS_DEST_ATTR_PORT")),
                        int(d.get_attr("IPVS_DEST_ATTR_WEIGHT")),
                    )
                    forward = _FORWARD_NAMES.get(int(d.get_attr("IPVS_DEST_ATTR_FWD_METHOD")) & 7, "dr")
                    reals.append(real)
                    loads.append(
                        RealServerLoad(
                            proto,
                            base.address,
                            port,
                            real,
                            int(d.get_attr("IPVS_DEST_ATTR_ACTIVE_CONNS") or 0),
                            int(d.get_attr("IPVS_DEST_ATTR_INACT_CONNS") or 0),
                            int(d.get_attr("IPVS_DEST_ATTR_PERSIST_CONNS") or 0),
                        )
                    )
                entries.append(
                    ServiceEntry(replace(base, forward=forward, reals=tuple(reals)), flags & 0xFFFF)
                )
        except (OSError, NetlinkError) as exc:
            raise kernel_error("dump IPVS services", exc) from exc
        return entries, loads

    async def read(self) -> tuple[VirtualService, ...]:
        entries, _ = await self._dump()
        return tuple(sorted((normalize_service(e.service) for e in entries), key=service_key))

    async def read_flags(self) -> Mapping[ServiceKey, int]:
        entries, _ = await self._dump()
        return {service_key(e.service): e.flags for e in entries}

    async def loads(self) -> tuple[RealServerLoad, ...]:
        _, loads = await self._dump()
        return tuple(loads)

    async def plan(self, services: Sequence[VirtualService]) -> tuple[IpvsOp, ...]:
        for s in services:
            if not self.owns(s.address):
                raise ValueError(f"service {s.address}:{s.port}: address outside the owned prefixes")
        entries, _ = await self._dump()
        current = [ServiceEntry(e.service, e.flags & SCHED_FLAG_MASK) for e in entries]
        wanted = (ServiceEntry(s, sched_flags(self.flags, s.scheduler)) for s in services)
        return plan_services(wanted, current)

    async def set(self, services: Sequence[VirtualService]) -> None:
        ops = await self.plan(services)
        if ops:
            await self.apply(ops)

    async def apply(self, ops: Iterable[IpvsOp]) -> None:
        sock = await self._socket()
        for op in ops:
            service = op.entry.service
            try:
                if op.kind == "add-service":
                    await sock.service("add", service=_service_attrs(op.entry))
                elif op.kind == "edit-service":
                    await sock.service("set", service=_service_attrs(op.entry))
                elif op.kind == "del-service":
                    await sock.service("del", service=_Attrs(_service_key_attrs(service)))
                else:
                    assert op.real is not None
                    command = {"add-real": "add", "edit-real": "set", "del-real": "del"}[op.kind]
                    await sock.dest(
                        command,
                        service=_Attrs(_service_key_attrs(service)),
                        dest=_dest_attrs(service, op.real),
                    )
            except NetlinkError as exc:
                if op.kind.startswith("del-") and exc.code in (_ENOENT, _ESRCH):
                    continue  # already gone
                if op.kind in ("add-service", "edit-service") and exc.code == _ENOENT:
                    raise DataplaneError(
                        str(op),
                        f"scheduler {service.scheduler!r} not found (module ip_vs_{service.scheduler})",
                        exc.code,
                    ) from exc
                raise kernel_error(str(op), exc) from exc
            except OSError as exc:
                raise kernel_error(str(op), exc) from exc
            log.info("ipvs.apply netns=%s op=%s", self.netns, op)
