"""What the review page shows, gathered from the running daemon at each request.

The page reads the daemon's own objects rather than a copy kept beside them: a machine's state,
severity and health figures are what its last retained state message said (``Machine``; the
health figures are one immutable object swapped by the worker, see
``monitor.service.health``), the alerts and their clips are the event log's (the one record of
which clip belongs to which alert, as for ``asd-monitor review``), verdicts are
``reviews.jsonl``'s and bank versions the bank directories'. So the page can never disagree with
MQTT, the CLI or the files, and it holds nothing between requests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitor.config import Config
from monitor.errors import BankError
from monitor.outputs.history import ScoreHistory
from monitor.outputs.messages import iso_time
from monitor.review.verdicts import Alert, ReviewLog, ReviewRecord, read_alerts
from monitor.service.machine import Machine
from monitor.web.trend import DAY_SECONDS, TrendPlot, trend_plot

log = logging.getLogger(__name__)

MAX_ALERTS = 200  # newest first; older ones stay reachable with `asd-monitor review list --all`


@dataclass(frozen=True)
class Site:
    """The running daemon's parts the page needs (the daemon builds it; tests may too)."""

    config: Callable[[], Config]  # the running config (a reload replaces it)
    machines: Sequence[Machine]
    history: ScoreHistory | None
    clips_dir: Callable[[], Path]
    review: Callable[[str, bytes], dict[str, Any]]  # (machine, JSON payload) -> the command's reply

    @property
    def state_dir(self) -> Path:
        return self.config().daemon.resolved_state_dir()


@dataclass(frozen=True)
class MachineView:
    name: str
    state: str
    detail: str
    since: str | None
    severity: str
    health: dict[str, float | None]
    bank_current: str | None
    bank_versions: tuple[str, ...]
    bank_error: str | None
    trend: TrendPlot | None  # None: the daemon keeps no score history


@dataclass(frozen=True)
class AlertView:
    alert: Alert
    clip_url: str | None  # under /clips/, None when there is no clip in the clip folder
    review: ReviewRecord | None


def machine_views(site: Site, now: float | None = None) -> list[MachineView]:
    now = time.time() if now is None else now
    alerts = site.config().alerts
    views = []
    for machine in site.machines:
        try:
            versions, current, bank_error = tuple(machine.store.versions()), machine.store.current(), None
        except BankError as exc:
            versions, current, bank_error = (), None, str(exc)
        history = site.history.read(machine.name, now - DAY_SECONDS) if site.history is not None else None
        trend = trend_plot(history, now, alerts.threshold, alerts.warning_rank) if history is not None else None
        views.append(MachineView(machine.name, machine.state, machine.detail,
                                 None if machine.since is None else iso_time(machine.since), machine.severity.level,
                                 machine.health.figures().as_dict(), current, versions, bank_error, trend))
    return views


def clip_url(clip: str | None, clips_dir: Path) -> str | None:
    """The page's URL of a clip the event log names, when it lies in the clip folder."""
    if not clip:
        return None
    try:
        relative = Path(clip).resolve().relative_to(clips_dir.resolve())
    except ValueError:
        return None
    return "/clips/" + relative.as_posix()


def alert_views(site: Site) -> list[AlertView]:
    """The newest ``MAX_ALERTS`` raised alerts of the configured machines, with their verdicts."""
    config = site.config()
    names = {m.name for m in site.machines}
    reviews = {r.event_id: r for r in ReviewLog(site.state_dir).records()}
    alerts = [a for a in read_alerts(config.daemon.resolved_event_log()) if a.machine in names]
    clips = site.clips_dir()
    return [AlertView(a, clip_url(a.clip, clips), reviews.get(a.event_id)) for a in reversed(alerts[-MAX_ALERTS:])]
