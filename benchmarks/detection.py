"""Detection quality: every benchmark set x every backbone available here x every fusion rule.

For each set in ``../shared/data/bench`` (read by path, skipped when absent) this runs
``monitor.offline.evaluate.evaluate_machine`` (what ``asd-monitor evaluate`` runs: enroll the train
split's normal clips, the domain as the operating condition; score every test clip, clip
score = max over its windows) once per backbone and metric (embeddings memoised: each clip is
embedded once per backbone), then fuses the clip scores of every
pair of backbones by rank with each rule and weighting (the fusion needs no new embedding, so it
is computed from the same clip scores) and reports the official DCASE figures: AUC source, AUC
target, pAUC and their harmonic mean.

Backbones here: the two built-in ONNX models, ``aisfx`` (a CNN pre-trained on sound-effect
libraries) and ``logmel`` (log-mel mean and std, no learning), each with the Mahalanobis
distance (the default) and the cosine one. Beside them, aisfx's intermediate blocks (issue 13;
further outputs of the same graph, ``backbones[].output``): ``aisfx.block2``, ``aisfx.block3``
and aisfx's embedding concatenated with block 3 (``output: embedding+block3``, each part
L2-normalised) alone with both distances, and the blocks' rank fusions with aisfx (mean 1:1,
the rule and weights fixed beforehand). The transformer backbones of the method (BEATs,
EAT, M2D, Dasheng, MuQ) are exported by ``asd-export`` from their official checkpoints, which
cannot be downloaded on these machines: with random weights their scores would measure
nothing, so they are not in this table. Run it with your own exports::

    .venv/bin/python benchmarks/detection.py                       # built-ins, a few minutes here
    .venv/bin/python benchmarks/detection.py --backbone eat=/path/eat.onnx --backbone m2d=/path/m2d.onnx

(``--backbone MODEL:OUTPUT`` takes a further output of a model file.)

Results: ``benchmarks/results/detection.json`` and ``detection.png``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from common import (
    RESULTS,
    SHARED_DATA,
    LoadMonitor,
    memoise_embeddings,
    table,
    write_json,
)

from monitor.config import (  # noqa: E402  (common puts the repository on sys.path)
    BackboneConfig,
    Config,
    FusionConfig,
    ScoringConfig,
)
from monitor.offline.dataset import scan_dataset  # noqa: E402
from monitor.offline.dcase import (  # noqa: E402
    BOOTSTRAP_LEVEL,
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    DEFAULT_MAX_FPR,
    Figures,
    bootstrap_intervals,
    bootstrap_weights,
    machine_figures,
    official_score,
    percentile_interval,
    resampled_figures,
)
from monitor.offline.evaluate import FUSED, evaluate_machine  # noqa: E402
from monitor.scoring.detector import Detector  # noqa: E402
from monitor.scoring.ranking import fuse, self_rank  # noqa: E402

SETS = ("uav-noisy", "fan-noisy")
METRICS = ("mahalanobis", "cosine")
RULES = ("mean", "max")
WEIGHTS = ((1.0, 1.0), (2.0, 1.0), (1.0, 2.0))
# The reference every system's difference is measured to: the daemon's default until issue 13
# (aisfx alone, Mahalanobis). The default since, "aisfx.embedding-block3 mahalanobis density", was
# chosen by its difference to this one; results/detection.json was measured against it.
DEFAULT_SYSTEM = "aisfx mahalanobis"
# Density-normalised KNN (scoring.normalisation: density) for these (model, metric) pairs, and
# Z-MIN fusion (fusion.rule: zmin, computed by the detector from its bank) of these pairs, each
# without and with density normalisation (issue 13).
# A model may name its output as in LAYERS: the concatenation with density normalisation is the
# pair that issue 13's first pass on other recordings found best together.
DENSITY = (("aisfx", "mahalanobis"), ("aisfx", "cosine"), ("logmel", "mahalanobis"),
           ("aisfx:embedding+block3", "mahalanobis"))
ZMIN_PAIRS = ((("aisfx", "mahalanobis"), ("logmel", "cosine")), (("aisfx", "mahalanobis"), ("logmel", "mahalanobis")))
# aisfx's intermediate blocks (graph outputs beside its embedding) and its embedding
# concatenated with block 3, measured alone with both metrics; the blocks' rank fusions with
# aisfx (all Mahalanobis, mean 1:1).
LAYERS = ("aisfx:block2", "aisfx:block3", "aisfx:embedding+block3")
LAYER_FUSIONS = (("aisfx", "aisfx.block3"), ("aisfx", "aisfx.block2"), ("aisfx", "aisfx.block2", "aisfx.block3"))


@dataclass
class System:
    """Clip scores of one system on one machine, with the test clips' labels."""

    name: str
    scores: np.ndarray
    figures: Figures


