"""The site-specific report: a machine's window history and its reviewed alerts replayed through
the daemon's own alert rule at each candidate threshold."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from monitor.cli import main
from monitor.config import AlertConfig
from monitor.outputs.events import EventLog
from monitor.outputs.history import ScoreHistory, WindowHistory
from monitor.outputs.messages import iso_time
from monitor.review.report import Episode, format_report, poisson_upper, site_report
from monitor.review.verdicts import ReviewLog, ReviewRecord
from tests.daemons import clips, daemon_config, write_yaml
from tests.review.alerts import raise_alert

HOP = 10.0
T0 = 1_795_000_000.0
ALERTS = AlertConfig(threshold=0.99, raise_count=3, raise_window=5, clear_threshold=0.9, clear_count=6,
                     cooldown_seconds=300.0)


def _history(seed: int = 3) -> tuple[WindowHistory, Episode]:
    """Two days of normal windows (ranks uniform below 0.97), a burst of four windows at 0.985 every
    six hours (false alarms for thresholds under 0.985), and one fault: 30 windows at 0.995."""
    rng = np.random.default_rng(seed)
    n = int(2 * 86400 / HOP)
    fused = rng.uniform(0.0, 0.97, n)
    for start in range(1000, n, 2160):
        fused[start:start + 4] = 0.985
    fault_at = 9000
    fused[fault_at:fault_at + 30] = 0.995
    end = T0 + HOP * np.arange(1, n + 1)
    fault = Episode(float(end[fault_at] - HOP), float(end[fault_at + 29]), "motor-fault")
    return WindowHistory(end, np.array(["ok"] * n, dtype=object), fused, fused > 0.99), fault


def test_the_replay_counts_faults_and_false_alarms_per_threshold() -> None:
    history, fault = _history()
    report = site_report("motor", history, [fault], ALERTS, window_seconds=10.0, hop_seconds=HOP, reference_size=360,
                         candidates=(0.98, 0.99, 0.999), budget_per_day=1.0)
    rows = {r.threshold: r for r in report.rows}
    bursts = len(range(1000, len(history), 2160))
    assert rows[0.98].false_alarms == bursts and rows[0.98].faults_alarmed == 1
    assert rows[0.99].false_alarms == 0 and rows[0.99].faults_alarmed == 1
    assert rows[0.999].false_alarms == 0 and rows[0.999].faults_alarmed == 0
    days = (len(history) - 30) * HOP / 86400
    assert abs(report.normal_days - days) < 1e-9
    assert abs(rows[0.98].false_alarms_per_day - bursts / days) < 1e-9
    assert rows[0.99].false_alarms_per_day_upper == poisson_upper(0) / days
    assert report.suggested == 0.99  # 0.98 gives bursts/2 days > 1 per day: the most sensitive within budget
    assert not report.confirmed  # no false alarm in 2 days bounds the rate only below 1.5 per day
    table = format_report(report)
    assert "<- configured <- suggested" in table and "1 of 1" in table and "a lead, not yet confirmed" in table
    looser = site_report("motor", history, [fault], ALERTS, window_seconds=10.0, hop_seconds=HOP, reference_size=360,
                         candidates=(0.98, 0.99, 0.999), budget_per_day=2.0)
    assert looser.suggested == 0.99 and looser.confirmed


def test_poisson_upper_bound() -> None:
    assert abs(poisson_upper(0) - 2.9957) < 1e-3  # -ln(0.05)
    assert abs(poisson_upper(3) - 7.7537) < 1e-3


def test_the_cli_report_from_a_state_directory(tmp_path: Path, capsys) -> None:
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "n"))
    history, fault = _history()
    store = ScoreHistory(config.daemon.state_dir / "history")
    for end, fused in zip(history.end, history.fused):
        store.record("motor", float(end), "ok", float(fused), bool(fused > 0.99))
    store.close()
    alert = raise_alert(config, "motor", np.zeros(16000, dtype=np.float32), 16000, "motor-fault", start=fault.start,
                        clip="none.flac", fused=0.995)
    with EventLog(config.daemon.state_dir / "events.jsonl") as events:
        events.write("alert", alert=replace(alert, type="clear", end=iso_time(fault.end + 60)))
    ReviewLog(config.daemon.state_dir).append(ReviewRecord(iso_time(T0), alert.event_id, "motor", "fault", "default",
                                                           "", "cli"))
    path = write_yaml(tmp_path / "site.yaml", config)
    out = tmp_path / "reports"
    # The history is from 2026-11-17: count on all of it.
    assert main(["review", "report", "-c", str(path), "--days", "400", "--budget", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 confirmed fault(s) replayed" in printed and "suggested threshold 0.99" in printed
    assert "17244 normal windows" in printed  # 2 days less the fault up to its clear (30 + 6 windows)
    report = json.loads((out / "motor.json").read_text())
    assert report["faults"] == ["motor-fault"] and report["suggested"] == 0.99
    assert (out / "motor.png").stat().st_size > 1000
    assert main(["review", "report", "-c", str(path), "--machine", "pump"]) == 2
    assert "unknown machine 'pump'" in capsys.readouterr().err
    assert main(["review", "list", "-c", str(path), "--days", "3"]) == 2
