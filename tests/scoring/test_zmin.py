"""Z-MIN back-end fusion (fusion.rule: zmin) on synthetic scores and through Detector.score."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from monitor.audio.files import Audio
from monitor.bank.model import Bank, BankItem
from monitor.config import BackboneConfig, Config, FusionConfig
from monitor.errors import RankingError
from monitor.scoring.backbone import Backbone
from monitor.scoring.detector import Detector
from monitor.scoring.ranking import ZMin, fuse
from tests.synth import RATE, machine_sound


def test_one_backbone_keeps_its_ordering_and_the_bank_ranks_uniformly() -> None:
    rng = np.random.default_rng(0)
    loo = rng.gamma(2.0, 3.0, size=400)
    zmin = ZMin({"a": loo})
    raw = rng.gamma(2.0, 4.0, size=50)
    np.testing.assert_array_equal(np.argsort(zmin.values({"a": raw})), np.argsort(raw))
    ranks = zmin.rank({"a": raw})
    assert ((ranks >= 0) & (ranks <= 1)).all()
    np.testing.assert_array_equal(np.argsort(ranks, kind="stable"), np.argsort(zmin.reference.rank(zmin.values({"a": raw})), kind="stable"))
    assert zmin.rank({"a": loo}).mean() == pytest.approx(0.5)  # the bank against itself


def test_each_backbone_counts_in_its_own_units_and_the_minimum_decides() -> None:
    rng = np.random.default_rng(1)
    loo = {"small": rng.normal(10.0, 1.0, 1000), "large": rng.normal(500.0, 50.0, 1000)}
    zmin = ZMin(loo)
    # z = 3 on one backbone only: the other says normal, so the fused rank stays middling.
    one = zmin.rank({"small": np.array([13.0]), "large": np.array([500.0])})[0]
    both = zmin.rank({"small": np.array([13.0]), "large": np.array([650.0])})[0]
    assert 0.3 < one < 0.8 and both > 0.99
    np.testing.assert_allclose(zmin.values({"small": np.array([13.0]), "large": np.array([650.0])}), 3.0, rtol=0.05)


def test_zero_weight_backbone_is_left_out_and_a_flat_reference_stays_finite() -> None:
    zmin = ZMin({"a": np.array([1.0, 2.0, 3.0]), "b": np.full(3, 7.0), "off": np.array([np.nan, 5.0, 9.0])},
                {"a": 1.0, "b": 1.0, "off": 0.0})
    assert set(zmin.stats) == {"a", "b"}
    assert np.isfinite(zmin.values({"a": np.array([9.0]), "b": np.array([8.0])})).all()
    with pytest.raises(RankingError, match="weight"):
        ZMin({"a": np.ones(3)}, {"a": 0.0})


def test_fuse_refuses_zmin() -> None:
    with pytest.raises(RankingError, match="ZMin"):
        fuse({"a": np.array([0.5])}, rule="zmin")


def _fitted(backbones: list[Backbone], rule: str) -> Detector:
    config = Config(backbones=[BackboneConfig(b.name) for b in backbones], fusion=FusionConfig(rule=rule))
    detector = Detector(backbones, config)
    normals = [detector.embed(Audio(machine_sound(i, 10.0), RATE, "n")).embeddings for i in range(8)]
    items = [BankItem.enrolled_now(f"n{i}", 0.0, "default", -20.0, RATE) for i in range(8)]
    bank = Bank().add(items, {b.name: np.concatenate([n[b.name] for n in normals]) for b in backbones},
                      detector.model_ids)
    detector.fit(bank)
    return detector


def test_detector_score_fuses_by_zmin_as_a_rank() -> None:
    logmel = Backbone.load("logmel")
    twin = dataclasses.replace(logmel, meta=dataclasses.replace(logmel.meta, name="logmel-twin"))
    single, pair = _fitted([logmel], "zmin"), _fitted([logmel, twin], "zmin")
    windows = [single.embed(Audio(machine_sound(20 + i, 10.0), RATE, "w")).embeddings for i in range(4)]
    embeddings = {name: np.concatenate([w["logmel"] for w in windows]) for name in ("logmel", "logmel-twin")}
    one, two = single.score(embeddings), pair.score(embeddings)
    assert ((one.fused >= 0) & (one.fused <= 1)).all()
    # One backbone: the fused rank is its rank against its own leave-one-out scores.
    np.testing.assert_array_equal(one.fused, one.ranks["logmel"])
    np.testing.assert_array_equal(two.fused, one.fused)  # two identical backbones: same z, same min
    # Offline (evaluate): the transductive fused score orders clips as the raw score does.
    raw = one.raw["logmel"]
    np.testing.assert_array_equal(np.argsort(single.fuse_transductive({"logmel": raw})), np.argsort(raw))
