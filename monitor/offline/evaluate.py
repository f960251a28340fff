"""Offline evaluation on a labelled data set in the DCASE development layout.

Per machine: enroll the train split's normal clips (the domain is the operating condition),
score every test clip with each backbone, fuse the backbones by rank over the test clips (the
method's transductive rank fusion), and compute the official DCASE figures. Decisions use the
daemon's own rule: fused rank against the bank's leave-one-out reference above the threshold.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from monitor.audio.files import AudioFile
from monitor.bank.model import Bank, BankItem
from monitor.config import DEFAULT_CONDITION
from monitor.enrollment.files import embed_windows
from monitor.errors import DatasetError
from monitor.offline.dataset import Clip, scan_dataset
from monitor.offline.dcase import (
    BOOTSTRAP_RESAMPLES,
    Figures,
    bootstrap_intervals,
    machine_figures,
    official_score,
)
from monitor.offline.report import (
    FUSED,
    MachinePlot,
    format_table,
    plot_machines,
    write_official_csv,
    write_results_json,
)
from monitor.scoring.detector import Detector
from monitor.scoring.recording import score_recording

log = logging.getLogger(__name__)


Progress = Callable[[int], None]
OFFICIAL_INTERVAL = "official 95%"  # the table column of the bootstrap interval (dcase.BOOTSTRAP_LEVEL)


@dataclass
class MachineResult:
    machine: str
    clips: list[Clip]
    raw: dict[str, np.ndarray]  # per backbone: clip score (max over its windows)
    fused: np.ndarray  # transductive fused rank per clip
    decision_ranks: np.ndarray  # per clip: its highest fused rank against the bank (the daemon's rule)
    threshold: float  # alerts.threshold: a clip is anomalous above it
    figures: dict[str, Figures] = field(default_factory=dict)

    @property
    def decisions(self) -> np.ndarray:
        """Per clip: flagged by the daemon's rule."""
        return self.decision_ranks > self.threshold


def clip_condition(clip: Clip) -> str:
    return clip.domain or DEFAULT_CONDITION


def build_bank(detector: Detector, clips: Sequence[Clip], progress: Progress = lambda n: None) -> Bank:
    """An in-memory bank of every window of the given clips (condition = the clip's domain),
    made as enrollment makes one: read a block at a time, faulty windows left out."""
    items: list[BankItem] = []
    parts: dict[str, list[np.ndarray]] = {name: [] for name in detector.model_ids}
    for clip in clips:
        windows = embed_windows(detector, AudioFile.open(clip.path), str(clip.path), clip_condition(clip))
        if windows.left_out:
            log.warning("%s", windows.left_out)
        items += windows.items
        for name, emb in windows.embeddings.items():
            parts[name].append(emb)
        progress(1)
    return Bank().add(items, {name: np.concatenate(v) for name, v in parts.items()}, detector.model_ids)


def evaluate_machine(detector: Detector, machine: str, clips: Sequence[Clip], progress: Progress) -> MachineResult:
    train = [c for c in clips if c.split == "train" and c.label != "anomaly"]
    test = [c for c in clips if c.split == "test"]
    if not train:
        raise DatasetError(f"machine {machine}: no normal training clips to enroll")
    if not test:
        raise DatasetError(f"machine {machine}: no test clips")
    detector.fit(build_bank(detector, train, progress))
    names = list(detector.model_ids)
    raw = {name: np.empty(len(test)) for name in names}
    decision_ranks = np.empty(len(test))
    for i, clip in enumerate(test):
        scores = score_recording(detector, clip.path).scores
        for name in names:
            raw[name][i] = scores.raw[name].max()
        decision_ranks[i] = scores.fused.max()
        progress(1)
    fused = detector.fuse_transductive(raw)
    result = MachineResult(machine, list(test), raw, fused, decision_ranks, detector.config.alerts.threshold)
    labelled = [i for i, c in enumerate(test) if c.label is not None]
    if len({test[i].is_anomaly for i in labelled}) < 2:
        log.warning("machine %s: test clips need both normal and anomalous labels for figures; none computed", machine)
    else:
        domains = [test[i].domain for i in labelled]
        labels = [test[i].is_anomaly for i in labelled]
        for system, values in result_systems(result).items():
            result.figures[system] = machine_figures(domains, labels, values[labelled])
    return result


def result_systems(result: MachineResult) -> dict[str, np.ndarray]:
    return {**result.raw, FUSED: result.fused}


def evaluate(detector: Detector, root: Path, progress_factory: Callable[[int], Progress] | None = None) -> list[MachineResult]:
    machines = scan_dataset(root)
    total = sum(len([c for c in clips if c.split == "test" or c.label != "anomaly"]) for clips in machines.values())
    progress = progress_factory(total) if progress_factory else (lambda n: None)
    return [evaluate_machine(detector, machine, clips, progress) for machine, clips in machines.items()]


def summarise(results: Sequence[MachineResult], detector: Detector, root: Path, seconds: float,
              bootstrap: int = BOOTSTRAP_RESAMPLES) -> dict:
    """results.json's content. With ``bootstrap`` > 0, ``bootstrap`` (see ``bootstrap_summary``)
    holds 95 % intervals of every figure; the point estimates are computed as before."""
    systems = list(detector.model_ids) + [FUSED]
    per_machine = {r.machine: {s: r.figures[s].to_dict() for s in systems if s in r.figures} for r in results}
    # A machine whose labelled test clips are of one class has no figures (an AUC needs both);
    # the others are still evaluated, and with none left the official score is undefined (NaN,
    # null in results.json) rather than the evaluation failing after every clip was scored.
    undefined = {r.machine: _why_undefined(r) for r in results if not r.figures}
    overall = {s: official_score(figures) if (figures := [r.figures[s] for r in results if s in r.figures]) else math.nan
               for s in systems}
    return {
        "dataset": str(root),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "elapsed_seconds": round(seconds, 1),
        "backbones": {
            b.name: {"model_id": b.meta.model_id, "path": str(b.path), "provider": b.provider,
                     "weight": detector.weights[b.name], "metric": detector.metrics[b.name]}
            for b in detector.backbones
        },
        "scoring": {"k": detector.config.scoring.k, "shrinkage": detector.config.scoring.shrinkage},
        "fusion": {"rule": detector.config.fusion.rule},
        "decision_threshold": detector.config.alerts.threshold,
        "machines": per_machine,
        "undefined": undefined,
        "systems": overall,
        "official_score": overall[FUSED],
        "bootstrap": bootstrap_summary(results, systems, bootstrap) if bootstrap > 0 else None,
    }


