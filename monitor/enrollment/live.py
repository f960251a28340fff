"""Live enrollment: collecting a machine's own audio, while it is known to be healthy, into a
new bank version.

A session runs for a duration of audio. Windows with sensor faults are excluded, and so are
windows that score as clear outliers against the bank already enrolled (a door slamming during
"normal" time must not become normal); both are counted and reported. A session that ends with
too few clean windows is refused rather than saved: a bank of a handful of windows would make
every later rank meaningless.

Commands (from the local control socket or MQTT) are JSON objects:
``{"action": "start", "duration_s": 600, "condition": "night"}`` (condition ``site-noise``:
the machine is stopped and the site's noise is enrolled, see monitor/scoring/idle.py), ``{"action": "stop"}`` (end
now and save), ``{"action": "cancel"}`` (discard) and ``{"action": "status"}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitor.bank.model import BankItem
from monitor.config import DEFAULT_CONDITION, EnrollmentConfig
from monitor.errors import CommandError
from monitor.scoring.idle import NOISE_CONDITION

ACTIONS = ("start", "stop", "cancel", "status")
CONDITION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_DURATION_S = 7 * 24 * 3600.0


@dataclass(frozen=True)
class Command:
    action: str
    duration_s: float | None = None
    condition: str = DEFAULT_CONDITION
    request_id: str | None = None


def command_object(payload: bytes | str, fields: Iterable[str]) -> dict[str, Any]:
    """A command's payload as a JSON object holding none but ``fields`` (every command of the
    daemon is read this way: a typo in a field name is refused, not ignored)."""
    try:
        data = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CommandError(f"malformed JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CommandError("expected a JSON object")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise CommandError(f"unknown field {unknown[0]!r}")
    return data


def parse_command(payload: bytes | str, config: EnrollmentConfig) -> Command:
    """Validate a command payload completely before anything is changed."""
    data = command_object(payload, ("action", "duration_s", "condition", "request_id", "token"))
    action = data.get("action")
    if action not in ACTIONS:
        raise CommandError(f"action must be one of {', '.join(ACTIONS)}, got {action!r}")
    request_id = data.get("request_id")
    if request_id is not None and not isinstance(request_id, str):
        raise CommandError("request_id must be a string")
    if action != "start":
        return Command(action, request_id=request_id)
    duration = data.get("duration_s", config.default_duration_seconds)
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not 0 < duration <= MAX_DURATION_S:
        raise CommandError(f"duration_s must be a number of seconds in (0, {MAX_DURATION_S:g}], got {duration!r}")
    condition = data.get("condition", DEFAULT_CONDITION)
    if not isinstance(condition, str) or not CONDITION_RE.fullmatch(condition):
        raise CommandError(f"condition must be a short name of letters, digits, '_', '.', '-', got {condition!r}")
    if config.conditions and condition not in (*config.conditions, NOISE_CONDITION):
        raise CommandError(f"unknown condition {condition!r} (configured: {', '.join(config.conditions)})")
    return Command(action, float(duration), condition, request_id)


@dataclass
class Session:
    """One enrollment in progress on one machine."""

    condition: str
    duration_s: float
    started_at: str
    audio_seconds: float = 0.0
    items: list[BankItem] = field(default_factory=list)
    embeddings: dict[str, list[np.ndarray]] = field(default_factory=dict)
    excluded_faults: int = 0
    excluded_outliers: int = 0
    excluded_idle: int = 0  # the machine sounded stopped (site noise) while it was to be enrolled

    @property
    def accepted(self) -> int:
        return len(self.items)

    @property
    def progress(self) -> float:
        return min(1.0, self.audio_seconds / self.duration_s)

    @property
    def done(self) -> bool:
        return self.audio_seconds >= self.duration_s

    def advance(self, seconds: float) -> None:
        self.audio_seconds += seconds

    def accept(self, item: BankItem, embeddings: dict[str, np.ndarray]) -> None:
        """Keep a window. The daemon embeds every output of the models while a session runs, so
        that the bank keeps them all; a window embedded just before the session began carries
        fewer, and is dropped rather than leave the outputs with rows for some windows only."""
        names, held = set(embeddings), set(self.embeddings)
        if self.items and not names >= held:
            return
        if self.items and names > held:
            self.items.clear()
            self.embeddings.clear()
        self.items.append(item)
        for name, emb in embeddings.items():
            self.embeddings.setdefault(name, []).append(emb)

    def stacked(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(parts) for name, parts in self.embeddings.items()}

    def summary(self) -> dict[str, Any]:
        return {"condition": self.condition, "duration_s": self.duration_s, "started_at": self.started_at,
                "progress": round(self.progress, 3), "accepted_windows": self.accepted,
                "excluded_sensor_faults": self.excluded_faults, "excluded_outliers": self.excluded_outliers,
                "excluded_idle": self.excluded_idle}
