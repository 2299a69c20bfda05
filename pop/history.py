"""The announce history on disk: ``<runtime dir>/<pop>/availability.log`` (pop.availability).

One JSON line per change of the PoP's state, appended and fsync'd as it happens:

    {"t":1764466213.512,"announced":false,"cause":"operator"}

so the history survives crashes and restarts. A line that is not a mark (a torn write, a
hand edit) is skipped with a warning. Marks older than 30 days are compacted away when the
engine starts and once a day while it runs (the file is rewritten through a temporary file
and a rename), so the file stays small.

The engine cannot write "I died": ``alive()`` rewrites ``availability.alive`` with the
wall-clock time every few seconds, and the next engine closes the history with an ``engine``
mark at that time. A clean stop writes the mark itself (``stop()``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pop import availability
from pop.audit import append_synced
from pop.availability import Mark

FILE_NAME = "availability.log"
ALIVE_NAME = "availability.alive"
COMPACT_SLACK = availability.DAY  # rewrite the file only once its oldest mark is this far past the window

log = logging.getLogger("pop.history")


class AnnounceHistory:
    def __init__(self, path: Path | None) -> None:
        self.path = path  # None: in memory only (tests)
        self.marks: list[Mark] = []

    @property
    def _alive_path(self) -> Path | None:
        return None if self.path is None else self.path.with_name(ALIVE_NAME)

    def load(self, now: float) -> None:
        """Read the history back; close a previous engine's run that ended without a stop mark."""
        if self.path is None:
            return
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("availability.unreadable path=%s error=%s; starting a new history", self.path, exc.strerror)
            return
        self.marks, problems = availability.parse(text)
        for number, problem in problems:
            log.warning("availability.corrupt_line path=%s line=%d error=%s; skipped", self.path, number, problem)
        if self.marks and self.marks[-1].state != (False, "engine"):
            last_alive = self._read_alive()
            stopped = min(now, max(self.marks[-1].at, last_alive or 0.0))
            log.info("availability.engine_gap since=%.3f: the previous engine ended without a stop mark", stopped)
            self.note(Mark(stopped, False, "engine"))
        self._compact(now, force=bool(problems))

    def note(self, mark: Mark) -> None:
        """Record ``mark`` if it changes the state."""
        if not availability.changed(self.marks, mark):
            return
        self.marks.append(mark)
        self._append(availability.to_line(mark))
        self._compact(mark.at)

    def stop(self, now: float) -> None:
        self.note(Mark(now, False, "engine"))

    def alive(self, now: float) -> None:
        path = self._alive_path
        if path is None:
            return
        try:
            path.write_text(f"{now:.3f}\n")
        except OSError as exc:
            log.warning("availability.alive_unsaved path=%s error=%s", path, exc.strerror)

    def _read_alive(self) -> float | None:
        path = self._alive_path
        try:
            return float(path.read_text()) if path is not None else None
        except (OSError, ValueError):
            return None

    def _append(self, line: str) -> None:
        if self.path is None:
            return
        try:
            append_synced(self.path, line.encode("ascii"), 0o644)
        except OSError as exc:
            log.error("availability.unsaved path=%s error=%s mark=%s", self.path, exc.strerror, line.strip())

    def _compact(self, now: float, *, force: bool = False) -> None:
        if not self.marks or (not force and self.marks[0].at >= now - availability.KEEP - COMPACT_SLACK):
            return
        self.marks = availability.compact(self.marks, now)
        if self.path is None:
            return
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            with temporary.open("w", encoding="ascii") as file:
                file.writelines(availability.to_line(m) for m in self.marks)
                file.flush()
                os.fsync(file.fileno())
            temporary.replace(self.path)
        except OSError as exc:
            log.error("availability.uncompacted path=%s error=%s", self.path, exc.strerror)
