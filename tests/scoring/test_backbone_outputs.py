"""Further outputs of one model file as backbones of their own (aisfx's intermediate blocks):
one session and one inference per window for all of them, config errors that name the key,
and every path (enroll, bank on disk, score, evaluate, the daemon's live scorer) by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from monitor.audio.files import Audio
from monitor.bank.store import BankStore
from monitor.config import BackboneConfig, Config, config_from_dict
from monitor.enrollment.files import enroll_files
from monitor.errors import BackboneError, ConfigError
from monitor.offline.evaluate import run_evaluation
from monitor.scoring.backbone import Backbone, check_backbones, load_backbones
from monitor.scoring.detector import Detector
from monitor.scoring.live import LiveScorer
from monitor.scoring.recording import score_recording
from tests.synth import RATE, dcase_dataset, machine_sound, write_clip

LAYERS = [BackboneConfig("aisfx"), BackboneConfig("aisfx", output="block3"), BackboneConfig("logmel"),
          BackboneConfig("aisfx", output="block2")]


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector.from_config(Config(backbones=LAYERS))


def test_outputs_are_backbones_named_after_the_model(detector: Detector) -> None:
    assert [(b.name, b.meta.embedding_dim) for b in detector.backbones] == [
        ("aisfx", 512), ("aisfx.block3", 256), ("logmel", 256), ("aisfx.block2", 128)]
    aisfx, block3, logmel, block2 = detector.backbones
    assert aisfx.session is block3.session is block2.session and logmel.session is not aisfx.session
    # One model: a bank enrolled with an earlier export of the same weights stays valid.
    assert block3.meta.model_id == aisfx.meta.model_id


def test_outputs_of_one_model_share_one_run_per_window(detector: Detector, monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[list[str]] = []
    original = ort.InferenceSession.run

    def counted(self, names, feed, *args, **kwargs):
        runs.append(list(names))
        return original(self, names, feed, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", counted)
    embedded = detector.embed(Audio(machine_sound(1, 30.0), RATE, "x"))  # 3 windows: 2 batches
    assert sorted(map(sorted, runs)) == sorted(2 * [["block2", "block3", "embedding"], ["embedding"]])
    assert {n: e.shape for n, e in embedded.embeddings.items()} == {
        "aisfx": (3, 512), "aisfx.block3": (3, 256), "logmel": (3, 256), "aisfx.block2": (3, 128)}
    # Outputs of one run share its time.
    assert embedded.inference_seconds["aisfx"] == embedded.inference_seconds["aisfx.block3"] > 0
    # The same embeddings as each output fetched alone (all windows in one call: within 1e-6).
    windows, _ = detector.backbones[0].windows_of(Audio(machine_sound(1, 30.0), RATE, "x"))
    for backbone in (b for b in detector.backbones if b.session is detector.backbones[0].session):
        np.testing.assert_allclose(embedded.embeddings[backbone.name], backbone.embed(windows), rtol=0, atol=1e-5)


def test_an_unknown_output_is_a_config_error_naming_key_and_value() -> None:
    config = config_from_dict({"backbones": [{"model": "aisfx"}, {"model": "aisfx", "output": "block9"}]}, "site.yaml")
    with pytest.raises(ConfigError) as raised:
        check_backbones(config, "site.yaml")
    message = str(raised.value)
    assert message.startswith("site.yaml: backbones[1].output: 'block9' is not an output of aisfx (")
    assert message.endswith("it has: block2, block3") and "\n" not in message
    with pytest.raises(ConfigError, match=r"^backbones\[1\].output: 'embedding\+block9' is not an output of aisfx"):
        load_backbones(config_from_dict({"backbones": [{"model": "logmel"},
                                                       {"model": "aisfx", "output": "embedding+block9"}]}).backbones)
    with pytest.raises(ConfigError, match=r"^backbones\[0\].output: 'block3' is not an output of logmel .*none besides"):
        load_backbones([BackboneConfig("logmel", output="block3")], "cpu")


def test_the_same_model_twice_needs_different_outputs() -> None:
    with pytest.raises(ConfigError, match="backbones: name used twice: aisfx$"):
        config_from_dict({"backbones": [{"model": "aisfx"}, {"model": "aisfx"}]})
    with pytest.raises(ConfigError, match="name used twice: aisfx output block3"):
        config_from_dict({"backbones": [{"model": "aisfx", "output": "block3"}, {"model": "aisfx", "output": "block3"}]})
    config = config_from_dict({"backbones": [{"model": "aisfx"}, {"model": "aisfx", "output": "block3", "weight": 2}]})
    assert [(b.model, b.output, b.weight) for b in config.backbones] == [("aisfx", None, 1.0), ("aisfx", "block3", 2.0)]


def test_enroll_store_score_and_live_by_name(tmp_path: Path) -> None:
    detector = Detector.from_config(Config(backbones=LAYERS[:2]))
    clips = [write_clip(tmp_path / f"normal_{s}.wav", machine_sound(s, 20.0)) for s in (1, 2)]
    store = BankStore(tmp_path / "bank")
    enroll_files(detector, store, clips, "default")
    bank = store.load()
    # Every output of the file is kept, configured or not (a later output setting needs no new bank).
    assert {n: e.shape for n, e in bank.embeddings.items()} == {
        "aisfx": (4, 512), "aisfx.block3": (4, 256), "aisfx.block2": (4, 128)}
    detector.fit(bank)
    normal = score_recording(detector, write_clip(tmp_path / "n.wav", machine_sound(3, 10.0)))
    faulty = score_recording(detector, write_clip(tmp_path / "f.wav", machine_sound(3, 10.0, fault=True)))
    assert set(normal.scores.ranks) == {"aisfx", "aisfx.block3"}
    assert faulty.scores.raw["aisfx.block3"][0] > normal.scores.raw["aisfx.block3"][0]
    live = LiveScorer.fit(detector, bank, 10, RATE, "test")
    window = detector.embed(Audio(machine_sound(4, 10.0), RATE, "w")).embeddings
    assert set(live.score(window).ranks) == {"aisfx", "aisfx.block3"}


def test_evaluate_fuses_outputs_of_one_model(tmp_path: Path) -> None:
    root = dcase_dataset(tmp_path / "data", n_train=4, n_test=4)
    results, _ = run_evaluation(Detector.from_config(Config(backbones=LAYERS[:2])), root, None, bootstrap=0)
    assert set(results[0].raw) == {"aisfx", "aisfx.block3"}
    assert np.all(np.isfinite(results[0].fused))


def test_a_model_without_further_outputs_offers_none() -> None:
    logmel = Backbone.load("logmel", "cpu")
    with pytest.raises(BackboneError, match="none besides its embedding"):
        logmel.output("block3")


def test_outputs_joined_by_plus_are_concatenated_unit_parts(detector: Detector) -> None:
    aisfx = detector.backbones[0]
    both = aisfx.output("embedding+block3")
    assert (both.name, both.meta.embedding_dim, both.session) == ("aisfx.embedding-block3", 768, aisfx.session)
    windows, _ = aisfx.windows_of(Audio(machine_sound(5, 10.0), RATE, "x"))
    parts = [aisfx.embed(windows), aisfx.output("block3").embed(windows)]
    expected = np.concatenate([p / np.linalg.norm(p, axis=1, keepdims=True) for p in parts], axis=1)
    np.testing.assert_allclose(both.embed(windows), expected, rtol=1e-6, atol=1e-7)
    for wrong in ("embedding", "block3+block3", "embedding+block9"):
        with pytest.raises(BackboneError, match="it has: block2, block3"):
            aisfx.output(wrong)
