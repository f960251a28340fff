"""What the reviews say about this machine's threshold: a site-specific evaluation.

The bench figures in the README come from other machines. Once people have answered alerts,
this machine has its own labels: confirmed faults (``fault`` verdicts) and everything else the
daemon scored, which is normal sound as far as anyone knows. Replaying the machine's recent
window history (``monitor.outputs.history``) through the very alert rule the daemon runs
(``AlertTracker``) at each candidate threshold gives, per threshold, how many confirmed faults
would have been alarmed and how many alerts the rest would have raised per day, with the exact
Poisson 95 % upper bound (a week of quiet says little about a rare false alarm).

Suggested threshold: the lowest candidate (the most sensitive) whose false alarms per day stay
within the budget; the table shows what it catches. Whether the history can back that is said
too: only when the 95 % upper bound is within the budget as well (no false alarm in 30 days for
0.1 per day) is the suggestion "confirmed"; before that it is a lead. The report never changes
the configured threshold: a person reads it and decides.

Counted as normal: every scored window outside a confirmed fault's episode, unreviewed alerts
included, so unanswered real faults make the false alarm figures pessimistic. Confirmed faults
older than the history (its retention) cannot be replayed and are listed as such.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np

from monitor.config import AlertConfig, Config
from monitor.outputs.history import DAY_SECONDS, ScoreHistory, WindowHistory
from monitor.review.verdicts import ReviewLog, read_alert_log
from monitor.service.alerts import DEFAULT_REFERENCE_SIZE, AlertTracker

log = logging.getLogger(__name__)

CANDIDATES = (0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
DEFAULT_DAYS = 7.0
DEFAULT_BUDGET = 0.1  # false alarms per day: one in ten days
REPORTS_DIR = "reports"
HISTORY_DIR = "history"


def poisson_upper(k: int, confidence: float = 0.95) -> float:
    """Exact one-sided upper confidence bound of a Poisson mean after observing ``k`` events."""
    alpha = 1.0 - confidence

    def cdf(lam: float) -> float:
        term = total = math.exp(-lam)
        for i in range(1, k + 1):
            term *= lam / i
            total += term
        return total

    low, high = 0.0, 10.0 + 5.0 * k
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) > alpha else (low, mid)
    return high


@dataclass(frozen=True)
class Episode:
    """A span of stream time, epoch seconds; ``event_id`` names a confirmed fault's alert."""

    start: float
    end: float
    event_id: str = ""

    def overlaps(self, other: Episode) -> bool:
        return self.start <= other.end and other.start <= self.end


@dataclass(frozen=True)
class ThresholdRow:
    threshold: float
    faults_alarmed: int  # confirmed faults the rule would have raised an alert in
    above_share: float | None  # normal windows above the threshold
    false_alarms: int  # alerts raised outside every confirmed fault
    false_alarms_per_day: float | None  # None: no normal window to count on
    false_alarms_per_day_upper: float | None  # exact Poisson 95 % upper bound


@dataclass(frozen=True)
class SiteReport:
    machine: str
    rule: str
    current_threshold: float
    budget_per_day: float
    normal_days: float  # scored normal stream time the false alarm figures rest on
    normal_windows: int
    faults: list[str]  # confirmed faults replayed
    faults_not_in_history: list[str]
    rows: list[ThresholdRow]
    suggested: float | None  # None: no candidate meets the budget
    confirmed: bool  # the suggestion's 95 % upper bound is within the budget too
    created: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def replay_alerts(machine: str, history: WindowHistory, alerts: AlertConfig, window_seconds: float,
                  hop_seconds: float, reference_size: int) -> list[Episode]:
    """The episodes the alert rule raises on the history's scored windows (idle and faulty
    windows do not move it, as in the daemon); an episode still open at the end lasts to the
    last window."""
    tracker = AlertTracker(machine, alerts)
    episodes: list[Episode] = []
    opened: float | None = None
    for end, status, fused in zip(history.end, history.status, history.fused):
        if status != "ok" or not math.isfinite(fused):
            continue
        transition = tracker.update(end - window_seconds, end, float(fused), reference_size=reference_size,
                                    hop_seconds=hop_seconds)
        if transition is None:
            continue
        if transition.type == "raise":
            opened = transition.start
        elif opened is not None:
            episodes.append(Episode(opened, transition.end))
            opened = None
    if opened is not None:
        episodes.append(Episode(opened, float(history.end[-1])))
    return episodes


