"""Exporters: the shipped built-in ONNX files are what the exporter produces, the graph
reproduces torch, and our torch modules reproduce independent implementations."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export import aisfx, logmel
from export.registry import EXPORTERS
from export.cli import main as export_main
from export.frontend import PowerMel, mel_filterbank
from export.onnx_export import PARITY_RTOL, relative_error
from monitor.backbone import ASSETS, Backbone
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
    with torch.no_grad():
        expected = module.eval()(torch.from_numpy(x)).numpy()
    got = _run(exported / f"{name}.onnx", x)
    assert relative_error(expected, got) < PARITY_RTOL


def test_variable_length_input_matches_torch(exported: Path) -> None:
    module, meta = _build("aisfx")
    x = machine_sound(5, 5.0, rate=meta.sample_rate)[None, :]
    with torch.no_grad():
        expected = module.eval()(torch.from_numpy(x)).numpy()
    assert relative_error(expected, _run(exported / "aisfx.onnx", x)) < PARITY_RTOL


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
    assert export_main(["aisfx", "--checkpoint", str(bad), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "bad.pth" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "aisfx.onnx").exists()
