"""Banks across the change of the default backbone (aisfx's embedding and block 3, density
normalisation): a new bank keeps every output of the model, so a later ``output`` needs no
re-enrollment; a bank enrolled before that (the embedding alone) is scored with what it holds,
as before, says so once, and never meets rows of another shape."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from monitor.audio.files import Audio, AudioFile
from monitor.bank.model import Bank
from monitor.bank.store import BankStore
from monitor.cli import main
from monitor.config import BackboneConfig, Config, EnrollmentConfig
from monitor.enrollment.files import embed_windows, enroll_files
from monitor.errors import BackboneError
from monitor.scoring.detector import Detector, Fallback
from monitor.service.control import request
from tests.daemons import clips, daemon_config, events_of, wait_for
from tests.synth import RATE, machine_sound, write_clip

DEFAULT = Config()
# The default before the switch: aisfx's own embedding (same scoring settings otherwise, so that
# the scores of a bank served the earlier way can be compared number for number).
EARLIER = replace(DEFAULT, backbones=[BackboneConfig("aisfx")])


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector.from_config(DEFAULT)


@pytest.fixture(scope="module")
def normals(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("normal")
    return [write_clip(folder / f"normal_{s}.wav", machine_sound(s, 20.0)) for s in (1, 2, 3)]


def earlier_bank(store: BankStore, paths: list[Path]) -> Bank:
    """A bank as enrolled before every output was kept: the rows of the configured backbone
    alone (the earlier default's path: ``embed_windows`` without features, ``Bank.add`` with
    the configured model ids), saved by the store as it always was."""
    old = Detector.from_config(EARLIER)
    rows = [embed_windows(old, AudioFile.open(p), str(p), "default") for p in paths]
    bank = Bank().add([i for r in rows for i in r.items], {"aisfx": np.concatenate([r.embeddings["aisfx"] for r in rows])},
                      old.model_ids)
    store.save(bank, note="enrolled before every output was kept")
    return store.load()


def test_the_default_is_aisfx_embedding_and_block3_with_density() -> None:
    assert [(b.model, b.output) for b in DEFAULT.backbones] == [("aisfx", "embedding+block3")]
    assert DEFAULT.scoring.normalisation == "density"


def test_a_new_bank_keeps_every_output_and_serves_any_setting(detector: Detector, normals: list[Path],
                                                               tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = BankStore(tmp_path / "bank")
    enroll_files(detector, store, normals[:2], "default")
    bank = store.load()
    assert bank.dims == {"aisfx": 512, "aisfx.block2": 128, "aisfx.block3": 256}
    capsys.readouterr()
    assert main(["bank", "show", "--bank", str(store.path)]) == 0
    assert json.loads(capsys.readouterr().out)["outputs"] == {"aisfx": ["embedding", "block2", "block3"]}
    # The configured concatenation is made of the kept outputs: the rows embedding it directly gives.
    both = detector.backbones[0]
    windows, _ = both.windows_of(AudioFile.open(normals[0]))
    np.testing.assert_allclose(both.compose(bank.embeddings)[:2], both.embed(windows), rtol=1e-5, atol=1e-6)
    detector.fit(bank)
    assert list(detector.scored) == ["aisfx.embedding-block3"] and not detector.falls_back
    # Another output setting fits the same bank, no enrollment needed.
    other = Detector.from_config(replace(DEFAULT, backbones=[BackboneConfig("aisfx", output="block2+block3")]))
    other.fit(bank)
    assert list(other.scored) == ["aisfx.block2-block3"] and not other.falls_back


def test_an_earlier_bank_is_scored_as_before_and_says_so(detector: Detector, normals: list[Path], tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    store = BankStore(tmp_path / "bank")
    bank = earlier_bank(store, normals)
    assert bank.outputs == {"aisfx": ["embedding"]}
    fitted = detector.unfitted()
    with caplog.at_level(logging.INFO, "monitor.scoring.detector"):
        fitted.fit(bank)
    assert fitted.fallbacks == [Fallback("aisfx.embedding-block3", "aisfx", ("aisfx.block3",))]
    assert list(fitted.scored) == ["aisfx"] and fitted.weights == {"aisfx": 1.0}
    assert "bank v000001 holds no aisfx.block3" in caplog.text and "scored as aisfx" in caplog.text
    notice = fitted.reenroll_notice(store.path)
    assert notice.startswith("bank v000001 holds no aisfx.block3") and f"asd-monitor enroll --bank {store.path} --replace" in notice
    # Scores equal those of the earlier setting on the same bank, number for number.
    earlier = Detector.from_config(EARLIER)
    earlier.fit(bank)
    audio = Audio(np.concatenate([machine_sound(7, 10.0), machine_sound(7, 10.0, fault=True)]), RATE, "w")
    window = fitted.embed(audio).embeddings  # a fitted detector embeds what it scores with
    assert "aisfx" in window
    ours, theirs = fitted.score(window), earlier.score(earlier.embed(audio).embeddings)
    np.testing.assert_allclose(ours.raw["aisfx"], theirs.raw["aisfx"], rtol=1e-6)
    np.testing.assert_array_equal(ours.fused, theirs.fused)
    # Never the configured rows against the bank's: without the embedding it holds, a clear refusal.
    with pytest.raises(BackboneError, match="no embeddings of backbone aisfx nor of its outputs aisfx"):
        fitted.score({"aisfx.embedding-block3": np.zeros((1, 768), np.float32)})


def test_score_on_an_earlier_bank_says_so_and_names_what_it_scored(normals: list[Path], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    store = BankStore(tmp_path / "bank")
    earlier_bank(store, normals)
    clip = write_clip(tmp_path / "w.wav", machine_sound(8, 10.0))
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, "monitor.cli"):
        assert main(["score", "--bank", str(store.path), str(clip)]) == 0
    assert "bank v000001 holds no aisfx.block3" in caplog.text and "--replace" in caplog.text
    header = capsys.readouterr().out.splitlines()[0]
    assert "aisfx score" in header and "embedding-block3" not in header


def test_adding_to_an_earlier_bank_keeps_its_layout(detector: Detector, normals: list[Path], tmp_path: Path) -> None:
    store = BankStore(tmp_path / "bank")
    earlier_bank(store, normals[:2])
    result = enroll_files(detector, store, normals[2:], "default")
    assert result.bank.backbones == ["aisfx"] and len(result.bank) == 6
    fitted = detector.unfitted()
    fitted.fit(store.load())
    assert fitted.falls_back
    # --replace starts a bank that serves the configured setting.
    fresh = enroll_files(detector, store, normals, "default", replace=True)
    assert fresh.bank.outputs == {"aisfx": ["embedding", "block2", "block3"]}
    fitted.fit(store.load())
    assert not fitted.falls_back and list(fitted.scored) == ["aisfx.embedding-block3"]


def test_the_daemon_scores_an_earlier_bank_and_says_so_once(normals: list[Path], tmp_path: Path, running,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    config = replace(daemon_config(tmp_path, clips(tmp_path / "replay", "nnn"), loop=True), backbones=DEFAULT.backbones)
    store = BankStore(config.daemon.state_dir / "banks" / "motor")
    earlier_bank(store, normals)
    with caplog.at_level(logging.WARNING, "monitor.service.banks"):
        daemon = running(config)
        machine = daemon.machines[0]
        wait_for(lambda: daemon.windows_processed >= 3)
    assert machine.scorer is not None and list(machine.scorer.detector.scored) == ["aisfx"]
    outdated = [e for e in events_of(daemon) if e["kind"] == "bank_outdated"]
    assert len(outdated) == 1 and outdated[0]["machine"] == "motor" and outdated[0]["version"] == "v000001"
    assert "asd-monitor enroll --bank" in outdated[0]["detail"]
    warnings = [r.getMessage() for r in caplog.records if "holds no aisfx.block3" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("motor: bank v000001") and "--replace" in warnings[0]
    states = [e for e in events_of(daemon) if e["kind"] == "state" and e["machine"] == "motor"]
    assert any(e["detail"] == "bank v000001, earlier layout: scored as aisfx" for e in states)


def test_live_enrollment_keeps_every_output(tmp_path: Path, running) -> None:
    config = replace(daemon_config(tmp_path, clips(tmp_path / "replay", "nnn"), loop=True), backbones=DEFAULT.backbones,
                     enrollment=EnrollmentConfig(min_windows=2))
    daemon = running(config)
    machine = daemon.machines[0]
    reply = request(daemon.state_dir / "control.sock", "motor", {"action": "start", "duration_s": 30})
    assert reply["ok"]
    wait_for(lambda: machine.scorer is not None)
    bank = BankStore(config.daemon.state_dir / "banks" / "motor").load()
    assert bank.outputs == {"aisfx": ["embedding", "block2", "block3"]} and len(bank) == 3
    assert list(machine.scorer.detector.scored) == ["aisfx.embedding-block3"] and not machine.scorer.detector.falls_back
