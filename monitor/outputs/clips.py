"""The audio of alarming windows, kept as FLAC files for the technician who answers the alert.

Hearing the window that alarmed is the fastest way to tell a bearing from a forklift driving
past, so the daemon saves it next to the alert. Saving is best effort: a full disk or a
read-only mount must never stop the alert itself, so :meth:`ClipStore.save` reports I/O
problems as a one-line reason (sent in the alert as ``clip_error``) instead of raising.
Retention bounds the store by file count and size over all machines, oldest first, because
the clips share a disk with the banks the daemon cannot run without.

Layout: ``DIR/<machine>/<yyyymmddThhmmssZ>_<machine>.flac``, the time being the window's start.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from monitor.config import ClipsConfig

log = logging.getLogger(__name__)

_SUFFIX = ".flac"
# A clip is written under ".<name>.partial" and renamed when complete, so a clip file that
# exists is always whole; the retention scan never sees a partial one.
_PARTIAL_SUFFIX = ".partial"
_BYTES_PER_MEGABYTE = 1_000_000


@dataclass(frozen=True)
class SavedClip:
    """Where the clip was saved, or why it was not (exactly one of the two is set)."""

    path: Path | None
    error: str | None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _describe(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        code = errno.errorcode.get(exc.errno, "") if exc.errno is not None else ""
        return f"{exc.strerror} ({code})" if code else exc.strerror
    return _one_line(str(exc)) or type(exc).__name__


def _encode(samples: np.ndarray, sample_rate: int) -> bytes:
    """16-bit FLAC in memory, so that every error while writing to disk is a plain OSError."""
    data = np.asarray(samples)
    if np.issubdtype(data.dtype, np.floating):
        # Out-of-range floats would wrap around in the integer conversion; NaN has no sample value.
        data = np.clip(np.nan_to_num(data.astype(np.float32, copy=False), nan=0.0), -1.0, 1.0)
    buffer = io.BytesIO()
    sf.write(buffer, data, sample_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


class ClipStore:
    """Saves clips under ``directory`` and keeps the store within ``config``'s bounds."""

    def __init__(self, directory: Path, config: ClipsConfig) -> None:
        self.directory = Path(directory)
        self.config = config
        # Saves from several machines' threads must not run retention over each other's files.
        self._lock = threading.Lock()
        self._remove_partials()

    def save(self, machine: str, start_epoch: float, samples: np.ndarray, sample_rate: int) -> SavedClip:
        """Write a window's audio (float in [-1, 1] or int16/int32; mono or frames x channels).

        Never raises for I/O or encoding problems: the result then carries the reason.
        """
        if not self.config.enabled:
            return SavedClip(None, "clip saving is disabled (clips.enabled: false)")
        if machine in ("", ".", "..") or "/" in machine or "\0" in machine:
            return self._failed(f"cannot save clip: machine name {machine!r} is not a valid folder name")
        try:
            encoded = _encode(samples, sample_rate)
        except Exception as exc:  # noqa: BLE001 - any failure here must still let the alert out
            # (seen: MemoryError from libsndfile's cffi callbacks under MemoryDenyWriteExecute)
            return self._failed(f"cannot encode clip for {machine}: {_describe(exc)}")
        with self._lock:
            folder = self.directory / machine
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(start_epoch))
            try:
                folder.mkdir(parents=True, exist_ok=True)
                path = self._write(folder, f"{stamp}_{machine}", encoded)
            except OSError as exc:
                return self._failed(f"cannot save clip in {folder}: {_describe(exc)}")
            log.info("saved clip %s (%d bytes)", path, len(encoded))
            self._enforce_retention(keep=path)
        return SavedClip(path, None)

    def _failed(self, reason: str) -> SavedClip:
        log.warning("%s", reason)
        return SavedClip(None, reason)

    def _write(self, folder: Path, stem: str, encoded: bytes) -> Path:
        path = folder / f"{stem}{_SUFFIX}"
        # Two windows starting in the same second (hop under 1 s) must not overwrite each other.
        counter = 2
        while path.exists():
            path = folder / f"{stem}-{counter}{_SUFFIX}"
            counter += 1
        partial = folder / f".{path.name}{_PARTIAL_SUFFIX}"
        try:
            with open(partial, "wb") as file:
                file.write(encoded)
                file.flush()
                # On disk before the rename: after a power cut the alert's clip is whole or absent.
                os.fsync(file.fileno())
            os.replace(partial, path)
        except OSError:
            with suppress(OSError):
                partial.unlink(missing_ok=True)
            raise
        return path

    def _enforce_retention(self, keep: Path) -> None:
        """Delete the oldest clips (all machines) until within max_files and max_megabytes.

        ``keep``, the clip just saved, is never deleted, even if it alone exceeds the size
        bound: the alert about to be sent names it.
        """
        clips: list[tuple[int, str, Path, int]] = []
        for path in self.directory.glob(f"*/*{_SUFFIX}"):
            try:
                stat = path.stat()
            except OSError:
                continue  # deleted meanwhile, or unreadable: nothing to count
            clips.append((stat.st_mtime_ns, path.name, path, stat.st_size))
        clips.sort()
        count = len(clips)
        total = sum(size for *_, size in clips)
        max_bytes = self.config.max_megabytes * _BYTES_PER_MEGABYTE
        for _, _, path, size in clips:
            if count <= self.config.max_files and total <= max_bytes:
                break
            if path == keep:
                continue
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("cannot delete old clip %s: %s", path, _describe(exc))
                continue
            count -= 1
            total -= size
            log.info("deleted old clip %s (retention: at most %d files, %g MB)", path, self.config.max_files, self.config.max_megabytes)

    def _remove_partials(self) -> None:
        """Remove clips left half-written by a crash; retention does not count them, so they would stay forever."""
        for partial in self.directory.glob(f"*/.*{_PARTIAL_SUFFIX}"):
            try:
                partial.unlink()
                log.info("removed half-written clip %s", partial)
            except OSError as exc:
                log.warning("cannot remove half-written clip %s: %s", partial, _describe(exc))
