"""The data path seen from a lab node: the client side of the "who am I" service.

Contract:

- Every node that holds an anycast address on ``lo`` runs ``lab/nodes/whoami.py`` on
  ``WHOAMI_PORT``: a connection gets the node's name at once, and again for every line it sends.
- ``ask_node(ns, address)`` opens a fresh connection from namespace ``ns`` and returns the name
  of the node that answered (a PoP, or one of its servers), or None when nobody did within
  ``timeout`` (refused, reset, silence).
- ``hold(ns, address, count)`` opens ``count`` connections and keeps them, each a flow of its
  own (the caller closes them); ``where(sock)`` says which node answers on one of them *now*,
  so a test follows open flows through a drain or a failure.
- ``wait_answer(ask, predicate)`` asks until the answer satisfies ``predicate`` and returns it
  with the ``time.monotonic()`` it came, or raises TimeoutError.

Nothing here knows the topology: ``lab.runner.Lab`` names the node's namespace and the anycast
address (``lab.ask("client1")``).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from lab.netns import Netns

WHOAMI_PORT = 8080


def _socket_in(ns: Netns, address: str) -> socket.socket:
    with ns.enter():
        # the socket belongs to the namespace it was created in, whatever thread uses it
        return socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)


def ask_node(ns: Netns, address: str, timeout: float = 1.0) -> str | None:
    """Which node answers a new TCP connection from ``ns`` to ``address``: a PoP or a server."""
    with _socket_in(ns, address) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((address, WHOAMI_PORT))
            answer = sock.recv(256).decode(errors="replace").strip()
        except OSError:
            return None
    return answer or None


def hold(ns: Netns, address: str, count: int, timeout: float = 2.0) -> list[socket.socket]:
    """``count`` connections from ``ns`` to ``address``, kept open (the caller closes them)."""
    held = []
    try:
        for _ in range(count):
            sock = _socket_in(ns, address)
            held.append(sock)
            sock.settimeout(timeout)
            sock.connect((address, WHOAMI_PORT))
            sock.recv(256)  # the greeting
    except OSError:
        for sock in held:
            sock.close()
        raise
    return held


def where(sock: socket.socket) -> str | None:
    """The node answering on a held connection now; None when nothing does (reset, silence)."""
    try:
        sock.sendall(b"?\n")
        return sock.recv(256).decode(errors="replace").strip() or None
    except OSError:
        return None


def wait_answer(ask: Callable[[float], str | None], predicate: Callable[[str | None], bool], *, timeout: float = 10.0,
                interval: float = 0.05, what: str = "anycast answer") -> tuple[str | None, float]:
    """Call ``ask(timeout)`` until its answer satisfies ``predicate``: (answer, monotonic time)."""
    deadline = time.monotonic() + timeout
    while True:
        who = ask(min(1.0, max(0.05, deadline - time.monotonic())))
        now = time.monotonic()
        if predicate(who):
            return who, now
        if now >= deadline:
            raise TimeoutError(f"{what} still {who!r} after {timeout}s")
        time.sleep(interval)
