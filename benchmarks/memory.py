"""Memory of ``asd-monitor enroll`` against the length of a recording, and the embeddings of the
block-by-block path against the whole-file path it replaced.

Enrollment, ``score`` and ``evaluate`` read a file a block at a time, resample it as a stream and
embed ``BATCH_WINDOWS`` windows per onnxruntime call (``Detector.embed``). Before, they decoded
and resampled the whole file and sent every window to onnxruntime at once: a 10-minute file
peaked at 3.4 GB, a 1-hour one did not fit.

* Peak RSS: ``asd-monitor enroll`` in a fresh child process (its VmHWM, read by the child as it
  ends) on generated WAVs of synthetic machine sound (``tests/synth.py``) of 1, 10 and 60 minutes,
  16 kHz, written a minute at a time so that the generator stays small. Flat means within 100 MB.
* The whole-file path, kept here as the reference (``load_audio``, ``resample`` of the whole,
  ``fit_windows``, one ``Backbone.embed`` call), in a child of its own on the shorter files: its
  peak RSS, and the largest difference between its embeddings and ``Detector.embed``'s.
* The batch size: ``enroll`` of a 3-minute file with ``BATCH_WINDOWS`` set to 1, 2, 4 and 8 (peak
  RSS, time per window with the model already loaded, difference to the whole-file path), the
  figures behind the constant.

    .venv/bin/python benchmarks/memory.py                    # the default backbone, about 4 min on 2 cores
    .venv/bin/python benchmarks/memory.py --minutes 1,10 --backbone logmel

Enrollment keeps every output of the model (aisfx: its embedding, block 2 and block 3) whatever
the backbone; the embeddings compared are the backbone's own (the default: aisfx's embedding
and block 3 concatenated).

Results: ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from common import ROOT, LoadMonitor, table, write_json

import monitor.scoring.detector as detector_module  # noqa: E402  (common puts the repository on sys.path)
from monitor.audio.files import AudioFile  # noqa: E402
from monitor.config import BackboneConfig, Config  # noqa: E402
from monitor.scoring.detector import BATCH_WINDOWS, Detector  # noqa: E402
from tests.synth import RATE, machine_sound  # noqa: E402

FLAT_MB = 100.0
REFERENCE_MAX_MINUTES = 10  # the whole-file path needs about 0.35 GB a minute: an hour would not fit

_PEAK = """
def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

ENROLL = _PEAK + """
import sys
import monitor.scoring.detector
from monitor.cli import main
if len(sys.argv) > 4:
    monitor.scoring.detector.BATCH_WINDOWS = int(sys.argv[4])
backbone = ["--backbone", sys.argv[2]] if sys.argv[2] else []  # none: the default config's
code = main(["enroll", "--bank", sys.argv[1], "--replace", *backbone, sys.argv[3]])
print("PEAK_MB", code, peak_mb())
"""

REFERENCE = _PEAK + """
import sys
import numpy as np
from monitor.audio.files import fit_windows, load_audio, resample
from monitor.scoring.backbone import Backbone
backbone = Backbone.load(sys.argv[1])
backbone = backbone.output(sys.argv[4]) if sys.argv[4] else backbone
audio = load_audio(sys.argv[2])
samples = resample(audio.samples, audio.sample_rate, backbone.meta.sample_rate)
windows, _ = fit_windows(samples, backbone.meta.window_samples, backbone.meta.window_samples, backbone.meta.min_samples)
np.save(sys.argv[3], backbone.embed(windows))
print("PEAK_MB", 0, peak_mb())
"""


def write_wav(path: Path, minutes: int) -> Path:
    with sf.SoundFile(path, "w", RATE, 1, subtype="PCM_16") as f:
        for minute in range(minutes):
            f.write(machine_sound(minute, 60.0))
    return path


