"""Checkpoint files as every exporter reads them: without running code from the file, and with
one-line errors that name the file and what is wrong with it.

A ``torch.save`` file is a pickle, and unpickling may call any function the file names; a
checkpoint downloaded from a model zoo must not be able to do that. So no file is ever loaded
with ``weights_only=False``. Published checkpoints do often pickle training objects next to the
weights (an ``argparse.Namespace`` of the run's arguments, fairseq meters, numpy scalars, paths):
those classes are swapped for inert stand-ins that only keep the data they were given, which is
enough to reach the tensors, and no training framework has to be installed.

Each model's key names and layouts stay in its own module; this one only turns files into
Python objects (``read_checkpoint``) and a state dict into loaded parameters (``load_strict``).
"""

from __future__ import annotations

import json
import math
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monitor.errors import CheckpointError, first_line

# The names ``transformers`` gives the weights in a saved model folder, preferred first.
HUGGING_FACE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
ZIP_MAGIC = b"PK\x03\x04"
# A safetensors header is JSON of a few hundred bytes per tensor; anything larger is not one.
MAX_SAFETENSORS_HEADER = 100_000_000
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_checkpoint(path: Path) -> Any:
    """The object stored in a ``torch.save`` file, or the state dict of a ``.safetensors`` file.

    The file is first read as torch's ``weights_only`` unpickler allows (tensors, containers,
    numbers). Only if it names other classes or functions are those listed from the pickle
    without running it and each replaced by a stand-in (see ``_Opaque``), then the file is read
    again under the same unpickler. The stand-ins need the names up front, which torch can only
    list in a zip checkpoint (every ``torch.save`` since torch 1.6).
    """
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    head = _head(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = exc
    except Exception as exc:  # torch raises zip, pickle and OS errors alike
        raise _unreadable(path, head, exc) from None
    if head != ZIP_MAGIC:
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint (not a torch.save file, or a legacy "
                              f"one that pickles objects besides tensors: {_refusal(refused)})")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        with torch.serialization.safe_globals([(_stand_in(name), name) for name in names]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _unreadable(path, head, exc) from None


def _head(path: Path) -> bytes:
    """The first bytes of the file (which tell a zip from a bare pickle); OS errors as one line."""
    try:
        with path.open("rb") as f:
            head = f.read(len(ZIP_MAGIC))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or first_line(exc)})") from None
    if not head:
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint (the file is empty)")
    return head


def _unreadable(path: Path, head: bytes, exc: Exception) -> CheckpointError:
    """What torch's error means for the user: a cut-off download, or not a checkpoint at all."""
    if isinstance(exc, EOFError) or (head == ZIP_MAGIC and not zipfile.is_zipfile(path)):
        problem = "truncated: the file ends before its data does; download it again"
    elif isinstance(exc, pickle.UnpicklingError):
        problem = _refusal(exc)
    else:  # torch's first sentence: the later ones advise on loading the file unsafely
        problem = first_line(exc).split(". ")[0]
    return CheckpointError(f"{path}: cannot read as a torch checkpoint ({problem})")


def _refusal(exc: pickle.UnpicklingError) -> str:
    """The reason in torch's multi-paragraph ``weights_only`` error, without its advice to load
    the file unsafely."""
    _, marker, after = str(exc).partition("WeightsUnpickler error:")
    detail = [line.strip() for line in after.splitlines() if line.strip()] if marker else []
    return (detail[0] if detail else first_line(exc)).split(". ")[0]


class _Opaque:
    """Stands in for a class or function a checkpoint names beyond tensors and containers.

    Unpickling calls it with the arguments the file gives the original (or hands it the state
    the original would have set); it keeps them and does nothing else, so the data stays
    inspectable while no code from the file or its framework runs.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _stand_in(qualified: str) -> type:
    """A fresh ``_Opaque`` subclass under the pickled name ``module.name``."""
    module, _, name = qualified.rpartition(".")
    return type(name, (_Opaque,), {"__module__": module, "__qualname__": name})


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, in their stored dtypes, without the
    ``safetensors`` package: an 8-byte little-endian header size, a JSON header giving each
    tensor's dtype, shape and byte range, then the raw little-endian data."""
    try:
        with path.open("rb") as f:
            header, base = _safetensors_header(f, path)
            tensors = {}
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                dtype, shape, begin, end = _safetensors_entry(name, entry, path)
                raw = bytearray(end - begin)
                f.seek(base + begin)
                if f.readinto(raw) != len(raw):
                    raise CheckpointError(f"{path}: truncated: tensor {name} lies beyond the end of the file; "
                                          "download it again")
                tensor = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
                tensors[name] = tensor.reshape(shape)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or first_line(exc)})") from None
    return tensors


def _safetensors_header(f: Any, path: Path) -> tuple[dict[str, Any], int]:
    """(the parsed JSON header, the offset at which the tensor data begins)."""
    head = f.read(8)
    if len(head) != 8:
        raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header size)")
    (size,) = struct.unpack("<Q", head)
    if size > MAX_SAFETENSORS_HEADER:
        raise CheckpointError(f"{path}: not a safetensors file (header size {size})")
    text = f.read(size)
    if len(text) != size:
        raise CheckpointError(f"{path}: not a safetensors file, or a truncated one (the file ends inside "
                              f"its {size}-byte header)")
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    return header, 8 + size


def _safetensors_entry(name: str, entry: Any, path: Path) -> tuple[torch.dtype, list[int], int, int]:
    """(dtype, shape, first byte, end byte) of one header entry, checked against each other."""
    try:
        code = entry["dtype"]
        shape = [int(n) for n in entry["shape"]]
        begin, end = (int(n) for n in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: not a safetensors file (bad header entry for tensor {name})") from None
    dtype = SAFETENSORS_DTYPES.get(code)
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {code}")
    size = math.prod(shape) * dtype.itemsize
    if begin < 0 or end - begin != size:
        raise CheckpointError(f"{path}: tensor {name}: bytes {begin}-{end} do not hold {code} {shape}")
    return dtype, shape, begin, end


def hugging_face_weight_file(folder: Path) -> Path:
    """The weight file in a saved Hugging Face model folder (safetensors first)."""
    for name in HUGGING_FACE_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: a folder without {' or '.join(HUGGING_FACE_WEIGHTS)}")


def summarise_load_error(exc: RuntimeError) -> str:
    """torch's multi-line ``load_state_dict`` error as one line: its details, not its header."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[1:] if len(lines) > 1 else lines)
    return text if len(text) < 400 else text[:400] + "..."


def load_strict(module: nn.Module, state: dict[str, Any], path: Path, what: str) -> None:
    """``load_state_dict(strict=True)``, with the first missing, unexpected, non-tensor and
    misshapen keys in a one-line error instead of torch's multi-line one."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    objects = [k for k in own if k in state and not isinstance(state[k], torch.Tensor)]
    wrong = [k for k in own if k in state and k not in objects and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or objects or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if objects:
            parts.append(f"{len(objects)} not a tensor (e.g. {objects[0]}: {type(state[objects[0]]).__name__})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise CheckpointError(f"{path}: not a {what} checkpoint: {'; '.join(parts)}")
    module.load_state_dict(state, strict=True)


def randomise_norms(model: nn.Module) -> None:
    """Give BatchNorm running statistics plausible non-trivial values in place of a checkpoint's.

    With the defaults (mean 0, variance 1) every BatchNorm is an identity at inference, so a
    random-init model (timing, graph checks) or a test model would not exercise them.
    """
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
