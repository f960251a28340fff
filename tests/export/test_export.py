"""Exporters: the shipped built-in ONNX files are what the exporter produces, the graph
reproduces torch, and our torch modules reproduce independent implementations."""

from __future__ import annotations

import argparse
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export import aisfx, beats, dasheng, eat, logmel, m2d, muq
from export import cli as export_cli
from export.checkpoint import read_checkpoint, read_safetensors
from export.cli import main as export_main
from export.frontend import PowerMel, mel_filterbank
from export.onnx_export import PARITY_RTOL, relative_error
from export.registry import EXPORTERS
from monitor.errors import EXIT_DATA, EXIT_FAILURE, CheckpointError, ParityError
from monitor.scoring.backbone import ASSETS, Backbone
from tests.synth import machine_sound

HAVE_AISFX = importlib.util.find_spec("aisfx") is not None
HAVE_LIBROSA = importlib.util.find_spec("librosa") is not None


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export")
    assert export_main(["builtins", "--out", str(out)]) == 0
    return out


def _run(path: Path, waveform: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"waveform": waveform})[0]


BUILTINS = sorted(name for name, e in EXPORTERS.items() if e.builtin)


def _build(name: str):
    return EXPORTERS[name].build(argparse.Namespace(checkpoint=None, random_init=False))


