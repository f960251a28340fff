"""BEATs and EAT exporters on small random configurations in the official checkpoint layouts:
key-for-key loading, clear errors on anything else, ONNX against torch, and (where the
package is installed) BEATs against an independent implementation (openbeats, ESPnet's
BEATs encoder). Parity with the official code at full size is a script, see
benchmarks/parity_beats_eat.py."""

from __future__ import annotations

import argparse
import importlib.util
import json
import struct
import sys
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export import beats, eat
from export.cli import main as export_main
from export.onnx_export import PARITY_RTOL, relative_error
from monitor.errors import EXIT_DATA, CheckpointError
from monitor.scoring.backbone import Backbone
from tests.synth import machine_sound

HAVE_OPENBEATS = importlib.util.find_spec("openbeats") is not None

# The official module names for a 2-layer BEATs with relative positions, gated bias and a
# projection (printed from microsoft/unilm beats/BEATs.py): the shared relative_attention_bias
# appears under every layer.
BEATS_LAYER_KEYS = [
    "self_attn.grep_a", "self_attn.relative_attention_bias.weight",
    *(f"self_attn.{p}_proj.{t}" for p in "kvq" for t in ("weight", "bias")),
    "self_attn.out_proj.weight", "self_attn.out_proj.bias", "self_attn.grep_linear.weight", "self_attn.grep_linear.bias",
    *(f"{m}.{t}" for m in ("self_attn_layer_norm", "fc1", "fc2", "final_layer_norm") for t in ("weight", "bias")),
]
OFFICIAL_BEATS_KEYS = {
    "post_extract_proj.weight", "post_extract_proj.bias", "patch_embedding.weight",
    "encoder.pos_conv.0.bias", "encoder.pos_conv.0.weight_g", "encoder.pos_conv.0.weight_v",
    "encoder.layer_norm.weight", "encoder.layer_norm.bias", "layer_norm.weight", "layer_norm.bias",
    *(f"encoder.layers.{i}.{k}" for i in range(2) for k in BEATS_LAYER_KEYS),
}
# data2vec 2.0 / EAT pre-training names (printed from cwx-worst-one/EAT models/*.py).
EAT_BLOCK_KEYS = [f"{m}.{t}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                  for t in ("weight", "bias")]
OFFICIAL_EAT_KEYS = {
    "modality_encoders.IMAGE.extra_tokens", "modality_encoders.IMAGE.local_encoder.proj.weight",
    "modality_encoders.IMAGE.local_encoder.proj.bias", "modality_encoders.IMAGE.fixed_positional_encoder.positions",
    "modality_encoders.IMAGE.context_encoder.norm.weight", "modality_encoders.IMAGE.context_encoder.norm.bias",
    *(f"blocks.{i}.{k}" for i in range(2) for k in EAT_BLOCK_KEYS),
}


def _perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (norms, gates, tokens too), so nothing matches by accident."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.endswith("positions"):
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return module.eval()


def _waves(*seeds: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([machine_sound(s, 10.0) for s in seeds]))


def _onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"waveform": x.numpy()})[0]


# --- BEATs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def beats_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    cfg = beats.parse_config(dict(beats.SMALL_CONFIG), "test")
    torch.manual_seed(1)
    state = _perturbed(beats.build_model(cfg, None, "test"), 1).state_dict()
    path = tmp_path_factory.mktemp("beats") / "BEATs_small.pt"
    torch.save({"cfg": dict(beats.SMALL_CONFIG), "model": state}, path)
    return path, state


def test_beats_has_the_official_keys(beats_checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, state = beats_checkpoint
    assert set(state) == OFFICIAL_BEATS_KEYS
    assert tuple(state["encoder.pos_conv.0.weight_g"].shape) == (1, 1, 16)
    assert tuple(state["encoder.pos_conv.0.weight_v"].shape) == (48, 12, 16)
    assert tuple(state["encoder.layers.1.self_attn.grep_linear.weight"].shape) == (8, 12)
    cfg, loaded = beats.load_beats(path)
    model = beats.build_model(cfg, loaded, str(path))
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[key]), key


