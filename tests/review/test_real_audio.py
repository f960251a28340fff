"""A false alarm and a confirmed fault on real recordings (MIMII fan, shared data), with the
default backbone: the reviewed false alarm stops alarming, the confirmed fault still alarms and
never enters the bank, and ``bank rollback`` undoes the review."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import soundfile as sf

from monitor.bank.store import BankStore
from monitor.cli import main
from monitor.config import MachineConfig
from monitor.enrollment.files import enroll_files
from monitor.review.apply import Reviewer
from monitor.review.verdicts import Verdict
from monitor.scoring.detector import Detector
from monitor.scoring.recording import score_recording
from tests.daemons import daemon_config, write_yaml
from tests.review.alerts import clip_path, raise_alert


def test_a_reviewed_false_alarm_stops_alarming_and_a_confirmed_fault_does_not(shared_data: Path, tmp_path: Path,
                                                                               capsys) -> None:
    fan = shared_data / "mimii-samples" / "fan" / "test"
    normals = sorted(fan.glob("normal_unknown_id_unknown_snr_arlene14ko_*.wav"))[:5]
    # Another recording of a healthy fan (other id, other session): a false alarm against a bank of 5 clips.
    other_normal = fan / "normal_id_04_0dB_AnudeepKonda_00000000.wav"
    faulty = fan / "anomaly_unknown_id_unknown_snr_arlene14ko_00000008.wav"
    config = daemon_config(tmp_path, [other_normal], backbone="aisfx")
    config = replace(config, machines=[MachineConfig("fan", "replay")])
    detector = Detector.from_config(config)
    store = BankStore(config.daemon.state_dir / "banks" / "fan")
    enroll_files(detector, store, normals, "default")
    threshold = config.alerts.threshold

    def fused(path: Path) -> float:
        scorer = detector.unfitted()
        scorer.fit(store.load())
        return score_recording(scorer, path).fused_rank

    alarms = {}
    for name, path, start in (("false", other_normal, 1_795_923_908.0), ("fault", faulty, 1_795_924_908.0)):
        samples, rate = sf.read(path, dtype="float32")
        alert = raise_alert(config, "fan", samples, rate, f"fan-{int(start * 1000)}", start=start)
        alarms[name] = alert
        assert fused(clip_path(alert)) > threshold, name  # both alarm before the review

    reviewer = Reviewer(config, lambda: detector)
    normal = reviewer.apply(Verdict(alarms["false"].event_id, "normal", note="other fan session"), "cli")
    assert normal.record.version == "v000002" and store.current() == "v000002"
    assert fused(clip_path(alarms["false"])) < threshold  # the same clip no longer alarms
    assert fused(other_normal) < threshold

    fault = reviewer.apply(Verdict(alarms["fault"].event_id, "fault"), "cli")
    assert fault.record.version is None and store.versions() == ["v000001", "v000002"]
    assert not any(clip_path(alarms["fault"]).name in item.source for item in store.load().items)
    assert fused(clip_path(alarms["fault"])) > threshold  # a confirmed fault still alarms
    assert (Path(fault.record.library) / "embeddings.npz").is_file()

    # The review is undone like any enrollment.
    assert main(["bank", "rollback", "--bank", str(store.path)]) == 0
    assert store.current() == "v000001"
    assert fused(clip_path(alarms["false"])) > threshold
    capsys.readouterr()
    path = write_yaml(tmp_path / "site.yaml", config)
    assert main(["review", "list", "-c", str(path), "--all"]) == 0
    listed = capsys.readouterr().out
    assert "normal (cli" in listed and "fault (cli" in listed
