"""The library API as the README shows it: its example runs as written, on real audio."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np

from tests.synth import machine_sound, write_clip

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    section = README.read_text().split("### From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_example(folder: Path, monkeypatch) -> str:
    monkeypatch.chdir(folder)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(readme_example(), "README.md", "exec"), {})
    return out.getvalue()


def test_the_readme_example_enrolls_and_scores(tmp_path: Path, monkeypatch) -> None:
    for i in range(6):
        write_clip(tmp_path / "healthy" / f"{i}.flac", machine_sound(i, 10.0))
    write_clip(tmp_path / "today.flac", machine_sound(50, 10.0))
    normal = run_example(tmp_path, monkeypatch)
    assert re.fullmatch(r"fused rank \d\.\d{3}, anomalous: False\n", normal), normal

    write_clip(tmp_path / "today.flac", machine_sound(51, 10.0, fault=True))
    faulty = run_example(tmp_path, monkeypatch)  # enrolls the same files again: a second version
    assert faulty.endswith("anomalous: True\n"), faulty
    rank = float(re.search(r"fused rank (\S+),", faulty).group(1))
    assert rank > float(re.search(r"fused rank (\S+),", normal).group(1))
    assert sorted(p.name for p in (tmp_path / "banks" / "fan1" / "versions").iterdir()) == ["v000001", "v000002"]


def test_score_recording_reports_every_window(tmp_path: Path) -> None:
    from monitor import BankStore, Config, Detector, enroll_files, score_recording
    from monitor.config import BackboneConfig

    detector = Detector.from_config(Config(backbones=[BackboneConfig("logmel")]))
    store = BankStore(tmp_path / "bank")
    enroll_files(detector, store, [write_clip(tmp_path / f"n{i}.flac", machine_sound(i, 10.0)) for i in range(4)],
                 condition="default")
    detector.fit(store.load())
    result = score_recording(detector, write_clip(tmp_path / "long.flac", machine_sound(9, 25.0)))
    assert result.starts == [0.0, 10.0, 15.0]  # the last window aligned to the end
    assert result.scores.fused.shape == (3,) and not result.scores.idle.any()
    assert result.fused_rank == float(np.max(result.scores.fused))
