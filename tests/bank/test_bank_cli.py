"""`asd-monitor bank`: list, show, rollback, prune, export, import; bad input changes nothing."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from monitor.bank.store import BankStore
from monitor.cli import main
from monitor.errors import EXIT_DATA
from tests.synth import machine_sound, write_clip


@pytest.fixture
def bank(tmp_path: Path) -> Path:
    clips = [write_clip(tmp_path / f"{i}.flac", machine_sound(i)) for i in range(3)]
    path = tmp_path / "bank"
    for condition, clip in zip(("slow", "fast", "fast"), clips):
        assert main(["enroll", "--bank", str(path), "--backbone", "logmel", "--condition", condition, str(clip)]) == 0
    return path


def test_list_show_and_rollback(bank: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["bank", "list", "--bank", str(bank)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["v000001", "v000002", "v000003"] and " * " in lines[2]
    assert main(["bank", "show", "--bank", str(bank)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["windows"] == 3 and shown["conditions"] == {"fast": 2, "slow": 1} and "logmel" in shown["backbones"]
    assert main(["bank", "rollback", "--bank", str(bank)]) == 0
    assert BankStore(bank).current() == "v000002"
    assert main(["bank", "rollback", "--bank", str(bank), "--version", "v000003"]) == 0
    assert BankStore(bank).current() == "v000003"


def test_rollback_to_a_missing_version_changes_nothing(bank: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bank", "rollback", "--bank", str(bank), "--version", "v000009"]) == EXIT_DATA
    assert "v000009" in capsys.readouterr().err and BankStore(bank).current() == "v000003"


def test_prune_keeps_the_current_version(bank: Path) -> None:
    store = BankStore(bank)
    store.set_current("v000001")
    assert main(["bank", "prune", "--bank", str(bank), "--keep", "1"]) == 0
    assert store.versions() == ["v000001", "v000003"] and store.load().version == "v000001"


def test_export_then_import_elsewhere(bank: Path, tmp_path: Path) -> None:
    archive = tmp_path / "fan.tar.gz"
    assert main(["bank", "export", "--bank", str(bank), str(archive)]) == 0
    other = tmp_path / "other"
    assert main(["bank", "import", "--bank", str(other), str(archive)]) == 0
    imported, original = BankStore(other).load(), BankStore(bank).load()
    assert len(imported) == len(original) and imported.model_ids == original.model_ids
    assert (imported.embeddings["logmel"] == original.embeddings["logmel"]).all()


def test_import_refuses_other_models_and_damaged_archives(bank: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = tmp_path / "fan.tar.gz"
    main(["bank", "export", "--bank", str(bank), str(archive)])
    aisfx_bank = tmp_path / "aisfx-bank"
    main(["enroll", "--bank", str(aisfx_bank), "--backbone", "aisfx", str(write_clip(tmp_path / "a.flac", machine_sound(9)))])
    capsys.readouterr()
    assert main(["bank", "import", "--bank", str(aisfx_bank), str(archive)]) == EXIT_DATA
    assert "nothing imported" in capsys.readouterr().err
    assert BankStore(aisfx_bank).versions() == ["v000001"]
    # A tampered embedding file fails its checksum.
    tampered = tmp_path / "tampered.tar.gz"
    with tarfile.open(archive) as src, tarfile.open(tampered, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None
            if member.name.endswith("logmel.npy"):
                data = data[:-8] + b"\x00" * 8
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    assert main(["bank", "import", "--bank", str(bank), str(tampered)]) == EXIT_DATA
    assert "sha256" in capsys.readouterr().err and BankStore(bank).versions() == ["v000001", "v000002", "v000003"]
    not_a_bank = tmp_path / "x.tar.gz"
    not_a_bank.write_bytes(b"garbage")
    assert main(["bank", "import", "--bank", str(bank), str(not_a_bank)]) == EXIT_DATA
