"""Full-size BEATs and EAT exports with random weights: export time, ONNX size, CPU time per
10 s window (onnxruntime against torch eager on the same machine) and peak memory.

Each measurement runs in its own process so that its peak resident memory (VmHWM) is its
own: the export (build + dynamo export + onnxruntime parity check), onnxruntime inference
alone (the daemon's situation) and torch eager inference alone. The ORT/torch ratio comes from a
further process that alternates the two engines run by run (median of the per-pair ratios), so
that other load on the machine slows both alike.

    .venv/bin/python benchmarks/export_beats_eat.py                 # beats, eat (base)
    .venv/bin/python benchmarks/export_beats_eat.py --models beats eat eat-large --runs 10

Prints a table and writes the figures as JSON (``--json``).
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

MODELS = ("beats", "eat", "eat-large")


def _build(name: str):  # -> (module, metadata)
    import torch

    from export import beats, eat
    from export.contract import metadata

    torch.manual_seed(0)
    if name == "beats":
        cfg = beats.parse_config(dict(beats.BASE_CONFIG), "random-init")
        module = beats.BeatsBackbone(beats.build_model(cfg, None, "random-init"), int(cfg["encoder_layers"]))
        return module.eval(), metadata("beats", 16000, int(cfg["encoder_embed_dim"]), "benchmark", beats.LICENCE)
    arch = dict(eat.LARGE if name == "eat-large" else eat.BASE)
    module = eat.EatBackbone(eat.build_model(arch, None, "random-init"), arch["depth"], "cls")
    return module.eval(), metadata(name, 16000, arch["embed_dim"], "benchmark", eat.LICENCE)



def _window(batch: int = 1):
    import numpy as np

    from tests.synth import machine_sound

    return np.stack([machine_sound(20 + i, 10.0) for i in range(batch)])


def child_export(name: str, out: Path) -> dict:
    from export.onnx_export import export_backbone

    started = time.perf_counter()
    module, meta = _build(name)
    path = export_backbone(module, meta, out)
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in out.iterdir() if p.name.startswith(path.name))
    return {"export_s": seconds, "onnx_mb": size / 1e6, "export_peak_mb": rss_mb("VmHWM"), "path": str(path),
            "parameters_m": sum(p.numel() for p in module.parameters()) / 1e6}


def _timed(run, runs: int) -> list[float]:
    run()  # warm-up (allocations, onnxruntime's first-run planning)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times


def child_ort(path: str, runs: int) -> dict:
    import onnxruntime as ort

    x = _window()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    times = _timed(lambda: session.run(None, {"waveform": x}), runs)
    return {"ort_s": statistics.median(times), "ort_peak_mb": rss_mb("VmHWM")}


def child_torch(name: str, runs: int) -> dict:
    import torch

    module, _ = _build(name)
    x = torch.from_numpy(_window())
    with torch.inference_mode():
        times = _timed(lambda: module(x), runs)
    return {"torch_s": statistics.median(times), "torch_peak_mb": rss_mb("VmHWM"), "torch_threads": torch.get_num_threads()}


def child_pair(name: str, path: str, runs: int) -> dict:
    """Both engines in one process, runs alternated: the ratio stays meaningful when other work
    shares the CPU and slows both alike (peak memory comes from the single-engine children)."""
    import onnxruntime as ort
    import torch

    module, _ = _build(name)
    x = _window()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        xt = torch.from_numpy(x)
        module(xt)
        session.run(None, {"waveform": x})
        ort_times, torch_times = [], []
        for _ in range(runs):
            started = time.perf_counter()
            session.run(None, {"waveform": x})
            ort_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            module(xt)
            torch_times.append(time.perf_counter() - started)
    return {"pair_ort_s": statistics.median(ort_times), "pair_torch_s": statistics.median(torch_times),
            "ort_over_torch": statistics.median(o / t for o, t in zip(ort_times, torch_times))}


def _child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=["beats", "eat"])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per engine (median reported)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "export_beats_eat.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "export":
            result = child_export(rest[0], Path(rest[1]))
        elif kind == "ort":
            result = child_ort(rest[0], int(rest[1]))
        elif kind == "pair":
            result = child_pair(rest[0], rest[1], int(rest[2]))
        else:
            result = child_torch(rest[0], int(rest[1]))
        print(json.dumps(result))
        return 0

    import onnxruntime
    import torch

    rows = []
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            row = {"model": name, **_child("export", name, tmp)}
            path = row.pop("path")
            row.update(_child("ort", path, str(args.runs)))
            row.update(_child("torch", name, str(args.runs)))
            row.update(_child("pair", name, path, str(args.runs)))
        rows.append(row)
        print(f"{name}: {json.dumps(row)}", file=sys.stderr)
    load = os.getloadavg()[0]
    machine = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
               "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
               "runs": args.runs, "batch": 1, "window_s": 10.0, "load_average_1min_at_end": load}
    header = (f"{'model':10s} {'params M':>8s} {'export s':>8s} {'ONNX MB':>8s} {'ORT s/win':>9s} {'torch s/win':>11s} "
              f"{'ORT/torch':>9s} {'peak MB export/ORT/torch':>26s}")
    print(header)
    for r in rows:
        peaks = f"{r['export_peak_mb']:.0f}/{r['ort_peak_mb']:.0f}/{r['torch_peak_mb']:.0f}"
        print(f"{r['model']:10s} {r['parameters_m']:8.1f} {r['export_s']:8.1f} {r['onnx_mb']:8.1f} {r['pair_ort_s']:9.3f} "
              f"{r['pair_torch_s']:11.3f} {r['ort_over_torch']:9.2f} {peaks:>26s}")
    print(f"(s/win and ORT/torch from the alternating runs; load average at the end {load:.2f} on {os.cpu_count()} CPUs)")
    args.json.write_text(json.dumps({"machine": machine, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
