"""The bundled demo recordings (MIMII fan, CC BY-SA 4.0: see assets/NOTICE).

Normal clips 00-06 are enrolled; 07-09 are held-out normal audio and anomaly_00-04 faulty
audio, so a fresh machine with no microphone can show the whole pipeline on real sound.
"""

from __future__ import annotations

from pathlib import Path

from monitor.backbone import ASSETS

DEMO_DIR = ASSETS / "demo" / "mimii-fan"
ENROLLED = 7


def _clips(label: str) -> list[Path]:
    return sorted(DEMO_DIR.glob(f"{label}_*.flac"))


def enroll_clips() -> list[Path]:
    return _clips("normal")[:ENROLLED]


def held_out_normal_clips() -> list[Path]:
    return _clips("normal")[ENROLLED:]


def anomaly_clips() -> list[Path]:
    return _clips("anomaly")
