"""Dasheng (RicherMans/Dasheng, PyPI ``dasheng``; code and weights Apache-2.0) as a waveform-in,
embedding-out model, in three sizes.

Facts taken from the official package: 16 kHz audio; power mel spectrogram with n_fft 512,
window 512 (periodic Hann), hop 160, 64 HTK bands 0-8000 Hz without filter normalisation, centred
frames with *reflect* padding (torchaudio's ``MelSpectrogram`` defaults); ``10 log10(max(S,
1e-10))`` clamped to 120 dB below the maximum; a learned BatchNorm over the mel bands; 64 x 4
conv patches (so one token per 40 ms); learned time and frequency position tables; pre-norm ViT
blocks (LayerNorm eps 1e-6, exact GELU, qkv bias); a final LayerNorm. Inputs longer than the
1008-frame training length are cut into chunks of 252 patches that each restart the time table.

Released checkpoints (Zenodo record 11511780: ``dasheng_base.pt``, ``dasheng_06b.pt``,
``dasheng_12b.pt``) are ``{"model": state_dict, "config": model arguments}``; width, depth and
heads come from the size, as in the package's ``dasheng_base`` / ``dasheng_06B`` / ``dasheng_12B``.
Our module keeps the official parameter names, so a checkpoint loads key for key.

Embedding: the mean over the last layer's tokens (250 for a 10 s window).

Two differences, both deliberate: the 120 dB floor is taken per clip (torchaudio takes the
maximum over the whole batch when given [B, T], which makes a clip's embedding depend on the
clips batched with it; identical for batch 1); and the frontend's constant buffers
(``front_end.0.*``) are recomputed and compared with the checkpoint's rather than loaded.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from export.checkpoint import load_strict, randomise_norms, read_checkpoint
from export.contract import metadata
from export.frontend import ReflectPowerMel
from export.vit import Block, PatchEmbed
from monitor.errors import CheckpointError
from monitor.scoring.metadata import BackboneMetadata

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
N_FFT = 512
HOP = 160
N_MELS = 64
F_MIN = 0.0
F_MAX = 8000.0
TOP_DB = 120.0
AMIN = 1e-10
TARGET_LENGTH = 1008  # mel frames per chunk in training (~10 s)
PATCH = (64, 4)  # (mel bands, frames)
LAYER_NORM_EPS = 1e-6
# Shortest input the graph takes: 1 s gives 25 tokens.
MIN_SECONDS = 1.0
LICENCE = "Dasheng: code and weights Apache-2.0 (H. Dinkel et al., Interspeech 2024; github RicherMans/Dasheng)"


@dataclass(frozen=True)
class Size:
    embed_dim: int
    depth: int
    num_heads: int
    file: str  # the released checkpoint's name


SIZES = {
    "dasheng-base": Size(768, 12, 12, "dasheng_base.pt"),
    "dasheng-0.6b": Size(1280, 32, 16, "dasheng_06b.pt"),
    "dasheng-1.2b": Size(1536, 40, 24, "dasheng_12b.pt"),
}


@dataclass(frozen=True)
class DashengConfig:
    """The model arguments that change inference (the official constructor's names)."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    init_values: float | None = None  # not None: layer scale, whose gammas the checkpoint holds
    target_length: int = TARGET_LENGTH
    patch_size: tuple[int, int] = PATCH
    patch_stride: tuple[int, int] = PATCH
    pooling: str = "mean"  # "token" adds a class token in front of every chunk
    n_fft: int = N_FFT
    win_size: int = N_FFT
    hop_size: int = HOP
    n_mels: int = N_MELS
    f_min: float = F_MIN
    f_max: float = F_MAX
    center: bool = True
    top_db: float = TOP_DB

    @property
    def chunk_patches(self) -> int:
        return self.target_length // self.patch_stride[1]

    def frames(self, samples: int) -> int:
        return samples // self.hop_size + 1


# Arguments of the official constructor that only matter in training (masking, dropout). The
# constructor takes **kwargs and ignores what it does not know; so do we, with a note in the log.
_TRAINING_ONLY = {"group_masking", "time_patch_out", "freq_patch_out", "drop_rate", "attn_drop_rate",
                  "eval_avg", "mask_ratio"}
# Arguments that would select another architecture than the one implemented here.
_FIXED = {"block_type": "Block", "attention_type": "Attention", "norm_layer": None, "act_layer": None}


def config_from_checkpoint(size: Size, arguments: dict) -> DashengConfig:
    """Official constructor arguments -> our config; the size fixes width, depth and heads (the
    package passes them over whatever the file says)."""
    known = {f for f in DashengConfig.__dataclass_fields__}
    values: dict = {}
    for key, value in arguments.items():
        if key in known:
            values[key] = tuple(value) if key in ("patch_size", "patch_stride") else value
        elif key in _FIXED:
            if value != _FIXED[key]:
                raise ValueError(f"unsupported Dasheng model argument {key}={value!r}")
        elif key not in _TRAINING_ONLY:
            log.info("ignoring Dasheng model argument %s=%r (the official constructor ignores it too)", key, value)
    values.update(embed_dim=size.embed_dim, depth=size.depth, num_heads=size.num_heads)
    config = DashengConfig(**values)
    if config.win_size != config.n_fft or not config.center:
        raise ValueError("only win_size == n_fft with centred frames is supported")
    if config.pooling not in ("mean", "token"):
        raise ValueError(f"unsupported Dasheng pooling {config.pooling!r}")
    return config


class DashengEncoder(nn.Module):
    """Waveform [B, T] at 16 kHz -> tokens [B, N, D] (``forward_tokens``) or their mean [B, D].

    Parameter names follow the official ``AudioTransformerMAE_Encoder`` (``init_bn.1`` is its
    BatchNorm, which sits between two rearrangements there).
    """

    def __init__(self, config: DashengConfig = DashengConfig()) -> None:
        super().__init__()
        self.config = config
        c = config
        self.mel = ReflectPowerMel(SAMPLE_RATE, c.n_fft, c.hop_size, c.n_mels, c.f_min, c.f_max, unit_sum=False)
        self.init_bn = nn.Sequential(nn.Identity(), nn.BatchNorm2d(c.n_mels, momentum=0.01), nn.Identity())
        self.patch_embed = PatchEmbed(1, c.embed_dim, c.patch_size, c.patch_stride)
        grid = (c.n_mels // c.patch_stride[0], c.target_length // c.patch_stride[1])
        self.time_pos_embed = nn.Parameter(0.02 * torch.randn(1, c.embed_dim, 1, grid[1]))
        self.freq_pos_embed = nn.Parameter(0.02 * torch.randn(1, c.embed_dim, grid[0], 1))
        if c.pooling == "token":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
            self.token_pos_embed = nn.Parameter(0.02 * torch.randn(1, c.embed_dim))
        layer_scale = c.init_values is not None
        self.blocks = nn.Sequential(*[
            Block(c.embed_dim, c.num_heads, int(c.embed_dim * c.mlp_ratio), LAYER_NORM_EPS, c.qkv_bias, layer_scale)
            for _ in range(c.depth)
        ])
        self.norm = nn.LayerNorm(c.embed_dim, eps=LAYER_NORM_EPS)

    def spectrogram(self, waveform: torch.Tensor) -> torch.Tensor:
        """[B, T] -> normalised log-mel [B, 1, mels, frames]."""
        db = 10.0 * torch.log10(torch.clamp(self.mel(waveform), min=AMIN))  # [B, frames, mels]
        floor = db.amax(dim=(1, 2), keepdim=True) - self.config.top_db
        db = torch.maximum(db, floor).transpose(1, 2).unsqueeze(2)  # [B, mels, 1, frames]
        return self.init_bn[1](db).transpose(1, 2)

    def _chunk(self, x: torch.Tensor) -> torch.Tensor:
        """Patches [B, D, F, t] -> tokens [B, F*t (+1), D] after the blocks."""
        x = x + self.time_pos_embed[:, :, :, : x.shape[-1]] + self.freq_pos_embed
        x = x.flatten(2).transpose(1, 2)  # (f t) order
        if self.config.pooling == "token":
            cls = (self.cls_token + self.token_pos_embed).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)
        return self.norm(self.blocks(x))

    def forward_tokens(self, waveform: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(self.spectrogram(waveform))
        step = self.config.chunk_patches
        if patches.shape[-1] <= step:  # a window up to ~10 s: one chunk (keeps the length symbolic)
            return self._chunk(patches)
        return torch.cat([self._chunk(part) for part in patches.split(step, dim=-1)], dim=1)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(waveform).mean(dim=1)


def frontend_description(config: DashengConfig) -> str:
    return (
        f"power mel {config.n_mels} HTK bands {config.f_min:g}-{config.f_max:g} Hz, n_fft {config.n_fft}, "
        f"hop {config.hop_size}, centred (reflect); 10*log10 floored {config.top_db:g} dB below the clip's "
        f"max; BatchNorm; {config.patch_size[0]}x{config.patch_size[1]} patches, ViT "
        f"{config.embed_dim}x{config.depth}; mean over tokens"
    )


# How far the checkpoint's frontend buffers may differ from ours, relative to their largest value.
# Both are the same filters built in float32 by different code (ours in float64, then cast;
# torchaudio's in float32): up to 5.2e-6 apart here, 1.2e-5 for MuQ's. Other mel settings
# (bands, range, FFT size) differ by far more than this.
FRONTEND_RTOL = 1e-4


def _check_frontend_buffers(model: DashengEncoder, state: dict, path: Path) -> None:
    """The checkpoint's own window and mel filters (torchaudio buffers) must be ours."""
    ours = {"front_end.0.spectrogram.window": model.mel.window, "front_end.0.mel_scale.fb": model.mel.filters}
    for key, tensor in ours.items():
        theirs = state.get(key)
        if theirs is None:
            continue
        if tuple(theirs.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{path}: its frontend ({key}) has shape {list(theirs.shape)}, Dasheng's mel "
                                  f"settings give {list(tensor.shape)}")
        largest = float((theirs.float() - tensor).abs().max())
        if largest > FRONTEND_RTOL * float(tensor.abs().max()):
            raise CheckpointError(f"{path}: its frontend ({key}) differs from Dasheng's mel settings by up to "
                                  f"{largest:.3g} (allowed {FRONTEND_RTOL:g} of its largest value)")


def load_dasheng(path: Path, name: str, size: Size | None = None) -> DashengEncoder:
    """Load an official checkpoint as the size ``name`` (``size`` overrides its dimensions)."""
    size = size or SIZES[name]
    dump = read_checkpoint(path)
    if not (isinstance(dump, dict) and isinstance(dump.get("model"), dict)):
        raise CheckpointError(f"{path}: not a Dasheng checkpoint (expected a dict with 'model' and 'config')")
    weights = dump["model"]
    found = weights.get("patch_embed.proj.weight")
    if found is not None and found.shape[0] != size.embed_dim:
        others = [n for n, s in SIZES.items() if s.embed_dim == found.shape[0]]
        hint = f" (it looks like {others[0]})" if others else ""
        raise CheckpointError(f"{path}: width {found.shape[0]} is not {name}'s {size.embed_dim}{hint}")
    arguments = dump.get("config") or {}
    if not isinstance(arguments, dict):
        raise CheckpointError(f"{path}: not a Dasheng checkpoint ('config' is not a dict of model arguments)")
    try:
        config = config_from_checkpoint(size, arguments)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    model = DashengEncoder(config)
    _check_frontend_buffers(model, weights, path)
    state = {k: v for k, v in weights.items() if not k.startswith("front_end.")}
    load_strict(model, state, path, name)
    return model.eval()


def random_model(name: str, seed: int = 0) -> DashengEncoder:
    """Full-size architecture with random weights (timing, size; nothing to recognise)."""
    torch.manual_seed(seed)
    size = SIZES[name]
    model = DashengEncoder(DashengConfig(size.embed_dim, size.depth, size.num_heads))
    randomise_norms(model)
    return model.eval()


def summary(name: str) -> str:
    size = SIZES[name]
    params = {"dasheng-base": "86M", "dasheng-0.6b": "0.6B", "dasheng-1.2b": "1.2B"}[name]
    return f"Dasheng {params} audio ViT, masked-autoencoder pretrained (16 kHz, {size.embed_dim}-d)"


def checkpoint_help(name: str) -> str:
    return f"the released {SIZES[name].file} (Zenodo record 11511780)"


def build(name: str, args: argparse.Namespace) -> tuple[nn.Module, BackboneMetadata]:
    """The registry's build: ``--checkpoint`` (or ``--random-init``) -> (module, metadata)."""
    model = random_model(name) if args.random_init else load_dasheng(args.checkpoint, name)
    c = model.config
    # One chunk covers the window: the graph then also takes shorter clips as they are.
    one_chunk = c.frames(int(10 * SAMPLE_RATE)) // c.patch_stride[1] <= c.chunk_patches
    meta = metadata(name, SAMPLE_RATE, c.embed_dim, frontend_description(c), LICENCE, MIN_SECONDS if one_chunk else 0.0)
    return model, meta


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def window_tokens(seconds: float = 10.0, config: DashengConfig = DashengConfig()) -> int:
    frames = config.frames(int(round(seconds * SAMPLE_RATE)))
    return (config.n_mels // config.patch_stride[0]) * (frames // config.patch_stride[1])