def _embedding(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """torch's embedding (a module with further outputs, as aisfx's blocks, returns it first)."""
    with torch.no_grad():
        out = module.eval()(torch.from_numpy(x))
    return (out[0] if isinstance(out, tuple) else out).numpy()


@pytest.mark.parametrize("name", BUILTINS)
def test_shipped_model_matches_a_fresh_export(exported: Path, name: str) -> None:
    shipped, fresh = Backbone.load(ASSETS / f"{name}.onnx", "cpu"), Backbone.load(exported / f"{name}.onnx", "cpu")
    # model_id digests the weights and frontend settings: equal ids mean the same model.
    assert shipped.meta == fresh.meta
    x = np.stack([machine_sound(s, 10.0, rate=shipped.meta.sample_rate) for s in (1, 2)])
    np.testing.assert_allclose(shipped.embed(x), fresh.embed(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", BUILTINS)
def test_onnx_matches_torch_on_real_sound(exported: Path, name: str) -> None:
    module, meta = _build(name)
    x = np.stack([machine_sound(s, 10.0, rate=meta.sample_rate) for s in (3, 4)])
    got = _run(exported / f"{name}.onnx", x)
    assert relative_error(_embedding(module, x), got) < PARITY_RTOL


def test_variable_length_input_matches_torch(exported: Path) -> None:
    module, meta = _build("aisfx")
    x = machine_sound(5, 5.0, rate=meta.sample_rate)[None, :]
    assert relative_error(_embedding(module, x), _run(exported / "aisfx.onnx", x)) < PARITY_RTOL


@pytest.mark.skipif(not HAVE_LIBROSA, reason="librosa (test extra) not installed")
def test_mel_frontend_matches_librosa() -> None:
    import librosa

    rate = aisfx.SAMPLE_RATE
    ours = mel_filterbank(rate, aisfx.N_FFT, aisfx.N_MELS, 0.0, rate / 2, unit_sum=True)
    ref = librosa.filters.mel(sr=rate, n_fft=aisfx.N_FFT, n_mels=aisfx.N_MELS, fmin=0, fmax=rate / 2, htk=True, norm=1.0)
    np.testing.assert_allclose(ours.T, ref, atol=1e-6)
    y = machine_sound(7, 3.0, rate=rate)
    spec = librosa.feature.melspectrogram(y=y, sr=rate, n_fft=aisfx.N_FFT, hop_length=aisfx.HOP, n_mels=aisfx.N_MELS,
                                          fmin=0, fmax=rate / 2, htk=True, norm=1.0, power=2.0, pad_mode="constant")
    mel = PowerMel(rate, aisfx.N_FFT, aisfx.HOP, aisfx.N_MELS, 0.0, rate / 2, unit_sum=True)
    with torch.no_grad():
        got = mel(torch.from_numpy(y)[None])[0].numpy().T
    assert relative_error(spec, got) < 1e-5


@pytest.mark.skipif(not (HAVE_AISFX and HAVE_LIBROSA), reason="aisfx and librosa needed for the reference pipeline")
def test_aisfx_matches_the_package_pipeline(tmp_path: Path) -> None:
    """Our waveform-in model against the package's own spectrogram, normalisation, blocking and
    CrossNet embedding (its librosa path, with its spectrogram transposed to time-major)."""
    import soundfile as sf
    from aisfx import inference, preprocessing
    from aisfx.spectrogram import spectrogram_librosa

    y = machine_sound(8, 10.0, rate=aisfx.SAMPLE_RATE)
    path = tmp_path / "clip.wav"
    sf.write(path, y, aisfx.SAMPLE_RATE, subtype="FLOAT")
    spec = spectrogram_librosa.compute_spectrogram(str(path), aisfx.SAMPLE_RATE, aisfx.N_FFT, aisfx.HOP,
                                                   aisfx.N_MELS, 0.0, aisfx.SAMPLE_RATE / 2).T
    spec = preprocessing.spectrogram_normalize(spec)
    # The package's own loader predates torch's weights_only default; load as it would have.
    weights, datasets = torch.load(aisfx.packaged_checkpoint(), map_location="cpu", weights_only=False)
    reference = inference.load_bestModel(weights, datasets, "cpu")
    expected = inference.model_get_embedding(spec, 0.5, True, reference, "cpu").numpy().mean(axis=0)

    ours = aisfx.AisfxBackbone(aisfx.load_cnn(), peak_normalise=True).eval()
    with torch.no_grad():
        got = ours(torch.from_numpy(y)[None])[0].numpy()
    assert relative_error(expected, got) < 1e-5  # measured 3e-7


def test_logmel_statistics_by_hand() -> None:
    x = machine_sound(9, 10.0)
    mel = PowerMel(logmel.SAMPLE_RATE, logmel.N_FFT, logmel.HOP, logmel.N_MELS, logmel.F_MIN, logmel.F_MAX, unit_sum=False)
    with torch.no_grad():
        spec = torch.log10(mel(torch.from_numpy(x)[None]) + logmel.FLOOR)[0].numpy()
        got = logmel.LogMelStats()(torch.from_numpy(x)[None])[0].numpy()
    np.testing.assert_allclose(got, np.concatenate([spec.mean(0), spec.std(0)]), rtol=1e-4, atol=1e-5)


def test_export_cli_lists_backbones(capsys: pytest.CaptureFixture[str]) -> None:
    assert export_main(["list"]) == 0
    out = capsys.readouterr().out
    assert "aisfx" in out and "CC BY 4.0" in out and "logmel" in out


def test_export_cli_reports_a_bad_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert export_main(["aisfx", "--checkpoint", str(bad), "--out", str(tmp_path)]) == EXIT_DATA
    err = capsys.readouterr().err
    assert "bad.pth" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "aisfx.onnx").exists()


# --- checkpoint files: read safely, whatever they pickle -------------------------------------------

class _Armed:
    """What a malicious checkpoint pickles: unpickling it in full runs ``exec`` on code that
    writes ``marker`` (torch.load with weights_only=False would do just that)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def _armed_checkpoint(folder: Path, marker: Path) -> Path:
    """An exporter-shaped file with the code in every place a loader looks: a cfg / config /
    args entry and a weight. Checked to be live: a full unpickling writes the marker."""
    folder.mkdir(parents=True)
    path = folder / "pytorch_model.bin"  # the name MuQ's folder and EAT's folder look for
    armed = _Armed(marker)
    torch.save({"cfg": armed, "config": armed, "args": armed, "model": {"w": torch.zeros(2), "armed": armed}}, path)
    torch.load(path, map_location="cpu", weights_only=False)
    assert marker.exists()
    marker.unlink()
    return path


SMALL_DASHENG = dasheng.Size(32, 1, 2, "dasheng_base.pt")
SMALL_M2D = m2d.M2DConfig(embed_dim=32, depth=1, num_heads=2)
# What each exporter's loader is given: the file, or the folder it expects.
LOADERS = {
    "aisfx": lambda path: aisfx.load_cnn(path),
    "beats": lambda path: beats.load_beats(path),
    "eat": lambda path: eat.load_eat(path.parent),
    "dasheng": lambda path: dasheng.load_dasheng(path, "dasheng-base", SMALL_DASHENG),
    "m2d": lambda path: m2d.load_m2d(path, SMALL_M2D),
    "muq": lambda path: muq.load_muq(path.parent),
}


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_no_loader_runs_code_from_a_checkpoint(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "ran"
    path = _armed_checkpoint(tmp_path / "armed", marker)
    (path.parent / "config.json").write_text(json.dumps({"num_heads": 2, "encoder_dim": 32, "encoder_depth": 1}))
    with pytest.raises(CheckpointError) as info:  # the layout is no exporter's
        LOADERS[name](path)
    assert not marker.exists()
    # Named for the weight file itself: the loader read it (and refused what it found).
    assert str(info.value).startswith(f"{path}: ") and len(str(info.value).splitlines()) == 1


def test_code_in_a_checkpoint_becomes_inert_data(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    loaded = read_checkpoint(_armed_checkpoint(tmp_path / "armed", marker))
    assert not marker.exists()
    assert torch.equal(loaded["model"]["w"], torch.zeros(2))
    stand_in = loaded["model"]["armed"]
    assert type(stand_in).__name__ == "exec" and stand_in.args == (f"open({str(marker)!r}, 'w').close()",)
    assert stand_in is not exec and not callable(stand_in)


def test_official_layouts_with_pickled_training_objects_load(tmp_path: Path) -> None:
    """Dasheng's release dict, and an M2D training checkpoint as the MAE recipe saves it: the
    run's argparse.Namespace (holding a path and numpy values), optimizer state, an epoch, and
    here also code that must not run."""
    marker = tmp_path / "ran"
    torch.manual_seed(0)
    ours = dasheng.DashengEncoder(dasheng.DashengConfig(32, 1, 2)).eval()
    torch.save({"model": ours.state_dict(), "config": {"target_length": 1008, "group_masking": True}},
               tmp_path / "dasheng_base.pt")
    loaded = dasheng.load_dasheng(tmp_path / "dasheng_base.pt", "dasheng-base", SMALL_DASHENG)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.state_dict().items())

    ours_m2d = m2d.M2DEncoder(SMALL_M2D).eval()
    folder = tmp_path / "m2d_as_vit_base-80x1001p16x16-240213_AS-FT_enconly"
    folder.mkdir()
    args = argparse.Namespace(data_path=Path("/data/audioset"), norm_stats=np.array([-7.1, 4.2]), blr=np.float64(3e-4),
                              input_size=[80, 1001], model="m2d_vit_base")
    torch.save({"model": ours_m2d.state_dict(), "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                "epoch": 69, "args": args, "scaler": _Armed(marker)}, folder / "weights_ep69it3124-0.48494.pth")
    loaded_m2d = m2d.load_m2d(folder, SMALL_M2D)
    assert not marker.exists()
    assert all(torch.equal(loaded_m2d.state_dict()[k], v) for k, v in ours_m2d.state_dict().items())


def test_a_truncated_checkpoint_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"model": dasheng.DashengEncoder(dasheng.DashengConfig(32, 1, 2)).state_dict(), "config": {}},
               tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    cut = tmp_path / "dasheng_base.pt"
    cut.write_bytes(data[: len(data) // 2])
    assert export_main(["dasheng-base", "--checkpoint", str(cut), "--out", str(tmp_path)]) == EXIT_DATA
    err = capsys.readouterr().err.strip()
    assert f"{cut}: cannot read as a torch checkpoint (truncated" in err and len(err.splitlines()) == 1
    assert not list(tmp_path.glob("*.onnx"))

    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    header, offset = {}, 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": {torch.float32: "F32", torch.int64: "I64"}[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    full = struct.pack("<Q", len(raw)) + raw + b"".join(t.numpy().tobytes() for t in tensors.values())
    whole, short = tmp_path / "whole.safetensors", tmp_path / "short.safetensors"
    whole.write_bytes(full)
    short.write_bytes(full[:-8])
    assert all(torch.equal(read_safetensors(whole)[k], t) for k, t in tensors.items())
    with pytest.raises(CheckpointError, match=f"^{short}: truncated: tensor b ") as info:
        read_checkpoint(short)
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("error", [
    ParityError("x.onnx: relative error 1e-2 against torch exceeds 1e-4"),
    RuntimeError("an operator torch.onnx cannot export\nwith a long trace after it"),
    OSError(28, "No space left on device"),
])
def test_export_cli_answers_other_failures_with_1(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str], error: Exception) -> None:
    """A parity failure is ours but not bad input; torch's, onnx's and the file system's own errors
    are not ours: all answer 1, in one line."""
    def fail(args: object, name: str) -> Path:
        raise error

    monkeypatch.setattr(export_cli, "export_one", fail)
    assert export_main(["logmel", "--out", str(tmp_path)]) == EXIT_FAILURE
    err = capsys.readouterr().err.strip()
    assert err.startswith("asd-export: error: ") and len(err.splitlines()) == 1