def backbone_config(spec: str, metric: str) -> BackboneConfig:
    """``MODEL`` or ``MODEL:OUTPUT`` (a further output of the model file) -> its config entry."""
    model, _, output = spec.partition(":")
    return BackboneConfig(model, metric=metric, output=output or None)


def single_systems(model: str, machine: str, clips) -> tuple[list[System], list[str], list[bool]]:
    """One evaluate run per metric of ``model`` (``MODEL[:OUTPUT]``) on one machine's clips,
    each labelled with the backbone's name and the metric."""
    out = []
    domains = labels = None
    for metric in METRICS:
        detector = Detector.from_config(Config(backbones=[backbone_config(model, metric)]))
        result = evaluate_machine(detector, machine, clips, lambda _n: None)
        (name,) = result.raw
        test = result.clips
        domains, labels = [c.domain for c in test], [c.is_anomaly for c in test]
        # A file's stem (two exports of one model differ there), a further output's backbone name.
        label = f"{name if ':' in model else Path(model).stem if model.endswith('.onnx') else model} {metric}"
        out.append(System(label, result.raw[name], result.figures[name]))
    return out, domains, labels


def layer_systems(singles: list[System], machine: str, clips, domains: list[str], labels: list[bool]) -> list[System]:
    """aisfx's intermediate blocks and its embedding concatenated with block 3, alone (both
    metrics), and the blocks' rank fusions with aisfx (all Mahalanobis, mean 1:1: what
    ``evaluate`` gives for a config listing them)."""
    out = []
    for spec in LAYERS:
        out += single_systems(spec, machine, clips)[0]
    by_name = {s.name: s for s in singles + out}
    for members in LAYER_FUSIONS:
        names = [f"{m} mahalanobis" for m in members]
        fused = fuse({n: self_rank(by_name[n].scores) for n in names}, dict.fromkeys(names, 1.0), "mean")
        out.append(System(" + ".join(names) + ", mean 1:1", fused, machine_figures(domains, labels, fused)))
    return out


def normalised_systems(models: list[str], machine: str, clips) -> list[System]:
    """Density-normalised single systems and Z-MIN fusions, each one evaluate run."""
    out = []
    # A density run is labelled once its backbone's name is known (a further output names it).
    runs: list[tuple[str | None, list[BackboneConfig], str, str]] = [
        (None, [backbone_config(m, metric)], "mean", "density") for m, metric in DENSITY if m.split(":")[0] in models]
    for (ma, a), (mb, b) in ZMIN_PAIRS:
        if ma in models and mb in models:
            for norm in ("none", "density"):
                suffix = " density" if norm == "density" else ""
                runs.append((f"{ma} {a} + {mb} {b}, zmin{suffix}", [BackboneConfig(ma, metric=a), BackboneConfig(mb, metric=b)],
                             "zmin", norm))
    for label, backbones, rule, norm in runs:
        config = Config(backbones=backbones, scoring=ScoringConfig(normalisation=norm), fusion=FusionConfig(rule=rule))
        result = evaluate_machine(Detector.from_config(config), machine, clips, lambda _n: None)
        if len(backbones) == 1:
            (name,) = result.raw
            out.append(System(label or f"{name} {backbones[0].metric} density", result.raw[name], result.figures[name]))
        else:
            out.append(System(label, result.fused, result.figures[FUSED]))
    return out


def fused_systems(singles: list[System], domains: list[str], labels: list[bool]) -> list[System]:
    """Rank fusion of every pair of single systems from different backbones."""
    out = []
    for a, b in itertools.combinations(singles, 2):
        if a.name.split()[0] == b.name.split()[0]:
            continue
        ranks = {a.name: self_rank(a.scores), b.name: self_rank(b.scores)}
        for rule, (wa, wb) in itertools.product(RULES, WEIGHTS):
            fused = fuse(ranks, {a.name: wa, b.name: wb}, rule)
            name = f"{a.name} + {b.name}, {rule} {wa:g}:{wb:g}"
            out.append(System(name, fused, machine_figures(domains, labels, fused)))
    return out


