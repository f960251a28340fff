"""BEATs (Chen et al. 2022, microsoft/unilm ``beats/``) as a waveform-in, embedding-out model.

Facts taken from the official code (MIT): the input is multiplied by 2**15 and turned into a
128-bin Kaldi fbank (25/10 ms, povey window, pre-emphasis 0.97, snip edges), normalised with
``(fbank - 15.41663) / (2 * 6.55582)``; a 16x16 conv patch embedding (``embed_dim`` channels,
LayerNorm, linear projection to ``encoder_embed_dim``); a convolutional positional embedding
(weight-normalised grouped Conv1d, kernel ``conv_pos``, GELU); post-norm transformer layers with
DeepNorm residual scaling ``(2 L)^(1/4)``, a bucketed relative position bias shared by all
layers (T5 buckets, ``num_buckets``/``max_distance``) gated per query by ``grep_linear`` /
``grep_a``. The official checkpoint is ``{'cfg': dict, 'model': state_dict}``; the module names
here mirror the official ones, so that state dict loads key for key (``strict=True``).

The embedding is the mean over all tokens of the chosen layer (default the last). A 10 s
window gives 998 fbank frames -> 62 x 8 = 496 tokens; the relative-position buckets are a
constant for that length, so the graph takes exactly one window.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from export.checkpoint import read_checkpoint, summarise_load_error
from export.contract import metadata
from export.kaldi import FbankOptions, KaldiFbank
from monitor.errors import CheckpointError
from monitor.scoring.metadata import BackboneMetadata

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
FBANK = FbankOptions(sample_rate=SAMPLE_RATE, num_mel_bins=128, window_type="povey")
FBANK_MEAN = 15.41663
FBANK_STD = 6.55582
INPUT_SCALE = 2.0**15
LICENCE = "BEATs: MIT (microsoft/unilm, code and checkpoints; Chen et al., ICML 2023)"
SUMMARY = "BEATs audio transformer, 16 kHz, 768-d mean over tokens (microsoft/unilm)"
CHECKPOINT = ("an official BEATs .pt from the unilm beats README ({'cfg': ..., 'model': ...}), "
              "pre-trained or AudioSet fine-tuned, e.g. BEATs_iter3_plus_AS2M.pt")

# The official BEATsConfig defaults; a checkpoint's cfg overrides them.
DEFAULTS: dict[str, Any] = {
    "input_patch_size": -1, "embed_dim": 512, "conv_bias": False,
    "encoder_layers": 12, "encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12, "activation_fn": "gelu",
    "layer_norm_first": False, "deep_norm": False,
    "conv_pos": 128, "conv_pos_groups": 16,
    "relative_position_embedding": False, "num_buckets": 320, "max_distance": 1280,
    "gru_rel_pos": False, "finetuned_model": False, "predictor_class": 527,
}
# Settings that change the architecture. Other cfg entries (dropouts, layerdrop, gradient decay)
# only matter for training.
ACTIVATIONS = ("gelu", "gelu_accurate", "relu")

# A BEATs-base layout small enough for tests: the official structure with few, narrow layers.
SMALL_CONFIG: dict[str, Any] = {
    "input_patch_size": 16, "embed_dim": 32, "conv_bias": False,
    "encoder_layers": 2, "encoder_embed_dim": 48, "encoder_ffn_embed_dim": 96,
    "encoder_attention_heads": 4, "activation_fn": "gelu", "layer_norm_first": False,
    "deep_norm": True, "conv_pos": 16, "conv_pos_groups": 4,
    "relative_position_embedding": True, "num_buckets": 320, "max_distance": 800,
    "gru_rel_pos": True, "finetuned_model": False,
}
# BEATs_iter3 / iter3+ (the released ViT-B models), for --random-init and benchmarks.
BASE_CONFIG: dict[str, Any] = {
    **SMALL_CONFIG, "embed_dim": 512, "encoder_layers": 12, "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072, "encoder_attention_heads": 12, "conv_pos": 128, "conv_pos_groups": 16,
}


def window_tokens(cfg: dict[str, Any], window_samples: int) -> tuple[int, int]:
    """(time patches, frequency patches) of one window."""
    p = int(cfg["input_patch_size"])
    return FBANK.num_frames(window_samples) // p, FBANK.num_mel_bins // p


def relative_buckets(length: int, num_buckets: int, max_distance: int) -> torch.Tensor:
    """[length, length] bucket index of key position j relative to query position i.

    T5's bidirectional scheme as BEATs computes it: half the buckets per direction, exact
    buckets for distances below a quarter of ``num_buckets``, logarithmic ones up to
    ``max_distance``. Computed once in eager torch (float32, as the official code), never in
    the graph, so onnxruntime's log cannot move a distance across a bucket boundary.
    """
    offsets = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    half = num_buckets // 2
    buckets = (offsets > 0).long() * half
    distance = offsets.abs()
    exact = half // 2
    log_part = exact + (
        torch.log(distance.float() / exact) / math.log(max_distance / exact) * (half - exact)
    ).long()
    log_part = torch.clamp(log_part, max=half - 1)
    return buckets + torch.where(distance < exact, distance, log_part)


class WeightNormConv1d(nn.Module):
    """Conv1d with ``torch.nn.utils.weight_norm(dim=2)`` parameters (``weight_g``, ``weight_v``)
    computed explicitly, so the graph needs no hook and the checkpoint keys match."""

    def __init__(self, channels: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.randn(channels, channels // groups, kernel) * 0.02)
        self.bias = nn.Parameter(torch.zeros(channels))
        self.groups = groups
        self.padding = kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.weight_v.square().sum(dim=(0, 1), keepdim=True).sqrt()
        weight = self.weight_v * (self.weight_g / norm)
        return F.conv1d(x, weight, self.bias, padding=self.padding, groups=self.groups)


class SelfAttention(nn.Module):
    """Multi-head self-attention with BEATs' gated relative position bias (batch first)."""

    def __init__(self, cfg: dict[str, Any], shared_bias: nn.Embedding | None) -> None:
        super().__init__()
        dim, heads = int(cfg["encoder_embed_dim"]), int(cfg["encoder_attention_heads"])
        if dim % heads:
            raise CheckpointError(f"encoder_embed_dim {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.scaling = self.head_dim**-0.5
        if shared_bias is not None:
            self.relative_attention_bias = shared_bias
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.gated = bool(cfg["gru_rel_pos"])
        if self.gated:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor | None) -> torch.Tensor:
        batch, length, dim = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, length, self.heads, self.head_dim).transpose(1, 2)

        q = split(self.q_proj(x))
        k, v = split(self.k_proj(x)), split(self.v_proj(x))
        scores = (q * self.scaling) @ k.transpose(-1, -2)  # [B, H, T, T]
        if position_bias is not None:
            if self.gated:
                gates = torch.sigmoid(self.grep_linear(q).reshape(batch, self.heads, length, 2, 4).sum(-1))
                gate_a, gate_b = gates[..., 0:1], gates[..., 1:2]
                position_bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * position_bias
            scores = scores + position_bias
        weights = torch.softmax(scores, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(batch, length, dim)
        return self.out_proj(out)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any], shared_bias: nn.Embedding | None) -> None:
        super().__init__()
        dim, ffn = int(cfg["encoder_embed_dim"]), int(cfg["encoder_ffn_embed_dim"])
        self.self_attn = SelfAttention(cfg, shared_bias)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.layer_norm_first = bool(cfg["layer_norm_first"])
        self.alpha = (2.0 * int(cfg["encoder_layers"])) ** 0.25 if cfg["deep_norm"] else 1.0
        self.activation = str(cfg["activation_fn"])

    def act(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu":
            return torch.relu(x)
        return F.gelu(x, approximate="tanh" if self.activation == "gelu_accurate" else "none")

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor | None) -> torch.Tensor:
        if self.layer_norm_first:
            x = x + self.self_attn(self.self_attn_layer_norm(x), position_bias)
            return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x * self.alpha + self.self_attn(x, position_bias))
        return self.final_layer_norm(x * self.alpha + self.fc2(self.act(self.fc1(x))))


