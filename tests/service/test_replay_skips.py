"""A replayed file that cannot be used (unreadable, or recorded below the source's rate) is
skipped with one event, and the files after it are scored as usual: never a device fault."""

from __future__ import annotations

from pathlib import Path

import soxr

from monitor.service.daemon import Daemon
from tests.daemons import clips, daemon_config, enroll, events_of, run_to_end
from tests.synth import RATE, machine_sound, write_clip


def test_unusable_files_are_skipped_with_an_event_and_the_replay_goes_on(tmp_path: Path) -> None:
    good = clips(tmp_path / "replay", "nnn")
    junk = tmp_path / "replay" / "junk.wav"
    junk.write_bytes(b"RIFF but not really a wav file")
    phone = write_clip(tmp_path / "replay" / "phone.wav",
                       soxr.resample(machine_sound(7), RATE, 8000).astype("float32"), 8000)
    config = daemon_config(tmp_path, [good[0], junk, phone, good[1], good[2]])
    enroll(config, tmp_path / "enroll")
    daemon = Daemon(config)
    run_to_end(daemon)
    skipped = [e for e in events_of(daemon) if e["kind"] == "file_skipped"]
    assert [e["file"] for e in skipped] == [str(junk), str(phone)]
    assert all(e["source"] == "replay" and e["machines"] == ["motor"] for e in skipped)
    assert "8000 Hz" in skipped[1]["error"] and f"{RATE} Hz" in skipped[1]["error"]
    metrics = daemon.telemetry.registry.get_sample_value
    assert metrics("asd_windows_total", {"machine": "motor", "status": "ok"}) == 3  # the three good files only
    assert not metrics("asd_windows_total", {"machine": "motor", "status": "sensor_fault"})
    assert daemon.sources["replay"].error is None
