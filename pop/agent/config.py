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

__all__ = ["AgentConfig", "ConfigError", "PopTarget", "Target", "WireGuardProbe", "load"]

_TOP = {"name", "listen", "port", "key_file", "probe_key_file", "interval", "timeout", "rise", "fall",
        "identity_port", "anycast", "pops"}


@dataclass(frozen=True, slots=True)
class WireGuardProbe:
    """A VPN server reachable through the PoP's beacon, and its WireGuard public key."""

    public_key: bytes
    port: int = 51820


@dataclass(frozen=True, slots=True)
class Target:
    """One address of a PoP that the agent probes: reached through the PoP's beacon prefix."""

    address: str
    tcp_port: int
    wireguard: WireGuardProbe | None = None
    name: str = ""  # "" in the one-target form, whose checks are plainly `tcp` and `wireguard`

    def check_name(self, check: str) -> str:
        """The check's name in the report: `tcp`, or `vpn11.tcp` for a named target."""
        return f"{self.name}.{check}" if self.name else check


@dataclass(frozen=True, slots=True)
class PopTarget:
    """A PoP and the addresses probed in it; it is reachable while any one of them fully is."""

    name: str
    targets: tuple[Target, ...]


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
            for position, target in enumerate(pop.targets):
                if target.wireguard is not None:
                    where = f"pops[{index}]" + (f".targets[{position}]" if target.name else "")
                    r.error(f"{where}.wireguard", "needs probe_key_file (the agent's WireGuard private key)")
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


MAX_TARGETS = 8  # two checks each: within the MAX_CHECKS a PoP accepts in a report (pop.external)


def _pops(r: Reader, value: Any, path: str) -> list[PopTarget]:
    pops: list[PopTarget] = []
    names: dict[str, int] = {}
    items = r.sequence(value, path)
    if items == []:
        r.error(path, "at least one PoP is required")
    for index, item in enumerate(items or []):
        item_path = join(path, index)
        data = r.mapping(item, item_path, {"name", "address", "tcp_port", "wireguard", "targets"})
        if data is None:
            continue
        name = r.need(data, "name", item_path, r.name)
        if "targets" in data:
            if extra := sorted({"address", "tcp_port", "wireguard"} & set(data)):
                r.error(item_path, f"either targets or {', '.join(extra)}, not both")
            targets = _targets(r, data["targets"], join(item_path, "targets"))
        else:
            target = _target(r, data, item_path, named=False)
            targets = [target] if target is not None else []
        if name is not None and name in names:
            r.error(join(item_path, "name"), f"PoP name {name!r} is used twice (also {path}[{names[name]}])")
            continue
        if name is None or not targets:
            continue
        names[name] = index
        pops.append(PopTarget(name, tuple(targets)))
    return pops


def _targets(r: Reader, value: Any, path: str) -> list[Target]:
    items = r.sequence(value, path) or []
    if not 1 <= len(items) <= MAX_TARGETS:
        r.error(path, f"has {len(items)} targets; between 1 and {MAX_TARGETS}")
    targets: list[Target] = []
    for index, item in enumerate(items[:MAX_TARGETS]):
        item_path = join(path, index)
        data = r.mapping(item, item_path, {"name", "address", "tcp_port", "wireguard"})
        target = _target(r, data, item_path, named=True) if data is not None else None
        if target is None:
            continue
        if any(t.name == target.name for t in targets):
            r.error(join(item_path, "name"), f"target name {target.name!r} is used twice")
            continue
        targets.append(target)
    return targets


def _target(r: Reader, data: dict[str, Any], path: str, *, named: bool) -> Target | None:
    name = r.need(data, "name", path, r.name) if named else ""
    address = r.need(data, "address", path, r.address)
    tcp_port = r.need(data, "tcp_port", path, lambda v, p: r.integer(v, p, 1, U16))
    wireguard = r.optional(data, "wireguard", path, lambda v, p: _wireguard(r, v, p), None)
    if name is None or address is None or tcp_port is None:
        return None
    return Target(address, tcp_port, wireguard, name)


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
