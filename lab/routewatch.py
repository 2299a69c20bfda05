"""Timestamped kernel route changes for one prefix, read from rtnetlink inside a namespace.

``RouteWatcher(ns, prefix)`` subscribes to the IPv4 and IPv6 route multicast groups from a
netlink socket opened inside ``ns``, reads the current route once, and then records every
change of that exact prefix (in one table, main by default) as a ``RouteEvent``:

- ``timestamp``: ``time.monotonic()`` taken in the watcher thread right after ``recv()``
  returned the message. Every timestamp in the lab is ``time.monotonic()``, so a test takes
  ``t0 = time.monotonic()`` when it injects a fault and subtracts. Netlink carries no kernel
  timestamp; the error is the wake-up latency of the watcher thread (well under a ms when the
  machine is not saturated).
- ``kind``: ``add`` (the prefix had no route), ``change`` (a route was replaced, e.g. FRR
  swapping the ECMP set with one RTM_NEWROUTE), ``del`` (a route or some of its next hops went).
- ``nexthops``: the next hops the kernel forwards with *after* the event: gateway addresses,
  or ``dev:<ifindex>`` for a next hop without gateway; empty when the route is gone.

When several routes for the prefix differ only in metric, the one with the lowest metric is
the route that forwards and so the one reported. FRR installs ECMP through kernel nexthop
objects; the route messages still carry the expanded next hops as long as the namespace's
``net.ipv4.nexthop_compat_mode`` is 1 (the kernel default), which this module relies on.

``read_nexthops(ns, prefix)`` is the one-shot form (a dump of the table). Either takes
``ns=None`` for the caller's own namespace (e.g. the root namespace of a microVM).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR
from pyroute2.netlink.rtnl import RTM_DELROUTE, RTM_GETROUTE, RTM_NEWROUTE
from pyroute2.netlink.rtnl.marshal import MarshalRtnl
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from lab.netns import Netns

MAIN_TABLE = 254
_RTMGRP_IPV4_ROUTE = 0x40
_RTMGRP_IPV6_ROUTE = 0x400
_RTN_UNICAST = 1
_RTM_F_CLONED = 0x200
_NLM_F_APPEND = 0x800
_RCVBUF = 4 << 20

EventKind = Literal["add", "del", "change"]
Nexthops = frozenset[str]


@dataclass(frozen=True)
class RouteEvent:
    timestamp: float  # time.monotonic() when the watcher read the message
    kind: EventKind
    prefix: str
    nexthops: Nexthops  # what the kernel forwards with after this event


@dataclass(frozen=True)
class _Route:
    """One decoded route message for the watched prefix."""

    kind: int  # RTM_NEWROUTE or RTM_DELROUTE
    append: bool
    metric: int
    nexthops: Nexthops


def _nexthops_of(attrs: Any, oif: int | None) -> set[str]:
    gateway = attrs.get_attr("RTA_GATEWAY")
    via = attrs.get_attr("RTA_VIA")
    if gateway:
        return {str(gateway)}
    if via:
        return {str(via["addr"])}
    return {f"dev:{oif}"} if oif else set()


def _decode(msg: Any, network: ipaddress.IPv4Network | ipaddress.IPv6Network,
            table: int) -> _Route | None:
    """The route in ``msg`` if it is a unicast route for exactly ``network`` in ``table``."""
    kind = msg["header"]["type"]
    if kind not in (RTM_NEWROUTE, RTM_DELROUTE):
        return None
    family = socket.AF_INET if network.version == 4 else socket.AF_INET6
    if msg["family"] != family or msg["dst_len"] != network.prefixlen:
        return None
    if msg["type"] != _RTN_UNICAST or msg["flags"] & _RTM_F_CLONED:
        return None
    if (msg.get_attr("RTA_TABLE") or msg["table"]) != table:
        return None
    dst = msg.get_attr("RTA_DST") or ("0.0.0.0" if network.version == 4 else "::")
    if ipaddress.ip_address(dst) != network.network_address:
        return None
    multipath = msg.get_attr("RTA_MULTIPATH")
    hops: set[str] = set()
    if multipath:
        for hop in multipath:
            hops |= _nexthops_of(hop, hop["oif"])
    else:
        hops = _nexthops_of(msg, msg.get_attr("RTA_OIF"))
    return _Route(kind=kind, append=bool(msg["header"]["flags"] & _NLM_F_APPEND),
                  metric=msg.get_attr("RTA_PRIORITY") or 0, nexthops=frozenset(hops))


def _open_socket(groups: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    try:
        # Bursts (a full table from FRR) must not overrun the queue: ENOBUFS loses events.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        sock.bind((0, groups))
    except BaseException:
        sock.close()
        raise
    return sock


def _request_dump(sock: socket.socket, family: int, seq: int) -> None:
    msg = rtmsg()
    msg["family"] = family
    msg["header"]["type"] = RTM_GETROUTE
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
    msg["header"]["sequence_number"] = seq
    msg.encode()
    sock.send(msg.data)


def _recv(sock: socket.socket) -> Iterator[Any]:
    yield from MarshalRtnl().parse(sock.recv(1 << 20))


def _dump(sock: socket.socket, family: int, seq: int) -> Iterator[Any]:
    """Messages of one table dump on a socket without multicast groups."""
    _request_dump(sock, family, seq)
    while True:
        for msg in _recv(sock):
            mtype = msg["header"]["type"]
            if mtype == NLMSG_DONE:
                return
            if mtype == NLMSG_ERROR and msg["error"]:
                raise OSError(-msg["error"], f"route dump: {os.strerror(-msg['error'])}")
            yield msg


def _in_namespace(ns: Netns | None) -> contextlib.AbstractContextManager[None]:
    return ns.enter() if ns is not None else contextlib.nullcontext()


class _RouteState:
    """Next hops of the watched prefix, per metric; the lowest metric forwards."""

    def __init__(self) -> None:
        self._by_metric: dict[int, Nexthops] = {}

    @property
    def nexthops(self) -> Nexthops:
        return self._by_metric[min(self._by_metric)] if self._by_metric else frozenset()

    def apply(self, route: _Route) -> EventKind:
        before = self._by_metric.get(route.metric, frozenset())
        if route.kind == RTM_NEWROUTE:
            after = before | route.nexthops if route.append else route.nexthops
            self._by_metric[route.metric] = after
            return "change" if before else "add"
        # IPv6 may delete single next hops of a multipath route; IPv4 deletes the route.
        remaining = before - route.nexthops if route.nexthops < before else frozenset()
        if remaining:
            self._by_metric[route.metric] = remaining
        else:
            self._by_metric.pop(route.metric, None)
        return "del"


def read_nexthops(ns: Netns | None, prefix: str, table: int = MAIN_TABLE) -> Nexthops:
    """The next hops of the kernel route for exactly ``prefix`` in ``ns``; empty if none."""
    network = ipaddress.ip_network(prefix)
    family = socket.AF_INET if network.version == 4 else socket.AF_INET6
    state = _RouteState()
    with _in_namespace(ns):
        sock = _open_socket(0)
    with sock:
        for msg in _dump(sock, family, seq=1):
            route = _decode(msg, network, table)
            if route is not None:
                state.apply(route)
    return state.nexthops


class RouteWatcher:
    """Records every change of one prefix's kernel route, with monotonic timestamps.

    Use as a context manager (or ``start()``/``stop()``)::

        with RouteWatcher(ns, "198.51.100.1/32") as watch:
            t0 = time.monotonic()
            stop_the_last_server()
            gone_at = watch.wait_for(lambda hops: not hops, timeout=10, since=t0)
            print(f"converged in {gone_at - t0:.3f}s", watch.events)
    """

    def __init__(self, ns: Netns | None, prefix: str, table: int = MAIN_TABLE) -> None:
        self.ns = ns
        self.network = ipaddress.ip_network(prefix)
        self.prefix = str(self.network)
        self.table = table
        self.started_at: float | None = None
        self.initial: Nexthops = frozenset()
        self._state = _RouteState()
        self._events: list[RouteEvent] = []
        self._cond = threading.Condition()
        self._sock: socket.socket | None = None
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> RouteWatcher:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def events(self) -> tuple[RouteEvent, ...]:
        with self._cond:
            return tuple(self._events)

    @property
    def nexthops(self) -> Nexthops:
        """The next hops right now (as of the last message read)."""
        with self._cond:
            return self._state.nexthops

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("RouteWatcher already started")
        groups = _RTMGRP_IPV4_ROUTE if self.network.version == 4 else _RTMGRP_IPV6_ROUTE
        with _in_namespace(self.ns):
            self._sock = _open_socket(groups)
        family = socket.AF_INET if self.network.version == 4 else socket.AF_INET6
        # Subscribed first, then dumped on the same socket: the queue then holds every change
        # either before the snapshot or after it, in order, and none is lost in between.
        with self._cond:
            for msg in self._read_dump(family):
                route = _decode(msg, self.network, self.table)
                if route is not None:
                    self._state.apply(route)
            self.initial = self._state.nexthops
            self.started_at = time.monotonic()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._loop, name=f"routewatch {self.prefix}", daemon=True)
        self._thread.start()

    def _read_dump(self, family: int) -> Iterator[Any]:
        assert self._sock is not None
        seq = 1
        _request_dump(self._sock, family, seq)
        pending_events: list[Any] = []
        while True:
            for msg in _recv(self._sock):
                mtype = msg["header"]["type"]
                if msg["header"]["sequence_number"] != seq:
                    pending_events.append(msg)
                    continue
                if mtype == NLMSG_DONE:
                    # Events that arrived while dumping are newer than the part of the dump
                    # before them; replaying them afterwards keeps the final state right.
                    yield from pending_events
                    return
                if mtype == NLMSG_ERROR and msg["error"]:
                    raise OSError(-msg["error"], f"route dump: {os.strerror(-msg['error'])}")
                yield msg

    def stop(self) -> None:
        """Stop reading; ``events`` keeps what was recorded. Idempotent."""
        if self._thread is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
            self._thread.join(5)
            self._thread = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _loop(self) -> None:
        assert self._sock is not None
        sock = self._sock
        try:
            while True:
                readable, _, _ = select.select([sock.fileno(), self._wake_r], [], [])
                if self._wake_r in readable:
                    return
                try:
                    data = sock.recv(1 << 20)
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    self._resync(time.monotonic())
                    continue
                now = time.monotonic()
                self._record(now, MarshalRtnl().parse(data))
        except BaseException as exc:  # surfaced by wait_for(), never lost in the thread
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _record(self, now: float, messages: Iterable[Any]) -> None:
        with self._cond:
            for msg in messages:
                route = _decode(msg, self.network, self.table)
                if route is None:
                    continue
                kind = self._state.apply(route)
                self._events.append(RouteEvent(now, kind, self.prefix, self._state.nexthops))
            self._cond.notify_all()

    def _resync(self, now: float) -> None:
        # The socket overran and dropped events: re-read the truth and record the difference.
        hops = read_nexthops(self.ns, self.prefix, self.table)
        with self._cond:
            before = self._state.nexthops
            if hops != before:
                self._state = _RouteState()
                if hops:
                    self._state.apply(_Route(RTM_NEWROUTE, False, 0, hops))
                kind: EventKind = "del" if not hops else ("add" if not before else "change")
                self._events.append(RouteEvent(now, kind, self.prefix, hops))
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[Nexthops], bool], timeout: float = 10.0,
                 since: float | None = None) -> float:
        """The monotonic time at which the next hops first satisfied ``predicate``.

        Only the state at ``since`` and the events after it count; if the state at ``since``
        already satisfies the predicate, ``since`` is returned. Without ``since``: if the
        current state satisfies it, the time that state began (its event, or the watcher's
        start); otherwise the first matching event from now on. Pass ``since=t0`` (taken
        before injecting a change) to time that change: an earlier, unrelated state then
        cannot satisfy the wait. Raises TimeoutError listing the events seen.
        """
        if self.started_at is None:
            raise RuntimeError("RouteWatcher not started")
        deadline = time.monotonic() + timeout
        with self._cond:
            if since is None:
                since = self._events[-1].timestamp if self._events else self.started_at
            # Before the watcher started nothing was observed: the initial dump is the state then.
            since = max(since, self.started_at)
            while True:
                at = self._first_match(predicate, since)
                if at is not None:
                    return at
                if self._error is not None:
                    raise RuntimeError(f"route watcher for {self.prefix} failed") from self._error
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"route {self.prefix}: condition not met within {timeout}s; "
                        f"next hops now {sorted(self._state.nexthops)}, events {self._events}")
                self._cond.wait(remaining)

    def _first_match(self, predicate: Callable[[Nexthops], bool], since: float) -> float | None:
        state = self.initial
        later: list[RouteEvent] = []
        for event in self._events:
            if event.timestamp <= since:
                state = event.nexthops
            else:
                later.append(event)
        if predicate(state):
            return since
        return next((event.timestamp for event in later if predicate(event.nexthops)), None)
