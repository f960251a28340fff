"""Every window's outcome per machine, kept on disk for trend plots and site-specific reports.

MQTT scores are volatile and Prometheus keeps only the latest figures, so nothing else in the
daemon can answer "what did this machine's fused rank do over the last day". Layout:
``<root>/<machine>/<YYYY-MM-DD>.tsv``, one append-only text file per UTC day of the window's end,
one line per window: ``end<TAB>status<TAB>fused<TAB>anomalous``. Text, because a line is either
whole or visibly torn: a ``kill -9`` in the middle of a write leaves at most one line without
its newline, which a read skips (and the next append starts on a fresh line). Each line goes
out in one ``write`` on an ``O_APPEND`` descriptor, so a concurrent read sees whole lines or a
trailing fragment, never a mix.

Day files are small (8640 lines a day for a 10 s hop) and whole files are dropped once past the
retention, which keeps the pruning a ``unlink`` rather than a rewrite.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from monitor.outputs.messages import WINDOW_STATUSES as STATUSES

log = logging.getLogger(__name__)

SUFFIX = ".tsv"
DAY_FORMAT = "%Y-%m-%d"
DAY_SECONDS = 86400.0


@dataclass(frozen=True)
class WindowHistory:
    """One machine's windows, oldest first; all arrays the same length."""

    end: np.ndarray  # float64, epoch seconds of each window's end
    status: np.ndarray  # str (dtype object): "ok", "idle", "sensor_fault"
    fused: np.ndarray  # float64 fused rank; NaN where the window has none
    anomalous: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.end)


def _day(end: float) -> str:
    return datetime.fromtimestamp(end, timezone.utc).strftime(DAY_FORMAT)


def _day_start(day: str) -> float:
    return datetime.strptime(day, DAY_FORMAT).replace(tzinfo=timezone.utc).timestamp()


def _parse(line: bytes) -> tuple[float, str, float, bool] | None:
    """One stored line, or None when it is not a whole, valid one (a torn write)."""
    parts = line.split(b"\t")
    if len(parts) != 4 or parts[3] not in (b"0", b"1"):
        return None
    try:
        end, fused = float(parts[0]), float(parts[2])
        status = parts[1].decode("ascii")
    except (ValueError, UnicodeDecodeError):
        return None
    if status not in STATUSES or not math.isfinite(end):
        return None
    return end, status, fused, parts[3] == b"1"


def _lines(path: Path) -> Iterator[bytes]:
    """A day file's lines one at a time (nothing when it was pruned meanwhile)."""
    try:
        with open(path, "rb") as handle:
            yield from handle
    except FileNotFoundError:
        return


class _DayFile:
    """The open descriptor of one machine's current day file."""

    def __init__(self, path: Path) -> None:
        self.day = path.stem
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        # A line torn by a kill -9 must stay a line of its own, not glue onto the next one.
        size = os.fstat(self.fd).st_size
        if size:
            with open(path, "rb") as existing:
                existing.seek(size - 1)
                if existing.read(1) != b"\n":
                    os.write(self.fd, b"\n")

    def close(self) -> None:
        os.close(self.fd)


class ScoreHistory:
    """Every window's outcome per machine, on disk, for trend plots and site-specific reports.

    ``record`` is called from the worker threads: one machine's windows arrive one at a time,
    different machines concurrently, so each machine has its own lock and file. ``read`` holds
    only the lines inside the asked span in memory, whatever the history's length.
    """

    def __init__(self, root: Path, retention_days: float = 35.0) -> None:
        if not retention_days > 0:
            raise ValueError(f"history retention_days must be > 0, got {retention_days!r}")
        self.root = Path(root)
        self.retention_seconds = retention_days * DAY_SECONDS
        self._files: dict[str, _DayFile] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _folder(self, machine: str) -> Path:
        if not machine or machine in (".", "..") or "/" in machine or "\0" in machine:
            raise ValueError(f"history: {machine!r} is not a usable machine name")
        return self.root / machine

    def _lock(self, machine: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(machine, threading.Lock())

    def record(self, machine: str, end: float, status: str, fused: float | None, anomalous: bool) -> None:
        """Append one window (``end``: epoch seconds of its last sample)."""
        if status not in STATUSES:
            raise ValueError(f"history: status {status!r} is not one of {', '.join(STATUSES)}")
        folder = self._folder(machine)
        value = "nan" if fused is None or not math.isfinite(fused) else f"{fused:.6g}"
        line = f"{end:.3f}\t{status}\t{value}\t{int(bool(anomalous))}\n".encode("ascii")
        day = _day(end)
        with self._lock(machine):
            current = self._files.get(machine)
            if current is None or current.day != day:
                if current is not None:
                    current.close()
                current = self._files[machine] = _DayFile(folder / f"{day}{SUFFIX}")
                self._prune(folder, end)
            os.write(current.fd, line)

    def _prune(self, folder: Path, now: float) -> None:
        """Drop the day files wholly older than the retention, measured on the windows' own clock
        (a replay of old audio keeps its history; the newest window decides)."""
        horizon = now - self.retention_seconds
        for path in folder.glob(f"*{SUFFIX}"):
            try:
                if _day_start(path.stem) + DAY_SECONDS <= horizon:
                    path.unlink()
                    log.info("history: removed %s (older than %.0f days)", path, self.retention_seconds / DAY_SECONDS)
            except ValueError:
                continue  # not one of ours
            except OSError as exc:
                log.warning("history: cannot remove %s: %s", path, exc)

    def read(self, machine: str, since: float, until: float | None = None) -> WindowHistory:
        """The windows whose end lies in ``[since, until)`` (``until`` None: up to the newest)."""
        folder = self._folder(machine)
        first = _day(since)
        last = None if until is None else _day(until)
        days = []
        for path in folder.glob(f"*{SUFFIX}") if folder.is_dir() else ():
            try:
                _day_start(path.stem)
            except ValueError:
                continue
            if path.stem >= first and (last is None or path.stem <= last):
                days.append(path)
        ends: list[float] = []
        statuses: list[str] = []
        fused: list[float] = []
        anomalous: list[bool] = []
        skipped = 0
        for path in sorted(days):
            for raw in _lines(path):
                row = _parse(raw[:-1]) if raw.endswith(b"\n") else None
                if row is None:
                    skipped += raw.strip() != b""
                    continue
                if row[0] < since or (until is not None and row[0] >= until):
                    continue
                ends.append(row[0])
                statuses.append(row[1])
                fused.append(row[2])
                anomalous.append(row[3])
        if skipped:
            log.debug("history: %s: skipped %d torn or unreadable line(s)", machine, skipped)
        end = np.asarray(ends, dtype=np.float64)
        order = np.argsort(end, kind="stable")  # oldest first even if the clock stepped back
        return WindowHistory(end[order], np.asarray(statuses, dtype=object)[order],
                             np.asarray(fused, dtype=np.float64)[order], np.asarray(anomalous, dtype=bool)[order])

    def close(self) -> None:
        """Close the open day files (the daemon's stop)."""
        with self._guard:
            machines = list(self._files)
        for machine in machines:
            with self._lock(machine):
                current = self._files.pop(machine, None)
                if current is not None:
                    current.close()
