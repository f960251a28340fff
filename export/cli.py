"""``asd-export``: turn backbones into ONNX files for the daemon.

Each backbone is a subcommand; the file is written to ``--out``/<name>.onnx and its path
printed.

Exit codes (as asd-monitor's): 0 ok, 1 export failed (parity check, torch or ONNX error, file
system), 2 usage, 65 bad checkpoint or input. A failure prints one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from monitor.errors import (
    EXIT_FAILURE,
    EXIT_USAGE,
    AsdError,
    MissingDependency,
    first_line,
)

log = logging.getLogger(__name__)

# What the export extra brings; the runtime (asd-monitor) needs none of it.
EXPORT_PACKAGES = ("torch", "onnx", "onnxscript")

ASSETS = Path(__file__).resolve().parent.parent / "monitor" / "assets"


def exporters() -> dict:
    """The registry, or one line naming the extra to install when torch or onnx is missing."""
    try:
        from export.registry import EXPORTERS
    except ModuleNotFoundError as exc:
        if exc.name not in EXPORT_PACKAGES:
            raise
        raise MissingDependency(f"{exc.name} is not installed: asd-export needs the export extra "
                                "(pip install -e '.[export]')") from None
    return EXPORTERS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asd-export", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n")[-1])
    parser.add_argument("-v", "--verbose", action="store_true", help="log the exporter's own steps")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("list", help="list the backbones this exporter knows")
    for name, exporter in exporters().items():
        p = sub.add_parser(name, help=f"export {name}: {exporter.summary}")
        p.add_argument("--out", type=Path, default=Path("."), help="output folder (default: .)")
        p.add_argument("--checkpoint", type=Path, help=f"checkpoint: {exporter.checkpoint}")
        p.add_argument("--random-init", action="store_true",
                       help="random weights instead of a checkpoint (tests, timing)")
        _precision_arguments(p)
        if exporter.add_arguments:
            exporter.add_arguments(p)
    p = sub.add_parser("builtins", help="re-export every built-in backbone into the package's assets")
    p.add_argument("--out", type=Path, default=ASSETS, help=f"output folder (default: {ASSETS})")
    return parser


def _precision_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                       help="fp16: half-precision graph for GPUs (frontend kept fp32), written as NAME-fp16.onnx")
    group.add_argument("--quantize", choices=["int8"],
                       help="int8: dynamic quantisation of the weighted layers for CPUs, written as NAME-int8.onnx")
    parser.add_argument("--external-data", action="store_true",
                        help="keep the weights in NAME.onnx.data beside the graph (automatic above 1.8 GB)")


def export_one(args: argparse.Namespace, name: str) -> Path:
    from export.onnx_export import (  # imports torch.onnx: only when exporting
        DATA_SUFFIX,
        export_backbone,
    )

    started = time.perf_counter()
    module, meta = exporters()[name].build(args)
    precision = getattr(args, "quantize", None) or getattr(args, "precision", "fp32")
    path = export_backbone(module, meta, args.out, precision=precision,
                           external_data=True if getattr(args, "external_data", False) else None)
    data = Path(str(path) + DATA_SUFFIX)
    size = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    log.info("%s exported in %.1f s, %.1f MB", name, time.perf_counter() - started, size / 1e6)
    return path


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        registry = exporters()
        if args.command == "list":
            for e in registry.values():
                kind = "built-in" if e.builtin else "checkpoint"
                print(f"{e.name:14s} {e.summary} [{kind}]\n{'':14s} licence: {e.licence}\n{'':14s} checkpoint: {e.checkpoint}")
            return 0
        if args.command == "builtins":
            for name, exporter in registry.items():
                if exporter.builtin:
                    defaults = argparse.Namespace(out=args.out, checkpoint=None, random_init=False)
                    print(export_one(defaults, name))
            return 0
        if not registry[args.command].builtin and args.checkpoint is None and not args.random_init:
            print(f"asd-export: error: {args.command} needs --checkpoint FILE (or --random-init)", file=sys.stderr)
            return EXIT_USAGE
        print(export_one(args, args.command))
    except AsdError as exc:
        print(f"asd-export: error: {first_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except (OSError, ValueError, RuntimeError) as exc:  # the file system's, torch's and onnx's own
        print(f"asd-export: error: {first_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
