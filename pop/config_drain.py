"""The `drain:` section of pop.yaml: the RFC 8326 drain ladder and the disable file (pure).

Part of the one loader (pop.config.load), kept apart like `external:`. The ladder is a list
of steps, each one kind with its dwell, walked in order and cumulative (the MED stays raised
while the AS path is prepended):

    drain:
      steps:
        - {med: 1000, dwell: 10}
        - {prepend: 3, dwell: 10}
        - {graceful_shutdown: true, dwell: 20}
        - withdraw
      disable_file: /etc/pop/disable

Every drain ends withdrawn, so the last step is `withdraw` and only the last; each kind
appears at most once.
"""

from __future__ import annotations

from typing import Any

from pop.config_model import Drain, DrainStep
from pop.config_reader import U32, Reader, join

KINDS = ("med", "prepend", "graceful_shutdown", "withdraw")
MAX_DWELL = 86400.0
MAX_PREPEND = 16


def parse(r: Reader, value: Any, path: str) -> Drain:
    data = r.mapping(value, path, {"steps", "disable_file"})
    default = Drain()
    if data is None:
        return default
    steps = default.steps
    if "steps" in data:
        steps = _steps(r, data["steps"], join(path, "steps"))
    disable_file = r.optional(data, "disable_file", path, r.absolute_path, default.disable_file)
    return Drain(steps=steps, disable_file=disable_file)


def _steps(r: Reader, value: Any, path: str) -> tuple[DrainStep, ...]:
    items = r.sequence(value, path)
    if items is None:
        return Drain().steps
    if not items:
        r.error(path, "needs at least the withdraw step (a drain ends withdrawn)")
        return Drain().steps
    steps: list[DrainStep] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        item_path = join(path, index)
        step = _step(r, item, item_path)
        if step is None:
            continue
        if step.kind in seen:
            r.error(item_path, f"{step.kind} is already {join(path, seen[step.kind])}; each kind at most once "
                               f"(steps add up)")
            continue
        if "withdraw" in seen:
            r.error(item_path, f"comes after withdraw ({join(path, seen['withdraw'])}), which must be the last step")
            continue
        seen[step.kind] = index
        steps.append(step)
    if len(steps) == len(items) and steps[-1].kind != "withdraw":
        r.error(path, "must end with withdraw (a drain ends withdrawn; `- withdraw` as the last step)")
    return tuple(steps)


def _step(r: Reader, item: Any, path: str) -> DrainStep | None:
    if item == "withdraw":
        return DrainStep("withdraw")
    if not isinstance(item, dict):
        r.error(path, "must be a mapping like {med: 1000, dwell: 10}, {prepend: 3, dwell: 10}, "
                      "{graceful_shutdown: true, dwell: 20}, or `withdraw`")
        return None
    data = r.mapping(item, path, {*KINDS, "dwell"})
    if data is None:
        return None
    kinds = [k for k in KINDS if k in data]
    if len(kinds) != 1:
        found = ", ".join(kinds) if kinds else "none"
        r.error(path, f"needs exactly one of {', '.join(KINDS)} (found: {found})")
        return None
    kind = kinds[0]
    where = join(path, kind)
    if kind in ("withdraw", "graceful_shutdown"):
        flag = r.boolean(data[kind], where)
        if flag is False:
            r.error(where, "must be true (leave the step out instead)")
        if not flag:
            return None
    if kind == "withdraw":
        if "dwell" in data:
            r.error(join(path, "dwell"), "withdraw is the last step: it has no dwell")
            return None
        return DrainStep("withdraw")
    dwell = r.need(data, "dwell", path, lambda v, p: r.number(v, p, 0.0, MAX_DWELL))
    number: int | None = 0
    if kind == "med":
        number = r.integer(data[kind], where, 0, U32)
    elif kind == "prepend":
        number = r.integer(data[kind], where, 1, MAX_PREPEND)
    if number is None or dwell is None:
        return None
    return DrainStep(kind, number, dwell)
