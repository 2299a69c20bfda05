"""The PoP's local data plane as one adapter: VIPs on lo, IPVS services, ECMP routes, flow pins.

`await dataplane.set(state)` takes the data-plane part of a DesiredState (vips, services,
routes, pins) and hands each table to the adapter that owns it, in the order traffic needs:
what is being added goes VIP -> IPVS service -> pins -> route (a service needs its local
address; a server is pinned before new flows can reach it); what is being removed goes
route -> pins -> IPVS service -> VIP. Each sub-adapter reads the kernel
back and sends only the difference, so `set()` is idempotent and adopts what a previous
engine programmed.

Kernel errors surface as `DataplaneError` (from pop.adapters.routes) for the engine to report;
they never leave a half-applied order behind silently: the exception names the operation.
"""

from __future__ import annotations

from collections.abc import Sequence

from pop.adapters.ipvs import IpvsTable
from pop.adapters.pins import FlowPins
from pop.adapters.routes import RouteTable
from pop.adapters.vip import VipSet
from pop.config import Dataplane as DataplaneConfig
from pop.config import Prefix
from pop.desired import DesiredState, host_addresses


class KernelDataplane:
    def __init__(self, config: DataplaneConfig, prefixes: tuple[Prefix, ...], netns: str | None = None,
                 servers: Sequence[str] = ()) -> None:
        """``servers``: every configured server address, in configuration order (pin marks)."""
        self.config = config
        self.vips = VipSet(protocol=config.protocol, netns=netns)
        self.routes = RouteTable(table=config.table, protocol=config.protocol, netns=netns,
                                 hash_policy=config.hash_policy) if config.mode == "ecmp" else None
        owned = host_addresses(prefixes)
        self.ipvs = IpvsTable(owned=owned, netns=netns) if config.mode == "ipvs" and owned else None
        self.pins = FlowPins([p.prefix for p in prefixes], servers, protocol=config.protocol, netns=netns) \
            if config.mode == "ecmp" and config.pin_flows else None

    async def set(self, state: DesiredState) -> None:
        growing = bool(state.vips or state.services or state.routes or state.pins)
        if growing:
            await self.vips.set(state.vips)
            if self.ipvs is not None:
                await self.ipvs.set(state.services)
            if self.pins is not None:
                await self.pins.set(state.pins)
            if self.routes is not None:
                await self.routes.set(state.routes)
        else:
            if self.routes is not None:
                await self.routes.set(())
            if self.pins is not None:
                await self.pins.set(())
            if self.ipvs is not None:
                await self.ipvs.set(())
            await self.vips.set(())

    async def read(self) -> DesiredState:
        return DesiredState(
            vips=await self.vips.read(),
            routes=await self.routes.read() if self.routes is not None else (),
            services=await self.ipvs.read() if self.ipvs is not None else (),
        )

    async def connections(self) -> dict[str, int]:
        """Open connections per server address: IPVS's, summed over the services, or the
        conntrack entries pinned to each server (ecmp with pin_flows)."""
        if self.pins is not None:
            return await self.pins.connections()
        totals: dict[str, int] = {}
        if self.ipvs is not None:
            for load in await self.ipvs.loads():
                totals[load.real.address] = totals.get(load.real.address, 0) + load.connections
        return totals

    async def diagnostics(self) -> dict[str, object]:
        result: dict[str, object] = {"mode": self.config.mode}
        if self.routes is not None:
            diag = await self.routes.diagnostics()
            result["ecmp"] = repr(diag)
        return result

    async def close(self) -> None:
        for adapter in (self.vips, self.routes, self.ipvs, self.pins):
            if adapter is not None:
                await adapter.close()
