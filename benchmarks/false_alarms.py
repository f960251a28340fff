"""What a plant cares about: false alerts per day on normal audio, and how much of a fault is caught.

For each machine of the benchmark sets in ``../shared/data/bench`` (``uav-noisy``, ``fan-noisy``;
read by path, skipped when absent):

1. enroll the train split's normal clips into a bank with ``monitor.enrollment.files.enroll_files``, the
   domain as the operating condition (as ``asd-monitor evaluate`` does). Clips shorter than the
   daemon's 10 s window (fan-noisy: 5 s) are first joined, per domain, into one recording, so the
   bank holds 10 s windows like the ones the daemon will score (the stream below joins them too);
2. replay the NORMAL test clips, back to back, as one stream through the real daemon
   (``monitor.service.daemon.Daemon``: file source at speed 1000, hop 10 s, sensor checks, KNN, rolling
   rank reference, alert state machine, events log; MQTT and metrics endpoint off) and count
   the alerts raised -> alerts per day of normal audio;
3. replay the ANOMALOUS test clips the same way (a fresh daemon, same bank): share of anomalous
   windows flagged (fused rank above the threshold), share of them covered by an open alert,
   number of alerts, and the window at which the first one was raised.

Both for the default alert settings and alternative thresholds / N-of-M rules, and for the
CUSUM rule (``alerts.rule: cusum``) at two false-alarm targets, each a real
daemon run. The ONNX embedding of a window does not depend on the alert settings, so after the
first setting the backbone's output is memoised by the window's exact bytes (same input, same
output); everything else runs live every time.

How far to trust the figures: uav-noisy has 720 s of normal test audio and fan-noisy 100 s, i.e.
1/120 and 1/864 of a day. An observed count of alerts scales to a huge per-day figure, and zero
alerts only bounds the rate: the table gives the 95 % upper bound (exact Poisson) next to it, and
the share of normal windows above the threshold, which is measured far more precisely.

    .venv/bin/python benchmarks/false_alarms.py [--sets uav-noisy,fan-noisy] [--only test|long]
        [--scoring candidate.yaml --name false_alarms_candidate]

Results: ``benchmarks/results/false_alarms.json``. ``--scoring`` measures another setting on the
same streams (its backbones, scoring, fusion and reference sections replace the defaults; the
alert settings stay as listed); ``--name`` keeps its results apart.

Part 2 (``--only long`` runs only it; ``--only test`` only part 1; default both): the longest normal stream the data allows.
The test sets alone are 1/120 and 1/864 of a day, so for each set and each of ``--splits`` seeded
random bank splits, all of the set's normal clips (train + test, pooled) are split in half per
domain: one half is enrolled as the bank (as in step 1), the other half is streamed, in random
order, through the real daemon (same settings as above, file source at speed 1000), once per
alert rule (n_of_m default, cusum at its config default). Half of the pool, not today's train
bank size: a bank of today's size (210 of 282 uav-noisy clips, 32 of 52 fan-noisy) would leave only
as much normal audio to stream as the test set already has; half doubles the streamed audio per
split (uav-noisy 141 clips, 1410 s; fan-noisy 26 clips, 130 s) while the bank stays of the same
order (141 vs 210 clips, 26 vs 32), and splitting per domain keeps the target domain in every bank.
Exposure pooled over splits counts each split's streamed audio; a clip streams in about half of
the splits, so the pooled hours are not independent audio (the unique normal audio is the pool).
Results: ``benchmarks/results/false_alarms_long.json``.

    .venv/bin/python benchmarks/false_alarms.py --only long [--splits 5] [--seed 13]

``--hop 5 --name false_alarms_hop5`` measures a shorter hop (overlapping windows): the alert
rules' window counts, the clear count and the rolling reference are scaled to span the same
stream time (``at_hop``); the long normal stream then re-measures the false alarms, since
overlapping windows break the independence CUSUM's threshold assumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from common import (
    SHARED_DATA,
    LoadMonitor,
    memo_stats,
    memoise_embeddings,
    table,
    write_json,
)

from monitor.config import Config, load_config
from monitor.review.report import poisson_upper

HOP = 10.0  # the daemon's default hop; --hop measures another (see at_hop)
DAY = 86400.0

# (label, alert settings overriding the defaults)
SETTINGS: list[tuple[str, dict]] = [
    ("default: rank > 0.99, 3 of 5", {}),
    ("rank > 0.95, 3 of 5", {"threshold": 0.95}),
    ("rank > 0.999, 3 of 5", {"threshold": 0.999}),
    ("rank > 0.99, 2 of 3", {"raise_count": 2, "raise_window": 3}),
    ("rank > 0.99, 5 of 5", {"raise_count": 5, "raise_window": 5}),
    ("rank > 0.99, 1 of 1", {"raise_count": 1, "raise_window": 1}),
    # The CUSUM rule (monitor/service/alerts.py): constants from a false-alarm target, not from
    # these sets (nothing below was chosen by looking at either set's figures).
    ("cusum: 1 false alarm / 30 days, drift 2", {"rule": "cusum"}),
    ("cusum: 1 false alarm / day, drift 2", {"rule": "cusum", "cusum_arl_days": 1.0}),
]


def at_hop(alerts: dict, hop: float) -> dict:
    """Alert settings that span the same stream time at ``hop`` as at ``HOP``: the N-of-M
    counts and the clear count scaled by HOP / hop (3 of 5 windows at 10 s: 6 of 10 at 5 s).
    CUSUM needs nothing: it turns its false-alarm target in days into windows at the hop, but
    overlapping windows are not independent, so its false-alarm rate has to be measured again
    (part 2) rather than taken from the target."""
    from monitor.config import AlertConfig

    if hop == HOP:
        return alerts
    defaults = AlertConfig()
    return alerts | {key: max(1, round(alerts.get(key, getattr(defaults, key)) * HOP / hop))
                     for key in ("raise_count", "raise_window", "clear_count")}


# ------------------------------------------------------------------------------ data

@dataclass
class MachineData:
    name: str
    train: dict[str, list[Path]]  # domain -> normal train clips
    normal: list[Path]
    anomaly: list[Path]
    clip_seconds: dict[Path, float] = field(default_factory=dict)
    domain: dict[Path, str] = field(default_factory=dict)


def machines_of(root: Path) -> list[MachineData]:
    import soundfile as sf

    from monitor.offline.dataset import scan_dataset

    out = []
    for machine, clips in scan_dataset(root).items():
        data = MachineData(machine, {}, [], [])
        for clip in clips:
            data.domain[clip.path] = clip.domain or "default"
            data.clip_seconds[clip.path] = sf.info(str(clip.path)).duration
            if clip.split == "train" and clip.label == "normal":
                data.train.setdefault(clip.domain or "default", []).append(clip.path)
            elif clip.split == "test" and clip.label == "normal":
                data.normal.append(clip.path)
            elif clip.split == "test" and clip.label == "anomaly":
                data.anomaly.append(clip.path)
        out.append(data)
    return out


def enroll(data: MachineData, bank_dir: Path, work: Path, base: Config) -> dict:
    """Enroll the train normals per domain with ``base``'s backbones; short clips are joined
    into one recording first."""
    import soundfile as sf

    from monitor.audio.files import load_audio
    from monitor.bank.store import BankStore
    from monitor.enrollment.files import enroll_files
    from monitor.scoring.detector import Detector

    detector = Detector.from_config(base)
    store = BankStore(bank_dir)
    joined = []
    began = time.perf_counter()
    for domain, paths in sorted(data.train.items()):
        if min(data.clip_seconds[p] for p in paths) < detector.window_seconds:
            audios = [load_audio(p) for p in paths]
            path = work / f"{data.name}_{domain}_train_joined.flac"
            sf.write(path, np.concatenate([a.samples for a in audios]), audios[0].sample_rate)
            paths = [path]
            joined.append(domain)
        enroll_files(detector, store, paths, domain)
    bank = store.load()
    return {"windows": len(bank), "conditions": sorted(set(bank.condition_labels())), "joined_domains": joined,
            "seconds": round(time.perf_counter() - began, 1)}


# ------------------------------------------------------------------------------- runs

def replay(paths: list[Path], bank_dir: Path, state: Path, alerts: dict, machine: str, base: Config) -> dict:
    """One real daemon run over ``paths`` (``base``'s backbones, scoring and fusion); per-window
    scores and the alerts it raised."""
    from monitor.config import (
        AlertConfig,
        DaemonConfig,
        MachineConfig,
        MetricsConfig,
        MqttConfig,
        SourceConfig,
    )
    from monitor.service.daemon import Daemon

    shutil.rmtree(state, ignore_errors=True)
    config = replace(
        base,
        alerts=AlertConfig(**at_hop(alerts, base.daemon.hop_seconds)),
        daemon=DaemonConfig(name="false-alarms", state_dir=state, hop_seconds=base.daemon.hop_seconds),
        sources=[SourceConfig(name="replay", type="file", paths=paths, speed=1000.0)],
        machines=[MachineConfig(machine, "replay", bank=bank_dir)],
        mqtt=MqttConfig(enabled=False),
        metrics=MetricsConfig(enabled=False),
    )
    windows: list[dict] = []
    daemon = Daemon(config)

    def record(report) -> None:
        fused = report.score.fused if report.score is not None else None
        windows.append({"start": report.start, "status": report.status, "fused_rank": fused,
                        "anomalous": fused is not None and fused > config.alerts.threshold,
                        "alerting": daemon.machines[0].tracker.alerting})

    daemon.add_listener(record)
    daemon.start()
    try:
        daemon.run()
    finally:
        daemon.stop()
    source_start = daemon.sources["replay"].start_time
    events = [json.loads(line) for line in (state / "events.jsonl").read_text().splitlines()]
    alerts_out = [e["alert"] for e in events if e["kind"] == "alert"]
    for w in windows:
        w["offset_s"] = round(w.pop("start") - source_start, 3)
    return {"windows": windows, "alerts": alerts_out, "source_start": source_start}


def clip_of_window(offsets: list[float], paths: list[Path], seconds: dict[Path, float]) -> list[list[Path]]:
    """The clips each window (offset, 10 s) overlaps by at least half of the clip or window."""
    bounds, t = [], 0.0
    for p in paths:
        bounds.append((t, t + seconds[p], p))
        t += seconds[p]
    out = []
    for off in offsets:
        end = off + 10.0
        out.append([p for a, b, p in bounds if min(b, end) - max(a, off) >= 0.5 * min(b - a, 10.0) - 1e-6])
    return out


def summarise(data: MachineData, kind: str, run: dict, paths: list[Path]) -> dict:
    windows = [w for w in run["windows"] if w["status"] == "ok"]
    raises = [a for a in run["alerts"] if a["type"] == "raise"]
    audio = sum(data.clip_seconds[p] for p in paths)
    out = {"audio_s": round(audio, 1), "windows": len(run["windows"]), "scored": len(windows),
           "sensor_fault": sum(w["status"] == "sensor_fault" for w in run["windows"]),
           "flagged": sum(w["anomalous"] for w in windows), "raises": len(raises)}
    out["flagged_share"] = round(out["flagged"] / max(1, len(windows)), 4)
    if kind == "normal":
        days = audio / DAY
        out["alerts_per_day"] = round(len(raises) / days, 1)
        out["alerts_per_day_95_upper"] = round(poisson_upper(len(raises)) / days, 1)
    else:
        out["alert_covered_share"] = round(sum(w["alerting"] for w in windows) / max(1, len(windows)), 4)
        first = next((i for i, w in enumerate(windows) if w["alerting"]), None)
        out["first_alert_window"] = None if first is None else first + 1
        # stream seconds from the start of the anomalous audio to the end of the raising window
        out["first_alert_s"] = None if first is None else round(windows[first]["offset_s"] + 10.0, 1)
    # per domain (a window counts for the domain of every clip it mostly covers)
    per_domain: dict[str, list[bool]] = {}
    for w, clips in zip(windows, clip_of_window([w["offset_s"] for w in windows], paths, data.clip_seconds)):
        for d in {data.domain[p] for p in clips}:
            per_domain.setdefault(d, []).append(w["anomalous"])
    out["flagged_share_by_domain"] = {d: round(sum(v) / len(v), 4) for d, v in sorted(per_domain.items())}
    out["ranks"] = [w["fused_rank"] for w in windows]
    return out


# ------------------------------------------------------------------- part 2: long normal stream

LONG_RULES: list[tuple[str, dict]] = [
    ("n_of_m (default): rank > 0.99, 3 of 5", {}),
    ("cusum (config default): 1 false alarm / 30 days, drift 2", {"rule": "cusum"}),
]


def split_pool(data: MachineData, rng: np.random.Generator) -> tuple[dict[str, list[Path]], list[Path]]:
    """All normal clips (train + test) pooled; half of each domain (rounded down) to the bank,
    the rest streamed in random order."""
    pool: dict[str, list[Path]] = {}
    for paths in data.train.values():
        for p in paths:
            pool.setdefault(data.domain[p], []).append(p)
    for p in data.normal:
        pool.setdefault(data.domain[p], []).append(p)
    bank: dict[str, list[Path]] = {}
    stream: list[Path] = []
    for domain, paths in sorted(pool.items()):
        paths = sorted(paths)
        order = rng.permutation(len(paths))
        half = len(paths) // 2
        bank[domain] = [paths[i] for i in order[:half]]
        stream.extend(paths[i] for i in order[half:])
    stream = [stream[i] for i in rng.permutation(len(stream))]
    return bank, stream


def long_summary(runs: list[dict]) -> dict:
    """Pooled over splits: exposure, windows above the threshold, alerts, alerts/day + 95 % upper."""
    audio = sum(r["audio_s"] for r in runs)
    scored = sum(r["scored"] for r in runs)
    flagged = sum(r["flagged"] for r in runs)
    raises = sum(r["raises"] for r in runs)
    days = audio / DAY
    per_day = [r["alerts_per_day"] for r in runs]
    upper = [r["alerts_per_day_95_upper"] for r in runs]
    share = [r["flagged_share"] for r in runs]
    return {"splits": len(runs), "audio_s": round(audio, 1), "hours": round(audio / 3600, 3),
            "days": round(days, 5), "scored": scored, "flagged": flagged,
            "flagged_share": round(flagged / max(1, scored), 5),
            "flagged_share_95_upper": round(poisson_upper(flagged) / max(1, scored), 5),
            "raises": raises, "alerts_per_day": round(raises / days, 1),
            "alerts_per_day_95_upper": round(poisson_upper(raises) / days, 1),
            "split_alerts_per_day_range": [min(per_day), max(per_day)],
            "split_95_upper_range": [min(upper), max(upper)],
            "split_flagged_share_range": [min(share), max(share)]}


def run_long(present: list[str], bench: Path, splits: int, seed: int, base: Config, results_name: str) -> None:
    memoise_embeddings()
    work = Path(tempfile.mkdtemp(prefix="asd-bench-fa-long-"))
    results: dict = {"hop_s": base.daemon.hop_seconds, "splits": splits, "seed": seed,
                     "bank": "half of each domain's normal clips (train + test pooled), rounded down",
                     "rules": {label: r for label, r in LONG_RULES}, "sets": {}}
    started = time.perf_counter()
    try:
        with LoadMonitor() as load:
            for name in present:
                for data in machines_of(bench / name):
                    key = f"{name}/{data.name}"
                    rng = np.random.default_rng([seed, sum(map(ord, key))])
                    entry: dict = {"pool_clips": sum(map(len, data.train.values())) + len(data.normal),
                                   "splits": [], "rules": {}}
                    per_rule: dict[str, list[dict]] = {label: [] for label, _ in LONG_RULES}
                    for k in range(splits):
                        bank_paths, stream = split_pool(data, rng)
                        split_data = MachineData(data.name, bank_paths, stream, [], data.clip_seconds, data.domain)
                        bank = work / "banks" / key / str(k)
                        t = time.perf_counter()
                        info = {"split": k, "bank_clips": {d: len(v) for d, v in bank_paths.items()},
                                "stream_clips": len(stream),
                                "stream_domains": {d: sum(data.domain[p] == d for p in stream)
                                                   for d in sorted(bank_paths)},
                                "bank": enroll(split_data, bank, work, base), "rules": {}}
                        for label, alerts in LONG_RULES:
                            run = replay(stream, bank, work / "state", alerts, data.name, base)
                            res = summarise(split_data, "normal", run, stream)
                            res.pop("ranks")
                            res["max_rank"] = max((w["fused_rank"] for w in run["windows"]
                                                   if w["fused_rank"] is not None), default=None)
                            info["rules"][label] = res
                            per_rule[label].append(res)
                        info["seconds"] = round(time.perf_counter() - t, 1)
                        entry["splits"].append(info)
                        print(f"{key} split {k}: bank {info['bank']['windows']} windows, stream "
                              f"{len(stream)} clips; " + "; ".join(
                                  f"{label.split(' ')[0]} {r['flagged']}/{r['scored']} flagged, {r['raises']} alerts"
                                  for label, r in info["rules"].items()) + f" ({info['seconds']} s)", flush=True)
                    entry["rules"] = {label: long_summary(runs) for label, runs in per_rule.items()}
                    results["sets"][key] = entry
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["total_s"] = round(time.perf_counter() - started, 1)
    results["embedding_memo"] = dict(memo_stats)
    results["scoring"] = {"backbones": [b.key for b in base.backbones], "normalisation": base.scoring.normalisation,
                          "fusion": base.fusion.rule}

    rows = []
    for key, entry in results["sets"].items():
        for label, s in entry["rules"].items():
            rows.append([key, label, s["splits"], s["hours"], f"{s['flagged']}/{s['scored']}", s["flagged_share"],
                         s["raises"], s["alerts_per_day"], s["alerts_per_day_95_upper"],
                         "{}-{}".format(*s["split_alerts_per_day_range"]),
                         "{}-{}".format(*s["split_95_upper_range"])])
    table(["set", "rule", "splits", "normal hours", "windows > thr", "share", "alerts", "per day",
           "95% upper/day", "per split: per day", "per split: 95% upper"], rows,
          title=f"long normal stream: bank = half of each domain's normal clips, rest streamed; "
                f"{splits} splits, seed {seed}")
    write_json(f"{results_name}_long", results, load)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="uav-noisy,fan-noisy")
    parser.add_argument("--bench", type=Path, default=SHARED_DATA / "bench")
    parser.add_argument("--only", choices=("test", "long"), default=None,
                        help="run only part 1 (test clips) or part 2 (long normal stream); default both")
    parser.add_argument("--splits", type=int, default=5, help="part 2: random bank splits per set")
    parser.add_argument("--seed", type=int, default=13, help="part 2: seed of the splits")
    parser.add_argument("--scoring", type=Path, default=None,
                        help="a YAML config whose backbones, scoring, fusion and reference sections replace the "
                             "defaults (a candidate setting measured on the same streams)")
    parser.add_argument("--name", default="false_alarms",
                        help="results: benchmarks/results/NAME.json and NAME_long.json")
    parser.add_argument("--hop", type=float, default=HOP,
                        help=f"seconds between windows (default {HOP:g}); window counts of the alert rules and "
                             "the rolling reference are scaled to span the same time")
    args = parser.parse_args()
    base = Config()
    if args.scoring is not None:
        chosen = load_config(args.scoring)
        base = replace(base, backbones=chosen.backbones, scoring=chosen.scoring, fusion=chosen.fusion,
                       reference=chosen.reference)
    base = replace(base, daemon=replace(base.daemon, hop_seconds=args.hop),
                   reference=replace(base.reference, rolling_size=round(base.reference.rolling_size * HOP / args.hop)))
    logging.basicConfig(level=logging.WARNING)

    present = [s for s in args.sets.split(",") if s and (args.bench / s).is_dir()]
    missing = [s for s in args.sets.split(",") if s and s not in present]
    for s in missing:
        print(f"skipping {s}: {args.bench / s} not found")
    if not present:
        print("no benchmark set found; nothing to do")
        if args.only != "long":
            write_json(args.name, {"skipped": missing, "sets": {}})
        if args.only != "test":
            write_json(f"{args.name}_long", {"skipped": missing, "sets": {}})
        return 0
    if args.only != "long":
        run_test(present, missing, args.bench, base, args.name)
    if args.only != "test":
        run_long(present, args.bench, args.splits, args.seed, base, args.name)
    return 0


def run_test(present: list[str], missing: list[str], bench: Path, base: Config, results_name: str) -> None:
    memoise_embeddings()
    work = Path(tempfile.mkdtemp(prefix="asd-bench-fa-"))
    results: dict = {"hop_s": base.daemon.hop_seconds, "settings": {label: s for label, s in SETTINGS}, "skipped": missing, "sets": {}}
    started = time.perf_counter()
    try:
        with LoadMonitor() as load:
            for name in present:
                for data in machines_of(bench / name):
                    key = f"{name}/{data.name}"
                    bank = work / "banks" / key
                    entry = {"bank": enroll(data, bank, work, base), "normal_clips": len(data.normal),
                             "anomaly_clips": len(data.anomaly), "settings": {}}
                    print(f"{key}: bank {entry['bank']}", flush=True)
                    for label, alerts in SETTINGS:
                        t = time.perf_counter()
                        res = {}
                        for kind, paths in (("normal", data.normal), ("anomaly", data.anomaly)):
                            run = replay(paths, bank, work / "state", alerts, data.name, base)
                            res[kind] = summarise(data, kind, run, paths)
                        res["seconds"] = round(time.perf_counter() - t, 1)
                        entry["settings"][label] = res
                        n, a = res["normal"], res["anomaly"]
                        print(f"  {label}: normal {n['raises']} alerts ({n['alerts_per_day']}/day), "
                              f"{n['flagged_share']:.3f} windows flagged; anomalies {a['flagged_share']:.3f} flagged, "
                              f"{a['alert_covered_share']:.3f} under alert ({res['seconds']} s)", flush=True)
                    results["sets"][key] = entry
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["total_s"] = round(time.perf_counter() - started, 1)
    results["embedding_memo"] = dict(memo_stats)

    for key, entry in results["sets"].items():
        rows = []
        for label, res in entry["settings"].items():
            n, a = res["normal"], res["anomaly"]
            rows.append([label, n["raises"], n["alerts_per_day"], n["alerts_per_day_95_upper"], n["flagged_share"],
                         a["flagged_share"], a["alert_covered_share"], a["raises"], a["first_alert_window"],
                         a["first_alert_s"]])
        n0 = next(iter(entry["settings"].values()))
        table(["setting", "alerts (normal)", "per day", "95% upper/day", "normal windows flagged",
               "anomalous windows flagged", "under alert", "alerts (anom.)", "1st alert at window",
               "1st alert at s"], rows,
              title=f"{key}: {entry['normal_clips']} normal clips ({n0['normal']['audio_s']:.0f} s, "
                    f"{n0['normal']['scored']} windows), {entry['anomaly_clips']} anomalous clips "
                    f"({n0['anomaly']['audio_s']:.0f} s, {n0['anomaly']['scored']} windows); bank {entry['bank']['windows']} windows")
        table(["setting", "normal flagged by domain", "anomalous flagged by domain"],
              [[label, res["normal"]["flagged_share_by_domain"], res["anomaly"]["flagged_share_by_domain"]]
               for label, res in entry["settings"].items()], title=f"{key}: by domain")
    results["scoring"] = {"backbones": [b.key for b in base.backbones], "normalisation": base.scoring.normalisation,
                          "fusion": base.fusion.rule}
    write_json(results_name, results, load)


if __name__ == "__main__":
    raise SystemExit(main())
