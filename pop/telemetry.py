"""The servers' own telemetry, read from their prometheus-node-exporter. Pure.

`parse(text)` reads what the load signal needs from one scrape (Prometheus text format):
the CPU seconds per mode summed over the CPUs (`node_cpu_seconds_total`) and, where the
server exports them, its WireGuard peers (`wireguard_peers`, or the number of
`wireguard_latest_handshake_seconds` series) and handshakes. `busy(previous, current)` is the
CPU utilisation between two scrapes (0..1: every mode but idle and iowait, over all modes;
a counter that went back, a rebooted server, gives None). `Reading` keeps the previous
scrape and the smoothed utilisation per server: a rise is taken at once (a busy server sheds
new clients within one period), a fall is smoothed exponentially (`alpha` on the newest
reading), so a server's weight comes back gradually and does not see-saw.

The I/O (one HTTP GET per server and period, bounded in time and size) is
pop/adapters/telemetry.py; the weights are pop/load.py's step table.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

IDLE_MODES = frozenset({"idle", "iowait"})
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, slots=True)
class Scrape:
    """What one exporter answered."""

    at: float  # our monotonic clock when it answered
    cpu: Mapping[str, float]  # seconds per mode, summed over the CPUs
    cpus: int
    wireguard_peers: int | None = None
    wireguard_handshakes: float | None = None  # sum of the peers' latest handshake times (changes = handshakes)


class ParseError(ValueError):
    pass


def parse(text: str, at: float) -> Scrape:
    cpu: dict[str, float] = {}
    cpus: set[str] = set()
    peers: int | None = None
    handshakes: list[float] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, raw = match.groups()
        if name not in ("node_cpu_seconds_total", "wireguard_peers", "wireguard_latest_handshake_seconds"):
            continue
        try:
            value = float(raw)
        except ValueError:
            raise ParseError(f"{name}: {raw!r} is not a number") from None
        if not math.isfinite(value):
            continue
        found = dict(_LABEL.findall(labels or ""))
        if name == "node_cpu_seconds_total":
            mode = found.get("mode", "")
            cpu[mode] = cpu.get(mode, 0.0) + value
            cpus.add(found.get("cpu", ""))
        elif name == "wireguard_peers":
            peers = (peers or 0) + int(value)
        else:
            handshakes.append(value)
    if not cpu:
        raise ParseError("no node_cpu_seconds_total: is the exporter's cpu collector on?")
    if peers is None and handshakes:
        peers = len(handshakes)
    return Scrape(at, cpu, len(cpus), peers, sum(handshakes) if handshakes else None)


def busy(previous: Scrape, current: Scrape) -> float | None:
    """CPU utilisation (0..1) between two scrapes; None when the counters went back."""
    deltas = {mode: current.cpu.get(mode, 0.0) - previous.cpu.get(mode, 0.0) for mode in current.cpu}
    total = sum(deltas.values())
    if total <= 0 or any(d < 0 for d in deltas.values()):
        return None
    idle = sum(d for mode, d in deltas.items() if mode in IDLE_MODES)
    return min(1.0, max(0.0, 1.0 - idle / total))


@dataclass(frozen=True, slots=True)
class Reading:
    """One server's load as the signal last saw it."""

    scrape: Scrape | None = None
    cpu: float | None = None  # smoothed utilisation; None until two scrapes were compared
    raw: float | None = None  # the last interval's utilisation, unsmoothed
    error: str = ""  # why the last scrape failed ("" when it answered)


def fold(reading: Reading, scrape: Scrape | None, error: str, alpha: float) -> Reading:
    """The next reading after one scrape (``scrape`` None: it failed with ``error``).

    A failed scrape forgets the CPU: the load signal is fail-open, the server goes back to its
    configured weight until its exporter answers twice again."""
    if scrape is None:
        return Reading(None, None, None, error)
    raw = busy(reading.scrape, scrape) if reading.scrape is not None else None
    if raw is None:
        return Reading(scrape, reading.cpu if reading.scrape is not None else None, None)
    # busier: taken at once, so a server sheds new clients within the period; calmer: believed
    # gradually, so its weight does not see-saw
    cpu = raw if reading.cpu is None or raw >= reading.cpu else reading.cpu + alpha * (raw - reading.cpu)
    return Reading(scrape, cpu, raw)
