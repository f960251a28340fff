"""Site noise enrolled with the machine stopped: the daemon reports such windows as ``idle``
instead of scoring them (monitor/scoring/idle.py), through enrollment from files and live enrollment."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from monitor.bank.model import Bank, BankItem, enrolled_level
from monitor.bank.store import BankStore
from monitor.cli import main
from monitor.config import BackboneConfig, Config, EnrollmentConfig
from monitor.enrollment.files import enroll_files
from monitor.errors import BackboneError
from monitor.scoring.detector import Detector
from monitor.scoring.idle import NOISE_CONDITION, IdleDetector
from monitor.scoring.knn import KnnScorer
from monitor.service.control import request
from monitor.service.daemon import Daemon
from tests.daemons import clips, daemon_config, events_of, run_to_end, wait_for
from tests.synth import machine_sound, site_noise, write_clip

NOW = "2026-01-01T00:00:00+00:00"


def _cloud(rng: np.random.Generator, centre: float, n: int, dim: int = 8) -> np.ndarray:
    return (centre + 0.1 * rng.standard_normal((n, dim))).astype(np.float32)


def test_idle_only_when_clearly_nearer_to_the_site_noise() -> None:
    rng = np.random.default_rng(0)
    running = (np.array([1.0, 0, 0, 0]) + 0.05 * rng.standard_normal((40, 4))).astype(np.float32)
    noise = (np.array([0, 1.0, 0, 0]) + 0.05 * rng.standard_normal((40, 4))).astype(np.float32)
    detector = IdleDetector(running, noise)
    # Site noise; the running machine; a new sound between the two, slightly nearer the noise.
    queries = np.array([[0.02, 1, 0, 0], [1, 0.02, 0, 0], [0.9, 1, 0, 0]], np.float32)
    ratio = detector.distance_ratio(queries)
    assert ratio[0] < 0.5 < 1 < ratio[1] and 0.5 < ratio[2] < 1
    assert detector.is_idle(queries).tolist() == [True, False, False]
    assert IdleDetector(running, noise, margin=1.0).is_idle(queries).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="idle margin"):
        IdleDetector(running, noise, margin=0.0)


def test_detector_scores_the_running_machine_only() -> None:
    """Site noise neither enters the KNN bank nor the anchored reference of the machine."""
    rng = np.random.default_rng(1)
    detector = Detector.from_config(Config(backbones=[BackboneConfig("logmel")]))
    name = detector.lead_backbone
    dim = detector.backbones[0].meta.embedding_dim
    running, noise = _cloud(rng, 0.0, 30, dim), _cloud(rng, 1.0, 10, dim)
    items = [BankItem(f"m{i}", 0.0, "default", NOW) for i in range(30)]
    items += [BankItem(f"n{i}", 0.0, NOISE_CONDITION, NOW) for i in range(10)]
    detector.fit(Bank().add(items, {name: np.concatenate([running, noise])}, detector.model_ids))
    expected = KnnScorer(running, ["default"] * 30, "mahalanobis", 1, 0.5,
                         normalisation=detector.config.scoring.normalisation).leave_one_out()
    np.testing.assert_allclose(detector.reference(name), np.sort(expected), rtol=1e-6)
    assert detector.score({name: noise[:3]}).idle.all() and not detector.score({name: running[:3]}).idle.any()
    only_noise = Bank().add(items[30:], {name: noise}, detector.model_ids)
    with pytest.raises(BackboneError, match="0 window.s. of the running machine .and 10 of site noise."):
        detector.fit(only_noise)


def test_level_drop_reference_is_the_quietest_enrolled_condition() -> None:
    items = [BankItem(f"m{i}", 0.0, "default", NOW, -20.0 + i) for i in range(3)]
    items += [BankItem(f"n{i}", 0.0, NOISE_CONDITION, NOW, -45.0) for i in range(2)]
    bank = Bank().add(items, {"b": np.zeros((5, 2), np.float32)}, {"b": "m"})
    assert enrolled_level(bank) == -45.0


def _stream(folder: Path, kinds: str) -> list[Path]:
    """n: machine normal, f: machine faulty, s: machine stopped (site noise only)."""
    out = []
    for i, kind in enumerate(kinds):
        sound = site_noise(500 + i) if kind == "s" else machine_sound(300 + i, fault=kind == "f")
        out.append(write_clip(folder / f"{i:02d}_{kind}.flac", sound))
    return out


def _alerts(config) -> list[dict]:
    lines = (config.daemon.state_dir / "events.jsonl").read_text().splitlines()
    return [json.loads(line)["alert"] for line in lines if json.loads(line)["kind"] == "alert"]


@pytest.mark.parametrize("with_noise", [True, False])
def test_stopped_machine_is_idle_and_a_fault_still_raises(tmp_path: Path, capsys, with_noise: bool) -> None:
    """The same stream with and without site noise enrolled (``asd-monitor enroll --noise``):
    without it, downtime raises an alert; with it, downtime is idle and only the fault alerts."""
    stream = _stream(tmp_path / "replay", "nssssnnffff")
    config = daemon_config(tmp_path, stream)
    bank = config.daemon.state_dir / "banks" / "motor"
    normals = clips(tmp_path / "enroll", "nnnnnn", seed=0)
    store = BankStore(bank)
    enroll_files(Detector.from_config(config), store, normals, "default")
    if with_noise:
        noise = [write_clip(tmp_path / "noise" / f"{i}.flac", site_noise(i)) for i in range(6)]
        assert main(["enroll", "--bank", str(bank), "--backbone", "logmel", "--noise", *map(str, noise)]) == 0
        assert f"condition {NOISE_CONDITION}" in capsys.readouterr().out
        assert store.load().conditions == ["default", NOISE_CONDITION]
    daemon = Daemon(config)
    run_to_end(daemon)
    windows = daemon.telemetry.registry.get_sample_value
    raised = [a for a in _alerts(config) if a["type"] == "raise"]
    if with_noise:
        assert windows("asd_windows_total", {"machine": "motor", "status": "idle"}) == 4
        assert len(raised) == 1 and _window_index(config, raised[0]) >= 7  # the fault
    else:
        assert windows("asd_windows_total", {"machine": "motor", "status": "idle"}) == 0
        assert raised and _window_index(config, raised[0]) <= 4  # the downtime, taken for a fault


def _window_index(config, alert: dict) -> int:
    """Which 10 s window of the replay an alert's first anomalous window was (the replay
    starts with the daemon)."""
    lines = [json.loads(line) for line in (config.daemon.state_dir / "events.jsonl").read_text().splitlines()]
    started = next(e["time"] for e in lines if e["kind"] == "started")
    seconds = datetime.fromisoformat(alert["start"].replace("Z", "+00:00")) - datetime.fromisoformat(
        started.replace("Z", "+00:00"))
    return round(seconds.total_seconds() / 10.0)


def test_live_enrollment_of_site_noise(tmp_path: Path, running) -> None:
    """While the machine is stopped: ``condition: site-noise`` is accepted even with a list of
    conditions, its windows are not outliers, and no alarm is raised during it."""
    config = daemon_config(tmp_path, _stream(tmp_path / "replay", "ssss"), loop=True)
    config = replace(config, enrollment=EnrollmentConfig(min_windows=4, conditions=["day"]))
    store = BankStore(config.daemon.state_dir / "banks" / "motor")
    enroll_files(Detector.from_config(config), store, clips(tmp_path / "enroll", "nnnnnn", seed=0), "day")
    daemon = running(config)
    reply = request(daemon.state_dir / "control.sock", "motor",
                    {"action": "start", "duration_s": 60, "condition": NOISE_CONDITION})
    assert reply["ok"], reply
    wait_for(lambda: store.current() == "v000002")
    bank = store.load()
    assert bank.conditions == ["day", NOISE_CONDITION] and len(bank) == 6 + 6
    enrolled = next(e for e in events_of(daemon) if e["kind"] == "enrolled")
    assert enrolled["session"]["excluded_outliers"] == 0
    assert not _alerts(config)
    # Afterwards the same audio is idle, not anomalous.
    wait_for(lambda: daemon.machines[0].bank_version == "v000002")
    wait_for(lambda: daemon.machines[0].state == "idle")


def test_score_reports_stopped_machine_recordings_as_idle(tmp_path: Path, capsys) -> None:
    bank = tmp_path / "bank"
    normals = clips(tmp_path / "enroll", "nnnnnn", seed=0)
    noise = [write_clip(tmp_path / "noise" / f"{i}.flac", site_noise(i)) for i in range(6)]
    assert main(["enroll", "--bank", str(bank), "--backbone", "logmel", *map(str, normals)]) == 0
    assert main(["enroll", "--bank", str(bank), "--backbone", "logmel", "--noise", *map(str, noise)]) == 0
    stopped = write_clip(tmp_path / "new" / "stopped.flac", site_noise(77))
    faulty = write_clip(tmp_path / "new" / "faulty.flac", machine_sound(78, fault=True))
    capsys.readouterr()
    assert main(["score", "--bank", str(bank), "--backbone", "logmel", "--json", str(stopped), str(faulty)]) == 0
    rows = {Path(r["file"]).name: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert rows["stopped.flac"]["idle_windows"] == 1 and rows["stopped.flac"]["anomalous"] is None
    assert rows["faulty.flac"]["idle_windows"] == 0 and rows["faulty.flac"]["anomalous"] is True
    assert main(["score", "--bank", str(bank), "--backbone", "logmel", str(stopped)]) == 0
    assert "idle" in capsys.readouterr().out


def test_machine_enrollment_leaves_out_windows_of_a_stopped_machine(tmp_path: Path, running) -> None:
    """Enrolling the machine while it is in fact stopped: every window sounds like the enrolled
    site noise, is left out (counted as idle), and the enrollment is refused."""
    config = daemon_config(tmp_path, _stream(tmp_path / "replay", "ssss"), loop=True)
    config = replace(config, enrollment=EnrollmentConfig(min_windows=2))
    store = BankStore(config.daemon.state_dir / "banks" / "motor")
    detector = Detector.from_config(config)
    enroll_files(detector, store, clips(tmp_path / "enroll", "nnnnnn", seed=0), "default")
    noise = [write_clip(tmp_path / "noise" / f"{i}.flac", site_noise(i)) for i in range(6)]
    enroll_files(detector, store, noise, NOISE_CONDITION)
    daemon = running(config)
    assert request(daemon.state_dir / "control.sock", "motor", {"action": "start", "duration_s": 40})["ok"]
    wait_for(lambda: any(e["kind"] == "enrollment_failed" for e in events_of(daemon)))
    failed = next(e for e in events_of(daemon) if e["kind"] == "enrollment_failed")
    assert failed["session"]["excluded_idle"] == 4 and failed["session"]["accepted_windows"] == 0
    assert store.versions() == ["v000001", "v000002"]
    assert daemon.telemetry.registry.get_sample_value(
        "asd_enrollment_windows_total", {"machine": "motor", "result": "idle"}) == 4
