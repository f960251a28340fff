"""``asd-monitor``: enroll normal audio, score recordings, evaluate on a labelled data set.

Exit codes: 0 success; 1 unexpected failure; 2 bad command line; 65 bad input data (audio,
bank, model, data set); 78 bad configuration (systemd's RestartPreventExitStatus lists it, so
a bad config does not become a restart loop).
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib.util
import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from monitor import __version__
from monitor.audio.files import find_audio
from monitor.bank.store import BankStore
from monitor.config import DEFAULT_CONDITION, BackboneConfig, Config, load_config
from monitor.errors import (
    EXIT_DATA,
    EXIT_FAILURE,
    AsdError,
    BankError,
    CommandError,
    ConfigError,
    UsageError,
)
from monitor.offline.dcase import BOOTSTRAP_RESAMPLES
from monitor.outputs.fanout import WINDOWS_LOG
from monitor.outputs.messages import VERDICTS
from monitor.scoring.backbone import builtin_names, check_backbones
from monitor.scoring.detector import Detector
from monitor.scoring.idle import NOISE_CONDITION
from monitor.scoring.recording import score_recording

if TYPE_CHECKING:
    from monitor.review.verdicts import Alert, ReviewLog

log = logging.getLogger(__name__)


def _progress_factory(description: str, unit: str = "clip"):
    """A tqdm bar on stderr when it is a terminal, nothing in a pipe or the journal. Counted in
    seconds of audio (``unit="s"``) it advances block by block, so a long file shows progress."""
    from tqdm import tqdm

    def make(total: float):
        bar = tqdm(total=total, desc=description, unit=unit, unit_scale=unit == "s", disable=None, leave=False)
        return bar.update

    return make


def _audio_seconds(paths: list[Path]) -> float:
    """The files' length from their headers (nothing decoded): a bar's total."""
    from monitor.audio.files import AudioFile

    return sum(AudioFile.open(path).seconds for path in paths)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _snr_range(text: str) -> tuple[float, float]:
    """``LOW:HIGH`` in dB (LOW <= HIGH)."""
    try:
        low, high = (float(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW:HIGH in dB, e.g. -6:0, got {text!r}") from None
    if low > high:
        raise argparse.ArgumentTypeError(f"LOW must not exceed HIGH, got {text!r}")
    return low, high


def _config(args: argparse.Namespace) -> Config:
    config = load_config(args.config) if args.config else Config()
    if getattr(args, "backbone", None):
        config = replace(config, backbones=[BackboneConfig(name) for name in args.backbone])
    return config


def _set_file_mode(config: Config) -> None:
    """Whatever this command writes gets ``daemon.file_mode``'s permissions. Set once through the
    process umask, which every writer follows (sqlite, soundfile, the bank store, threads)."""
    os.umask(config.daemon.umask())


def cmd_enroll(args: argparse.Namespace) -> int:
    from monitor.enrollment.files import NoiseMixing, enroll_files

    if args.mix_noise and args.noise:
        raise UsageError("--mix-noise mixes machine recordings with site noise; it cannot go with --noise")
    config = _config(args)
    _set_file_mode(config)
    detector = Detector.from_config(config)
    paths = find_audio(args.paths)
    mixing = NoiseMixing(find_audio(args.mix_noise), args.mixes, args.snr_db) if args.mix_noise else None
    condition = NOISE_CONDITION if args.noise else args.condition
    seconds = _audio_seconds(paths) * (1 + (mixing.mixes if mixing else 0))
    result = enroll_files(detector, BankStore(args.bank), paths, condition, args.replace, args.note,
                          _progress_factory("enroll", "s")(seconds), mixing)
    left_out = f", {result.left_out_windows} left out by the sensor checks" if result.left_out else ""
    print(f"bank {args.bank}: version {result.version}, {len(result.bank)} windows "
          f"({result.new_windows} new, condition {condition}{left_out}), backbones {', '.join(result.bank.backbones)}")
    return 0


def _score_rows(detector: Detector, paths: list[Path]) -> list[dict]:
    """One row per file for ``score``. The bar lives in this frame: it is gone (tqdm clears it
    when collected, as the enroll and evaluate bars are) before the results are printed."""
    progress = _progress_factory("score", "s")(_audio_seconds(paths))
    rows = []
    for path in paths:
        result = score_recording(detector, path, progress)
        worst, scores = result.worst, result.scores
        rows.append({
            "file": str(path), "windows": len(result.starts), "idle_windows": int(scores.idle.sum()),
            "worst_window_start_s": None if worst is None else result.starts[worst],
            "fused_rank": result.fused_rank, "anomalous": result.anomalous,
            "backbones": {} if worst is None else {
                name: {"score": float(scores.raw[name][worst]), "rank": float(scores.ranks[name][worst])}
                for name in scores.raw},
        })
    return rows


def cmd_score(args: argparse.Namespace) -> int:
    detector = Detector.from_config(_config(args))
    detector.fit(BankStore(args.bank).load())
    notice = detector.reenroll_notice(args.bank)
    if notice:
        log.warning("%s", notice)
    threshold = detector.config.alerts.threshold
    rows = _score_rows(detector, find_audio(args.paths))
    if args.json:
        print(json.dumps({"threshold": threshold, "bank": str(args.bank), "results": rows}, indent=2))
        return 0
    from monitor.offline.report import format_table

    names = list(detector.scored)  # what the bank served (an earlier bank: the backbone of its time)
    table = [{"file": Path(r["file"]).name, **{f"{n} score": r["backbones"].get(n, {}).get("score", "") for n in names},
              **{f"{n} rank": r["backbones"].get(n, {}).get("rank", "") for n in names},
              "fused": "" if r["fused_rank"] is None else r["fused_rank"],
              "verdict": "idle" if r["anomalous"] is None else "ANOMALY" if r["anomalous"] else "normal"} for r in rows]
    columns = ["file", *[f"{n} score" for n in names], *[f"{n} rank" for n in names], "fused", "verdict"]
    print(format_table(table, columns))
    print(f"(rank = share of the bank's own leave-one-out scores below; anomalous when fused rank > {threshold:g})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from monitor.offline.evaluate import print_table, run_evaluation
    from monitor.offline.report import to_json

    out = args.out or Path("out") / f"evaluate-{Path(args.dataset).resolve().name}"
    detector = Detector.from_config(_config(args))
    results, summary = run_evaluation(detector, args.dataset, out, _progress_factory("evaluate"), args.bootstrap)
    if args.json:
        print(to_json(summary), end="")
    else:
        print(print_table(results, summary))
        score = summary["official_score"]
        shown = f"{score:.3f}" if score == score else "undefined (no machine has figures)"  # NaN != NaN
        print(f"official score (fused): {shown}   elapsed {summary['elapsed_seconds']:.0f} s")
    print(f"wrote {out / 'results.json'}, {out / 'roc.png'} and the official CSV files in {out}",
          file=sys.stderr if args.json else sys.stdout)
    return 0


def _required_config(args: argparse.Namespace, command: str) -> Config:
    if args.config is None:
        raise UsageError(f"{command} needs --config FILE")
    return load_config(args.config)


def cmd_run(args: argparse.Namespace) -> int:
    from monitor.service.daemon import Daemon

    faulthandler.enable()  # a watchdog SIGABRT then shows every thread's stack in the journal
    config = _required_config(args, "run")
    if not config.machines:
        raise ConfigError(f"{args.config}: machines: nothing to monitor (add a machine and a source)")
    # Model paths now; loading them is the daemon's first step (loading twice would double the
    # start-up time and peak memory of a large backbone).
    check_backbones(config, str(args.config), load=False)
    _set_file_mode(config)
    return run_daemon(Daemon(config, args.config))


def run_daemon(daemon) -> int:
    """Start, run until SIGTERM/SIGINT (or the end of a replay), stop cleanly."""
    import signal

    def request_stop(signum, _frame) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        daemon.stop_event.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, lambda _signum, _frame: daemon.reload_requested.set())
    try:
        daemon.start()
        daemon.run()
    finally:
        daemon.stop()
    return 0


def cmd_enroll_live(args: argparse.Namespace) -> int:
    """Start, stop, cancel or query a live enrollment in the running daemon."""
    from monitor.service.control import request

    config = _required_config(args, "enroll-live")
    fields = {"action": args.action}
    if args.action == "start":
        fields["condition"] = args.condition
        if args.duration is not None:
            fields["duration_s"] = args.duration
    try:
        reply = request(config.daemon.resolved_state_dir() / "control.sock", args.machine, fields)
    except ConnectionError as exc:
        print(f"asd-monitor: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(reply, indent=2))
    return 0 if reply.get("ok") else EXIT_DATA


def cmd_review(args: argparse.Namespace) -> int:
    """Answer an alert by its event id (``monitor/review/``), or list the alerts to answer.

    With a daemon listening on its control socket the verdict goes through it (one writer of
    the event log; its metrics and MQTT hear of it). Without one it is applied here; the
    review event is then written to the event log only when the config has the control socket
    (so no daemon can be writing it), else the verdict is in ``reviews.jsonl`` alone."""
    from monitor.review.apply import Reviewer
    from monitor.review.verdicts import (
        ReviewLog,
        check_verdict,
        describe,
        find_alert,
        read_alerts,
    )

    config = _required_config(args, "review")
    if args.target in ("list", "report") and (args.verdict is not None or args.condition is not None
                                              or args.note is not None):
        raise UsageError(f"review {args.target} takes no verdict, --condition or --note")
    if args.target != "report" and (args.machine or args.days is not None or args.budget is not None or args.out):
        raise UsageError("--machine, --days, --budget and --out go with: review report")
    if args.target == "list":
        return _list_reviews(read_alerts(config.daemon.resolved_event_log()), ReviewLog(config.daemon.resolved_state_dir()), args.all)
    if args.all:
        raise UsageError("--all goes with: review list")
    if args.target == "report":
        return _site_reports(config, args)
    if args.verdict not in VERDICTS:
        raise UsageError(f"review EVENT_ID needs a verdict: one of {', '.join(VERDICTS)}")
    _set_file_mode(config)
    verdict = check_verdict(args.target, args.verdict, args.condition, args.note, config.enrollment)
    alert = find_alert(config.daemon.resolved_event_log(), verdict.event_id)  # the machine it is for; unknown ids end here
    state_dir = config.daemon.resolved_state_dir()
    if config.enrollment.control_socket:
        from monitor.service.control import request

        fields = {"event_id": verdict.event_id, "verdict": verdict.verdict, "condition": verdict.condition,
                  "note": verdict.note}
        try:
            reply = request(state_dir / "control.sock", alert.machine, fields, timeout=120.0, command="review")
        except ConnectionError:
            reply = None
            log.info("no daemon answers on %s: applying the verdict here", state_dir / "control.sock")
        if reply is not None:
            if not reply.get("ok"):
                raise CommandError(str(reply.get("error", "refused by the daemon")))
            print(describe(reply))
            return 0
    applied = Reviewer(config, lambda: Detector.from_config(config)).apply(verdict, "cli")
    record = applied.record
    if config.enrollment.control_socket:
        from monitor.outputs.events import EventLog

        with EventLog(config.daemon.resolved_event_log()) as events:
            events.write("review", machine=record.machine, event_id=record.event_id, verdict=record.verdict,
                         condition=record.condition, note=record.note, who=record.who, version=record.version)
    print(describe(applied.reply()))
    return 0


def _site_reports(config: Config, args: argparse.Namespace) -> int:
    """``review report``: each machine's threshold table from its reviews and window history
    (``monitor/review/report.py``), printed, and written as JSON and a plot."""
    from monitor.review.report import (
        DEFAULT_BUDGET,
        DEFAULT_DAYS,
        REPORTS_DIR,
        build_report,
        format_report,
        write_report,
    )

    names = [m.name for m in config.machines]
    if args.machine and args.machine not in names:
        raise UsageError(f"unknown machine {args.machine!r} (configured: {', '.join(names) or 'none'})")
    days = DEFAULT_DAYS if args.days is None else args.days
    budget = DEFAULT_BUDGET if args.budget is None else args.budget
    if not days > 0 or not budget >= 0:
        raise UsageError(f"--days must be > 0 and --budget >= 0, got {days} and {budget}")
    out = args.out or config.daemon.resolved_state_dir() / REPORTS_DIR
    window_seconds = Detector.from_config(config).window_seconds
    for name in [args.machine] if args.machine else names:
        report = build_report(config, name, window_seconds, days=days, budget_per_day=budget)
        print(format_report(report))
        data, picture = write_report(report, out)
        print(f"written: {data}, {picture}\n")
    return 0


def _list_reviews(alerts: list[Alert], reviews: ReviewLog, show_all: bool) -> int:
    """One line per alert not yet answered (``--all``: every alert, with its verdict)."""
    given = {r.event_id: r for r in reviews.records()}
    rows = [(a, given.get(a.event_id)) for a in alerts if show_all or a.event_id not in given]
    if not rows:
        print("no alerts to review" if not show_all else "no alerts")
        return 0
    header = ["event_id", "machine", "start", "fused", "clip", *(["verdict"] if show_all else [])]
    table = [header] + [
        [a.event_id, a.machine, a.start, "" if a.fused_rank is None else f"{a.fused_rank:.3f}",
         a.clip or f"(none: {a.clip_error})" if a.clip_error else a.clip or "(none)",
         *([f"{r.verdict} ({r.who}, {r.time}{', bank ' + r.version if r.version else ''})" if r else "-"]
           if show_all else [])]
        for a, r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """What ``run`` checks before it starts, starting nothing. Without onnxruntime (a plain
    install) the model files are looked for but not opened, and the answer says so."""
    config = load_config(args.file)
    loadable = importlib.util.find_spec("onnxruntime") is not None
    check_backbones(config, str(args.file), load=loadable)
    unchecked = "" if loadable else "; models not opened: onnxruntime is not installed"
    print(f"{args.file}: ok ({len(config.machines)} machine(s), {len(config.sources)} source(s), "
          f"backbones {', '.join(b.key for b in config.backbones)}{unchecked})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on a machine without a microphone: the real daemon on bundled recordings."""
    import tempfile

    from monitor import demo
    from monitor.service.daemon import Daemon

    logging.getLogger(WINDOWS_LOG).setLevel(logging.INFO)
    for name in ("monitor.service.daemon", "monitor.outputs.fanout"):  # the metrics URL, MQTT and states
        logging.getLogger(name).setLevel(logging.INFO)
    state = args.state_dir or Path(tempfile.mkdtemp(prefix="asd-demo-"))  # kept: its clip and events are the result
    config = demo.demo_config(state, args.speed, _config(args))
    _set_file_mode(config)
    detector = Detector.from_config(config)
    print(f"== enrolling {len(demo.enroll_clips())} recordings of a healthy fan (MIMII, CC BY-SA 4.0)")
    from monitor.enrollment.files import enroll_files

    enrolled = enroll_files(detector, BankStore(demo.bank_dir(state)), demo.enroll_clips(), DEFAULT_CONDITION, replace=True)
    print(f"   bank {demo.bank_dir(state)}: {len(enrolled.bank)} windows")
    daemon = Daemon(config)
    daemon.add_listener(demo.fault_marker(config, lambda: daemon.sources["replay"].start_time))
    print(f"== replaying {len(demo.replay_clips())} recordings at {args.speed:g}x: {demo.healthy_seconds():g} s healthy, "
          f"then the same fan with a fault ({demo.describe_outputs(config)})")
    print(demo.explain(config), flush=True)
    code = run_daemon(daemon)
    clips = sorted((state / "clips").rglob("*.flac"))
    print(f"== done: {daemon.windows_processed} windows scored (the metrics endpoint closed with the demo)")
    print(f"   kept in {state}: events {state / 'events.jsonl'}"
          + (f", alert clip {clips[-1]}" if clips else ", no alert clip"))
    return code


