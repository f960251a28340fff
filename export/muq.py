"""MuQ (tencent-ailab/MuQ, PyPI ``muq``; code MIT, weights CC BY-NC 4.0) as a waveform-in,
embedding-out model.

Facts taken from the official package: 24 kHz audio; torchaudio's power mel spectrogram with
n_fft = window = 2048, hop 240, 128 HTK bands 0-12000 Hz without filter normalisation, centred
with reflect padding; ``10 log10(max(S, 1e-10))`` (no dB floor); the last frame dropped;
``(x - mean) / std`` with the two numbers in the config's ``stat``; a convolutional subsampler
(two residual 3x3 conv blocks with stride 2 in frequency and 2 in time for 25 Hz labels, then a
linear layer from channels x bands/4 to the model width); the wav2vec2-conformer encoder of
``transformers`` with rotary positions (applied, as there, to the block's input before the query
and key projections), each block = half-step feed-forward, self-attention, convolution module
(GLU, depthwise conv, BatchNorm, activation), half-step feed-forward, LayerNorm; a final LayerNorm.
That encoder owns a convolutional position embedding that its forward never applies: the
checkpoint's ``pos_conv_embed`` tensors are therefore left out, as are the pre-training heads
(``linear``, ``cls_token``, quantiser or RVQ, reconstruction projection).

Embedding: the mean over time of the last hidden state (250 frames x 1024 for 10 s).

A checkpoint is the Hugging Face folder as published (``OpenMuQ/MuQ-large-msd-iter``):
``config.json`` (the package's ``MuQConfig``: sizes, ``stat``, ``w2v2_config``) and
``model.safetensors`` (or ``pytorch_model.bin``), keys under ``model.``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from export.checkpoint import (
    hugging_face_weight_file,
    load_strict,
    randomise_norms,
    read_checkpoint,
)
from export.contract import metadata
from export.frontend import ReflectPowerMel
from monitor.errors import CheckpointError, first_line
from monitor.scoring.metadata import BackboneMetadata

log = logging.getLogger(__name__)

SAMPLE_RATE = 24000
N_FFT = 2048
AMIN = 1e-10
MIN_SECONDS = 1.0
LICENCE = ("MuQ: code MIT, weights CC BY-NC 4.0 - NON-COMMERCIAL USE ONLY (Tencent AI Lab; "
           "Hugging Face OpenMuQ/MuQ-large-msd-iter)")
# The pre-training recipe's statistics of the 2048-point dB mel (used when a config has none).
DEFAULT_STAT = {"melspec_2048_mean": 6.768444971712967, "melspec_2048_std": 18.417922652295623}
ACTIVATIONS = {"swish": nn.SiLU, "silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU}
# Checkpoint tensors that are not part of the feature path (see the module docstring).
IGNORED_PREFIXES = ("model.linear.", "model.cls_token", "model.quantizer_", "model.rvq.", "model.recon_proj.",
                    "model.conformer.pos_conv_embed.")


@dataclass(frozen=True)
class MuQConfig:
    """The fields of the package's MuQConfig and its ``w2v2_config`` that inference depends on."""

    hop_length: int = 240
    n_mels: int = 128
    conv_dim: int = 512
    encoder_dim: int = 1024
    encoder_depth: int = 12
    label_rate: int = 25
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    conv_depthwise_kernel_size: int = 31
    hidden_act: str = "swish"
    layer_norm_eps: float = 1e-5
    rotary_embedding_base: float = 10000.0
    stat: dict = field(default_factory=lambda: dict(DEFAULT_STAT))

    @property
    def time_strides(self) -> tuple[int, int]:
        n_fold = 100 // self.label_rate
        strides = {4: (2, 2), 2: (2, 1)}.get(n_fold)
        if strides is None:
            raise ValueError(f"label_rate {self.label_rate} is not one MuQ supports (25 or 50)")
        return strides

    @classmethod
    def from_json(cls, raw: dict) -> MuQConfig:
        w2v2 = dict(raw.get("w2v2_config") or {})
        position = w2v2.get("position_embeddings_type", "rotary")
        if position != "rotary":
            raise ValueError(f"position_embeddings_type {position!r} is not supported (MuQ uses 'rotary')")
        features = raw.get("features", ["melspec_2048"])
        if list(features) != ["melspec_2048"]:
            raise ValueError(f"features {features!r} are not supported (MuQ uses ['melspec_2048'])")
        if raw.get("is_flash"):
            raise ValueError("is_flash checkpoints (the package's flash conformer) are not supported")
        stat = dict(raw.get("stat") or DEFAULT_STAT)
        if "melspec_2048_mean" not in stat or "melspec_2048_std" not in stat:
            raise ValueError("config 'stat' lacks melspec_2048_mean / melspec_2048_std")
        defaults = cls()
        config = cls(
            hop_length=int(raw.get("hop_length", defaults.hop_length)),
            n_mels=int(raw.get("n_mels", defaults.n_mels)),
            conv_dim=int(raw.get("conv_dim", defaults.conv_dim)),
            encoder_dim=int(raw.get("encoder_dim", defaults.encoder_dim)),
            encoder_depth=int(raw.get("encoder_depth", defaults.encoder_depth)),
            label_rate=int(raw.get("label_rate", defaults.label_rate)),
            num_attention_heads=int(w2v2.get("num_attention_heads", defaults.num_attention_heads)),
            intermediate_size=int(w2v2.get("intermediate_size", defaults.intermediate_size)),
            conv_depthwise_kernel_size=int(w2v2.get("conv_depthwise_kernel_size", defaults.conv_depthwise_kernel_size)),
            hidden_act=str(w2v2.get("hidden_act", defaults.hidden_act)),
            layer_norm_eps=float(w2v2.get("layer_norm_eps", defaults.layer_norm_eps)),
            rotary_embedding_base=float(w2v2.get("rotary_embedding_base", defaults.rotary_embedding_base)),
            stat={k: float(stat[k]) for k in ("melspec_2048_mean", "melspec_2048_std")},
        )
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported ({', '.join(ACTIVATIONS)})")
        config.time_strides  # noqa: B018 - validates label_rate
        return config


