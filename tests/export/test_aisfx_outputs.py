"""aisfx's intermediate blocks as further outputs of the shipped graph: its first output is the
embedding an export without them gives, and each block output is that block pooled as the
final one is (frequency mean, time max per ~2.3 s block, mean over blocks)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from export import aisfx
from export.onnx_export import export_backbone
from export.registry import EXPORTERS
from monitor.audio.files import AudioFile
from monitor.scoring.backbone import ASSETS, Backbone, extra_outputs
from tests.synth import machine_sound


@pytest.fixture(scope="module")
def shipped() -> Backbone:
    return Backbone.load(ASSETS / "aisfx.onnx", "cpu")


def _real_windows(shared: Path, backbone: Backbone) -> np.ndarray:
    """The first window of two test clips of each benchmark set (10 s and 5 s clips)."""
    clips = [sorted((shared / "bench" / name).glob("*/test/*.flac"))[i] for name in ("uav-noisy", "fan-noisy")
             for i in (0, -1)]
    return [backbone.windows_of(AudioFile.open(path))[0][:1] for path in clips]


def test_the_graph_offers_blocks_2_and_3(shipped: Backbone) -> None:
    assert extra_outputs(shipped.session, shipped.meta.output_name) == {"block2": 128, "block3": 256}
    assert shipped.meta.output_name == "embedding" and shipped.meta.embedding_dim == 512


def test_first_output_equals_an_export_without_the_blocks(shipped: Backbone, shared_data: Path, tmp_path: Path) -> None:
    """The embedding banks were enrolled with is unchanged: same model_id, same values on real
    audio as the graph without the extra outputs (as shipped before them)."""
    module, meta = EXPORTERS["aisfx"].build(argparse.Namespace(checkpoint=None, random_init=False))
    single = aisfx.AisfxBackbone(module.cnn, module.peak_normalise)
    old = Backbone.load(export_backbone(single, meta, tmp_path), "cpu")
    assert old.meta == shipped.meta and extra_outputs(old.session, "embedding") == {}
    for window in _real_windows(shared_data, shipped):
        assert np.max(np.abs(shipped.embed(window) - old.embed(window))) <= 1e-5


def test_block_outputs_are_the_blocks_pooled_like_the_final_one(shipped: Backbone) -> None:
    cnn = aisfx.load_cnn()
    reference = aisfx.AisfxBackbone(cnn, peak_normalise=True)
    x = machine_sound(11, 10.0, rate=aisfx.SAMPLE_RATE)[None, :]
    with torch.no_grad():  # the blocks by hand: [N, C, time, frequency] after each conv block
        spec = torch.log10(reference.mel(torch.from_numpy(x / np.abs(x).max())) * 1e4 + 1.0) / aisfx.SPEC_MAX
        blocks = spec.unfold(1, aisfx.BLOCK_FRAMES, aisfx.BLOCK_HOP).transpose(2, 3)[0].unsqueeze(1)
        h2 = cnn.conv_block2(cnn.conv_block1(blocks))
        h3 = cnn.conv_block3(h2)
    expected = {name: h.mean(dim=3).amax(dim=2).mean(dim=0).numpy() for name, h in (("block2", h2), ("block3", h3))}
    for name, want in expected.items():
        got = shipped.output(name).embed(x.astype(np.float32))[0]
        assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-4, name


def test_an_unknown_block_is_refused_at_build() -> None:
    with pytest.raises(ValueError, match="no output.*block9"):
        aisfx.AisfxBackbone(aisfx.AisfxCnn(), True, extra_outputs=("block9",))


def test_meta_of_an_output_names_it(shipped: Backbone) -> None:
    block3 = shipped.output("block3")
    assert block3.meta == replace(shipped.meta, name="aisfx.block3", output_name="block3", embedding_dim=256)
