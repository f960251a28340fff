"""The scoring path shared by the daemon, ``score`` and ``evaluate``.

Backbones turn audio into embeddings (``embed``); a detector fitted on a bank turns embeddings
into per-backbone KNN distances, ranks each within its backbone's reference and fuses the
ranks (``score``). Offline the reference is the bank's own leave-one-out distances; the daemon
passes each machine's rolling references instead (``monitor.scoring.live``). Either way the
same ``score`` computes every figure.

A bank keeps every single output of a model file (``Backbone.features``); a configured
concatenation is made of them. A bank enrolled before that holds the file's own embedding only:
it is scored with that, the setting of its time (``Fallback``), never with rows of another shape.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TypeVar

import numpy as np

from monitor.audio.files import Recording, shortest_seconds
from monitor.bank.model import Bank
from monitor.config import Config
from monitor.errors import BackboneError, ClipTooShort
from monitor.scoring.backbone import (
    Backbone,
    embed_outputs,
    load_backbones,
    shared_runs,
)
from monitor.scoring.idle import IdleDetector, noise_rows
from monitor.scoring.knn import KnnScorer
from monitor.scoring.ranking import RankReference, ZMin, fuse, self_rank

log = logging.getLogger(__name__)
T = TypeVar("T")

BATCH_WINDOWS = 2
"""Windows per onnxruntime call when a recording is embedded. Bounded, so that memory does not
grow with the recording (all of a 10-minute file's windows in one call peaked at 3.4 GB), and
small, because onnxruntime's CPU arena keeps what its largest batch needed while larger batches
were no faster on the CPU (benchmarks/memory.py, aisfx on 2 cores: peak RSS of ``enroll`` about
210 MB at 1 window a call, 305 MB at 2, 505 MB at 4, 830 MB at 8, all about 100 ms a window).
Two rather than one: the embeddings then equal those of all windows in one call bit for bit,
while one window a call differs by up to 7e-7."""


def _batches(items: Iterator[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter), drawn lazily."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass(frozen=True)
class Embedded:
    """Embeddings of one recording's windows, per backbone, and the windows' start times."""

    embeddings: dict[str, np.ndarray]
    starts: list[float]
    # per backbone, for all windows together; outputs of one model share a run, and each carries its time
    inference_seconds: dict[str, float]


@dataclass(frozen=True)
class Fallback:
    """A configured backbone a bank cannot serve (it was enrolled before every output was kept),
    scored instead with its model file's own embedding, the one the bank holds."""

    configured: str
    used: str
    missing: tuple[str, ...]  # the outputs the bank lacks

    def __str__(self) -> str:
        return (f"holds no {', '.join(self.missing)} (enrolled before every output was kept): {self.configured} is "
                f"scored as {self.used}, the embedding it was enrolled with, until the machine is enrolled again")


@dataclass(frozen=True)
class Scores:
    """Scores of a batch of windows: raw distance and rank per backbone, the fused rank, the
    nearest enrolled condition, and whether the machine sounded stopped (idle)."""

    raw: dict[str, np.ndarray]
    ranks: dict[str, np.ndarray]
    fused: np.ndarray
    conditions: list[str]  # nearest enrolled condition per window (by the heaviest backbone)
    idle: np.ndarray  # bool per window; all False without enrolled site noise


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
        # What scores, by name: the configured backbones, or once fitted what the bank serves of them.
        self.scored = {b.name: b for b in backbones}
        self._configured = {b.name: (spec.weight, spec.metric or config.scoring.metric)
                            for b, spec in zip(backbones, config.backbones)}
        self.weights = {name: weight for name, (weight, _) in self._configured.items()}
        self.metrics = {name: metric for name, (_, metric) in self._configured.items()}
        self.fallbacks: list[Fallback] = []
        self._knn: dict[str, KnnScorer] = {}
        self._anchored: dict[str, RankReference] = {}
        self._zmin: ZMin | None = None
        self._idle: IdleDetector | None = None
        self.bank: Bank | None = None

    @classmethod
    def from_config(cls, config: Config | None = None) -> Detector:
        """Load the configured backbones (the built-in default without a config); entries
        naming outputs of one model file share its session (``load_backbones``)."""
        config = config if config is not None else Config()
        rt = config.runtime
        return cls(load_backbones(config.backbones, rt.provider, rt.threads), config)

    def unfitted(self) -> Detector:
        """A new detector on the same loaded backbones, to fit on another bank (the sessions
        are shared: each machine of the daemon fits its own bank without loading models)."""
        return Detector(self.backbones, self.config)

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

    @cached_property
    def features(self) -> list[Backbone]:
        """Every single output of the configured backbones' model files (``Backbone.features``)."""
        found: dict[str, Backbone] = {}
        for backbone in self.backbones:
            for feature in backbone.features():
                found.setdefault(feature.name, feature)
        return list(found.values())

    @property
    def feature_model_ids(self) -> dict[str, str]:
        """What a new bank keeps of a window: its every single output, name -> model_id."""
        return {b.name: b.meta.model_id for b in self.features}

    @property
    def falls_back(self) -> bool:
        """Fitted on a bank that serves a configured backbone only as its file's own embedding:
        windows must then be embedded with ``features``."""
        return bool(self.fallbacks)

    @property
    def idle_detector(self) -> IdleDetector | None:
        """Fitted from the bank's site noise; None when none is enrolled."""
        return self._idle

    @property
    def shortest_seconds(self) -> tuple[float, str]:
        """The shortest recording every backbone accepts, and the backbone that decides it
        (``monitor.audio.files.shortest_seconds``)."""
        return max((shortest_seconds(b.meta.min_seconds), b.name) for b in self.backbones)

    def embed(self, recording: Recording, hop_seconds: float | None = None,
              progress: Callable[[float], None] | None = None, features: bool = False) -> Embedded:
        """Embed every window of ``recording`` (in memory or a file) with every backbone.

        The recording is read, resampled and cut once per backbone rate, a block at a time;
        backbones at the same rate share the windows, which reach onnxruntime ``BATCH_WINDOWS``
        at a time, and backbones that are outputs of one model file share one run per batch.
        So memory holds a few windows besides the embeddings, whatever the length.
        A recording shorter than a backbone accepts is refused (``ClipTooShort``).
        ``hop_seconds`` defaults to the window length (no overlap); ``progress`` hears the
        seconds of audio read (divided among the rates, so that they add up to its length).
        ``features`` adds every single output of the models' files (what a bank keeps, see
        ``Backbone.features``), fetched by the same run; without it, the backbones that score.
        """
        shortest, name = self.shortest_seconds
        if recording.seconds < shortest:
            raise ClipTooShort(f"{recording.source}: {recording.seconds:.3g} s of audio, shorter than the "
                               f"{shortest:g} s backbone {name} accepts")

        def key(backbone: Backbone) -> tuple[int, int, int | None]:
            return backbone.meta.sample_rate, backbone.meta.window_samples, backbone.meta.min_samples

        wanted = {b.name: b for b in [*self.backbones, *self.scored.values(), *(self.features if features else [])]}
        cuts: dict[tuple[int, int, int | None], list[Backbone]] = {}
        for backbone in wanted.values():
            cuts.setdefault(key(backbone), []).append(backbone)
        share = None if progress is None else (lambda seconds: progress(seconds / len(cuts)))
        rows: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
        seconds = dict.fromkeys(rows, 0.0)
        starts: dict[tuple[int, int, int | None], list[float]] = {}
        for cut, group in cuts.items():
            starts[cut] = []
            runs = shared_runs(group)
            for batch in _batches(group[0].windows(recording, hop_seconds, share), BATCH_WINDOWS):
                starts[cut] += [start for start, _ in batch]
                windows = np.stack([window for _, window in batch])
                for run in runs:
                    began = time.perf_counter()
                    outputs = embed_outputs(run, windows)
                    took = time.perf_counter() - began
                    for backbone, embedding in zip(run, outputs):
                        rows[backbone.name].append(embedding)
                        seconds[backbone.name] += took
        if len({len(cut_starts) for cut_starts in starts.values()}) > 1:
            raise BackboneError(f"{recording.source}: backbones cut different numbers of windows")
        # The start times as the last backbone cuts them (rates may round the last one apart).
        return Embedded({name: np.concatenate(parts) for name, parts in rows.items()},
                        starts[key(self.backbones[-1])], {b.name: seconds[b.name] for b in self.backbones})

    def check(self, bank: Bank) -> np.ndarray:
        """Refuse a bank enrolled with other models (distances across models mean nothing),
        lacking a configured backbone or with fewer than two windows of the running machine;
        return the rows of the running machine. Cheap, so the daemon checks every bank before
        it starts and fits them while audio already flows."""
        self._serve(bank)
        return _running_rows(bank)

    def _serve(self, bank: Bank) -> tuple[dict[str, Backbone], dict[str, str], list[Fallback]]:
        """What scores against ``bank``: each configured backbone when the bank holds it (as such,
        or the single outputs it is made of), else its file's own embedding (a ``Fallback``).
        Returns the backbones by name, the configured name each stands for, and the fallbacks."""
        served: dict[str, Backbone] = {}
        stands_for: dict[str, str] = {}
        fallbacks, missing = [], []
        for backbone in self.backbones:
            chosen = backbone
            if backbone.name not in bank.embeddings and not set(backbone.feature_names) <= set(bank.embeddings):
                chosen = backbone.file_backbone()
                if chosen.name not in bank.embeddings:
                    missing.append(backbone.name)
                    continue
                lacking = tuple(n for n in backbone.feature_names if n not in bank.embeddings)
                fallbacks.append(Fallback(backbone.name, chosen.name, lacking))
            # A configured backbone and another's fallback may be the same embedding: scored once.
            if chosen.name not in served:
                served[chosen.name], stands_for[chosen.name] = chosen, backbone.name
        if missing:
            raise BackboneError(f"bank has no embeddings for backbone(s) {', '.join(missing)}: enroll with them first")
        # The bank may hold more backbones than are configured; those used must match.
        used = {name: b.meta.model_id for b in served.values()
                for name in ((b.name,) if b.name in bank.embeddings else b.feature_names)}
        bank.check_compatible(bank.model_ids | used)
        return served, stands_for, fallbacks

    def fit(self, bank: Bank) -> None:
        """Index ``bank`` and compute each backbone's anchored reference (refusing what ``check``
        refuses); each configured backbone as the bank serves it (``fallbacks``)."""
        served, stands_for, self.fallbacks = self._serve(bank)
        running = _running_rows(bank)
        self.scored = served
        self.weights = {name: self._configured[stands_for[name]][0] for name in served}
        self.metrics = {name: self._configured[stands_for[name]][1] for name in served}
        self._knn, self._anchored = {}, {}
        for fallback in self.fallbacks:  # the daemon warns, naming the machine (reenroll_notice)
            log.info("bank %s %s", bank.version or "(in memory)", fallback)
        conditions = bank.condition_labels()
        noise = noise_rows(conditions)
        running_conditions = [conditions[i] for i in running]
        scoring = self.config.scoring
        loo = {}
        rows = {name: _rows(backbone, bank.embeddings) for name, backbone in served.items()}
        for name, embeddings in rows.items():
            knn = KnnScorer(embeddings[running], running_conditions, self.metrics[name], scoring.k,
                            scoring.shrinkage, scoring.index, scoring.normalisation)
            self._knn[name] = knn
            loo[name] = knn.leave_one_out(max_rows=scoring.reference_max_windows)
            self._anchored[name] = RankReference(loo[name])
        self._zmin = ZMin(loo, self.weights) if self.config.fusion.rule == "zmin" else None
        lead = self.lead_backbone
        self._idle = None if not len(noise) else IdleDetector(
            rows[lead][running], rows[lead][noise], scoring.k, scoring.idle_margin)
        self.bank = bank
        log.info("detector fitted on bank %s: %d windows, conditions %s", bank.version or "(in memory)",
                 len(bank), ",".join(bank.conditions))

    def reenroll_notice(self, bank_path: str | Path) -> str | None:
        """What to tell whoever runs the machine when the fitted bank ``falls_back`` (else None):
        what is scored instead, and the command that enrolls a bank serving the configuration.
        Live enrollment adds to the bank in its own layout, so only a new bank from files does."""
        if not self.fallbacks:
            return None
        version = self.bank.version if self.bank is not None else None
        return (f"bank {version or '(in memory)'} {'; '.join(map(str, self.fallbacks))}: enroll it again from recordings "
                f"of the healthy machine: asd-monitor enroll --bank {bank_path} --replace [--condition NAME] FILES")

    def fuse_transductive(self, raw: Mapping[str, np.ndarray]) -> np.ndarray:
        """Offline fused score of a test set's clip scores, ranked within the set itself (the
        method's transductive fusion): mean/max of per-backbone self-ranks, or for ``zmin`` the
        self-rank of the z-min values (z-normalised by the bank's statistics, fitted here)."""
        if self._zmin is not None:
            return self_rank(self._zmin.values(raw))
        return fuse({n: self_rank(v) for n, v in raw.items()}, self.weights, self.config.fusion.rule)

    def reference(self, name: str) -> np.ndarray:
        """The bank's leave-one-out distances of one backbone (finite, sorted)."""
        return self._anchored[name].anchored

    def rolling_references(self, rolling_size: int) -> dict[str, RankReference]:
        """Fresh live references: the anchored part plus room for ``rolling_size`` recent windows."""
        return {name: RankReference(ref.anchored, rolling_size) for name, ref in self._anchored.items()}

    def score(self, embeddings: Mapping[str, np.ndarray],
              references: Mapping[str, RankReference] | None = None) -> Scores:
        """Score windows: KNN distance per backbone, its rank within ``references`` (default:
        the bank's leave-one-out distances), the fused rank, nearest condition and idle flag."""
        if not self._knn:
            raise RuntimeError("Detector.fit must be called before scoring")
        references = self._anchored if references is None else references
        raw, conditions = {}, {}
        for name, knn in self._knn.items():
            raw[name], conditions[name] = knn.score_with_conditions(_rows(self.scored[name], embeddings))
        ranks = {name: np.asarray(references[name].rank(values)) for name, values in raw.items()}
        # zmin: ranked against the bank's own z-min values (anchored; see ranking.ZMin).
        fused = self._zmin.rank(raw) if self._zmin is not None else fuse(ranks, self.weights, self.config.fusion.rule)
        lead = self.lead_backbone
        idle = (self._idle.is_idle(_rows(self.scored[lead], embeddings)) if self._idle is not None
                else np.zeros(len(raw[lead]), dtype=bool))
        return Scores(raw, ranks, fused, conditions[lead], idle)


def _running_rows(bank: Bank) -> np.ndarray:
    """The rows of the running machine (not site noise); at least two, to rank scores."""
    noise = noise_rows(bank.condition_labels())
    running = np.setdiff1d(np.arange(len(bank)), noise)
    if len(running) < 2:
        raise BackboneError(f"bank holds {len(running)} window(s) of the running machine"
                            f"{f' (and {len(noise)} of site noise)' if len(noise) else ''}: "
                            "at least 2 are needed to rank scores")
    return running


def _rows(backbone: Backbone, embeddings: Mapping[str, np.ndarray]) -> np.ndarray:
    """A backbone's embeddings out of a bank's or a window's: stored as such, or made of the
    single outputs they are made of (``Backbone.compose``)."""
    if backbone.name in embeddings:
        return embeddings[backbone.name]
    try:
        return backbone.compose(embeddings)
    except KeyError:
        raise BackboneError(f"no embeddings of backbone {backbone.name} nor of its outputs "
                            f"{', '.join(backbone.feature_names)} (offered: {', '.join(sorted(embeddings))})") from None
