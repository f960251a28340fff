"""The one scoring path: cutting once per backbone rate, and live scores equal to offline ones."""

from __future__ import annotations

import dataclasses

import numpy as np

from monitor.audio.files import Audio
from monitor.bank.model import Bank, BankItem
from monitor.config import BackboneConfig, Config
from monitor.scoring.backbone import Backbone
from monitor.scoring.detector import Detector
from monitor.scoring.live import LiveScorer
from tests.synth import RATE, machine_sound


def two_backbones_at_one_rate() -> Detector:
    """logmel twice, under two names: two backbones that listen at the same rate."""
    logmel = Backbone.load("logmel")
    twin = dataclasses.replace(logmel, meta=dataclasses.replace(logmel.meta, name="logmel-twin"))
    return Detector([logmel, twin], Config(backbones=[BackboneConfig("logmel"), BackboneConfig("logmel-twin")]))


def test_audio_is_cut_once_per_rate(monkeypatch) -> None:
    detector = two_backbones_at_one_rate()
    calls = []
    original = Backbone.windows
    monkeypatch.setattr(Backbone, "windows", lambda self, *a, **k: calls.append(self.name) or original(self, *a, **k))
    embedded = detector.embed(Audio(machine_sound(1, 25.0), RATE, "x"))
    assert calls == ["logmel"]  # the twin shares the cut
    assert embedded.starts == [0.0, 10.0, 15.0]
    np.testing.assert_array_equal(embedded.embeddings["logmel"], embedded.embeddings["logmel-twin"])


def test_a_live_window_scores_as_offline_until_the_reference_learns() -> None:
    detector = Detector.from_config(Config(backbones=[BackboneConfig("logmel")]))
    normals = [detector.embed(Audio(machine_sound(i, 10.0), RATE, "n")).embeddings["logmel"] for i in range(8)]
    items = [BankItem.enrolled_now(f"n{i}", 0.0, "default", -20.0, RATE) for i in range(8)]
    bank = Bank().add(items, {"logmel": np.concatenate(normals)}, detector.model_ids)
    detector.fit(bank)
    live = LiveScorer.fit(detector, bank, rolling_size=10, source_rate=RATE, what="test")
    window = detector.embed(Audio(machine_sound(20, 10.0), RATE, "w")).embeddings
    offline = detector.score(window)
    score = live.score(window)
    assert (score.fused, score.ranks["logmel"], score.raw["logmel"]) == (
        offline.fused[0], offline.ranks["logmel"][0], offline.raw["logmel"][0])
    assert score.condition == offline.conditions[0] and score.idle is False
    assert 0.0 < score.fused < 1.0  # so one more reference value must move it
    live.learn(live.score(detector.embed(Audio(machine_sound(21, 10.0), RATE, "n")).embeddings))
    assert live.references["logmel"].rolling_count == 1
    assert live.score(window).fused != score.fused
    assert detector.score(window).fused[0] == offline.fused[0]  # offline ranks stay anchored
