"""Configuration: defaults, every kind of mistake as one line naming file, key and value."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from monitor.config import (
    Config,
    MachineConfig,
    SourceConfig,
    config_from_dict,
    load_config,
)
from monitor.errors import ConfigError

REFERENCE = Path(__file__).resolve().parents[1] / "config"


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == Config()
    assert Config().scoring.metric == "mahalanobis" and [b.model for b in Config().backbones] == ["aisfx"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"scoring": {"k": 0}}, "scoring.k: must be >= 1, got 0"),
        ({"scoring": {"kk": 1}}, "scoring.kk: unknown key"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"scoring": {"k": 1.5}}, "scoring.k: expected an integer, got 1.5"),
        ({"scoring": {"k": True}}, "scoring.k: expected an integer, got True"),
        ({"scoring": {"shrinkage": 0}}, "scoring.shrinkage: must be > 0, got 0"),
        ({"scoring": {"metric": "cos"}}, "scoring.metric: must be one of"),
        ({"scoring": []}, "scoring: expected a mapping"),
        ({"backbones": [{"weight": 1}]}, "backbones[0].model: required key is missing"),
        ({"backbones": [{"model": "a", "weight": "x"}]}, "backbones[0].weight: expected a number, got 'x'"),
        ({"backbones": []}, "backbones: at least one backbone"),
        ({"backbones": [{"model": "a"}, {"model": "a"}]}, "backbones: name used twice: a"),
        ({"backbones": [{"model": "a", "weight": 0}]}, "every weight is 0"),
        ({"alerts": {"raise_count": 6}}, "alerts.raise_count: 6 cannot exceed alerts.raise_window 5"),
        ({"alerts": {"threshold": 1.5}}, "alerts.threshold: must be <= 1, got 1.5"),
        ({"machines": [{"name": "fan", "source": "nope"}]}, "machines[0].source: unknown source 'nope'"),
        ({"sources": [{"name": "f", "type": "file"}]}, "sources[0].paths: a file source needs at least one path"),
        ({"sources": [{"name": "f", "type": "file", "paths": ["/nonexistent.wav"]}]}, "sources[0].paths[0]: /nonexistent.wav does not exist"),
        ({"sources": [{"name": "m", "type": "microphone"}], "machines": [{"name": "a", "source": "m", "channel": 1}]},
         "machines[0].channel: 1 but source 'm' has 1 channel(s)"),
        ({"mqtt": {"port": 70000}}, "mqtt.port: must be <= 65535, got 70000"),
        ({"mqtt": {"site": "a/b"}}, "mqtt.site: 'a/b' must not contain"),
        ({"mqtt": {"password_file": "/nonexistent"}}, "mqtt.password_file: /nonexistent does not exist"),
        ([1, 2], "top level: expected a mapping"),
    ],
)
def test_errors_name_file_key_and_value(data: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(data, "site.yaml")
    text = str(err.value)
    assert text.startswith("site.yaml: ") and message in text and "\n" not in text


def test_device_by_name_or_index() -> None:
    by_index = config_from_dict({"sources": [{"name": "m", "type": "microphone", "device": 3}]})
    by_name = config_from_dict({"sources": [{"name": "m", "type": "microphone", "device": "USB"}]})
    assert by_index.sources[0].device == 3 and by_name.sources[0].device == "USB"


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("scoring:\n  k: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: YAML syntax error at line \d+"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: cannot read config"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted(REFERENCE.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(path.parent.parent)  # example paths are relative to the repository root
    load_config(path)


def _missing_keys(cls: type, mapping: dict, where: str = "") -> list[str]:
    """Dataclass fields (recursively) without a key in ``mapping``."""
    out = []
    for name, hint in typing.get_type_hints(cls).items():
        if name not in mapping:
            out.append(where + name)
        elif dataclasses.is_dataclass(hint):
            out += _missing_keys(hint, mapping[name], f"{where}{name}.")
    return out


def test_reference_config_lists_every_key_with_its_default() -> None:
    path = REFERENCE / "reference.yaml"
    assert load_config(path) == Config()
    assert _missing_keys(Config, yaml.safe_load(path.read_text())) == []
    # List items (sources, machines) are documented in comments under their key.
    text = path.read_text()
    for item in (SourceConfig, MachineConfig):
        for f in dataclasses.fields(item):
            assert f"#    {f.name}:" in text or f"#  - {f.name}:" in text, f"{item.__name__}.{f.name} undocumented"
