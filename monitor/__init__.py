"""asd-monitor: acoustic condition monitoring by first-shot unsupervised anomalous sound detection.

The library API, without the daemon::

    from monitor import BankStore, Detector, enroll_files, find_audio, score_recording

    detector = Detector.from_config()                  # the built-in backbone
    store = BankStore("banks/fan1")
    enroll_files(detector, store, find_audio(["healthy/"]), condition="default")
    detector.fit(store.load())
    print(score_recording(detector, "today.flac").anomalous)

Names are imported on first use, so ``import monitor`` stays cheap and no submodule depends on
this package face.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "Config": "monitor.config",
    "load_config": "monitor.config",
    "AsdError": "monitor.errors",
    "Audio": "monitor.audio.files",
    "load_audio": "monitor.audio.files",
    "find_audio": "monitor.audio.files",
    "Bank": "monitor.bank.model",
    "BankStore": "monitor.bank.store",
    "Detector": "monitor.scoring.detector",
    "Scores": "monitor.scoring.detector",
    "RecordingScore": "monitor.scoring.recording",
    "score_recording": "monitor.scoring.recording",
    "enroll_files": "monitor.enrollment.files",
    "evaluate": "monitor.offline.evaluate",
    "Daemon": "monitor.service.daemon",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'monitor' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
