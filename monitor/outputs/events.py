"""Append-only JSONL log of what the daemon decided: alerts, state changes, sensor faults, bank switches.

It is the record a technician reads after the fact ("when did press-3 first alarm, and with which
bank?"), so each line is one self-contained JSON object that ``jq`` or a spreadsheet can read,
and each is flushed and fsync'd before :meth:`EventLog.write` returns: events are rare, and an
alert lost in a page cache at a power cut is exactly the one someone will ask about. Files
rotate by size so the log can never fill the disk the clips and banks live on.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from monitor.outputs.messages import iso_time

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """``value`` as JSON-ready data: dataclasses as dicts, numpy as Python, non-finite floats as null.

    JSON has no NaN, and a single ``NaN`` token would make the whole line unreadable to strict
    parsers, so a missing number (e.g. no rank for a faulty window) becomes ``null``.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic | np.ndarray):
        return _plain(value.tolist())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


class EventLog:
    """One JSONL file, rotated to ``PATH.1`` .. ``PATH.<backups>`` once it would exceed ``max_bytes``.

    Safe to share between threads: a line is always written whole, never interleaved with another.
    """

    def __init__(self, path: Path, max_bytes: int = 50_000_000, backups: int = 3) -> None:
        if max_bytes < 1 or backups < 0:
            raise ValueError(f"event log {path}: max_bytes must be >= 1 and backups >= 0, got {max_bytes} and {backups}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        self._file: io.FileIO | None = None
        self._size = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open()

    def write(self, kind: str, **fields: Any) -> bool:
        """Append ``{"time": <now, ISO 8601 UTC>, "kind": kind, **fields}`` as one line.

        Returns False, after a warning, when the line could not be stored (disk full, ...): the
        daemon's real job, telling the plant, must go on without its log. A half-written line
        is cut off again, so the file stays valid JSONL.
        """
        if "time" in fields:
            raise ValueError("event field 'time' is reserved for the time the event is logged")
        record = {"time": iso_time(time.time()), "kind": kind, **{k: _plain(v) for k, v in fields.items()}}
        line = (json.dumps(record, ensure_ascii=False, allow_nan=False, default=str) + "\n").encode("utf-8")
        with self._lock:
            try:
                self._append(line)
            except OSError as exc:
                log.warning("event log %s: cannot write %s event: %s", self.path, kind, exc.strerror or exc)
                return False
        return True

    def close(self) -> None:
        """Close the file; a later :meth:`write` opens it again."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _open(self) -> io.FileIO:
        # Unbuffered: a failed write then leaves nothing pending in a buffer to be flushed later.
        file = open(self.path, "ab", buffering=0)
        self._file = file
        self._size = os.fstat(file.fileno()).st_size
        return file

    def _append(self, line: bytes) -> None:
        file = self._file if self._file is not None else self._open()
        if self._size > 0 and self._size + len(line) > self.max_bytes:
            file = self._rotate()
        start = self._size
        try:
            view = memoryview(line)
            while view:
                view = view[file.write(view):]
            os.fsync(file.fileno())
        except OSError:
            self._discard_from(file, start)
            raise
        self._size = start + len(line)

    def _discard_from(self, file: io.FileIO, start: int) -> None:
        """Cut a partly written line off and close, so the next write starts from the real size."""
        self._file = None
        try:
            file.truncate(start)
        except OSError as exc:
            log.warning("event log %s: cannot remove a partly written line: %s", self.path, exc.strerror or exc)
        finally:
            file.close()

    def _rotate(self) -> io.FileIO:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            for index in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{index}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        log.info("event log %s rotated", self.path)
        return self._open()
