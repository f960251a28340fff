"""Dasheng, M2D and MuQ exporters: small random configurations of our architectures saved in
each model's official checkpoint layout, loaded key for key, exported, run by the daemon's
loader; frontends against librosa; the official ``dasheng`` package where it is installed;
external data; one-line errors for wrong checkpoints.

Full-size figures and the parity against the official M2D and MuQ code are in
``benchmarks/export_dasheng_m2d_muq.py`` and ``benchmarks/parity_dasheng_m2d_muq.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export import dasheng, m2d, muq
from export.checkpoint import randomise_norms, read_safetensors
from export.cli import main as export_main
from export.contract import metadata
from export.onnx_export import PARITY_RTOL, export_backbone, relative_error
from export.registry import EXPORTERS
from monitor.audio.files import Audio
from monitor.errors import EXIT_DATA, CheckpointError
from monitor.scoring.backbone import Backbone
from monitor.scoring.metadata import BackboneMetadata
from tests.synth import machine_sound

ROOT = Path(__file__).resolve().parents[2]
HAVE_LIBROSA = importlib.util.find_spec("librosa") is not None
HAVE_DASHENG = all(importlib.util.find_spec(p) is not None for p in ("dasheng", "einops"))

SMALL_DASHENG = dasheng.Size(64, 2, 4, "dasheng_base.pt")
SMALL_M2D = m2d.M2DConfig(embed_dim=64, depth=2, num_heads=4)
SMALL_MUQ_JSON = {
    "label_rate": 25, "num_codebooks": 1, "codebook_dim": 16, "codebook_size": 32, "features": ["melspec_2048"],
    "hop_length": 240, "n_mels": 128, "conv_dim": 8, "encoder_dim": 32, "encoder_depth": 2, "is_flash": False,
    "stat": {"melspec_2048_cnt": 10, "melspec_2048_mean": 6.5, "melspec_2048_std": 18.0},
    "w2v2_config": {"hidden_act": "swish", "intermediate_size": 64, "num_attention_heads": 4,
                    "conv_depthwise_kernel_size": 7, "layer_norm_eps": 1e-5, "position_embeddings_type": "rotary",
                    "rotary_embedding_base": 10000, "num_conv_pos_embeddings": 128},
    "use_rvq_target": False,
}


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random, not the constructors' ones and zeros, so a mix-up shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("weight") and p.dim() == 1 else 0.0
            p.copy_(base + 0.05 * torch.randn(p.shape, generator=generator))
    randomise_norms(model)
    return model.eval()


def _windows(rate: int, seconds: float = 10.0, seeds: tuple[int, ...] = (1, 2)) -> np.ndarray:
    return np.stack([machine_sound(s, seconds, rate=rate) for s in seeds])


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The published format: little-endian header size, JSON header, raw little-endian data."""
    header, blobs, offset = {}, [], 0
    dtypes = {torch.float32: "F32", torch.int64: "I64"}
    for name, tensor in tensors.items():
        data = tensor.detach().contiguous().numpy().tobytes()
        header[name] = {"dtype": dtypes[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


# --- checkpoints in the official layouts ----------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    # Dasheng: {"model": state_dict incl. torchaudio's frontend buffers, "config": model arguments}.
    ours = _randomise(dasheng.DashengEncoder(dasheng.DashengConfig(64, 2, 4)), 1)
    state = dict(ours.state_dict())
    state["front_end.0.spectrogram.window"] = ours.mel.window.clone()
    state["front_end.0.mel_scale.fb"] = ours.mel.filters.clone()
    dasheng_path = root / "dasheng_base.pt"
    torch.save({"model": state, "config": {"target_length": 1008, "group_masking": True}}, dasheng_path)
    # M2D: the release folder name carries the sizes; a training checkpoint's extra tensors.
    ours_m2d = _randomise(m2d.M2DEncoder(SMALL_M2D), 2)
    with torch.no_grad():
        ours_m2d.norm_stats.copy_(torch.tensor([-6.9, 4.4]))
    folder = root / "m2d_as_vit_base-80x1001p16x16-240213_AS-FT_enconly"
    folder.mkdir()
    m2d_state = {f"backbone.{k}": v for k, v in ours_m2d.state_dict().items()}
    m2d_state["decoder_pred.weight"] = torch.zeros(4, 4)
    torch.save({"model": m2d_state, "args": {"epochs": 1}}, folder / "weights_ep69it3124-0.48494.pth")
    # MuQ: a Hugging Face folder with config.json and model.safetensors, training heads included.
    config = muq.MuQConfig.from_json(SMALL_MUQ_JSON)
    ours_muq = _randomise(muq.MuQEncoder(config), 3)
    hf = root / "MuQ-large-msd-iter"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(SMALL_MUQ_JSON))
    muq_state = dict(ours_muq.state_dict())
    muq_state["model.linear.weight"] = torch.zeros(32, 32)
    muq_state["model.cls_token"] = torch.zeros(32)
    muq_state["model.quantizer_melspec_2048.codebook"] = torch.zeros(32, 16)
    muq_state["model.conformer.pos_conv_embed.conv.weight_v"] = torch.zeros(32, 8, 128)
    _write_safetensors(hf / "model.safetensors", muq_state)
    torch.save(ours.state_dict(), root / "plain_state_dict.pt")
    return {"dasheng": dasheng_path, "m2d": folder / "weights_ep69it3124-0.48494.pth", "muq": hf,
            "plain": root / "plain_state_dict.pt",
            "_models": {"dasheng": ours, "m2d": ours_m2d, "muq": ours_muq}}  # type: ignore[dict-item]


def test_checkpoints_load_key_for_key(checkpoints: dict) -> None:
    models = checkpoints["_models"]
    loaded = {
        "dasheng": dasheng.load_dasheng(checkpoints["dasheng"], "dasheng-base", SMALL_DASHENG),
        "m2d": m2d.load_m2d(checkpoints["m2d"], SMALL_M2D),
        "muq": muq.load_muq(checkpoints["muq"]),
    }
    for name, model in loaded.items():
        reference = models[name].state_dict()
        assert model.state_dict().keys() == reference.keys()
        assert all(torch.equal(model.state_dict()[k], reference[k]) for k in reference), name
    assert loaded["m2d"].norm_stats.tolist() == pytest.approx([-6.9, 4.4])
    assert loaded["muq"].config.stat["melspec_2048_mean"] == 6.5


@pytest.fixture(scope="module")
def exported(checkpoints: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each small model exported (ONNX vs torch < 1e-4 is checked by the export itself)."""
    out = tmp_path_factory.mktemp("exported")
    paths = {}
    model = dasheng.load_dasheng(checkpoints["dasheng"], "dasheng-base", SMALL_DASHENG)
    meta = metadata("dasheng-small", 16000, 64, dasheng.frontend_description(model.config), dasheng.LICENCE,
                    dasheng.MIN_SECONDS)
    paths["dasheng"] = export_backbone(model, meta, out)
    model = m2d.load_m2d(checkpoints["m2d"], SMALL_M2D)
    meta = metadata("m2d-small", 16000, SMALL_M2D.frame_dim, m2d.frontend_description(SMALL_M2D), m2d.LICENCE,
                    m2d.MIN_SECONDS)
    paths["m2d"] = export_backbone(model, meta, out, external_data=True)  # also the external-data path
    # MuQ through the command line: its config.json gives every size.
    assert export_main(["muq", "--checkpoint", str(checkpoints["muq"]), "--out", str(out)]) == 0
    paths["muq"] = out / "muq.onnx"
    return paths


@pytest.mark.parametrize("name,rate", [("dasheng", 16000), ("m2d", 16000), ("muq", 24000)])
def test_onnx_matches_torch_on_machine_sound(checkpoints: dict, exported: dict, name: str, rate: int) -> None:
    """The daemon's loader on the exported file vs our torch model, at 10 s and at 4 s."""
    model = checkpoints["_models"][name]
    backbone = Backbone.load(exported[name], "cpu")
    assert backbone.meta.sample_rate == rate and backbone.meta.min_seconds == 1.0
    for seconds in (10.0, 4.0):
        x = _windows(rate, seconds)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        assert relative_error(expected, backbone.embed(x)) < PARITY_RTOL


def test_embedding_definitions(checkpoints: dict) -> None:
    """Dasheng: mean over the last layer's tokens; M2D: mean over time of the stacked frame
    features (62 x 3840-style for 10 s); MuQ: mean over time of the last hidden state."""
    models = checkpoints["_models"]
    with torch.no_grad():
        x16, x24 = torch.from_numpy(_windows(16000)), torch.from_numpy(_windows(24000))
        tokens = models["dasheng"].forward_tokens(x16)
        assert tokens.shape == (2, 250, 64)
        torch.testing.assert_close(models["dasheng"](x16), tokens.mean(1))
        frames = models["m2d"].frame_features(x16)
        assert frames.shape == (2, 62, 5 * 64)
        torch.testing.assert_close(models["m2d"](x16), frames.mean(1))
        hidden = models["muq"].hidden(x24)
        assert hidden.shape == (2, 250, 32)
        torch.testing.assert_close(models["muq"](x24), hidden.mean(1))


def test_muq_licence_is_in_the_metadata_and_the_list(exported: dict, capsys: pytest.CaptureFixture[str]) -> None:
    assert "CC BY-NC 4.0" in Backbone.load(exported["muq"], "cpu").meta.licence
    assert export_main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in ("dasheng-base", "dasheng-0.6b", "dasheng-1.2b", "m2d", "muq"))
    muq_block = out[out.index("\nmuq"):]
    assert "CC BY-NC 4.0" in muq_block.split("\n")[2] and "NON-COMMERCIAL" in muq_block


def test_external_data_loads_from_any_working_directory(exported: dict, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    graph, data = exported["m2d"], Path(str(exported["m2d"]) + ".data")
    assert data.stat().st_size > graph.stat().st_size  # the weights are beside, not inside
    assert any(t.data_location == onnx.TensorProto.EXTERNAL
               for t in onnx.load(str(graph), load_external_data=False).graph.initializer)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    x = _windows(16000)
    absolute = Backbone.load(graph, "cpu").embed(x)
    relative = Path(os.path.relpath(graph, elsewhere))
    assert relative.parts[0] == ".."
    assert np.array_equal(Backbone.load(relative, "cpu").embed(x), absolute)


def test_replacing_an_external_data_export_by_a_single_file_removes_the_stale_data(tmp_path: Path) -> None:
    module = dasheng.DashengEncoder(dasheng.DashengConfig(32, 1, 2)).eval()
    meta = metadata("tiny", 16000, 32, "tiny", "test")
    path = export_backbone(module, meta, tmp_path, external_data=True)
    assert Path(str(path) + ".data").exists()
    assert export_backbone(module, meta, tmp_path) == path
    assert not Path(str(path) + ".data").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]
    Backbone.load(path, "cpu").embed(_windows(16000))


def test_resampling_per_backbone_feeds_muq_at_24_khz(exported: dict) -> None:
    backbone = Backbone.load(exported["muq"], "cpu")
    windows, starts = backbone.windows_of(Audio(machine_sound(4, 12.0), 16000, "x"))
    assert windows.shape == (2, 240000) and starts == [0.0, 2.0]
    assert np.all(np.isfinite(backbone.embed(windows)))


# --- frontends -------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAVE_LIBROSA, reason="librosa (test extra) not installed")
@pytest.mark.parametrize("rate,n_fft,hop,n_mels,f_max", [(16000, 512, 160, 64, 8000.0), (24000, 2048, 240, 128, 12000.0)])
def test_reflect_power_mel_matches_librosa(rate: int, n_fft: int, hop: int, n_mels: int, f_max: float) -> None:
    """Dasheng's and MuQ's torchaudio mel: HTK bands, no normalisation, reflect-centred frames."""
    import librosa

    y = machine_sound(7, 3.0, rate=rate)
    spec = librosa.feature.melspectrogram(y=y, sr=rate, n_fft=n_fft, hop_length=hop, n_mels=n_mels, fmin=0.0,
                                          fmax=f_max, htk=True, norm=None, power=2.0, center=True, pad_mode="reflect")
    mel = dasheng.ReflectPowerMel(rate, n_fft, hop, n_mels, 0.0, f_max, unit_sum=False)
    with torch.no_grad():
        got = mel(torch.from_numpy(y)[None])[0].numpy().T
    assert got.shape == spec.shape and relative_error(spec, got) < 1e-5


@pytest.mark.skipif(not HAVE_LIBROSA, reason="librosa (test extra) not installed")
@pytest.mark.parametrize("tag", ["16k", "32k"])
def test_m2d_mel_matches_librosa_slaney(tag: str) -> None:
    """nnAudio's defaults (what M2D runs): Slaney scale, area-normalised, reflect-centred."""
    import librosa

    rate, n_fft, hop, f_min, f_max = m2d.RATES[tag]
    ref = librosa.filters.mel(sr=rate, n_fft=n_fft, n_mels=80, fmin=f_min, fmax=f_max, htk=False, norm="slaney")
    np.testing.assert_allclose(m2d.slaney_mel_filterbank(rate, n_fft, 80, f_min, f_max).T, ref, rtol=1e-5, atol=1e-8)
    y = machine_sound(8, 3.0, rate=rate)
    spec = librosa.feature.melspectrogram(y=y, sr=rate, n_fft=n_fft, hop_length=hop, n_mels=80, fmin=f_min, fmax=f_max,
                                          power=2.0, center=True, pad_mode="reflect")
    model = m2d.M2DEncoder(m2d.M2DConfig(rate_tag=tag, embed_dim=16, depth=1, num_heads=2))
    with torch.no_grad():
        got = model.mel(torch.from_numpy(y)[None])[0].numpy().T
    assert relative_error(spec, got) < 1e-5


def test_m2d_release_names() -> None:
    assert m2d.parse_release_name("m2d_as_vit_base-80x1001p16x16-240213_AS-FT_enconly") == m2d.M2DConfig((80, 1001), (16, 16), "16k")
    assert m2d.parse_release_name("m2d_vit_base-80x608p16x16-221006-mr7").input_size == (80, 608)
    assert m2d.parse_release_name("m2d_as_vit_base-80x1001p16x16p32k-240413_AS-FT_enconly").sample_rate == 32000
    assert m2d.parse_release_name("m2d_vit_base-80x200p16x4-230529").patch_size == (16, 4)
    for bad in ("weights", "m2d_vit_base", "m2d_vit_base-64x608p16x16-x", "clap-80x1001p16x16-1",
                "m2d_vit_base-80x1001-1"):
        with pytest.raises(ValueError):
            m2d.parse_release_name(bad)


def test_m2d_multi_chunk_model_takes_a_fixed_window() -> None:
    """80 x 608 weights: a 10 s window is two chunks (608 + 393 frames padded to whole patches)."""
    model = m2d.M2DEncoder(m2d.M2DConfig((80, 608), (16, 16), embed_dim=16, depth=1, num_heads=2)).eval()
    assert not model.single_chunk
    with torch.no_grad():
        assert model.frame_features(torch.from_numpy(_windows(16000, seeds=(1,)))).shape == (1, 38 + 25, 5 * 16)
    meta = m2d.build(argparse.Namespace(random_init=True, checkpoint=None, sizes="m2d_vit_base-80x608p16x16-221006"))[1]
    assert meta.min_seconds == 0.0 and meta.embedding_dim == 3840


@pytest.mark.skipif(not (HAVE_DASHENG and HAVE_LIBROSA), reason="the dasheng package (pip install --no-deps dasheng einops) and librosa")
def test_dasheng_matches_the_official_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The package's own encoder (its torchaudio frontend replaced by the benchmark's stand-in
    written with torch.stft and librosa's filters), saved in its format, loaded by ours."""
    spec = importlib.util.spec_from_file_location("parity", ROOT / "benchmarks" / "parity_dasheng_m2d_muq.py")
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    standin = parity.torchaudio_standin()
    monkeypatch.setitem(__import__("sys").modules, "torchaudio", standin)
    monkeypatch.setitem(__import__("sys").modules, "torchaudio.transforms", standin.transforms)
    from dasheng.pretrained.pretrained import Dasheng

    torch.manual_seed(0)
    official = Dasheng(embed_dim=64, depth=2, num_heads=4, target_length=1008).eval()
    parity.randomise(official, 5)
    path = tmp_path / "dasheng_base.pt"
    torch.save({"model": official.state_dict(), "config": {"target_length": 1008, "group_masking": True}}, path)
    ours = dasheng.load_dasheng(path, "dasheng-base", SMALL_DASHENG)
    x = torch.from_numpy(_windows(16000, seeds=(3,)))
    with torch.no_grad():
        expected = official(x).mean(1).numpy()
        assert relative_error(expected, ours(x).numpy()) < 1e-5  # measured ~1e-7
        assert relative_error(official(x[:, :64000]).mean(1).numpy(), ours(x[:, :64000]).numpy()) < 1e-5


# --- wrong checkpoints: one line, exit 65, nothing written --------------------------------------------

@pytest.mark.parametrize("command,key,message", [
    ("dasheng-0.6b", "dasheng", "width 64 is not dasheng-0.6b's 1280"),
    ("dasheng-base", "m2d", "not a dasheng-base checkpoint"),
    ("dasheng-base", "plain", "not a Dasheng checkpoint"),
    ("m2d", "dasheng", "cannot read sizes"),
    ("muq", "dasheng", "no config.json"),
])
def test_wrong_checkpoint_is_a_one_line_error(checkpoints: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              command: str, key: str, message: str) -> None:
    assert export_main([command, "--checkpoint", str(checkpoints[key]), "--out", str(tmp_path)]) == EXIT_DATA
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not list(tmp_path.glob("*.onnx"))


def test_full_size_m2d_refuses_a_small_checkpoint(checkpoints: dict, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The release name says ViT-Base: weights of another width are named in the error."""
    assert export_main(["m2d", "--checkpoint", str(checkpoints["m2d"]), "--out", str(tmp_path)]) == EXIT_DATA
    err = capsys.readouterr().err.strip()
    assert "not a M2D ViT-Base checkpoint" in err and "of another shape" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("relative,loads", [(5e-5, True), (1e-3, False)])
def test_dasheng_frontend_filters_built_elsewhere_in_float32_are_accepted(checkpoints: dict, tmp_path: Path,
                                                                        relative: float, loads: bool) -> None:
    """torchaudio's float32 mel filters differ from ours (built in float64) by ~5e-6 of their
    largest value; filters of other mel settings differ by far more."""
    dump = torch.load(checkpoints["dasheng"], weights_only=True)
    fb = dump["model"]["front_end.0.mel_scale.fb"]
    noise = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, tuple(fb.shape)).astype(np.float32))
    dump["model"]["front_end.0.mel_scale.fb"] = fb + relative * float(fb.abs().max()) * noise
    path = tmp_path / "dasheng_base.pt"
    torch.save(dump, path)
    if loads:
        dasheng.load_dasheng(path, "dasheng-base", SMALL_DASHENG)
    else:
        with pytest.raises(CheckpointError, match=r"mel_scale\.fb\) differs from Dasheng's mel settings by up to 0\.00\d* \(allowed 0\.0001 "):
            dasheng.load_dasheng(path, "dasheng-base", SMALL_DASHENG)


def test_muq_with_a_missing_weight_is_refused(checkpoints: dict, tmp_path: Path) -> None:
    folder = tmp_path / "muq"
    folder.mkdir()
    (folder / "config.json").write_text((checkpoints["muq"] / "config.json").read_text())
    state = read_safetensors(checkpoints["muq"] / "model.safetensors")
    del state["model.conformer.layers.1.final_layer_norm.bias"]
    _write_safetensors(folder / "model.safetensors", state)
    with pytest.raises(ValueError, match="1 missing .*final_layer_norm.bias"):
        muq.load_muq(folder)


@pytest.mark.parametrize("w2v2,message", [
    ({"num_attention_heads": 5}, "encoder_dim 32 is not divisible by 5 heads"),
    ({"conv_depthwise_kernel_size": 8}, "conv_depthwise_kernel_size must be odd"),
])
def test_muq_sizes_its_model_cannot_take_are_a_checkpoint_error(checkpoints: dict, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 w2v2: dict, message: str) -> None:
    """They come from config.json, so the model's own checks answer as a bad checkpoint (65)."""
    folder = tmp_path / "muq"
    folder.mkdir()
    raw = {**SMALL_MUQ_JSON, "w2v2_config": {**SMALL_MUQ_JSON["w2v2_config"], **w2v2}}
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "model.safetensors").write_bytes((checkpoints["muq"] / "model.safetensors").read_bytes())
    assert export_main(["muq", "--checkpoint", str(folder), "--out", str(tmp_path)]) == EXIT_DATA
    err = capsys.readouterr().err.strip()
    assert f"{folder}: {message}" in err and len(err.splitlines()) == 1


def test_old_metadata_without_precision_reads_as_fp32() -> None:
    props = BackboneMetadata("x", 16000, 10.0, 8, "f", "l", "1", "id").to_props()
    del props["asd.precision"]
    assert BackboneMetadata.from_props(props, "old.onnx").precision == "fp32"


def test_registry_sizes() -> None:
    meta = {n: EXPORTERS[n] for n in ("dasheng-base", "dasheng-0.6b", "dasheng-1.2b", "m2d", "muq")}
    assert all(not e.builtin for e in meta.values())
    assert [dasheng.SIZES[n].embed_dim for n in ("dasheng-base", "dasheng-0.6b", "dasheng-1.2b")] == [768, 1280, 1536]
