"""Configuration: defaults, every kind of mistake as one line naming file, key and value."""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
from pathlib import Path

import pytest
import yaml

from monitor.cli import main
from monitor.config import (
    Config,
    MachineConfig,
    SourceConfig,
    config_from_dict,
    load_config,
)
from monitor.errors import EXIT_CONFIG, EXIT_DATA, ConfigError

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
        ({"mqtt": {"keepalive": 100000}}, "mqtt.keepalive: must be <= 65535, got 100000"),
        ({"daemon": {"name": "a/#"}}, "daemon.name: 'a/#' must not contain '+', '#', '/' or NUL"),
        ({"mqtt": {"site": "a+b"}}, "mqtt.site: 'a+b' must not contain"),
        ({"mqtt": {"site": "a\0b"}}, "mqtt.site: 'a\\x00b' must not contain"),
        ({"mqtt": {"topic_prefix": "asd/#"}}, "mqtt.topic_prefix: 'asd/#' must not contain '+', '#' or NUL"),
        ({"mqtt": {"topic_prefix": "plant//asd"}}, "mqtt.topic_prefix: 'plant//asd' has an empty MQTT topic level"),
        ({"mqtt": {"discovery_prefix": "ha/#"}}, "mqtt.discovery_prefix: 'ha/#' must not contain"),
        ({"mqtt": {"discovery_prefix": "/ha"}}, "mqtt.discovery_prefix: '/ha' has an empty MQTT topic level"),
        ({"sources": [{"name": "m", "type": "microphone"}], "machines": [{"name": "fan/1", "source": "m"}]},
         "machines[0].name: 'fan/1' must not contain"),
        ({"daemon": {"hop_seconds": 1e-6}}, "daemon.hop_seconds: must be >= 0.1, got 1e-06"),
        ({"daemon": {"file_mode": "public"}}, "daemon.file_mode: must be one of private, group, got 'public'"),
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


def test_a_prefix_may_have_several_topic_levels() -> None:
    config = config_from_dict({"mqtt": {"topic_prefix": "plant-7/asd", "discovery_prefix": "ha/discovery"}})
    assert config.mqtt.topic_prefix == "plant-7/asd"


@pytest.mark.parametrize(
    ("daemon", "make", "message"),
    [
        ({"event_log": "{tmp}/logs"}, "logs/", "daemon.event_log: {tmp}/logs exists but is not a file"),
        ({"event_log": "{tmp}/flat/events.jsonl"}, "flat", "daemon.event_log: cannot create {tmp}/flat/events.jsonl: {tmp}/flat is not a directory"),
        ({"state_dir": "{tmp}/flat"}, "flat", "daemon.state_dir: {tmp}/flat exists but is not a directory"),
        ({"state_dir": "{tmp}/state"}, "state/events.jsonl/", "daemon.event_log: {tmp}/state/events.jsonl exists but is not a file"),
        ({"state_dir": "{tmp}/state"}, "state/clips", "daemon.state_dir: {tmp}/state/clips exists but is not a directory"),
        ({"state_dir": "{tmp}/state"}, "state/outbox.sqlite/", "daemon.state_dir: {tmp}/state/outbox.sqlite exists but is not a file"),
    ],
)
def test_paths_the_daemon_writes_are_checked_by_type(tmp_path: Path, daemon: dict, make: str, message: str) -> None:
    """A folder where a file is expected (or the reverse), or a missing path below a file: one
    line naming the key, not a traceback once the models are loaded."""
    made = tmp_path / make
    made.parent.mkdir(parents=True, exist_ok=True)
    made.mkdir() if make.endswith("/") else made.write_text("")
    data = {"daemon": {key: value.format(tmp=tmp_path) for key, value in daemon.items()}}
    with pytest.raises(ConfigError) as err:
        config_from_dict(data, "site.yaml")
    assert str(err.value) == f"site.yaml: {message.format(tmp=tmp_path)}"


def test_a_bank_path_that_is_a_file_names_the_machine(tmp_path: Path) -> None:
    (tmp_path / "bank").write_text("")
    data = {"sources": [{"name": "m", "type": "microphone"}],
            "machines": [{"name": "fan", "source": "m", "bank": str(tmp_path / "bank")}]}
    with pytest.raises(ConfigError, match=r"machines\[0\].bank: .* exists but is not a directory"):
        config_from_dict(data, "site.yaml")


