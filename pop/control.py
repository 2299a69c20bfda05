"""Who may change a PoP's state over HTTP, and what an operator's request may say (pure).

- The control token file (`control.token_file`, mode 0600) holds one bearer token per line;
  more than one during a rotation (add the new one, reload, move the clients, remove the old
  one, reload). Blank lines and lines starting with '#' are ignored. A token is 16 to 512
  visible ASCII characters (it travels in an HTTP header).
- `authorized(header, tokens)`: an `Authorization: Bearer <token>` header against every
  token, each compared in constant time (hmac.compare_digest).
- `parse_body(raw, now)`: the optional JSON body of an action, ``{"reason": str, "who": str,
  "until": ...}``; anything else is a `BodyError` naming what is wrong. `who` is what the
  client says it is (the CLI sends $SUDO_USER or $USER); the token, not `who`, is the
  credential. `until` (a PoP drain only: a maintenance that ends by itself) is an ISO 8601
  time with its zone, or seconds from now; it must lie in the next `MAX_UNTIL` seconds.
- `parse_duration(text)`: the CLI's `--for 30m` / `--until 1h30m` ("90", "90s", "30m", "2h",
  "1d", or combined like "1h30m") in seconds.
"""

from __future__ import annotations

import hmac
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

MIN_TOKEN = 16
MAX_TOKEN = 512
MAX_BODY = 16 * 1024  # bytes; a reason and a name need far less
MAX_REASON = 200  # characters
MAX_WHO = 64
MAX_UNTIL = 30 * 86400.0  # a maintenance longer than a month is a drain someone forgot
_DURATION = re.compile(r"(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+(?:\.[0-9]+)?)s?)?")
_TOKEN = re.compile(r"[!-~]+")  # visible ASCII: no space, no control character, no Unicode


class BodyError(ValueError):
    """A request body that is not what an action takes (HTTP 400)."""


@dataclass(frozen=True, slots=True)
class ActionRequest:
    """What an operator says about an action: why, and who (as claimed)."""

    reason: str = ""
    who: str = "unknown"
    until: float | None = None  # wall clock (time.time()): a maintenance that ends by itself


def parse_tokens(data: bytes, path: str) -> tuple[bytes, ...]:
    """The tokens in a control token file's content; ValueError names the file, line and problem."""
    where = f"{path}: control token file"
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{where}: not ASCII text (a token is {MIN_TOKEN}..{MAX_TOKEN} visible ASCII "
                         f"characters, one per line)") from None
    tokens: list[bytes] = []
    for number, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not _TOKEN.fullmatch(token):
            raise ValueError(f"{where}: line {number}: a token is one word of visible ASCII characters "
                             f"(no spaces or control characters)")
        if not MIN_TOKEN <= len(token) <= MAX_TOKEN:
            raise ValueError(f"{where}: line {number}: the token is {len(token)} characters; it must be "
                             f"{MIN_TOKEN}..{MAX_TOKEN} (e.g. `openssl rand -hex 32 > {path}`)")
        tokens.append(token.encode("ascii"))
    if not tokens:
        raise ValueError(f"{where}: holds no token (e.g. `openssl rand -hex 32 > {path}`)")
    return tuple(tokens)


def bearer(header: str | None) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token.encode("utf-8", "replace")


def authorized(header: str | None, tokens: tuple[bytes, ...]) -> bool:
    """Whether the header carries one of the tokens; every token is compared, in constant time."""
    given = bearer(header)
    if given is None:
        return False
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(given, token)
    return matched


def parse_body(raw: bytes, now: float = 0.0) -> ActionRequest:
    """An action's optional JSON body; an empty body means no reason, who unknown, no expiry.
    ``now`` is the wall clock (time.time()) that `until` is read against."""
    if not raw.strip():
        return ActionRequest()
    try:
        # decoded here: json.loads would take a byte order mark for UTF-16 or UTF-32
        data: Any = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BodyError("body: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise BodyError(f"body: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise BodyError("body: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise BodyError(f"body: must be a JSON object like {{\"reason\": \"...\", \"who\": \"...\"}}, "
                        f"not {_kind(data)}")
    unknown = sorted(set(data) - {"reason", "who", "until"})
    if unknown:
        raise BodyError(f"body: unknown key {unknown[0]!r} (allowed: reason, who, until)")
    reason = _text(data, "reason", MAX_REASON, "")
    who = _text(data, "who", MAX_WHO, "unknown")
    if not who:
        raise BodyError("body.who: must not be empty (leave it out for 'unknown')")
    until = None if data.get("until") is None else _until(data["until"], now)
    return ActionRequest(reason=reason, who=who, until=until)


def _until(value: Any, now: float) -> float:
    """`until` as a wall-clock time: an ISO 8601 time with its zone, or seconds from now."""
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise BodyError(f"body.until: {value[:40]!r} is not an ISO 8601 time (e.g. 2026-11-30T02:30:00Z) "
                            f"nor a number of seconds") from None
        if when.tzinfo is None:
            raise BodyError("body.until: needs a time zone (Z or +01:00): a time without one means different "
                            "moments to the client and the PoP")
        at = when.timestamp()
    elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        at = now + value
    else:
        raise BodyError(f"body.until: must be an ISO 8601 time or seconds from now, not {_kind(value)}")
    if at <= now:
        raise BodyError("body.until: is not in the future")
    if at - now > MAX_UNTIL:
        raise BodyError(f"body.until: more than {MAX_UNTIL / 86400:g} days ahead; drain without until instead "
                        f"(it stays until undrained)")
    return at


def parse_duration(text: str) -> float:
    """A duration like 90, 90s, 30m, 2h, 1d or 1h30m, in seconds; ValueError if it is not one."""
    match = _DURATION.fullmatch(text.strip())
    if not text.strip() or match is None or not any(match.groups()):
        raise ValueError(f"{text!r} is not a duration (e.g. 90s, 30m, 2h, 1h30m)")
    days, hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    total = days * 86400 + hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise ValueError(f"{text!r} is not a duration longer than zero")
    return total


def _text(data: dict[str, Any], key: str, limit: int, default: str) -> str:
    if key not in data:
        return default
    value = data[key]
    if not isinstance(value, str):
        raise BodyError(f"body.{key}: must be a string, not {_kind(value)}")
    if len(value) > limit:
        raise BodyError(f"body.{key}: {len(value)} characters; at most {limit}")
    if not value.isprintable():
        raise BodyError(f"body.{key}: contains a control character (newline, tab, ...), which is not allowed")
    return value


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)
