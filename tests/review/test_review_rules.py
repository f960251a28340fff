"""Answering an alert without a daemon: the verdict's checks, the CLI's exit codes and one-line
errors, exactly once across a crash, the fault library, and a clip path outside the clip store."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from monitor.bank.store import BankStore
from monitor.cli import main
from monitor.config import EnrollmentConfig
from monitor.errors import CommandError
from monitor.outputs.messages import Topics
from monitor.review.apply import Reviewer, reviewed_version
from monitor.review.verdicts import (
    MAX_PAYLOAD_BYTES,
    ReviewLog,
    Verdict,
    event_logs,
    find_alert,
    parse_verdict,
)
from monitor.scoring.detector import Detector
from tests.daemons import clips, daemon_config, enroll, write_yaml
from tests.review.alerts import clip_path, raise_alert
from tests.synth import RATE, machine_sound

CFG = EnrollmentConfig(conditions=["day", "night"])


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"{oops", "malformed JSON"),
        (b"[1]", "expected a JSON object"),
        (b'{"event_id": "motor-1", "verdict": "broken"}', "verdict must be one of normal, fault, unsure"),
        (b'{"event_id": "../etc", "verdict": "normal"}', "event_id must be"),
        (b'{"event_id": 7, "verdict": "normal"}', "event_id must be"),
        (b'{"event_id": "motor-1", "verdict": "normal", "condition": "weekend"}', "unknown condition 'weekend'"),
        (b'{"event_id": "motor-1", "verdict": "normal"}', "unknown condition 'default'"),  # normal enrolls: a listed one
        (b'{"event_id": "motor-1", "verdict": "fault", "condition": "weekend"}', "unknown condition 'weekend'"),
        (b'{"event_id": "motor-1", "verdict": "normal", "condition": "a/b"}', "condition must be a short name"),
        (b'{"event_id": "motor-1", "verdict": "unsure", "note": 5}', "note must be text"),
        (b'{"event_id": "motor-1", "verdict": "fault", "colour": "red"}', "unknown field 'colour'"),
        (b'{"event_id": "motor-1", "verdict": "normal", "condition": "day", "request_id": 3}', "request_id must be a string"),
        (json.dumps({"event_id": "motor-1", "verdict": "unsure", "note": "x" * MAX_PAYLOAD_BYTES}).encode(),
         "payload too large"),
    ],
)
def test_bad_verdicts_are_refused_with_a_reason(payload: bytes, message: str) -> None:
    with pytest.raises(CommandError, match=message):
        parse_verdict(payload, CFG)


def test_a_valid_verdict_and_the_topics() -> None:
    verdict = parse_verdict(b'{"event_id": "motor-1795923908300", "verdict": "normal", "condition": "night", '
                            b'"note": "forklift\\n passing", "token": "t", "request_id": "r1"}', CFG)
    assert verdict == Verdict("motor-1795923908300", "normal", "night", "forklift passing", "r1")
    assert parse_verdict(b'{"event_id": "m-1", "verdict": "unsure"}', CFG).condition == "default"
    topics = Topics("asd", "plant", "box")
    assert topics.parse_command("asd/plant/fan-1/cmd/review") == ("fan-1", "review")
    assert topics.parse_command("asd/plant/fan-1/cmd/enroll") == ("fan-1", "enroll")
    assert topics.parse_command("asd/plant/fan-1/cmd/reboot") is None
    assert topics.command_machine("asd/plant/fan-1/cmd/review") is None  # the enrollment parser is unchanged
    assert topics.reply("fan-1") == "asd/plant/fan-1/reply/enroll"
    assert topics.reply("fan-1", "review") == "asd/plant/fan-1/reply/review"
    assert topics.review("fan-1") == "asd/plant/fan-1/review"


@pytest.fixture
def site(tmp_path: Path):
    """A config (logmel, machine motor), its YAML, an enrolled bank and one raised alert."""
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "n"))
    enroll(config, tmp_path / "enroll")
    alert = raise_alert(config, "motor", machine_sound(7, 10.0, fault=True), RATE, "motor-1795923908300")
    return config, write_yaml(tmp_path / "site.yaml", config), alert


def _store(config) -> BankStore:
    return BankStore(config.daemon.state_dir / "banks" / "motor")


def _reviews(config) -> list[dict]:
    path = config.daemon.state_dir / "reviews.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_the_cli_reviews_lists_and_refuses_with_exit_codes(site, capsys) -> None:
    config, path, alert = site
    store = _store(config)
    assert main(["review", "list", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert alert.event_id in out and "motor" in out and "1.000" in out and alert.clip in out

    # Bad input: exit 2 (usage) or 65 (refused), one line on stderr, nothing changed.
    for argv, code, message in [
        (["review", "-c", str(path), alert.event_id], 2, "needs a verdict"),
        (["review", "-c", str(path), alert.event_id, "maybe"], 2, "needs a verdict"),
        (["review", "-c", str(path), "motor-1", "normal"], 65, "unknown event 'motor-1'"),
        (["review", "-c", str(path), alert.event_id, "normal", "--condition", "a/b"], 65, "condition must be"),
        (["review", "list", "normal", "-c", str(path)], 2, "review list takes no verdict"),
        (["review", str(alert.event_id), "normal"], 2, "review needs --config"),
    ]:
        assert main(argv) == code, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert store.current() == "v000001" and _reviews(config) == []

    assert main(["review", "-c", str(path), alert.event_id, "normal", "--note", "a forklift"]) == 0
    out = capsys.readouterr().out
    assert "version v000002" in out and "bank rollback" in out
    assert store.current() == "v000002" and store.load().note.startswith(f"review {alert.event_id}")
    (record,) = _reviews(config)
    assert (record["verdict"], record["who"], record["version"], record["note"], record["condition"]) == (
        "normal", "cli", "v000002", "a forklift", "default")
    events = [json.loads(line) for line in (config.daemon.state_dir / "events.jsonl").read_text().splitlines()]
    assert events[-1]["kind"] == "review" and events[-1]["event_id"] == alert.event_id

    # A second verdict on the same alert: refused, nothing changed.
    assert main(["review", "-c", str(path), alert.event_id, "fault"]) == 65
    assert "already reviewed: normal" in capsys.readouterr().err
    assert store.current() == "v000002" and len(_reviews(config)) == 1
    assert not (config.daemon.state_dir / "faults").exists()

    assert main(["review", "list", "-c", str(path)]) == 0
    assert capsys.readouterr().out.strip() == "no alerts to review"
    assert main(["review", "list", "-c", str(path), "--all"]) == 0
    assert "normal (cli" in capsys.readouterr().out


def test_a_crash_between_the_bank_version_and_the_record_enrolls_once(site, monkeypatch) -> None:
    """Killed after BankStore.save but before the verdict's line: the version's note names the
    event, so the second attempt only records the verdict."""
    config, _path, alert = site
    store = _store(config)
    detector = Detector.from_config(config)
    reviewer = Reviewer(config, lambda: detector)

    def killed(self, record) -> None:
        raise KeyboardInterrupt("killed before the record")

    with monkeypatch.context() as patch:
        patch.setattr(ReviewLog, "append", killed)
        with pytest.raises(KeyboardInterrupt):
            reviewer.apply(Verdict(alert.event_id, "normal"), "cli")
    assert store.versions() == ["v000001", "v000002"] and _reviews(config) == []
    assert reviewed_version(store, alert.event_id) == "v000002"

    applied = reviewer.apply(Verdict(alert.event_id, "normal"), "cli")
    assert applied.recovered and applied.record.version == "v000002"
    assert store.versions() == ["v000001", "v000002"]  # not enrolled a second time
    assert len(store.load()) == len(store.load("v000001")) + 1
    assert [r["version"] for r in _reviews(config)] == ["v000002"]
    with pytest.raises(CommandError, match="already reviewed"):
        reviewer.apply(Verdict(alert.event_id, "normal"), "cli")


def test_a_crash_before_current_moved_is_finished_on_the_second_attempt(site, monkeypatch) -> None:
    """Killed inside BankStore.save, after the version was renamed into place but before
    CURRENT moved: the second attempt makes that version current instead of enrolling again."""
    config, _path, alert = site
    store = _store(config)
    detector = Detector.from_config(config)

    def killed(self, version) -> None:
        raise KeyboardInterrupt("killed before CURRENT moved")

    with monkeypatch.context() as patch:
        patch.setattr(BankStore, "_write_current", killed)
        with pytest.raises(KeyboardInterrupt):
            Reviewer(config, lambda: detector).apply(Verdict(alert.event_id, "normal"), "cli")
    assert store.versions() == ["v000001", "v000002"] and store.current() == "v000001"
    applied = Reviewer(config, lambda: detector).apply(Verdict(alert.event_id, "normal"), "cli")
    assert applied.recovered and store.current() == "v000002" and store.versions() == ["v000001", "v000002"]


def test_a_confirmed_fault_goes_to_the_library_never_the_bank(site) -> None:
    config, _path, alert = site
    detector = Detector.from_config(config)
    folder = config.daemon.state_dir / "faults" / "motor" / alert.event_id
    with pytest.MonkeyPatch.context() as patch:  # killed after the folder, before the record
        patch.setattr(ReviewLog, "append", lambda self, record: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            Reviewer(config, lambda: detector).apply(Verdict(alert.event_id, "fault", note="bearing"), "cli")
    assert folder.is_dir() and _reviews(config) == []
    applied = Reviewer(config, lambda: detector).apply(Verdict(alert.event_id, "fault", note="bearing"), "cli")
    assert applied.recovered and [r["verdict"] for r in _reviews(config)] == ["fault"]
    assert applied.record.library == str(folder) and applied.record.version is None
    assert sorted(p.name for p in folder.iterdir()) == sorted([clip_path(alert).name, "embeddings.npz", "verdict.json"])
    with np.load(folder / "embeddings.npz") as npz:
        assert npz["logmel"].shape[0] == 1 and np.isfinite(npz["logmel"]).all()
    meta = json.loads((folder / "verdict.json").read_text())
    assert (meta["verdict"], meta["note"], meta["alert"]["event_id"]) == ("fault", "bearing", alert.event_id)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert _store(config).versions() == ["v000001"]


def test_a_clip_outside_the_clip_store_is_refused(site, tmp_path: Path) -> None:
    config, _path, alert = site
    outside = tmp_path / "elsewhere.flac"
    outside.write_bytes(clip_path(alert).read_bytes())
    sneaky = raise_alert(config, "motor", np.zeros(1), RATE, "motor-2", clip=str(outside))
    dotted = raise_alert(config, "motor", np.zeros(1), RATE, "motor-3",
                         clip=str(config.daemon.state_dir / "clips" / "motor" / ".." / ".." / "banks" / "x.flac"))
    reviewer = Reviewer(config, lambda: Detector.from_config(config))
    for bad in (sneaky, dotted):
        for verdict in ("normal", "fault"):
            with pytest.raises(CommandError, match="is not in the clip store"):
                reviewer.apply(Verdict(bad.event_id, verdict), "cli")
    assert _store(config).versions() == ["v000001"] and _reviews(config) == []
    assert not (config.daemon.state_dir / "faults" / "motor" / "motor-2").exists()
    # 'unsure' needs no audio: it is recorded.
    assert reviewer.apply(Verdict(sneaky.event_id, "unsure"), "cli").record.verdict == "unsure"


def test_alerts_are_found_in_rotated_event_logs(site) -> None:
    config, _path, alert = site
    log = config.daemon.state_dir / "events.jsonl"
    log.rename(log.with_name("events.jsonl.2"))
    later = raise_alert(config, "motor", machine_sound(8, 10.0, fault=True), RATE, "motor-later", start=1_795_924_000.0)
    assert [p.name for p in event_logs(log)] == ["events.jsonl.2", "events.jsonl"]
    assert find_alert(log, alert.event_id).clip == alert.clip and find_alert(log, later.event_id).clip == later.clip
    config2 = replace(config, enrollment=replace(config.enrollment, control_socket=False))
    applied = Reviewer(config2, lambda: Detector.from_config(config2)).apply(Verdict(alert.event_id, "unsure"), "cli")
    assert applied.record.machine == "motor"
