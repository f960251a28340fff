"""Small helpers shared by the benchmarks: the machine's load while they run, a plain-text table,
and one JSON file per benchmark under ``benchmarks/results/``.

This machine is shared: other jobs may be running beside a benchmark, so every JSON result
records the load average (``os.getloadavg()``) at the start, at the end and sampled during the
run. Absolute times are noise under such load; the benchmarks report ratios measured side by
side in one run wherever a comparison matters.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED_DATA = Path(os.environ.get("ASD_SHARED_DATA") or ROOT.parent / "shared" / "data")  # as in tests/conftest.py

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.broker import SBIN_PATH, Broker, free_port  # noqa: E402  (needs the repository on sys.path)


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


class LoadMonitor:
    """Samples the 1-minute load average every ``interval`` seconds in a background thread.

    ``with LoadMonitor() as load: ...`` then ``load.summary()``: start, end, min, mean, max of
    the 1-minute average and the number of CPUs, for the JSON result.
    """

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self.start: list[float] = []
        self.end: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LoadMonitor:
        self.start = loadavg()
        self.samples = [self.start[0]]
        self._thread = threading.Thread(target=self._run, name="loadavg", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(round(os.getloadavg()[0], 2))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.end = loadavg()
        self.samples.append(self.end[0])

    def summary(self) -> dict[str, Any]:
        samples = self.samples or [os.getloadavg()[0]]
        return {
            "cpus": os.cpu_count(),
            "start_1_5_15": self.start,
            "end_1_5_15": self.end or loadavg(),
            "min_1m": min(samples),
            "mean_1m": round(sum(samples) / len(samples), 2),
            "max_1m": max(samples),
            "samples": len(samples),
        }


def environment() -> dict[str, Any]:
    """What produced a result: host, versions, git commit (with a flag for local changes)."""
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "argv": sys.argv,
    }
    try:
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    for module in ("numpy", "onnxruntime", "faiss"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # a benchmark that does not need it may run without it
            pass
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["git_commit"] = commit + ("+local-changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """A fixed-width text table (floats to 4 significant digits); printed and returned."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            if value != value:
                return "nan"
            return f"{value:.4g}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)
    text = "\n".join(lines)
    print(text + "\n", flush=True)
    return text


def write_json(name: str, data: dict[str, Any], load: LoadMonitor | None = None) -> Path:
    """Write ``benchmarks/results/<name>.json`` with the environment and the load added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "environment": environment(),
               "load": load.summary() if load is not None else {"cpus": os.cpu_count(), "now_1_5_15": loadavg()}}
    payload.update(data)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    print(f"wrote {path.relative_to(ROOT)}", flush=True)
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100, linear interpolation); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# --------------------------------------------------------------------------- MQTT broker

def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory now (VmRSS) or its peak (VmHWM) of this process, in MB.

    Not ``ru_maxrss``: Linux carries it across fork and exec, so a child started by a
    benchmark would report at least the parent's resident size at the fork."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


_embedding_memo: dict[tuple[str, bytes], Any] = {}
memo_stats = {"hits": 0, "misses": 0}


def memoise_embeddings() -> None:
    """Make ``Backbone.embed`` return the stored output for an input it has seen, keyed by the
    backbone and the input's exact bytes: the same input gives the same output, so a benchmark
    that scores the same audio under several settings embeds it once."""
    import hashlib

    import numpy as np

    from monitor.scoring.backbone import Backbone

    original = Backbone.embed

    def embed(self, windows: np.ndarray) -> np.ndarray:
        key = (self.name, hashlib.sha1(np.ascontiguousarray(windows, dtype=np.float32).tobytes()).digest()
               + str(windows.shape).encode())
        if key in _embedding_memo:
            memo_stats["hits"] += 1
            return _embedding_memo[key].copy()
        memo_stats["misses"] += 1
        out = original(self, windows)
        _embedding_memo[key] = out.copy()
        return out

    Backbone.embed = embed


def start_mosquitto(directory: Path) -> Broker | None:
    """A private mosquitto on a free 127.0.0.1 port, the one the tests use (tests/broker.py);
    None when mosquitto is not installed (apt-get install mosquitto mosquitto-clients)."""
    if shutil.which("mosquitto", path=SBIN_PATH) is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    broker = Broker(directory, free_port())
    broker.start()
    return broker
