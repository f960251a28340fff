"""The contract between an exported backbone and the daemon: metadata stored in the ONNX file.

The daemon knows nothing backbone-specific beyond these fields, so any model that carries them
(an exported transformer, the DSP baseline) is run the same way. ``export`` imports this module
to write the fields; ``monitor`` never imports ``export``, which keeps the runtime free of torch.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields

from monitor.errors import ModelMetadataError

PREFIX = "asd."
FORMAT_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class BackboneMetadata:
    """What the runtime must know to feed a backbone and to keep its banks apart.

    ``model_id`` is a digest of the weights and frontend settings: a bank enrolled with one
    model_id is refused by a model with another, because distances between embeddings of two
    different models mean nothing.
    """

    name: str
    sample_rate: int
    window_seconds: float
    embedding_dim: int
    frontend: str
    licence: str
    exporter_version: str
    model_id: str
    input_name: str = "waveform"
    output_name: str = "embedding"
    format_version: int = FORMAT_VERSION
    # 0: the graph takes exactly one window. > 0: it takes any length from this many seconds
    # up, so a clip shorter than the window can be embedded as it is instead of repeated.
    min_seconds: float = 0.0
    # Numeric precision of the exported graph: fp32, fp16 (GPU) or int8 (dynamic quantisation for
    # CPUs). Informative: a reduced-precision export also gets its own model_id, so a bank is never
    # scored with embeddings of another precision. Files from before this field read as fp32.
    precision: str = "fp32"

    @property
    def window_samples(self) -> int:
        return int(round(self.sample_rate * self.window_seconds))

    @property
    def min_samples(self) -> int | None:
        """Shortest input the graph takes, or None when it takes exactly one window."""
        return int(round(self.sample_rate * self.min_seconds)) if self.min_seconds > 0 else None

    def to_props(self) -> dict[str, str]:
        return {PREFIX + key: str(value) for key, value in asdict(self).items()}

    @classmethod
    def from_props(cls, props: dict[str, str], source: str) -> BackboneMetadata:
        """Parse ``metadata_props``; ``source`` (the file) is named in every error."""
        values: dict[str, object] = {}
        for field in fields(cls):
            key = PREFIX + field.name
            if key not in props:
                if field.default is not MISSING:
                    continue
                raise ModelMetadataError(f"{source}: metadata key '{key}' is missing (not exported by asd-export?)")
            raw = props[key]
            try:
                values[field.name] = _convert(field.type, raw)
            except ValueError:
                raise ModelMetadataError(f"{source}: metadata key '{key}' has invalid value {raw!r}") from None
        meta = cls(**values)  # type: ignore[arg-type]
        meta.validate(source)
        return meta

    def validate(self, source: str) -> None:
        if self.format_version != FORMAT_VERSION:
            raise ModelMetadataError(
                f"{source}: metadata format_version {self.format_version} is not supported (expected {FORMAT_VERSION})"
            )
        for name, value in (("sample_rate", self.sample_rate), ("embedding_dim", self.embedding_dim)):
            if value <= 0:
                raise ModelMetadataError(f"{source}: metadata '{PREFIX}{name}' must be > 0, got {value}")
        if not self.window_seconds > 0:
            raise ModelMetadataError(f"{source}: metadata '{PREFIX}window_seconds' must be > 0, got {self.window_seconds}")
        if not 0 <= self.min_seconds <= self.window_seconds:
            raise ModelMetadataError(f"{source}: metadata '{PREFIX}min_seconds' must be in [0, window_seconds], got {self.min_seconds}")
        if self.precision not in PRECISIONS:
            raise ModelMetadataError(f"{source}: metadata '{PREFIX}precision' must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not self.name or not self.model_id:
            raise ModelMetadataError(f"{source}: metadata '{PREFIX}name' and '{PREFIX}model_id' must not be empty")


def _convert(type_name: object, raw: str) -> object:
    if type_name in (int, "int"):
        return int(raw)
    if type_name in (float, "float"):
        return float(raw)
    return raw