def site_report(machine: str, history: WindowHistory, faults: list[Episode], alerts: AlertConfig, *,
                window_seconds: float, hop_seconds: float, reference_size: int,
                candidates: tuple[float, ...] = CANDIDATES, budget_per_day: float = DEFAULT_BUDGET,
                faults_not_in_history: list[str] | None = None) -> SiteReport:
    """The table for ``machine`` (pure: the history and the confirmed faults are given)."""
    scored = (history.status == "ok") & np.isfinite(history.fused)
    in_fault = np.zeros(len(history), dtype=bool)
    for fault in faults:
        in_fault |= (history.end > fault.start) & (history.end - window_seconds < fault.end)  # any overlap
    normal = scored & ~in_fault
    normal_days = int(normal.sum()) * hop_seconds / DAY_SECONDS
    rows = []
    for threshold in sorted({*candidates, alerts.threshold}):
        raised = replay_alerts(machine, history, replace(alerts, threshold=threshold), window_seconds, hop_seconds,
                               reference_size)
        false = sum(not any(e.overlaps(f) for f in faults) for e in raised)
        alarmed = sum(any(e.overlaps(f) for e in raised) for f in faults)
        per_day = false / normal_days if normal_days else None
        upper = poisson_upper(false) / normal_days if normal_days else None
        above = float(np.mean(history.fused[normal] > threshold)) if normal.any() else None
        rows.append(ThresholdRow(threshold, alarmed, above, false, per_day, upper))
    meeting = [r for r in rows if r.false_alarms_per_day is not None and r.false_alarms_per_day <= budget_per_day]
    suggested = meeting[0] if meeting else None  # rows are sorted: the most sensitive first
    confirmed = suggested is not None and suggested.false_alarms_per_day_upper is not None \
        and suggested.false_alarms_per_day_upper <= budget_per_day
    return SiteReport(machine, alerts.rule, alerts.threshold, budget_per_day, normal_days, int(normal.sum()),
                      [f.event_id for f in faults], list(faults_not_in_history or []), rows,
                      suggested.threshold if suggested else None, confirmed, time.time())


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def confirmed_faults(config: Config, machine: str) -> list[Episode]:
    """The machine's alerts reviewed as ``fault``, each from its first anomalous window to its
    clear (or, still open, to now)."""
    state_dir = config.daemon.resolved_state_dir()
    confirmed = {r.event_id for r in ReviewLog(state_dir).records() if r.verdict == "fault" and r.machine == machine}
    events = config.daemon.resolved_event_log()
    logged = read_alert_log(events)
    clears = logged.clears
    return [Episode(_epoch(a.start), _epoch(clears[a.event_id]) if a.event_id in clears else time.time(), a.event_id)
            for a in logged.raises if a.event_id in confirmed]


def build_report(config: Config, machine: str, window_seconds: float, *, days: float = DEFAULT_DAYS,
                 budget_per_day: float = DEFAULT_BUDGET, now: float | None = None) -> SiteReport:
    """The report from the state directory: the last ``days`` of history, and the confirmed
    faults in it or before it (those before it are replayed from whatever history remains)."""
    now = time.time() if now is None else now
    faults = confirmed_faults(config, machine)
    since = min([now - days * DAY_SECONDS, *(f.start - DAY_SECONDS for f in faults)])
    history = ScoreHistory(config.daemon.resolved_state_dir() / HISTORY_DIR).read(machine, since)
    held = [f for f in faults if len(history) and history.end[0] <= f.end and f.start <= history.end[-1]]
    missing = [f.event_id for f in faults if f not in held]
    return site_report(machine, history, held, config.alerts, window_seconds=window_seconds,
                       hop_seconds=config.daemon.hop_seconds, reference_size=config.reference.rolling_size or DEFAULT_REFERENCE_SIZE,
                       budget_per_day=budget_per_day, faults_not_in_history=missing)


