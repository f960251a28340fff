"""Evaluation outputs: the official evaluator's CSV files, a JSON summary, plots and a console table.

Every file is written to a temporary name and renamed into place, so that a daemon killed
mid-write, or a reader polling the output folder, never sees a truncated file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from monitor.errors import ReportError
from monitor.offline.dcase import auc, roc_curve

log = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
FUSED = "fused"
# Alignment needs a fixed decimals count; three is what DCASE result tables print.
TABLE_DECIMALS = 3
# Shared bin edges for normals and anomalies; test sets have tens to hundreds of clips per machine.
HIST_BINS = 30


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a synced temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def official_csv_names(machine: str) -> tuple[str, str]:
    """File names the official evaluator expects: (anomaly scores, decisions) of section 00."""
    return (
        f"anomaly_score_{machine}_section_00_test.csv",
        f"decision_result_{machine}_section_00_test.csv",
    )


def write_official_csv(
    out_dir: Path,
    machine: str,
    names: Sequence[str | os.PathLike[str]],
    scores: ArrayLike,
    decisions: ArrayLike,
) -> tuple[Path, Path]:
    """Write the score and decision CSVs in the official evaluator's input format.

    One ``<file name>,<value>`` line per clip, no header; the file name is the clip's base
    name with extension, as the evaluator matches it against its ground-truth list. Scores
    are written with full precision (``repr``) so that ranks, and thus AUCs, survive the
    round trip. Returns the (scores, decisions) paths.
    """
    if not machine or any(sep in machine for sep in "/\\"):
        raise ReportError(f"machine name {machine!r} is empty or contains a path separator")
    base = [Path(name).name for name in names]
    s = np.asarray(scores, dtype=float)
    dec = np.asarray(decisions)
    if s.shape != (len(base),) or dec.shape != (len(base),):
        raise ReportError(f"{machine}: {len(base)} names but scores {s.shape} and decisions {dec.shape}")
    if not np.isfinite(s).all():
        raise ReportError(f"{machine}: scores hold NaN or infinite values")
    if not np.isin(dec, (0, 1)).all():
        raise ReportError(f"{machine}: decisions must be 0/1 or booleans")
    bad = next((b for b in base if not b or "," in b or "\n" in b), None)
    if bad is not None:
        raise ReportError(f"{machine}: file name {bad!r} cannot be written as a CSV field")

    score_name, decision_name = official_csv_names(machine)
    out_dir = Path(out_dir)
    score_path, decision_path = out_dir / score_name, out_dir / decision_name
    _atomic_write_text(score_path, "".join(f"{b},{float(v)!r}\n" for b, v in zip(base, s, strict=True)))
    _atomic_write_text(decision_path, "".join(f"{b},{int(v)}\n" for b, v in zip(base, dec, strict=True)))
    log.info("wrote %s and %s (%d clips)", score_path, decision_path, len(base))
    return score_path, decision_path


def to_json(value: Mapping[str, Any]) -> str:
    """Strict JSON text (NaN as null) of a results mapping, as written to ``results.json``."""
    return json.dumps(_jsonable(value), sort_keys=True, indent=2, allow_nan=False) + "\n"


def _jsonable(value: Any) -> Any:
    """Plain JSON types: numpy values unwrapped, tuples as lists, NaN and infinities as null."""
    if isinstance(value, Mapping):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results_json(out_dir: Path, results: Mapping[str, Any]) -> Path:
    """Write ``results.json`` atomically: sorted keys, indent 2, NaN written as null.

    JSON has no NaN; null keeps the file readable by strict parsers (browsers, jq) while
    still saying "undefined", e.g. for an AUC of a domain without normal clips.
    """
    path = Path(out_dir) / RESULTS_JSON
    _atomic_write_text(path, to_json(results))
    log.info("wrote %s", path)
    return path


@dataclass(frozen=True)
class MachinePlot:
    """One machine's test clips for the evaluation plot."""

    labels: np.ndarray  # bool per clip: True for an anomaly
    domains: Sequence[str | None]  # "source", "target" or None per clip
    systems: Mapping[str, np.ndarray]  # clip scores per system, one ROC curve each
    decision: np.ndarray  # per clip: the daemon's decision score (highest fused rank against the bank)
    threshold: float  # alerts.threshold: a clip is flagged above it


def plot_machines(out_path: Path, per_machine: Mapping[str, MachinePlot]) -> Path:
    """Save a PNG with one row per machine: ROC curves of every system (source and target
    clips pooled, so the AUC in the legend is the pooled one, not a DCASE column), and where
    the daemon's decision score puts each kind of clip relative to its threshold.

    A system whose clips hold one class only has no ROC and is left out with a warning.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not per_machine or not all(m.systems for m in per_machine.values()):
        raise ReportError(f"{out_path}: nothing to plot (every machine needs at least one system)")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(per_machine), 2, figsize=(11.0, 3.8 * len(per_machine)), squeeze=False)
    try:
        for (machine, data), (roc_ax, hist_ax) in zip(per_machine.items(), axes, strict=True):
            y = np.asarray(data.labels, dtype=bool)
            roc_ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1, label="chance")
            for system, scores in data.systems.items():
                if y.all() or not y.any():
                    log.warning("%s/%s: one class only, no ROC curve drawn", machine, system)
                    continue
                fpr, tpr = roc_curve(y, scores)
                roc_ax.plot(fpr, tpr, linewidth=2 if system == FUSED else 1.2,
                            label=f"{system} (pooled AUC {auc(y, scores):.3f})")
            roc_ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (normals flagged)",
                       ylabel="true positive rate (anomalies caught)", title=f"{machine}: ROC, source + target")
            roc_ax.legend(loc="lower right", fontsize="small")
            roc_ax.grid(alpha=0.3)

            decision = np.asarray(data.decision, dtype=float)
            bins = np.histogram_bin_edges(np.append(decision, data.threshold), bins=HIST_BINS)
            domains = np.array([d or "" for d in data.domains])
            for anomalous, name in ((False, "normal"), (True, "anomaly")):
                for domain in sorted(set(domains[y == anomalous])):
                    chosen = decision[(y == anomalous) & (domains == domain)]
                    label = f"{name}{f', {domain}' if domain else ''} (n={chosen.size})"
                    hist_ax.hist(chosen, bins=bins, histtype="step", linewidth=1.6,
                                 linestyle="-" if domain != "target" else "--", label=label,
                                 color="tab:red" if anomalous else "tab:blue")
            hist_ax.axvline(data.threshold, color="black", linewidth=1, label=f"threshold {data.threshold:g}")
            hist_ax.set(xlabel="highest fused rank against the bank (the daemon's decision score)", ylabel="clips",
                        title=f"{machine}: clips flagged above the threshold")
            hist_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            hist_ax.legend(fontsize="small")
            hist_ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_path, format="png", dpi=100)
    finally:
        plt.close(fig)
    log.info("wrote %s", out_path)
    return out_path


def _cell(value: Any) -> str:
    """Text of one table cell: floats with fixed decimals, missing values blank."""
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.{TABLE_DECIMALS}f}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Plain aligned text table for the console: numbers right-aligned, text left-aligned."""
    if not columns:
        raise ReportError("format_table needs at least one column")
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    numeric = [
        all(isinstance(row.get(col), (int, float, np.number)) and not isinstance(row.get(col), bool)
            for row in rows if row.get(col) is not None)
        for col in columns
    ]
    widths = [max([len(col), *(len(r[i]) for r in cells)]) for i, col in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    return "\n".join([line(list(columns)), line(["-" * w for w in widths]), *(line(r) for r in cells)])
