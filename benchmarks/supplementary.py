"""Supplementary recordings (DCASE 2025): noise-only recordings of the site, clean recordings of
the machine. What each use does to the figures.

No recording in ``../shared/data`` is labelled "noise only" or "clean", so both are built from
real recordings whose role is plain:

* Site noise: the MIMII clips of ``mimii-samples`` (fan, pump, slider, valve; normal and abnormal:
  other machines are noise to the one monitored). The two bench sets were mixed with MIMII fan
  and pump recordings at -6..0 dB, so these clips are what their sites sound like with the
  monitored machine stopped. They are split at random into an enrolled half and a held-out
  half (``--repeats`` splits).

1. Idle detection (``monitor/scoring/idle.py``), per bench set: the machine's bank (train normals)
   with and without the enrolled site noise. Scored: held-out noise windows (the machine
   stopped), and the machine's normal and anomalous test clips. Reported: the share of each
   flagged anomalous at the default threshold (fused rank > 0.99 against the bank's own
   leave-one-out reference, as the daemon's anchored reference), the share called idle, and
   AUC (source, target, pAUC, official) on the clips that are not called idle, with and
   without idle gating (an anomaly called idle is a missed fault). For the margin of the idle
   rule (``scoring.idle_margin``) 0.25, 0.5 (the default) and 1 (nearest class alone).

2. Clean machine audio enlarging a small bank, on a site built from MIMII: machine = the
   ``fan`` clips (normal and abnormal), site noise = pump/slider/valve clips added at
   -6..0 dB SNR. The bank starts from ``--few`` noisy normal windows (a new condition with a
   handful of clips, like the bench sets' target domains); the remaining clean normals are
   either kept for testing (noisy) or, in the variants, enrolled: as recorded ("clean as-is")
   or mixed with the enrolled site noise at the site's SNRs ("clean + site noise", ``--mixes``
   per clip). Test: held-out normal and all abnormal fan clips, each mixed with held-out noise.
   Reported: AUC over ``--repeats`` random splits (mean, min, max). Small (13 normal and 14
   abnormal fan clips): read the direction, not the third decimal.

    .venv/bin/python benchmarks/supplementary.py            # about 5 min here

Results: ``benchmarks/results/supplementary.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
from common import SHARED_DATA, LoadMonitor, table, write_json

from monitor.audio.files import Audio, load_audio  # noqa: E402
from monitor.audio.mixing import mix_at_snr  # noqa: E402
from monitor.bank.model import Bank, BankItem  # noqa: E402
from monitor.config import AlertConfig, Config  # noqa: E402
from monitor.offline.dataset import scan_dataset  # noqa: E402
from monitor.offline.dcase import machine_figures, official_score  # noqa: E402
from monitor.offline.evaluate import build_bank  # noqa: E402
from monitor.scoring.detector import Detector  # noqa: E402
from monitor.scoring.idle import NOISE_CONDITION  # noqa: E402
from monitor.service.alerts import AlertTracker  # noqa: E402  (common puts the repository on sys.path)

SETS = ("uav-noisy", "fan-noisy")
SNR_DB = (-6.0, 0.0)
# Idle rule variants: None = no site noise enrolled; else the margin (1.0 = nearest class alone).
VARIANTS = {"no site noise": None, "site noise, margin 0.25": 0.25, "site noise, margin 0.5 (default)": 0.5,
            "site noise, margin 1 (nearest class)": 1.0}
NOW = "2026-01-01T00:00:00+00:00"


def embed_audio(detector: Detector, audio: Audio) -> np.ndarray:
    """One embedding per clip (the mean over its windows), lead backbone."""
    return detector.embed(audio).embeddings[detector.lead_backbone].mean(axis=0)


def with_noise(bank: Bank, name: str, noise: np.ndarray, model_ids: dict[str, str]) -> Bank:
    """``bank`` plus site-noise windows (embeddings of backbone ``name``)."""
    items = [BankItem(f"noise-{i}", 0.0, NOISE_CONDITION, NOW) for i in range(len(noise))]
    return bank.add(items, {name: noise}, model_ids)


# ---------------------------------------------------------------------------- 1. idle detection

def alerts(fused: np.ndarray, idle: np.ndarray, config: AlertConfig) -> tuple[int, float]:
    """The daemon's alert state machine over windows streamed in order (idle windows skipped,
    as the daemon skips them): alerts raised, and the window (counting idle ones) of the first."""
    tracker = AlertTracker("bench", config)
    raised, first = 0, float("nan")
    for i, (rank, is_idle) in enumerate(zip(fused, idle)):
        if is_idle:
            continue
        transition = tracker.update(10.0 * i, 10.0 * i + 10.0, float(rank))
        if transition is not None and transition.type == "raise":
            raised += 1
            first = first if raised > 1 else float(i)
    return raised, first


def idle_study(detector: Detector, noise: np.ndarray, repeats: int) -> dict:
    name = detector.lead_backbone
    alert_config = detector.config.alerts
    threshold = alert_config.threshold
    out: dict = {}
    for set_name in SETS:
        root = SHARED_DATA / "bench" / set_name
        if not root.is_dir():
            print(f"skipping {set_name}: {root} not found", file=sys.stderr)
            continue
        for machine, clips in scan_dataset(root).items():
            train = [c for c in clips if c.split == "train" and c.label == "normal"]
            test = [c for c in clips if c.split == "test"]
            test_emb = np.stack([embed_audio(detector, load_audio(c.path)) for c in test])
            anomalous = np.array([c.is_anomaly for c in test])
            domains = [c.domain for c in test]
            bank = build_bank(detector, train)
            rows: dict[str, list[dict]] = {}
            for r in range(repeats):
                order = np.random.default_rng(r).permutation(len(noise))
                enrolled, held_out = noise[order[: len(noise) // 2]], noise[order[len(noise) // 2:]]
                for variant, margin in VARIANTS.items():
                    detector.fit(bank if margin is None else with_noise(bank, name, enrolled, detector.model_ids))

                    def idle(queries: np.ndarray) -> np.ndarray:
                        if margin is None:
                            return np.zeros(len(queries), dtype=bool)
                        return detector.idle_detector.distance_ratio(queries) <= margin

                    stopped_fused = detector.score({name: held_out}).fused
                    stopped = stopped_fused > threshold
                    stopped_idle = idle(held_out)
                    running = detector.score({name: test_emb})
                    running_idle = idle(test_emb)
                    kept = ~running_idle
                    downtime_alerts, _ = alerts(stopped_fused, stopped_idle, alert_config)
                    fault_alerts, first = alerts(running.fused[anomalous], running_idle[anomalous], alert_config)
                    figures = machine_figures([d for d, k in zip(domains, kept) if k], anomalous[kept],
                                              running.raw[name][kept])
                    rows.setdefault(variant, []).append({
                        "stopped_windows": int(len(held_out)),
                        "stopped_flagged": float(np.mean(stopped & ~stopped_idle)),
                        "stopped_idle": float(np.mean(stopped_idle)),
                        "normal_idle": float(np.mean(running_idle[~anomalous])),
                        "anomaly_idle": float(np.mean(running_idle[anomalous])),
                        "normal_flagged": float(np.mean((running.fused > threshold)[~anomalous & kept])),
                        "anomaly_flagged": float(np.mean((running.fused > threshold)[anomalous & kept])),
                        "auc_source": figures.auc_source, "auc_target": figures.auc_target, "pauc": figures.pauc,
                        "official": official_score([figures]),
                        "downtime_alerts": downtime_alerts, "fault_alerts": fault_alerts,
                        "fault_first_alert_window": first,
                    })
            out[set_name] = {variant: {key: statistics.fmean(r[key] for r in runs) for key in runs[0]}
                             for variant, runs in rows.items()}
            print(f"idle study {set_name} done", flush=True)
    return out


# ------------------------------------------------------------------------ 2. clean audio in the bank

def clean_study(detector: Detector, few: int, mixes: int, repeats: int) -> dict:
    mimii = scan_dataset(SHARED_DATA / "mimii-samples")
    fan = mimii["fan"]
    normals = [load_audio(c.path) for c in fan if c.label == "normal"]
    faults = [load_audio(c.path) for c in fan if c.label == "anomaly"]
    site = [load_audio(c.path) for m in ("pump", "slider", "valve") for c in mimii[m] if c.label == "normal"]
    name = detector.lead_backbone
    results: dict[str, list[float]] = {}
    for r in range(repeats):
        rng = np.random.default_rng(r)
        order = rng.permutation(len(normals))
        noise_order = rng.permutation(len(site))
        enrolled_noise = [site[i] for i in noise_order[: len(site) // 2]]
        test_noise = [site[i] for i in noise_order[len(site) // 2:]]

        def noisy(audio: Audio, pool: list[Audio]) -> np.ndarray:
            other = pool[rng.integers(len(pool))]
            return embed_audio(detector, mix_at_snr(audio, other, rng.uniform(*SNR_DB)))

        first = order[:few]
        clean = order[few: few + (len(normals) - few) // 2]
        test_normals = order[few + (len(normals) - few) // 2:]
        base = np.stack([noisy(normals[i], enrolled_noise) for i in first])
        as_is = np.stack([embed_audio(detector, normals[i]) for i in clean])
        mixed = np.stack([noisy(normals[i], enrolled_noise) for i in clean for _ in range(mixes)])
        queries = np.stack([noisy(normals[i], test_noise) for i in test_normals] +
                           [noisy(a, test_noise) for a in faults])
        labels = [False] * len(test_normals) + [True] * len(faults)
        variants = {f"{few} noisy normals": base, "+ clean as-is": np.concatenate([base, as_is]),
                    f"+ clean mixed with site noise (x{mixes})": np.concatenate([base, mixed]),
                    "+ both": np.concatenate([base, as_is, mixed])}
        for variant, embeddings in variants.items():
            bank = Bank().add([BankItem(f"w{i}", 0.0, "default", NOW) for i in range(len(embeddings))],
                              {name: embeddings}, detector.model_ids)
            detector.fit(bank)
            scores = detector.score({name: queries}).raw[name]
            figures = machine_figures(["source"] * len(labels), labels, scores)
            results.setdefault(variant, []).append(figures.auc_source)
    return {variant: {"auc_mean": statistics.fmean(v), "auc_min": min(v), "auc_max": max(v), "repeats": len(v),
                      "bank_windows": int(len(variants[variant]))}
            for variant, v in results.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="noise splits (idle) and random splits (clean)")
    parser.add_argument("--few", type=int, default=2, help="noisy normal clips the bank starts from (clean study)")
    parser.add_argument("--mixes", type=int, default=3, help="site-noise mixtures per clean clip")
    args = parser.parse_args()
    if not (SHARED_DATA / "mimii-samples").is_dir():
        print(f"{SHARED_DATA / 'mimii-samples'} not found: nothing measured", file=sys.stderr)
        return 1
    detector = Detector.from_config(Config())
    noise = np.stack([embed_audio(detector, load_audio(c.path))
                      for clips in scan_dataset(SHARED_DATA / "mimii-samples").values() for c in clips])
    began = time.perf_counter()
    with LoadMonitor() as load:
        idle = idle_study(detector, noise, args.repeats)
        clean = clean_study(detector, args.few, args.mixes, args.repeats)
    for set_name, variants in idle.items():
        table(["variant", "stopped: idle", "stopped: flagged", "downtime alerts", "normal: idle", "anomaly: idle",
               "normal flagged", "anomaly flagged", "fault alerts", "1st alert at", "AUC src", "AUC tgt", "pAUC",
               "official"],
              [[v, r["stopped_idle"], r["stopped_flagged"], r["downtime_alerts"], r["normal_idle"], r["anomaly_idle"],
                r["normal_flagged"], r["anomaly_flagged"], r["fault_alerts"], r["fault_first_alert_window"],
                r["auc_source"], r["auc_target"], r["pauc"], r["official"]]
               for v, r in variants.items()],
              title=f"{set_name}: machine stopped (held-out site noise) and running (test clips); mean of {args.repeats} splits")
    table(["bank", "windows", "AUC mean", "min", "max"],
          [[v, r["bank_windows"], r["auc_mean"], r["auc_min"], r["auc_max"]] for v, r in clean.items()],
          title=f"MIMII fan in site noise (-6..0 dB): clean recordings in a bank of {args.few} noisy normals; "
                f"{args.repeats} random splits")
    write_json("supplementary", {"seconds": round(time.perf_counter() - began, 1), "noise_clips": int(len(noise)),
                                 "repeats": args.repeats, "few": args.few, "mixes": args.mixes, "snr_db": list(SNR_DB),
                                 "idle": idle, "clean": clean}, load)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