class Encoder(nn.Module):
    def __init__(self, cfg: dict[str, Any], max_tokens: int) -> None:
        super().__init__()
        dim = int(cfg["encoder_embed_dim"])
        self.pos_conv = nn.Sequential(WeightNormConv1d(dim, int(cfg["conv_pos"]), int(cfg["conv_pos_groups"])))
        self.trim = 1 if int(cfg["conv_pos"]) % 2 == 0 else 0
        shared = None
        if cfg["relative_position_embedding"]:
            # One table for all layers: the official model shares layer 0's module, so each
            # layer's key holds the same tensor in the checkpoint.
            shared = nn.Embedding(int(cfg["num_buckets"]), int(cfg["encoder_attention_heads"]))
            buckets = relative_buckets(max_tokens, int(cfg["num_buckets"]), int(cfg["max_distance"]))
            self.register_buffer("buckets", buckets, persistent=False)
        self.shared_bias = shared is not None
        self.layers = nn.ModuleList(EncoderLayer(cfg, shared) for _ in range(int(cfg["encoder_layers"])))
        self.layer_norm = nn.LayerNorm(dim)
        self.layer_norm_first = bool(cfg["layer_norm_first"])

    def forward(self, x: torch.Tensor, num_layers: int) -> torch.Tensor:
        conv = self.pos_conv(x.transpose(1, 2))
        if self.trim:
            conv = conv[:, :, : -self.trim]
        x = x + F.gelu(conv).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        bias = None
        if self.shared_bias:
            length = x.shape[1]
            table = self.layers[0].self_attn.relative_attention_bias.weight
            # index_select rather than the Embedding call: dynamo names an embedding node's
            # output "embedding", which would clash with the graph output of that name.
            index = self.buckets[:length, :length].reshape(-1)
            bias = table.index_select(0, index).reshape(length, length, -1).permute(2, 0, 1).unsqueeze(0)  # [1, H, T, T]
        for layer in self.layers[:num_layers]:
            x = layer(x, bias)
        if self.layer_norm_first and num_layers == len(self.layers):
            x = self.layer_norm(x)
        return x


