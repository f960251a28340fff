"""How much this box can do: how many workers score windows, and whether it keeps up.

Workers. onnxruntime can spread one call over the cores (intra-op threads), or several calls
can run side by side on one thread each. Measured side by side with ``benchmarks/daemon.py``
on the 2-core test machine, windows spread over the hop, hop 10 s
(``benchmarks/results/daemon_phases*.json``). On a quiet box one worker with onnxruntime on
both cores answers sooner (p99 end of window to MQTT 0.13 s against 0.22 s with 48 machines)
but costs more CPU (0.028 against 0.023 CPU-s per audio-s per machine: threads of one call wait
for each other). With other jobs on the box it fell apart (p99 0.95 s against 0.28 s with 48
machines, 2.07 against 1.59 s with 64): a call's threads also wait for a core another program
holds, while calls on one thread each do not. A monitoring box rarely has its cores to itself,
so by default every core gets a worker and each call one thread (``plan_work``);
``daemon.workers`` and ``runtime.threads`` override the choice (``workers: 1`` for the lowest
latency on a dedicated box).

Overload. When the box cannot keep up, windows are dropped (``monitor.service.windows``). That
must never be silent: the daemon turns ``degraded`` while windows were dropped within the last
``hold`` seconds, says why in words a person can act on (how many machines this box holds at
the cost measured here), and recovers once a full hold passes without a drop.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from monitor.config import Config
from monitor.outputs.fanout import WindowReport

log = logging.getLogger(__name__)

HOLD_SECONDS = 60.0  # degraded lasts at least this long (and three hops) after the last drop
COST_WEIGHT = 0.05  # weight of the newest window in the running mean of the cost per window


@dataclass(frozen=True)
class WorkPlan:
    workers: int  # threads taking windows from the queue
    threads: int  # onnxruntime intra-op threads per call (0: onnxruntime's choice, the cores)


def plan_work(config: Config, cores: int) -> WorkPlan:
    """Workers and onnxruntime threads: as configured, else one worker per core; each call
    gets cores / workers threads (one, by default), so the workers never fight over cores."""
    workers = config.daemon.workers or max(1, cores)
    threads = config.runtime.threads or (0 if workers == 1 else max(1, cores // workers))
    return WorkPlan(workers, threads)


class Overload:
    """Keeps the cost of a window and decides when the daemon is degraded.

    ``window`` is a window listener (called by the workers); ``check`` is called by the main
    loop with the running count of dropped windows and returns True when the status changed.
    """

    def __init__(self, machines: int, hop_seconds: float, workers: int) -> None:
        self.machines = machines
        self.hop_seconds = hop_seconds
        self.workers = workers
        self.hold = max(HOLD_SECONDS, 3 * hop_seconds)
        self.cost: float | None = None  # seconds of one window through the pipeline (running mean)
        self.degraded = False
        self.reason = ""
        self._measured = 0
        self._seen = 0  # dropped windows already accounted for
        self._drops: deque[tuple[float, int]] = deque()  # (when, how many) within the hold
        self._told_capacity = False

    def window(self, report: WindowReport) -> None:
        """Learn the cost from windows that went through a backbone (a sensor fault costs
        almost nothing and would flatter the figure)."""
        if "embed" not in report.stage_seconds:
            return
        seconds = report.done - report.began
        self.cost = seconds if self.cost is None else self.cost + COST_WEIGHT * (seconds - self.cost)
        self._measured += 1

    @property
    def capacity(self) -> int | None:
        """Machines the workers could score at the hop at the measured cost."""
        return None if not self.cost else int(self.workers * self.hop_seconds / self.cost)

    def check(self, dropped: int, now: float) -> bool:
        """Account for ``dropped`` (the total so far) at time ``now``; True when the daemon
        turned degraded or recovered."""
        if dropped > self._seen:
            self._drops.append((now, dropped - self._seen))
            self._seen = dropped
        while self._drops and now - self._drops[0][0] > self.hold:
            self._drops.popleft()
        self._tell_capacity()
        recent = sum(count for _when, count in self._drops)
        was = self.degraded
        self.degraded = recent > 0
        self.reason = self._explain(recent) if self.degraded else ""
        return self.degraded != was

    def _explain(self, recent: int) -> str:
        text = f"overloaded: {recent} window(s) dropped in the last {self.hold:.0f} s"
        if self.capacity is not None:
            text += (f"; at {self.cost:.3f} s per window, {self.workers} worker(s) hold about {self.capacity} "
                     f"machines at hop {self.hop_seconds:g} s ({self.machines} configured)")
        return text

    def _tell_capacity(self) -> None:
        """Log once, when the cost is known from a round of windows, what this box can hold."""
        if self._told_capacity or self._measured < max(8, self.machines) or self.capacity is None:
            return
        self._told_capacity = True
        level = logging.WARNING if self.capacity < self.machines else logging.INFO
        log.log(level, "capacity: %.3f s per window, %d worker(s): about %d machines at hop %g s (%d configured)",
                self.cost, self.workers, self.capacity, self.hop_seconds, self.machines)
