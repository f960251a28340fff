"""What a verdict changes on disk, exactly once.

* ``normal``: the alert's clip is embedded with the configured backbones and enrolled
  (``monitor.enrollment.files.enroll_files``: the sensor checks, the rate check, the store's
  atomic writes) as a new bank version noted ``review <event_id>``. A running daemon follows
  ``CURRENT``, so its scorer and rolling reference then include the reviewed audio;
  ``asd-monitor bank rollback`` undoes it like any enrollment.
* ``fault``: the clip, an ``embeddings.npz`` (one array per backbone) and ``verdict.json`` go to
  ``<state_dir>/faults/<machine>/<event_id>/``, written in a temporary folder and renamed into
  place, so the folder is whole or absent. Never into the bank.
* ``unsure``: nothing but the record.

Every verdict ends with its line in ``reviews.jsonl``, and the whole review runs under the
reviews lock. Exactly once: a process killed after the bank version (or library folder) was
written but before the record leaves a bank version whose note names the event (or the
folder); a second attempt finds it, enrolls nothing and records the verdict with that version
(making it current if the kill came before ``CURRENT`` moved).

The clip is read only from ``<state_dir>/clips/<machine>/``: the event log is a file a verdict
trusts for the path, and a path outside the clip store is refused rather than enrolled.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from monitor.audio.files import AudioFile
from monitor.bank.store import BankStore
from monitor.config import Config
from monitor.enrollment.files import enroll_files
from monitor.errors import BankError, CommandError
from monitor.outputs.messages import LAST_ALERT, iso_time
from monitor.review.verdicts import (
    Alert,
    ReviewLog,
    ReviewRecord,
    Verdict,
    find_alert,
    last_alert,
)
from monitor.scoring.detector import Detector

log = logging.getLogger(__name__)

FAULTS_DIR = "faults"
CLIPS_DIR = "clips"
_TMP_PREFIX = ".tmp-"


def review_note(event_id: str, condition: str) -> str:
    """The note of the bank version a false alarm creates; ``reviewed_version`` finds it again."""
    return f"review {event_id}: false alarm, condition {condition}"


def _names_event(note: str, event_id: str) -> bool:
    return re.fullmatch(rf"review {re.escape(event_id)}(:.*)?", note or "", re.DOTALL) is not None


def reviewed_version(store: BankStore, event_id: str) -> str | None:
    """The bank version already holding the audio of ``event_id`` (newest first), if any."""
    for version in reversed(store.versions()):
        try:
            note = store.load(version).note
        except BankError:
            continue  # a damaged version holds nothing usable
        if _names_event(note, event_id):
            return version
    return None


def _finish_save(store: BankStore, version: str) -> None:
    """A save killed between writing its version and moving ``CURRENT`` left the reviewed
    version written but not in use: when it is still the newest, point ``CURRENT`` at it, as
    the save would have (an older one stays as it is: later versions were made on purpose)."""
    if store.current() != version and store.versions()[-1] == version:
        log.warning("bank %s: %s holds a review but was never made current (interrupted save): making it current",
                    store.path, version)
        store.set_current(version)


def bank_store(config: Config, machine: str) -> BankStore:
    """A configured machine's bank, where the daemon keeps it."""
    for entry in config.machines:
        if entry.name == machine:
            return BankStore(entry.bank_dir(config.daemon.resolved_state_dir()))
    raise CommandError(f"machine {machine!r} of the alert is not in the configuration")


def alert_clip(alert: Alert, clips_dir: Path) -> Path:
    """The alert's saved clip, refused unless it is a file in the machine's clip folder."""
    if not alert.clip:
        why = f" ({alert.clip_error})" if alert.clip_error else ""
        raise CommandError(f"event {alert.event_id!r} has no clip{why}: nothing to learn from; answer 'unsure'")
    folder = (clips_dir / alert.machine).resolve()
    path = Path(alert.clip).resolve()
    if not path.is_relative_to(folder) or path.suffix != ".flac":
        raise CommandError(f"event {alert.event_id!r}: its clip {alert.clip} is not in the clip store {folder}; refused")
    if not path.is_file():
        raise CommandError(f"event {alert.event_id!r}: its clip {path} is gone (clip retention); answer 'unsure'")
    return path


