"""What an engine leaves for its successor: the routes ExaBGP holds for it. Pure.

When the engine dies (a crash, the watchdog), ExaBGP keeps announcing what it was told and
starts a new engine. Without knowing what is announced, the new engine would have to
withdraw first, and every crash would pull a healthy PoP out of the routers. So after every
successful BGP pass the engine writes ``announced.json`` in the PoP's runtime directory:

    {"version": 1, "exabgp_pid": 4242, "announcements": [{"prefix": "192.0.2.1/32", ...}]}

A new engine adopts it when its parent is the same ExaBGP process (``exabgp_pid``). A
restarted ExaBGP holds nothing, and its engine starts from a clean slate, except after a
planned restart (SIGUSR2 to `pop run`, with BGP graceful restart): `pop run` stopped ExaBGP
without a NOTIFICATION, so the routers keep its routes as stale for the restart time, and
stamped the file ``"planned_at": <unix time>`` (``mark_planned``). The next engine adopts a
planned handover younger than the restart time, announces it again (its ExaBGP is new) and
sends End-of-RIB, so that the routers refresh their stale routes instead of dropping them.
``parse`` raises ``HandoverError`` naming what is wrong; a broken file is ignored (withdraw
first, as before).
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from pop.desired import Announcement

VERSION = 1
FILE_NAME = "announced.json"


class HandoverError(ValueError):
    pass


def to_dict(announcements: tuple[Announcement, ...], exabgp_pid: int) -> dict[str, Any]:
    return {"version": VERSION, "exabgp_pid": exabgp_pid,
            "announcements": [asdict(a) for a in sorted(announcements, key=lambda a: a.prefix)]}


def mark_planned(data: Any, exabgp_pid: int, now: float) -> dict[str, Any]:
    """The handover of ExaBGP ``exabgp_pid`` (just stopped on purpose), stamped planned at ``now``."""
    _check(data)
    if data["exabgp_pid"] != exabgp_pid:
        raise HandoverError(f"exabgp_pid: {data['exabgp_pid']} is not the ExaBGP that stopped ({exabgp_pid})")
    return {**data, "planned_at": now}


def parse(data: Any, exabgp_pid: int, next_hops: dict[str, str], *, now: float = 0.0,
          restart_time: float = 0.0) -> tuple[tuple[Announcement, ...], bool]:
    """The announcements to adopt, and whether they come from a planned restart (a new ExaBGP
    that must announce them again); () when the file belongs to another ExaBGP process and is
    not a planned handover at most ``restart_time`` seconds old at ``now``.

    ``next_hops``: the configured prefixes and their next hops. Only prefixes still
    configured with the same next hop are adopted; the others are withdrawn like at any start.
    """
    _check(data)
    # a planned handover is judged by its age alone: the pid of the stopped ExaBGP may be reused
    planned_at = data.get("planned_at")
    planned = planned_at is not None
    if planned:
        if isinstance(planned_at, bool) or not isinstance(planned_at, int | float):
            raise HandoverError("planned_at: must be a time in seconds")
        if not 0 <= now - planned_at <= restart_time:
            return (), False  # the routers have dropped the stale routes by now (or the clock jumped)
    elif data["exabgp_pid"] != exabgp_pid:
        return (), False
    raw = data.get("announcements")
    if not isinstance(raw, list):
        raise HandoverError("announcements: must be a list")
    result = []
    for index, item in enumerate(raw):
        announcement = _announcement(item, f"announcements[{index}]")
        if next_hops.get(announcement.prefix) == announcement.next_hop:
            result.append(announcement)
    return tuple(result), planned


def _check(data: Any) -> None:
    if not isinstance(data, dict):
        raise HandoverError(f"must be a JSON object, not {type(data).__name__}")
    if data.get("version") != VERSION:
        raise HandoverError(f"version: {data.get('version')!r} is not {VERSION}")
    pid = data.get("exabgp_pid")
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise HandoverError("exabgp_pid: must be a process id")


def _announcement(item: Any, path: str) -> Announcement:
    names = {f.name for f in fields(Announcement)}
    if not isinstance(item, dict) or set(item) != names:
        raise HandoverError(f"{path}: must be an object with {', '.join(sorted(names))}")

    def text(key: str) -> str:
        if not isinstance(item[key], str):
            raise HandoverError(f"{path}.{key}: must be text")
        return str(item[key])

    def number(key: str, optional: bool) -> Any:
        value = item[key]
        if (value is None and optional) or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise HandoverError(f"{path}.{key}: must be a whole number")

    def texts(key: str) -> tuple[str, ...]:
        value = item[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise HandoverError(f"{path}.{key}: must be a list of text")
        return tuple(value)

    return Announcement(prefix=text("prefix"), next_hop=text("next_hop"), med=number("med", True),
                        local_pref=number("local_pref", True), communities=texts("communities"),
                        large_communities=texts("large_communities"),
                        as_path_prepend=number("as_path_prepend", False))
