"""End-to-end cost of the daemon: latency to MQTT, CPU per stream, memory, and how many machines
one daemon watches in real time on this machine.

What runs: the real ``monitor.service.daemon.Daemon`` with the built-in default config (backbone
``aisfx``, Mahalanobis KNN, default alerts), one multi-channel ``file`` source replayed at
speed 1.0 (real time; one machine per channel, distinct synthetic machine audio per channel from
``tests/synth.py``, 16 kHz, written as 10 s WAV files so only 10 s is decoded at a time), every
machine on a copy-free shared bank of 30 enrolled windows, a real mosquitto on loopback started
here, and an independent subscriber (``mosquitto_sub``, its own process) on the score topics.

How it is measured, through the daemon's public pieces:

* A replayed file normally *waits* for the models (every window gets scored). To measure when a
  live microphone would lose windows, the file source is marked ``live`` once started, so its
  windows are queued as a microphone's are (a full queue drops its oldest window and counts it
  in ``asd_windows_total{status="dropped"}``); ``WindowQueue.put`` is wrapped to record the
  queue depth at each put.
* A listener (``Daemon.add_listener``) receives each window's ``WindowReport``: when its last
  sample was available (``ready``, the same start point as the histogram
  ``asd_window_latency_seconds``), when the worker took it, when every output was issued
  (including the MQTT publish call: paho's ``publish`` returns once the message is queued for
  its network thread), and the seconds of each pipeline stage. These are the histogram's own
  observations, kept raw for percentiles (the histogram's sum and count are checked against
  them). The subscriber gives the second figure: arrival at another MQTT client minus the
  window's end time from the payload (``end``; millisecond resolution; with 10 ms blocks the
  file source makes the last block available up to 10 ms before a sound card would).

Per run (one fresh process per run; peak memory is its VmHWM, not ``ru_maxrss``, which Linux keeps
across fork and exec and so reports the parent's peak in a child): N machines, hop H,
S seconds of audio. The daemon limits numpy's BLAS and faiss's OpenMP to one thread per thread
(``runtime.compute_threads: 1``, see monitor/service/threads.py; onnxruntime keeps its own pool): with
the libraries' defaults a machine's bank fit took ~12 s instead of ~0.5 s on this busy machine,
which made starting 32 machines take minutes (one run measures the daemon with
``compute_threads: 0``). A run "keeps up" when no window was dropped, every window of every
machine was processed (with spread phases machine i's grid starts i x H / N later, so the
count per machine is computed from its offset) and each was done within the hop of its end,
before its machine's next window arrived: no backlog is carried from one hop to the next. The
queue is the default ``daemon.queue_size: 0`` = ``max(8, 2 N)``; one run measures a queue fixed
at 8 (the default before it was sized by the machine count), and every run records the deepest
queue seen.

Variants, run side by side on every rung of the ladder (``--variants``; a variant that fails
to keep up stops climbing): ``after`` is the daemon as shipped (window phases spread over the
hop, workers chosen from the core count); ``before`` is the same code set as the daemon was
before phases and workers existed (``window_phase: aligned``, one worker: every window of a
source arrives at the same instant and waits its turn); ``1x2`` and ``2x1`` compare one worker
with onnxruntime on two threads against two workers with one thread each. Each run also
records when every bank was fitted (they are fitted while the first windows are recorded), the
slowest first window per machine, and the capacity the daemon itself estimates.

Also measured, side by side in one process: onnxruntime on ``monitor/assets/aisfx.onnx`` with
intra-op threads 1 / 2, a parallel executor with 2 inter-op threads, two worker threads at one
intra-op thread each, and batches of 1..16 windows per call (what batching the windows of
several machines into one call would gain; also on the CUDA provider where onnxruntime has one).

    .venv/bin/python benchmarks/daemon.py                   # everything, about 20 min here
    .venv/bin/python benchmarks/daemon.py --seconds 40 --hop10 1,8 --hop5 '' --no-onnx   # quick
    .venv/bin/python benchmarks/daemon.py --hop10 64 --hop5 24,32 --no-onnx --default-queue-run 0 \
        --as-shipped-run 0 --name daemon_extra               # further up the ladder
    .venv/bin/python benchmarks/daemon.py --hop10 '' --hop5 '' --no-onnx --default-queue-run 0 \
        --as-shipped-run 0 --compare-ort-threads 16,5 --name daemon_ort_threads

Results: ``benchmarks/results/<name>.json`` (default ``daemon.json``). Recorded here:
``daemon.json`` (the default command, quiet machine), ``daemon_busy.json`` (``--seconds 60``,
while other jobs held about one of the two cores; its ``keeps_up`` was recomputed with the rule
above from the recorded burst drain times), ``daemon_extra.json``, ``daemon_ort_threads.json``,
``daemon_threads.json`` and ``daemon_onnx.json`` (the commands above, and the threads / onnx
studies alone). Absolute times are noise on this shared machine: the load average is recorded in
each; compare rows of one file (ratios), not files.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from common import (
    ROOT,
    Broker,
    LoadMonitor,
    loadavg,
    percentile,
    rss_mb,
    start_mosquitto,
    table,
    write_json,
)

RATE = 16000
# Daemon settings compared side by side (window phase, workers, onnxruntime threads per call).
VARIANTS = {
    "after": ("spread", 0, 0),  # as shipped: phases spread over the hop, workers from the core count
    "before": ("aligned", 1, 0),  # the daemon before: a source's windows all at once, one worker
    "1x2": ("spread", 1, 2),  # one worker, onnxruntime on 2 threads
    "2x1": ("spread", 2, 1),  # two workers, 1 thread each
}
BANK_WINDOWS = 30
FIXED_QUEUE = 8  # daemon.queue_size before it was sized by the machine count


# ======================================================================= audio and bank

def write_multichannel(folder: Path, channels: int, seconds: int, seed: int = 1000) -> Path:
    """``seconds`` of distinct normal machine sound per channel, as 10 s WAV files (PCM 16)."""
    import soundfile as sf

    from tests.synth import machine_sound

    folder.mkdir(parents=True, exist_ok=True)
    per_file = 10
    for f in range(0, seconds, per_file):
        length = min(per_file, seconds - f)
        data = np.stack([machine_sound(seed + 997 * c + f, length) for c in range(channels)], axis=1)
        sf.write(folder / f"{f // per_file:04d}.wav", data, RATE, subtype="PCM_16")
    return folder


def enroll_bank(bank_dir: Path, work: Path) -> float:
    """A bank of ``BANK_WINDOWS`` 10 s windows of the synthetic machine; returns seconds taken."""
    from monitor.bank.store import BankStore
    from monitor.config import Config
    from monitor.enrollment.files import enroll_files
    from monitor.scoring.detector import Detector
    from tests.synth import machine_sound, write_clip

    began = time.perf_counter()
    clips = [write_clip(work / f"enroll_{i:02d}.flac", machine_sound(i, 10.0)) for i in range(BANK_WINDOWS)]
    enroll_files(Detector.from_config(Config()), BankStore(bank_dir), clips, "default")
    return time.perf_counter() - began


# ================================================================= one run (child process)

def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def stages(records: list) -> dict[str, list[float]]:
    """Seconds per pipeline stage of each window, as the daemon measured them (sensor checks,
    embed = resample + onnxruntime, ``embed:<backbone>`` = the onnxruntime call alone, score =
    KNN + ranks + fusion, outputs = alert state, MQTT, metrics, event log)."""
    out: dict[str, list[float]] = {}
    for r in records:
        for stage, seconds in [*r.stage_seconds.items(), *((f"embed:{n}", s) for n, s in r.inference_seconds.items())]:
            out.setdefault(stage, []).append(seconds)
    return out


def child(args: argparse.Namespace) -> int:
    """Run the daemon once; write a JSON result to ``args.out``."""
    sys.path.insert(0, str(ROOT))
    from monitor.config import (
        Config,
        DaemonConfig,
        MachineConfig,
        MetricsConfig,
        MqttConfig,
        RuntimeConfig,
        SourceConfig,
    )
    from monitor.service.daemon import Daemon
    from monitor.service.windows import WindowQueue

    n, hop = args.n, args.hop
    state = Path(args.state)
    config = Config(
        runtime=RuntimeConfig(threads=args.ort_threads, compute_threads=args.compute_threads),
        daemon=DaemonConfig(name="bench", state_dir=state, hop_seconds=hop, queue_size=args.queue,
                            window_phase=args.phase, workers=args.workers),
        sources=[SourceConfig(name="mc", type="file", paths=[Path(args.audio)], channels=n, sample_rate=RATE,
                              block_size=160, speed=1.0)],
        machines=[MachineConfig(f"m{i:02d}", "mc", channel=i, bank=Path(args.bank)) for i in range(n)],
        mqtt=MqttConfig(enabled=args.port > 0, port=max(args.port, 1), site="bench", client_id=f"bench-{n}-{hop}-{os.getpid()}"),
        metrics=MetricsConfig(port=0),
    )

    # ---- what the daemon reports per window (its listener hook), and the queue depth at each put
    records: list = []  # WindowReport per processed window
    depth_at_put: list[int] = []
    put = WindowQueue.put

    def counted_put(self, item):
        put(self, item)
        depth_at_put.append(self.qsize())

    WindowQueue.put = counted_put
    daemon = Daemon(config)
    daemon.add_listener(records.append)
    t0, c0 = time.perf_counter(), cpu_seconds()
    began = time.monotonic()
    daemon.start()
    # The replay stands in for a live microphone: it must not wait for the models, so a full
    # queue drops its oldest window (counted in asd_windows_total{status="dropped"}). The
    # first window needs 10 s of real-time audio, so no window is queued before this.
    daemon.sources["mc"].live = True
    start_s, start_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    rss_started = rss_mb()
    c1, t1 = cpu_seconds(), time.perf_counter()
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample_queue():
        while not stop.wait(0.05):
            samples.append((time.monotonic(), daemon.windows.qsize()))

    sampler = threading.Thread(target=sample_queue, daemon=True)
    sampler.start()
    fitted_at = None

    def watch_fits():
        nonlocal fitted_at
        for machine in daemon.machines:
            daemon.banks.wait_fitted(machine)
        fitted_at = time.monotonic()

    threading.Thread(target=watch_fits, daemon=True).start()
    try:
        daemon.run()
    finally:
        run_cpu, run_wall = cpu_seconds() - c1, time.perf_counter() - t1
        stop.set()
        sampler.join()
        daemon.stop()
    peak_rss = rss_mb("VmHWM")

    metric = daemon.telemetry.registry.get_sample_value
    names = [m.name for m in daemon.machines]
    dropped = sum(metric("asd_windows_total", {"machine": m, "status": "dropped"}) or 0 for m in names)
    ok = sum(metric("asd_windows_total", {"machine": m, "status": "ok"}) or 0 for m in names)
    faults = sum(metric("asd_windows_total", {"machine": m, "status": "sensor_fault"}) or 0 for m in names)
    hist_count = sum(metric("asd_window_latency_seconds_count", {"machine": m}) or 0 for m in names)
    hist_sum = sum(metric("asd_window_latency_seconds_sum", {"machine": m}) or 0 for m in names)
    alerts = sum(metric("asd_alerts_total", {"machine": m, "type": "raise"}) or 0 for m in names)

    latencies = [r.done - r.ready for r in records]
    waits = [r.began - r.ready for r in records]
    # Backlog: windows still being processed when their machine's next window was ready
    # (with aligned phases, every machine's: the next hop's burst).
    by_start: dict[float, list[tuple[float, float]]] = {}
    for r in records:
        by_start.setdefault(round(r.start, 3), []).append((r.ready, r.done))
    by_machine: dict[str, list] = {}
    for r in records:
        by_machine.setdefault(r.machine, []).append(r)
    carried = sum(1 for rs in by_machine.values() for a, b in zip(rs, rs[1:]) if a.done > b.ready)
    # Per group of windows ending together: from the first ready to the last done.
    last_done_after_burst = [max(d for _r, d in items) - min(r for r, _d in items) for _s, items in sorted(by_start.items())]
    audio_seconds = args.seconds
    offsets = [i * hop / n if args.phase == "spread" else 0.0 for i in range(n)]
    expected = sum(int((audio_seconds - offset - 10 + 1e-6) // hop) + 1 for offset in offsets)
    first_latency = [rs[0].done - rs[0].ready for rs in by_machine.values()]
    result = {
        "n": n, "hop_s": hop, "audio_s": audio_seconds, "queue_size": daemon.windows.maxsize, "ort_threads": args.ort_threads,
        "compute_threads": args.compute_threads, "phase": args.phase, "workers": daemon.plan.workers,
        "onnxruntime_threads": daemon.plan.threads,
        "expected_windows": expected, "processed": len(records), "ok": ok, "sensor_fault": faults,
        "dropped": dropped, "alerts_raised": alerts, "carried_over": carried,
        "keeps_up": bool(dropped == 0 and carried == 0 and len(records) == expected
                         and max(latencies, default=0.0) < hop),
        "degraded_at_end": daemon.overload.degraded, "capacity_machines": daemon.overload.capacity,
        "first_window_latency_max_s": round(max(first_latency), 3) if first_latency else None,
        "banks_fitted_after_s": round(fitted_at - began, 2) if fitted_at else None,
        "start_s": round(start_s, 2), "start_cpu_s": round(start_cpu, 2),
        "run_wall_s": round(run_wall, 2), "run_cpu_s": round(run_cpu, 2),
        "cpu_s_per_audio_s_per_stream": round(run_cpu / audio_seconds / n, 4),
        "cores_busy": round(run_cpu / run_wall, 3),
        "latency_median_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_p99_s": round(percentile(latencies, 99), 3) if latencies else None,
        "latency_max_s": round(max(latencies), 3) if latencies else None,
        "queue_wait_median_s": round(statistics.median(waits), 3) if waits else None,
        "burst_drain_s": [round(x, 3) for x in last_done_after_burst],
        "queue_max_sampled": max((d for _t, d in samples), default=0),
        "queue_max_at_put": max(depth_at_put, default=0),
        "fixed_queue_8_would_drop": bool(max(depth_at_put, default=0) >= FIXED_QUEUE),
        "histogram_count": hist_count, "histogram_mean_s": round(hist_sum / hist_count, 3) if hist_count else None,
        "rss_after_start_mb": round(rss_started, 1), "peak_rss_mb": round(peak_rss, 1),
        "stage_median_ms": {k: round(1e3 * statistics.median(v), 2) for k, v in stages(records).items()},
        "stage_calls": {k: len(v) for k, v in stages(records).items()},
        "per_window_proc_median_s": round(statistics.median([r.done - r.began for r in records]), 4) if records else None,
        "loadavg_end": loadavg(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


# ============================================================================ parent

def iso_to_epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def run_one(n: int, hop: float, seconds: int, work: Path, bank: Path, broker: Broker | None,
            queue: int = 0, ort_threads: int = 0, compute_threads: int = 1, phase: str = "spread", workers: int = 0,
            settle: float = 0.0) -> dict:
    audio = write_multichannel(work / f"audio-{n}ch-{seconds}s", n, seconds)
    out = work / f"result-{n}-{hop}-{queue}.json"
    state = work / f"state-{n}-{hop}-{queue}"
    shutil.rmtree(state, ignore_errors=True)
    sub, sub_file = None, work / f"sub-{n}-{hop}-{queue}.txt"
    if broker is not None:
        sub_cmd = [shutil.which("mosquitto_sub") or "mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port),
                   "-t", "asd/bench/+/score", "-F", "%U %p", "-q", "0"]
        sub = subprocess.Popen(sub_cmd, stdout=open(sub_file, "w"), stderr=subprocess.DEVNULL)
    broker_cpu0 = broker.cpu_seconds() if broker else None
    cmd = [sys.executable, __file__, "--child", "--n", str(n), "--hop", str(hop), "--seconds", str(seconds),
           "--audio", str(audio), "--bank", str(bank), "--state", str(state), "--out", str(out),
           "--port", str(broker.port if broker else 0), "--queue", str(queue), "--ort-threads", str(ort_threads),
           "--compute-threads", str(compute_threads), "--phase", phase, "--workers", str(workers)]
    if settle:  # a quiet box: the previous run's own load has decayed (at most 3 min)
        deadline = time.monotonic() + 180
        while os.getloadavg()[0] >= settle and time.monotonic() < deadline:
            time.sleep(5)
    load_before = loadavg()
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if sub is not None:
        time.sleep(1.0)
        sub.terminate()
        sub.wait(timeout=10)
    if proc.returncode != 0:
        raise RuntimeError(f"run n={n} hop={hop} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    result["process_wall_s"] = round(wall, 1)
    result["loadavg_start"] = load_before
    if broker is not None:
        result["broker_cpu_s"] = round((broker.cpu_seconds() or 0) - (broker_cpu0 or 0), 3)
        arrivals = []
        for line in sub_file.read_text().splitlines():
            stamp, payload = line.split(" ", 1)
            try:
                message = json.loads(payload)
            except json.JSONDecodeError:
                continue
            arrivals.append(float(stamp) - iso_to_epoch(message["end"]))
        result["mqtt_received"] = len(arrivals)
        result["mqtt_latency_median_s"] = round(statistics.median(arrivals), 3) if arrivals else None
        result["mqtt_latency_p99_s"] = round(percentile(arrivals, 99), 3) if arrivals else None
    shutil.rmtree(audio, ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)
    return result


# ----------------------------------------------------------------- onnxruntime study

def onnx_study(rounds: int) -> dict:
    """Per-window wall and CPU time of aisfx for thread settings and batch sizes.

    The cases are interleaved: each round times one call of every case in turn, and the median
    over rounds is reported, so a change in the machine's load during the study (other jobs)
    hits every case alike and the ratios between cases stay meaningful.
    """
    import onnxruntime as ort

    sys.path.insert(0, str(ROOT))
    from monitor.audio.files import resample
    from monitor.scoring.backbone import ASSETS
    from tests.synth import machine_sound

    path = str(ASSETS / "aisfx.onnx")
    window = resample(machine_sound(5, 10.0)[:, None], RATE, 44100)[:, 0]
    windows = np.stack([np.roll(window, 997 * i) for i in range(16)]).astype(np.float32)

    def session(intra: int, inter: int = 1, parallel: bool = False, cuda: bool = False) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra
        options.inter_op_num_threads = inter
        options.log_severity_level = 3
        if parallel:
            options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        return ort.InferenceSession(path, options, providers=providers)

    sessions = {"intra 1": session(1), "intra 2": session(2), "intra 0 (onnxruntime's choice)": session(0),
                "parallel, inter 2, intra 1": session(1, 2, parallel=True)}
    name = sessions["intra 1"].get_inputs()[0].name
    pair = [session(1), session(1)]

    def single(sess, batch):
        return lambda: sess.run(None, {name: windows[:batch]})

    def two_workers():  # two threads, each with its own one-thread session, one window each
        threads = [threading.Thread(target=s.run, args=(None, {name: windows[i:i + 1]})) for i, s in enumerate(pair)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    # (group, setting, windows per call, function)
    cases = [("threads", label, 1, single(sess, 1)) for label, sess in sessions.items()]
    cases.append(("threads", "2 workers x intra 1", 2, two_workers))
    batched = ["intra 0 (onnxruntime's choice)", "intra 1"]
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if cuda:  # batching pays on a GPU if anywhere
        sessions["CUDA"] = session(0, cuda=True)
        batched.append("CUDA")
    for label in batched:
        cases += [("batch", label, batch, single(sessions[label], batch)) for batch in (1, 2, 4, 8, 16)]
    peaks: dict[int, float | None] = {}
    for i, (_g, _l, _b, fn) in enumerate(cases):  # warm-up, and the memory peak of each case
        reset = reset_peak_rss()
        fn()
        peaks[i] = round(rss_mb("VmHWM")) if reset else None
    walls: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    cpus: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    loads = []
    for _ in range(rounds):
        loads.append(os.getloadavg()[0])
        for i, (_g, _l, _b, fn) in enumerate(cases):
            t, c = time.perf_counter(), time.process_time()
            fn()
            walls[i].append(time.perf_counter() - t)
            cpus[i].append(time.process_time() - c)
    out: dict = {"threads": [], "batch": [], "rounds": rounds}
    for i, (group, label, batch, _fn) in enumerate(cases):
        wall, cpu = statistics.median(walls[i]), statistics.median(cpus[i])
        out[group].append({"setting": label, "batch": batch, "calls": rounds,
                           "wall_per_window_ms": round(1e3 * wall / batch, 1),
                           "cpu_per_window_ms": round(1e3 * cpu / batch, 1),
                           "windows_per_s": round(batch / wall, 2), "peak_rss_mb": peaks[i]})
    out["cuda"] = "measured" if cuda else "not run: this onnxruntime has no CUDA provider (no GPU here)"
    out["loadavg_during"] = [round(x, 2) for x in loads]
    out["loadavg"] = loadavg()
    return out


# ------------------------------------------------------------------------------ main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=50, help="audio per run (multiple of 10)")
    parser.add_argument("--name", default="daemon", help="results file: benchmarks/results/NAME.json")
    parser.add_argument("--hop10", default="1,16,48,64", help="machines to try at hop 10 s, until one fails")
    parser.add_argument("--hop5", default="16,32,48,64", help="machines to try at hop 5 s, until one fails")
    parser.add_argument("--variants", default="after,before",
                        help=f"daemon settings to run on each ladder, side by side: {', '.join(VARIANTS)}")
    parser.add_argument("--no-onnx", action="store_true", help="skip the standalone onnxruntime study")
    parser.add_argument("--settle", type=float, default=0.0,
                        help="before each ladder run, wait (up to 3 min) until the 1-minute load is below this")
    parser.add_argument("--onnx-rounds", type=int, default=5, help="interleaved rounds of the onnxruntime study")
    parser.add_argument("--default-queue-run", type=int, default=16,
                        help="also run N machines with queue_size fixed at 8 for 30 s (0: skip)")
    parser.add_argument("--as-shipped-run", type=int, default=2,
                        help="also run N machines for 30 s with compute_threads 0 (libraries' default threads; 0: skip)")
    parser.add_argument("--compare-ort-threads", default="",
                        help="N,HOP: also run N machines at hop HOP with runtime.threads 0 (default) and 1, back to back")
    parser.add_argument("--budget", type=float, default=720.0,
                        help="start no new ladder run after this many seconds (the three short studies always run)")
    # child-process arguments
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name, kind in (("--n", int), ("--hop", float), ("--audio", str), ("--bank", str), ("--state", str),
                       ("--out", str), ("--port", int), ("--queue", int), ("--ort-threads", int),
                       ("--compute-threads", int), ("--workers", int)):
        parser.add_argument(name, type=kind, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--phase", default="spread", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    sys.path.insert(0, str(ROOT))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up broker and files on kill
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="asd-bench-daemon-"))
    results: dict = {"seconds_per_run": args.seconds, "bank_windows": BANK_WINDOWS, "runs": [], "not_run": [],
                     "variants": {v: dict(zip(("phase", "workers", "onnxruntime_threads"), VARIANTS[v]))
                                  for v in args.variants.split(",") if v}}
    failed: dict[float, set[str]] = {}
    broker = None
    try:
        with LoadMonitor() as load:
            broker = start_mosquitto(work / "mosquitto")
            if broker is None:
                results["not_run"].append("mosquitto not installed: no MQTT publish or subscriber latency")
            if any(x for x in (args.hop10, args.hop5)) or args.default_queue_run or args.as_shipped_run or args.compare_ort_threads:
                results["enroll_s"] = round(enroll_bank(work / "bank", work / "enroll"), 1)
            for hop, ladder in ((10.0, args.hop10), (5.0, args.hop5)):
                for n in [int(x) for x in ladder.split(",") if x]:
                    for variant in [v for v in args.variants.split(",") if v and v not in failed.get(hop, set())]:
                        if time.perf_counter() - started > args.budget:  # the short runs below always run
                            results["not_run"].append(f"hop {hop:g} n={n} {variant}: time budget spent")
                            continue
                        phase, workers, threads = VARIANTS[variant]
                        r = run_one(n, hop, args.seconds, work, work / "bank", broker, ort_threads=threads,
                                    phase=phase, workers=workers, settle=args.settle)
                        r["variant"] = variant
                        results["runs"].append(r)
                        print(f"hop {hop:g} n={n} {variant}: keeps up {r['keeps_up']}, dropped {r['dropped']}, "
                              f"carried {r['carried_over']}, latency median {r['latency_median_s']} p99 {r['latency_p99_s']} s, "
                              f"mqtt p99 {r.get('mqtt_latency_p99_s')} s, cpu/stream {r['cpu_s_per_audio_s_per_stream']}, "
                              f"rss {r['peak_rss_mb']} MB, load {loadavg()[0]}", flush=True)
                        if not r["keeps_up"]:
                            failed.setdefault(hop, set()).add(variant)  # higher counts would fail too
            if args.default_queue_run:
                n = args.default_queue_run
                r = run_one(n, 10.0, min(args.seconds, 30), work, work / "bank", broker, queue=FIXED_QUEUE)
                r["note"] = "daemon.queue_size fixed at 8"
                results["default_queue"] = r
                print(f"n={n} with queue_size fixed at 8: dropped {r['dropped']} of {r['expected_windows']}", flush=True)
            if args.compare_ort_threads:
                n, hop = args.compare_ort_threads.split(",")
                results["ort_threads"] = []
                for threads in (0, 1):
                    r = run_one(int(n), float(hop), args.seconds, work, work / "bank", broker, ort_threads=threads)
                    results["ort_threads"].append(r)
                    print(f"n={n} hop {hop} runtime.threads {threads}: keeps up {r['keeps_up']}, "
                          f"per window {r['per_window_proc_median_s']} s, load {loadavg()[0]}", flush=True)
            if not args.no_onnx:
                print("onnxruntime study ...", flush=True)
                results["onnxruntime"] = onnx_study(args.onnx_rounds)
            if args.as_shipped_run:
                n = args.as_shipped_run
                r = run_one(n, 10.0, min(args.seconds, 30), work, work / "bank", broker, compute_threads=0)
                r["note"] = "runtime.compute_threads 0: BLAS/OpenMP threads not limited"
                results["as_shipped"] = r
                print(f"n={n} as shipped: start {r['start_s']} s, latency median {r['latency_median_s']} s", flush=True)
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    results["total_s"] = round(time.perf_counter() - started, 1)
    report(results)
    write_json(args.name, results, load)
    return 0


def report(results: dict) -> None:
    runs = results["runs"]
    table(["hop s", "N", "variant", "workers x threads", "keeps up", "windows", "dropped", "carried", "lat med s", "lat p99 s",
           "mqtt med", "mqtt p99", "queue max", "cpu s/s/stream", "cores", "start s", "fitted s", "1st win s", "capacity",
           "peak RSS MB", "load before"],
          [[r["hop_s"], r["n"], r.get("variant", ""), f"{r.get('workers')} x {r.get('onnxruntime_threads') or 'auto'}",
            r["keeps_up"], f"{r['processed']}/{r['expected_windows']}", r["dropped"], r["carried_over"],
            r["latency_median_s"], r["latency_p99_s"], r.get("mqtt_latency_median_s"), r.get("mqtt_latency_p99_s"),
            r["queue_max_at_put"], r["cpu_s_per_audio_s_per_stream"], r["cores_busy"], r["start_s"],
            r.get("banks_fitted_after_s"), r.get("first_window_latency_max_s"), r.get("capacity_machines"), r["peak_rss_mb"],
            r.get("loadavg_start", [None])[0]] for r in runs],
          title=f"Daemon, aisfx, real-time multichannel file source, {results['seconds_per_run']} s of audio per run "
                "(latency: window ready -> processed incl. MQTT publish call; mqtt: end of window -> independent subscriber)")
    if runs:
        stages = runs[0]["stage_median_ms"]
        table(["stage", "median ms per window"], [[k, v] for k, v in stages.items()],
              title=f"Where a window's time goes (N={runs[0]['n']}, hop {runs[0]['hop_s']:g})")
    onnx = results.get("onnxruntime")
    if onnx:
        base = onnx["threads"][0]["wall_per_window_ms"]
        table(["setting", "batch", "wall ms/window", "cpu ms/window", "windows/s", "vs intra 1"],
              [[c["setting"], c["batch"], c["wall_per_window_ms"], c["cpu_per_window_ms"], c["windows_per_s"],
                round(base / c["wall_per_window_ms"], 2)] for c in onnx["threads"]],
              title="onnxruntime aisfx, one 10 s window per call: thread settings (side by side)")
        rows = []
        for c in onnx["batch"]:
            b1 = next(x for x in onnx["batch"] if x["setting"] == c["setting"] and x["batch"] == 1)
            rows.append([c["setting"], c["batch"], c["wall_per_window_ms"], c["cpu_per_window_ms"], c["windows_per_s"],
                         round(b1["wall_per_window_ms"] / c["wall_per_window_ms"], 2), c.get("peak_rss_mb")])
        table(["setting", "batch", "wall ms/window", "cpu ms/window", "windows/s", "gain vs batch 1", "peak RSS MB"], rows,
              title="onnxruntime aisfx: windows of several machines in one call")
    if results.get("ort_threads"):
        table(["runtime.threads", "N", "hop s", "keeps up", "per-window s", "lat med s", "lat p99 s", "burst drain max s",
               "cpu s/s/stream", "load"],
              [[r["ort_threads"], r["n"], r["hop_s"], r["keeps_up"], r["per_window_proc_median_s"], r["latency_median_s"],
                r["latency_p99_s"], max(r["burst_drain_s"]), r["cpu_s_per_audio_s_per_stream"], r["loadavg_end"][0]]
               for r in results["ort_threads"]], title="onnxruntime intra-op threads in the daemon (back to back)")
    pinned = [r for r in runs if r["n"] == results.get("as_shipped", {}).get("n") and r["hop_s"] == 10.0]
    if "as_shipped" in results and pinned:
        a, b = results["as_shipped"], pinned[0]
        table(["threads", "N", "start s", "start CPU s", "lat med s", "lat p99 s", "knn ms", "cpu s/s/stream"],
              [["compute_threads 1 (default; runs above)", b["n"], b["start_s"], b["start_cpu_s"], b["latency_median_s"], b["latency_p99_s"],
                b["stage_median_ms"].get("knn score"), b["cpu_s_per_audio_s_per_stream"]],
               ["compute_threads 0 (libraries' default)", a["n"], a["start_s"], a["start_cpu_s"], a["latency_median_s"], a["latency_p99_s"],
                a["stage_median_ms"].get("knn score"), a["cpu_s_per_audio_s_per_stream"]]],
              title="numpy/faiss threads: start-up (bank fit: Mahalanobis leave-one-out, 10 eigendecompositions per machine)")
    if "default_queue" in results:
        r = results["default_queue"]
        print(f"With daemon.queue_size fixed at 8 and N={r['n']} (hop 10): {r['dropped']} of {r['expected_windows']} "
              f"windows dropped, queue max {r['queue_max_at_put']}\n")
    for line in results["not_run"]:
        print("not run:", line)


if __name__ == "__main__":
    raise SystemExit(main())
