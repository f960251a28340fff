"""Turning per-window decisions into alerts a plant can act on.

One anomalous window is not a fault (a door slams, a forklift passes). Two rules decide when
windows add up to one (``alerts.rule``):

* ``n_of_m`` (default): raised when ``raise_count`` of the last ``raise_window`` scored windows
  had a fused rank above ``threshold``.
* ``cusum``: a sequential test (Page's CUSUM) on ``-log(1 - rank)``. It also raises on a fault
  that lifts many windows to rank 0.93-0.97 and few above 0.99, which N-of-M at 0.99 waits for;
  its two constants come from a target mean time between false alarms (``cusum_arl_days``) and
  the smallest shift it should catch fast (``cusum_drift``), see :class:`CusumRule`.

Whichever raised it, an alert is cleared after ``clear_count`` consecutive windows below
``clear_threshold`` (hysteresis, so a machine at the threshold does not flap), and after a clear
a cooldown holds back the next raise. Windows with a sensor fault or an idle machine are not
scored and do not move this state machine. Pure: no I/O, no clock; times come with each window.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from monitor.config import AlertConfig, AlertRule
from monitor.outputs.messages import AlertType

DAY_SECONDS = 86400.0
# Hop and reference size assumed when a caller gives none (the daemon's defaults and the size of
# a small bank's leave-one-out reference); the daemon's pipeline always passes the real ones.
DEFAULT_HOP_SECONDS = 10.0
DEFAULT_REFERENCE_SIZE = 200


@dataclass(frozen=True)
class Transition:
    type: AlertType
    event_id: str
    start: float  # epoch seconds: first anomalous window of the episode (cusum: the change point)
    end: float  # epoch seconds: end of the window that caused the transition
    rule: AlertRule = "n_of_m"  # the rule that raised the episode (a clear carries its raise's)


def event_id(machine: str, start: float) -> str:
    """Stable id of an episode: the same audio replayed gives the same id (de-duplication)."""
    return f"{machine}-{int(round(start * 1000))}"


# ------------------------------------------------------------------------------ CUSUM constants

def cusum_arl(h: float, drift: float, states: int = 200) -> float:
    """Mean run length (windows) of the CUSUM ``S = max(0, S + x - drift)``, alarm at ``S > h``,
    started at 0, when ``x`` is Exp(1): the in-control run length on normal audio.

    Brook & Evans' Markov chain (Biometrika 59, 1972, 539-549): [0, h] is cut into ``states``
    cells of width ``w = 2h / (2·states - 1)`` (cell 0 is [0, w/2], the reset state; cell i is
    centred on i·w), the walk's transitions between cells come from the Exp(1) distribution
    function, and the run lengths ``L`` solve ``(I - R) L = 1``. The exponential kernel is
    smooth apart from its jump at the lower end, which the distribution-function differences
    integrate exactly, so 200 cells agree with 800 within 0.01 % and with a seeded Monte-Carlo
    of 4 000 runs within its standard error (h = 3 and 6 at drift 2: 107.6 and 1 231 windows).
    As a check on the shape: for large h the ARL grows as ``exp(θ h)`` with θ the non-zero
    root of ``E exp(θ(x - drift)) = 1``, i.e. ``1 - θ = exp(-θ·drift)`` (Siegmund, Sequential
    Analysis, 1985, ch. X; θ = 0.797 at drift 2), which the chain reproduces.
    """
    width = 2.0 * h / (2 * states - 1)
    centres = np.arange(states) * width
    upper = (np.arange(states) + 0.5) * width  # upper edge of each cell; the last is h
    below = -np.expm1(-np.maximum(upper[None, :] - centres[:, None] + drift, 0.0))  # P(next <= edge)
    moves = np.diff(below, axis=1, prepend=0.0)
    run_lengths = np.linalg.solve(np.eye(states) - moves, np.ones(states))
    return float(run_lengths[0])


@lru_cache(maxsize=64)
def cusum_threshold(arl_windows: float, drift: float) -> float:
    """The alarm level h at which :func:`cusum_arl` equals ``arl_windows`` (bisection: the ARL
    grows monotonically with h). Cached: a reload with the same settings costs nothing."""
    low, high = 0.0, 1.0
    while cusum_arl(high, drift) < arl_windows:
        low, high = high, 2.0 * high
    for _ in range(50):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if cusum_arl(mid, drift) < arl_windows else (low, mid)
        if high - low < 1e-4:
            break
    return high


def rank_evidence(rank: float, reference_size: int) -> float:
    """``-log(1 - rank)``, with the rank capped at ``1 - 1/(2n)`` for a reference of n scores.

    Ranks are mid-ranks against a finite reference, multiples of 1/(2n): a window above every
    reference score has rank exactly 1, whose log is infinite, and one such window would make
    S infinite and raise on its own, the single odd window this stage exists to ignore. Above
    all n scores, the window's true tail probability lies somewhere in [0, 1/(n+1)]; 1/(2n), the
    grid's top step (a tie with the highest score), is its midpoint estimate. Under normal audio
    this caps the otherwise Exp(1) evidence at log(2n) (6.0 for a 210-window bank), which only
    lengthens the in-control run, so the configured false-alarm rate stays an upper bound.
    """
    n = max(1, int(reference_size))
    return -math.log1p(-min(max(rank, 0.0), 1.0 - 0.5 / n))


# ------------------------------------------------------------------------------ the rules

class NOfMRule:
    """Raise when ``raise_count`` of the last ``raise_window`` windows exceeded ``threshold``."""

    name: AlertRule = "n_of_m"

    def __init__(self, config: AlertConfig) -> None:
        self._recent: deque[tuple[bool, float]] = deque(maxlen=config.raise_window)
        self.config = config

    def reconfigure(self, config: AlertConfig) -> None:
        """Resize the history to ``raise_window``, keeping the newest windows."""
        self.config = config
        self._recent = deque(self._recent, maxlen=config.raise_window)

    def reset(self) -> None:
        self._recent.clear()

    def observe(self, start: float, rank: float, reference_size: int, hop_seconds: float) -> float | None:
        """Feed one window; the episode's start (oldest anomalous window kept) when it raises."""
        self._recent.append((rank > self.config.threshold, start))
        hits = [t for anomalous, t in self._recent if anomalous]
        return hits[0] if len(hits) >= self.config.raise_count else None