class Res2d(nn.Module):
    """3x3 conv-BN-ReLU-conv-BN with a strided 3x3 conv-BN shortcut, then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: tuple[int, int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, stride=stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.has_shortcut = in_ch != out_ch or stride[0] > 1
        if self.has_shortcut:
            self.conv3 = nn.Conv2d(in_ch, out_ch, 3, padding=1, stride=stride)
            self.bn3 = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        if self.has_shortcut:
            x = self.bn3(self.conv3(x))
        return torch.relu(x + out)


class ConvSubsampling(nn.Module):
    """[B, mels, frames] -> [B, frames / 4, width]."""

    def __init__(self, config: MuQConfig) -> None:
        super().__init__()
        s1, s2 = config.time_strides
        self.conv = nn.Sequential(Res2d(1, config.conv_dim, (2, s1)), Res2d(config.conv_dim, config.conv_dim, (2, s2)))
        self.linear = nn.Linear(config.conv_dim * (config.n_mels // 4), config.encoder_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.unsqueeze(1))  # [B, C, F, T]
        batch, channels, bands, frames = x.shape
        return self.linear(x.permute(0, 3, 1, 2).reshape(batch, frames, channels * bands))


class Rotary(nn.Module):
    """cos / sin tables [T, 1, 1, head] for positions 0..T-1 (computed from the length, so the
    graph takes any length)."""

    def __init__(self, head_size: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.int64).float() / head_size))
        self.register_buffer("inv_freq", inv_freq)

    def forward(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(length, dtype=self.inv_freq.dtype, device=self.inv_freq.device)
        angles = positions[:, None] * self.inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)[:, None, None, :]
        return angles.cos(), angles.sin()


class FeedForward(nn.Module):
    def __init__(self, config: MuQConfig) -> None:
        super().__init__()
        self.intermediate_dense = nn.Linear(config.encoder_dim, config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]()
        self.output_dense = nn.Linear(config.intermediate_size, config.encoder_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dense(self.act(self.intermediate_dense(x)))


class ConvolutionModule(nn.Module):
    def __init__(self, config: MuQConfig) -> None:
        super().__init__()
        d, k = config.encoder_dim, config.conv_depthwise_kernel_size
        if k % 2 == 0:
            raise ValueError("conv_depthwise_kernel_size must be odd")
        self.layer_norm = nn.LayerNorm(d)
        self.pointwise_conv1 = nn.Conv1d(d, 2 * d, 1, bias=False)
        self.depthwise_conv = nn.Conv1d(d, d, k, padding=(k - 1) // 2, groups=d, bias=False)
        self.batch_norm = nn.BatchNorm1d(d)
        self.act = ACTIVATIONS[config.hidden_act]()
        self.pointwise_conv2 = nn.Conv1d(d, d, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.glu(self.pointwise_conv1(self.layer_norm(x).transpose(1, 2)), dim=1)
        x = self.act(self.batch_norm(self.depthwise_conv(x)))
        return self.pointwise_conv2(x).transpose(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, config: MuQConfig) -> None:
        super().__init__()
        d = config.encoder_dim
        self.num_heads = config.num_attention_heads
        self.head_size = d // self.num_heads
        self.linear_q = nn.Linear(d, d)
        self.linear_k = nn.Linear(d, d)
        self.linear_v = nn.Linear(d, d)
        self.linear_out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, d = x.shape
        heads, size = self.num_heads, self.head_size
        # Rotary positions rotate the block input, per head slice, before the q / k projections.
        per_head = x.reshape(batch, length, heads, size).transpose(0, 1)  # [T, B, H, hs]
        half = size // 2
        rotated = torch.cat([-per_head[..., half:], per_head[..., :half]], dim=-1)
        qk_input = (per_head * cos + rotated * sin).transpose(0, 1).reshape(batch, length, d)
        q = self.linear_q(qk_input).reshape(batch, length, heads, size).transpose(1, 2)
        k = self.linear_k(qk_input).reshape(batch, length, heads, size).transpose(1, 2)
        v = self.linear_v(x).reshape(batch, length, heads, size).transpose(1, 2)
        weights = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(size), dim=-1)
        return self.linear_out((weights @ v).transpose(1, 2).reshape(batch, length, d))


class ConformerLayer(nn.Module):
    def __init__(self, config: MuQConfig) -> None:
        super().__init__()
        d = config.encoder_dim
        self.ffn1_layer_norm = nn.LayerNorm(d)
        self.ffn1 = FeedForward(config)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.self_attn = SelfAttention(config)
        self.conv_module = ConvolutionModule(config)
        self.ffn2_layer_norm = nn.LayerNorm(d)
        self.ffn2 = FeedForward(config)
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ffn1(self.ffn1_layer_norm(x))
        x = x + self.self_attn(self.self_attn_layer_norm(x), cos, sin)
        x = x + self.conv_module(x)
        x = x + 0.5 * self.ffn2(self.ffn2_layer_norm(x))
        return self.final_layer_norm(x)


class Conformer(nn.Module):
    def __init__(self, config: MuQConfig) -> None:
        super().__init__()
        self.embed_positions = Rotary(config.encoder_dim // config.num_attention_heads, config.rotary_embedding_base)
        self.layer_norm = nn.LayerNorm(config.encoder_dim, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList([ConformerLayer(config) for _ in range(config.encoder_depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self.embed_positions(x.shape[1])
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.layer_norm(x)


class MuQCore(nn.Module):
    """Holds ``conv`` and ``conformer`` under the names the package's ``MuQModel`` gives them."""

    def __init__(self, config: MuQConfig) -> None:
        super().__init__()
        self.conv = ConvSubsampling(config)
        self.conformer = Conformer(config)


