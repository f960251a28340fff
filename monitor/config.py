"""YAML configuration into typed, validated dataclasses.

Every mistake is reported as one line naming the file, the key path and the value
(``site.yaml: scoring.k: must be >= 1, got 0``), and the whole file is checked before anything
starts, so a bad config never half-starts the daemon. Unknown keys are errors, not warnings: a
misspelt key silently falling back to its default is how a plant ends up unmonitored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """The configuration cannot be used; the message is one line naming file, key and value."""


def _range(minimum: float | None = None, maximum: float | None = None, exclusive_min: bool = False) -> dict:
    return {"min": minimum, "max": maximum, "exclusive_min": exclusive_min}


Metric = Literal["mahalanobis", "cosine", "euclidean", "std-euclidean"]


@dataclass(frozen=True)
class BackboneConfig:
    """One backbone: a built-in name (``aisfx``, ``logmel``) or a path to an exported .onnx."""

    model: str
    weight: float = field(default=1.0, metadata=_range(0.0))
    # Overrides scoring.metric for this backbone (a DSP feature may want cosine, a CNN mahalanobis).
    metric: Metric | None = None


@dataclass(frozen=True)
class ScoringConfig:
    """KNN scoring. ``mahalanobis`` whitens with the bank's covariance shrunk towards its
    diagonal by ``shrinkage`` (1.0 is the standardised Euclidean distance): measured best on
    both benchmark sets for every shrinkage from 0.3 to 0.8 (see README)."""

    metric: Metric = "mahalanobis"
    k: int = field(default=1, metadata=_range(1))
    shrinkage: float = field(default=0.5, metadata=_range(0.0, 1.0, exclusive_min=True))


@dataclass(frozen=True)
class FusionConfig:
    """How per-backbone ranks are combined, and the fused rank above which a window is anomalous."""

    rule: Literal["mean", "max"] = "mean"
    threshold: float = field(default=0.9, metadata=_range(0.0, 1.0, exclusive_min=True))


@dataclass(frozen=True)
class RuntimeConfig:
    provider: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = field(default=0, metadata=_range(0))


def _default_backbones() -> list[BackboneConfig]:
    return [BackboneConfig("aisfx")]


@dataclass(frozen=True)
class Config:
    backbones: list[BackboneConfig] = field(default_factory=_default_backbones)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def weights(self) -> dict[str, float]:
        return {b.model: b.weight for b in self.backbones}


def load_config(path: Path) -> Config:
    """Read and validate a YAML file; an empty file gives the defaults."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{source}: YAML syntax error{where}: {problem}") from None
    return config_from_dict(data if data is not None else {}, source)


def config_from_dict(data: Any, source: str = "<config>") -> Config:
    config = _build(Config, data, "", source)
    _check_config(config, source)
    return config


def _check_config(config: Config, source: str) -> None:
    if not config.backbones:
        raise ConfigError(f"{source}: backbones: at least one backbone is required")
    names = [b.model for b in config.backbones]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{source}: backbones: listed twice: {', '.join(duplicates)}")
    if all(b.weight == 0 for b in config.backbones):
        raise ConfigError(f"{source}: backbones: every weight is 0, nothing would be scored")


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _build(cls: type, data: Any, where: str, source: str) -> Any:
    label = where or "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {label}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{source}: {prefix}{unknown[0]}: unknown key (allowed: {', '.join(sorted(known))})")
    values = {}
    for name, f in known.items():
        key = f"{where}.{name}" if where else name
        if name in data:
            values[name] = _convert(hints[name], data[name], key, source, f.metadata)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: {key}: required key is missing")
    return cls(**values)


def _convert(hint: Any, value: Any, key: str, source: str, meta: typing.Mapping) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key, source)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{source}: {key}: must be one of {', '.join(map(str, choices))}, got {_describe(value)}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list, got {_describe(value)}")
        return [_convert(item, v, f"{key}[{i}]", source, meta) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _convert(args[0], value, key, source, meta)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true or false, got {_describe(value)}")
        return value
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (hint is int and not isinstance(value, int)):
            kind = "an integer" if hint is int else "a number"
            raise ConfigError(f"{source}: {key}: expected {kind}, got {_describe(value)}")
        _check_range(float(value), key, source, meta)
        return hint(value)
    if hint is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{source}: {key}: expected a non-empty string, got {_describe(value)}")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{source}: {key}: expected a path, got {_describe(value)}")
        return Path(value).expanduser()
    raise TypeError(f"config type {hint!r} at {key} is not supported")  # a programming error


def _check_range(value: float, key: str, source: str, meta: typing.Mapping) -> None:
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{source}: {key}: must be a finite number, got {value}")
    low, high = meta.get("min"), meta.get("max")
    if low is not None:
        if meta.get("exclusive_min") and not value > low:
            raise ConfigError(f"{source}: {key}: must be > {low:g}, got {value:g}")
        if value < low:
            raise ConfigError(f"{source}: {key}: must be >= {low:g}, got {value:g}")
    if high is not None and value > high:
        raise ConfigError(f"{source}: {key}: must be <= {high:g}, got {value:g}")