@dataclass(frozen=True)
class Applied:
    """A verdict applied and recorded; ``recovered`` when the bank version or library folder
    came from an earlier attempt that was killed before its record."""

    record: ReviewRecord
    bank: str | None = None  # the bank directory (normal)
    recovered: bool = False

    def reply(self) -> dict[str, Any]:
        r = self.record
        return {"ok": True, "machine": r.machine, "event_id": r.event_id, "verdict": r.verdict,
                "condition": r.condition, "version": r.version, "bank": self.bank, "library": r.library,
                "recovered": self.recovered, "request_id": r.request_id}


class Reviewer:
    """Applies verdicts for one state directory. ``detector`` is called only when a clip must
    be embedded (normal, fault); ``store_of`` gives a machine's bank (the daemon passes its own)."""

    def __init__(self, config: Config, detector: Callable[[], Detector],
                 store_of: Callable[[str], BankStore] | None = None) -> None:
        self.config = config
        self.state_dir = config.daemon.resolved_state_dir()
        self.events = config.daemon.resolved_event_log()
        self.clips_dir = self.state_dir / CLIPS_DIR
        self.log = ReviewLog(self.state_dir)
        self.detector = detector
        self.store_of = store_of or (lambda name: bank_store(config, name))

    def library_dir(self, machine: str, event_id: str) -> Path:
        return self.state_dir / FAULTS_DIR / machine / event_id

    def apply(self, verdict: Verdict, who: str, machine: str | None = None) -> Applied:
        """Check, apply and record ``verdict``; ``CommandError`` (nothing changed) when the event
        is unknown, of another machine than ``machine``, already reviewed, or its clip unusable."""
        with self.log.locked():
            if verdict.event_id == LAST_ALERT:  # resolved under the lock: two presses answer one alert
                verdict = replace(verdict, event_id=last_alert(self.events, machine).event_id)
            done = self.log.find(verdict.event_id)
            if done is not None:
                raise CommandError(f"event {verdict.event_id!r} was already reviewed: {done.verdict} "
                                   f"({done.who}, {done.time})")
            alert = find_alert(self.events, verdict.event_id)
            if machine is not None and alert.machine != machine:
                raise CommandError(f"event {verdict.event_id!r} is an alert of {alert.machine}, not of {machine}")
            version = library = bank = None
            recovered = False
            if verdict.verdict == "normal":
                store = self.store_of(alert.machine)
                bank = str(store.path)
                version = reviewed_version(store, verdict.event_id)
                recovered = version is not None
                if recovered:
                    _finish_save(store, version)
                else:
                    clip = alert_clip(alert, self.clips_dir)
                    version = enroll_files(self.detector(), store, [clip], verdict.condition,
                                           note=review_note(verdict.event_id, verdict.condition)).version
            elif verdict.verdict == "fault":
                folder = self.library_dir(alert.machine, verdict.event_id)
                recovered = folder.is_dir()
                if not recovered:
                    self._keep_fault(alert, verdict, who, folder)
                library = str(folder)
            record = ReviewRecord(iso_time(time.time()), verdict.event_id, alert.machine, verdict.verdict,
                                  verdict.condition, verdict.note, who, version, library, verdict.request_id)
            self.log.append(record)
        log.info("review %s (%s): %s by %s%s", record.event_id, record.machine, record.verdict, who,
                 f", bank version {version}" if version else f", kept in {library}" if library else "")
        return Applied(record, bank, recovered)

    def _keep_fault(self, alert: Alert, verdict: Verdict, who: str, folder: Path) -> None:
        """The confirmed fault's clip, embeddings and metadata, whole or not at all."""
        clip = alert_clip(alert, self.clips_dir)
        detector = self.detector()
        embedded = detector.embed(AudioFile.open(clip))
        folder.parent.mkdir(parents=True, exist_ok=True)
        for stale in folder.parent.glob(f"{_TMP_PREFIX}*"):  # a killed earlier attempt (under the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = folder.parent / f"{_TMP_PREFIX}{verdict.event_id}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            shutil.copyfile(clip, tmp / clip.name)
            with open(tmp / "embeddings.npz", "wb") as file:
                np.savez(file, **{name: emb.astype(np.float32) for name, emb in embedded.embeddings.items()})
            meta = {"event_id": verdict.event_id, "machine": alert.machine, "verdict": verdict.verdict,
                    "condition": verdict.condition, "note": verdict.note, "who": who, "time": iso_time(time.time()),
                    "clip": clip.name, "original_clip": str(clip), "window_starts_s": [float(s) for s in embedded.starts],
                    "model_ids": detector.model_ids, "alert": asdict(alert)}
            (tmp / "verdict.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            for path in tmp.iterdir():
                _fsync(path)
            _fsync(tmp)
            os.rename(tmp, folder)
            _fsync(folder.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
