"""EAT (Chen et al. 2024, cwx-worst-one/EAT) as a waveform-in, embedding-out model.

Facts taken from the official repository (MIT) and its Hugging Face conversions: the waveform
minus its mean becomes a 128-bin Kaldi fbank (25/10 ms, hanning window, pre-emphasis 0.97,
snip edges, no energy), zero-padded (or cut) to 1024 frames, normalised with
``(mel + 4.268) / (2 * 4.569)``. A 16x16 conv patch embedding gives 64 x 8 = 512 patches; fixed
2-D sin-cos positions (stored in the checkpoint) are added, a CLS token ("extra token") is
prepended, a LayerNorm follows (the data2vec-2.0 image encoder's ``context_encoder.norm``),
then post-norm ViT blocks (``AltBlock``: attention, residual, norm1, MLP, residual, norm2).
The utterance feature is the CLS token of the last block, which is what the official feature
extraction returns for ``granularity=utterance``.

Three checkpoint layouts are read (found by their keys):
- fairseq pre-training (``Data2VecMultiModel``): the names used by this module; the EMA teacher
  (``_ema``) and the pre-training decoder are skipped;
- fairseq AudioSet fine-tuning (``MaeImageClassificationModel``): the same under ``model.``,
  plus the classifier (``fc_norm``, ``head``), skipped;
- the Hugging Face conversions (``worstchan/EAT-*``, remote code ``EATModel`` -> ``EAT``):
  ``model.local_encoder``, ``model.extra_tokens``, ``model.fixed_positional_encoder``,
  ``model.pre_norm``, ``model.blocks``, renamed to the fairseq names.
The architecture (width, depth, MLP width, patch size, position table) comes from the tensor
shapes, the head count from the checkpoint's config (fairseq ``cfg`` or ``config.json`` beside a
Hugging Face file; 64-d heads, true of base and large, when neither is there).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from export.beats import resolve_layer
from export.checkpoint import (
    hugging_face_weight_file,
    read_checkpoint,
    summarise_load_error,
)
from export.contract import metadata
from export.kaldi import FbankOptions, KaldiFbank
from export.vit import Block, PatchEmbed
from monitor.errors import CheckpointError
from monitor.scoring.metadata import BackboneMetadata

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
FBANK = FbankOptions(sample_rate=SAMPLE_RATE, num_mel_bins=128, window_type="hanning")
NORM_MEAN = -4.268
NORM_STD = 4.569
TARGET_FRAMES = 1024  # 10 s, the official recommendation (a multiple of the 16-frame patch)
LICENCE = ("EAT: MIT (cwx-worst-one/EAT repository licence; its README gives no other terms for the "
           "checkpoints; Chen et al., IJCAI 2024)")
SUMMARY = "EAT audio transformer (data2vec 2.0), 16 kHz, 768/1024-d CLS token (cwx-worst-one/EAT)"
CHECKPOINT = ("an official EAT checkpoint: the fairseq .pt (pre-trained or AS-2M/AS-20K fine-tuned, base or "
              "large) or a Hugging Face worstchan/EAT-* model folder / its model.safetensors (with config.json)")
POOLINGS = ("cls", "mean")

PREFIX = "modality_encoders.IMAGE."
# Training-only parts of the fairseq pre-training model, not needed to embed.
TRAINING_ONLY = ("_ema", PREFIX + "decoder.", "shared_decoder.", "recon_proj.", "cls_proj.", "center",
                 PREFIX + "encoder_mask")
CLASSIFIER = ("fc_norm.", "head.")
HF_RENAMES = (
    ("model.local_encoder.", PREFIX + "local_encoder."),
    ("model.extra_tokens", PREFIX + "extra_tokens"),
    ("model.fixed_positional_encoder.positions", PREFIX + "fixed_positional_encoder.positions"),
    ("model.pre_norm.", PREFIX + "context_encoder.norm."),
    ("model.blocks.", "blocks."),
)

BASE = {"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_dim": 3072, "patch": 16, "max_length": 768,
        "norm_eps": 1e-6}
LARGE = {**BASE, "embed_dim": 1024, "depth": 24, "num_heads": 16, "mlp_dim": 4096}
SMALL = {**BASE, "embed_dim": 48, "depth": 2, "num_heads": 4, "mlp_dim": 96, "max_length": 80}


def sincos_positions(dim: int, rows: int, cols: int) -> np.ndarray:
    """The MAE 2-D sin-cos table EAT stores, [rows * cols, dim], row-major over (time, freq).

    As in the official table, the first half of the channels encodes the column (frequency
    patch) index and the second half the row (time patch) index, each as [sin | cos] over
    ``dim / 4`` frequencies ``10000^(-k / (dim / 4))``.
    """
    if dim % 4:
        raise ValueError(f"embedding width {dim} must be a multiple of 4")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float32) / np.float32(quarter))
    col, row = np.meshgrid(np.arange(cols, dtype=np.float32), np.arange(rows, dtype=np.float32))

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(col), encode(row)], axis=1).astype(np.float32)


class FixedPositions(nn.Module):
    def __init__(self, dim: int, length: int) -> None:
        super().__init__()
        self.positions = nn.Parameter(torch.zeros(1, length, dim), requires_grad=False)


class ContextNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)


class ImageFrontend(nn.Module):
    """The parts of data2vec 2.0's image encoder that EAT uses at inference."""

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        dim, patch = arch["embed_dim"], arch["patch"]
        self.local_encoder = PatchEmbed(1, dim, (patch, patch), (patch, patch))
        self.extra_tokens = nn.Parameter(torch.zeros(1, 1, dim))
        self.fixed_positional_encoder = FixedPositions(dim, arch["max_length"] * (FBANK.num_mel_bins // patch))
        self.context_encoder = ContextNorm(dim, arch["norm_eps"])


class Eat(nn.Module):
    """EAT's encoder under the fairseq pre-training names: normalised mel in, tokens out."""

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        self.arch = dict(arch)
        self.modality_encoders = nn.ModuleDict({"IMAGE": ImageFrontend(arch)})
        # Post-norm blocks: data2vec 2.0's AltBlock with layer_norm_first=False.
        self.blocks = nn.ModuleList(
            Block(arch["embed_dim"], arch["num_heads"], arch["mlp_dim"], arch["norm_eps"], norm_first=False)
            for _ in range(arch["depth"])
        )

    def forward(self, mel: torch.Tensor, num_layers: int) -> torch.Tensor:
        """[B, frames, 128] -> [B, 1 + patches, D] (CLS first)."""
        front = self.modality_encoders["IMAGE"]
        x = front.local_encoder(mel.unsqueeze(1)).flatten(2).transpose(1, 2)
        x = x + front.fixed_positional_encoder.positions[:, : x.shape[1]]
        x = torch.cat([front.extra_tokens.expand(x.shape[0], -1, -1), x], dim=1)
        x = front.context_encoder.norm(x)
        for block in self.blocks[:num_layers]:
            x = block(x)
        return x


class EatBackbone(nn.Module):
    """Waveform [B, 160000] at 16 kHz -> CLS token or mean of the patch tokens of one block."""

    def __init__(self, model: Eat, layer: int, pooling: str) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.fbank = KaldiFbank(FBANK)
        self.model = model
        self.layer = layer
        self.pooling = pooling

    def mel(self, waveform: torch.Tensor) -> torch.Tensor:
        mel = self.fbank(waveform - waveform.mean(dim=-1, keepdim=True))
        frames = mel.shape[1]
        if frames < TARGET_FRAMES:
            mel = F.pad(mel, (0, 0, 0, TARGET_FRAMES - frames))
        else:
            mel = mel[:, :TARGET_FRAMES]
        return (mel - NORM_MEAN) / (2.0 * NORM_STD)

    def tokens(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.model(self.mel(waveform), self.layer)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        x = self.tokens(waveform)
        return x[:, 0] if self.pooling == "cls" else x[:, 1:].mean(dim=1)


def _layout(state: dict[str, Any], source: str) -> tuple[str, dict[str, torch.Tensor]]:
    """Name the layout and return the encoder's tensors under this module's names."""
    keys = set(state)
    if PREFIX + "local_encoder.proj.weight" in keys:
        layout, encoder = "fairseq pre-trained", {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY)}
    elif "model." + PREFIX + "local_encoder.proj.weight" in keys:
        layout = "fairseq fine-tuned"
        encoder = {}
        for k, v in state.items():
            if k.startswith("model."):
                if not k[len("model."):].startswith(TRAINING_ONLY):
                    encoder[k[len("model."):]] = v
            elif not k.startswith(CLASSIFIER):
                encoder[k] = v  # unknown: reported by the strict load
    elif "model.local_encoder.proj.weight" in keys:
        layout, encoder = "Hugging Face", {}
        for k, v in state.items():
            if k.startswith(tuple("model." + c for c in CLASSIFIER)):
                continue
            for old, new in HF_RENAMES:
                if k.startswith(old):
                    k = new + k[len(old):]
                    break
            encoder[k] = v
    else:
        raise CheckpointError(f"{source}: not an EAT checkpoint (no patch embedding under any known layout: "
                              "fairseq 'modality_encoders.IMAGE.local_encoder', Hugging Face 'model.local_encoder')")
    if not all(isinstance(v, torch.Tensor) for v in encoder.values()):
        raise CheckpointError(f"{source}: the {layout} state dict holds non-tensor entries")
    return layout, encoder


def _find_heads(config: Any) -> int | None:
    """num_heads from a fairseq cfg (pre-training, or the fine-tuning's pretrained_model_args)."""
    if not isinstance(config, dict):
        return None
    model = config.get("model")
    if isinstance(model, dict):
        if isinstance(model.get("num_heads"), int):
            return model["num_heads"]
        return _find_heads(model.get("pretrained_model_args"))
    return None


def architecture(state: dict[str, torch.Tensor], heads: int | None, source: str) -> dict[str, Any]:
    """Width, depth, MLP width, patch size and position-table length from the tensor shapes."""
    try:
        proj = state[PREFIX + "local_encoder.proj.weight"]
        positions = state[PREFIX + "fixed_positional_encoder.positions"]
        fc1 = state["blocks.0.mlp.fc1.weight"]
    except KeyError as exc:
        raise CheckpointError(f"{source}: EAT weight {exc.args[0]} is missing") from None
    if any(k.startswith(PREFIX + "context_encoder.blocks.") for k in state) or "norm.weight" in state:
        raise CheckpointError(f"{source}: prenet blocks / pre-norm encoders are not EAT's configuration")
    dim, channels, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[2])
    if channels != 1 or proj.shape[2] != proj.shape[3]:
        raise CheckpointError(f"{source}: patch embedding {tuple(proj.shape)} is not a 1-channel square patch")
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    freq_patches = FBANK.num_mel_bins // patch
    if heads is None:
        heads = max(1, dim // 64)
        log.warning("%s: no head count in the checkpoint; assuming 64-d heads (%d heads)", source, heads)
    return {"embed_dim": dim, "depth": depth, "num_heads": int(heads), "mlp_dim": int(fc1.shape[0]),
            "patch": patch, "max_length": int(positions.shape[1]) // freq_patches, "norm_eps": 1e-6}


def load_eat(path: Path) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(layout, architecture, state dict under our names) from any supported checkpoint file."""
    config: Any = None
    if path.is_dir():  # a downloaded Hugging Face model folder
        path = hugging_face_weight_file(path)
    loaded = read_checkpoint(path)
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        state, config = loaded["model"], loaded.get("cfg")
    else:
        state = loaded  # a bare state dict (Hugging Face model.safetensors or pytorch_model.bin)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not an EAT checkpoint (no state dict)")
    layout, encoder = _layout(state, str(path))
    heads = _find_heads(config)
    hf_config = path.parent / "config.json"
    if heads is None and layout == "Hugging Face" and hf_config.is_file():
        try:
            heads = int(json.loads(hf_config.read_text())["num_heads"])
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{hf_config}: no integer num_heads in the Hugging Face config") from None
    return layout, architecture(encoder, heads, str(path)), encoder


def build_model(arch: dict[str, Any], state: dict[str, torch.Tensor] | None, source: str) -> Eat:
    if arch["embed_dim"] % arch["num_heads"]:
        raise CheckpointError(f"{source}: width {arch['embed_dim']} is not divisible by {arch['num_heads']} heads")
    model = Eat(arch)
    if state is None:
        table = sincos_positions(arch["embed_dim"], arch["max_length"], FBANK.num_mel_bins // arch["patch"])
        model.modality_encoders["IMAGE"].fixed_positional_encoder.positions.data.copy_(torch.from_numpy(table)[None])
        nn.init.normal_(model.modality_encoders["IMAGE"].extra_tokens, std=0.02)
    else:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{source}: weights do not fit the EAT architecture ({summarise_load_error(exc)})") from None
    patches = (TARGET_FRAMES // arch["patch"]) * (FBANK.num_mel_bins // arch["patch"])
    if model.modality_encoders["IMAGE"].fixed_positional_encoder.positions.shape[1] < patches:
        raise CheckpointError(f"{source}: the position table is shorter than {patches} patches (10 s)")
    return model.eval()


def build(args: argparse.Namespace) -> tuple[nn.Module, BackboneMetadata]:
    if args.random_init:
        arch, state, layout, source = dict(BASE), None, "random-init (base)", "random-init"
    else:
        layout, arch, state = load_eat(args.checkpoint)
        source = str(args.checkpoint)
    torch.manual_seed(0)
    model = build_model(arch, state, source)
    layer = resolve_layer(getattr(args, "layer", None), arch["depth"], source)
    pooling = getattr(args, "pooling", None) or "cls"
    log.info("EAT %s: %s", layout, arch)
    frontend = (f"x-mean(x); {FBANK.describe()}; padded to {TARGET_FRAMES} frames; (mel+{-NORM_MEAN})/(2*{NORM_STD}); "
                f"EAT block {layer}/{arch['depth']}, {'CLS token' if pooling == 'cls' else 'mean over patch tokens'}")
    meta = metadata("eat", SAMPLE_RATE, arch["embed_dim"], frontend, LICENCE)
    return EatBackbone(model, layer, pooling).eval(), meta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layer", type=int, default=None,
                        help="transformer block whose output is pooled, 1..depth (default: the last)")
    parser.add_argument("--pooling", choices=POOLINGS, default="cls",
                        help="CLS token (the official utterance feature, default) or mean over patch tokens")
