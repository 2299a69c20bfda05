"""Everything said to and heard from ExaBGP, as pure text transformations.

- `render_config()` / `render_env()`: the ExaBGP configuration and environment for one PoP,
  from the templates in the repository's `exabgp/` directory.
- `announce_commands()` / `withdraw_commands()`: the API lines for one announcement. This is
  the only place that builds ExaBGP commands; every value spliced in was checked for control
  characters when the configuration was loaded.
- `parse_line()`: one line ExaBGP wrote on the engine's stdin, as a typed message. Malformed
  input becomes `Unparsed`, never an exception: a message we cannot read must not stop the
  engine or change what is announced. Besides acks and the JSON encoder's messages, this
  includes End-of-RIB and the answer to `SHOW_NEIGHBORS` (a JSON array, then its ack).
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from pop.config import Config, Neighbor
from pop.config_reader import exabgp_string_problem
from pop.desired import Announcement

TEMPLATES = Path(__file__).resolve().parent.parent / "exabgp"
PROCESS = "pop-engine"


# --- configuration ------------------------------------------------------------------------


def _template(name: str) -> Template:
    path = TEMPLATES / name
    try:
        return Template(path.read_text())
    except OSError as exc:
        raise RuntimeError(f"ExaBGP template {path} is missing ({exc.strerror}); "
                           f"install pop from its source tree (pip install -e .)") from None


def render_config(config: Config, engine_argv: list[str]) -> str:
    neighbor = _template("neighbor.tmpl")
    blocks = []
    for n in config.neighbors:
        blocks.append(neighbor.substitute(
            address=n.address,
            description=n.description or f"{config.name} to AS{n.peer_as}",
            router_id=config.router_id,
            local_address_line=f"    local-address {n.local_address};\n" if n.local_address else "",
            local_as=config.asn,
            peer_as=n.peer_as,
            hold_time=n.hold_time,
            passive="true" if n.passive else "false",
            family="ipv4" if n.version == 4 else "ipv6",
            process=PROCESS,
            static=_beacons(config, n),
            graceful_restart=_graceful_restart(config),
        ))
    return _template("exabgp.conf.tmpl").substitute(
        source=_comment(config.source),
        pop_name=config.name,
        process=PROCESS,
        engine_command=_run_command(engine_argv),
        neighbors="".join(blocks),
    )


def _beacons(config: Config, neighbor: Neighbor) -> str:
    """The beacons of the neighbor's family as ExaBGP's own static routes: announced whenever
    the session is up, whatever the engine says or whether it runs (docs/decisions.md)."""
    routes = [b for b in config.external.beacons if ipaddress.ip_network(b).version == neighbor.version]
    if not routes:
        return ""
    lines = "".join(f"        route {b} next-hop self;\n" for b in routes)
    return f"\n    static {{\n{lines}    }}\n"


def _graceful_restart(config: Config) -> str:
    """The neighbor's capabilities.

    RFC 4724 with `manual-eor`: ExaBGP offers the restart time and never sends End-of-RIB by
    itself; the engine sends it (`eor_commands`) once it has decided what to keep, so that a
    router keeps the routes of a planned restart as stale until then (docs/decisions.md).

    In a fleet, ADD-PATH receive (RFC 7911): a router that sends every path it holds shows
    this PoP every other PoP announcing the same prefix, not only its best (pop.fleet); and
    ExaBGP keeps what it received (adj-rib-in), which a respawned or restarted engine reads
    back (`SHOW_ADJ_RIB_IN`): ExaBGP passes on nothing it received before the engine started.
    """
    seconds = config.exabgp.graceful_restart
    lines = ([f"        graceful-restart {seconds};\n"] if seconds else []) + \
        (["        add-path receive;\n"] if config.fleet.id else [])
    if not lines:
        return ""
    return ("    capability {\n" + "".join(lines) + "    }\n" + ("    manual-eor true;\n" if seconds else "")
            + ("    adj-rib-in true;\n" if config.fleet.id else ""))


def _comment(text: str) -> str:
    # the YAML file's path, echoed for a human: a newline would end the comment, and ExaBGP
    # unescapes and joins lines ending in a backslash before it sees the '#'
    return "".join(char if " " <= char <= "~" and char != "\\" else "?" for char in text)


def _run_command(argv: list[str]) -> str:
    """The engine's command line for ExaBGP's `run`: shlex quoting, which ExaBGP's tokeniser
    reads back as the same words, as long as no word holds a quote, backslash or non-ASCII."""
    for word in argv:
        problem = exabgp_string_problem(word)
        if problem is not None:
            raise ValueError(f"exabgp.conf: the engine command cannot name {word!r}: it {problem}")
    return shlex.join(argv)


def render_env(config: Config, user: str = "root") -> str:
    return _template("exabgp.env.tmpl").substitute(pop_name=config.name, user=user)


# --- commands -----------------------------------------------------------------------------


def _is_ebgp(config: Config, neighbor: Neighbor) -> bool:
    return neighbor.peer_as != config.asn


def _neighbors_for(config: Config, prefix: str) -> list[Neighbor]:
    version = 6 if ":" in prefix else 4
    return [n for n in config.neighbors if n.version == version]


def announce_commands(config: Config, announcement: Announcement) -> list[str]:
    """One `announce route` per neighbor of the prefix's family.

    Per neighbor because of the AS path: ExaBGP sends an explicit `as-path` verbatim, so on
    eBGP sessions our own AS must lead it (peers enforce the first AS), on iBGP it must not.
    """
    commands = []
    for neighbor in _neighbors_for(config, announcement.prefix):
        parts = [f"neighbor {neighbor.address} announce route {announcement.prefix}",
                 f"next-hop {announcement.next_hop}"]
        if announcement.med is not None:
            parts.append(f"med {announcement.med}")
        if announcement.local_pref is not None and not _is_ebgp(config, neighbor):
            parts.append(f"local-preference {announcement.local_pref}")
        if announcement.communities:
            parts.append(f"community [ {' '.join(announcement.communities)} ]")
        if announcement.large_communities:
            parts.append(f"large-community [ {' '.join(announcement.large_communities)} ]")
        if announcement.as_path_prepend:
            leading = 1 if _is_ebgp(config, neighbor) else 0
            path = " ".join([str(config.asn)] * (leading + announcement.as_path_prepend))
            parts.append(f"as-path [ {path} ]")
        commands.append(" ".join(parts))
    return commands


def eor_commands(config: Config, peer: str | None = None) -> list[str]:
    """End-of-RIB to every neighbor (or ``peer``) for its family: the router drops whatever
    stale route of a previous session we did not announce again (RFC 4724 section 4.2)."""
    return [f"neighbor {n.address} announce eor {'ipv4' if n.version == 4 else 'ipv6'} unicast"
            for n in config.neighbors if peer is None or n.address == peer]


def withdraw_commands(config: Config, prefix: str, next_hop: str = "self") -> list[str]:
    return [f"neighbor {n.address} withdraw route {prefix} next-hop {next_hop}"
            for n in _neighbors_for(config, prefix)]


# --- messages from ExaBGP -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    ok: bool  # done / error


@dataclass(frozen=True, slots=True)
class Shutdown:
    """ExaBGP is exiting."""


@dataclass(frozen=True, slots=True)
class NeighborState:
    peer: str
    state: str  # "connected", "up", "down"
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Update:
    """Routes a peer sent us: what the rest of the fleet announces."""

    peer: str
    announced: tuple[str, ...]
    withdrawn: tuple[str, ...]
    # with ADD-PATH a prefix can come as several paths: (prefix, path id, "" without ADD-PATH)
    announced_paths: tuple[tuple[str, str], ...] = ()
    withdrawn_paths: tuple[tuple[str, str], ...] = ()
    large_communities: tuple[tuple[int, int, int], ...] = ()  # of the announced paths


@dataclass(frozen=True, slots=True)
class RibEntry:
    """One path ExaBGP holds as received (its answer to `SHOW_ADJ_RIB_IN`, a text line)."""

    peer: str
    prefix: str
    path_id: str  # "" without ADD-PATH
    large_communities: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True, slots=True)
class EndOfRib:
    """The peer has sent its whole table for one family (RFC 4724 section 2).

    ExaBGP passes it as an `update` whose message is `{"eor": {"afi": ..., "safi": ...}}`.
    BIRD sends one per family on every session; FRR only when graceful restart is negotiated.
    """

    peer: str
    family: str  # "ipv4 unicast"


@dataclass(frozen=True, slots=True)
class NeighborSummary:
    peer: str
    state: str  # as in NeighborState: "up", "connected", "down"
    up_for: int  # whole seconds the session has been established; 0 unless up


@dataclass(frozen=True, slots=True)
class NeighborReport:
    """ExaBGP's answer to `SHOW_NEIGHBORS`: every session's state at the moment it answered."""

    neighbors: tuple[NeighborSummary, ...]


@dataclass(frozen=True, slots=True)
class Other:
    """A well-formed message we have no use for (keepalive, open, ...)."""

    kind: str


@dataclass(frozen=True, slots=True)
class Unparsed:
    line: str
    problem: str


Message = Ack | Shutdown | NeighborState | Update | RibEntry | EndOfRib | NeighborReport | Other | Unparsed

# ExaBGP 5 (reactor/api/command/neighbor.py) answers with one line, a JSON array with one
# object per configured neighbor, then the ack. Neighbor changes are reported only when they
# happen, so this is how an engine started while sessions are up learns their state.
SHOW_NEIGHBORS = "show neighbor json"
# ExaBGP 5 (reactor/api/command/rib.py) answers with one text line per path it holds as
# received, then the ack: "neighbor <peer> <its settings> ipv4 unicast <prefix>[ path-information
# <id>] next-hop ... large-community <one or [ several ]>". Its JSON forms drop the path id or the
# attributes. Needs `adj-rib-in true` on the neighbor.
SHOW_ADJ_RIB_IN = "show adj-rib in extensive"
_RIB_LINE = re.compile(r"neighbor (?P<peer>\S+) .*? (?:ipv4|ipv6) unicast (?P<prefix>\S+)"
                       r"(?: path-information (?P<id>\S+))?(?P<attributes>.*)")
_LARGE = re.compile(r" large-community (?:\[ (?P<several>[^\]]*) \]|(?P<one>\S+))")

_ACKS: dict[str, Ack | Shutdown] = {"done": Ack(True), "error": Ack(False), "shutdown": Shutdown()}


def parse_line(line: str) -> Message:
    text = line.strip()
    if text in _ACKS:
        return _ACKS[text]
    if text.startswith("neighbor "):
        return _rib_entry(text)
    if not text.startswith(("{", "[")):
        return Unparsed(text[:200], "neither an ack nor a JSON message")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return Unparsed(text[:200], f"bad JSON: {exc}")
    try:
        if isinstance(data, list):
            return _neighbor_report(data)
        if not isinstance(data, dict):
            return Unparsed(text[:200], "JSON message is not an object")
        return _from_json(data)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        return Unparsed(text[:200], f"unexpected JSON shape: {exc!r}")


def _from_json(data: dict[str, Any]) -> Message:
    if "answer" in data:
        answer = data["answer"]
        if answer in _ACKS:
            return _ACKS[answer]
        return Unparsed(str(answer)[:200], "unknown answer")
    kind = data.get("type")
    if kind == "notification" and data.get("notification") == "shutdown":
        return Shutdown()
    if kind == "state":
        neighbor = data["neighbor"]
        return NeighborState(peer=str(neighbor["address"]["peer"]), state=str(neighbor["state"]),
                             reason=str(neighbor.get("reason", "")))
    if kind == "update":
        neighbor = data["neighbor"]
        if "eor" in neighbor["message"]:
            eor = neighbor["message"]["eor"]
            return EndOfRib(peer=str(neighbor["address"]["peer"]), family=f"{_text(eor['afi'])} {_text(eor['safi'])}")
        update = neighbor["message"]["update"]
        announced: list[tuple[str, str]] = []
        for families in update.get("announce", {}).values():
            for nlris in families.values():
                announced.extend(_nlri_path(nlri) for nlri in nlris)
        withdrawn: list[tuple[str, str]] = []
        for nlris in update.get("withdraw", {}).values():
            withdrawn.extend(_nlri_path(nlri) for nlri in nlris)
        large = update.get("attribute", {}).get("large-community", []) if announced else []
        return Update(peer=str(neighbor["address"]["peer"]), announced=tuple(p for p, _ in announced),
                      withdrawn=tuple(p for p, _ in withdrawn), announced_paths=tuple(announced),
                      withdrawn_paths=tuple(withdrawn), large_communities=tuple(_large(c) for c in large))
    return Other(str(kind))


def _nlri_path(nlri: Any) -> tuple[str, str]:
    """(prefix, path id): ExaBGP writes an NLRI as a bare string, or an object with "nlri" and,
    under ADD-PATH, "path-information" (a dotted quad)."""
    if isinstance(nlri, dict):
        path_id = nlri.get("path-information", "")
        return str(nlri["nlri"]), _text(path_id)
    return str(nlri), ""


U32 = 2**32 - 1


def _rib_entry(text: str) -> Message:
    match = _RIB_LINE.fullmatch(text)
    if match is None:
        return Unparsed(text[:200], "a line of ExaBGP's adj-rib-in that is not a unicast path")
    large = _LARGE.search(match["attributes"])
    words = [] if large is None else (large["several"] or large["one"]).split()
    try:
        communities = tuple(_large([int(n) for n in word.split(":")]) for word in words)
    except ValueError as exc:
        return Unparsed(text[:200], f"adj-rib-in: {exc}")
    return RibEntry(match["peer"], match["prefix"], match["id"] or "", communities)


def _large(value: Any) -> tuple[int, int, int]:
    """One large community as ExaBGP's JSON writes it: [global, local1, local2]."""
    if not isinstance(value, list) or len(value) != 3 \
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= U32 for v in value):
        raise ValueError(f"large community {value!r} is not three 32-bit numbers")
    return value[0], value[1], value[2]


# ExaBGP's FSM state names (bgp/fsm.py) in the words of its neighbor-changes messages. Its own
# "state" field says "down" for a session established less than a second ago (duration 0).
_FSM_STATES = {"ESTABLISHED": "up", "OPENCONFIRM": "connected", "OPENSENT": "connected"}


def _neighbor_report(data: list[Any]) -> NeighborReport:
    neighbors = []
    for item in data:
        state = _FSM_STATES.get(_text(item["fsm"]), "down")
        up_for = item["duration"]
        if isinstance(up_for, bool) or not isinstance(up_for, int) or up_for < 0:
            raise ValueError(f"duration {up_for!r} is not a number of seconds")
        # when the session is not up, "duration" holds ExaBGP's reset - creation time instead
        neighbors.append(NeighborSummary(_text(item["peer"]["address"]), state, up_for if state == "up" else 0))
    return NeighborReport(tuple(neighbors))


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value
