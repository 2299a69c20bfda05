"""The `fleet:` section of pop.yaml: how this PoP recognises the others, and the fleet guard
(pure; pop.fleet).

    fleet:
      id: 1             # this PoP's number, unique in the fleet (1..4294967295)
      tag: 64496        # the fleet's ASN: its large communities are TAG:1:ID and TAG:2:ID
      min_pops: 2       # PoPs that keep announcing each prefix; 0 (default) turns the guard off
      pace: 10          # seconds: a leaving PoP stays visible this long, and waits this long
                        # after another PoP leaves
      prepend: 3        # AS-path prepends while the guard holds the PoP (with 65535:0)

Part of the one loader (pop.config.load), kept apart like `dampening:`.
"""

from __future__ import annotations

from typing import Any

from pop.config_reader import Reader
from pop.fleet import Policy

_KEYS = {"id", "tag", "min_pops", "pace", "prepend"}
U32 = 2**32 - 1
DEFAULT = Policy()


def parse(r: Reader, value: Any, path: str) -> Policy:
    if value is None:
        return Policy()
    data = r.mapping(value, path, _KEYS)
    if data is None:
        return Policy()
    pop_id = r.need(data, "id", path, lambda v, p: r.integer(v, p, 1, U32))
    tag = r.need(data, "tag", path, lambda v, p: r.integer(v, p, 1, U32))
    min_pops = r.optional(data, "min_pops", path, lambda v, p: r.integer(v, p, 0, 1000), 0)
    pace = r.optional(data, "pace", path, lambda v, p: r.number(v, p, 0.0, 3600.0), DEFAULT.pace)
    prepend = r.optional(data, "prepend", path, lambda v, p: r.integer(v, p, 0, 10), DEFAULT.prepend)
    if pop_id is None or tag is None:
        return Policy()
    return Policy(id=pop_id, tag=tag, min_pops=min_pops, pace=pace, prepend=prepend)
