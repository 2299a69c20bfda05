"""ECMP routes toward the healthy VPN servers, programmed over rtnetlink.

Contract:

- A `RouteTable` owns the routes that carry its rtnetlink protocol number in its routing
  table, and nothing else. `await routes.set(desired)` takes the *whole* desired set for
  that slice; it reads the kernel's state back, replaces every route whose next-hop set
  differs with one RTM_NEWROUTE (NLM_F_REPLACE: the prefix never goes without a route),
  deletes its own routes that are no longer desired, and sends nothing when the kernel
  already matches (idempotent; after a restart it adopts what it programmed before).
  It returns the changes it made, one line each ("route replace 192.0.2.1/32 via
  10.0.1.10,10.0.1.11"), () when the kernel already matched: a route deleted or changed
  behind pop's back is put back by the next set() and shows up there.
- A desired route with no next hops means "no route": it is deleted if present.
- It refuses (DataplaneError) to take over a route of another owner that has the same
  prefix and metric, because NLM_F_REPLACE would silently take it over.
- `read()` returns what is in the kernel, in the desired-state vocabulary.
- `diagnostics()` reports net.ipv{4,6}.fib_multipath_hash_policy: with the L3 policy (0)
  every flow of one client lands on the same server. The sysctl is only written when
  the adapter is constructed with `hash_policy=` (then by the first set(), and again by
  `set(..., verify=True)` when it has drifted).
- Every adapter can be bound to a named network namespace (`netns=`, /run/netns/NAME).
- Kernel errors (unreachable gateway, EPERM, ...) raise `DataplaneError`, shared by the
  VIP and IPVS adapters, which carries the operation and the kernel's own message.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import ipaddress
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from socket import AF_INET, AF_INET6
from typing import Any, Self, TypeVar

from pyroute2.netlink.exceptions import NetlinkError

from pop.adapters.netlink import (
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    RTM_DELROUTE,
    RTM_GETROUTE,
    RTM_NEWROUTE,
    NetlinkSocket,
    decode_route,
    encode_dump_request,
    encode_route,
)
from pop.desired import EcmpRoute, NextHop

log = logging.getLogger(__name__)

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000
_NETNS_DIR = "/run/netns"


class DataplaneError(Exception):
    """The kernel refused a data-plane operation (or its facility is missing)."""

    def __init__(self, operation: str, message: str, code: int | None = None) -> None:
        super().__init__(f"{operation}: {message}" + (f" (errno {code})" if code else ""))
        self.operation = operation
        self.message = message
        self.code = code


def kernel_error(operation: str, exc: BaseException) -> DataplaneError:
    """Wrap a pyroute2/OS error, keeping the kernel's extended-ack text when there is one."""
    if isinstance(exc, NetlinkError):
        text = str(exc.args[1]) if len(exc.args) > 1 else os.strerror(exc.code)
        return DataplaneError(operation, text, exc.code)
    if isinstance(exc, OSError):
        return DataplaneError(operation, exc.strerror or str(exc), exc.errno)
    return DataplaneError(operation, repr(exc))


def _setns_thread(netns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.path.join(_NETNS_DIR, netns), os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), netns)
    finally:
        os.close(fd)


