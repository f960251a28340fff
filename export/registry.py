"""Every backbone ``asd-export`` knows: how to build it, what it expects, what it is licensed as.

An exporter module adds its entries to ``EXPORTERS`` below; the CLI gives each one a
subcommand with the common options (``--out``, ``--checkpoint``, ``--random-init``) plus the
options its ``add_arguments`` declares, and calls ``build`` with the parsed arguments.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from export import aisfx, beats, dasheng, eat, logmel, m2d, muq
from export.contract import metadata
from monitor.scoring.metadata import BackboneMetadata

Build = Callable[[argparse.Namespace], tuple[torch.nn.Module, BackboneMetadata]]


@dataclass(frozen=True)
class Exporter:
    name: str
    summary: str
    licence: str
    checkpoint: str  # what --checkpoint expects, for --help and `asd-export list`
    build: Build  # args has .checkpoint (Path | None), .random_init (bool) and its own options
    builtin: bool = False  # shipped in monitor/assets, re-made by `asd-export builtins`
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


def _build_logmel(args: argparse.Namespace) -> tuple[torch.nn.Module, BackboneMetadata]:
    frontend = (
        f"log10 power mel, {logmel.N_MELS} HTK bands {logmel.F_MIN:g}-{logmel.F_MAX:g} Hz, n_fft {logmel.N_FFT}, "
        f"hop {logmel.HOP}, centred; per-band mean and std over time"
    )
    meta = metadata("logmel", logmel.SAMPLE_RATE, logmel.EMBEDDING_DIM, frontend, logmel.LICENCE, logmel.MIN_SECONDS)
    return logmel.LogMelStats(), meta


def _build_aisfx(args: argparse.Namespace) -> tuple[torch.nn.Module, BackboneMetadata]:
    peak_normalise = not getattr(args, "no_peak_normalise", False)
    frontend = (
        f"{'peak-normalised, ' if peak_normalise else ''}power mel {aisfx.N_MELS} HTK bands unit-sum, "
        f"n_fft {aisfx.N_FFT}, hop {aisfx.HOP}, centred, log10(S*1e4+1)/{aisfx.SPEC_MAX:.4f}; "
        f"blocks {aisfx.BLOCK_FRAMES} hop {aisfx.BLOCK_HOP}; CNN mean over blocks"
    )
    cnn = aisfx.AisfxCnn() if args.random_init else aisfx.load_cnn(args.checkpoint)
    # The extra outputs leave the frontend string, and with it model_id, as before: the first
    # output is the same embedding, so banks enrolled with an earlier export stay valid.
    module = aisfx.AisfxBackbone(cnn.eval(), peak_normalise, extra_outputs=tuple(aisfx.EXTRA_OUTPUTS))
    meta = metadata("aisfx", aisfx.SAMPLE_RATE, aisfx.EMBEDDING_DIM, frontend, aisfx.LICENCE, aisfx.MIN_SECONDS)
    return module, meta


def _aisfx_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-peak-normalise", action="store_true",
                        help="keep the input level instead of dividing by the peak (measured worse, see README)")


EXPORTERS: dict[str, Exporter] = {
    e.name: e
    for e in (
        Exporter("logmel", "log-mel band statistics (DSP, 16 kHz, 256-d)", logmel.LICENCE, "none (no weights)",
                 _build_logmel, builtin=True),
        Exporter("aisfx", "CNN pretrained on sound-effect libraries (44.1 kHz, 512-d)", aisfx.LICENCE,
                 "optional: the aisfx package's models/checkpoint.pth (the default)", _build_aisfx, builtin=True,
                 add_arguments=_aisfx_arguments),
        Exporter("beats", beats.SUMMARY, beats.LICENCE, beats.CHECKPOINT, beats.build, add_arguments=beats.add_arguments),
        Exporter("eat", eat.SUMMARY, eat.LICENCE, eat.CHECKPOINT, eat.build, add_arguments=eat.add_arguments),
        *(Exporter(n, dasheng.summary(n), dasheng.LICENCE, dasheng.checkpoint_help(n), partial(dasheng.build, n))
          for n in dasheng.SIZES),
        Exporter("m2d", m2d.SUMMARY, m2d.LICENCE, m2d.CHECKPOINT, m2d.build, add_arguments=m2d.add_arguments),
        Exporter("muq", muq.SUMMARY, muq.LICENCE, muq.CHECKPOINT, muq.build),
    )
}
