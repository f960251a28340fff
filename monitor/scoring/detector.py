"""The scoring path shared by ``score``, ``evaluate`` and the daemon.

Backbones turn audio into embeddings; a fitted detector turns embeddings into per-backbone
KNN distances, ranks them within each backbone's anchored reference (the bank's own
leave-one-out distances, i.e. what normal audio scores) and fuses the ranks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from monitor.audio.files import Audio
from monitor.scoring.backbone import Backbone, BackboneError
from monitor.bank.store import Bank
from monitor.config import Config
from monitor.scoring.ranking import fuse, rank_ratio
from monitor.scoring.idle import IdleDetector, noise_rows
from monitor.scoring.knn import KnnScorer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scores:
    """Scores of a batch of windows: raw distance and rank per backbone, and the fused rank."""

    raw: dict[str, np.ndarray]
    ranks: dict[str, np.ndarray]
    fused: np.ndarray
    conditions: list[str]  # nearest enrolled condition per window (by the heaviest backbone)


@dataclass(frozen=True)
class Embedded:
    """Embeddings of one recording's windows, per backbone, and the windows' start times."""

    embeddings: dict[str, np.ndarray]
    starts: list[float]


class Detector:
    """Backbones + scoring settings; ``fit`` a bank, then ``score`` embeddings."""

    def __init__(self, backbones: Sequence[Backbone], config: Config) -> None:
        names = [b.name for b in backbones]
        if len(set(names)) != len(names):
            raise BackboneError(f"two configured backbones share a name: {names}")
        windows = {b.meta.window_seconds for b in backbones}
        if len(windows) > 1:
            raise BackboneError(f"backbones must share one window length, got {sorted(windows)} s")
        self.backbones = list(backbones)
        self.config = config
        self.weights = {b.name: spec.weight for b, spec in zip(backbones, config.backbones)}
        self.metrics = {b.name: spec.metric or config.scoring.metric for b, spec in zip(backbones, config.backbones)}
        self._knn: dict[str, KnnScorer] = {}
        self.last_inference_seconds: dict[str, float] = {}
        self._reference: dict[str, np.ndarray] = {}
        self._idle: IdleDetector | None = None
        self.bank: Bank | None = None

    @classmethod
    def from_config(cls, config: Config) -> Detector:
        rt = config.runtime
        return cls([Backbone.load(b.model, rt.provider, rt.threads) for b in config.backbones], config)

    @property
    def window_seconds(self) -> float:
        return self.backbones[0].meta.window_seconds

    @property
    def model_rate(self) -> int:
        """The highest sample rate a backbone listens at: the band of audio that matters."""
        return max(b.meta.sample_rate for b in self.backbones)

    @property
    def lead_backbone(self) -> str:
        """The heaviest backbone: it names the nearest condition and judges idle windows."""
        return max(self.weights, key=self.weights.__getitem__)

    @property
    def model_ids(self) -> dict[str, str]:
        return {b.name: b.meta.model_id for b in self.backbones}

    def embed(self, audio: Audio, hop_seconds: float | None = None) -> Embedded:
        """Embed every window of ``audio`` with every backbone (see ``monitor.audio.files``)."""
        embeddings: dict[str, np.ndarray] = {}
        starts: list[float] | None = None
        for backbone in self.backbones:
            windows, backbone_starts = backbone.windows_of(audio, hop_seconds)
            if starts is not None and len(backbone_starts) != len(starts):
                raise BackboneError(f"{audio.source}: backbones cut different numbers of windows")
            starts = backbone_starts
            began = time.perf_counter()
            embeddings[backbone.name] = backbone.embed(windows)
            self.last_inference_seconds[backbone.name] = time.perf_counter() - began
        assert starts is not None
        return Embedded(embeddings, starts)

    def fit(self, bank: Bank) -> None:
        """Index ``bank`` and compute each backbone's anchored reference.

        Refuses a bank enrolled with other models (distances across models mean nothing) or
        lacking a configured backbone.
        """
        missing = sorted(set(self.model_ids) - set(bank.backbones))
        if missing:
            raise BackboneError(f"bank has no embeddings for backbone(s) {', '.join(missing)}: enroll with them first")
        # The bank may hold more backbones than are configured; those configured must match.
        bank.check_compatible(bank.model_ids | self.model_ids)
        conditions = bank.condition_labels()
        noise = noise_rows(conditions)
        running = np.setdiff1d(np.arange(len(bank)), noise)
        if len(running) < 2:
            raise BackboneError(f"bank holds {len(running)} window(s) of the running machine"
                                f"{f' (and {len(noise)} of site noise)' if len(noise) else ''}: "
                                "at least 2 are needed to rank scores")
        running_conditions = [conditions[i] for i in running]
        scoring = self.config.scoring
        for backbone in self.backbones:
            metric = self.metrics[backbone.name]
            embeddings = bank.embeddings[backbone.name]
            knn = KnnScorer(embeddings[running], running_conditions, metric, scoring.k, scoring.shrinkage,
                            scoring.index)
            self._knn[backbone.name] = knn
            self._reference[backbone.name] = knn.leave_one_out(max_rows=scoring.reference_max_windows)
        lead = self.lead_backbone
        self._idle = None if not len(noise) else IdleDetector(
            bank.embeddings[lead][running], bank.embeddings[lead][noise], scoring.k, scoring.idle_margin)
        self.bank = bank
        log.info("detector fitted on bank %s: %d windows, conditions %s", bank.version or "(in memory)",
                 len(bank), ",".join(bank.conditions))

    @property
    def idle_detector(self) -> IdleDetector | None:
        """Fitted from the bank's site noise; None when none is enrolled."""
        return self._idle

    def idle(self, embeddings: Mapping[str, np.ndarray]) -> np.ndarray:
        """Per window: True when it sounds like the site with the machine stopped (judged
        by the heaviest backbone; all False without enrolled site noise)."""
        if self._idle is None:
            return np.zeros(len(next(iter(embeddings.values()))), dtype=bool)
        return self._idle.is_idle(embeddings[self.lead_backbone])

    def reference(self, name: str) -> np.ndarray:
        return self._reference[name]

    def raw_scores(self, embeddings: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
        """KNN distances per backbone, and the nearest condition by the heaviest backbone."""
        if not self._knn:
            raise RuntimeError("Detector.fit must be called before scoring")
        raw, conditions = {}, {}
        for name, knn in self._knn.items():
            raw[name], conditions[name] = knn.score_with_conditions(embeddings[name])
        return raw, conditions[self.lead_backbone]

    def fuse(self, ranks: Mapping[str, np.ndarray]) -> np.ndarray:
        return fuse(ranks, self.weights, self.config.fusion.rule)

    def score(self, embeddings: Mapping[str, np.ndarray]) -> Scores:
        """Scores ranked against the anchored reference only (offline use; the daemon ranks
        against its rolling reference instead)."""
        raw, conditions = self.raw_scores(embeddings)
        ranks = {name: rank_ratio(self._reference[name], values) for name, values in raw.items()}
        return Scores(raw, ranks, self.fuse(ranks), conditions)
