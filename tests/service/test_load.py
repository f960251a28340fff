"""Many machines on one box: windows spread over the hop, several workers that keep each
machine's windows in order, banks fitted while audio flows, and overload that is fair and
visible (dropped windows counted, the daemon ``degraded`` on MQTT, in the metrics and in
systemd's status)."""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import soundfile as sf

from monitor.audio.ring import RingBuffer, Windower
from monitor.config import ClipsConfig, Config, MachineConfig, SourceConfig
from monitor.outputs.clips import ClipStore
from monitor.outputs.events import EventLog
from monitor.outputs.fanout import Outputs, WindowReport
from monitor.outputs.messages import Topics
from monitor.outputs.telemetry import Telemetry
from monitor.service.capacity import Overload, WorkPlan, plan_work
from monitor.service.daemon import Daemon
from monitor.service.machine import Machine
from monitor.service.pipeline import QueuedWindow
from monitor.service.windows import WindowQueue, phase_lanes
from tests.daemons import clips, daemon_config, enroll, run_to_end, wait_for
from tests.synth import RATE, machine_sound


def _machine(name: str, channel: int = 0) -> Machine:
    """A machine as the audio path sees it (name and channel); nothing else is used here."""
    return Machine(MachineConfig(name, "src", channel=channel), None, None, None, None)  # type: ignore[arg-type]


def _cut(channels: int, frames: int, window: int, hop: int, spread: bool) -> dict[str, list[tuple[int, np.ndarray]]]:
    """Every window each machine (one per channel) gets from a ramp written to a ring, in the
    order the windower hands them out."""
    machines = [_machine(f"m{c}", c) for c in range(channels)]
    ring = RingBuffer(channels, frames, sample_rate=1000)
    lanes = phase_lanes(machines, [m.name for m in machines], hop, spread)
    windower = Windower(ring, window, hop, [lane for lane, _ in lanes])
    # Frame f of channel c carries f * channels + c: any misplaced frame or channel shows.
    ring.write(np.arange(frames * channels, dtype=np.float32).reshape(frames, channels), 1.7e9)
    out: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
    ends = []
    while (cut := windower.next_window(0)) is not None:
        ends.append(cut.start_frame + window)
        single = windower.lanes[cut.lane].channel is not None
        for machine in lanes[cut.lane][1]:
            out[machine.name].append((cut.start_frame, cut.samples[:, 0 if single else machine.config.channel]))
    assert ends == sorted(ends)  # handed out in the order their audio ends
    return out


