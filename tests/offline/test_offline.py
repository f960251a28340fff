"""The offline path end to end: enroll, score and evaluate through the CLI on real ONNX models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from monitor.bank.store import BankStore
from monitor.cli import main
from monitor.config import BackboneConfig, Config
from monitor.errors import EXIT_CONFIG, EXIT_DATA
from monitor.offline.evaluate import print_table, run_evaluation
from monitor.scoring.detector import Detector
from tests.synth import dcase_dataset, machine_sound, write_clip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dcase_dataset(tmp_path_factory.mktemp("dcase"))


def _json(capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(capsys.readouterr().out)


def test_enroll_then_score_separates_faults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    normal = [write_clip(tmp_path / "normal" / f"n{i}.flac", machine_sound(i)) for i in range(6)]
    bank = tmp_path / "bank"
    assert main(["enroll", "--bank", str(bank), "--backbone", "aisfx", "--backbone", "logmel", str(tmp_path / "normal")]) == 0
    assert "version v000001, 6 windows" in capsys.readouterr().out
    held_out = write_clip(tmp_path / "test" / "normal.flac", machine_sound(50))
    faulty = write_clip(tmp_path / "test" / "faulty.flac", machine_sound(51, fault=True))
    assert main(["score", "--bank", str(bank), "--backbone", "aisfx", "--backbone", "logmel", "--json",
                 str(held_out), str(faulty)]) == 0
    results = {Path(r["file"]).name: r for r in _json(capsys)["results"]}
    assert results["faulty.flac"]["fused_rank"] == 1.0 and results["faulty.flac"]["anomalous"]
    assert results["normal.flac"]["fused_rank"] < 1.0 and not results["normal.flac"]["anomalous"]
    for name in ("aisfx", "logmel"):
        assert results["faulty.flac"]["backbones"][name]["score"] > results["normal.flac"]["backbones"][name]["score"]
    assert len(normal) == len(BankStore(bank).load())


def test_enroll_adds_a_version_and_refuses_other_backbones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clip = write_clip(tmp_path / "a.flac", machine_sound(1))
    bank = tmp_path / "bank"
    assert main(["enroll", "--bank", str(bank), "--backbone", "logmel", str(clip)]) == 0
    assert main(["enroll", "--bank", str(bank), "--backbone", "logmel", "--condition", "fast", str(clip)]) == 0
    store = BankStore(bank)
    assert store.versions() == ["v000001", "v000002"] and store.load().conditions == ["default", "fast"]
    capsys.readouterr()
    assert main(["enroll", "--bank", str(bank), "--backbone", "aisfx", str(clip)]) == EXIT_DATA
    assert "backbone" in capsys.readouterr().err
    assert store.current() == "v000002"


def test_score_with_a_bank_of_another_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clips = [write_clip(tmp_path / f"{i}.flac", machine_sound(i)) for i in range(3)]
    assert main(["enroll", "--bank", str(tmp_path / "bank"), "--backbone", "logmel", *map(str, clips)]) == 0
    capsys.readouterr()
    assert main(["score", "--bank", str(tmp_path / "bank"), "--backbone", "aisfx", str(clips[0])]) == EXIT_DATA
    err = capsys.readouterr().err
    assert "aisfx" in err and len(err.strip().splitlines()) == 1


def test_errors_have_distinct_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("scoring:\n  k: 0\n")
    assert main(["score", "-c", str(bad), "--bank", str(tmp_path), str(tmp_path)]) == EXIT_CONFIG
    assert "bad.yaml: scoring.k: must be >= 1, got 0" in capsys.readouterr().err
    assert main(["score", "--bank", str(tmp_path / "none"), str(tmp_path / "missing.wav")]) == EXIT_DATA
    assert main(["enroll", "--bank", str(tmp_path / "b"), str(tmp_path / "missing.wav")]) == EXIT_DATA
    assert "missing.wav" in capsys.readouterr().err


def test_evaluate_writes_the_official_files(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["evaluate", str(dataset), "--backbone", "aisfx", "--backbone", "logmel", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "official score (fused)" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["systems"]) == {"aisfx", "logmel", "fused"}
    assert results["official_score"] == results["systems"]["fused"]
    fig = results["machines"]["motor"]["fused"]
    assert fig["auc_source"] > 0.9 and fig["auc_target"] > 0.9  # the synthetic fault is obvious
    boot = results["bootstrap"]  # 95 % intervals of every figure, paired against the fused system
    assert boot["resamples"] == 1000 and boot["reference"] == "fused" and set(boot["systems"]) == {"aisfx", "logmel", "fused"}
    for system, value in results["systems"].items():
        low, high = boot["systems"][system]["official"]
        assert low <= value <= high <= 1.0
        assert set(boot["machines"]["motor"][system]) == {"auc_source", "auc_target", "pauc", "official"}
    assert boot["differences"]["fused"]["official"] == [0.0, 0.0]
    assert "official 95%" in printed and f"[{boot['systems']['fused']['official'][0]:.3f}, " in printed
    for folder in (out, out / "aisfx", out / "logmel"):
        lines = (folder / "anomaly_score_motor_section_00_test.csv").read_text().splitlines()
        assert len(lines) == 16 and all(len(line.split(",")) == 2 for line in lines)
        decisions = (folder / "decision_result_motor_section_00_test.csv").read_text().splitlines()
        assert {line.split(",")[1] for line in decisions} <= {"0", "1"}
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_without_out_writes_to_a_default_folder_and_says_where(
        dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", str(dataset), "--backbone", "logmel", "--json", "--bootstrap", "0"]) == 0
    captured = capsys.readouterr()
    out = Path("out") / f"evaluate-{dataset.name}"
    printed = json.loads(captured.out)  # stdout stays pure JSON
    assert printed["official_score"] > 0.9 and printed["bootstrap"] is None  # --bootstrap 0: no intervals
    assert f"wrote {out / 'results.json'}, {out / 'roc.png'}" in captured.err
    assert (tmp_path / out / "roc.png").is_file() and (tmp_path / out / "results.json").is_file()


def test_a_machine_without_anomalous_test_clips_is_reported_not_a_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Figures need both classes: a machine without anomalous test clips gets none and says
    why, the other machines are evaluated, and with no figures at all the score is undefined."""
    root = dcase_dataset(tmp_path / "data", machine="pump", n_train=4, n_test=2, seconds=5.0)
    dcase_dataset(root, machine="motor", n_train=4, n_test=2, seconds=5.0)
    for clip in (root / "motor" / "test").glob("*anomaly*"):
        clip.unlink()
    detector = Detector.from_config(Config(backbones=[BackboneConfig("logmel")]))
    results, summary = run_evaluation(detector, root, None)
    why = "no figures: 4 normal and 0 anomalous labelled test clip(s); AUC and pAUC need both"
    assert summary["undefined"] == {"motor": why} and set(summary["machines"]["pump"]) == {"logmel", "fused"}
    pump = next(r for r in results if r.machine == "pump")
    assert summary["official_score"] == pump.figures["fused"].official > 0.5
    assert f"motor: {why}" in print_table(results, summary)

    for clip in (root / "pump" / "test").glob("*anomaly*"):
        clip.unlink()
    assert main(["evaluate", str(root), "--backbone", "logmel", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert f"motor: {why}" in printed and f"pump: {why}" in printed
    assert "official score (fused): undefined (no machine has figures)" in printed
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["official_score"] is None and set(written["undefined"]) == {"motor", "pump"}


def test_evaluation_of_short_clips(tmp_path: Path) -> None:
    """5 s clips (as in the fan benchmark) are embedded at their own length and still separate."""
    root = dcase_dataset(tmp_path / "short", seconds=5.0, n_train=6, n_test=3)
    results, summary = run_evaluation(Detector.from_config(Config()), root, None)
    assert summary["systems"]["aisfx.embedding-block3"] > 0.9  # the default backbone's name


def test_evaluate_on_real_dcase_samples(shared_data: Path, tmp_path: Path) -> None:
    """The shared DCASE 2023 clips: real file names, 10 s and 12 s clips, machines with too few
    labelled clips for figures are scored without crashing."""
    results, summary = run_evaluation(Detector.from_config(Config()), shared_data / "dcase2023-samples", tmp_path)
    assert {r.machine for r in results} == {"ToyCar", "ToyTrain", "bearing", "fan", "gearbox", "slider", "valve"}
    toycar = next(r for r in results if r.machine == "ToyCar")
    raw = toycar.raw["aisfx.embedding-block3"]  # the default backbone
    assert raw.shape == (2,) and np.all(np.isfinite(raw))
    assert (tmp_path / "anomaly_score_ToyCar_section_00_test.csv").exists()
