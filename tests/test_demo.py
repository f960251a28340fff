"""The README's main job, ``asd-monitor demo``: the real daemon on the bundled recordings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_demo_raises_its_alert_and_keeps_the_evidence(tmp_path: Path) -> None:
    state = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "monitor.cli", "demo", "--speed", "40", "--state-dir", str(state)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "ranks move in steps of 1/7" in out and "ANOMALOUS above rank 0.9" in out
    log = result.stderr.splitlines()
    marker = next(i for i, line in enumerate(out.splitlines()) if line.startswith("-- the fault begins 30 s"))
    assert marker > 0
    raised = [line for line in log if "ALERT RAISE" in line]
    assert len(raised) == 1
    events = [json.loads(line) for line in (state / "events.jsonl").read_text().splitlines()]
    (alert,) = [e["alert"] for e in events if e["kind"] == "alert" and e["alert"]["type"] == "raise"]
    assert Path(alert["clip"]).is_file() and alert["clip"] in out  # the clip is kept and named on the console
