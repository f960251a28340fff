"""Running an exported backbone with onnxruntime: the daemon's only contact with a model.

A backbone is an ONNX file plus the metadata in ``monitor.scoring.metadata``; nothing here depends on
which network is inside. Built-in backbones ship as files in ``monitor/assets``.

A file's graph may carry further embeddings after the one its metadata names (the built-in
aisfx: its intermediate conv blocks). Each becomes a backbone of its own, ``<name>.<output>``,
or several outputs concatenated (``embedding+block3``: each L2-normalised per window, so that
no part outweighs the others by its scale alone) become one, ``<name>.embedding-block3``; all
on the file's one session. ``embed_outputs`` fetches every output a session's backbones need
from one run, so a second output costs no second inference.

A bank keeps every single output of a file (``features``), not the mixture a config asks for:
a concatenation is made of them when a bank is fitted and when a window is scored
(``compose``), so changing ``output`` needs no re-enrollment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, get_args

import numpy as np

from monitor.audio.files import Recording, Resampler, WindowCutter
from monitor.config import BackboneConfig, Config, Provider
from monitor.errors import BackboneError, ConfigError, MissingDependency, first_line
from monitor.scoring.metadata import BackboneMetadata

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "assets"

PROVIDERS: tuple[str, ...] = get_args(Provider)
CONCATENATE = "+"  # in backbones[].output: outputs concatenated into one embedding
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


def builtin_names() -> list[str]:
    return sorted(p.stem for p in ASSETS.glob("*.onnx"))


def resolve_model(spec: str | Path) -> Path:
    """A built-in name (``aisfx``) or a path to an ``.onnx`` file -> an existing file."""
    text = str(spec)
    if text in builtin_names():
        return ASSETS / f"{text}.onnx"
    path = Path(text).expanduser()
    if path.suffix != ".onnx" and not path.exists():
        raise BackboneError(
            f"backbone {text!r}: not a built-in ({', '.join(builtin_names())}) and not an .onnx file"
        )
    if not path.is_file():
        raise BackboneError(f"backbone {text!r}: file {path} does not exist")
    return path


def onnxruntime() -> ModuleType:
    """onnxruntime, imported on first use. It comes with an extra (``cpu`` or ``gpu``: the two
    builds own the same module and must never be installed together), so a plain install lacks
    it; every command that needs no model (``--help``, ``check-config``, ``bank``) works without."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependency("onnxruntime is not installed: pip install 'asd-monitor[cpu]' "
                                "(or 'asd-monitor[gpu]' on a CUDA host; never both)") from None
    if hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()  # nothing leaves the box unasked (onnxruntime >= 1.17 may upload usage events)
    return ort


def _session_options(threads: int) -> ort.SessionOptions:
    options = onnxruntime().SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # onnxruntime's own warnings are noise in a daemon's journal
    return options


def open_session(path: Path, provider: str, threads: int = 0) -> ort.InferenceSession:
    """Create a session on the requested provider and report the one really in use.

    ``auto`` tries CUDA when this onnxruntime build offers it and falls back to the CPU:
    onnxruntime silently drops CUDA when its libraries fail to initialise, so the provider is
    read back from the session rather than assumed. ``cuda`` fails if CUDA does not come up.
    """
    if provider not in PROVIDERS:
        raise BackboneError(f"provider {provider!r} is not one of {', '.join(PROVIDERS)}")
    ort = onnxruntime()
    want_cuda = provider in ("auto", "cuda") and _CUDA in ort.get_available_providers()
    if provider == "cuda" and not want_cuda:
        raise BackboneError(f"{path}: provider 'cuda' asked for, but this onnxruntime has no CUDA (install the 'gpu' extra)")
    chain = [_CUDA, _CPU] if want_cuda else [_CPU]
    try:
        session = ort.InferenceSession(str(path), _session_options(threads), providers=chain)
    except Exception as exc:  # onnxruntime's errors share no base class below Exception
        raise BackboneError(f"{path}: cannot load ONNX model ({first_line(exc)})") from None
    used = session.get_providers()[0]
    if provider == "cuda" and used != _CUDA:
        raise BackboneError(f"{path}: provider 'cuda' asked for, but CUDA did not initialise (running on {used})")
    return session


