"""What a bank is: enrolled windows (``BankItem``) and their embeddings per backbone (``Bank``).

A bank is immutable: ``add`` returns a new one, so a scoring thread holding the current bank
keeps a consistent view while enrollment builds the next. How banks are kept on disk is
``monitor.bank.store``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from monitor.errors import BankError

# Backbone names become file names, so they are restricted to a safe set.
BACKBONE_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]*')


def enrolled_at() -> str:
    """The time stamp of a window enrolled now: ISO 8601 UTC to the second (one format for
    every way of enrolling)."""
    return datetime.now(timezone.utc).isoformat(timespec='seconds')


@dataclass(frozen=True)
class BankItem:
    """One enrolled 10 s window: where it came from and its operating condition."""

    source: str
    offset_s: float
    condition: str
    enrolled_at: str
    # RMS level of the window's audio; the sensor check compares live levels with it.
    level_dbfs: float | None = None
    # Sample rate the window was recorded at (before resampling to the model's rate): audio
    # at another rate has another bandwidth, which a model sees as a different sound.
    sample_rate: int | None = None

    def __post_init__(self) -> None:
        for name in ('source', 'condition', 'enrolled_at'):
            if not isinstance(getattr(self, name), str):
                raise BankError(f"bank item: {name} must be a string, got {getattr(self, name)!r}")
        for name in ('offset_s', 'level_dbfs'):
            value = getattr(self, name)
            if value is None and name == 'level_dbfs':
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise BankError(f"bank item: {name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        rate = self.sample_rate
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0):
            raise BankError(f"bank item: sample_rate must be a positive integer, got {rate!r}")

    @classmethod
    def enrolled_now(cls, source: str, offset_s: float, condition: str, level_dbfs: float | None,
                     sample_rate: int) -> BankItem:
        """A window enrolled now: the one way enrollment from files, live enrollment and
        evaluation make items."""
        return cls(source, offset_s, condition, enrolled_at(), level_dbfs, sample_rate)


@dataclass
class Bank:
    """Enrolled items and their embeddings per backbone (row i belongs to items[i]).

    ``version`` is the stored version this bank was loaded as (None once
    changed); ``parent`` is the version it was derived from, recorded as the
    parent of the version it is saved as.
    """

    version: str | None = None
    items: list[BankItem] = field(default_factory=list)
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    model_ids: dict[str, str] = field(default_factory=dict)
    created: str | None = None
    parent: str | None = None
    note: str = ''

    def __post_init__(self) -> None:
        self.items = list(self.items)
        self.embeddings = {name: _as_embeddings(name, arr) for name, arr in self.embeddings.items()}
        self.model_ids = dict(self.model_ids)
        self._validate()

    @property
    def backbones(self) -> list[str]:
        """Sorted backbone names."""
        return sorted(self.embeddings)

    @property
    def dims(self) -> dict[str, int]:
        """Embedding dimension per backbone."""
        return {name: arr.shape[1] for name, arr in self.embeddings.items()}

    @property
    def outputs(self) -> dict[str, list[str]]:
        """The model outputs the bank holds, per model: a backbone named after the model alone is its
        embedding, ``<model>.<output>`` another output (``aisfx``: embedding, block2, block3; a bank
        enrolled before every output was kept holds the embedding alone)."""
        held: dict[str, list[str]] = {}
        for name in self.backbones:
            model, _, output = name.partition('.')
            held.setdefault(model, []).append(output or 'embedding')
        return held

    @property
    def recorded_rates(self) -> set[int]:
        """Sample rates the enrolled audio was recorded at (banks from before they were kept: none)."""
        return {item.sample_rate for item in self.items if item.sample_rate is not None}

    @property
    def conditions(self) -> list[str]:
        """Sorted unique operating conditions."""
        return sorted({item.condition for item in self.items})

    def condition_labels(self) -> list[str]:
        """Operating condition of every item, in row order (for KnnScorer)."""
        return [item.condition for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def check_compatible(self, model_ids: Mapping[str, str]) -> None:
        """Refuse to score with models other than the ones the bank was enrolled with.

        Embeddings of different models live in unrelated spaces, so distances
        across them are meaningless.  An empty bank (no backbones yet) is
        compatible with anything, since the first enrolment defines its models.
        """
        if not self.model_ids:
            return
        for name in sorted(set(self.model_ids) | set(model_ids)):
            expected, got = self.model_ids.get(name), model_ids.get(name)
            if expected != got:
                raise BankError(
                    f"bank backbone {name!r}: model_id mismatch: expected {expected!r}, got {got!r}"
                )

    def add(
        self,
        items: Sequence[BankItem],
        embeddings: Mapping[str, np.ndarray],
        model_ids: Mapping[str, str],
    ) -> Bank:
        """Return a new bank with the items and their embeddings appended.

        The bank is never mutated, so a caller holding the current bank (e.g. the
        scoring loop) keeps a consistent view while a new one is being built.

        A bank keeps its layout: rows are added for the backbones it already holds, and further
        ones offered are left out (a backbone with rows for only some windows could not be
        scored). An empty bank takes every backbone offered with a model_id: enrollment offers
        the embeddings a window was scored with too, and names in ``model_ids`` what to keep.
        """
        items = list(items)
        names = self.backbones if self.model_ids else sorted(set(embeddings) & set(model_ids))
        if not names:
            raise BankError(f"bank add: nothing to keep: embeddings for {sorted(embeddings)}, "
                            f"model_ids for {sorted(model_ids)}")
        lacking = [name for name in names if name not in embeddings or name not in model_ids]
        if lacking:
            raise BankError(f"bank add: no embeddings or model_id for backbone(s) {', '.join(lacking)} of the bank "
                            f"(offered: {', '.join(sorted(embeddings))}): enroll with the bank's backbones, or "
                            f"start a new bank (--replace)")
        new = {name: _as_embeddings(name, embeddings[name]) for name in names}
        for name, arr in new.items():
            if arr.shape[0] != len(items):
                raise BankError(f"bank add: backbone {name!r}: {arr.shape[0]} embeddings for {len(items)} new items")
        kept_ids = {name: model_ids[name] for name in names}
        if self.model_ids:
            self.check_compatible(kept_ids)
            for name, arr in new.items():
                if arr.shape[1] != self.dims[name]:
                    raise BankError(
                        f"bank backbone {name!r}: dim mismatch: expected {self.dims[name]}, got {arr.shape[1]}"
                    )
            merged = {name: np.concatenate([self.embeddings[name], arr]) for name, arr in new.items()}
        else:
            # Copy so the new bank never shares memory with the caller's arrays.
            merged = {name: arr.copy() for name, arr in new.items()}
        return Bank(
            version=None,
            items=self.items + items,
            embeddings=merged,
            model_ids=kept_ids,
            parent=parent_of(self),
        )

    def _validate(self) -> None:
        """Check the invariants that make rows, items and backbones line up."""
        for i, item in enumerate(self.items):
            if not isinstance(item, BankItem):
                raise BankError(f"bank item {i}: expected a BankItem, got {type(item).__name__}")
        if set(self.model_ids) != set(self.embeddings):
            raise BankError(
                f"bank: model_ids for {sorted(self.model_ids)} but embeddings for {sorted(self.embeddings)}"
            )
        for name, model_id in self.model_ids.items():
            if not isinstance(model_id, str) or not model_id:
                raise BankError(f"bank backbone {name!r}: model_id must be a non-empty string, got {model_id!r}")
        if self.items and not self.embeddings:
            raise BankError(f"bank: {len(self.items)} items but no backbones")
        for name, arr in self.embeddings.items():
            if arr.shape[0] != len(self.items):
                raise BankError(f"bank backbone {name!r}: {arr.shape[0]} embeddings for {len(self.items)} items")


def _as_embeddings(name: str, arr: np.ndarray) -> np.ndarray:
    """Validate one backbone's embeddings and return them as contiguous float32."""
    if not isinstance(name, str) or not BACKBONE_NAME.fullmatch(name):
        raise BankError(f"bank backbone {name!r}: invalid name (letters, digits, '.', '_', '-')")
    values = np.asarray(arr)
    if values.dtype.kind not in 'fiu':
        raise BankError(f"bank backbone {name!r}: expected numeric embeddings, got dtype {values.dtype}")
    if values.ndim != 2 or values.shape[1] == 0:
        raise BankError(f"bank backbone {name!r}: expected embeddings [count, dim], got shape {values.shape}")
    with np.errstate(over='ignore'):  # overflow is reported below
        values = np.ascontiguousarray(values, dtype=np.float32)
    if not np.isfinite(values).all():
        raise BankError(f"bank backbone {name!r}: embeddings contain NaN or Inf")
    return values


