"""Tests of monitor.outputs.events: valid ordered JSON lines, rotation, whole lines under concurrency, failures."""

from __future__ import annotations

import errno
import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from monitor.outputs.events import EventLog
from monitor.outputs.messages import AlertEvent, BackboneScore


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_lines_are_json_in_order(tmp_path: Path) -> None:
    path = tmp_path / "state" / "events.jsonl"  # the folder is created
    alert = AlertEvent(
        event_id="e1", type="raise", site="plant", machine="press-1", start="s", end="e", fused_rank=0.995,
        threshold=0.99, backbones={"aisfx": BackboneScore(float("nan"), 0.999)}, condition=None, clip=None)
    with EventLog(path) as log:
        assert log.write("state", machine="press-1", state="normal")
        assert log.write("alert", alert=alert, rank=float("nan"), level=float("-inf"), count=np.int64(3),
                         score=np.float32(0.5), ranks=np.array([0.25, np.nan]), faults=("silence",), path=tmp_path)
        for i in range(10):
            log.write("bank", machine="press-1", version=f"v{i:06d}")

    records = _lines(path)
    assert [r["kind"] for r in records] == ["state", "alert"] + ["bank"] * 10
    assert [r["version"] for r in records[2:]] == [f"v{i:06d}" for i in range(10)]
    assert list(records[0]) == ["time", "kind", "machine", "state"]
    for r in records:
        when = datetime.fromisoformat(r["time"].replace("Z", "+00:00"))
        assert when.tzinfo == timezone.utc and abs((datetime.now(timezone.utc) - when).total_seconds()) < 60
    second = records[1]
    assert second["alert"]["backbones"] == {"aisfx": {"score": None, "rank": 0.999}}
    assert second["alert"]["machine"] == "press-1" and second["alert"]["schema"] == "asd.alert/1"
    assert second["rank"] is None and second["level"] is None
    assert second["count"] == 3 and second["score"] == 0.5 and second["ranks"] == [0.25, None]
    assert second["faults"] == ["silence"] and second["path"] == str(tmp_path)
    assert "NaN" not in path.read_text(encoding="utf-8")


def test_appends_to_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventLog(path) as log:
        log.write("start", n=1)
    with EventLog(path) as log:
        log.write("start", n=2)
    assert [r["n"] for r in _lines(path)] == [1, 2]


def test_time_is_reserved(tmp_path: Path) -> None:
    with EventLog(tmp_path / "events.jsonl") as log, pytest.raises(ValueError, match="time"):
        log.write("alert", time="yesterday")


def test_rotation_by_size(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    max_bytes = 1000
    with EventLog(path, max_bytes=max_bytes, backups=2) as log:
        for i in range(200):
            log.write("tick", i=f"{i:03d}", pad="x" * 40)  # every line the same length
        line_bytes = len(path.read_bytes().splitlines(keepends=True)[0])

    files = [path, path.with_name("events.jsonl.1"), path.with_name("events.jsonl.2")]
    assert not path.with_name("events.jsonl.3").exists()
    for file in files:
        assert max_bytes - line_bytes < file.stat().st_size <= max_bytes or file == path
    kept = [int(r["i"]) for file in reversed(files) for r in _lines(file)]
    # The newest lines survive, contiguous and in order; the oldest went with the dropped backup.
    assert kept == list(range(200 - len(kept), 200))
    assert len(kept) >= 2 * (max_bytes // line_bytes)


def test_rotation_counts_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"kind": "old"}\n' * 20, encoding="utf-8")
    with EventLog(path, max_bytes=330, backups=1) as log:
        log.write("new")
    assert _lines(path.with_name("events.jsonl.1")) == [{"kind": "old"}] * 20
    assert [r["kind"] for r in _lines(path)] == ["new"]


def test_no_backups_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventLog(path, max_bytes=200, backups=0) as log:
        for i in range(20):
            log.write("tick", i=i)
    assert list(tmp_path.iterdir()) == [path]
    assert _lines(path)[-1]["i"] == 19


def test_threads_never_interleave_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    threads, per_thread = 8, 100
    barrier = threading.Barrier(threads)

    def writer(n: int, log: EventLog) -> None:
        barrier.wait()
        for i in range(per_thread):
            log.write("tick", thread=n, i=i, pad=str(n) * (500 + 37 * n))

    with EventLog(path, max_bytes=10**9) as log:
        workers = [threading.Thread(target=writer, args=(n, log)) for n in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    records = _lines(path)  # every line parses
    assert len(records) == threads * per_thread
    for n in range(threads):
        mine = [r for r in records if r["thread"] == n]
        assert [r["i"] for r in mine] == list(range(per_thread))
        assert all(r["pad"] == str(n) * (500 + 37 * n) for r in mine)


def test_a_failed_write_leaves_no_partial_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "events.jsonl"
    with EventLog(path) as log:
        assert log.write("before")

        def full_disk(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", full_disk)
        assert log.write("lost", pad="x" * 100) is False
        monkeypatch.undo()
        assert log.write("after")
    assert [r["kind"] for r in _lines(path)] == ["before", "after"]
