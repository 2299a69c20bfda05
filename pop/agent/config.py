"""agent.yaml: YAML text in, a frozen `AgentConfig` out.

`load(text, source)` is pure: it opens no file (the key files are read by the daemon and by
`pop probe-agent` at start), resolves no name and raises only `ConfigError`, carrying every
problem as `agent.yaml: pops[1].address: what is wrong`, like pop.config. docs/probe-agent.md
explains each key and its default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pop import wgkeys
from pop.config_reader import U16, ConfigError, Reader, join, parse_yaml

__all__ = ["AgentConfig", "ConfigError", "PopTarget", "WireGuardProbe", "load"]

_TOP = {"name", "listen", "port", "key_file", "probe_key_file", "interval", "timeout", "rise", "fall",
        "identity_port", "anycast", "pops"}


@dataclass(frozen=True, slots=True)
class WireGuardProbe:
    """A VPN server reachable through the PoP's beacon, and its WireGuard public key."""

    public_key: bytes
    port: int = 51820


@dataclass(frozen=True, slots=True)
class PopTarget:
    name: str
    address: str  # the PoP's beacon: a unicast address that is never health-gated
    tcp_port: int
    wireguard: WireGuardProbe | None = None


@dataclass(frozen=True, slots=True)
class AgentConfig:
    name: str
    key_file: str
    pops: tuple[PopTarget, ...]
    listen: str = "0.0.0.0"
    port: int = 9190
    probe_key_file: str | None = None
    interval: float = 0.5
    timeout: float = 0.5
    rise: int = 2
    fall: int = 3
    identity_port: int = 9191
    anycast: tuple[str, ...] = ()


_DEFAULTS = AgentConfig(name="", key_file="", pops=())


def load(text: str | bytes, source: str = "agent.yaml") -> AgentConfig:
    """Parse an agent's YAML configuration. Raises ConfigError listing every problem."""
    document = parse_yaml(text, source)
    r = Reader(source)
    if document is None:
        raise ConfigError([f"{source}: (top level): the file is empty"])
    top = r.mapping(document, "", _TOP)
    if top is None:
        raise ConfigError(r.problems)
    d = _DEFAULTS
    name = r.need(top, "name", "", r.name)
    key_file = r.need(top, "key_file", "", r.string)
    probe_key_file = r.optional(top, "probe_key_file", "", r.string, None)
    interval = r.optional(top, "interval", "", lambda v, p: r.number(v, p, 0.0, 3600.0, low_open=True), d.interval)
    timeout = r.optional(top, "timeout", "", lambda v, p: r.number(v, p, 0.0, 60.0, low_open=True), d.timeout)
    pops = r.need(top, "pops", "", lambda v, p: _pops(r, v, p)) or []
    if probe_key_file is None:
        for index, pop in enumerate(pops):
            if pop.wireguard is not None:
                r.error(f"pops[{index}].wireguard", "needs probe_key_file (the agent's WireGuard private key)")
    config = AgentConfig(
        name=name or "",
        key_file=key_file or "",
        pops=tuple(pops),
        listen=r.optional(top, "listen", "", r.address, d.listen),
        port=r.optional(top, "port", "", lambda v, p: r.integer(v, p, 0, U16), d.port),
        probe_key_file=probe_key_file,
        interval=interval,
        timeout=timeout,
        rise=r.optional(top, "rise", "", lambda v, p: r.integer(v, p, 1, 100), d.rise),
        fall=r.optional(top, "fall", "", lambda v, p: r.integer(v, p, 1, 100), d.fall),
        identity_port=r.optional(top, "identity_port", "", lambda v, p: r.integer(v, p, 1, U16), d.identity_port),
        anycast=_anycast(r, top.get("anycast"), "anycast"),
    )
    if r.problems:
        raise ConfigError(r.problems)
    return config


def _anycast(r: Reader, value: Any, path: str) -> tuple[str, ...]:
    addresses: list[str] = []
    for index, item in enumerate(r.sequence(value, path) or []):
        address = r.address(item, join(path, index))
        if address is None:
            continue
        if address in addresses:
            r.error(join(path, index), f"{address} is listed twice")
            continue
        addresses.append(address)
    return tuple(addresses)


def _pops(r: Reader, value: Any, path: str) -> list[PopTarget]:
    pops: list[PopTarget] = []
    names: dict[str, int] = {}
    items = r.sequence(value, path)
    if items == []:
        r.error(path, "at least one PoP is required")
    for index, item in enumerate(items or []):
        item_path = join(path, index)
        data = r.mapping(item, item_path, {"name", "address", "tcp_port", "wireguard"})
        if data is None:
            continue
        name = r.need(data, "name", item_path,
                      r.name)
        address = r.need(data, "address", item_path, r.address)
        tcp_port = r.need(data, "tcp_port", item_path, lambda v, p: r.integer(v, p, 1, U16))
        wireguard = r.optional(data, "wireguard", item_path, lambda v, p: _wireguard(r, v, p), None)
        if name is not None and name in names:
            r.error(join(item_path, "name"), f"PoP name {name!r} is used twice (also {path}[{names[name]}])")
            continue
        if name is None or address is None or tcp_port is None:
            continue
        names[name] = index
        pops.append(PopTarget(name, address, tcp_port, wireguard))
    return pops


def _wireguard(r: Reader, value: Any, path: str) -> WireGuardProbe | None:
    data = r.mapping(value, path, {"public_key", "port"})
    if data is None:
        return None
    text = r.need(data, "public_key", path, r.string)
    port = r.optional(data, "port", path, lambda v, p: r.integer(v, p, 1, U16), 51820)
    if text is None:
        return None
    try:
        return WireGuardProbe(wgkeys.parse_public_key(text), port)
    except ValueError as exc:
        r.error(join(path, "public_key"), str(exc))
        return None