@dataclass
class Backbone:
    """One loaded backbone: ``embed`` takes windows at the backbone's own rate and length.

    ``meta`` is the file's metadata; for further outputs of the graph (``output``) the same
    with their name, output and dimension, so that banks, KNN and ranks handle them as any
    other backbone. Backbones of one file share ``session``.
    """

    path: Path
    meta: BackboneMetadata
    session: ort.InferenceSession
    # Graph outputs concatenated into this backbone's embedding, each L2-normalised per window;
    # empty: the graph output ``meta.output_name`` as it is.
    parts: tuple[str, ...] = ()

    @classmethod
    def load(cls, spec: str | Path, provider: str = "auto", threads: int = 0) -> Backbone:
        path = resolve_model(spec)
        session = open_session(path, provider, threads)
        props = session.get_modelmeta().custom_metadata_map
        meta = BackboneMetadata.from_props(props, str(path))
        inputs = [i.name for i in session.get_inputs()]
        if meta.input_name not in inputs:
            raise BackboneError(f"{path}: metadata names input {meta.input_name!r}, the graph has {inputs}")
        log.info("backbone %s loaded from %s on %s (model_id %s)", meta.name, path,
                 session.get_providers()[0], meta.model_id)
        return cls(path, meta, session)

    def output(self, output: str) -> Backbone:
        """The backbone of a further output of this file's graph (``block3``), or of several
        outputs concatenated (``embedding+block3``; the file's own embedding may be one of
        them), on the same session, named ``<file's name>.<outputs joined by '-'>``. Raises
        BackboneError naming the outputs there are."""
        file_meta = BackboneMetadata.from_props(self.session.get_modelmeta().custom_metadata_map, str(self.path))
        further = extra_outputs(self.session, file_meta.output_name)
        dims = {file_meta.output_name: file_meta.embedding_dim, **further}
        names = output.split(CONCATENATE)
        unknown = [n for n in names if n not in dims]
        if unknown or names == [file_meta.output_name] or len(set(names)) < len(names):
            offered = ", ".join(further) or "none besides its embedding"
            raise BackboneError(f"{output!r} is not an output of {file_meta.name} ({self.path}) nor several joined "
                                f"by {CONCATENATE!r} ({file_meta.output_name!r} may be one of them); it has: {offered}")
        meta = replace(file_meta, name=f"{file_meta.name}.{'-'.join(names)}", output_name=output,
                       embedding_dim=sum(dims[n] for n in names))
        return Backbone(self.path, meta, self.session, tuple(names) if len(names) > 1 else ())

    @property
    def graph_outputs(self) -> tuple[str, ...]:
        """The graph outputs this backbone's embedding is made of."""
        return self.parts or (self.meta.output_name,)

    def features(self) -> list[Backbone]:
        """Every single output of this backbone's model file as a backbone of its own, the file's
        embedding first (named as the file, the rest ``<file>.<output>``): what a bank keeps of a
        window, so that any later ``output`` can be made of it without enrolling again."""
        file = self.file_backbone()
        return [file, *(file.output(name) for name in extra_outputs(self.session, file.meta.output_name))]

    def file_backbone(self) -> Backbone:
        """The model file's own embedding on this session (the backbone ``output: null`` names)."""
        meta = BackboneMetadata.from_props(self.session.get_modelmeta().custom_metadata_map, str(self.path))
        return Backbone(self.path, meta, self.session)

    @cached_property
    def feature_names(self) -> tuple[str, ...]:
        """The names (see ``features``) of the single outputs this embedding is made of."""
        if not self.parts:
            return (self.name,)
        own = self.file_backbone().meta
        return tuple(own.name if part == own.output_name else f"{own.name}.{part}" for part in self.parts)

    def compose(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """This backbone's embedding made of stored single outputs (``feature_names``): the same
        rows ``embed`` gives, for bank rows and for windows embedded with ``features``."""
        if not self.parts:
            return features[self.name]
        return _joined([features[name] for name in self.feature_names])

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def embed(self, windows: np.ndarray) -> np.ndarray:
        """[B, window_samples] float32 at ``meta.sample_rate`` -> [B, embedding_dim] float32.

        A variable-length backbone also takes [B, n] for ``min_samples <= n <= window_samples``.
        """
        return _run([self], windows)[0]

    def windows(self, recording: Recording, hop_seconds: float | None = None,
                progress: Callable[[float], None] | None = None) -> Iterator[tuple[float, np.ndarray]]:
        """Resample ``recording`` to this backbone's rate and cut it into windows, a block at a
        time: (start in seconds, window) in order, holding about a window and a block whatever
        the recording's length. ``hop_seconds`` defaults to the window length (no overlap);
        ``progress`` hears the seconds of audio read, block by block.
        """
        rate = self.meta.sample_rate
        hop = self.meta.window_samples if hop_seconds is None else max(1, int(round(hop_seconds * rate)))
        resampler = Resampler(recording.sample_rate, rate)
        cutter = WindowCutter(self.meta.window_samples, hop, self.meta.min_samples)
        for block in recording.blocks():
            for start, window in cutter.push(resampler.push(block)):
                yield start / rate, window
            if progress is not None:
                progress(len(block) / recording.sample_rate)
        for start, window in cutter.push(resampler.flush()) + cutter.finish():
            yield start / rate, window

    def windows_of(self, recording: Recording, hop_seconds: float | None = None) -> tuple[np.ndarray, list[float]]:
        """Every window of ``recording`` at once (see ``windows``): [n, window] and the starts."""
        cut = list(self.windows(recording, hop_seconds))
        return np.stack([w for _, w in cut]), [s for s, _ in cut]


def extra_outputs(session: ort.InferenceSession, first: str) -> dict[str, int]:
    """The graph's embeddings besides ``first`` (the one its metadata names): every other
    output of shape [batch, D] with a fixed D, name -> D, in the graph's order."""
    return {o.name: o.shape[1] for o in session.get_outputs()
            if o.name != first and len(o.shape) == 2 and isinstance(o.shape[1], int)}


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row divided by its Euclidean norm (an all-zero row stays zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(x.dtype).tiny)


def _joined(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Outputs concatenated into one embedding, each L2-normalised per window."""
    return np.concatenate([_unit_rows(part) for part in parts], axis=1)


def _run(backbones: Sequence[Backbone], windows: np.ndarray) -> list[np.ndarray]:
    """One ``session.run`` of the backbones' common session fetching every graph output they
    need, each backbone's embedding made of them, with the input's and the embeddings' shapes
    checked."""
    first = backbones[0]
    window, shortest = first.meta.window_samples, first.meta.min_samples
    length_ok = windows.ndim == 2 and (
        windows.shape[1] == window or (shortest is not None and shortest <= windows.shape[1] <= window)
    )
    if not length_ok:
        raise BackboneError(
            f"backbone {first.name}: expected windows of shape [B, {window}], got {list(windows.shape)}"
        )
    needed = list(dict.fromkeys(name for b in backbones for name in b.graph_outputs))
    fetched = dict(zip(needed, first.session.run(needed, {first.meta.input_name: windows.astype(np.float32, copy=False)})))
    outs = [_joined([fetched[p] for p in b.parts]) if b.parts else fetched[b.meta.output_name] for b in backbones]
    for backbone, out in zip(backbones, outs):
        if out.shape != (windows.shape[0], backbone.meta.embedding_dim):
            raise BackboneError(f"backbone {backbone.name}: output shape {list(out.shape)} != "
                                f"[B, {backbone.meta.embedding_dim}]")
    return outs


def shared_runs(backbones: Sequence[Backbone]) -> list[list[Backbone]]:
    """The backbones grouped by session (outputs of one file together), in first-seen order:
    each group is one inference per batch of windows (``embed_outputs``)."""
    groups: dict[int, list[Backbone]] = {}
    for backbone in backbones:
        groups.setdefault(id(backbone.session), []).append(backbone)
    return list(groups.values())


def embed_outputs(backbones: Sequence[Backbone], windows: np.ndarray) -> list[np.ndarray]:
    """Embed ``windows`` with backbones that share one session (a group of ``shared_runs``):
    one run returns every output, in the order of ``backbones``. A lone backbone goes through
    its ``embed``, so whatever wraps ``embed`` (the benchmarks' embedding memo) still sees it."""
    if len({id(b.session) for b in backbones}) != 1:
        raise ValueError("embed_outputs: the backbones must share one session (see shared_runs)")
    if len(backbones) == 1:
        return [backbones[0].embed(windows)]
    return _run(backbones, windows)


def load_backbones(specs: Sequence[BackboneConfig], provider: str = "auto", threads: int = 0) -> list[Backbone]:
    """The configured backbones, each model file opened once: entries naming outputs of the same
    file share its session, hence one inference per window. Errors name the config key
    (``backbones[i].model``, ``backbones[i].output``: a ConfigError naming the outputs there are)."""
    opened: dict[Path, Backbone] = {}  # by the file's resolved path: two spellings, one session
    loaded = []
    for i, spec in enumerate(specs):
        try:
            path = resolve_model(spec.model)
            file = path.resolve()
            if file not in opened:
                opened[file] = Backbone.load(path, provider, threads)
        except BackboneError as exc:
            raise type(exc)(f"backbones[{i}].model: {exc}") from None
        if spec.output is None:
            loaded.append(opened[file])
            continue
        try:
            loaded.append(opened[file].output(spec.output))
        except BackboneError as exc:
            raise ConfigError(f"backbones[{i}].output: {exc}") from None
    return loaded


def check_backbones(config: Config, source: str, load: bool = True) -> None:
    """What ``load_config`` leaves out because it costs a model load; ``check-config`` runs it,
    and ``run`` before anything starts. Every ``backbones[].model`` must be a built-in or an
    existing file (else a ConfigError, exit 78) and, with ``load``, an ONNX graph onnxruntime
    opens, carrying our ``asd.*`` metadata: a file that is not is bad input data, so its own
    error (exit 65, as at the start) with the key prepended; every ``backbones[].output`` must
    be one of its graph's (ConfigError). Loaded on the CPU: the file is checked here, the
    provider is the start's business."""
    for i, backbone in enumerate(config.backbones):
        try:
            resolve_model(backbone.model)
        except BackboneError as exc:
            raise ConfigError(f"{source}: backbones[{i}].model: {exc}") from None
    if load:
        try:
            load_backbones(config.backbones, "cpu", threads=1)
        except (BackboneError, ConfigError) as exc:
            raise type(exc)(f"{source}: {exc}") from None