def child(code: str, *args: str) -> tuple[float, float]:
    """Run ``code`` in a fresh interpreter; its peak RSS in MB and its wall time in seconds."""
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - began
    last = done.stdout.strip().splitlines()[-1:] or [""]
    if done.returncode or not last[0].startswith("PEAK_MB 0 "):
        raise RuntimeError(f"child failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return float(last[0].split()[2]), wall


def reference_embeddings(folder: Path, spec: BackboneConfig, wav: Path) -> tuple[np.ndarray, float]:
    """The whole-file path's embeddings of ``wav`` and its peak RSS in MB."""
    out = folder / f"{wav.stem}.npy"
    peak, _ = child(REFERENCE, spec.model, str(wav), str(out), spec.output or "")
    return np.load(out), peak


def difference(streamed: np.ndarray, reference: np.ndarray) -> dict:
    return {"max_abs_difference": float(np.abs(streamed - reference).max()),
            "bitwise_equal": bool(np.array_equal(streamed, reference))}


def by_length(detector: Detector, option: str, lengths: list[int], folder: Path) -> tuple[list[dict], dict | None]:
    """Peak RSS of ``enroll`` per recording length; the embeddings of the longest file the
    whole-file path can hold, against it."""
    runs, comparison = [], None
    compared = max((m for m in lengths if m <= REFERENCE_MAX_MINUTES), default=None)
    for minutes in lengths:
        wav = write_wav(folder / f"{minutes}min.wav", minutes)
        peak, wall = child(ENROLL, str(folder / "bank"), option, str(wav))
        run = {"minutes": minutes, "windows": minutes * 6, "enroll_peak_rss_mb": round(peak, 1),
               "enroll_wall_s": round(wall, 1), "whole_file_peak_rss_mb": None}
        if minutes <= REFERENCE_MAX_MINUTES:
            reference, reference_peak = reference_embeddings(folder, detector.config.backbones[0], wav)
            run["whole_file_peak_rss_mb"] = round(reference_peak, 1)
            if minutes == compared:
                streamed = detector.embed(AudioFile.open(wav)).embeddings[detector.backbones[0].name]
                comparison = {"minutes": minutes, "windows": len(reference), **difference(streamed, reference)}
        runs.append(run)
        wav.unlink()
    return runs, comparison


def by_batch(detector: Detector, option: str, folder: Path) -> list[dict]:
    """``BATCH_WINDOWS`` 1, 2, 4, 8 on a 3-minute file: peak RSS of ``enroll``, time a window
    (model loaded) and the difference to the whole-file path."""
    wav = write_wav(folder / "sweep.wav", 3)
    reference, _ = reference_embeddings(folder, detector.config.backbones[0], wav)
    runs = []
    for batch in (1, 2, 4, 8):
        peak, _ = child(ENROLL, str(folder / "bank"), option, str(wav), str(batch))
        detector_module.BATCH_WINDOWS = batch
        began = time.perf_counter()
        streamed = detector.embed(AudioFile.open(wav)).embeddings[detector.backbones[0].name]
        per_window = (time.perf_counter() - began) / len(streamed)
        runs.append({"batch_windows": batch, "enroll_peak_rss_mb": round(peak, 1),
                     "ms_per_window": round(1000 * per_window, 1), **difference(streamed, reference)})
    detector_module.BATCH_WINDOWS = BATCH_WINDOWS
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", default="1,10,60", help="recording lengths, comma-separated (default: 1,10,60)")
    parser.add_argument("--backbone", default="", help="built-in backbone (default: the default config's, aisfx's "
                                                        "embedding and block 3)")
    parser.add_argument("--skip-batches", action="store_true", help="leave out the batch-size sweep")
    args = parser.parse_args()
    lengths = [int(m) for m in args.minutes.split(",")]
    config = Config(backbones=[BackboneConfig(args.backbone)]) if args.backbone else Config()
    detector = Detector.from_config(config)
    name = detector.backbones[0].name
    with LoadMonitor() as load, tempfile.TemporaryDirectory(prefix="asd-memory-") as tmp:
        runs, comparison = by_length(detector, args.backbone, lengths, Path(tmp))
        batches = [] if args.skip_batches else by_batch(detector, args.backbone, Path(tmp))
    peaks = [r["enroll_peak_rss_mb"] for r in runs]
    spread = max(peaks) - min(peaks)
    flat = spread < FLAT_MB
    table(["minutes", "windows", "enroll peak RSS MB", "whole-file peak RSS MB", "enroll wall s"],
          [[r["minutes"], r["windows"], r["enroll_peak_rss_mb"], r["whole_file_peak_rss_mb"], r["enroll_wall_s"]]
           for r in runs],
          title=f"asd-monitor enroll, backbone {name} ({BATCH_WINDOWS} windows per onnxruntime call)")
    print(f"peak RSS spread {spread:.0f} MB over {lengths} minutes: {'flat' if flat else 'NOT flat'} "
          f"(within {FLAT_MB:.0f} MB)\n")
    if comparison:
        table(["minutes", "windows", "max |difference|", "bitwise equal"],
              [[comparison["minutes"], comparison["windows"], comparison["max_abs_difference"],
                comparison["bitwise_equal"]]], title="embeddings: block by block vs the whole file in one call")
    if batches:
        table(["windows per call", "enroll peak RSS MB", "ms per window", "max |difference|", "bitwise equal"],
              [[b["batch_windows"], b["enroll_peak_rss_mb"], b["ms_per_window"], b["max_abs_difference"],
                b["bitwise_equal"]] for b in batches], title="batch size, 3-minute file (18 windows)")
    write_json("memory", {"backbone": name, "batch_windows": BATCH_WINDOWS, "runs": runs,
                          "peak_rss_spread_mb": round(spread, 1), "flat": flat, "embeddings": comparison,
                          "batches": batches}, load)
    return 0 if flat and (comparison is None or comparison["max_abs_difference"] < 1e-6) else 1


if __name__ == "__main__":
    sys.exit(main())
