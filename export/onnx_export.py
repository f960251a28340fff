"""torch module -> ONNX file with the project's metadata, checked against torch on the spot."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from monitor.metadata import BackboneMetadata

log = logging.getLogger(__name__)

EXPORTER_VERSION = "1"
OPSET = 18
PARITY_RTOL = 1e-4


class ParityError(RuntimeError):
    """The exported graph does not reproduce the torch model."""


def model_digest(module: torch.nn.Module, settings: str) -> str:
    """A stable id of weights + frontend settings (a bank is only valid for the same id)."""
    digest = hashlib.sha256(settings.encode())
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """max |a - b| / max |a|: one number that is meaningful whatever the embedding's scale."""
    scale = float(np.max(np.abs(reference))) or 1.0
    return float(np.max(np.abs(reference - candidate))) / scale


def export_backbone(
    module: torch.nn.Module, meta: BackboneMetadata, out_dir: Path, parity_batch: int = 2
) -> Path:
    """Export ``module`` (waveform [B, window] -> embedding [B, D]) to ``out_dir/<name>.onnx``.

    The batch axis stays dynamic. The time axis is fixed to one window unless
    ``meta.min_seconds`` > 0 (the module accepts any length from there up to the window):
    transformers whose positional terms depend on length must keep it fixed. The file is
    written to a temporary name and renamed, so an interrupted export never leaves a truncated
    model where the daemon would load it. Raises ParityError if onnxruntime's output differs
    from torch's by more than ``PARITY_RTOL`` (relative to the output's scale).
    """
    module = module.eval()
    meta = replace(meta, model_id=model_digest(module, meta.frontend), exporter_version=EXPORTER_VERSION)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{meta.name}.onnx"
    generator = torch.Generator().manual_seed(0)
    example = 0.1 * torch.randn(parity_batch, meta.window_samples, generator=generator)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(
            module,
            (example,),
            str(raw),
            dynamo=True,
            opset_version=OPSET,
            input_names=[meta.input_name],
            output_names=[meta.output_name],
            dynamic_shapes={"waveform": _dynamic_axes(meta)},
            external_data=False,
            verbose=False,
        )
        model = onnx.load(str(raw))
        model.producer_name = "asd-export"
        model.producer_version = EXPORTER_VERSION
        del model.metadata_props[:]
        for key, value in sorted(meta.to_props().items()):
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        staged = Path(tmp) / final.name
        onnx.save(model, str(staged))
        check_parity(module, staged, meta, example)
        if meta.min_samples is not None:
            check_parity(module, staged, meta, example[:, : meta.min_samples])
            check_parity(module, staged, meta, example[:, : (meta.min_samples + meta.window_samples) // 2])
        os.replace(staged, final)
    log.info("exported %s to %s (model_id %s)", meta.name, final, meta.model_id)
    return final


def _dynamic_axes(meta: BackboneMetadata) -> dict[int, torch.export.Dim]:
    axes = {0: torch.export.Dim("batch", min=1, max=1024)}
    if meta.min_samples is not None:
        axes[1] = torch.export.Dim("samples", min=meta.min_samples, max=meta.window_samples)
    return axes


def check_parity(
    module: torch.nn.Module, path: Path, meta: BackboneMetadata, waveform: torch.Tensor
) -> float:
    """Run torch and onnxruntime (CPU) on the same input; return the relative error."""
    with torch.no_grad():
        expected = module(waveform).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([meta.output_name], {meta.input_name: waveform.numpy()})[0]
    if got.shape != expected.shape:
        raise ParityError(f"{path}: output shape {got.shape} != torch {expected.shape}")
    error = relative_error(expected, got)
    if not error < PARITY_RTOL:
        raise ParityError(f"{path}: relative error {error:.2e} against torch exceeds {PARITY_RTOL:.0e}")
    log.info("parity %s: relative error %.2e", path.name, error)
    return error