class CusumRule:
    """Page's CUSUM on ``x = -log(1 - rank)``: ``S = max(0, S + x - drift)``, raise when ``S > h``.

    Why this statistic: the fused rank is the share of the normal reference below the window,
    so under normal audio it is about uniform and ``x`` about Exp(1) (mean 1). A fault lifts
    ranks; at rank 0.95, ``x = -log 0.05 = 3.0``. CUSUM adds up the excess over ``drift`` and
    forgets everything below 0, so a run of windows that are each only moderately unusual adds
    up to an alarm, while isolated high windows on normal audio drain away again.

    The two constants are not tuned on any benchmark set:

    * ``drift`` (``alerts.cusum_drift``, default 2.0): the classical choice for detecting a
      mean shift from ``mu0`` to ``mu1`` fastest is the midpoint ``(mu0 + mu1)/2``; here
      ``mu0 = 1`` (normal) and ``mu1 = 3`` (a fault that holds ranks at ~0.95), so 2.0. Such a
      fault then adds about 1 per window; a window at rank 0.99 (x = 4.6) adds 2.6.
    * ``h``: set so that the mean run length on normal audio (Exp(1) increments) equals
      ``alerts.cusum_arl_days`` of windows at the daemon's hop (:func:`cusum_threshold`, via the
      Markov-chain ARL of :func:`cusum_arl`). At drift 2 and a 10 s hop, 30 days (259 200
      windows) gives h = 12.7; 1 day gives 8.4, a year 15.8. A fault holding ranks at 0.95
      then raises after about h windows (13 at 30 days: 130 s), one at 0.99 after about 5.

    The false-alarm rate holds as far as the ranks are uniform on normal audio: a reference
    that no longer matches the room (ranks of normal audio drifting up) raises it, as it raises
    N-of-M's, and fusing several backbones by ``max`` makes high ranks likelier than uniform
    (by ``mean``, rarer).
    """

    name: AlertRule = "cusum"

    def __init__(self, config: AlertConfig) -> None:
        self.config = config
        self.statistic = 0.0
        self.run_start: float | None = None  # first window of the run that lifted S from 0

    def reconfigure(self, config: AlertConfig) -> None:
        self.config = config

    def reset(self) -> None:
        self.statistic, self.run_start = 0.0, None

    def threshold(self, hop_seconds: float) -> float:
        return cusum_threshold(self.config.cusum_arl_days * DAY_SECONDS / hop_seconds, self.config.cusum_drift)

    def observe(self, start: float, rank: float, reference_size: int, hop_seconds: float) -> float | None:
        """Feed one window; the change point (start of the run from S = 0) when S exceeds h."""
        self.statistic = max(0.0, self.statistic + rank_evidence(rank, reference_size) - self.config.cusum_drift)
        if self.statistic == 0.0:
            self.run_start = None
        elif self.run_start is None:
            self.run_start = start
        return self.run_start if self.statistic > self.threshold(hop_seconds) else None