def check_audio_rate(recorded: set[int], rate: int, model_rate: int, what: str) -> None:
    """Refuse audio whose bandwidth differs from the enrolled audio's.

    Resampling cannot restore a band that was never recorded: 8 kHz audio brought to a 16 kHz
    model is silent above 4 kHz, and its windows would all look anomalous against a bank
    enrolled at 16 kHz (or, enrolled into it, teach the bank a sound the machine never makes).
    What matters is the band the model sees, up to half of min(recording rate, model rate),
    so 44.1 and 48 kHz audio go together for a 16 kHz model.
    """
    band = min(rate, model_rate)
    enrolled = {min(r, model_rate) for r in recorded}
    if enrolled and band not in enrolled:
        rates = ", ".join(f"{r} Hz" for r in sorted(recorded))
        raise BankError(f"{what}: audio recorded at {rate} Hz holds sound up to {band / 2:g} Hz, but the bank was "
                        f"enrolled from audio at {rates} (up to {max(enrolled) / 2:g} Hz for this model): record at the "
                        f"bank's rate, or enroll a new bank at this one (--replace)")


def parent_of(bank: Bank) -> str | None:
    """The version a bank was loaded as, else the one it was derived from."""
    return bank.version if bank.version is not None else bank.parent


def enrolled_level(bank: Bank) -> float | None:
    """The quietest enrolled condition's median window level, the reference of the sensor's
    level-drop check (None for banks from before levels were kept).

    The quietest, not the overall median: a machine enrolled at full load and idling, or with
    site noise recorded while it was stopped, is expected at each of those levels, and only a
    drop below all of them says that the microphone lost its sound.
    """
    by_condition: dict[str, list[float]] = {}
    for item in bank.items:
        if item.level_dbfs is not None:
            by_condition.setdefault(item.condition, []).append(item.level_dbfs)
    return min(float(np.median(levels)) for levels in by_condition.values()) if by_condition else None
