"""Reduced precision: speed and detection score of fp32 vs ``--quantize int8`` vs ``--precision
fp16`` exports, on this machine's CPU.

Built-in backbones (real weights): each precision is exported, timed (onnxruntime CPU, one 10 s
window, batch 1, median) and evaluated with ``asd-monitor evaluate``'s own code
(``run_evaluation``: enroll the train normals, score the test clips, DCASE official score) on
the two benchmark sets in ``../shared/data/bench``. logmel has no weights: both conversions
leave it as it is, so it is not repeated here.

Exported backbones without their checkpoints (Dasheng, M2D, MuQ here): speed only, with random
weights; a detection score of random weights says nothing about the real ones.

"int8 incl. Conv" is an experiment, not an exporter option: it also quantises convolutions
(ConvInteger), with the similarity floor lowered to 0.9 so that its score can be measured.

    .venv/bin/python benchmarks/precision.py [--skip-eval] [--random dasheng-base ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCH = ROOT.parent / "shared" / "data" / "bench"
PRECISIONS = ("fp32", "int8", "fp16")


# (label, precision, ops dynamic quantisation rewrites (None: the exporter's QUANTIZED_OPS))
VARIANTS = [("fp32", "fp32", None), ("fp16", "fp16", None), ("int8", "int8", None),
            ("int8 incl. Conv", "int8", ("MatMul", "Gemm", "Conv"))]


def export(name: str, out: Path, precision: str, random_init: bool = False,
           ops: tuple[str, ...] | None = None) -> tuple[Path, float]:
    """An export as ``asd-export`` makes it; ``ops`` overrides the quantised layer types, and then
    the similarity floor is lowered to 0.9 so that the experiment's score can be measured."""
    from export import onnx_export
    from export.registry import EXPORTERS

    args = argparse.Namespace(checkpoint=None, random_init=random_init, sizes=None)
    module, meta = EXPORTERS[name].build(args)
    saved = onnx_export.QUANTIZED_OPS, dict(onnx_export.MIN_COSINE)
    if ops is not None:
        onnx_export.QUANTIZED_OPS = ops
        onnx_export.MIN_COSINE["int8"] = 0.9
        out = out / "experiment"
    try:
        started = time.perf_counter()
        path = onnx_export.export_backbone(module, meta, out, precision=precision)
        return path, time.perf_counter() - started
    finally:
        onnx_export.QUANTIZED_OPS = saved[0]
        onnx_export.MIN_COSINE.update(saved[1])


def speed(path: Path, repeats: int = 15) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    rate = int(meta["asd.sample_rate"])
    x = (0.1 * np.random.default_rng(0).standard_normal((1, 10 * rate))).astype(np.float32)
    session.run(None, {"waveform": x})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, {"waveform": x})
        times.append(time.perf_counter() - t)
    data = Path(str(path) + ".data")
    size = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    return {"seconds_per_window": round(statistics.median(times), 4), "size_mb": round(size / 1e6, 1)}


def interleaved_speed(paths: dict[str, Path], rounds: int) -> dict[str, dict]:
    """Seconds per 10 s window of several models, timed in turns (one run of each per round) so
    that load from other processes on the machine falls on all of them alike; the minimum over
    the rounds is the least disturbed figure."""
    import onnxruntime as ort

    sessions, inputs = {}, {}
    for label, path in paths.items():
        sessions[label] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        rate = int(sessions[label].get_modelmeta().custom_metadata_map["asd.sample_rate"])
        inputs[label] = (0.1 * np.random.default_rng(0).standard_normal((1, 10 * rate))).astype(np.float32)
        sessions[label].run(None, {"waveform": inputs[label]})
    times: dict[str, list[float]] = {label: [] for label in paths}
    for _ in range(rounds):
        for label, session in sessions.items():
            t = time.perf_counter()
            session.run(None, {"waveform": inputs[label]})
            times[label].append(time.perf_counter() - t)
    return {label: {"min_s": round(min(t), 4), "median_s": round(statistics.median(t), 4)} for label, t in times.items()}