def figure_differences(clips_of: dict[str, tuple[list[str], list[bool]]], scores: dict[str, dict[str, np.ndarray]],
                       reference: str, resamples: int) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Per system and machine, the 95 % interval of AUC source, AUC target and pAUC minus the
    reference's, paired on the resamples ``bootstrap_intervals`` draws (same seed and order),
    so that each figure's change is read apart from the official score's."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    weights = {m: bootstrap_weights(d, y, resamples, rng) for m, (d, y) in clips_of.items()}

    def figures(system: str, machine: str) -> dict[str, np.ndarray]:
        domains, labels = clips_of[machine]
        return resampled_figures(domains, labels, scores[system][machine], weights[machine], DEFAULT_MAX_FPR)

    def intervals(system: str, machine: str, base: dict[str, np.ndarray]) -> dict[str, list[float]]:
        values = figures(system, machine)
        return {name: list(percentile_interval(values[name] - base[name], BOOTSTRAP_LEVEL))
                for name in ("auc_source", "auc_target", "pauc")}

    bases = {m: figures(reference, m) for m in clips_of}
    return {system: {m: intervals(system, m, bases[m]) for m in clips_of} for system in scores}


def evaluate_set(root: Path, models: list[str], resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, dict]:
    """Per system: the official figures of every machine and the set's overall score, and with
    ``resamples`` > 0 the 95 % bootstrap interval of that score and of its difference to
    ``DEFAULT_SYSTEM`` (paired: every system scored on the same resampled clips, so what the
    test clips do to both cancels in the difference), and per machine those of each figure and
    of each figure's difference to the default."""
    per_system: dict[str, dict] = {}
    clips_of: dict[str, tuple[list[str], list[bool]]] = {}
    scores: dict[str, dict[str, np.ndarray]] = {}
    for machine, clips in scan_dataset(root).items():
        singles: list[System] = []
        for model in models:
            systems, domains, labels = single_systems(model, machine, clips)
            singles += systems
        clips_of[machine] = (domains, labels)
        extra = normalised_systems(models, machine, clips)
        if "aisfx" in models:
            extra += layer_systems(singles, machine, clips, domains, labels)
        for system in singles + fused_systems(singles, domains, labels) + extra:
            entry = per_system.setdefault(system.name, {"machines": {}, "figures": []})
            entry["machines"][machine] = system.figures.to_dict()
            entry["figures"].append(system.figures)
            scores.setdefault(system.name, {})[machine] = system.scores
    for entry in per_system.values():
        entry["official"] = official_score(entry.pop("figures"))
    if resamples > 0:
        reference = DEFAULT_SYSTEM if DEFAULT_SYSTEM in scores else None
        began = time.perf_counter()
        boot = bootstrap_intervals(clips_of, scores, reference=reference, n_resamples=resamples)
        differences = figure_differences(clips_of, scores, reference, resamples) if reference is not None else {}
        took = time.perf_counter() - began
        print(f"{root.name}: bootstrap of {len(scores)} systems x {resamples} resamples in {took:.2f} s", flush=True)
        for name, entry in per_system.items():
            entry["official_95"] = boot["systems"][name]["official"]
            if reference is not None:
                entry["difference_to_default_95"] = boot["differences"][name]["official"]
            for machine, intervals in boot["machines"].items():
                entry["machines"][machine]["intervals_95"] = intervals[name]
                if name in differences:
                    entry["machines"][machine]["difference_to_default_95"] = differences[name][machine]
    return per_system


