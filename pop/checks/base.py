"""The contract every health check keeps.

A check is an object with a `name`, a `tier` and an async `probe()` that returns one
CheckResult. A probe never raises for a failed target: failure is a value. The engine
wraps every probe in its own deadline and cancels it when the deadline passes, so a probe
must be cancellable at any await (no blocking calls).

`definitive` marks failures that packet loss cannot produce (a TCP RST, an ICMP
unreachable, a handshake response that fails validation). Hysteresis may act on those
faster than on silence, which is indistinguishable from loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    latency: float | None = None  # seconds, for successful probes
    error: str = ""  # short machine-friendly reason: "timeout", "refused", "icmp-unreachable", ...
    definitive: bool = False  # a failure that loss alone cannot explain
    detail: str = ""  # free text for logs and /status

    @classmethod
    def success(cls, latency: float, detail: str = "") -> CheckResult:
        return cls(ok=True, latency=latency, detail=detail)

    @classmethod
    def failure(cls, error: str, *, definitive: bool = False, detail: str = "") -> CheckResult:
        return cls(ok=False, error=error, definitive=definitive, detail=detail)


TIMEOUT = CheckResult(ok=False, error="timeout")


class Check(Protocol):
    """One probe kind against one target."""

    @property
    def name(self) -> str: ...

    @property
    def tier(self) -> int: ...

    async def probe(self) -> CheckResult: ...
