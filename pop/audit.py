"""The audit trail: every operator action attempt, accepted or refused, one JSON line each.

The file is `<runtime dir>/<pop>/audit.log`. Each attempt is appended and fsync'd before the
answer goes out, so it survives a crash and a restart; a new engine reads the file's tail
back for /status. A line that is not an entry (a torn write, a hand edit) is skipped with a
warning, never a reason to stop. The file is never rotated here: it grows by one short line
per operator action (logrotate's copytruncate works, since every write is an append).

    {"time": "2026-11-30T01:30:13.512Z", "action": "drain", "target": "pop1", "who": "alice",
     "from": "127.0.0.1", "reason": "fibre cut", "result": "accepted", "status": 200}

A maintenance (a drain with an expiry) adds `"until": "2026-11-30T02:00:13.512Z"`.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FILE_NAME = "audit.log"
KEEP = 20  # entries on /status and the NOC page
TAIL_BYTES = 256 * 1024  # how much of the file a starting engine reads back

log = logging.getLogger("pop.audit")


@dataclass(frozen=True, slots=True)
class Entry:
    time: str  # ISO 8601, UTC
    action: str  # drain, undrain, drain-server, undrain-server
    target: str  # the PoP's or the server's name (as requested)
    who: str  # as the client claims it (the token is the credential)
    source: str  # the peer address ("from" in the file)
    reason: str
    result: str  # accepted, or why not: unauthorized, forbidden, bad-request, not-found, conflict,
    # too-large, timeout
    status: int  # the HTTP status answered
    until: str = ""  # a maintenance's expiry (ISO 8601 UTC), "" for none


def iso(wall: float) -> str:
    """``wall`` (time.time()) as ISO 8601 UTC with milliseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"


def to_dict(entry: Entry) -> dict[str, Any]:
    data = asdict(entry)
    data["from"] = data.pop("source")
    ordered = {key: data[key] for key in ("time", "action", "target", "who", "from", "reason", "result", "status")}
    return ordered | ({"until": entry.until} if entry.until else {})


def to_line(entry: Entry) -> str:
    return json.dumps(to_dict(entry), ensure_ascii=True, separators=(",", ":")) + "\n"


def parse_line(line: str) -> Entry:
    """One line of the file; ValueError if it is not an entry."""
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    keys = ("time", "action", "target", "who", "from", "reason", "result")
    bad = [key for key in keys if not isinstance(data.get(key), str)]
    status = data.get("status")
    if isinstance(status, bool) or not isinstance(status, int):
        bad.append("status")
    if bad:
        raise ValueError(f"missing or mistyped: {', '.join(bad)}")
    until = data.get("until", "")
    if not isinstance(until, str):
        raise ValueError("mistyped: until")
    when, action, target, who, source, reason, result = (str(data[key]) for key in keys)
    return Entry(when, action, target, who, source, reason, result, int(data["status"]), until)


def parse(text: str, *, partial_first: bool = False) -> tuple[list[Entry], list[tuple[int, str]]]:
    """The entries in ``text`` and the (line number, problem) of every line that is not one.

    ``partial_first``: the text starts mid-file, so its first line may be cut and is dropped.
    """
    entries: list[Entry] = []
    problems: list[tuple[int, str]] = []
    lines = text.split("\n")
    if partial_first:
        lines = lines[1:]
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entries.append(parse_line(line))
        except (ValueError, RecursionError) as exc:
            problems.append((number, str(exc)[:100]))
    return entries, problems


def append_synced(path: Path, data: bytes, mode: int) -> None:
    """Append ``data`` to ``path`` (created with ``mode``) and fsync it before returning."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


class AuditTrail:
    """The file and the last `KEEP` entries, and how many attempts ended how since the start."""

    def __init__(self, path: Path | None) -> None:
        self.path = path  # None: keep in memory only (tests)
        self.entries: collections.deque[Entry] = collections.deque(maxlen=KEEP)
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._newline_first = False  # the file ends in a torn line: do not glue the next entry to it

    def load(self) -> None:
        """Read back the tail of the file (a restarted engine shows the actions before it)."""
        if self.path is None:
            return
        try:
            with self.path.open("rb") as file:
                size = file.seek(0, os.SEEK_END)
                file.seek(max(0, size - TAIL_BYTES))
                data = file.read()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("audit.unreadable path=%s error=%s", self.path, exc.strerror)
            return
        self._newline_first = bool(data) and not data.endswith(b"\n")
        entries, problems = parse(data.decode("utf-8", "replace"), partial_first=size > TAIL_BYTES)
        for number, problem in problems:
            log.warning("audit.corrupt_line path=%s line=%d (of the tail read) error=%s; skipped", self.path,
                        number, problem)
        self.entries.extend(entries)

    def append(self, entry: Entry) -> None:
        """Record an attempt: in memory, and appended and fsync'd to the file."""
        self.entries.append(entry)
        self.counts[(entry.action, entry.result)] += 1
        if self.path is None:
            return
        line = ("\n" if self._newline_first else "") + to_line(entry)
        try:
            append_synced(self.path, line.encode("ascii"), 0o600)
        except OSError as exc:
            # the action itself is not refused: a full disk must not stop an operator draining a PoP
            log.error("audit.unsaved path=%s error=%s entry=%s", self.path, exc.strerror, line.strip())
            return
        self._newline_first = False

    def recent(self) -> list[dict[str, Any]]:
        """The last entries, newest first."""
        return [to_dict(entry) for entry in reversed(self.entries)]
