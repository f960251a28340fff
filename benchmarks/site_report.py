"""The site-specific report (``asd-monitor review report``) on the bench data, end to end.

What an operator's first weeks look like, per machine of each bench set (``../shared/data/bench``;
skipped when absent): half of all its normal clips (per domain, seeded) are enrolled as the bank,
as ``false_alarms.py --only long`` does; the other half stream in random order through the real
daemon, with ``--faults`` fault episodes inserted at evenly spaced places, each ``--episode``
consecutive anomalous test clips drawn at random (faults are rare: most of the stream is normal). Every alert the daemon raised is then answered through
the real review code (``monitor.review.apply.Reviewer``), as a person who knew would: ``fault``
when its windows overlap an inserted fault episode, ``normal`` (a false alarm, enrolled) otherwise.
Finally ``monitor.review.report.build_report`` replays the daemon's window history at each
candidate threshold, as the CLI does, and the table is printed and written with its plot.

The per-day figures rest on the streamed normal audio (uav-noisy about 1400 s, fan-noisy about
130 s per machine): tiny fractions of a day, hence the 95 % upper bounds beside them.

    .venv/bin/python benchmarks/site_report.py [--sets uav-noisy,fan-noisy] [--seed 13] [--faults 3] [--episode 6]

The README's table: ``--sets uav-noisy --episode 18`` (faults of 180 s: uav-noisy's faults lift
windows only to rank 0.93-0.97, and shorter ones raise no alert at all). fan-noisy streams only
130 s of normal audio per bank split, too little to say anything per day.

Results: ``benchmarks/results/site_report.json`` and ``site_report_<set>_<machine>.png``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path

import numpy as np
from common import RESULTS, SHARED_DATA, LoadMonitor, memoise_embeddings, write_json
from false_alarms import HOP, MachineData, enroll, machines_of, replay, split_pool

from monitor.config import Config, DaemonConfig, MachineConfig
from monitor.errors import AsdError
from monitor.outputs.history import ScoreHistory
from monitor.review.apply import Reviewer
from monitor.review.report import (
    HISTORY_DIR,
    Episode,
    build_report,
    format_report,
    plot_report,
    replay_alerts,
)
from monitor.review.verdicts import Verdict
from monitor.scoring.detector import Detector

log = logging.getLogger(__name__)


def stream_with_faults(normal: list[Path], anomalies: list[Path], episode: int) -> tuple[list[Path], list[bool]]:
    """The normal clips with the anomalous ones inserted in runs of ``episode`` clips, evenly
    spaced; and which clips are anomalous."""
    runs = [anomalies[i:i + episode] for i in range(0, len(anomalies), episode)]
    every = max(1, len(normal) // (len(runs) + 1))
    paths: list[Path] = []
    faulty: list[bool] = []
    for i, clip in enumerate(normal):
        if i and i % every == 0 and runs:
            run = runs.pop(0)
            paths += run
            faulty += [True] * len(run)
        paths.append(clip)
        faulty.append(False)
    for run in runs:
        paths += run
        faulty += [True] * len(run)
    return paths, faulty


def fault_spans(paths: list[Path], faulty: list[bool], seconds: dict[Path, float]) -> list[tuple[float, float]]:
    """Stream offsets (s) of the inserted fault episodes."""
    spans: list[tuple[float, float]] = []
    t = 0.0
    for path, bad in zip(paths, faulty):
        if bad:
            if spans and abs(spans[-1][1] - t) < 1e-6:
                spans[-1] = (spans[-1][0], t + seconds[path])
            else:
                spans.append((t, t + seconds[path]))
        t += seconds[path]
    return spans


def run_machine(key: str, data: MachineData, work: Path, rng: np.random.Generator, faults: int, episode: int,
                base: Config) -> dict:
    bank_split, normal = split_pool(data, rng)
    bank_dir = work / "banks" / key
    enrolled = enroll(replace(data, train=bank_split), bank_dir, work, base)
    anomalies = sorted(data.anomaly)
    chosen = [anomalies[i] for i in rng.choice(len(anomalies), min(len(anomalies), faults * episode), replace=False)]
    paths, faulty = stream_with_faults(normal, chosen, episode)
    state = work / "state" / key
    run = replay(paths, bank_dir, state, {}, data.name, base)
    spans = fault_spans(paths, faulty, data.clip_seconds)
    bounds = np.cumsum([data.clip_seconds[p] for p in paths])
    config = replace(base, daemon=DaemonConfig(name="false-alarms", state_dir=state, hop_seconds=HOP),
                     machines=[MachineConfig(data.name, "replay", bank=bank_dir)])
    detector = Detector.from_config(base)
    reviewer = Reviewer(config, lambda: detector)
    raises = [a for a in run["alerts"] if a["type"] == "raise"]
    verdicts = {"fault": 0, "normal": 0, "refused": 0}
    for alert in raises:
        begin = datetime.fromisoformat(alert["start"]).timestamp() - run["source_start"]
        end = datetime.fromisoformat(alert["end"]).timestamp() - run["source_start"]
        verdict = "fault" if any(begin < b and a < end for a, b in spans) else "normal"
        # A false alarm is enrolled under the operating condition (the domain) of the clip it ended in.
        clip = paths[min(int(np.searchsorted(bounds, end - 1e-3)), len(paths) - 1)]
        try:
            reviewer.apply(Verdict(alert["event_id"], verdict, data.domain[clip]), "cli")
            verdicts[verdict] += 1
        except AsdError as exc:  # a clip that cannot be enrolled is that review's answer, not the run's end
            log.warning("%s: review of %s refused: %s", key, alert["event_id"], exc)
            verdicts["refused"] += 1
    report = build_report(config, data.name, detector.window_seconds, days=3650.0)
    print(format_report(report), flush=True)
    # What the report cannot know: which of its "false alarms" fell on an inserted fault that no
    # alert raised (so nobody reviewed it). The benchmark knows where the faults are.
    history = ScoreHistory(state / HISTORY_DIR).read(data.name, 0.0)
    truth = [Episode(run["source_start"] + a, run["source_start"] + b) for a, b in spans]
    on_faults = {}
    for row in report.rows:
        raised = replay_alerts(data.name, history, replace(config.alerts, threshold=row.threshold),
                               detector.window_seconds, HOP, config.reference.rolling_size)
        on_faults[row.threshold] = sum(any(e.overlaps(t) for t in truth) for e in raised)
    print("alerts the replay raises on inserted faults, reviewed or not: "
          + ", ".join(f"{t:g}: {n} of {len(truth)}" for t, n in on_faults.items()), flush=True)
    picture = plot_report(report, RESULTS / f"site_report_{key.replace('/', '_')}.png")
    return {"bank": enrolled, "stream_clips": len(paths), "normal_clips": len(normal),
            "fault_episodes": len(spans), "alerts": len(raises), "verdicts": verdicts,
            "report": asdict(report), "plot": picture.name,
            "alerts_on_inserted_faults": {str(t): n for t, n in on_faults.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="uav-noisy,fan-noisy")
    parser.add_argument("--bench", type=Path, default=SHARED_DATA / "bench")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--faults", type=int, default=3, help="fault episodes inserted into the normal stream")
    parser.add_argument("--episode", type=int, default=6, help="anomalous clips per inserted fault episode")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    present = [s for s in args.sets.split(",") if s and (args.bench / s).is_dir()]
    results: dict = {"seed": args.seed, "fault_episodes": args.faults, "episode_clips": args.episode, "sets": {},
                     "skipped": [s for s in args.sets.split(",") if s and s not in present]}
    memoise_embeddings()
    work = Path(tempfile.mkdtemp(prefix="asd-bench-site-"))
    started = time.perf_counter()
    try:
        with LoadMonitor() as load:
            for name in present:
                for data in machines_of(args.bench / name):
                    key = f"{name}/{data.name}"
                    results["sets"][key] = run_machine(key, data, work, np.random.default_rng(args.seed), args.faults, args.episode,
                                                       Config())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["total_s"] = round(time.perf_counter() - started, 1)
    write_json("site_report", results, load)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
