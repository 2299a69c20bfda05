"""The PoP's local data plane as one adapter: VIPs on lo, IPVS services, ECMP routes, flow pins.

`await dataplane.set(state)` takes the data-plane part of a DesiredState (vips, services,
routes, pins) and hands each table to the adapter that owns it, in the order traffic needs:
what is being added goes VIP -> IPVS service -> pins -> route (a service needs its local
address; a server is pinned before new flows can reach it); what is being removed goes
route -> pins -> IPVS service -> VIP. Each sub-adapter reads the kernel back and sends only
the difference, so `set()` is idempotent and adopts what a previous engine programmed. It
returns the changes it made, one short line each ("vip add 192.0.2.1/32", "route replace
192.0.2.1/32 via 10.0.1.10,10.0.1.11"), () when the kernel already held the state; so
anything removed or changed behind pop's back is put back and reported. `verify=True` also
bypasses the one cache there is (the pins' last fully applied set) and the hash policy's
write-once.

`reconfigure(config, prefixes, servers)` follows a reload: what no longer fits the new
configuration (another mode, table or protocol) is retired and emptied by the next `set()`
before the new state is applied; the rest is kept and told the new prefixes and servers
(pins keep every remaining server's mark, IPVS owns the old prefixes until that `set()` has
removed their services).

Every failure of `set()`, `reconfigure()`, `connections()` and `diagnostics()` is a
`DataplaneError` (from pop.adapters.routes) naming the operation; anything else escaping an
adapter (a KeyError, a ValueError) is a bug and is wrapped, never passed to the engine raw.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

from pop.adapters.ipvs import IpvsTable
from pop.adapters.pins import FlowPins
from pop.adapters.routes import DataplaneError, RouteTable
from pop.adapters.vip import VipSet
from pop.config import Dataplane as DataplaneConfig
from pop.config import Prefix
from pop.desired import DesiredState, host_addresses

P = ParamSpec("P")
T = TypeVar("T")
AsyncFn = Callable[P, Coroutine[Any, Any, T]]

Adapter = VipSet | RouteTable | IpvsTable | FlowPins


def _dataplane_errors(operation: str) -> Callable[[AsyncFn[P, T]], AsyncFn[P, T]]:
    """Let DataplaneError through; turn any other Exception into one naming `operation`."""

    def wrap(fn: AsyncFn[P, T]) -> AsyncFn[P, T]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                return await fn(*args, **kwargs)
            except DataplaneError:
                raise
            except Exception as exc:  # a bug in an adapter: still a data-plane failure to report
                raise DataplaneError(operation, f"{type(exc).__name__}: {exc}") from exc

        return wrapper

    return wrap


class KernelDataplane:
    def __init__(self, config: DataplaneConfig, prefixes: tuple[Prefix, ...], netns: str | None = None,
                 servers: Sequence[str] = ()) -> None:
        """``servers``: every configured server address (pins give each a mark of its own)."""
        self.netns = netns
        self.config = config
        self.vips = VipSet(protocol=config.protocol, netns=netns)
        self.routes: RouteTable | None = None
        self.ipvs: IpvsTable | None = None
        self.pins: FlowPins | None = None
        self._retired: list[Adapter] = []  # emptied by the next set(), in this order
        self._build(config, prefixes, servers)

    def _build(self, config: DataplaneConfig, prefixes: tuple[Prefix, ...], servers: Sequence[str]) -> None:
        """Make the adapters fit `config`, keeping those that still do (their state with them)."""
        old = self.config
        self.config = config
        if config.protocol != self.vips.protocol:
            self._retired.append(self.vips)
            self.vips = VipSet(protocol=config.protocol, netns=self.netns)

        if self.routes is not None and (config.mode != "ecmp" or (self.routes.table, self.routes.protocol)
                                        != (config.table, config.protocol)):
            self._retired.append(self.routes)
            self.routes = None
        if config.mode == "ecmp":
            if self.routes is None:
                self.routes = RouteTable(table=config.table, protocol=config.protocol, netns=self.netns,
                                         hash_policy=config.hash_policy)
            elif config.hash_policy != old.hash_policy:
                self.routes.set_hash_policy(config.hash_policy)

        owned = host_addresses(prefixes)
        if self.ipvs is not None and not (config.mode == "ipvs" and owned):
            self._retired.append(self.ipvs)
            self.ipvs = None
        if config.mode == "ipvs" and owned:
            if self.ipvs is None:
                self.ipvs = IpvsTable(owned=owned, netns=self.netns)
            else:
                self.ipvs.reown(owned)

        anycast = [p.prefix for p in prefixes]
        marks = None
        if self.pins is not None and not (config.mode == "ecmp" and config.pin_flows
                                          and self.pins.protocol == config.protocol):
            marks = self.pins.marks if self.pins.marks else None
            self._retired.append(self.pins)
            self.pins = None
        if config.mode == "ecmp" and config.pin_flows:
            if self.pins is None:
                self.pins = FlowPins(anycast, servers, protocol=config.protocol, netns=self.netns, marks=marks)
            else:
                self.pins.reconfigure(anycast, servers)

    def reconfigure(self, config: DataplaneConfig, prefixes: tuple[Prefix, ...], servers: Sequence[str]) -> None:
        """After a config reload; the next set() applies it. Raises only DataplaneError."""
        try:
            self._build(config, prefixes, servers)
        except DataplaneError:
            raise
        except Exception as exc:  # a bug, or a configuration the loader should have refused
            raise DataplaneError("reconfigure data plane", f"{type(exc).__name__}: {exc}") from exc

    @_dataplane_errors("set data plane")
    async def set(self, state: DesiredState, *, verify: bool = False) -> tuple[str, ...]:
        changes: list[str] = []
        while self._retired:  # what the configuration no longer has goes first (same order)
            adapter = self._retired[0]
            changes += await adapter.set(())
            await adapter.close()
            self._retired.pop(0)
        growing = bool(state.vips or state.services or state.routes or state.pins)
        if growing:
            changes += await self.vips.set(state.vips)
            if self.ipvs is not None:
                changes += await self.ipvs.set(state.services)
            if self.pins is not None:
                changes += await self.pins.set(state.pins, verify=verify)
            if self.routes is not None:
                changes += await self.routes.set(state.routes, verify=verify)
        else:
            if self.routes is not None:
                changes += await self.routes.set((), verify=verify)
            if self.pins is not None:
                changes += await self.pins.set((), verify=verify)
            if self.ipvs is not None:
                changes += await self.ipvs.set(())
            changes += await self.vips.set(())
        return tuple(changes)

    @_dataplane_errors("read data plane")
    async def read(self) -> DesiredState:
        return DesiredState(
            vips=await self.vips.read(),
            routes=await self.routes.read() if self.routes is not None else (),
            services=await self.ipvs.read() if self.ipvs is not None else (),
            pins=await self.pins.read() if self.pins is not None else (),
        )

    @_dataplane_errors("count connections")
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

    @_dataplane_errors("data plane diagnostics")
    async def diagnostics(self) -> dict[str, object]:
        """A plain JSON-able snapshot for /status, e.g. {"mode": "ecmp", "hash_policy":
        {"ipv4": 1, "ipv6": 0}, "l4_hashing": false, "owned_routes": 1, "warnings": [...],
        "pin_flows": true}. A policy is None where its sysctl cannot be read (IPv6 off)."""
        result: dict[str, object] = {"mode": self.config.mode}
        if self.routes is not None:
            diag = await self.routes.diagnostics()
            readable = [p for p in diag.hash_policies if p.policy is not None]
            result |= {
                "hash_policy": {p.family: p.policy for p in diag.hash_policies},
                "l4_hashing": bool(readable) and all(p.l4 for p in readable),
                "owned_routes": diag.owned_routes,
                "warnings": list(diag.warnings),
                "pin_flows": self.pins is not None,
            }
        return result

    async def close(self) -> None:
        for adapter in (self.vips, self.routes, self.ipvs, self.pins, *self._retired):
            if adapter is not None:
                await adapter.close()
