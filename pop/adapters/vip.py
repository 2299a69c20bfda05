"""The VIPs (anycast service addresses) on `lo`, programmed with pyroute2.

Contract:

- `await vips.set(["192.0.2.1/32", "2001:db8::1/128"])` takes the whole desired set;
  a missing prefix length means a host address (/32, /128).
- Ownership is marked in the kernel itself: every address this adapter adds carries the
  address protocol IFA_PROTO = `protocol` (default 200; Linux >= 6.0, shown by
  `ip -d addr show lo`). Only addresses with that mark are ever removed.
- Adoption rules: a desired address that is already on `lo` is left as it is, whoever
  added it (after a restart ours are recognised by the mark, so nothing flaps); an
  address without the mark is never removed, even when it is no longer desired, because
  an operator or another tool put it there.
- `set()` reads `lo` back every time and returns the changes it made ("vip add
  192.0.2.1/32"), () when nothing was missing: a VIP deleted behind pop's back is put back.
- `read()` returns the marked addresses; `present()` everything on `lo` with its mark.
- Kernel errors raise `DataplaneError`. Bind to a namespace with `netns=`.

In ECMP mode the PoP must *not* hold the VIP locally (a local address wins over the
multipath route and the PoP would answer itself): there the VIPs belong on the servers.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from socket import AF_INET, AF_INET6
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pop.adapters.routes import DataplaneError, NetlinkAdapter, kernel_error

log = logging.getLogger(__name__)

_EEXIST = 17
_EADDRNOTAVAIL = 99


def canonical_vip(vip: str) -> str:
    """'192.0.2.1' -> '192.0.2.1/32'; the host address is kept ('192.0.2.1/24' stays)."""
    return str(ipaddress.ip_interface(vip))


@dataclass(frozen=True, slots=True)
class PresentAddress:
    address: str  # canonical "addr/len"
    protocol: int  # IFA_PROTO, 0 when unset


@dataclass(frozen=True, slots=True)
class VipPlan:
    add: tuple[str, ...] = ()
    delete: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.add and not self.delete


def plan_vips(desired: Iterable[str], present: Iterable[PresentAddress], protocol: int) -> VipPlan:
    """Pure: which addresses to add to and remove from `lo` (see the adoption rules)."""
    want = {canonical_vip(v) for v in desired}
    there = {p.address: p.protocol for p in present}
    add = tuple(sorted(a for a in want if a not in there))
    delete = tuple(sorted(a for a, proto in there.items() if proto == protocol and a not in want))
    return VipPlan(add, delete)


class VipSet(NetlinkAdapter):
    """The VIPs on `lo` of one network namespace, marked with one address protocol."""

    def __init__(self, *, protocol: int = 200, netns: str | None = None, ifname: str = "lo") -> None:
        # Address protocols 0..3 are the kernel's own (unspec, kernel_lo, kernel_ra, kernel_ll).
        if not 4 <= protocol <= 255:
            raise ValueError(f"protocol {protocol}: must be 4..255")
        self.protocol = protocol
        self.netns = netns
        self.ifname = ifname
        self._ipr: AsyncIPRoute | None = None
        self._index: int | None = None

    async def _socket(self) -> tuple[AsyncIPRoute, int]:
        if self._ipr is None:
            try:
                self._ipr = AsyncIPRoute(netns=self.netns, flags=0, ext_ack=True, strict_check=True)
            except (OSError, NetlinkError) as exc:
                raise kernel_error(f"open rtnetlink netns={self.netns}", exc) from exc
        if self._index is None:
            try:
                found = await self._ipr.link_lookup(ifname=self.ifname)
            except (OSError, NetlinkError) as exc:
                raise kernel_error(f"look up {self.ifname}", exc) from exc
            if not found:
                raise DataplaneError(f"look up {self.ifname}", "no such interface")
            self._index = int(found[0])
        return self._ipr, self._index

    async def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    async def present(self) -> tuple[PresentAddress, ...]:
        ipr, index = await self._socket()
        found: list[PresentAddress] = []
        for family in (AF_INET, AF_INET6):
            try:
                async for msg in await ipr.addr("dump", family=family, index=index):
                    if msg["index"] != index:
                        continue
                    found.append(_decode(msg))
            except (OSError, NetlinkError) as exc:
                raise kernel_error(f"dump addresses of {self.ifname}", exc) from exc
        return tuple(sorted(found, key=lambda p: p.address))

    async def read(self) -> tuple[str, ...]:
        return tuple(p.address for p in await self.present() if p.protocol == self.protocol)

    async def set(self, vips: Sequence[str]) -> tuple[str, ...]:
        plan = plan_vips(vips, await self.present(), self.protocol)
        return await self.apply(plan) if not plan.empty else ()

    async def apply(self, plan: VipPlan) -> tuple[str, ...]:
        """Send a plan; returns the changes the kernel accepted."""
        ipr, index = await self._socket()
        changes: list[str] = []
        for vip in plan.add:
            iface = ipaddress.ip_interface(vip)
            try:
                await ipr.addr(
                    "add",
                    index=index,
                    address=str(iface.ip),
                    prefixlen=iface.network.prefixlen,
                    proto=self.protocol,
                )
            except NetlinkError as exc:
                if exc.code == _EEXIST:  # raced with someone else adding it: theirs now
                    continue
                raise kernel_error(f"add {vip} to {self.ifname}", exc) from exc
            except OSError as exc:
                raise kernel_error(f"add {vip} to {self.ifname}", exc) from exc
            log.info("vip.add netns=%s ifname=%s vip=%s", self.netns, self.ifname, vip)
            changes.append(f"vip add {vip}")
        for vip in plan.delete:
            iface = ipaddress.ip_interface(vip)
            try:
                await ipr.addr("del", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            except NetlinkError as exc:
                if exc.code == _EADDRNOTAVAIL:
                    continue
                raise kernel_error(f"delete {vip} from {self.ifname}", exc) from exc
            except OSError as exc:
                raise kernel_error(f"delete {vip} from {self.ifname}", exc) from exc
            log.info("vip.delete netns=%s ifname=%s vip=%s", self.netns, self.ifname, vip)
            changes.append(f"vip delete {vip}")
        return tuple(changes)


def _decode(msg: Any) -> PresentAddress:
    addr = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
    return PresentAddress(canonical_vip(f"{addr}/{msg['prefixlen']}"), int(msg.get("IFA_PROTO") or 0))
