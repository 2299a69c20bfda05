"""IPVS virtual services and their real servers, programmed over generic netlink.

Contract:

- An `IpvsTable` owns the virtual services whose address lies in one of its `owned`
  prefixes (the PoP's anycast/VIP ranges, from configuration); every other service in the
  kernel is left exactly as it is. IPVS has no owner mark, hence ownership by address.
- `await ipvs.set(services)` takes the whole desired set for the owned addresses, reads the
  kernel back and sends only the difference: new services with their real servers, a
  changed scheduler or flags edited in place (IPVS_CMD_SET_SERVICE keeps the connection
  table), real servers added / re-weighted / removed, services no longer desired deleted.
  New capacity is added before old is removed. Nothing is sent when the kernel matches,
  so a restarted engine adopts what it programmed before without a flap. It returns the
  changes made ("ipvs add-real udp/192.0.2.1:51820 10.0.1.12"), () when the kernel matched:
  a service or real server deleted behind pop's back is put back by the next set().
- `reown(prefixes)` (a reload changed the anycast prefixes): until the next successful
  set() the table owns the old prefixes and the new ones, so that set() removes the
  services of a prefix that left the configuration; then only the new ones.
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
- Errors (no IPVS module, unknown scheduler, EPERM, ...) raise `DataplaneError`. Bind to a
  named network namespace with `netns=`.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from socket import AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP

from pop.adapters.netlink import (
    IPVS_CMD_DEL_DEST,
    IPVS_CMD_DEL_SERVICE,
    IPVS_CMD_GET_DEST,
    IPVS_CMD_GET_SERVICE,
    IPVS_CMD_NEW_DEST,
    IPVS_CMD_NEW_SERVICE,
    IPVS_CMD_SET_DEST,
    IPVS_CMD_SET_SERVICE,
    IpvsServiceKey,
    NetlinkSocket,
    decode_dest,
    decode_service,
    encode_dest,
    encode_service,
    encode_service_key_attr,
    genl,
    resolve_family,
)
from pop.adapters.routes import DataplaneError, NetlinkAdapter, canonical_address, kernel_error, run_in_netns
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
    return (service.protocol, canonical_address(service.address)[2], service.port)


def normalize_service(service: VirtualService) -> VirtualService:
    """Canonical form, validated: reals sorted, dr/tunnel real ports equal the service's."""
    if service.protocol not in PROTOCOLS:
        raise ValueError(f"service {service.address}:{service.port}: protocol {service.protocol!r}")
    if service.forward not in FORWARD:
        raise ValueError(f"service {service.address}:{service.port}: forward {service.forward!r}")
    if not 0 < service.port < 65536:
        raise ValueError(f"service {service.address}: port {service.port}")
    version, _, address = canonical_address(service.address)
    reals: dict[tuple[str, int], tuple[bytes, RealServer]] = {}
    for real in service.reals:
        rversion, rpacked, raddr = canonical_address(real.address)
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
        if service.forward != "nat" and rversion != version:
            raise ValueError(f"service {address}:{service.port}: real {real.address}: address family")
        key = (raddr, port)
        if key in reals:
            raise ValueError(f"service {address}:{service.port}: real {raddr}:{port} listed twice")
        reals[key] = (rpacked, RealServer(raddr, port, real.weight))
    ordered = tuple(r for _, r in sorted(reals.values(), key=lambda pr: (len(pr[0]), pr[0], pr[1].port)))
    return replace(service, address=address, reals=ordered)


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

    def change(self) -> str:
        """One short line for the applier's report: what this operation changed."""
        s = self.entry.service
        address = f"[{s.address}]" if ":" in s.address else s.address
        text = f"ipvs {self.kind} {s.protocol}/{address}:{s.port}"
        if self.real is None:
            return text if self.kind == "del-service" else f"{text} {s.scheduler}"
        r = self.real
        text += f" {r.address}" + (f" port {r.port}" if r.port != s.port else "")
        return text if self.kind == "del-real" or r.weight == 1 else f"{text} weight {r.weight}"


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


def _key(service: VirtualService) -> IpvsServiceKey:
    family = AF_INET6 if ":" in service.address else AF_INET
    return IpvsServiceKey(family, PROTOCOLS[service.protocol], service.address, service.port)


_COMMANDS = {
    "add-service": IPVS_CMD_NEW_SERVICE,
    "edit-service": IPVS_CMD_SET_SERVICE,
    "del-service": IPVS_CMD_DEL_SERVICE,
    "add-real": IPVS_CMD_NEW_DEST,
    "edit-real": IPVS_CMD_SET_DEST,
    "del-real": IPVS_CMD_DEL_DEST,
}