def cmd_bank(args: argparse.Namespace) -> int:
    """Inspect and manage a bank's versions; the running daemon follows CURRENT by itself."""
    store = BankStore(args.bank)
    action = args.bank_command
    if action == "list":
        current = store.current()
        for version in store.versions():
            try:
                bank = store.load(version)
                line = (f"{version}{' *' if version == current else '  '} {bank.created or '':25s} {len(bank):7d} windows  "
                        f"conditions {','.join(bank.conditions)}  {bank.note}")
            except BankError as exc:
                line = f"{version}{' *' if version == current else '  '} UNREADABLE: {exc}"
            print(line)
        return 0
    if action == "show":
        bank = store.load(args.version)
        counts = {c: bank.condition_labels().count(c) for c in bank.conditions}
        backbones = {n: {"model_id": bank.model_ids[n], "dim": bank.dims[n]} for n in bank.backbones}
        print(json.dumps({"version": bank.version, "current": store.current(), "created": bank.created,
                          "parent": bank.parent, "note": bank.note, "windows": len(bank), "conditions": counts,
                          "recorded_at_hz": sorted(bank.recorded_rates), "backbones": backbones,
                          "outputs": bank.outputs}, indent=2))
        return 0
    if action == "rollback":
        target = args.version or _previous_version(store)
        store.set_current(target)
        print(f"bank {args.bank}: current version is now {target} (a running daemon switches within seconds)")
        return 0
    if action == "use":
        store.set_current(args.version)
        print(f"bank {args.bank}: current version is now {args.version} (a running daemon switches within seconds)")
        return 0
    if action == "compact":
        from monitor.bank.compaction import compact

        bank = store.load()
        compacted = compact(bank, args.max_windows)
        version = store.save(compacted, note=f"compacted from {bank.version}: conditions above {args.max_windows} "
                                             f"windows as k-means centroids")
        print(f"bank {args.bank}: version {version}, {len(compacted)} windows (was {len(bank)} in {bank.version}); "
              f"undo with: asd-monitor bank rollback --bank {args.bank} --version {bank.version}")
        return 0
    if action == "prune":
        removed = store.prune(args.keep)
        print(f"bank {args.bank}: removed {', '.join(removed) if removed else 'nothing'}")
        return 0
    if action == "export":
        version = store.export(args.file, args.version)
        print(f"bank {args.bank}: exported {version} to {args.file}")
        return 0
    # With --config, the archive must hold the models that box scores with (loaded for their ids).
    check = Detector.from_config(load_config(args.config)).check if args.config else None
    version = store.import_archive(args.file, args.replace_models, check=check, config_source=str(args.config))
    print(f"bank {args.bank}: imported {args.file} as {version} (now current)")
    return 0


