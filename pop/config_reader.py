"""Walking parsed YAML with a key path, collecting every problem instead of stopping at one.

`Reader` holds the generic checks (types, ranges, addresses, text that must fit ExaBGP's
grammar); pop/config.py holds what a PoP's sections mean. Every problem is one line,
`source: key.path: what is wrong`, and `ConfigError` carries them all.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

U16 = 0xFFFF
U32 = 0xFFFFFFFF
# the names of PoPs, servers and agents: they reach ExaBGP, /status, metrics labels and reports
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
NAME_WHAT = "a name (letters, digits, '_', '.', '-'; at most 63)"

# C0, DEL, C1 and the Unicode line separators: any of them can end a line for some reader
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")

# Why a character cannot sit inside one of ExaBGP's quoted strings. Its tokeniser
# (exabgp/configuration/core/format.py) unescapes a whole line before splitting it, and a
# quote of either kind inside a string opens or closes a string.
_NOT_IN_EXABGP_STRING = {
    '"': "it would end ExaBGP's string",
    "'": "ExaBGP would start another string there",
    "\\": "ExaBGP reads it as an escape",
}


class ConfigError(Exception):
    """Every problem found in one configuration, one per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)


class Reader:
    """Walks the parsed YAML, remembering the key path, collecting problems."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.problems.append(f"{self.source}: {path or '(top level)'}: {message}")

    def mapping(self, value: Any, path: str, allowed: set[str]) -> dict[str, Any] | None:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.error(path, f"must be a mapping, not {_kind(value)}")
            return None
        good: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                self.error(path, f"key {key!r} must be a string")
            elif key not in allowed:
                hint = _closest(key, allowed)
                self.error(join(path, key), "unknown key" + (f" (did you mean {hint!r}?)" if hint else ""))
            else:
                good[key] = item
        return good

    def string(self, value: Any, path: str, *, pattern: re.Pattern[str] | None = None,
               what: str = "") -> str | None:
        if not isinstance(value, str):
            self.error(path, f"must be a string, not {_kind(value)}")
            return None
        if _CONTROL.search(value):
            self.error(path, "contains a control character (newline, tab, ...), which is not allowed")
            return None
        if pattern is not None and not pattern.fullmatch(value):
            self.error(path, f"{value!r} is not {what or 'valid'}")
            return None
        return value

    def integer(self, value: Any, path: str, low: int, high: int) -> int | None:
        # bool is an int in Python; `med: yes` is a mistake, not 1
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(path, f"must be an integer, not {_kind(value)}")
            return None
        if not low <= value <= high:
            self.error(path, f"{shown(value)} is out of range {low}..{high}")
            return None
        return value

    def number(self, value: Any, path: str, low: float, high: float, *, low_open: bool = False) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.error(path, f"must be a number, not {_kind(value)}")
            return None
        # compared before float(): an integer beyond a float's range (10**400) would overflow
        if (isinstance(value, float) and math.isnan(value)) or (low_open and value <= low) or value < low \
                or value > high:
            bound = f"greater than {low}" if low_open else f"at least {low}"
            self.error(path, f"{shown(value)} is out of range ({bound} and at most {high})")
            return None
        return float(value)

    def boolean(self, value: Any, path: str) -> bool | None:
        if not isinstance(value, bool):
            self.error(path, f"must be true or false, not {_kind(value)}")
            return None
        return value

    def sequence(self, value: Any, path: str) -> list[Any] | None:
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(path, f"must be a list, not {_kind(value)}")
            return None
        return value

    def address(self, value: Any, path: str, version: int | None = None) -> str | None:
        text = self.string(value, path)
        if text is None:
            return None
        try:
            parsed = ipaddress.ip_address(text)
        except ValueError:
            self.error(path, f"{text!r} is not an IP address")
            return None
        if isinstance(parsed, ipaddress.IPv6Address) and parsed.scope_id is not None:
            self.error(path, zone_problem(text, parsed.scope_id))
            return None
        if version is not None and parsed.version != version:
            self.error(path, f"{text} is IPv{parsed.version}, expected IPv{version}")
            return None
        return str(parsed)

    def name(self, value: Any, path: str) -> str | None:
        return self.string(value, path, pattern=NAME, what=NAME_WHAT)

    def absolute_path(self, value: Any, path: str) -> str | None:
        text = self.string(value, path)
        if text is not None and not text.startswith("/"):
            self.error(path, f"{text!r} must be an absolute path")
            return None
        return text

    def exabgp_text(self, value: Any, path: str) -> str | None:
        """Free text that goes between double quotes in ExaBGP's configuration."""
        text = self.string(value, path)
        if text is None:
            return None
        problem = exabgp_string_problem(text)
        if problem is not None:
            self.error(path, problem)
            return None
        return text

    def need(self, data: dict[str, Any], key: str, path: str, parse: Callable[[Any, str], T | None]) -> T | None:
        if key not in data or data[key] is None:
            self.error(join(path, key), "is required")
            return None
        return parse(data[key], join(path, key))

    def optional(self, data: dict[str, Any], key: str, path: str, parse: Callable[[Any, str], T | None],
                 default: T) -> T:
        if key not in data or data[key] is None:
            return default
        parsed = parse(data[key], join(path, key))
        return default if parsed is None else parsed


