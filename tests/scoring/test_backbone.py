"""Running exported backbones with onnxruntime: loading, providers, metadata, shapes, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from monitor.audio.files import Audio
from monitor.errors import BackboneError, ModelMetadataError
from monitor.scoring.backbone import ASSETS, Backbone, builtin_names, resolve_model
from monitor.scoring.metadata import BackboneMetadata
from tests.synth import machine_sound


def test_builtins_are_shipped_with_metadata() -> None:
    assert builtin_names() == ["aisfx", "logmel"]
    aisfx = Backbone.load("aisfx", "cpu")
    assert (aisfx.meta.name, aisfx.meta.sample_rate, aisfx.meta.embedding_dim) == ("aisfx", 44100, 512)
    assert aisfx.meta.window_seconds == 10.0 and "CC BY 4.0" in aisfx.meta.licence
    assert aisfx.provider == "CPUExecutionProvider"


def test_auto_provider_runs_on_what_really_initialises() -> None:
    backbone = Backbone.load("logmel", "auto")
    expected = "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() else "CPUExecutionProvider"
    assert backbone.provider in (expected, "CPUExecutionProvider")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_cuda_asked_for_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(BackboneError, match="cuda"):
        Backbone.load("logmel", "cuda")


def test_embedding_windows_of_audio_at_another_rate() -> None:
    backbone = Backbone.load("aisfx", "cpu")
    audio = Audio(machine_sound(1, 12.0), 16000, "x")
    windows, starts = backbone.windows_of(audio)
    assert windows.shape == (2, 441000) and starts == [0.0, 2.0]
    emb = backbone.embed(windows)
    assert emb.shape == (2, 512) and np.all(np.isfinite(emb))


def test_short_clip_is_embedded_as_it_is_when_the_model_takes_variable_length() -> None:
    backbone = Backbone.load("aisfx", "cpu")
    windows, starts = backbone.windows_of(Audio(machine_sound(2, 5.0), 16000, "x"))
    assert windows.shape == (1, 220500) and starts == [0.0]
    too_short, _ = backbone.windows_of(Audio(machine_sound(2, 1.0), 16000, "x"))
    assert too_short.shape == (1, 441000)  # below min_seconds: repeated to a full window


def test_wrong_window_shape_is_refused() -> None:
    backbone = Backbone.load("logmel", "cpu")
    with pytest.raises(BackboneError, match=r"\[B, 160000\]"):
        backbone.embed(np.zeros((1, 200000), np.float32))


def test_unknown_name_and_missing_file() -> None:
    with pytest.raises(BackboneError, match="not a built-in"):
        resolve_model("beats")
    with pytest.raises(BackboneError, match="does not exist"):
        resolve_model("/nonexistent/model.onnx")


def test_garbage_file_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(BackboneError) as err:
        Backbone.load(bad, "cpu")
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_model_without_project_metadata_is_refused(tmp_path: Path) -> None:
    model = onnx.load(str(ASSETS / "logmel.onnx"))
    del model.metadata_props[:]
    path = tmp_path / "plain.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelMetadataError, match="asd.name"):
        Backbone.load(path, "cpu")


def test_metadata_round_trip_and_bad_values() -> None:
    meta = BackboneMetadata("x", 16000, 10.0, 256, "f", "l", "1", "abc", min_seconds=1.0)
    assert BackboneMetadata.from_props(meta.to_props(), "m.onnx") == meta
    props = meta.to_props() | {"asd.sample_rate": "fast"}
    with pytest.raises(ModelMetadataError, match="m.onnx: metadata key 'asd.sample_rate' has invalid value 'fast'"):
        BackboneMetadata.from_props(props, "m.onnx")
    with pytest.raises(ModelMetadataError, match="format_version"):
        BackboneMetadata.from_props(meta.to_props() | {"asd.format_version": "9"}, "m.onnx")
