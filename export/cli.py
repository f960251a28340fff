"""``asd-export``: turn backbones into ONNX files for the daemon."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from export.builtins import BUILTINS

log = logging.getLogger("asd-export")

ASSETS = Path(__file__).resolve().parent.parent / "monitor" / "assets"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asd-export", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log the exporter's own steps")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("list", help="list the backbones this exporter knows")
    for name, builtin in BUILTINS.items():
        p = sub.add_parser(name, help=f"export {name}: {builtin.summary}")
        p.add_argument("--out", type=Path, default=Path("."), help="output folder (default: .)")
        p.add_argument("--checkpoint", type=Path, help=f"checkpoint ({builtin.checkpoint})")
        if name == "aisfx":
            p.add_argument("--no-peak-normalise", action="store_true",
                           help="keep the input level instead of dividing by the peak (measured worse, see README)")
    p = sub.add_parser("builtins", help="re-export every built-in backbone into the package's assets")
    p.add_argument("--out", type=Path, default=ASSETS, help=f"output folder (default: {ASSETS})")
    return parser


def export_one(name: str, out: Path, checkpoint: Path | None = None, peak_normalise: bool = True) -> Path:
    from export.onnx_export import export_backbone  # imports torch.onnx: only when exporting

    started = time.perf_counter()
    module, meta = BUILTINS[name].build(checkpoint, peak_normalise)
    path = export_backbone(module, meta, out)
    log.info("%s exported in %.1f s, %.1f MB", name, time.perf_counter() - started, path.stat().st_size / 1e6)
    return path


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "list":
        for builtin in BUILTINS.values():
            print(f"{builtin.name:8s} {builtin.summary}\n         licence: {builtin.licence}\n         checkpoint: {builtin.checkpoint}")
        return 0
    try:
        if args.command == "builtins":
            for name in BUILTINS:
                print(export_one(name, args.out))
            return 0
        print(export_one(args.command, args.out, args.checkpoint, not getattr(args, "no_peak_normalise", False)))
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"asd-export: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