class MuQEncoder(nn.Module):
    """Waveform [B, T] at 24 kHz -> last hidden state [B, T', 1024] (``hidden``) or its mean."""

    def __init__(self, config: MuQConfig = MuQConfig()) -> None:
        super().__init__()
        if config.encoder_dim % config.num_attention_heads:
            raise ValueError(f"encoder_dim {config.encoder_dim} is not divisible by {config.num_attention_heads} heads")
        self.config = config
        self.mel = ReflectPowerMel(SAMPLE_RATE, N_FFT, config.hop_length, config.n_mels, 0.0, SAMPLE_RATE // 2,
                                   unit_sum=False)
        self.model = MuQCore(config)

    def hidden(self, waveform: torch.Tensor) -> torch.Tensor:
        db = 10.0 * torch.log10(torch.clamp(self.mel(waveform), min=AMIN))[:, :-1, :]  # the package drops the last frame
        stat = self.config.stat
        x = ((db - stat["melspec_2048_mean"]) / stat["melspec_2048_std"]).transpose(1, 2)  # [B, mels, frames]
        return self.model.conformer(self.model.conv(x))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.hidden(waveform).mean(dim=1)


def frontend_description(config: MuQConfig) -> str:
    return (
        f"24 kHz; power mel {config.n_mels} HTK bands 0-12000 Hz, n_fft {N_FFT}, hop {config.hop_length}, centred "
        f"(reflect), 10*log10, last frame dropped, (x-{config.stat['melspec_2048_mean']:.4f})/"
        f"{config.stat['melspec_2048_std']:.4f}; conv subsampling + conformer {config.encoder_dim}x"
        f"{config.encoder_depth} (rotary); mean over time of the last hidden state"
    )