def plot(results: dict[str, dict[str, dict]], path: Path, fusions: int = 8) -> None:
    """Horizontal bars of the official score: the single systems and the ``fusions`` best fusions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(results)
    rows = max(sum("+" not in s for s in systems) for systems in results.values()) + fusions
    fig, axes = plt.subplots(1, len(sets), figsize=(10 * len(sets), 0.3 * rows + 1.8), squeeze=False)
    for ax, name in zip(axes[0], sets):
        systems = results[name]
        singles = [s for s in systems if "+" not in s]
        fused = sorted((s for s in systems if "+" in s), key=lambda s: -systems[s]["official"])[:fusions]
        chosen = sorted(singles + fused, key=lambda s: systems[s]["official"])
        values = [systems[s]["official"] for s in chosen]
        intervals = [systems[s].get("official_95") or [v, v] for s, v in zip(chosen, values)]
        errors = np.array([[v - low for (low, _), v in zip(intervals, values)],
                           [high - v for (_, high), v in zip(intervals, values)]])
        ax.barh(range(len(chosen)), values, xerr=errors, error_kw={"elinewidth": 0.8, "capsize": 2},
                color=["tab:blue" if "+" not in s else "tab:orange" for s in chosen])
        ax.set_yticks(range(len(chosen)), chosen, fontsize=7)
        ax.set_xlim(min(low for low, _ in intervals) - 0.02, 1.0)
        ax.set_title(f"{name}: official score, 95 % bootstrap interval", fontsize=9)
        for i, (v, (_, high)) in enumerate(zip(values, intervals)):
            ax.text(high, i, f" {v:.3f}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def leave_one_set_out(results: dict[str, dict[str, dict]]) -> list[dict]:
    """Choose on one set, read on the other: the system with the best official score on each
    set, and what it scores (with its paired difference to the default) on every other set.
    A setting tuned to one small set shows here as a loss, or a difference spanning zero, on
    the set it was not chosen on."""
    out = []
    for chosen_on, systems in results.items():
        best = max(systems, key=lambda name: systems[name]["official"])
        for read_on, others in results.items():
            if read_on != chosen_on and best in others:
                entry = others[best]
                out.append({"chosen_on": chosen_on, "system": best, "read_on": read_on,
                            "official": entry["official"], "official_95": entry.get("official_95"),
                            "difference_to_default_95": entry.get("difference_to_default_95")})
    return out


def _interval(pair: list[float] | None, signed: bool = False) -> str:
    """``[low, high]`` to 3 decimals for the table, ``-`` without one."""
    if not pair:
        return "-"
    sign = "+" if signed else ""
    return f"[{pair[0]:{sign}.3f}, {pair[1]:{sign}.3f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated names under ../shared/data/bench")
    parser.add_argument("--backbone", action="append", default=[], metavar="MODEL",
                        help="a built-in name or an exported .onnx (repeatable; default: aisfx and logmel)")
    parser.add_argument("--name", default="detection", help="results file: benchmarks/results/NAME.json")
    parser.add_argument("--bootstrap", type=int, default=BOOTSTRAP_RESAMPLES, metavar="N",
                        help=f"resamples for the 95%% intervals (default {BOOTSTRAP_RESAMPLES}; 0: none)")
    args = parser.parse_args()
    models = args.backbone or ["aisfx", "logmel"]
    memoise_embeddings()
    results: dict[str, dict[str, dict]] = {}
    seconds: dict[str, float] = {}
    with LoadMonitor() as load:
        for name in [s for s in args.sets.split(",") if s]:
            root = SHARED_DATA / "bench" / name
            if not root.is_dir():
                print(f"skipping {name}: {root} not found", file=sys.stderr)
                continue
            began = time.perf_counter()
            results[name] = evaluate_set(root, models, args.bootstrap)
            seconds[name] = round(time.perf_counter() - began, 1)
            print(f"{name}: {len(results[name])} systems in {seconds[name]} s", flush=True)
    if not results:
        print("no benchmark set found: nothing measured", file=sys.stderr)
        return 1
    for name, systems in results.items():
        rows = [[system, machine, f["auc_source"], f["auc_target"], f["pauc"], entry["official"],
                 _interval(entry.get("official_95")), _interval(entry.get("difference_to_default_95"), signed=True)]
                for system, entry in sorted(systems.items(), key=lambda kv: -kv[1]["official"])
                for machine, f in entry["machines"].items()]
        table(["system", "machine", "AUC src", "AUC tgt", "pAUC", "official (set)", "95%",
               f"minus {DEFAULT_SYSTEM}, 95%"], rows,
              title=f"{name} (sorted by the set's official score; intervals: paired stratified bootstrap)")
    crossed = leave_one_set_out(results)
    table(["chosen on", "best system there", "read on", "official", "95%", f"minus {DEFAULT_SYSTEM}, 95%"],
          [[c["chosen_on"], c["system"], c["read_on"], c["official"], _interval(c["official_95"]),
            _interval(c["difference_to_default_95"], signed=True)] for c in crossed],
          title="leave one set out: the best system of one set, read on the other")
    write_json(args.name, {"backbones": models, "metrics": list(METRICS), "rules": list(RULES),
                           "weights": [list(w) for w in WEIGHTS], "seconds": seconds,
                           "bootstrap": {"resamples": args.bootstrap, "seed": 0, "level": 0.95,
                                         "reference": DEFAULT_SYSTEM,
                                         "strata": "per machine: source normals, target normals, anomalies"},
                           "sets": results, "leave_one_set_out": crossed}, load)
    plot(results, RESULTS / f"{args.name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
