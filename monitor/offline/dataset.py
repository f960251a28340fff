"""DCASE development-layout data sets: clip records parsed from file names.

Ground truth in the DCASE (and MIMII) releases lives only in the file names, so labels,
domains and splits are recovered here from the names and the folder layout
``<root>/<machine>/{train,test}/<file>`` rather than from any side file.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from monitor.audio.files import is_audio, is_hidden
from monitor.errors import DatasetError

log = logging.getLogger(__name__)

SPLITS = ("train", "test")

# section_00_source_train_normal_0000[_attributes]: the development-set convention.
_DCASE_NAME = re.compile(
    r"^section_(?P<section>\d+)_(?P<domain>source|target)_(?P<split>train|test)_"
    r"(?P<label>normal|anomaly)_(?P<index>\d+)(?:_(?P<attributes>.*))?$",
    re.IGNORECASE,
)
# section_00_0000: the evaluation-set convention, whose labels and domains are hidden.
_DCASE_EVAL_NAME = re.compile(r"^section_(?P<section>\d+)_(?P<index>\d+)$", re.IGNORECASE)
# normal_id_00_..., anomaly_..., abnormal_...: flattened MIMII names (no domain, no section).
_MIMII_NAME = re.compile(r"^(?P<label>normal|anomaly|abnormal)(?:_(?P<attributes>.*))?$", re.IGNORECASE)


@dataclass(frozen=True)
class Clip:
    """One audio file and the ground truth its name and location carry.

    ``label`` and ``domain`` are None when the name does not tell them (evaluation-set or
    foreign names), so that callers can score such clips but never mistake them for normals.
    """

    path: Path
    machine: str
    split: str
    label: str | None
    domain: str | None
    section: str | None
    attributes: str

    @property
    def is_anomaly(self) -> bool:
        """True only for clips known to be anomalous; unknown labels count as not anomalous."""
        return self.label == "anomaly"


def _infer_machine(path: Path) -> str:
    """Machine from the layout: ``<machine>/<split>/file`` or, outside a split folder, ``<machine>/file``."""
    parent = path.parent
    machine = parent.parent.name if parent.name.lower() in SPLITS else parent.name
    if not machine:
        raise DatasetError(f"cannot infer the machine of {path}: pass machine= explicitly")
    return machine


def parse_clip(path: Path, machine: str | None = None, *, strict: bool = False) -> Clip:
    """Parse one clip's ground truth from its file name and folders.

    ``machine`` defaults to the folder above the split folder (``<machine>/<split>/file``),
    or to the parent folder when the file does not sit in a split folder. The split comes
    from the parent folder when it is ``train``/``test`` (the layout is what the data set
    is used as), else from the name, else it is ``test``: a clip of unknown provenance is
    something to score, never something to enroll as normal.

    Names that fit no known pattern give ``label``/``domain`` None, or raise
    :class:`DatasetError` when ``strict`` is true.
    """
    path = Path(path)
    machine = machine if machine is not None else _infer_machine(path)
    stem = path.stem
    name_split: str | None = None
    label: str | None = None
    domain: str | None = None
    section: str | None = None
    attributes = ""

    if match := _DCASE_NAME.match(stem):
        section = match["section"]
        domain = match["domain"].lower()
        name_split = match["split"].lower()
        label = match["label"].lower()
        attributes = match["attributes"] or ""
    elif match := _DCASE_EVAL_NAME.match(stem):
        section = match["section"]
    elif match := _MIMII_NAME.match(stem):
        label = "normal" if match["label"].lower() == "normal" else "anomaly"
        attributes = match["attributes"] or ""
    elif strict:
        raise DatasetError(f"{path}: file name fits neither the DCASE nor the MIMII naming pattern")

    folder = path.parent.name.lower()
    if folder in SPLITS:
        split = folder
        if name_split is not None and name_split != split:
            log.warning("%s: name says split %r but the folder says %r; using the folder", path, name_split, split)
    else:
        split = name_split or "test"

    return Clip(
        path=path,
        machine=machine,
        split=split,
        label=label,
        domain=domain,
        section=section,
        attributes=attributes,
    )


def _audio_in(folder: Path) -> list[Path]:
    """Audio files directly inside ``folder`` (the DCASE layout is flat)."""
    return [p for p in folder.iterdir() if p.is_file() and is_audio(p) and not is_hidden(p, folder)]


def scan_dataset(root: Path) -> dict[str, list[Clip]]:
    """Clips of every machine folder under ``root`` that has a ``train/`` and/or ``test/`` folder.

    Machines are returned in name order, each with its clips sorted by path, so that
    downstream scores and reports are reproducible. Machine folders without audio are
    left out.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    machines: dict[str, list[Clip]] = {}
    for machine_dir in sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden(p, root)):
        split_dirs = [machine_dir / split for split in SPLITS if (machine_dir / split).is_dir()]
        if not split_dirs:
            continue
        files = sorted(f for split_dir in split_dirs for f in _audio_in(split_dir))
        if not files:
            log.debug("skipping %s: no audio in its split folders", machine_dir)
            continue
        machines[machine_dir.name] = [parse_clip(f, machine_dir.name) for f in files]
    if not machines:
        raise DatasetError(f"dataset root {root} holds no <machine>/train or <machine>/test folder with audio")
    log.info("found %d machines under %s", len(machines), root)
    return machines
