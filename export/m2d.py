"""M2D, Masked Modeling Duo (nttcslab/m2d, ``examples/portable_m2d.py``), as a waveform-in,
embedding-out model.

Facts taken from the official portable runtime: 16 kHz audio (32 kHz for the ``p32k`` weights);
nnAudio's power mel spectrogram (n_fft = window = 400, hop 160, 80 Slaney-scale bands with
Slaney area normalisation, 50-8000 Hz, periodic Hann, centred with reflect padding; 800/320 and
50-16000 Hz at 32 kHz); ``log(S + float32 eps)``; ``(x - mean) / std`` with the two numbers the
checkpoint stores as ``norm_stats`` (default [-7.1, 4.2] for the 2022 weights); a timm ViT-Base
(patch conv, class token, learned position table over the input size's patch grid, 12 pre-norm
blocks of width 768 and 12 heads, LayerNorm eps 1e-6, final LayerNorm). The input is cut into
chunks of the model's input length (1001 or 608 frames ...), the last one padded to whole
patches and given a shortened position table. Per chunk the class token is dropped and the
patch features are stacked over frequency per time step (5 x 768 = 3840 per frame).

Embedding: the mean over time of those frame features (``get_scene_embeddings``).

Released weights are ``.pth`` files inside a folder whose name encodes the sizes, e.g.
``m2d_as_vit_base-80x1001p16x16-240213_AS-FT_enconly/weights_ep69it3124-0.48494.pth``
(input 80 x 1001, patches 16 x 16, 16 kHz; ``...p16x16p32k-...`` for 32 kHz). Keys may sit
under ``model``, carry a ``backbone.`` or ``module.ar.runtime.backbone.`` prefix, and include
training-only parts (decoder, target encoder, CLAP projections), which are left out as the
official loader does.
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from export.checkpoint import load_strict, randomise_norms, read_checkpoint
from export.contract import metadata
from export.frontend import ReflectPowerMel, slaney_mel_filterbank
from export.vit import Block, PatchEmbed
from monitor.errors import CheckpointError
from monitor.scoring.metadata import BackboneMetadata

log = logging.getLogger(__name__)

EMBED_DIM = 768
DEPTH = 12
NUM_HEADS = 12
LAYER_NORM_EPS = 1e-6
N_MELS = 80
DEFAULT_NORM_STATS = (-7.1, 4.2)
LOG_EPS = float(torch.finfo(torch.float32).eps)
MIN_SECONDS = 1.0
LICENCE = ("M2D: code and weights under NTT's software licence agreement (LICENSE.pdf in nttcslab/m2d): "
           "non-commercial evaluation and research use; check it before any other use")
# STFT settings per sampling rate tag (the portable runtime's get_to_melspec).
RATES = {"16k": (16000, 400, 160, 50.0, 8000.0), "32k": (32000, 800, 320, 50.0, 16000.0)}


@dataclass(frozen=True)
class M2DConfig:
    input_size: tuple[int, int] = (80, 1001)  # (mel bands, frames per chunk)
    patch_size: tuple[int, int] = (16, 16)
    rate_tag: str = "16k"
    embed_dim: int = EMBED_DIM
    depth: int = DEPTH
    num_heads: int = NUM_HEADS

    @property
    def sample_rate(self) -> int:
        return RATES[self.rate_tag][0]

    @property
    def grid(self) -> tuple[int, int]:
        return self.input_size[0] // self.patch_size[0], self.input_size[1] // self.patch_size[1]

    @property
    def frame_dim(self) -> int:
        return self.grid[0] * self.embed_dim

    def frames(self, samples: int) -> int:
        return samples // RATES[self.rate_tag][2] + 1


def parse_release_name(name: str) -> M2DConfig:
    """``m2d_as_vit_base-80x1001p16x16-...`` -> input size, patch size and rate (``p32k``)."""
    parts = name.split("-")
    match = re.fullmatch(r"(\d+)x(\d+)p(\d+)x(\d+)(?:p(16k|32k))?(?:p\w+)*", parts[1]) if len(parts) > 1 else None
    if match is None or "vit_base" not in parts[0]:
        raise ValueError(
            f"cannot read sizes from {name!r}: keep the release folder name, e.g. "
            "m2d_as_vit_base-80x1001p16x16-240213_AS-FT_enconly/weights_*.pth"
        )
    f, t, pf, pt = (int(match.group(i)) for i in range(1, 5))
    if f != N_MELS:
        raise ValueError(f"{name!r}: {f} mel bands; the portable runtime's frontend has {N_MELS}")
    return M2DConfig((f, t), (pf, pt), match.group(5) or "16k")


class M2DEncoder(nn.Module):
    """Waveform [B, T] -> frame features [B, frames, 3840] (``frame_features``) or their mean.

    Parameter names follow timm's VisionTransformer as the portable runtime's ``LocalViT`` has
    them (``norm_stats`` included), so a checkpoint's backbone loads key for key.
    """

    def __init__(self, config: M2DConfig = M2DConfig()) -> None:
        super().__init__()
        self.config = config
        rate, n_fft, hop, f_min, f_max = RATES[config.rate_tag]
        self.mel = ReflectPowerMel(rate, n_fft, hop, N_MELS, f_min, f_max, unit_sum=False)
        self.mel.filters = torch.from_numpy(slaney_mel_filterbank(rate, n_fft, N_MELS, f_min, f_max))
        d = config.embed_dim
        self.patch_embed = PatchEmbed(1, d, config.patch_size, config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + config.grid[0] * config.grid[1], d))
        self.blocks = nn.Sequential(*[Block(d, config.num_heads, 4 * d, LAYER_NORM_EPS) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.register_buffer("norm_stats", torch.tensor(DEFAULT_NORM_STATS))

    @property
    def single_chunk(self) -> bool:
        """A 10 s window fits one chunk: the graph can then take shorter inputs too."""
        return self.config.frames(10 * self.config.sample_rate) <= self.config.input_size[1]

    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """[B, T] -> normalised log-mel [B, 1, 80, frames]."""
        x = torch.log(self.mel(waveform) + LOG_EPS).transpose(1, 2).unsqueeze(1)
        return (x - self.norm_stats[0]) / self.norm_stats[1]

    def _encode_chunk(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, 80, frames (whole patches, at most the input length)] -> [B, t, 3840]."""
        fbins, tgrid = self.config.grid
        patches = self.patch_embed(x)[..., :tgrid]  # [B, D, fbins, t]
        batch, dim, _, t = patches.shape
        tokens = patches.flatten(2).transpose(1, 2)  # (f t) order
        pos = self.pos_embed[:, 1:, :].reshape(1, fbins, tgrid, dim)[:, :, :t, :].reshape(1, fbins * t, dim)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(batch, -1, -1)
        out = self.norm(self.blocks(torch.cat([cls, tokens + pos], dim=1)))[:, 1:, :]
        return out.reshape(batch, fbins, t, dim).permute(0, 2, 1, 3).reshape(batch, t, fbins * dim)

    def frame_features(self, waveform: torch.Tensor) -> torch.Tensor:
        x = self.log_mel(waveform)
        unit, step = self.config.input_size[1], self.config.patch_size[1]
        if self.single_chunk:
            # Pad to whole patches; at exactly the input length the runtime pads nothing and its
            # patch conv drops the partial patch: _encode_chunk keeps the grid's first patches.
            return self._encode_chunk(nn.functional.pad(x, (0, (-x.shape[-1]) % step)))
        frames = x.shape[-1]  # fixed at export: a python loop over chunks as in the runtime
        x = nn.functional.pad(x, (0, (step - frames % unit % step) % step))
        chunks = [x[..., i * unit:(i + 1) * unit] for i in range((frames + unit - 1) // unit)]
        return torch.cat([self._encode_chunk(c[..., : c.shape[-1] - c.shape[-1] % step]) for c in chunks], dim=1)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.frame_features(waveform).mean(dim=1)


def frontend_description(config: M2DConfig) -> str:
    rate, n_fft, hop, f_min, f_max = RATES[config.rate_tag]
    return (
        f"power mel {N_MELS} Slaney bands (area-normalised) {f_min:g}-{f_max:g} Hz, n_fft {n_fft}, hop {hop}, "
        f"centred (reflect); log(S+eps), (x-mean)/std from the checkpoint; ViT-B input "
        f"{config.input_size[0]}x{config.input_size[1]} patches {config.patch_size[0]}x{config.patch_size[1]}; "
        "mean over time of the stacked frame features"
    )


def _weight_file(path: Path) -> Path:
    """The .pth itself, or the release folder holding exactly one."""
    if path.is_dir():
        found = sorted(path.glob("*.pth"))
        if len(found) != 1:
            raise CheckpointError(f"{path}: expected one .pth weight file in the folder, found {len(found)}")
        return found[0]
    return path


def backbone_state(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    """The portable runtime's key clean-up: ``model`` level, ``backbone.`` and EVAR prefixes."""
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: not an M2D checkpoint (expected a dict of weights)")
    state = loaded["model"] if isinstance(loaded.get("model"), dict) else loaded
    if any(str(k).startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return {str(k).replace("module.ar.runtime.backbone.", ""): v for k, v in state.items() if torch.is_tensor(v)}


def load_m2d(path: Path, config: M2DConfig | None = None) -> M2DEncoder:
    weight_file = _weight_file(path)
    if config is None:
        try:
            config = parse_release_name(weight_file.parent.name)
        except ValueError as exc:
            raise CheckpointError(f"{weight_file}: {exc}") from None
    state = backbone_state(read_checkpoint(weight_file), weight_file)
    state.setdefault("norm_stats", torch.tensor(DEFAULT_NORM_STATS))
    model = M2DEncoder(config)
    own = model.state_dict()
    dropped = sorted(k for k in state if k not in own)
    if dropped:
        log.info("%s: leaving out %d training-only tensors (e.g. %s)", weight_file, len(dropped), dropped[0])
    # As the runtime does: the encoder's tensors must all be there with their shapes; the rest
    # (decoder, target encoder, CLAP projections, heads) is not part of the backbone.
    load_strict(model, {k: v for k, v in state.items() if k in own}, weight_file, "M2D ViT-Base")
    return model.eval()


def random_model(config: M2DConfig = M2DConfig(), seed: int = 0) -> M2DEncoder:
    torch.manual_seed(seed)
    model = M2DEncoder(config)
    randomise_norms(model)
    with torch.no_grad():
        model.norm_stats.copy_(torch.tensor(DEFAULT_NORM_STATS))
    return model.eval()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", metavar="NAME",
                        help="release name to read the sizes from when the weight file's folder was renamed "
                             "(e.g. m2d_as_vit_base-80x1001p16x16-240213)")


SUMMARY = "M2D ViT-Base, masked modeling duo (16 or 32 kHz, 3840-d frame features)"
CHECKPOINT = "a released weights .pth inside its release folder (the folder name gives the sizes), or that folder"


def build(args: argparse.Namespace) -> tuple[nn.Module, BackboneMetadata]:
    sizes = getattr(args, "sizes", None)
    try:
        config = parse_release_name(sizes) if sizes else None
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    model = random_model(config or M2DConfig()) if args.random_init else load_m2d(args.checkpoint, config)
    c = model.config
    meta = metadata("m2d", c.sample_rate, c.frame_dim, frontend_description(c), LICENCE,
                    MIN_SECONDS if model.single_chunk else 0.0)
    return model, meta