class Beats(nn.Module):
    """The official BEATs module tree (same parameter names), fbank in, token features out."""

    def __init__(self, cfg: dict[str, Any], max_tokens: int) -> None:
        super().__init__()
        embed, dim, patch = int(cfg["embed_dim"]), int(cfg["encoder_embed_dim"]), int(cfg["input_patch_size"])
        self.post_extract_proj = nn.Linear(embed, dim) if embed != dim else None
        self.patch_embedding = nn.Conv2d(1, embed, kernel_size=patch, stride=patch, bias=bool(cfg["conv_bias"]))
        self.encoder = Encoder(cfg, max_tokens)
        self.layer_norm = nn.LayerNorm(embed)
        if cfg["finetuned_model"]:
            # The AudioSet classifier: loaded so the file is checked key for key, then dropped.
            self.predictor = nn.Linear(dim, int(cfg["predictor_class"]))

    def forward(self, fbank: torch.Tensor, num_layers: int) -> torch.Tensor:
        """Normalised fbank [B, frames, 128] -> tokens [B, T, encoder_embed_dim]."""
        x = self.patch_embedding(fbank.unsqueeze(1))
        x = self.layer_norm(x.flatten(2).transpose(1, 2))
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        return self.encoder(x, num_layers)


class BeatsBackbone(nn.Module):
    """Waveform [B, 160000] at 16 kHz in [-1, 1] -> mean over tokens of one layer [B, D]."""

    def __init__(self, model: Beats, layer: int) -> None:
        super().__init__()
        self.fbank = KaldiFbank(FBANK)
        self.model = model
        self.layer = layer

    def tokens(self, waveform: torch.Tensor) -> torch.Tensor:
        fbank = (self.fbank(waveform * INPUT_SCALE) - FBANK_MEAN) / (2.0 * FBANK_STD)
        return self.model(fbank, self.layer)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.tokens(waveform).mean(dim=1)