def bootstrap_summary(results: Sequence[MachineResult], systems: Sequence[str], n_resamples: int) -> dict | None:
    """Paired, stratified bootstrap intervals (``monitor.offline.dcase.bootstrap_intervals``) over
    the labelled test clips of every machine that has figures, the fused system as reference.

    A test set of tens of clips (fan-noisy: 8 target normals) moves the official score by
    several hundredths with the clips that happened to be recorded; the interval says how much,
    and ``differences`` says whether a backbone alone differs from the fused system beyond that.
    None when no machine has figures.
    """
    started = time.perf_counter()
    clips: dict[str, tuple[list[str | None], list[bool]]] = {}
    scores: dict[str, dict[str, np.ndarray]] = {s: {} for s in systems}
    for r in results:
        if not r.figures:
            continue
        labelled = [i for i, c in enumerate(r.clips) if c.label is not None]
        clips[r.machine] = ([r.clips[i].domain for i in labelled], [r.clips[i].is_anomaly for i in labelled])
        for system, values in result_systems(r).items():
            scores[system][r.machine] = values[labelled]
    if not clips:
        return None
    out = bootstrap_intervals(clips, scores, reference=FUSED, n_resamples=n_resamples)
    out["seconds"] = round(time.perf_counter() - started, 2)
    return out


def _interval(value: Sequence[float] | None) -> str:
    """``[low, high]`` with the table's decimals, blank when there is no interval."""
    if not value or any(v is None or v != v for v in value):  # NaN != NaN
        return ""
    return f"[{value[0]:.3f}, {value[1]:.3f}]"


def _why_undefined(result: MachineResult) -> str:
    labels = [c.is_anomaly for c in result.clips if c.label is not None]
    return (f"no figures: {labels.count(False)} normal and {labels.count(True)} anomalous labelled test clip(s); "
            "AUC and pAUC need both")


def table_rows(results: Sequence[MachineResult], summary: dict) -> list[dict]:
    rows = []
    boot = summary.get("bootstrap") or {}
    for r in results:
        for system, fig in r.figures.items():
            interval = boot.get("machines", {}).get(r.machine, {}).get(system, {}).get("official")
            rows.append({"machine": r.machine, "system": system, "AUC src": fig.auc_source,
                         "AUC tgt": fig.auc_target, "pAUC": fig.pauc, "official": fig.official,
                         OFFICIAL_INTERVAL: _interval(interval)})
    for system, value in summary["systems"].items():
        interval = boot.get("systems", {}).get(system, {}).get("official")
        rows.append({"machine": "ALL", "system": system, "AUC src": "", "AUC tgt": "", "pAUC": "", "official": value,
                     OFFICIAL_INTERVAL: _interval(interval)})
    return rows


def print_table(results: Sequence[MachineResult], summary: dict) -> str:
    """The figures, then a line per machine that has none, saying why."""
    columns = ["machine", "system", "AUC src", "AUC tgt", "pAUC", "official"]
    if summary.get("bootstrap"):
        columns.append(OFFICIAL_INTERVAL)
    table = format_table(table_rows(results, summary), columns)
    return "\n".join([table, *(f"{machine}: {why}" for machine, why in summary["undefined"].items())])


def write_outputs(results: Sequence[MachineResult], summary: dict, out_dir: Path) -> None:
    """Official CSVs (fused in ``out_dir``, each backbone under ``out_dir/<backbone>``),
    ``results.json`` and ``roc.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for r in results:
        names = [c.path.name for c in r.clips]
        write_official_csv(out_dir, r.machine, names, r.fused, r.decisions.astype(int))
        for backbone, scores in r.raw.items():
            write_official_csv(out_dir / backbone, r.machine, names, scores, r.decisions.astype(int))
    write_results_json(out_dir, summary)
    plots = {}
    for r in results:
        labelled = np.array([c.label is not None for c in r.clips])
        if labelled.any():
            # With one backbone the fused ranks order clips as its scores do: one curve, not two.
            systems = r.raw if len(r.raw) == 1 else result_systems(r)
            plots[r.machine] = MachinePlot(np.array([c.is_anomaly for c in r.clips])[labelled],
                                           [c.domain for c, kept in zip(r.clips, labelled) if kept],
                                           {s: v[labelled] for s, v in systems.items()},
                                           r.decision_ranks[labelled], r.threshold)
    if plots:
        plot_machines(out_dir / "roc.png", plots)


def run_evaluation(detector: Detector, root: Path, out_dir: Path | None,
                   progress_factory: Callable[[int], Progress] | None = None,
                   bootstrap: int = BOOTSTRAP_RESAMPLES) -> tuple[list[MachineResult], dict]:
    started = time.perf_counter()
    results = evaluate(detector, root, progress_factory)
    summary = summarise(results, detector, root, time.perf_counter() - started, bootstrap)
    if out_dir is not None:
        write_outputs(results, summary, out_dir)
    return results, summary