async def run_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Run a short blocking function with the calling thread in `netns`.

    /proc/sys/net is resolved against the netns of the thread that opens it, so a sysctl of
    another namespace can only be read from a thread that joined it. setns() changes the
    calling thread for good, hence a throw-away thread rather than the executor's pool.
    """
    if netns is None:
        return await asyncio.to_thread(fn)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def target() -> None:
        try:
            _setns_thread(netns)
            value = fn()
        except BaseException as exc:  # handed to the awaiting task, not swallowed
            loop.call_soon_threadsafe(_settle_exc, done, exc)
        else:
            loop.call_soon_threadsafe(_settle, done, value)

    threading.Thread(target=target, name=f"netns-{netns}", daemon=True).start()
    return await done


class NetlinkAdapter:
    """`async with` support for the adapters: the socket is closed on the way out."""

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _settle(fut: asyncio.Future[T], value: T) -> None:
    if not fut.done():
        fut.set_result(value)


def _settle_exc(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


# ---------------------------------------------------------------------------------------
# Pure part: canonical keys and the plan.


@functools.lru_cache(maxsize=4096)
def canonical_prefix(prefix: str) -> str:
    """'192.0.2.1' -> '192.0.2.1/32'; host bits set is a caller error (ValueError)."""
    return str(ipaddress.ip_network(prefix, strict=True))


@functools.lru_cache(maxsize=65536)
def canonical_address(address: str) -> tuple[int, bytes, str]:
    """(IP version, packed, canonical text). Cached: the same few thousand server
    addresses come back on every set(), and ipaddress parsing dominated its cost."""
    addr = ipaddress.ip_address(address)
    return addr.version, addr.packed, str(addr)


def _nexthop_key(route: EcmpRoute) -> frozenset[tuple[str, int]]:
    hops = [(canonical_address(h.address)[2], h.weight) for h in route.nexthops]
    # The kernel stores a single next hop as a plain gateway route and drops its weight,
    # so a lone next hop compares by address only (otherwise set() would never converge).
    if len(hops) == 1:
        return frozenset({(hops[0][0], 1)})
    return frozenset(hops)


def normalize_route(route: EcmpRoute) -> EcmpRoute:
    """Canonical form: prefix with length, next hops sorted by address, validated.

    A stable order matters: with hash-threshold multipath the kernel maps hash ranges to
    next hops in the order given, so a fixed order keeps unchanged servers' ranges as
    close as the algorithm allows.
    """
    prefix = canonical_prefix(route.prefix)
    family = 6 if ":" in prefix else 4
    seen: set[str] = set()
    hops: list[tuple[bytes, NextHop]] = []
    for hop in route.nexthops:
        version, packed, text = canonical_address(hop.address)
        if version != family:
            raise ValueError(f"route {prefix}: next hop {hop.address} is not IPv{family}")
        if not 1 <= hop.weight <= 256:
            raise ValueError(f"route {prefix}: next hop {hop.address} weight {hop.weight} not in 1..256")
        if text in seen:
            raise ValueError(f"route {prefix}: next hop {hop.address} listed twice")
        seen.add(text)
        hops.append((packed, NextHop(text, 1 if len(route.nexthops) == 1 else hop.weight)))
    hops.sort(key=lambda h: h[0])
    return EcmpRoute(prefix, tuple(h for _, h in hops), route.table, route.protocol)


@dataclass(frozen=True, slots=True)
class RoutePlan:
    add: tuple[EcmpRoute, ...] = ()  # new prefixes (NLM_F_EXCL: never over another's route)
    replace: tuple[EcmpRoute, ...] = ()  # our route, new next-hop set (one NLM_F_REPLACE each)
    delete: tuple[EcmpRoute, ...] = ()  # ours, no longer desired

    @property
    def empty(self) -> bool:
        return not self.add and not self.replace and not self.delete


def plan_routes(desired: Iterable[EcmpRoute], current: Iterable[EcmpRoute]) -> RoutePlan:
    """What to send so that the kernel's owned routes equal `desired`. Pure.

    Both sides must already be restricted to one (table, protocol) slice.
    """
    want: dict[tuple[int, str], EcmpRoute] = {}
    for route in desired:
        norm = normalize_route(route)
        key = (norm.table, norm.prefix)
        if key in want:
            raise ValueError(f"route {norm.prefix} table {norm.table} desired twice")
        if norm.nexthops:
            want[key] = norm
    have = {(r.table, canonical_prefix(r.prefix)): r for r in current}
    add = tuple(route for key, route in sorted(want.items()) if key not in have)
    replace = tuple(
        route
        for key, route in sorted(want.items())
        if key in have and _nexthop_key(have[key]) != _nexthop_key(route)
    )
    delete = tuple(route for key, route in sorted(have.items()) if key not in want)
    return RoutePlan(add, replace, delete)


# ---------------------------------------------------------------------------------------
# Kernel side.


@dataclass(frozen=True, slots=True)
class HashPolicy:
    family: str  # "ipv4" | "ipv6"
    policy: int | None  # None: sysctl unreadable (e.g. IPv6 disabled)

    @property
    def l4(self) -> bool:
        # 1 = 5-tuple; 3 = custom field set (fib_multipath_hash_fields), reported as is.
        return self.policy == 1


@dataclass(frozen=True, slots=True)
class RouteDiagnostics:
    """Snapshot for /status: is multipath hashing per flow, and how many routes we hold."""

    hash_policies: tuple[HashPolicy, ...]
    owned_routes: int
    warnings: tuple[str, ...]


_POLICY_NAMES = {0: "L3", 1: "L4", 2: "L3 or inner L3", 3: "custom fields"}


def _sysctl_path(family: str) -> str:
    return f"/proc/sys/net/{family}/fib_multipath_hash_policy"


class RouteTable(NetlinkAdapter):
    """The ECMP routes of one (table, protocol) slice in one network namespace."""

    def __init__(
        self,
        *,
        table: int = 254,
        protocol: int = 200,
        netns: str | None = None,
        hash_policy: int | None = None,
    ) -> None:
        if not 0 < table < 2**32 or table in (0, 255):
            raise ValueError(f"table {table}: not a usable routing table")
        # Protocol numbers below RTPROT_STATIC (4) belong to the kernel and `ip route`.
        if not 4 <= protocol <= 255:
            raise ValueError(f"protocol {protocol}: must be 4..255")
        self.table = table
        self.protocol = protocol
        self.netns = netns
        self.hash_policy = hash_policy
        self._sock: NetlinkSocket | None = None
        self._policy_applied = False

    async def _socket(self) -> NetlinkSocket:
        if self._sock is None:
            try:
                self._sock = NetlinkSocket(await run_in_netns(self.netns, NetlinkSocket.make_route))
            except OSError as exc:
                raise kernel_error(f"open rtnetlink netns={self.netns}", exc) from exc
        return self._sock

    async def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def _dump(self) -> list[EcmpRoute]:
        sock = await self._socket()
        ours: list[EcmpRoute] = []
        for family in (AF_INET, AF_INET6):
            request = encode_dump_request(family, self.table, self.protocol)
            try:
                answers = await sock.dump(RTM_GETROUTE, request)
            except OSError as exc:
                if exc.errno == errno.ENOENT or (family == AF_INET6 and exc.errno == errno.EAFNOSUPPORT):
                    continue  # the table does not exist (yet) in this family, or IPv6 is off
                raise kernel_error(f"dump routes table {self.table} protocol {self.protocol}", exc) from exc
            for payload in answers:
                entry = decode_route(payload)
                # The kernel filters already (strict checking); this guards older kernels.
                if entry.table == self.table and entry.protocol == self.protocol:
                    hops = tuple(NextHop(a, w) for a, w in entry.gateways)
                    ours.append(EcmpRoute(entry.prefix, hops, self.table, self.protocol))
        return ours

    async def read(self) -> tuple[EcmpRoute, ...]:
        return tuple(sorted((normalize_route(r) for r in await self._dump()), key=lambda r: r.prefix))

    def _check_slice(self, routes: Sequence[EcmpRoute]) -> None:
        for route in routes:
            if route.table != self.table or route.protocol != self.protocol:
                raise ValueError(
                    f"route {route.prefix}: table {route.table} protocol {route.protocol} is not "
                    f"this adapter's (table {self.table} protocol {self.protocol})"
                )

    async def set(self, routes: Sequence[EcmpRoute], *, verify: bool = False) -> tuple[str, ...]:
        """Make the slice equal `routes`; the changes made, () when the kernel matched.
        `verify` also reads the hash policy back (otherwise written once)."""
        self._check_slice(routes)
        changes: list[str] = []
        if self.hash_policy is not None and (verify or not self._policy_applied):
            changes += await self.apply_hash_policy()
        plan = plan_routes(routes, await self._dump())
        if not plan.empty:
            changes += await self.apply(plan)
        return tuple(changes)

    def set_hash_policy(self, policy: int | None) -> None:
        """A reload changed `dataplane.hash_policy`: the next set() writes it."""
        self.hash_policy = policy
        self._policy_applied = False

    async def apply(self, plan: RoutePlan) -> tuple[str, ...]:
        """Send a plan: additions and replacements first, removals last. Returns the
        changes the kernel accepted (a deletion of a route already gone is none)."""
        sock = await self._socket()
        changes: list[str] = []
        for route, flags in itertools.chain(
            ((r, NLM_F_CREATE | NLM_F_EXCL) for r in plan.add),
            ((r, NLM_F_CREATE | NLM_F_REPLACE) for r in plan.replace),
        ):
            verb = "add" if flags & NLM_F_EXCL else "replace"
            op = f"{verb} route {route.prefix} table {self.table} via {_hops_text(route)}"
            family = AF_INET6 if ":" in route.prefix else AF_INET
            hops = [(h.address, h.weight) for h in route.nexthops]
            try:
                payload = encode_route(family, route.prefix, self.table, self.protocol, hops)
                await sock.request(RTM_NEWROUTE, flags, payload)
            except ValueError as exc:
                raise DataplaneError(op, str(exc)) from exc
            except OSError as exc:
                if exc.errno == errno.EEXIST:
                    # NLM_F_REPLACE would take over whichever route has this prefix and
                    # metric, whatever its protocol; EXCL makes the kernel refuse instead.
                    raise DataplaneError(
                        op,
                        "a route of another owner has this prefix and metric; not taking it over",
                        exc.errno,
                    ) from exc
                raise kernel_error(op, exc) from exc
            log.info("route.%s table=%d prefix=%s via=%s", verb, self.table, route.prefix, _hops_text(route))
            changes.append(f"route {verb} {route.prefix}{self._table_text()} via {_hops_change(route)}")
        for route in plan.delete:
            op = f"delete route {route.prefix} table {self.table}"
            family = AF_INET6 if ":" in route.prefix else AF_INET
            try:
                # The protocol in the request makes the kernel match only our route.
                await sock.request(
                    RTM_DELROUTE, 0, encode_route(family, route.prefix, self.table, self.protocol, [])
                )
            except OSError as exc:
                if exc.errno == errno.ESRCH:
                    continue  # already gone
                raise kernel_error(op, exc) from exc
            log.info("route.delete table=%d prefix=%s", self.table, route.prefix)
            changes.append(f"route delete {route.prefix}{self._table_text()}")
        return tuple(changes)

    def _table_text(self) -> str:
        """Nothing for main; pin tables (0x504f....) read better in hex, as their marks."""
        if self.table == 254:
            return ""
        return f" table {self.table:#x}" if self.table > 0xFFFF else f" table {self.table}"

    async def diagnostics(self) -> RouteDiagnostics:
        policies = []
        warnings = []
        for family in ("ipv4", "ipv6"):
            value = await run_in_netns(self.netns, functools.partial(_read_int, _sysctl_path(family)))
            policies.append(HashPolicy(family, value))
            if value is not None and value != 1:
                warnings.append(
                    f"net.{family}.fib_multipath_hash_policy={value} "
                    f"({_POLICY_NAMES.get(value, '?')}): flows are not spread per 5-tuple"
                )
        return RouteDiagnostics(tuple(policies), len(await self._dump()), tuple(warnings))

    async def apply_hash_policy(self) -> tuple[str, ...]:
        """Write the configured hash policy where it differs (only if the adapter was given
        one; set() does this once by itself). A family whose sysctl is absent (IPv6 off)
        is skipped. Returns the sysctls written."""
        if self.hash_policy is None:
            return ()
        policy = self.hash_policy
        changes: list[str] = []
        for family in ("ipv4", "ipv6"):
            path = _sysctl_path(family)
            current = await run_in_netns(self.netns, functools.partial(_read_int, path))
            if current is None or current == policy:
                continue
            try:
                await run_in_netns(self.netns, functools.partial(_write_int, path, policy))
            except OSError as exc:
                raise kernel_error(f"write {path}={policy} netns={self.netns}", exc) from exc
            log.info("sysctl.set netns=%s %s=%d was=%d", self.netns, path, policy, current)
            changes.append(f"sysctl net.{family}.fib_multipath_hash_policy={policy} (was {current})")
        self._policy_applied = True
        return tuple(changes)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _write_int(path: str, value: int) -> None:
    with open(path, "w") as f:
        f.write(f"{value}\n")


def _hops_change(route: EcmpRoute, limit: int = 8) -> str:
    """Next hops for a change line: addresses, a weight only where it is not 1."""
    hops = [h.address if h.weight == 1 else f"{h.address}*{h.weight}" for h in route.nexthops[:limit]]
    more = len(route.nexthops) - limit
    return ",".join(hops) + (f",... ({len(route.nexthops)} next hops)" if more > 0 else "")


def _hops_text(route: EcmpRoute, limit: int = 4) -> str:
    hops = [f"{h.address}*{h.weight}" for h in route.nexthops[:limit]]
    more = len(route.nexthops) - limit
    return ",".join(hops) + (f",... ({len(route.nexthops)} next hops)" if more > 0 else "")
