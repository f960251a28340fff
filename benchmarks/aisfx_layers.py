"""aisfx with its intermediate blocks as further outputs (issue 13): what the re-exported asset
costs per window and whether its first output is still the old embedding.

The old asset is read from git (``--old-commit``, the last commit before the block outputs;
nothing is checked out) or given as a file (``--old``); the new one is ``monitor/assets``'.
On real windows (10 s, or the clip's own length for the 5 s clips) of test clips of both
benchmark sets:

* equality: max |old embedding - new first output| over every window;
* speed: onnxruntime on the CPU, one window per call (as the daemon runs), the same session
  options for both files, the variants interleaved window by window in rotating order, so that
  load from other jobs on this shared machine falls on all of them alike. Variants: the old
  asset; the new one fetching only its embedding; the new one fetching every output (what a
  config listing aisfx with its blocks runs, once per window). The ratio to the old asset is
  the mean of per-window ratios, with a 95 % bootstrap interval over windows.

    .venv/bin/python benchmarks/aisfx_layers.py [--windows 60] [--repeats 3]

Results: ``benchmarks/results/aisfx_layers.json``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, SHARED_DATA, LoadMonitor, table, write_json

from monitor.audio.files import AudioFile
from monitor.scoring.backbone import ASSETS, Backbone, extra_outputs

# The last commit whose aisfx.onnx has the embedding only.
OLD_COMMIT = "446f801"
SETS = ("uav-noisy", "fan-noisy")
RESAMPLES = 1000


def old_asset(commit: str, folder: Path) -> Path:
    """``monitor/assets/aisfx.onnx`` as of ``commit``, written to ``folder`` (git is only read)."""
    blob = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:monitor/assets/aisfx.onnx"],
                          capture_output=True, check=True).stdout
    path = folder / "aisfx-old.onnx"
    path.write_bytes(blob)
    return path


def real_windows(backbone: Backbone, count: int) -> list[np.ndarray]:
    """``count`` windows, one per test clip, spread evenly over the clips of both sets."""
    clips = sorted(p for name in SETS for p in (SHARED_DATA / "bench" / name).glob("*/test/*.flac"))
    if not clips:
        raise SystemExit(f"no benchmark clips under {SHARED_DATA / 'bench'}")
    chosen = [clips[int(i)] for i in np.linspace(0, len(clips) - 1, min(count, len(clips)))]
    return [backbone.windows_of(AudioFile.open(path))[0][:1] for path in chosen]


def interval(ratios: np.ndarray, seed: int = 0) -> list[float]:
    """95 % bootstrap interval of the mean of ``ratios`` (resampling windows)."""
    rng = np.random.default_rng(seed)
    means = rng.choice(ratios, size=(RESAMPLES, len(ratios)), replace=True).mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, help="the old aisfx.onnx (default: from git, --old-commit)")
    parser.add_argument("--old-commit", default=OLD_COMMIT, help=f"commit to read the old asset from (default {OLD_COMMIT})")
    parser.add_argument("--windows", type=int, default=60, help="real windows (one per test clip; default 60)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per window and variant (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (default 0, as runtime.threads)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, LoadMonitor() as load:
        old = Backbone.load(args.old or old_asset(args.old_commit, Path(tmp)), "cpu", args.threads)
        new = Backbone.load(ASSETS / "aisfx.onnx", "cpu", args.threads)
        outputs = [new.meta.output_name, *extra_outputs(new.session, new.meta.output_name)]
        feed = new.meta.input_name
        variants = {
            "old asset": (old.session, [old.meta.output_name]),
            "new asset, embedding only": (new.session, [new.meta.output_name]),
            f"new asset, all outputs ({', '.join(outputs)})": (new.session, outputs),
        }
        windows = real_windows(new, args.windows)
        difference = max(float(np.max(np.abs(old.embed(w) - new.embed(w)))) for w in windows)
        scale = max(float(np.max(np.abs(old.embed(w)))) for w in windows)
        for session, names in variants.values():  # warm-up: first calls allocate the arena
            session.run(names, {feed: windows[0]})
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        order = list(variants)
        for i, window in enumerate(windows):
            for name in order[i % len(order):] + order[:i % len(order)]:
                session, names = variants[name]
                took = []
                for _ in range(args.repeats):
                    began = time.perf_counter()
                    session.run(names, {feed: window})
                    took.append(time.perf_counter() - began)
                seconds[name].append(min(took))
    base = np.array(seconds["old asset"])
    rows, results = [], {}
    for name, values in seconds.items():
        ratios = np.array(values) / base
        entry = {"median_ms": 1e3 * statistics.median(values), "mean_ms": 1e3 * statistics.fmean(values),
                 "ratio_to_old_mean": float(ratios.mean()), "ratio_to_old_95": interval(ratios)}
        results[name] = entry
        rows.append([name, entry["median_ms"], entry["mean_ms"], entry["ratio_to_old_mean"],
                     "[{:.3f}, {:.3f}]".format(*entry["ratio_to_old_95"])])
    table(["variant", "median ms/window", "mean ms/window", "ratio to old (mean)", "95%"], rows,
          title=f"aisfx per window, {len(windows)} real windows, best of {args.repeats} calls, interleaved")
    print(f"first output vs old embedding: max |difference| {difference:.3g} (embedding values up to {scale:.3g})")
    write_json("aisfx_layers", {
        "old": str(args.old or f"git {args.old_commit}:monitor/assets/aisfx.onnx"),
        "windows": len(windows), "repeats": args.repeats, "threads": args.threads, "outputs": outputs,
        "max_abs_difference_first_output": difference, "max_abs_embedding": scale,
        "per_window": results}, load)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