def encode_op(op: IpvsOp) -> bytes:
    """The generic netlink payload of one operation."""
    service = op.entry.service
    key = _key(service)
    if op.kind in ("add-service", "edit-service"):
        attrs = encode_service(key, service.scheduler, op.entry.flags, SCHED_FLAG_MASK)
    elif op.kind == "del-service":
        attrs = encode_service_key_attr(key)
    else:
        assert op.real is not None
        attrs = encode_dest(key, op.real.address, op.real.port, FORWARD[service.forward], op.real.weight)
    return genl(_COMMANDS[op.kind], attrs)


class IpvsTable(NetlinkAdapter):
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
        self._owned_next: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None
        self._sock: NetlinkSocket | None = None
        self._family = 0

    def reown(self, owned: Sequence[str]) -> None:
        """A reload changed the owned prefixes: own old and new until the next set() is done."""
        new = tuple(ipaddress.ip_network(p, strict=True) for p in owned)
        if not new:
            raise ValueError("an IpvsTable needs the prefixes of the services it owns")
        self.owned = tuple(dict.fromkeys((*self.owned, *new)))
        self._owned_next = new

    def owns(self, address: str) -> bool:
        addr = ipaddress.ip_address(address)
        return any(addr in net for net in self.owned)

    async def _socket(self) -> tuple[NetlinkSocket, int]:
        if self._sock is None:
            try:
                sock = NetlinkSocket(await run_in_netns(self.netns, NetlinkSocket.make_generic))
            except OSError as exc:
                raise kernel_error(f"open generic netlink netns={self.netns}", exc) from exc
            try:
                self._family = await resolve_family(sock, "IPVS")
            except OSError as exc:
                sock.close()
                if exc.errno == errno.ENOENT:
                    raise DataplaneError(
                        "open IPVS generic netlink",
                        "no IPVS in this kernel (module ip_vs not loaded)",
                        exc.errno,
                    ) from exc
                raise kernel_error("open IPVS generic netlink", exc) from exc
            self._sock = sock
        return self._sock, self._family

    async def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def _dump(self) -> tuple[list[ServiceEntry], list[RealServerLoad]]:
        sock, family = await self._socket()
        entries: list[ServiceEntry] = []
        loads: list[RealServerLoad] = []
        try:
            for body in await sock.dump(family, genl(IPVS_CMD_GET_SERVICE, b"")):
                record = decode_service(body)
                key = record.key
                proto = _PROTOCOL_NAMES.get(key.protocol) if key is not None else None
                if key is None or proto is None or not self.owns(key.address):
                    continue  # fwmark services, SCTP, other owners' addresses
                reals: list[RealServer] = []
                forward = "dr"
                for dbody in await sock.dump(family, genl(IPVS_CMD_GET_DEST, encode_service_key_attr(key))):
                    dest = decode_dest(dbody, key.family)
                    real = RealServer(dest.address, dest.port, dest.weight)
                    forward = _FORWARD_NAMES.get(dest.forward & 7, "dr")
                    reals.append(real)
                    loads.append(
                        RealServerLoad(
                            proto, key.address, key.port, real, dest.active, dest.inactive, dest.persistent
                        )
                    )
                service = VirtualService(
                    proto, key.address, key.port, record.scheduler, forward, tuple(reals)
                )
                entries.append(ServiceEntry(service, record.flags))
        except OSError as exc:
            raise kernel_error("dump IPVS services", exc) from exc
        return entries, loads

    async def read(self) -> tuple[VirtualService, ...]:
        entries, _ = await self._dump()
        return tuple(sorted((normalize_service(e.service) for e in entries), key=service_key))

    async def read_flags(self) -> Mapping[ServiceKey, int]:
        entries, _ = await self._dump()
        return {service_key(e.service): e.flags & SCHED_FLAG_MASK for e in entries}

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

    async def set(self, services: Sequence[VirtualService]) -> tuple[str, ...]:
        ops = await self.plan(services)
        changes = await self.apply(ops) if ops else ()
        if self._owned_next is not None:
            self.owned, self._owned_next = self._owned_next, None  # the old prefixes' services are gone
        return changes

    async def apply(self, ops: Iterable[IpvsOp]) -> tuple[str, ...]:
        """Send the operations in order; returns the changes the kernel accepted."""
        sock, family = await self._socket()
        changes: list[str] = []
        for op in ops:
            service = op.entry.service
            try:
                await sock.request(family, 0, encode_op(op))
            except OSError as exc:
                if op.kind.startswith("del-") and exc.errno in (errno.ENOENT, errno.ESRCH):
                    continue  # already gone
                if op.kind in ("add-service", "edit-service") and exc.errno == errno.ENOENT:
                    raise DataplaneError(
                        str(op),
                        f"scheduler {service.scheduler!r} not found (module ip_vs_{service.scheduler})",
                        exc.errno,
                    ) from exc
                raise kernel_error(str(op), exc) from exc
            log.info("ipvs.apply netns=%s op=%s", self.netns, op)
            changes.append(op.change())
        return tuple(changes)
