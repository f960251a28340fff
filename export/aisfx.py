"""The aisfx sound-effects CNN (ISMIR 2022, PyPI ``aisfx``) as a waveform-in, embedding-out model.

Facts taken from the package (code MIT, weights CC BY 4.0): 44.1 kHz audio, power mel with 96
HTK bands normalised to unit sum, n_fft 2048, hop 1024, ``log10(S * 1e4 + 1)``, min-max scaling
with (0, 9.4578), blocks of 100 frames (~2.3 s) with hop 50, a 4-block VGG-style CNN with
64/128/256/512 channels, frequency mean then time max, 512-d per block. The clip embedding is
the mean over blocks.

The export also carries intermediate conv blocks as further graph outputs (``EXTRA_OUTPUTS``),
pooled the same way: the final pooled layer smooths away some of the fine spectral texture a
machine's sound has, which the earlier blocks still hold (issue 13). They come out of the same
pass, so one inference per window yields them all; the runtime reads them from the graph's
outputs (names and dims), and the first output stays the embedding it always was.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from export.checkpoint import read_checkpoint, summarise_load_error
from export.frontend import PowerMel
from monitor.errors import CheckpointError

SAMPLE_RATE = 44100
N_FFT = 2048
HOP = 1024
N_MELS = 96
SPEC_MAX = 9.457798957824707
BLOCK_FRAMES = 100
BLOCK_HOP = 50
EMBEDDING_DIM = 512
# Intermediate blocks exported beside the final embedding: graph output name -> conv block (1-4);
# blocks 2 and 3 (128-d, 256-d), the ones issue 13 names.
EXTRA_OUTPUTS = {"block2": 2, "block3": 3}
FINAL_BLOCK = 4
# One block needs 100 centred frames, i.e. 99 hops of audio (2.30 s); shorter inputs have no block.
MIN_SECONDS = 2.5
LICENCE = "aisfx: code MIT, weights CC BY 4.0 (A. B. Ma and A. Lerch, ISMIR 2022; PyPI package aisfx)"


class ConvBlock(nn.Module):
    """Two 3x3 conv + BN + ReLU layers, then max pooling (key names follow the checkpoint)."""

    def __init__(self, in_channels: int, out_channels: int, pool: tuple[int, int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        if self.pool != (1, 1):
            x = nn.functional.max_pool2d(x, self.pool)
        return x


class AisfxCnn(nn.Module):
    """Blocks [N, frames, mels] -> [N, 512]: mean over frequency, max over time."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.conv_block1 = ConvBlock(1, width, (2, 2))
        self.conv_block2 = ConvBlock(width, width * 2, (2, 2))
        self.conv_block3 = ConvBlock(width * 2, width * 4, (2, 2))
        self.conv_block4 = ConvBlock(width * 4, width * 8, (1, 1))

    def pooled(self, blocks: torch.Tensor, which: Sequence[int] = (FINAL_BLOCK,)) -> list[torch.Tensor]:
        """The output of each conv block in ``which`` (1-4), mean over frequency and max over
        time, in the order asked: [N, channels of that block] each, all from one pass."""
        x = blocks.unsqueeze(1)
        pooled: dict[int, torch.Tensor] = {}
        for index, block in enumerate((self.conv_block1, self.conv_block2, self.conv_block3, self.conv_block4), 1):
            x = block(x)
            if index in which:
                pooled[index] = x.mean(dim=3).amax(dim=2)
        return [pooled[index] for index in which]

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        return self.pooled(blocks)[0]


class AisfxBackbone(nn.Module):
    """Waveform [B, T] at 44.1 kHz -> embedding [B, 512], followed by one [B, D] tensor per name
    in ``extra_outputs`` (keys of ``EXTRA_OUTPUTS``) when there are any.

    ``peak_normalise`` reproduces the package's librosa path (divide by max |x|). It throws
    away the level, which a fault can change, so it is a switch rather than a given.
    """

    def __init__(self, cnn: AisfxCnn, peak_normalise: bool, extra_outputs: Sequence[str] = ()) -> None:
        super().__init__()
        unknown = sorted(set(extra_outputs) - set(EXTRA_OUTPUTS))
        if unknown:
            raise ValueError(f"aisfx has no output(s) {', '.join(unknown)} (known: {', '.join(EXTRA_OUTPUTS)})")
        self.mel = PowerMel(SAMPLE_RATE, N_FFT, HOP, N_MELS, 0.0, SAMPLE_RATE / 2, unit_sum=True)
        self.cnn = cnn
        self.peak_normalise = peak_normalise
        self.extra_outputs = tuple(extra_outputs)  # read by export_backbone: the graph's further outputs

    def block_embeddings(self, waveform: torch.Tensor) -> list[torch.Tensor]:
        """[B, T] -> [B, blocks, D] per output (the final block first); a partial last block is
        dropped, as the package does."""
        if self.peak_normalise:
            peak = waveform.abs().amax(dim=-1, keepdim=True)
            waveform = waveform / torch.where(peak > 0, peak, torch.ones_like(peak))
        spec = torch.log10(self.mel(waveform) * 1e4 + 1.0) / SPEC_MAX
        blocks = spec.unfold(1, BLOCK_FRAMES, BLOCK_HOP).transpose(2, 3)  # [B, nb, 100, 96]
        batch, n_blocks = blocks.shape[0], blocks.shape[1]
        which = (FINAL_BLOCK, *(EXTRA_OUTPUTS[name] for name in self.extra_outputs))
        pooled = self.cnn.pooled(blocks.reshape(batch * n_blocks, BLOCK_FRAMES, N_MELS), which)
        return [emb.reshape(batch, n_blocks, -1) for emb in pooled]

    def forward(self, waveform: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        clip = [per_block.mean(dim=1) for per_block in self.block_embeddings(waveform)]
        return tuple(clip) if self.extra_outputs else clip[0]


def packaged_checkpoint() -> Path:
    """Path of the checkpoint inside the installed ``aisfx`` package (found without importing
    it: its ``__init__`` imports librosa and pins old numpy)."""
    spec = importlib.util.find_spec("aisfx")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "aisfx is not installed: pip install --no-deps aisfx (it carries the weights)"
        )
    return Path(spec.origin).parent / "models" / "checkpoint.pth"


def load_cnn(checkpoint: Path | None = None) -> AisfxCnn:
    """Load the embedding part of the package's CrossNet checkpoint (keys ``embedding_net.*``).

    The file pickles numpy scalars in its dataset table next to the weights; they come back as
    inert stand-ins, which is all the table needs to be, since only the weights are used.
    """
    path = checkpoint or packaged_checkpoint()
    loaded = read_checkpoint(path)
    if not (isinstance(loaded, tuple) and len(loaded) == 2 and isinstance(loaded[0], dict)):
        raise CheckpointError(f"{path}: not an aisfx checkpoint (expected a (state_dict, datasets) pair)")
    prefix = "embedding_net."
    cnn_state = {k[len(prefix):]: v for k, v in loaded[0].items() if k.startswith(prefix)}
    cnn = AisfxCnn()
    try:
        cnn.load_state_dict(cnn_state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the aisfx CNN ({summarise_load_error(exc)})") from None
    return cnn.eval()

