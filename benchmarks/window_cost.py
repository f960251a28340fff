"""Cost of one window, the earlier default against the new one, side by side.

The daemon's per-window work after the sensor checks is ``Detector.embed`` of the window (the
shared models) and ``LiveScorer.score`` (the machine's fitted detector); this times both, as
``monitor/service/pipeline.py`` calls them, on real audio, for:

* ``earlier``: aisfx's embedding, no normalisation (the default before issue 13);
* ``default``: aisfx's embedding and block 3 concatenated, density normalisation (one run of
  the graph fetches both outputs);
* ``earlier bank``: the default config on a bank enrolled before every output was kept (the
  embedding alone): it is scored with the embedding, and the daemon embeds every output;
* ``enrolling``: the default while a live enrollment runs (every output is embedded, as the
  bank keeps them all).

The bank: the first ``--bank-clips`` normal train clips of uav-noisy (../shared/data/bench),
enrolled once with every output (the earlier bank is its embedding alone); the windows: its
normal test clips. All settings run on one onnxruntime session of aisfx, with numpy and faiss
on one thread as in the daemon (``runtime.compute_threads``). The settings take turns window by
window, in a new random order per window, so that the load of this shared machine falls on all
of them alike (a fixed cycle with the libraries' default threads measured two identical settings
9 % apart, each always following the same other one); the ratios to ``earlier``, per window paired, are the figures (absolute
times move with the load, which is recorded).

    .venv/bin/python benchmarks/window_cost.py [--bank-clips 210] [--windows 72] [--passes 2]

Results: ``benchmarks/results/window_cost.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import SHARED_DATA, LoadMonitor, table, write_json

from monitor.audio.files import Audio, load_audio
from monitor.bank.model import Bank
from monitor.bank.store import BankStore
from monitor.config import BackboneConfig, Config
from monitor.enrollment.files import enroll_files
from monitor.scoring.detector import Detector
from monitor.scoring.live import LiveScorer
from monitor.service.threads import limit_compute_threads

SETTINGS = ("earlier", "default", "earlier bank", "enrolling")


def paired_ratio(ours: np.ndarray, base: np.ndarray, seed: int = 0, resamples: int = 2000) -> list[float]:
    """Ratio of mean times and its 95 % bootstrap interval over windows (the same resamples for
    both, as the windows are paired)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(base), size=(resamples, len(base)))
    ratios = ours[idx].mean(axis=1) / base[idx].mean(axis=1)
    return [round(float(ours.mean() / base.mean()), 3), *(round(float(q), 3) for q in np.quantile(ratios, [0.025, 0.975]))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", type=Path, default=SHARED_DATA / "bench" / "uav-noisy" / "uav")
    parser.add_argument("--bank-clips", type=int, default=210)  # the daemon's bank in false_alarms.py
    parser.add_argument("--windows", type=int, default=72)  # every normal test clip
    parser.add_argument("--passes", type=int, default=2, help="times over the windows (default 2)")
    args = parser.parse_args()
    limit_compute_threads(Config().runtime.compute_threads)  # as in every daemon thread
    if not args.bench.is_dir():
        print(f"{args.bench}: not found, nothing measured")
        return 0
    train = sorted((args.bench / "train").glob("*normal*.flac"))[:args.bank_clips]
    test = sorted((args.bench / "test").glob("*normal*.flac"))[:args.windows]
    default = Config()
    earlier = replace(default, backbones=[BackboneConfig("aisfx")], scoring=replace(default.scoring, normalisation="none"))
    # One onnxruntime session for every setting: two sessions of one model were measured apart by
    # more than the outputs fetched (their weights compete for the caches).
    shared = Detector.from_config(default)
    models = {"earlier": Detector([shared.backbones[0].file_backbone()], earlier), "default": shared}
    with LoadMonitor() as load, tempfile.TemporaryDirectory(prefix="asd-window-cost-") as tmp:
        store = BankStore(Path(tmp) / "bank")
        began = time.perf_counter()
        bank = enroll_files(models["default"], store, train, "default").bank
        enroll_s = time.perf_counter() - began
        earlier_bank = Bank(items=bank.items, embeddings={"aisfx": bank.embeddings["aisfx"]},
                            model_ids={"aisfx": bank.model_ids["aisfx"]}, version="v000001")
        scorers, fit_s = {}, {}
        for name, shared, fitted_on in (("earlier", models["earlier"], bank), ("default", models["default"], bank),
                                        ("earlier bank", models["default"], earlier_bank),
                                        ("enrolling", models["default"], bank)):
            began = time.perf_counter()
            scorers[name] = (shared, LiveScorer.fit(shared, fitted_on, 360, 16000, name))
            fit_s[name] = round(time.perf_counter() - began, 2)
        assert scorers["earlier bank"][1].detector.falls_back and not scorers["default"][1].detector.falls_back
        times = {name: {"embed": [], "score": []} for name in SETTINGS}
        windows = [load_audio(path) for path in test] * args.passes
        rng = np.random.default_rng(0)
        for audio in windows:
            window = Audio(audio.samples, audio.sample_rate, "w")
            for name in rng.permutation(SETTINGS):  # a new order per window: no setting always follows another
                shared, scorer = scorers[name]
                features = name == "enrolling" or scorer.detector.falls_back  # as the pipeline asks
                t0 = time.perf_counter()
                embedded = shared.embed(window, features=features)
                t1 = time.perf_counter()
                scorer.score(embedded.embeddings)
                t2 = time.perf_counter()
                times[name]["embed"].append(t1 - t0)
                times[name]["score"].append(t2 - t1)
    total = {name: np.add(t["embed"], t["score"]) for name, t in times.items()}
    rows, results = [], {}
    for name in SETTINGS:
        embed, score = np.array(times[name]["embed"]), np.array(times[name]["score"])
        ratio = paired_ratio(total[name], total["earlier"])
        results[name] = {"embed_ms_mean": round(1000 * embed.mean(), 1), "score_ms_mean": round(1000 * score.mean(), 2),
                         "total_ms_median": round(1000 * float(np.median(total[name])), 1),
                         "total_ratio_to_earlier": ratio, "embed_ratio_to_earlier":
                         paired_ratio(embed, np.array(times["earlier"]["embed"])),
                         "score_ratio_to_earlier": paired_ratio(score, np.array(times["earlier"]["score"])),
                         "bank_fit_s": fit_s[name]}
        rows.append([name, results[name]["embed_ms_mean"], results[name]["score_ms_mean"],
                     results[name]["total_ms_median"], f"{ratio[0]:.3f} [{ratio[1]:.3f}, {ratio[2]:.3f}]",
                     fit_s[name]])
    table(["setting", "embed ms (mean)", "score ms (mean)", "total ms (median)", "total / earlier [95 % CI]",
           "bank fit s"], rows, title=f"one window, {len(windows)} uav-noisy test windows, bank of {len(bank)} windows "
                                     f"(settings take turns per window)")
    write_json("window_cost", {"bank_windows": len(bank), "windows": len(windows), "enroll_s": round(enroll_s, 1),
                               "bank_dims": bank.dims, "settings": results}, load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