def test_spread_windows_end_evenly_over_the_hop_and_hold_the_same_audio() -> None:
    channels, frames, window, hop = 4, 3000, 200, 100
    spread = _cut(channels, frames, window, hop, spread=True)
    aligned = _cut(channels, frames, window, hop, spread=False)
    phases = sorted((starts[0][0] + window) % hop for starts in spread.values())
    assert phases == [0, 25, 50, 75]  # machine i ends i x hop / N after machine 0
    assert {(s[0][0] + window) % hop for s in aligned.values()} == {0}
    for c in range(channels):
        name = f"m{c}"
        signal = np.arange(frames, dtype=np.float32) * channels + c
        for cuts in (spread[name], aligned[name]):
            starts = [start for start, _ in cuts]
            assert starts == list(range(starts[0], starts[0] + hop * len(starts), hop))  # no gap, no skip
            for start, samples in cuts:
                assert len(samples) == window
                np.testing.assert_array_equal(samples, signal[start:start + window])  # its own channel, exact
        # Past the first offset, every sample is in exactly as many windows as before.
        first, last = spread[name][0][0], spread[name][-1][0]
        for cuts_of in (spread[name], aligned[name]):
            coverage = Counter(f for start, _ in cuts_of for f in range(start, start + window))
            assert all(coverage[f] == window // hop for f in range(first + window, last))


def _outputs(tmp_path: Path) -> Outputs:
    return Outputs(Config(), Topics("asd", "test", "d"), Telemetry(), EventLog(tmp_path / "events.jsonl"),
                   ClipStore(tmp_path / "clips", ClipsConfig()))


def _window(machine: Machine, start: float) -> QueuedWindow:
    return QueuedWindow(machine, start, np.zeros(4, np.float32), time.monotonic())


def test_a_full_queue_drops_from_the_machine_with_most_waiting(tmp_path: Path) -> None:
    outputs = _outputs(tmp_path)
    queue = WindowQueue(4, outputs, threading.Event())
    a, b, c = _machine("a"), _machine("b"), _machine("c")
    for item in (_window(a, 0), _window(a, 1), _window(a, 2), _window(b, 0)):
        queue.put(item)
    queue.put(_window(b, 1))  # a has 3 waiting: its oldest goes
    queue.put(_window(c, 0))  # a and b have 2 each: the older of their oldest (a's) goes
    for start in range(2, 12):  # b floods: only b pays, c's single window stays
        queue.put(_window(b, start))
    dropped = {m: outputs.telemetry.registry.get_sample_value("asd_windows_total", {"machine": m, "status": "dropped"}) or 0
               for m in "abc"}
    waiting = [(item.machine.name, item.start) for item in queue._waiting]
    assert dropped == {"a": 2, "b": 10, "c": 0} and outputs.dropped_windows == queue.dropped == 12
    assert waiting == [("a", 2), ("c", 0), ("b", 10), ("b", 11)]


def test_workers_never_take_one_machines_windows_at_once_nor_out_of_order(tmp_path: Path) -> None:
    queue = WindowQueue(64, _outputs(tmp_path), threading.Event())
    machines = [_machine(f"m{i}") for i in range(3)]
    for start in range(10):
        for machine in machines:
            queue.put(_window(machine, start))
    spans: list[tuple[str, float, float, float, int]] = []
    rng = random.Random(1)

    def worker(index: int) -> None:
        while (item := queue.get()) is not None:
            began = time.monotonic()
            time.sleep(rng.uniform(0.001, 0.01))
            spans.append((item.machine.name, item.start, began, time.monotonic(), index))
            queue.done(item)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(30)
    assert len(spans) == 30 and queue.idle
    for machine in machines:
        mine = sorted((s for s in spans if s[0] == machine.name), key=lambda s: s[2])
        assert [s[1] for s in mine] == list(range(10))  # in order
        assert all(prev[3] <= nxt[2] for prev, nxt in zip(mine, mine[1:]))  # one at a time
    assert len({s[4] for s in spans}) > 1  # and the work was shared


def _report(began: float, seconds: float, embedded: bool = True) -> WindowReport:
    stages = {"sensor": 0.001, "embed": seconds} if embedded else {"sensor": 0.001}
    return WindowReport("m", 0.0, 10.0, "ok", began, began, began + seconds, None, (), stages)


def test_overload_turns_degraded_with_a_reason_and_recovers_after_the_hold() -> None:
    overload = Overload(machines=64, hop_seconds=10.0, workers=2)
    for _ in range(20):
        overload.window(_report(0.0, 0.4))
        overload.window(_report(0.0, 0.0001, embedded=False))  # sensor faults do not count
    assert overload.capacity == 50  # 2 workers x 10 s / 0.4 s
    assert not overload.check(0, now=100.0) and not overload.degraded
    assert overload.check(3, now=101.0) and overload.degraded
    assert "3 window(s) dropped" in overload.reason and "about 50 machines at hop 10 s (64 configured)" in overload.reason
    assert not overload.check(5, now=150.0) and "5 window(s)" in overload.reason  # still degraded, counted on
    assert not overload.check(5, now=150.0 + overload.hold - 1)
    assert overload.check(5, now=151.0 + overload.hold) and not overload.degraded and overload.reason == ""


def test_workers_default_to_one_per_core_with_one_thread_each() -> None:
    config = Config()
    assert plan_work(config, 2) == WorkPlan(workers=2, threads=1)
    assert plan_work(config, 1) == WorkPlan(workers=1, threads=0)  # onnxruntime's own choice
    two = replace(config, daemon=replace(config.daemon, workers=2))
    assert plan_work(two, 2).workers == 2 and plan_work(two, 2).threads == 1
    assert plan_work(two, 8).threads == 4
    pinned = replace(two, runtime=replace(two.runtime, threads=3))
    assert plan_work(pinned, 8).threads == 3


def _three_machines(tmp_path: Path, workers: int) -> tuple[Config, list[WindowReport]]:
    base = daemon_config(tmp_path, clips(tmp_path / "replay", "nnnf"))
    enroll(base, tmp_path / "enroll")
    bank = base.daemon.state_dir / "banks" / "motor"
    config = replace(base, daemon=replace(base.daemon, hop_seconds=4.0, workers=workers),
                     machines=[MachineConfig(f"m{i}", "replay", bank=bank) for i in range(3)])
    reports: list[WindowReport] = []
    daemon = Daemon(config)
    daemon.add_listener(reports.append)
    run_to_end(daemon)
    return config, reports


def test_two_workers_score_like_one_and_banks_fit_before_each_first_window(tmp_path: Path) -> None:
    results = {}
    for workers in (1, 2):
        _config, reports = _three_machines(tmp_path / f"w{workers}", workers)
        per_machine: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for report in reports:
            assert report.status == "ok"  # the start-up fit was waited for, never "idle"
            per_machine[report.machine].append((report.start, report.score.fused))
        results[workers] = per_machine
    one, two = results[1], results[2]
    t0 = min(start for windows in one.values() for start, _ in windows)
    # 40 s of audio, window 10 s, hop 4 s; machine i starts i x 4/3 s later (spread).
    assert {m: [round(s - t0, 3) for s, _ in w] for m, w in one.items()} == {
        f"m{i}": [round(i * 4 / 3 + 4 * k, 3) for k in range(n)] for i, n in enumerate((8, 8, 7))}
    for machine in one:
        assert [s for s, _ in two[machine]] == sorted(s for s, _ in two[machine])  # in order
        np.testing.assert_allclose([f for _, f in two[machine]], [f for _, f in one[machine]], rtol=0, atol=1e-9)


def test_overload_drops_fairly_and_is_visible_on_mqtt_metrics_and_status(tmp_path: Path, mosquitto) -> None:
    """A live source far beyond the box: 4 machines at hop 0.25 s of audio replayed 4 x
    faster than real time (64 windows a second). The replay stands in for a microphone: it is
    marked live once started, so a full queue drops instead of waiting, as a microphone's does."""
    audio = tmp_path / "live" / "four.wav"
    audio.parent.mkdir()
    sf.write(audio, np.stack([machine_sound(500 + c, 24.0) for c in range(4)], axis=1), RATE, subtype="PCM_16")
    base = daemon_config(tmp_path, [audio], broker=mosquitto, backbone="aisfx")
    enroll(base, tmp_path / "enroll")
    bank = base.daemon.state_dir / "banks" / "motor"
    config = replace(
        base, daemon=replace(base.daemon, hop_seconds=0.25, queue_size=4, workers=1),
        sources=[SourceConfig(name="replay", type="file", paths=[audio], channels=4, speed=4.0)],
        machines=[MachineConfig(f"m{c}", "replay", channel=c, bank=bank) for c in range(4)])
    health_topic = Topics("asd", "test", "asd-test").health()
    daemon = Daemon(config)
    daemon.start()
    daemon.sources["replay"].live = True  # before the first window (10 s of audio = 2.5 s here)
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        wait_for(lambda: daemon.overload.degraded, timeout=60)
        status = daemon.status_line()
        port = daemon.telemetry.port
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        wait_for(lambda: json.loads(mosquitto.retained(health_topic) or "{}").get("status") == "degraded", timeout=30)
        health = json.loads(mosquitto.retained(health_topic))
        runner.join(120)
    finally:
        daemon.stop()
    assert status.startswith("DEGRADED (overloaded: ") and "machines at hop 0.25 s (4 configured)" in status
    assert "\nasd_degraded 1.0\n" in metrics
    assert health["status"] == "degraded" and health["machines"] == 4 and health["dropped_windows"] > 0
    assert health["capacity_machines"] is not None and health["capacity_machines"] < 4
    metric = daemon.telemetry.registry.get_sample_value
    dropped = [metric("asd_windows_total", {"machine": f"m{c}", "status": "dropped"}) for c in range(4)]
    scored = [metric("asd_windows_total", {"machine": f"m{c}", "status": "ok"}) for c in range(4)]
    assert all(d > 0 for d in dropped) and all(s > 0 for s in scored), (dropped, scored)
    assert max(dropped) - min(dropped) <= 0.5 * max(dropped) + 2, dropped  # thinned alike, none silenced
