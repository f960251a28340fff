"""The score history: what a read gives back after records, torn writes, day boundaries and
pruning, from several threads, and what a real daemon replay leaves in it."""

from __future__ import annotations

import math
import threading
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from monitor.outputs.history import ScoreHistory
from monitor.service.daemon import Daemon
from tests.daemons import clips, daemon_config, enroll, run_to_end

MIDNIGHT = datetime(2026, 12, 2, tzinfo=timezone.utc).timestamp()  # a UTC day boundary


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    history = ScoreHistory(tmp_path)
    history.record("fan", MIDNIGHT + 10, "ok", 0.25, False)
    history.record("fan", MIDNIGHT + 20, "ok", 0.97, True)
    history.record("fan", MIDNIGHT + 30, "idle", None, False)
    history.record("fan", MIDNIGHT + 40, "sensor_fault", None, False)
    history.record("pump", MIDNIGHT + 15, "ok", 0.5, False)
    got = history.read("fan", MIDNIGHT)
    assert got.end.dtype == np.float64 and got.fused.dtype == np.float64 and got.anomalous.dtype == bool
    assert list(got.end) == [MIDNIGHT + 10, MIDNIGHT + 20, MIDNIGHT + 30, MIDNIGHT + 40]
    assert list(got.status) == ["ok", "ok", "idle", "sensor_fault"]
    assert got.fused[:2].tolist() == [0.25, 0.97] and np.isnan(got.fused[2:]).all()
    assert got.anomalous.tolist() == [False, True, False, False]
    assert history.read("pump", MIDNIGHT).end.tolist() == [MIDNIGHT + 15]
    assert len(history.read("nobody", 0.0)) == 0
    history.close()
    # A new instance (a restart) reads the same and keeps appending to the same day file.
    again = ScoreHistory(tmp_path)
    again.record("fan", MIDNIGHT + 50, "ok", 0.1, False)
    assert len(again.read("fan", MIDNIGHT)) == 5
    assert [p.name for p in (tmp_path / "fan").iterdir()] == ["2026-12-02.tsv"]


def test_bad_names_and_statuses_are_refused(tmp_path: Path) -> None:
    history = ScoreHistory(tmp_path)
    for name in ("..", "a/b", ""):
        with pytest.raises(ValueError, match="not a usable machine name"):
            history.record(name, MIDNIGHT, "ok", 0.1, False)
    with pytest.raises(ValueError, match="status 'broken'"):
        history.record("fan", MIDNIGHT, "broken", 0.1, False)
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="retention_days"):
        ScoreHistory(tmp_path, retention_days=0)


def test_a_torn_last_line_is_skipped_and_not_glued_to_the_next(tmp_path: Path) -> None:
    history = ScoreHistory(tmp_path)
    history.record("fan", MIDNIGHT + 10, "ok", 0.3, False)
    history.close()
    day_file = tmp_path / "fan" / "2026-12-02.tsv"
    with open(day_file, "ab") as f:  # what a kill -9 in the middle of a write leaves
        f.write(b"1796169620.000\tok\t0.4")
    assert history.read("fan", MIDNIGHT).end.tolist() == [MIDNIGHT + 10]
    restarted = ScoreHistory(tmp_path)
    restarted.record("fan", MIDNIGHT + 30, "ok", 0.5, True)
    got = restarted.read("fan", MIDNIGHT)
    assert got.end.tolist() == [MIDNIGHT + 10, MIDNIGHT + 30] and got.fused.tolist() == [0.3, 0.5]
    with open(day_file, "ab") as f:  # garbage in the middle of a file is skipped too
        f.write(b"not\ta line\n\xff\xfe\n")
    restarted.record("fan", MIDNIGHT + 40, "idle", None, False)
    assert len(restarted.read("fan", MIDNIGHT)) == 3


def test_day_boundaries_and_read_bounds(tmp_path: Path) -> None:
    history = ScoreHistory(tmp_path)
    ends = [MIDNIGHT - 20, MIDNIGHT - 10, MIDNIGHT, MIDNIGHT + 10, MIDNIGHT + 86400 + 5]
    for i, end in enumerate(ends):
        history.record("fan", end, "ok", i / 10, False)
    assert sorted(p.name for p in (tmp_path / "fan").iterdir()) == ["2026-12-01.tsv", "2026-12-02.tsv",
                                                                   "2026-12-03.tsv"]
    assert history.read("fan", 0.0).end.tolist() == ends
    # [since, until): the window ending at midnight is in the second span only.
    assert history.read("fan", MIDNIGHT - 15, MIDNIGHT).end.tolist() == [MIDNIGHT - 10]
    assert history.read("fan", MIDNIGHT, MIDNIGHT + 11).end.tolist() == [MIDNIGHT, MIDNIGHT + 10]
    assert history.read("fan", MIDNIGHT + 11).end.tolist() == [MIDNIGHT + 86400 + 5]
    assert len(history.read("fan", MIDNIGHT + 86400 * 5)) == 0


def test_files_past_the_retention_are_pruned(tmp_path: Path) -> None:
    history = ScoreHistory(tmp_path, retention_days=2)
    for day in range(5):
        history.record("fan", MIDNIGHT + day * 86400 + 60, "ok", 0.1, False)
    # The newest window is day 4 + 60 s: days 0 and 1 ended more than two days before it.
    names = sorted(p.name for p in (tmp_path / "fan").iterdir())
    assert names == ["2026-12-04.tsv", "2026-12-05.tsv", "2026-12-06.tsv"]
    assert history.read("fan", 0.0).end.tolist() == [MIDNIGHT + d * 86400 + 60 for d in (2, 3, 4)]


def test_several_threads_write_their_own_machines(tmp_path: Path) -> None:
    history = ScoreHistory(tmp_path)
    count = 2000

    def write(machine: str) -> None:
        for i in range(count):
            history.record(machine, MIDNIGHT + i, "ok", i / count, i % 7 == 0)

    threads = [threading.Thread(target=write, args=(f"m{k}",)) for k in range(4)]
    for thread in threads:
        thread.start()
    partial = history.read("m0", MIDNIGHT)  # a read during the writes sees whole lines only
    for thread in threads:
        thread.join()
    assert np.all(np.diff(partial.end) == 1.0)
    for k in range(4):
        got = history.read(f"m{k}", MIDNIGHT)
        assert got.end.tolist() == [MIDNIGHT + i for i in range(count)]
        assert math.isclose(got.fused[-1], (count - 1) / count, rel_tol=1e-5)
        assert got.anomalous.sum() == len(range(0, count, 7))


def test_a_daemon_replay_leaves_every_window_in_the_history(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "nnnff"))
    enroll(config, tmp_path / "enroll")
    daemon = Daemon(config)
    reports = []
    daemon.add_listener(reports.append)
    run_to_end(daemon)
    got = ScoreHistory(config.daemon.state_dir / "history").read("motor", 0.0)
    assert len(got) == len(reports) > 0
    assert got.end.tolist() == sorted(round(r.end, 3) for r in reports)
    by_end = {round(r.end, 3): r for r in reports}
    for end, status, fused in zip(got.end, got.status, got.fused):
        report = by_end[end]
        assert status == report.status
        if report.score is not None:
            assert math.isclose(fused, report.score.fused, rel_tol=1e-5, abs_tol=1e-6)
    assert got.anomalous.any() and (got.status == "ok").all()
