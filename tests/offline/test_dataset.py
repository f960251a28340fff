"""Tests of monitor.offline.dataset: name parsing against the shared manifests, layout scanning, errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from monitor.audio.files import AUDIO_SUFFIXES, find_audio
from monitor.errors import AudioError, DatasetError
from monitor.offline.dataset import Clip, parse_clip, scan_dataset


def _manifest_rows(shared_data: Path) -> list[tuple[Path, dict[str, str]]]:
    rows = []
    for manifest in sorted(shared_data.rglob("manifest.csv")):
        with manifest.open(newline="") as handle:
            rows.extend((manifest.parent / row["path"], row) for row in csv.DictReader(handle))
    return rows


def test_parse_matches_every_shared_manifest(shared_data: Path) -> None:
    rows = _manifest_rows(shared_data)
    assert len(rows) > 100, "expected the benchmark manifests to be found"
    for path, row in rows:
        clip = parse_clip(path, strict=True)
        assert clip.path == path
        assert (clip.machine, clip.split, clip.label) == (row["machine"], row["split"], row["label"]), path
        if row["domain"] in ("source", "target"):
            assert clip.domain == row["domain"], path
            assert clip.section == "00", path
        else:
            # MIMII manifests put the machine id (id_00, unknown_id) in the domain column.
            assert clip.domain is None and clip.section is None, path
        assert clip.is_anomaly == (row["label"] == "anomaly")


def test_parse_dcase_name_with_attributes() -> None:
    clip = parse_clip(Path("data/ToyCar/test/section_00_source_test_normal_0028_car_C2_spd_34V_mic_1.wav"))
    assert clip == Clip(
        path=Path("data/ToyCar/test/section_00_source_test_normal_0028_car_C2_spd_34V_mic_1.wav"),
        machine="ToyCar",
        split="test",
        label="normal",
        domain="source",
        section="00",
        attributes="car_C2_spd_34V_mic_1",
    )
    assert not clip.is_anomaly


def test_parse_dcase_name_without_attributes() -> None:
    clip = parse_clip(Path("uav/train/section_00_target_train_normal_0001.flac"))
    assert (clip.machine, clip.split, clip.label, clip.domain, clip.attributes) == (
        "uav", "train", "normal", "target", "")


def test_parse_mimii_names() -> None:
    clip = parse_clip(Path("fan/test/anomaly_id_00_0dB_AnudeepKonda_00000000.wav"))
    assert (clip.machine, clip.split, clip.label, clip.domain, clip.section) == ("fan", "test", "anomaly", None, None)
    assert clip.attributes == "id_00_0dB_AnudeepKonda_00000000"
    assert clip.is_anomaly
    assert parse_clip(Path("pump/test/normal_unknown_id_unknown_snr_brmdv_x.wav")).label == "normal"
    assert parse_clip(Path("valve/abnormal_00000003.WAV")).label == "anomaly"


def test_split_from_name_when_folder_is_not_a_split() -> None:
    clip = parse_clip(Path("incoming/section_00_source_train_normal_0003.wav"))
    assert (clip.machine, clip.split) == ("incoming", "train")


def test_folder_split_wins_over_name() -> None:
    assert parse_clip(Path("fan/test/section_00_source_train_normal_0003.wav")).split == "test"


def test_explicit_machine_overrides_layout() -> None:
    assert parse_clip(Path("x/test/section_00_source_test_normal_0003.wav"), "gearbox").machine == "gearbox"


def test_evaluation_set_name_has_no_label() -> None:
    clip = parse_clip(Path("fan/test/section_00_0042.wav"), strict=True)
    assert (clip.label, clip.domain, clip.section, clip.split) == (None, None, "00", "test")
    assert not clip.is_anomaly


def test_unknown_name_lenient_and_strict() -> None:
    clip = parse_clip(Path("fan/test/recording_2024-05-01.wav"))
    assert (clip.label, clip.domain, clip.section, clip.attributes, clip.split) == (None, None, None, "", "test")
    with pytest.raises(DatasetError, match="recording_2024-05-01.wav"):
        parse_clip(Path("fan/test/recording_2024-05-01.wav"), strict=True)


def test_machine_cannot_be_inferred() -> None:
    with pytest.raises(DatasetError, match="machine"):
        parse_clip(Path("section_00_source_test_normal_0001.wav"))


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_scan_dataset_on_a_temp_tree(tmp_path: Path) -> None:
    names = [
        "fan/train/section_00_source_train_normal_0001.wav",
        "fan/train/section_00_source_train_normal_0000.wav",
        "fan/test/section_00_target_test_anomaly_0000_m-n_W.FLAC",
        "fan/test/notes.txt",
        "fan/test/._section_00_source_test_normal_0000.wav",
        "pump/test/normal_id_00_00000000.wav",
        "empty/train/readme.md",
        "docs/section_00_source_train_normal_0000.wav",
        ".hidden/train/section_00_source_train_normal_0000.wav",
    ]
    for name in names:
        _touch(tmp_path / name)
    found = scan_dataset(tmp_path)
    assert list(found) == ["fan", "pump"]
    assert [c.path.relative_to(tmp_path).as_posix() for c in found["fan"]] == [
        "fan/test/section_00_target_test_anomaly_0000_m-n_W.FLAC",
        "fan/train/section_00_source_train_normal_0000.wav",
        "fan/train/section_00_source_train_normal_0001.wav",
    ]
    assert [(c.split, c.label, c.domain) for c in found["fan"]] == [
        ("test", "anomaly", "target"), ("train", "normal", "source"), ("train", "normal", "source")]
    assert all(c.machine == "fan" for c in found["fan"])
    assert found["pump"][0].label == "normal"


def test_scan_dataset_on_shared_benchmark(shared_data: Path) -> None:
    found = scan_dataset(shared_data / "bench" / "fan-noisy")
    clips = found["fan"]
    assert list(found) == ["fan"] and len(clips) == 88
    assert sum(c.split == "train" for c in clips) == 32
    assert sum(c.is_anomaly for c in clips) == 36


def test_scan_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="missing"):
        scan_dataset(tmp_path / "missing")
    _touch(tmp_path / "fan" / "train" / "readme.txt")
    with pytest.raises(DatasetError, match=str(tmp_path)):
        scan_dataset(tmp_path)


def test_find_audio_expands_and_sorts(tmp_path: Path) -> None:
    b = _touch(tmp_path / "d" / "sub" / "b.flac")
    a = _touch(tmp_path / "d" / "a.WAV")
    _touch(tmp_path / "d" / "c.mp3")
    _touch(tmp_path / "d" / ".cache" / "x.wav")
    single = _touch(tmp_path / "z.wav")
    assert find_audio([single, tmp_path / "d", a]) == sorted([a, b, single])
    assert {s.lower() for s in AUDIO_SUFFIXES} == {".wav", ".flac"}


def test_find_audio_errors(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="nope"):
        find_audio([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(AudioError, match="no audio"):
        find_audio([tmp_path / "empty"])
    with pytest.raises(AudioError, match="no audio"):
        find_audio([])
    with pytest.raises(AudioError, match="notes.txt"):
        find_audio([_touch(tmp_path / "notes.txt")])