def evaluate(path: Path, dataset: Path) -> dict:
    from monitor.config import config_from_dict
    from monitor.offline.evaluate import run_evaluation
    from monitor.scoring.detector import Detector

    config = config_from_dict({"backbones": [{"model": str(path)}], "runtime": {"provider": "cpu"}})
    started = time.perf_counter()
    _, summary = run_evaluation(Detector.from_config(config), dataset, None)
    return {"official_score": round(summary["official_score"], 4), "seconds": round(time.perf_counter() - started, 1),
            "machines": {m: {k: round(v, 4) for k, v in figs[list(figs)[0]].items() if isinstance(v, float)}
                         for m, figs in summary["machines"].items()}}


def embeddings_similarity(reference: Path, candidate: Path, dataset: Path, clips: int = 20) -> float:
    """Smallest cosine similarity between the two models' embeddings of real test clips."""
    from monitor.audio.files import load_audio
    from monitor.offline.dataset import scan_dataset
    from monitor.scoring.backbone import Backbone

    a, b = Backbone.load(reference, "cpu"), Backbone.load(candidate, "cpu")
    paths = [c.path for clips_ in scan_dataset(dataset).values() for c in clips_ if c.split == "test"][:clips]
    worst = 1.0
    for p in paths:
        windows, _ = a.windows_of(load_audio(p))
        x, y = a.embed(windows).astype(np.float64), b.embed(windows).astype(np.float64)
        cos = np.sum(x * y, 1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
        worst = min(worst, float(cos.min()))
    return round(worst, 6)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--builtin", action="append", default=None, help="built-in backbones (default: aisfx)")
    parser.add_argument("--random", action="append", default=[], help="exported backbones to time with random weights")
    parser.add_argument("--skip-eval", action="store_true", help="speed only")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of the interleaved timing")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "precision.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results: dict = {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        jobs = [(name, False) for name in (args.builtin or ["aisfx"])] + [(name, True) for name in args.random]
        for name, random_init in jobs:
            entry: dict = {}
            reference = None
            paths: dict[str, Path] = {}
            for label, precision, ops in VARIANTS:
                try:
                    path, seconds = export(name, out / name, precision, random_init, ops)
                except (ValueError, RuntimeError) as exc:  # int8 with nothing to quantise, a failed check
                    entry[label] = {"error": str(exc)}
                    print(name, label, entry[label], flush=True)
                    continue
                result = {"export_s": round(seconds, 1), **speed(path, repeats=5 if random_init else 15)}
                if label == "fp32":
                    reference = path
                elif not random_init:
                    result["min_cosine_vs_fp32_on_bench"] = embeddings_similarity(reference, path, BENCH / "uav-noisy")
                if not (args.skip_eval or random_init):
                    for dataset in ("uav-noisy", "fan-noisy"):
                        result[dataset] = evaluate(path, BENCH / dataset)
                entry[label] = result
                paths[label] = path
                print(name, label, json.dumps(result), flush=True)
            entry["interleaved timing"] = interleaved_speed(paths, rounds=args.rounds)
            print(name, "interleaved", json.dumps(entry["interleaved timing"]), flush=True)
            results[name + (" (random weights)" if random_init else "")] = entry
    args.json.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.json.read_text()) if args.json.exists() else {}
    args.json.write_text(json.dumps({**previous, **results}, indent=2) + "\n")
    print("| backbone | precision | size MB | s / 10 s window (min, interleaved) | speed-up | uav-noisy score | fan-noisy score |")
    print("|---|---|---|---|---|---|---|")
    for name, entry in results.items():
        if not isinstance(entry, dict):
            continue
        timing = entry.get("interleaved timing", {})
        for precision, r in entry.items():
            if precision == "interleaved timing":
                continue
            if "error" in r:
                print(f"| {name} | {precision} | {r['error']} | | | | |")
                continue
            seconds = timing.get(precision, {}).get("min_s", r["seconds_per_window"])
            base = timing.get("fp32", {}).get("min_s", entry["fp32"]["seconds_per_window"])
            scores = [f"{r[d]['official_score']:.3f}" if d in r else "-" for d in ("uav-noisy", "fan-noisy")]
            print(f"| {name} | {precision} | {r['size_mb']} | {seconds:.3f} | {base / seconds:.2f}x | {scores[0]} | {scores[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
