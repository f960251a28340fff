"""Bank distribution between boxes through the CLI (docs/fleet.md, section 4): a bank enrolled
on box A, exported, imported on box B with the same model, scores there in the daemon; box C,
configured with another backbone, refuses it with one line and keeps its own bank as it was."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest

from monitor.bank.store import BankStore
from monitor.cli import main
from monitor.config import Config
from monitor.demo import DEMO_DIR, enroll_clips
from monitor.errors import EXIT_DATA
from monitor.service.daemon import Daemon
from tests.daemons import daemon_config, events_of, run_to_end, write_yaml
from tests.fleet.fleet import ALERTS, MACHINE

REPLAY = [DEMO_DIR / "anomaly_00.flac", DEMO_DIR / "anomaly_01.flac", DEMO_DIR / "normal_07.flac"]


def _box(directory: Path, backbone: str) -> tuple[Config, Path, Path]:
    """A box's config (written as YAML), its config file and its machine's bank directory."""
    directory.mkdir()
    base = daemon_config(directory, REPLAY, backbone=backbone, **ALERTS)
    config = replace(base, machines=[replace(base.machines[0], name=MACHINE)])
    return config, write_yaml(directory / "asd-monitor.yaml", config), config.machines[0].bank_dir(config.daemon.state_dir)


def _fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_bank_moves_to_a_box_with_the_same_model_and_scores_there(tmp_path: Path) -> None:
    _, config_a, bank_a = _box(tmp_path / "a", "logmel")
    config_b, path_b, bank_b = _box(tmp_path / "b", "logmel")
    archive = tmp_path / "fan.tar.gz"
    assert main(["enroll", "--config", str(config_a), "--bank", str(bank_a), *map(str, enroll_clips())]) == 0
    assert main(["bank", "export", "--bank", str(bank_a), str(archive)]) == 0
    assert main(["bank", "--config", str(path_b), "import", "--bank", str(bank_b), str(archive)]) == 0
    enrolled, imported = BankStore(bank_a).load(), BankStore(bank_b).load()
    assert imported.model_ids == enrolled.model_ids and (imported.embeddings["logmel"] == enrolled.embeddings["logmel"]).all()
    daemon = Daemon(config_b)
    run_to_end(daemon)
    events = events_of(daemon)
    assert [e["version"] for e in events if e["kind"] == "bank"] == [imported.version]
    assert [e["alert"]["type"] for e in events if e["kind"] == "alert"] == ["raise"]  # the faulty fan, heard on B
    assert daemon.windows_processed == len(REPLAY)


def test_a_box_with_another_model_refuses_the_bank_and_keeps_its_own(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, config_a, bank_a = _box(tmp_path / "a", "logmel")
    _, config_c, bank_c = _box(tmp_path / "c", "aisfx")
    archive = tmp_path / "fan.tar.gz"
    assert main(["enroll", "--config", str(config_a), "--bank", str(bank_a), str(enroll_clips()[0])]) == 0
    assert main(["bank", "export", "--bank", str(bank_a), str(archive)]) == 0
    # An empty bank on C: only the configured model can refuse (nothing to compare with yet).
    capsys.readouterr()
    assert main(["bank", "--config", str(config_c), "import", "--bank", str(bank_c), str(archive)]) == EXIT_DATA
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(archive) in error and "no embeddings for backbone(s) aisfx" in error \
        and "nothing imported" in error
    assert not bank_c.exists()
    # C's own bank, enrolled with its model, stays as it was.
    assert main(["enroll", "--config", str(config_c), "--bank", str(bank_c), str(enroll_clips()[1])]) == 0
    before = _fingerprint(bank_c)
    capsys.readouterr()
    assert main(["bank", "--config", str(config_c), "import", "--bank", str(bank_c), str(archive)]) == EXIT_DATA
    assert "nothing imported" in capsys.readouterr().err
    assert _fingerprint(bank_c) == before
