"""The `load:` and `tails:` sections of pop.yaml (pure; pop.load, pop.tails).

    load:                  # weights from each server's prometheus-node-exporter
      enabled: true        # default false
      port: 9100           # the exporter on the server's address
      path: /metrics
      period: 5            # seconds: one scrape per period, weights change at most that often
      timeout: 1           # seconds per scrape
      steps:               # CPU percent -> percent of the configured weight (default below)
        - {cpu: 75, weight: 80}
        - {cpu: 85, weight: 50}
      smoothing: 0.5       # weight of the newest CPU reading when it falls (a rise counts at
                           # once: busy servers shed at once, calm ones come back gradually)
      margin: 5            # CPU points below a step's threshold before a server leaves it
      floor: 25            # percent of the configured weight a busy server keeps at least

    tails:                 # latency tails and failure rates per server and tier
      window: 60           # seconds
      max_samples: 600
      degraded:            # optional: lower a server's weight while it is slow or lossy
        p99_ms: 200
        failure_rate: 0.2  # 0..1
        min_samples: 20
        recover: 0.8       # back below threshold x recover to stop being degraded
        weight: 50         # percent of its weight a degraded server keeps

Part of the one loader (pop.config.load), kept apart like `dampening:`.
"""

from __future__ import annotations

from typing import Any

from pop import load, tails
from pop.config_reader import Reader, join

_LOAD_KEYS = {"enabled", "port", "path", "period", "timeout", "steps", "smoothing", "margin", "floor"}
_STEP_KEYS = {"cpu", "weight"}
_TAILS_KEYS = {"window", "max_samples", "degraded"}
_DEGRADED_KEYS = {"p99_ms", "failure_rate", "min_samples", "recover", "weight"}


def parse_load(r: Reader, value: Any, path: str) -> load.Policy:
    data = r.mapping(value, path, _LOAD_KEYS)
    default = load.Policy()
    if not data:
        return default
    percent = _percent(r)
    url_path = r.optional(data, "path", path, r.string, default.path)
    if not url_path.startswith("/") or any(not "!" <= c <= "~" for c in url_path):
        r.error(join(path, "path"), f"{url_path!r} must start with '/' and hold printable characters only")
    steps = r.optional(data, "steps", path, lambda v, p: _steps(r, v, p), default.steps)
    return load.Policy(
        enabled=r.optional(data, "enabled", path, r.boolean, default.enabled),
        port=r.optional(data, "port", path, lambda v, p: r.integer(v, p, 1, 65535), default.port),
        path=url_path,
        period=r.optional(data, "period", path, lambda v, p: r.number(v, p, 0.5, 3600.0), default.period),
        timeout=r.optional(data, "timeout", path, lambda v, p: r.number(v, p, 0.0, 60.0, low_open=True),
                           default.timeout),
        steps=steps,
        smoothing=r.optional(data, "smoothing", path, lambda v, p: r.number(v, p, 0.0, 1.0, low_open=True),
                             default.smoothing),
        margin=r.optional(data, "margin", path, lambda v, p: percent(v, p, 0.0, 50.0), default.margin),
        floor=r.optional(data, "floor", path, lambda v, p: percent(v, p, 1.0, 100.0), default.floor),
    )


def _percent(r: Reader) -> Any:
    def parse(value: Any, path: str, low: float, high: float) -> float | None:
        number = r.number(value, path, low, high)
        return None if number is None else number / 100

    return parse


def _steps(r: Reader, value: Any, path: str) -> tuple[tuple[float, float], ...] | None:
    items = r.sequence(value, path)
    if items is None:
        return None
    percent = _percent(r)
    steps: list[tuple[float, float]] = []
    for index, item in enumerate(items):
        where = join(path, index)
        data = r.mapping(item, where, _STEP_KEYS)
        if data is None:
            continue
        cpu = r.need(data, "cpu", where, lambda v, p: percent(v, p, 1.0, 100.0))
        weight = r.need(data, "weight", where, lambda v, p: percent(v, p, 1.0, 100.0))
        if cpu is None or weight is None:
            continue
        if steps and cpu <= steps[-1][0]:
            r.error(join(where, "cpu"), f"{cpu * 100:g} must be above the previous step's {steps[-1][0] * 100:g}: "
                                        "steps go up in CPU")
        elif steps and weight > steps[-1][1]:
            r.error(join(where, "weight"), f"{weight * 100:g} is above the previous step's {steps[-1][1] * 100:g}: "
                                           "a busier server cannot get more weight")
        steps.append((cpu, weight))
    return tuple(steps)


def parse_tails(r: Reader, value: Any, path: str) -> tails.Policy:
    data = r.mapping(value, path, _TAILS_KEYS)
    default = tails.Policy()
    if not data:
        return default
    window = r.optional(data, "window", path, lambda v, p: r.number(v, p, 1.0, 3600.0), default.window)
    samples = r.optional(data, "max_samples", path, lambda v, p: r.integer(v, p, 10, 100_000), default.max_samples)
    where = join(path, "degraded")
    marks = r.mapping(data.get("degraded"), where, _DEGRADED_KEYS)
    if not marks:
        return tails.Policy(window=window, max_samples=samples)
    p99 = r.optional(marks, "p99_ms", where, lambda v, p: r.number(v, p, 0.0, 60_000.0, low_open=True), None)
    rate = r.optional(marks, "failure_rate", where, lambda v, p: r.number(v, p, 0.0, 1.0, low_open=True), None)
    if p99 is None and rate is None:
        r.error(where, "names no threshold: set p99_ms, failure_rate or both")
    minimum = r.optional(marks, "min_samples", where, lambda v, p: r.integer(v, p, 1, samples), default.min_samples)
    return tails.Policy(
        window=window, max_samples=samples, p99=None if p99 is None else p99 / 1000, failure_rate=rate,
        min_samples=minimum,
        recover=r.optional(marks, "recover", where, lambda v, p: r.number(v, p, 0.0, 1.0, low_open=True),
                           default.recover),
        weight_factor=r.optional(marks, "weight", where,
                                 lambda v, p: None if (n := r.number(v, p, 1.0, 100.0)) is None else n / 100,
                                 default.weight_factor),
    )