# --- the Hugging Face folder ----------------------------------------------------------------------

def read_folder(path: Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """(config.json, weights, weight file) of a Hugging Face folder (or of the weight file's folder)."""
    folder = path if path.is_dir() else path.parent
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path}: no config.json beside the weights (pass the Hugging Face folder)")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: unreadable ({first_line(exc)})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path}: not a MuQ config")
    weight_file = hugging_face_weight_file(folder) if path.is_dir() else path
    weights = read_checkpoint(weight_file)
    if not isinstance(weights, dict):
        raise CheckpointError(f"{weight_file}: not a state dict")
    return raw, weights, weight_file


def load_muq(path: Path) -> MuQEncoder:
    raw, weights, weight_file = read_folder(path)
    try:
        config = MuQConfig.from_json(raw)
        # Its sizes come from config.json: a head count or kernel they cannot take is the file's fault.
        model = MuQEncoder(config)  # its state_dict has the package's layout: model.conv.*, model.conformer.*
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    ignored = [k for k in weights if k.startswith(IGNORED_PREFIXES)]
    if ignored:
        log.info("%s: leaving out %d tensors outside the feature path (e.g. %s)", weight_file, len(ignored), ignored[0])
    load_strict(model, {k: v for k, v in weights.items() if not k.startswith(IGNORED_PREFIXES)}, weight_file, "MuQ")
    return model.eval()


def random_model(config: MuQConfig = MuQConfig(), seed: int = 0) -> MuQEncoder:
    torch.manual_seed(seed)
    model = MuQEncoder(config)
    randomise_norms(model)
    return model.eval()


SUMMARY = "MuQ music SSL conformer (24 kHz, 1024-d); weights NON-COMMERCIAL (CC BY-NC 4.0)"
CHECKPOINT = "the Hugging Face folder OpenMuQ/MuQ-large-msd-iter (config.json + model.safetensors)"


def build(args: argparse.Namespace) -> tuple[nn.Module, BackboneMetadata]:
    model = random_model() if args.random_init else load_muq(args.checkpoint)
    c = model.config
    return model, metadata("muq", SAMPLE_RATE, c.encoder_dim, frontend_description(c), LICENCE, MIN_SECONDS)