RULES: dict[str, type[NOfMRule] | type[CusumRule]] = {"n_of_m": NOfMRule, "cusum": CusumRule}


class AlertTracker:
    """One machine's alert state machine (see the module docstring): the raise rule is a
    strategy (``alerts.rule``); clearing, cooldown and event ids are shared by both rules."""

    def __init__(self, machine: str, config: AlertConfig) -> None:
        self.machine = machine
        self._rule: NOfMRule | CusumRule = RULES[config.rule](config)
        self.config = config
        self._calm = 0
        self._cleared_at: float | None = None
        self.open_event: str | None = None
        self.open_start: float | None = None
        self.open_rule: AlertRule | None = None

    @property
    def config(self) -> AlertConfig:
        return self._config

    @config.setter
    def config(self, config: AlertConfig) -> None:
        """New settings (a reload) apply from the next window. Same rule: N-of-M's history is
        resized to ``raise_window`` keeping the newest, CUSUM keeps S. Another rule: its state
        starts fresh (one rule's history says nothing about the other's). An open alert stays
        open and clears by the new clear settings."""
        self._config = config
        if self._rule.name == config.rule:
            self._rule.reconfigure(config)
        else:
            self._rule = RULES[config.rule](config)

    @property
    def rule(self) -> NOfMRule | CusumRule:
        return self._rule

    @property
    def alerting(self) -> bool:
        return self.open_event is not None

    def is_anomalous(self, fused_rank: float) -> bool:
        """Above ``threshold``: what the score messages call anomalous, whichever rule raises."""
        return fused_rank > self.config.threshold

    def update(self, start: float, end: float, fused_rank: float, *, reference_size: int = DEFAULT_REFERENCE_SIZE,
               hop_seconds: float = DEFAULT_HOP_SECONDS) -> Transition | None:
        """Feed one scored window (times in epoch seconds); returns a raise or clear, if any.

        ``reference_size``: scores in the rank reference (caps the rank for CUSUM, see
        :func:`rank_evidence`); ``hop_seconds``: the daemon's hop (turns CUSUM's ARL in days
        into windows)."""
        cfg = self.config
        if self.alerting:
            self._calm = self._calm + 1 if fused_rank < cfg.clear_threshold else 0
            if self._calm < cfg.clear_count:
                return None
            transition = Transition("clear", self.open_event, self.open_start, end, self.open_rule)
            self.open_event = self.open_start = self.open_rule = None
            self._cleared_at = end
            self._rule.reset()
            return transition
        episode_start = self._rule.observe(start, fused_rank, reference_size, hop_seconds)
        cooling = self._cleared_at is not None and start < self._cleared_at + cfg.cooldown_seconds
        if episode_start is None or cooling:
            return None
        self.open_start, self.open_rule = episode_start, self._rule.name
        self.open_event = event_id(self.machine, self.open_start)
        self._calm = 0
        return Transition("raise", self.open_event, self.open_start, end, self.open_rule)