def parse_config(raw: Any, source: str) -> dict[str, Any]:
    """The official defaults overridden by the checkpoint's cfg, checked for what we support."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: 'cfg' is not a dict of BEATs settings")
    cfg = {**DEFAULTS, **raw}
    for key, default in DEFAULTS.items():
        value = cfg[key]
        ok = isinstance(value, str) if isinstance(default, str) else (
            isinstance(value, (bool, int)) if isinstance(default, bool) else isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise CheckpointError(f"{source}: cfg['{key}'] is {value!r}, expected a {type(default).__name__}")
    if int(cfg["input_patch_size"]) <= 0:
        raise CheckpointError(f"{source}: cfg has no input_patch_size (not a BEATs model checkpoint?)")
    if cfg["activation_fn"] not in ACTIVATIONS:
        raise CheckpointError(f"{source}: activation_fn {cfg['activation_fn']!r} is not supported ({', '.join(ACTIVATIONS)})")
    if cfg["deep_norm"] and cfg["layer_norm_first"]:
        raise CheckpointError(f"{source}: deep_norm with layer_norm_first is not a BEATs configuration")
    return cfg


def load_beats(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read an official checkpoint: (cfg with defaults, state dict)."""
    loaded = read_checkpoint(path)
    if not (isinstance(loaded, dict) and "cfg" in loaded and "model" in loaded):
        raise CheckpointError(f"{path}: not a BEATs checkpoint (expected a dict with 'cfg' and 'model')")
    state = loaded["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'model' is not a state dict")
    return parse_config(loaded["cfg"], str(path)), dict(state)


def build_model(cfg: dict[str, Any], state: dict[str, torch.Tensor] | None, source: str) -> Beats:
    """Our module for ``cfg``; with ``state``, loaded strictly (every key, every shape)."""
    time_patches, freq_patches = window_tokens(cfg, int(SAMPLE_RATE * 10.0))
    model = Beats(cfg, time_patches * freq_patches)
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{source}: weights do not fit the BEATs architecture of its cfg ({summarise_load_error(exc)})") from None
    if hasattr(model, "predictor"):
        del model.predictor
    return model.eval()


def resolve_layer(requested: int | None, total: int, source: str) -> int:
    if requested is None:
        return total
    if not 1 <= requested <= total:
        raise CheckpointError(f"{source}: --layer must be between 1 and {total}, got {requested}")
    return requested


def build(args: argparse.Namespace) -> tuple[nn.Module, BackboneMetadata]:
    if args.random_init:
        cfg, state, source = parse_config(dict(BASE_CONFIG), "random-init"), None, "random-init"
    else:
        cfg, state = load_beats(args.checkpoint)
        source = str(args.checkpoint)
    torch.manual_seed(0)
    model = build_model(cfg, state, source)
    total = int(cfg["encoder_layers"])
    layer = resolve_layer(getattr(args, "layer", None), total, source)
    frontend = (f"x*2^15; {FBANK.describe()}; (fbank-{FBANK_MEAN})/(2*{FBANK_STD}); "
                f"BEATs layer {layer}/{total}, mean over {int(math.prod(window_tokens(cfg, 160000)))} tokens")
    meta = metadata("beats", SAMPLE_RATE, int(cfg["encoder_embed_dim"]), frontend, LICENCE)
    return BeatsBackbone(model, layer).eval(), meta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layer", type=int, default=None,
                        help="transformer layer whose output is averaged, 1..L (default: the last)")
