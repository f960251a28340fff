"""Export figures for the Dasheng (base, 0.6B, 1.2B), M2D and MuQ exporters, with random weights
at full size (no checkpoint is needed for time, size and memory).

Per backbone, each step in its own process so that peak memory is that step's:
  export   asd-export's export_backbone (torch -> ONNX, metadata, parity checks at three lengths):
           wall time, output size (graph + external data), peak RSS
  torch    eager torch, one 10 s window, batch 1: median seconds per window, peak RSS
  onnx     onnxruntime CPU, same input: median seconds per window, peak RSS (what the daemon holds)
and optionally the same for a ``--quantize int8`` export. Prints a table, writes JSON.

    .venv/bin/python benchmarks/export_dasheng_m2d_muq.py [--only dasheng-base ...] [--int8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import rss_mb  # noqa: E402

NAMES = ["dasheng-base", "m2d", "muq", "dasheng-0.6b", "dasheng-1.2b"]



def _window(name: str):
    import numpy as np

    rate = {"muq": 24000}.get(name, 16000)
    rng = np.random.default_rng(0)
    return (0.1 * rng.standard_normal((1, 10 * rate))).astype(np.float32)


def _build(name: str):
    from export.registry import EXPORTERS

    args = argparse.Namespace(checkpoint=None, random_init=True, sizes=None)
    return EXPORTERS[name].build(args)


def step_export(name: str, out: Path, precision: str) -> dict:
    import torch

    from export.onnx_export import DATA_SUFFIX, export_backbone

    torch.manual_seed(0)
    started = time.perf_counter()
    module, meta = _build(name)
    built = time.perf_counter() - started
    path = export_backbone(module, meta, out, precision=precision)
    seconds = time.perf_counter() - started
    data = Path(str(path) + DATA_SUFFIX)
    return {"export_s": round(seconds, 1), "build_s": round(built, 1), "path": str(path),
            "onnx_mb": round(path.stat().st_size / 1e6, 1),
            "data_mb": round(data.stat().st_size / 1e6, 1) if data.exists() else 0.0,
            "parameters_m": round(sum(p.numel() for p in module.parameters()) / 1e6, 1),
            "embedding_dim": meta.embedding_dim, "sample_rate": meta.sample_rate,
            "export_peak_rss_mb": round(rss_mb("VmHWM"))}


def _median_time(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def step_torch(name: str, repeats: int) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    module, _ = _build(name)
    x = torch.from_numpy(_window(name))
    with torch.inference_mode():
        seconds = _median_time(lambda: module(x), repeats)
    return {"torch_s": round(seconds, 3), "torch_peak_rss_mb": round(rss_mb("VmHWM"))}


def step_onnx(path: str, name: str, repeats: int) -> dict:
    import onnxruntime as ort

    started = time.perf_counter()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    load = time.perf_counter() - started
    x = _window(name)
    seconds = _median_time(lambda: session.run(None, {"waveform": x}), repeats)
    return {"onnx_s": round(seconds, 3), "onnx_load_s": round(load, 1), "onnx_peak_rss_mb": round(rss_mb("VmHWM"))}


def step_interleaved(name: str, out: Path, rounds: int) -> dict:
    """torch eager and onnxruntime timed in turns in one process (one window each per round), so
    that load from other processes falls on both alike; minimum and median over the rounds."""
    import onnxruntime as ort
    import torch

    from export.onnx_export import export_backbone

    torch.set_num_threads(os.cpu_count() or 1)
    module, meta = _build(name)
    path = export_backbone(module, meta, out)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _window(name)
    tx = torch.from_numpy(x)
    runs = {"torch": lambda: module(tx), "onnx": lambda: session.run(None, {"waveform": x})}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for run in runs.values():
            run()
        for _ in range(rounds):
            for key, run in runs.items():
                t = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - t)
    result = {f"{k}_{f.__name__}_s": round(f(v), 3) for k, v in times.items() for f in (min, statistics.median)}
    result["onnx_over_torch_min"] = round(result["onnx_min_s"] / result["torch_min_s"], 2)
    return result


def _child(step: str, *args: str, timeout: float) -> dict:
    command = [sys.executable, __file__, "--step", step, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": f"{step} failed: {' | '.join(tail)}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(names: list[str], int8: bool, out_root: Path, timeout: float) -> dict:
    results: dict = {}
    for name in names:
        entry: dict = {}
        repeats = "5" if name in ("dasheng-base", "m2d") else "3"
        with tempfile.TemporaryDirectory(dir=out_root) as tmp:
            entry.update(_child("export", name, tmp, "fp32", timeout=timeout))
            if "path" in entry:
                entry.update(_child("onnx", entry["path"], name, repeats, timeout=timeout))
            entry.update(_child("torch", name, repeats, timeout=timeout))
            if int8 and "path" in entry:
                q = _child("export", name, tmp, "int8", timeout=timeout)
                entry["int8"] = q
                if "path" in q:
                    q.update(_child("onnx", q["path"], name, repeats, timeout=timeout))
        results[name] = entry
        print(name, json.dumps(entry), flush=True)
    return results


def table(results: dict) -> str:
    head = ("| backbone | params | export s | ONNX size | ORT s / 10 s window | torch s | ORT / torch | "
            "peak RSS export / torch / ORT (GB) | int8: size, ORT s |")
    rows = [head, "|" + "---|" * 9]
    for name, r in results.items():
        if "error" in r and "onnx_s" not in r:
            rows.append(f"| {name} | {r['error']} |" + " |" * 7)
            continue
        size = (r["onnx_mb"] + r["data_mb"]) / 1000
        external = " (external data)" if r["data_mb"] else ""
        q = r.get("int8") or {}
        int8 = (f"{(q['onnx_mb'] + q['data_mb']) / 1000:.2f} GB, {q['onnx_s']:.2f}" if "onnx_s" in q
                else (q.get("error", "-")[:60] if q else "-"))
        rows.append(
            f"| {name} | {r['parameters_m']:.0f}M | {r['export_s']:.0f} | {size:.2f} GB{external} | {r.get('onnx_s', float('nan')):.2f} | "
            f"{r.get('torch_s', float('nan')):.2f} | {r.get('onnx_s', float('nan')) / r.get('torch_s', float('nan')):.2f} | "
            f"{r['export_peak_rss_mb'] / 1024:.1f} / {r.get('torch_peak_rss_mb', 0) / 1024:.1f} / "
            f"{r.get('onnx_peak_rss_mb', 0) / 1024:.1f} | {int8} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=NAMES)
    parser.add_argument("--int8", action="store_true", help="also export and time --quantize int8")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()), help="scratch folder (needs ~10 GB)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per step")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "export_dasheng_m2d_muq.json")
    parser.add_argument("--interleaved", type=int, metavar="ROUNDS",
                        help="only time torch and onnxruntime in turns, ROUNDS rounds (a check of the ratio on a busy machine)")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:  # a child: one measurement, one JSON line
        import logging

        logging.basicConfig(level=logging.WARNING)
        a = args.args
        result = {"export": lambda: step_export(a[0], Path(a[1]), a[2]),
                  "interleaved": lambda: step_interleaved(a[0], Path(a[1]), int(a[2])),
                  "torch": lambda: step_torch(a[0], int(a[1])),
                  "onnx": lambda: step_onnx(a[0], a[1], int(a[2]))}[args.step]()
        print(json.dumps(result))
        return 0
    if args.interleaved:
        timings = {}
        for name in args.only or NAMES:
            with tempfile.TemporaryDirectory(dir=args.out) as tmp:
                timings[name] = _child("interleaved", name, tmp, str(args.interleaved), timeout=args.timeout)
            print(name, json.dumps(timings[name]), flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(args.json.read_text()) if args.json.exists() else {}
        args.json.write_text(json.dumps({**previous, "interleaved": {**previous.get("interleaved", {}), **timings}},
                                        indent=2) + "\n")
        return 0
    results = run(args.only or NAMES, args.int8, args.out, args.timeout)
    machine = {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.json.read_text()) if args.json.exists() else {}
    merged = {**previous.get("backbones", {}), **results}
    args.json.write_text(json.dumps({**previous, "machine": machine, "backbones": merged}, indent=2) + "\n")
    print(table(merged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
