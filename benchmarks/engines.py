"""onnxruntime against torch eager, per backbone, on the same input in one process, at 1 and 2
threads each: which engine and thread setting to run on a 2-core box.

Per backbone the exporter builds the module (``aisfx``: its real weights; the transformers:
full size with random weights, which time like trained ones) and exports it to ONNX in a
temporary folder. Then four settings run in interleaved rounds on one 10 s window, batch 1,
so that other load on the shared machine slows them alike: torch with
``torch.set_num_threads(1 | 2)`` and an onnxruntime CPU session with ``intra_op_num_threads``
1 | 2 (what ``runtime.threads`` sets in the daemon). Reported: the median seconds per window of
each setting, ONNX/torch at each thread count and best against best (median of the per-round
ratios).

    .venv/bin/python benchmarks/engines.py                                 # aisfx, beats, eat, dasheng-base, m2d
    .venv/bin/python benchmarks/engines.py --models aisfx muq --rounds 7

Results: ``benchmarks/results/engines.json``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import LoadMonitor, table, write_json

MODELS = ("aisfx", "beats", "eat", "dasheng-base", "m2d")
THREADS = (1, 2)


def build(name: str, out: Path):
    """The exporter's module (eval mode) and its ONNX export under ``out``."""
    import torch

    from export.cli import build_parser
    from export.onnx_export import export_backbone
    from export.registry import EXPORTERS

    argv = [name, "--out", str(out)] + ([] if EXPORTERS[name].builtin else ["--random-init"])
    args = build_parser().parse_args(argv)
    torch.manual_seed(0)
    module, meta = EXPORTERS[name].build(args)
    return module.eval(), export_backbone(module, meta, out), meta.sample_rate


def measure(name: str, rounds: int) -> dict:
    import onnxruntime as ort
    import torch

    from monitor.audio.files import resample
    from tests.synth import RATE, machine_sound

    with tempfile.TemporaryDirectory(prefix=f"asd-engines-{name}-") as tmp:
        began = time.perf_counter()
        module, path, rate = build(name, Path(tmp))
        export_s = time.perf_counter() - began
        window = resample(machine_sound(7, 10.0), RATE, rate)[None, :]
        sessions = {}
        for threads in THREADS:
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            sessions[threads] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        x = torch.from_numpy(window)

        def run(engine: str, threads: int) -> float:
            began = time.perf_counter()
            if engine == "torch":
                torch.set_num_threads(threads)
                module(x)
            else:
                sessions[threads].run(None, {"waveform": window})
            return time.perf_counter() - began

        settings = [(engine, threads) for engine in ("torch", "onnxruntime") for threads in THREADS]
        times: dict[tuple[str, int], list[float]] = {s: [] for s in settings}
        with torch.inference_mode():
            for setting in settings:
                run(*setting)  # warm-up: allocations, onnxruntime's first-run planning
            for _ in range(rounds):
                for setting in settings:
                    times[setting].append(run(*setting))
        torch.set_num_threads(max(THREADS))

    median = {f"{engine} {threads}": statistics.median(v) for (engine, threads), v in times.items()}
    best_torch = min(THREADS, key=lambda t: median[f"torch {t}"])
    best_ort = min(THREADS, key=lambda t: median[f"onnxruntime {t}"])

    def ratio(ort_threads: int, torch_threads: int) -> float:
        return statistics.median(o / t for o, t in zip(times[("onnxruntime", ort_threads)], times[("torch", torch_threads)]))

    return {"export_s": round(export_s, 1), "seconds_per_window": {k: round(v, 4) for k, v in median.items()},
            "ort_over_torch": {f"{t} thread(s)": round(ratio(t, t), 3) for t in THREADS},
            "best_torch_threads": best_torch, "best_ort_threads": best_ort,
            "ort_over_torch_best": round(ratio(best_ort, best_torch), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help=f"exporter names (default: {' '.join(MODELS)})")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per setting")
    args = parser.parse_args()
    results = {}
    with LoadMonitor() as load:
        for name in args.models:
            results[name] = measure(name, args.rounds)
            print(f"{name}: {results[name]}", flush=True)
    rows = []
    for name, r in results.items():
        s = r["seconds_per_window"]
        rows.append([name, s["torch 1"], s["torch 2"], s["onnxruntime 1"], s["onnxruntime 2"],
                     r["ort_over_torch"]["1 thread(s)"], r["ort_over_torch"]["2 thread(s)"],
                     f"ORT {r['best_ort_threads']} / torch {r['best_torch_threads']}", r["ort_over_torch_best"]])
    table(["backbone", "torch 1 thr s", "torch 2 thr s", "ORT 1 thr s", "ORT 2 thr s", "ORT/torch 1", "ORT/torch 2",
           "best threads", "ORT/torch best"], rows,
          title=f"seconds per 10 s window (median of {args.rounds} interleaved rounds), batch 1")
    write_json("engines", {"rounds": args.rounds, "threads": list(THREADS), "models": results}, load)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
