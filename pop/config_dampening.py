"""The `dampening:` section of pop.yaml: flap dampening at the origin (pure; pop.dampening).

    dampening:
      enabled: true        # default false
      penalty: 1000        # per withdrawal caused by health
      suppress: 3000       # above it, no re-announce ...
      reuse: 750           # ... until the figure decays below this
      half_life: 300       # seconds
      max_suppress: 1800   # seconds

Part of the one loader (pop.config.load), kept apart like `drain:`.
"""

from __future__ import annotations

from typing import Any

from pop.config_reader import Reader
from pop.dampening import Policy

_KEYS = {"enabled", "penalty", "suppress", "reuse", "half_life", "max_suppress"}
MAX = 1e9


def parse(r: Reader, value: Any, path: str) -> Policy:
    data = r.mapping(value, path, _KEYS)
    default = Policy(enabled=False)
    if data is None:
        return default

    def number(key: str, high: float = MAX) -> float:
        return r.optional(data, key, path, lambda v, p: r.number(v, p, 0.0, high, low_open=True),
                          float(getattr(default, key)))

    policy = Policy(enabled=r.optional(data, "enabled", path, r.boolean, default.enabled),
                    penalty=number("penalty"), suppress=number("suppress"), reuse=number("reuse"),
                    half_life=number("half_life", 86400.0), max_suppress=number("max_suppress", 86400.0))
    if policy.reuse >= policy.suppress:
        r.error(f"{path}.reuse", f"{policy.reuse:g} must be below suppress ({policy.suppress:g}): a suppressed "
                                 "PoP must be able to come back")
    if policy.penalty > policy.suppress:
        r.error(f"{path}.penalty", f"{policy.penalty:g} is above suppress ({policy.suppress:g}): the first "
                                   "withdrawal would suppress the PoP")
    return policy
