"""A bank folder with versions but no ``CURRENT`` is damage, not an empty bank: enroll, score,
prune and the daemon refuse it with the command that repairs it, and nothing is changed."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from monitor.bank.store import BankStore
from monitor.cli import main
from monitor.errors import EXIT_DATA, BankCurrentMissing, BankNotFound
from monitor.service.banks import Banks
from tests.daemons import clips, daemon_config, write_yaml


def _enrolled(folder: Path, bank: Path, versions: int = 2) -> list[Path]:
    """``versions`` enrollments of one clip each into ``bank``; the clips."""
    paths = clips(folder, "n" * versions)
    for path in paths:
        assert main(["enroll", "--bank", str(bank), "--backbone", "logmel", str(path)]) == 0
    return paths


def test_store_refuses_versions_without_current(tmp_path: Path) -> None:
    bank = tmp_path / "bank"
    _enrolled(tmp_path / "clips", bank)
    store = BankStore(bank)
    (bank / "CURRENT").unlink()
    with pytest.raises(BankCurrentMissing, match=r"CURRENT is missing but 2 version\(s\) exist \(v000001..v000002\)"
                                                  r".*asd-monitor bank use --bank .* --version v000002") as info:
        store.load()
    assert not isinstance(info.value, BankNotFound) and "\n" not in str(info.value)
    with pytest.raises(BankCurrentMissing):
        store.prune(keep=1)  # without CURRENT nothing says which version must be kept
    with pytest.raises(BankCurrentMissing):
        store.export(tmp_path / "bank.tar.gz")
    assert store.versions() == ["v000001", "v000002"] and not (bank / "CURRENT").exists()


def test_enroll_and_score_refuse_and_bank_use_repairs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bank = tmp_path / "bank"
    enrolled = _enrolled(tmp_path / "clips", bank)
    (bank / "CURRENT").unlink()
    capsys.readouterr()
    assert main(["enroll", "--bank", str(bank), "--backbone", "logmel", str(enrolled[0])]) == EXIT_DATA
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "asd-monitor bank use" in err
    assert BankStore(bank).versions() == ["v000001", "v000002"]  # no fresh version without the enrolled windows
    assert main(["score", "--bank", str(bank), "--backbone", "logmel", str(enrolled[0])]) == EXIT_DATA
    assert "CURRENT is missing" in capsys.readouterr().err

    assert main(["bank", "use", "--bank", str(bank), "--version", "v000002"]) == 0
    assert BankStore(bank).current() == "v000002"
    assert main(["enroll", "--bank", str(bank), "--backbone", "logmel", str(enrolled[1])]) == 0
    assert len(BankStore(bank).load()) == 3  # added to the two enrolled windows
    assert main(["bank", "use", "--bank", str(bank), "--version", "v000009"]) == EXIT_DATA
    assert BankStore(bank).current() == "v000003"


def test_daemon_does_not_start_on_a_bank_without_current(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "n"))
    bank = config.daemon.state_dir / "banks" / "motor"
    _enrolled(tmp_path / "clips", bank, versions=1)
    (bank / "CURRENT").unlink()
    command = [sys.executable, "-m", "monitor.cli", "run", "-c", str(write_yaml(tmp_path / "daemon.yaml", config))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == EXIT_DATA and "asd-monitor bank use" in result.stderr


class _Events:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def event(self, kind: str, **fields: object) -> None:
        self.events.append((kind, fields))


def test_current_deleted_under_the_daemon_is_reported_once(tmp_path: Path) -> None:
    bank = tmp_path / "bank"
    _enrolled(tmp_path / "clips", bank, versions=1)
    outputs = _Events()
    banks = Banks(None, None, outputs)  # following needs neither config nor models
    machine = types.SimpleNamespace(name="motor", store=BankStore(bank), bank_version="v000001")
    (bank / "CURRENT").unlink()
    banks.follow([machine])
    banks.follow([machine])
    ((kind, fields),) = outputs.events
    assert kind == "bank_error" and fields["kept"] == "v000001"
    assert "restart will refuse" in fields["error"] and "bank use --bank" in fields["error"]
    BankStore(bank).set_current("v000001")
    banks.follow([machine])  # repaired: quiet, and a later loss is reported again
    (bank / "CURRENT").unlink()
    banks.follow([machine])
    assert len(outputs.events) == 2