def _figure(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_report(report: SiteReport) -> str:
    """The table a person reads (``asd-monitor review report``)."""
    lines = [(f"{report.machine}: {report.normal_windows} normal windows ({report.normal_days:.2f} days), "
             f"{len(report.faults)} confirmed fault(s) replayed, rule {report.rule}"),
             (f"{'threshold':>9}  {'faults alarmed':>14}  {'normal > thr':>12}  {'false alarms':>12}  "
             f"{'per day':>8}  {'95 % upper':>10}")]
    for row in report.rows:
        marks = (" <- configured" if row.threshold == report.current_threshold else "") + \
                (" <- suggested" if row.threshold == report.suggested else "")
        lines.append(f"{row.threshold:>9.3f}  {row.faults_alarmed:>8d} of {len(report.faults):<3d}  "
                     f"{_figure(row.above_share, '.2%'):>12}  {row.false_alarms:>12d}  "
                     f"{_figure(row.false_alarms_per_day, '.2f'):>8}  {_figure(row.false_alarms_per_day_upper, '.2f'):>10}{marks}")
    if report.suggested is None:
        lines.append(f"no candidate keeps false alarms within {report.budget_per_day:g} per day")
    else:
        lines.append(f"suggested threshold {report.suggested:g}: the most sensitive with at most "
                     f"{report.budget_per_day:g} false alarms per day (alerts.threshold is not changed)")
        if not report.confirmed:
            needed = poisson_upper(0) / report.budget_per_day if report.budget_per_day > 0 else math.inf
            lines.append(f"  a lead, not yet confirmed: {report.normal_days:.2f} days of normal windows bound the rate "
                         f"only below the 95 % upper figure; about {needed:.0f} days without a false alarm confirm "
                         f"{report.budget_per_day:g} per day")
    if report.faults_not_in_history:
        lines.append(f"not in the history (older than its retention): {', '.join(report.faults_not_in_history)}")
    return "\n".join(lines)


def plot_report(report: SiteReport, path: Path) -> Path:
    """Faults alarmed and false alarms per day against the threshold, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    thresholds = [r.threshold for r in report.rows]
    fig, left = plt.subplots(figsize=(7, 4))
    def nan(value: float | None) -> float:
        return math.nan if value is None else value

    left.plot(thresholds, [nan(r.false_alarms_per_day) for r in report.rows], "o-", color="tab:red",
              label="false alarms / day")
    left.fill_between(thresholds, 0, [nan(r.false_alarms_per_day_upper) for r in report.rows], color="tab:red",
                      alpha=0.15, label="95 % upper bound")
    left.axhline(report.budget_per_day, color="tab:red", linestyle=":", label="budget")
    left.set_xlabel("alert threshold (fused rank)")
    left.set_ylabel("false alarms per day")
    right = left.twinx()
    right.step(thresholds, [r.faults_alarmed for r in report.rows], where="mid", color="tab:blue",
               label="confirmed faults alarmed")
    right.set_ylabel(f"confirmed faults alarmed (of {len(report.faults)})")
    right.set_ylim(0, max(1, len(report.faults)) + 0.5)
    right.yaxis.set_major_locator(MaxNLocator(integer=True))  # a count of faults
    for x, style in ((report.current_threshold, "--"), (report.suggested, "-")):
        if x is not None:
            left.axvline(x, color="grey", linestyle=style)
    left.set_title(f"{report.machine}: threshold from this site's reviews")
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles=handles, loc="upper center", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(report: SiteReport, folder: Path) -> tuple[Path, Path]:
    """``<folder>/<machine>.json`` and ``.png``, each replaced whole (a reader never sees half)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{report.machine}.json"
    tmp = data.with_name(f".{data.name}.tmp")
    tmp.write_text(report.to_json() + "\n", encoding="utf-8")
    tmp.replace(data)
    picture = folder / f"{report.machine}.png"
    tmp_png = plot_report(report, picture.with_name(f".{picture.stem}.tmp.png"))
    tmp_png.replace(picture)
    return data, picture
