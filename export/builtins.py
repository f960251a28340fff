"""The built-in backbones: how each is built and described, in one table for the CLI."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from export import aisfx, logmel
from monitor.metadata import BackboneMetadata

WINDOW_SECONDS = 10.0


@dataclass(frozen=True)
class Builtin:
    name: str
    summary: str
    licence: str
    checkpoint: str
    build: Callable[[Path | None, bool], tuple[torch.nn.Module, BackboneMetadata]]


def _metadata(name: str, rate: int, dim: int, frontend: str, licence: str, min_seconds: float) -> BackboneMetadata:
    # exporter_version and model_id are filled in by export_backbone from the built module.
    return BackboneMetadata(name, rate, WINDOW_SECONDS, dim, frontend, licence, "", "", min_seconds=min_seconds)


def _build_logmel(checkpoint: Path | None, peak_normalise: bool) -> tuple[torch.nn.Module, BackboneMetadata]:
    del checkpoint, peak_normalise  # no weights, no level normalisation
    frontend = (
        f"log10 power mel, {logmel.N_MELS} HTK bands {logmel.F_MIN:g}-{logmel.F_MAX:g} Hz, n_fft {logmel.N_FFT}, "
        f"hop {logmel.HOP}, centred; per-band mean and std over time"
    )
    return logmel.LogMelStats(), _metadata("logmel", logmel.SAMPLE_RATE, logmel.EMBEDDING_DIM, frontend, logmel.LICENCE,
                                                logmel.MIN_SECONDS)


def _build_aisfx(checkpoint: Path | None, peak_normalise: bool) -> tuple[torch.nn.Module, BackboneMetadata]:
    frontend = (
        f"{'peak-normalised, ' if peak_normalise else ''}power mel {aisfx.N_MELS} HTK bands unit-sum, "
        f"n_fft {aisfx.N_FFT}, hop {aisfx.HOP}, centred, log10(S*1e4+1)/{aisfx.SPEC_MAX:.4f}; "
        f"blocks {aisfx.BLOCK_FRAMES} hop {aisfx.BLOCK_HOP}; CNN mean over blocks"
    )
    module = aisfx.AisfxBackbone(aisfx.load_cnn(checkpoint), peak_normalise)
    return module, _metadata("aisfx", aisfx.SAMPLE_RATE, aisfx.EMBEDDING_DIM, frontend, aisfx.LICENCE, aisfx.MIN_SECONDS)


BUILTINS: dict[str, Builtin] = {
    "logmel": Builtin("logmel", "log-mel band statistics (DSP, 16 kHz, 256-d)", logmel.LICENCE, "none", _build_logmel),
    "aisfx": Builtin(
        "aisfx",
        "CNN pretrained on sound-effect libraries (44.1 kHz, 512-d)",
        aisfx.LICENCE,
        "optional: the aisfx package's models/checkpoint.pth (used by default)",
        _build_aisfx,
    ),
}
