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
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from export.aisfx import CheckpointError, _first_line
from export.frontend import PowerMel
from monitor.metadata import BackboneMetadata

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


class ReflectPowerMel(PowerMel):
    """``PowerMel`` with the centring torchaudio and nnAudio use by default: reflect padding of
    ``n_fft // 2`` on both sides instead of zeros (the frames, window, FFT and filters are
    PowerMel's). Needs more than ``n_fft // 2`` samples."""

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        pad = self.n_fft // 2
        padded = nn.functional.pad(waveform.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
        frames = padded.unfold(-1, self.n_fft, self.hop_length)  # [B, frames, n_fft]
        spectrum = torch.fft.rfft(frames * self.window, dim=-1)
        return (spectrum.real.square() + spectrum.imag.square()) @ self.filters


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (timm's parameter names)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        head = dim // self.num_heads
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, head).permute(2, 0, 3, 1, 4)
        weights = torch.softmax((q * head**-0.5) @ k.transpose(-2, -1), dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)); optional layer
    scale. The parameter names are timm's, which both Dasheng and M2D use."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 layer_scale: bool = False, eps: float = LAYER_NORM_EPS) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, patch: tuple[int, int], stride: tuple[int, int]) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


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
            Block(c.embed_dim, c.num_heads, c.mlp_ratio, c.qkv_bias, layer_scale) for _ in range(c.depth)
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


def read_checkpoint(path: Path) -> object:
    """torch.load with ``weights_only`` first; a file that pickles other objects is loaded in
    full only after a warning (only load checkpoints you trust)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        log.warning("%s pickles Python objects besides tensors; loading it in full (only load checkpoints you trust)", path)
    except Exception as exc:  # torch raises zip, OS and pickle errors alike
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint ({_first_line(exc)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint ({_first_line(exc)})") from None


def load_strict(module: nn.Module, state: dict, path: Path, what: str) -> None:
    """load_state_dict(strict=True) with a one-line error naming the first differences."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise CheckpointError(f"{path}: not a {what} checkpoint: {'; '.join(parts)}")
    module.load_state_dict(state, strict=True)


def _check_frontend_buffers(model: DashengEncoder, state: dict, path: Path) -> None:
    """The checkpoint's own window and mel filters (torchaudio buffers) must be ours."""
    ours = {"front_end.0.spectrogram.window": model.mel.window, "front_end.0.mel_scale.fb": model.mel.filters}
    for key, tensor in ours.items():
        theirs = state.get(key)
        if theirs is None:
            continue
        if tuple(theirs.shape) != tuple(tensor.shape) or not torch.allclose(theirs.float(), tensor, atol=1e-5):
            raise CheckpointError(f"{path}: its frontend ({key}) differs from Dasheng's mel settings")


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
    try:
        config = config_from_checkpoint(size, dict(dump.get("config") or {}))
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
    _randomise_norms(model)
    return model.eval()


def _randomise_norms(model: nn.Module) -> None:
    """Give BatchNorm running statistics plausible non-trivial values (defaults are 0 / 1)."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(n, generator=generator))


def summary(name: str) -> str:
    size = SIZES[name]
    params = {"dasheng-base": "86M", "dasheng-0.6b": "0.6B", "dasheng-1.2b": "1.2B"}[name]
    return f"Dasheng {params} audio ViT, masked-autoencoder pretrained (16 kHz, {size.embed_dim}-d)"


def checkpoint_help(name: str) -> str:
    return f"the released {SIZES[name].file} (Zenodo record 11511780)"


def build(name: str, args: argparse.Namespace) -> tuple[nn.Module, BackboneMetadata]:
    """The registry's build: ``--checkpoint`` (or ``--random-init``) -> (module, metadata)."""
    from export.registry import metadata

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