def exabgp_string_problem(text: str) -> str | None:
    """Why `text` cannot stand between quotes in ExaBGP's configuration, or None if it can."""
    for char in text:
        if char in _NOT_IN_EXABGP_STRING:
            return f"may not contain {char!r} ({_NOT_IN_EXABGP_STRING[char]})"
        if not " " <= char <= "~":
            return (f"may not contain {char!r} (only printable ASCII: ExaBGP reads its configuration "
                    f"in the locale's encoding)")
    return None


def zone_problem(text: str, zone: str) -> str:
    # ipaddress accepts any text after '%' as a zone; it would be spliced into ExaBGP's
    # configuration, its API lines and the kernel's tables verbatim
    return f"{text!r} has an IPv6 zone ({'%' + zone!r}), which is not allowed here"


def shown(value: Any) -> str:
    """A value for an error message: short, and never an integer too long to print."""
    # str() of an integer over 4300 digits raises ValueError (CVE-2020-10735's limit)
    if isinstance(value, int) and abs(value) >= 10**30:
        return "a huge integer"
    text = repr(value) if isinstance(value, str) else f"{value}"
    return text if len(text) <= 70 else text[:67] + "..."


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "a mapping"}
    return names.get(type(value), type(value).__name__)


def _closest(key: str, allowed: set[str]) -> str | None:
    """A likely intended key, for the 'did you mean' hint (a few typos away)."""
    best: tuple[int, str] | None = None
    for candidate in allowed:
        distance = _distance(key.lower(), candidate)
        if distance <= max(1, len(candidate) // 3) and (best is None or (distance, candidate) < best):
            best = (distance, candidate)
    return best[1] if best else None


def _distance(a: str, b: str) -> int:
    """Edit distance where swapping two neighbouring letters counts as one typo."""
    rows = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            rows[i][j] = min(rows[i - 1][j] + 1, rows[i][j - 1] + 1, rows[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                rows[i][j] = min(rows[i][j], rows[i - 2][j - 2] + 1)
    return rows[-1][-1]


def parse_yaml(text: str | bytes, source: str) -> Any:
    """The YAML document, or ConfigError naming where it is not valid YAML."""
    import yaml

    from pop import config_yaml

    # libyaml's parser where PyYAML was built with it: four times faster, which a configuration
    # of a thousand servers, read again on every reload, needs (bench/scale.py), and a quicker
    # construction of the values (pop.config_yaml); a document it refuses is parsed again by
    # the pure-Python parser, whose messages are the ones we quote
    fast = getattr(yaml, "CSafeLoader", None)
    try:
        if fast is not None:
            try:
                return config_yaml.load_reusing(text, fast)
            except yaml.YAMLError:
                pass
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark is not None else "(top level)"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{source}: {where}: not valid YAML: {problem}"]) from None
    except (ValueError, TypeError, RecursionError) as exc:
        # PyYAML raises these for a few pathological inputs (e.g. huge or odd scalars)
        raise ConfigError([f"{source}: (top level): not valid YAML: {exc}"]) from None