def test_non_utf8_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("daemon:\n  name: café\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: line 2: not UTF-8 text (byte 0xe9); save the file as UTF-8"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("scoring:\n  k: 1\n  metric: cosine\n  k: 3\n", "line 4: key 'k' given twice (first at line 2)"),
        ("scoring:\n  k: 1\nalerts: {}\nscoring:\n  k: 3\n", "line 4: key 'scoring' given twice (first at line 1)"),
    ],
)
def test_a_key_given_twice_is_refused(tmp_path: Path, text: str, message: str) -> None:
    """PyYAML would keep the last one silently."""
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: {message}"


def test_a_merged_key_may_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("alerts: &strict\n  threshold: 0.99\n  clear_threshold: 0.9\nreference:\n  rolling_size: 10\n"
                    "enrollment:\n  <<: {min_windows: 8, outlier_rank: 0.9}\n  min_windows: 12\n")
    assert load_config(path).enrollment.min_windows == 12


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_check_config_opens_every_backbone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing model is a config mistake (78); a file that is not an ONNX backbone with our
    metadata is bad input data (65), as when the daemon starts: one line each, naming the key."""
    good = _write(tmp_path / "good.yaml", {"backbones": [{"model": "logmel"}]})
    assert main(["check-config", str(good)]) == 0
    assert "ok (0 machine(s), 0 source(s), backbones logmel)" in capsys.readouterr().out

    missing = _write(tmp_path / "missing.yaml", {"backbones": [{"model": str(tmp_path / "none.onnx")}]})
    assert main(["check-config", str(missing)]) == EXIT_CONFIG
    assert capsys.readouterr().err == (f"asd-monitor: config error: {missing}: backbones[0].model: backbone "
                                       f"'{tmp_path / 'none.onnx'}': file {tmp_path / 'none.onnx'} does not exist\n")

    (tmp_path / "notes.txt").write_text("not a model\n")
    text = _write(tmp_path / "text.yaml", {"backbones": [{"model": str(tmp_path / "notes.txt")}]})
    assert main(["check-config", str(text)]) == EXIT_DATA
    err = capsys.readouterr().err
    assert err.startswith(f"asd-monitor: error: {text}: backbones[0].model: ") and "cannot load ONNX model" in err
    assert err.count("\n") == 1


def test_check_config_without_onnxruntime_still_looks_for_the_models(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain install has no onnxruntime: the model files are looked for, not opened, and the
    answer says so."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a))
    (tmp_path / "notes.txt").write_text("not a model\n")
    text = _write(tmp_path / "text.yaml", {"backbones": [{"model": str(tmp_path / "notes.txt")}]})
    assert main(["check-config", str(text)]) == 0
    assert "ok (0 machine(s), 0 source(s), backbones " in (out := capsys.readouterr().out)
    assert out.rstrip().endswith("; models not opened: onnxruntime is not installed)")
    missing = _write(tmp_path / "missing.yaml", {"backbones": [{"model": "nope.onnx"}]})
    assert main(["check-config", str(missing)]) == EXIT_CONFIG


def test_check_config_refuses_an_onnx_file_without_our_metadata(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onnx = pytest.importorskip("onnx")
    from monitor.scoring.backbone import ASSETS

    model = onnx.load(str(ASSETS / "logmel.onnx"))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "bare.onnx"))
    config = _write(tmp_path / "bare.yaml", {"backbones": [{"model": str(tmp_path / "bare.onnx")}]})
    assert main(["check-config", str(config)]) == EXIT_DATA
    err = capsys.readouterr().err
    assert f"{config}: backbones[0].model: " in err and "metadata key 'asd.name' is missing" in err


def test_run_checks_the_models_before_anything_starts(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    config = _write(tmp_path / "run.yaml", {
        "backbones": [{"model": "nope.onnx"}], "daemon": {"state_dir": str(state)},
        "sources": [{"name": "m", "type": "microphone"}], "machines": [{"name": "fan", "source": "m"}],
        "mqtt": {"enabled": False}, "metrics": {"enabled": False}})
    assert main(["run", "-c", str(config)]) == EXIT_CONFIG
    assert "backbones[0].model: backbone 'nope.onnx'" in capfd.readouterr().err
    assert not state.exists()
