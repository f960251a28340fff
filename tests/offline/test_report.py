"""Tests of monitor.offline.report: exact official CSVs, atomic JSON with NaN as null, PNG output, console table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from monitor.errors import ReportError
from monitor.offline.report import (
    MachinePlot,
    format_table,
    plot_machines,
    write_official_csv,
    write_results_json,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_official_csv_contents_exact(tmp_path: Path) -> None:
    names = [
        "data/fan/test/section_00_source_test_normal_0000_m-n_W.wav",
        Path("/abs/fan/test/section_00_target_test_anomaly_0001.flac"),
    ]
    score_path, decision_path = write_official_csv(
        tmp_path / "out", "fan", names, np.array([0.25, np.float32(1.5)]), np.array([False, True])
    )
    assert score_path == tmp_path / "out" / "anomaly_score_fan_section_00_test.csv"
    assert decision_path == tmp_path / "out" / "decision_result_fan_section_00_test.csv"
    assert score_path.read_bytes() == (
        b"section_00_source_test_normal_0000_m-n_W.wav,0.25\n"
        b"section_00_target_test_anomaly_0001.flac,1.5\n"
    )
    assert decision_path.read_bytes() == (
        b"section_00_source_test_normal_0000_m-n_W.wav,0\n"
        b"section_00_target_test_anomaly_0001.flac,1\n"
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([decision_path.name, score_path.name])


def test_official_csv_keeps_full_precision(tmp_path: Path) -> None:
    score = 0.1 + 0.2
    path, _ = write_official_csv(tmp_path, "ToyCar", ["a.wav"], [score], [1])
    assert float(path.read_text().strip().split(",")[1]) == score


@pytest.mark.parametrize(
    ("machine", "names", "scores", "decisions", "match"),
    [
        ("fan", ["a.wav", "b.wav"], [0.1], [0, 1], "2 names"),
        ("fan", ["a.wav"], [math.nan], [0], "NaN"),
        ("fan", ["a.wav"], [0.1], [2], "0/1"),
        ("fan", ["a,b.wav"], [0.1], [0], "a,b.wav"),
        ("../fan", ["a.wav"], [0.1], [0], "../fan"),
    ],
)
def test_official_csv_errors(tmp_path: Path, machine: str, names: list[str], scores: list[float],
                             decisions: list[int], match: str) -> None:
    with pytest.raises(ReportError, match=match):
        write_official_csv(tmp_path, machine, names, scores, decisions)


def test_results_json_round_trip_with_nan(tmp_path: Path) -> None:
    results = {
        "machines": {"fan": {"auc_target": math.nan, "auc_source": np.float64(0.75), "n": np.int64(3)}},
        "scores": np.array([0.5, np.inf]),
        "official": 0.7,
        "systems": ("fused", "logmel"),
    }
    (tmp_path / "results.json").write_text("old")
    path = write_results_json(tmp_path, results)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert text.index('"machines"') < text.index('"official"') < text.index('"scores"')
    assert text.startswith('{\n  "machines"')
    assert json.loads(text) == {
        "machines": {"fan": {"auc_target": None, "auc_source": 0.75, "n": 3}},
        "scores": [0.5, None],
        "official": 0.7,
        "systems": ["fused", "logmel"],
    }
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"], "temporary file left behind"


def test_results_json_failure_leaves_no_temp_file(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        write_results_json(tmp_path, {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def _system(rng: np.random.Generator, shift: float) -> tuple[np.ndarray, np.ndarray]:
    labels = np.r_[np.zeros(40, bool), np.ones(20, bool)]
    return labels, rng.normal(size=60) + shift * labels


def _machine(rng: np.random.Generator, shifts: dict[str, float], anomalies: int = 20) -> MachinePlot:
    labels = np.r_[np.zeros(40, bool), np.ones(anomalies, bool)]
    domains = ["source"] * 30 + ["target"] * 10 + ["source", "target"] * (anomalies // 2)
    systems = {name: rng.normal(size=labels.size) + shift * labels for name, shift in shifts.items()}
    decision = np.clip(0.9 + 0.05 * rng.normal(size=labels.size) + 0.08 * labels, 0, 1)
    return MachinePlot(labels, domains, systems, decision, 0.99)


def test_plot_machines_writes_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    per_machine = {"fan": _machine(rng, {"logmel": 1.0, "aisfx": 2.0, "fused": 2.5}),
                   "uav": _machine(rng, {"aisfx": 0.5}),
                   "no-anomaly": _machine(rng, {"aisfx": 0.0}, anomalies=0)}
    out = plot_machines(tmp_path / "plots" / "machines.png", per_machine)
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 20_000


def test_plot_machines_needs_data(tmp_path: Path) -> None:
    with pytest.raises(ReportError):
        plot_machines(tmp_path / "x.png", {})
    with pytest.raises(ReportError):
        plot_machines(tmp_path / "x.png", {"fan": _machine(np.random.default_rng(0), {})})


def test_format_table() -> None:
    rows = [
        {"machine": "fan", "auc": 0.9123, "n": 12},
        {"machine": "ToyTrain", "auc": math.nan, "n": 7, "extra": "ignored"},
        {"machine": "uav", "n": 100},
    ]
    assert format_table(rows, ["machine", "auc", "n"]).splitlines() == [
        "machine     auc    n",
        "--------  -----  ---",
        "fan       0.912   12",
        "ToyTrain    nan    7",
        "uav              100",
    ]
    assert format_table([], ["a", "bb"]).splitlines() == ["a  bb", "-  --"]
    with pytest.raises(ReportError):
        format_table(rows, [])