def _previous_version(store: BankStore) -> str:
    """Rollback target: the current version's parent, else the version before it."""
    current = store.load()
    if current.parent and current.parent in store.versions():
        return current.parent
    older = [v for v in store.versions() if v < (current.version or "")]
    if not older:
        raise BankError(f"bank {store.path}: {current.version} has no earlier version to roll back to")
    return older[-1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asd-monitor", description=__doc__.split("\n\n")[0],
                                     epilog="exit codes: 0 ok, 1 failure, 2 usage, 65 bad input data, 78 bad config")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", type=Path, help="YAML config (default: built-in defaults)")
    common.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug logging")
    backbone_help = f"backbone to use, repeatable: a built-in ({', '.join(builtin_names())}) or an .onnx path; overrides the config"
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("enroll", parents=[common], help="add normal recordings to a bank (new bank version)")
    p.add_argument("--bank", type=Path, required=True, help="bank directory")
    p.add_argument("--backbone", action="append", help=backbone_help)
    condition = p.add_mutually_exclusive_group()
    condition.add_argument("--condition", default=DEFAULT_CONDITION,
                           help=f"operating condition of these recordings (default: {DEFAULT_CONDITION})")
    condition.add_argument("--noise", action="store_true",
                           help=f"noise-only recordings of the site with the machine stopped (condition {NOISE_CONDITION}): "
                                "the daemon then reports such windows as idle instead of scoring them")
    p.add_argument("--mix-noise", action="append", type=Path, metavar="PATH",
                   help="clean machine recordings: also enroll each mixed with these noise-only recordings of the "
                        "site (files or folders, repeatable)")
    p.add_argument("--mixes", type=_positive_int, default=3, help="mixtures per recording with --mix-noise (default: 3)")
    p.add_argument("--snr-db", type=_snr_range, default=(-6.0, 0.0), metavar="LOW:HIGH",
                   help="machine-to-site-noise ratio of the mixtures in dB, drawn at random in this range "
                        "(default: -6:0; write --snr-db=-12:-3)")
    p.add_argument("--replace", action="store_true", help="start a new bank instead of adding to the current version")
    p.add_argument("--note", help="note stored with the new bank version")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="audio files or folders")
    p.set_defaults(func=cmd_enroll)

    p = sub.add_parser("score", parents=[common], help="score recordings against a bank")
    p.add_argument("--bank", type=Path, required=True, help="bank directory")
    p.add_argument("--backbone", action="append", help=backbone_help)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="audio files or folders")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("evaluate", parents=[common], help="DCASE-style evaluation on a labelled data set")
    p.add_argument("dataset", type=Path, metavar="DATASET", help="folder with <machine>/train and <machine>/test")
    p.add_argument("--backbone", action="append", help=backbone_help)
    p.add_argument("--out", type=Path,
                   help="write results.json, roc.png and the official CSVs here (default: out/evaluate-DATASET)")
    p.add_argument("--json", action="store_true", help="print results.json instead of a table")
    p.add_argument("--bootstrap", type=_non_negative_int, default=BOOTSTRAP_RESAMPLES, metavar="N",
                   help=f"resamples for the 95%% intervals of every figure (default {BOOTSTRAP_RESAMPLES}; 0: none)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("bank", parents=[common], help="list, show, use, roll back, compact, prune, export or import bank versions")
    bank_sub = p.add_subparsers(dest="bank_command", required=True, metavar="ACTION")
    for name, text in (("list", "every version, * marks the current one"), ("show", "one version as JSON"),
                       ("rollback", "make an earlier version current (default: the current one's parent)"),
                       ("use", "make a given version current (also repairs a bank whose CURRENT file was lost)"),
                       ("prune", "delete old versions"), ("export", "write a version as .tar.gz"),
                       ("import", "add an exported version as the new current one (bank -c CONFIG import: refused "
                                  "unless it holds that config's models)"),
                       ("compact", "new version with each large condition as k-means centroids (measured to cost "
                                   "detection quality: for size, see README)")):
        q = bank_sub.add_parser(name, help=text)
        q.add_argument("--bank", type=Path, required=True, help="bank directory")
        if name in ("show", "rollback", "export"):
            q.add_argument("--version", help="version (default: current)" if name != "rollback" else "target version")
        if name == "use":
            q.add_argument("--version", required=True, help="the version to make current")
        if name == "compact":
            q.add_argument("--max-windows", type=_positive_int, required=True,
                           help="conditions with more windows become this many centroids; smaller ones stay as they are")
        if name == "prune":
            q.add_argument("--keep", type=int, default=5, help="newest versions to keep (default: 5; current always kept)")
        if name in ("export", "import"):
            q.add_argument("file", type=Path, metavar="FILE", help="the .tar.gz archive")
        if name == "import":
            q.add_argument("--replace-models", action="store_true",
                           help="accept embeddings of other models than the current version's")
    p.set_defaults(func=cmd_bank)

    p = sub.add_parser("enroll-live", parents=[common],
                       help="enroll a machine's own audio in the running daemon (while it is known to be healthy)")
    p.add_argument("action", choices=["start", "stop", "cancel", "status"])
    p.add_argument("--machine", required=True, help="machine name from the config")
    p.add_argument("--duration", type=float, help="seconds of audio to enroll (default: enrollment.default_duration_seconds)")
    p.add_argument("--condition", default=DEFAULT_CONDITION,
                   help=f"operating condition (default: {DEFAULT_CONDITION}; {NOISE_CONDITION}: the machine is stopped, enroll the site's noise)")
    p.set_defaults(func=cmd_enroll_live)

    p = sub.add_parser("review", parents=[common], usage="%(prog)s [-c CONFIG] EVENT_ID {normal,fault,unsure} "
                       "[--condition NAME] [--note TEXT] | list [--all] | report [--machine M] [--days D] "
                       "[--budget N] [--out DIR]",
                       help="answer an alert: normal (false alarm, enrolled), fault (confirmed, kept) or unsure; "
                            "list the alerts to answer; or report what the reviews say about the threshold")
    p.add_argument("target", metavar="EVENT_ID|list|report", help="the alert's event id, 'list' or 'report'")
    p.add_argument("verdict", nargs="?", metavar="VERDICT", help=f"one of {', '.join(VERDICTS)}")
    p.add_argument("--condition", help="operating condition a false alarm's clip is enrolled under (default: default)")
    p.add_argument("--note", help="a word on the verdict, kept with it")
    p.add_argument("--all", action="store_true", help="with list: every alert, with its verdict")
    p.add_argument("--machine", help="with report: only this machine (default: every configured one)")
    p.add_argument("--days", type=float, help="with report: days of window history to count false alarms on (default 7)")
    p.add_argument("--budget", type=float, help="with report: false alarms per day the suggested threshold may give "
                                                "(default 0.1)")
    p.add_argument("--out", type=Path, help="with report: folder for <machine>.json and .png (default: STATE_DIR/reports)")
    p.set_defaults(func=cmd_review)

    p = sub.add_parser("run", parents=[common], help="run the monitoring daemon (the product)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", parents=[common], help="validate a config file without starting anything")
    p.add_argument("file", type=Path, metavar="FILE")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("demo", parents=[common],
                       help="the daemon on bundled real recordings: enroll a healthy fan, replay healthy then faulty audio")
    p.add_argument("--state-dir", type=Path, help="keep bank, events and clips here (default: a temporary folder)")
    p.add_argument("--speed", type=float, default=4.0, help="replay speed, x real time (default: 4)")
    p.set_defaults(func=cmd_demo)
    return parser


class _JournalFormatter(logging.Formatter):
    """journald adds its own timestamps and reads a ``<N>`` syslog priority prefix, so
    ``journalctl -p warning`` shows alerts and faults."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIORITY.get(record.levelno, 6)}>{record.name}: {record.getMessage()}"


def setup_logging(verbosity: int) -> None:
    """-v info, -vv debug. Under systemd (JOURNAL_STREAM set) the per-window lines need -vv:
    a line every 10 s per machine would bury everything else in the journal."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler()
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter())
        if verbosity < 2:
            logging.getLogger(WINDOWS_LOG).setLevel(logging.WARNING)
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    umask = os.umask(0o077)  # only setting the umask reads it
    os.umask(umask)
    try:
        return args.func(args)
    except AsdError as exc:
        kind = "config error" if isinstance(exc, ConfigError) else "error"
        print(f"asd-monitor: {kind}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    finally:
        os.umask(umask)  # main() also runs inside other processes (tests, scripts): leave theirs as found


if __name__ == "__main__":
    sys.exit(main())