def test_beats_export_matches_torch(beats_checkpoint: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = beats_checkpoint
    assert export_main(["beats", "--checkpoint", str(path), "--out", str(tmp_path)]) == 0
    onnx_path = Path(capsys.readouterr().out.strip())
    assert onnx_path == tmp_path / "beats.onnx"
    meta = Backbone.load(onnx_path, "cpu").meta
    assert (meta.name, meta.sample_rate, meta.embedding_dim, meta.min_seconds) == ("beats", 16000, 48, 0.0)
    assert "MIT" in meta.licence and "povey" in meta.frontend
    module, _ = beats.build(argparse.Namespace(checkpoint=path, random_init=False, layer=None))
    x = _waves(3, 4, 5)  # a batch size the export never saw
    with torch.no_grad():
        expected = module(x).numpy()
    assert relative_error(expected, _onnx(onnx_path, x)) < PARITY_RTOL


def test_beats_layer_option(beats_checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = beats_checkpoint
    first, _ = beats.build(argparse.Namespace(checkpoint=path, random_init=False, layer=1))
    last, _ = beats.build(argparse.Namespace(checkpoint=path, random_init=False, layer=None))
    x = _waves(6)
    with torch.no_grad():
        assert not torch.allclose(first(x), last(x))
        tokens = first.tokens(x)
    assert tokens.shape == (1, 496, 48)  # 998 frames -> 62 x 8 patches
    with pytest.raises(CheckpointError, match="--layer must be between 1 and 2"):
        beats.build(argparse.Namespace(checkpoint=path, random_init=False, layer=3))


def _one_line_failure(argv: list[str], out: Path, capsys: pytest.CaptureFixture[str], *fragments: str) -> None:
    assert export_main(argv) == EXIT_DATA
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    assert not list(out.glob("*.onnx"))


def test_beats_rejects_other_layouts(beats_checkpoint: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    path, state = beats_checkpoint
    renamed = {k.replace("encoder.layers.", "encoder.layer."): v for k, v in state.items()}
    bad = tmp_path / "renamed.pt"
    torch.save({"cfg": dict(beats.SMALL_CONFIG), "model": renamed}, bad)
    _one_line_failure(["beats", "--checkpoint", str(bad), "--out", str(tmp_path)], tmp_path, capsys,
                      "renamed.pt", "do not fit", "Missing key")
    bare = tmp_path / "bare.pt"
    torch.save(state, bare)
    _one_line_failure(["beats", "--checkpoint", str(bare), "--out", str(tmp_path)], tmp_path, capsys,
                      "not a BEATs checkpoint")
    wider = tmp_path / "wider.pt"
    torch.save({"cfg": {**beats.SMALL_CONFIG, "encoder_ffn_embed_dim": 128}, "model": state}, wider)
    _one_line_failure(["beats", "--checkpoint", str(wider), "--out", str(tmp_path)], tmp_path, capsys,
                      "size mismatch")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    _one_line_failure(["beats", "--checkpoint", str(junk), "--out", str(tmp_path)], tmp_path, capsys,
                      "cannot read as a torch checkpoint")


@pytest.mark.skipif(not HAVE_OPENBEATS, reason="openbeats (pip install --no-deps openbeats) not installed")
def test_beats_matches_openbeats(beats_checkpoint: tuple[Path, dict[str, torch.Tensor]],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """ESPnet's BEATs encoder (vendored in the openbeats package) with the same state dict.
    It imports torchaudio's Kaldi fbank at module level, which cannot load beside torch 2.13:
    a placeholder module satisfies the import and both models get our fbank (which
    test_kaldi.py checks against Kaldi on its own)."""
    if importlib.util.find_spec("torchaudio") is None:
        kaldi = types.ModuleType("torchaudio.compliance.kaldi")
        compliance = types.ModuleType("torchaudio.compliance")
        compliance.kaldi = kaldi  # type: ignore[attr-defined]
        package = types.ModuleType("torchaudio")
        package.compliance = compliance  # type: ignore[attr-defined]
        for name, module in (("torchaudio", package), ("torchaudio.compliance", compliance),
                             ("torchaudio.compliance.kaldi", kaldi)):
            monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "openbeats.beats_encoder", raising=False)
    from openbeats.beats_encoder import BeatsEncoder

    path, state = beats_checkpoint
    reference = BeatsEncoder(input_size=0, beats_config=dict(beats.SMALL_CONFIG))
    info = reference.load_state_dict(state, strict=False)
    assert not info.unexpected_keys and all("_pad" in k for k in info.missing_keys)
    reference.eval()
    module, _ = beats.build(argparse.Namespace(checkpoint=path, random_init=False, layer=None))
    x = _waves(7, 8)
    with torch.no_grad():
        fbank = module.fbank(x * beats.INPUT_SCALE)
        expected = reference.extract_features(fbank, None, skip_fbank_extraction=True)[0]
        got = module.tokens(x)
    assert relative_error(expected.numpy(), got.numpy()) < 1e-5  # measured 4e-7


# --- EAT --------------------------------------------------------------------------------------


class _Meter:
    """Stands for a training framework's object pickled beside the weights."""

    def __init__(self) -> None:
        self.count = 3


@pytest.fixture(scope="module")
def eat_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    return _perturbed(eat.build_model(dict(eat.SMALL), None, "test"), 2).state_dict()


def _save_fairseq_pretraining(state: dict[str, torch.Tensor], path: Path) -> None:
    """The fairseq trainer's file: cfg, weights with the EMA teacher and the pre-training
    decoder, and training state holding objects of classes this process cannot import."""
    extra = {"modality_encoders.IMAGE.decoder.proj.weight": torch.zeros(48, 48),
             "modality_encoders.IMAGE.decoder.blocks.0.0.weight": torch.zeros(48, 12, 3, 3),
             "_ema": {k: v.clone() for k, v in state.items() if k.startswith("blocks.")}}
    package, module = types.ModuleType("fairseq_like"), types.ModuleType("fairseq_like.meters")
    package.meters = module  # type: ignore[attr-defined]
    _Meter.__module__ = module.__name__
    module._Meter = _Meter  # type: ignore[attr-defined]
    sys.modules.update({package.__name__: package, module.__name__: module})
    try:
        torch.save({"args": None, "cfg": {"model": {"_name": "data2vec_multi", "depth": 2, "num_heads": 4}},
                    "model": {**state, **extra}, "extra_state": {"metrics": {"train": _Meter()}}}, path)
    finally:
        del sys.modules[module.__name__], sys.modules[package.__name__]


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    header, blobs, offset = {}, [], 0
    for key, tensor in state.items():
        data = tensor.contiguous().numpy().tobytes()
        header[key] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


HF_NAMES = {"modality_encoders.IMAGE.local_encoder.": "model.local_encoder.",
            "modality_encoders.IMAGE.extra_tokens": "model.extra_tokens",
            "modality_encoders.IMAGE.fixed_positional_encoder.positions": "model.fixed_positional_encoder.positions",
            "modality_encoders.IMAGE.context_encoder.norm.": "model.pre_norm.", "blocks.": "model.blocks."}


@pytest.fixture(scope="module")
def eat_files(eat_state: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eat")
    files = {"fairseq pre-trained": root / "EAT-small_pretrain.pt", "fairseq fine-tuned": root / "EAT-small_AS2M.pt",
             "Hugging Face": root / "hf" / "model.safetensors"}
    _save_fairseq_pretraining(eat_state, files["fairseq pre-trained"])
    classifier = {"fc_norm.weight": torch.ones(48), "fc_norm.bias": torch.zeros(48),
                  "head.weight": torch.zeros(527, 48), "head.bias": torch.zeros(527)}
    cfg = {"model": {"_name": "mae_image_classification", "pretrained_model_args": {"model": {"num_heads": 4}}}}
    torch.save({"cfg": cfg, "model": {**{"model." + k: v for k, v in eat_state.items()}, **classifier}},
               files["fairseq fine-tuned"])
    hf = {}
    for key, tensor in eat_state.items():
        old = next(o for o in HF_NAMES if key.startswith(o))
        hf[HF_NAMES[old] + key[len(old):]] = tensor
    hf.update({"model." + k: v for k, v in classifier.items()})
    files["Hugging Face"].parent.mkdir()
    _save_safetensors(hf, files["Hugging Face"])
    (files["Hugging Face"].parent / "config.json").write_text(json.dumps({"model_type": "eat", "num_heads": 4}))
    return files


def test_eat_has_the_official_keys(eat_state: dict[str, torch.Tensor]) -> None:
    assert set(eat_state) == OFFICIAL_EAT_KEYS
    assert tuple(eat_state["modality_encoders.IMAGE.fixed_positional_encoder.positions"].shape) == (1, 640, 48)


def test_eat_reads_every_layout_key_for_key(eat_files: dict[str, Path], eat_state: dict[str, torch.Tensor]) -> None:
    x = _waves(9)
    embeddings = []
    for layout, path in [*eat_files.items(), ("Hugging Face", eat_files["Hugging Face"].parent)]:
        found, arch, state = eat.load_eat(path)
        assert found == layout
        assert arch == {**eat.SMALL, "max_length": 80}
        model = eat.build_model(arch, state, str(path))
        for key, tensor in model.state_dict().items():
            assert torch.equal(tensor, eat_state[key]), (layout, key)
        with torch.no_grad():
            embeddings.append(eat.EatBackbone(model, 2, "cls")(x))
    for other in embeddings[1:]:
        assert torch.equal(embeddings[0], other)


def test_eat_positions_are_the_official_sincos_table() -> None:
    """Spot values of MAE's table (first half: frequency-patch index, second: time index)."""
    table = eat.sincos_positions(8, 3, 2)
    assert table.shape == (6, 8)
    row, col = 2, 1
    omega = 1.0 / 10000 ** (np.arange(2) / 2)
    expected = np.concatenate([np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)])
    np.testing.assert_allclose(table[row * 2 + col], expected, rtol=1e-6)


def test_eat_export_matches_torch(eat_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = eat_files["fairseq pre-trained"]
    argv = ["eat", "--checkpoint", str(path), "--out", str(tmp_path), "--layer", "1", "--pooling", "mean"]
    assert export_main(argv) == 0
    onnx_path = Path(capsys.readouterr().out.strip())
    meta = Backbone.load(onnx_path, "cpu").meta
    assert (meta.name, meta.embedding_dim) == ("eat", 48)
    assert "block 1/2" in meta.frontend and "mean over patch tokens" in meta.frontend
    module, _ = eat.build(argparse.Namespace(checkpoint=path, random_init=False, layer=1, pooling="mean"))
    x = _waves(10, 11, 12)
    with torch.no_grad():
        expected = module(x).numpy()
        tokens = module.tokens(x)
    assert tokens.shape == (3, 1 + 512, 48)  # CLS + 64 x 8 patches of the 1024-frame input
    np.testing.assert_allclose(expected, tokens[:, 1:].mean(1).numpy())
    assert relative_error(expected, _onnx(onnx_path, x)) < PARITY_RTOL


def test_eat_rejects_other_layouts(eat_state: dict[str, torch.Tensor], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    beats_like = tmp_path / "other.pt"
    torch.save({"cfg": {}, "model": {"encoder.layers.0.fc1.weight": torch.zeros(2, 2)}}, beats_like)
    _one_line_failure(["eat", "--checkpoint", str(beats_like), "--out", str(tmp_path)], tmp_path, capsys,
                      "other.pt", "not an EAT checkpoint")
    missing = tmp_path / "missing.pt"
    torch.save({"model": {k: v for k, v in eat_state.items() if not k.endswith("norm2.bias")}}, missing)
    _one_line_failure(["eat", "--checkpoint", str(missing), "--out", str(tmp_path)], tmp_path, capsys,
                      "missing.pt", "do not fit", "norm2.bias")
    extra = tmp_path / "extra.pt"
    torch.save({"model": {**eat_state, "blocks.0.attn.rel_pos": torch.zeros(3)}}, extra)
    _one_line_failure(["eat", "--checkpoint", str(extra), "--out", str(tmp_path)], tmp_path, capsys,
                      "Unexpected key", "rel_pos")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 4)
    _one_line_failure(["eat", "--checkpoint", str(bad), "--out", str(tmp_path)], tmp_path, capsys,
                      "not a safetensors file")


def test_random_init_builds_full_size_architectures() -> None:
    module, meta = beats.build(argparse.Namespace(checkpoint=None, random_init=True, layer=None))
    assert meta.embedding_dim == 768 and sum(p.numel() for p in module.parameters()) > 85e6
    module, meta = eat.build(argparse.Namespace(checkpoint=None, random_init=True, layer=None, pooling="cls"))
    assert meta.embedding_dim == 768 and sum(p.numel() for p in module.parameters()) > 85e6


def test_list_names_the_new_backbones(capsys: pytest.CaptureFixture[str]) -> None:
    assert export_main(["list"]) == 0
    out = capsys.readouterr().out
    assert "beats" in out and "microsoft/unilm" in out and "eat" in out and "cwx-worst-one/EAT" in out
    assert out.count("MIT") >= 2
