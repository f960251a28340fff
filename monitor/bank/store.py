"""The enrolled bank of normal embeddings on disk: versioned, atomic, verified.

The bank is the only memory of what "normal" sounds like, so losing or silently
corrupting it would make every later score meaningless.  Each save therefore
writes a new immutable version next to the old ones and only then switches the
``CURRENT`` pointer with an atomic rename; a crash at any point leaves the
previous version current, and rolling back is just pointing ``CURRENT`` at an
older version.  Every file carries a sha256 in the version's manifest and is
verified on load, so a damaged bank is refused with a one-line error instead of
being scored against.

Layout of a bank directory::

    DIR/CURRENT                  name of the current version, e.g. "v000003\\n"
    DIR/LOCK                     flock target serialising writers
    DIR/versions/v000001/        one immutable folder per version
        manifest.json            format, version, created, parent, note, backbones, items
        NAME.npy                 float32 [count, dim] embeddings per backbone
        items.jsonl              one JSON object per enrolled window, in row order
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import math
import os
import re
import secrets
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

logger = logging.getLogger(__name__)

FORMAT = 'asd-bank'
FORMAT_VERSION = 1
ITEMS_FILE = 'items.jsonl'
MANIFEST_FILE = 'manifest.json'

_VERSION_RE = re.compile(r'v\d{6}')
# Backbone names become file names, so they are restricted to a safe set.
_BACKBONE_RE = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]*')
_TMP_PREFIX = '.tmp-'
_REQUIRED_ITEM_FIELDS = ('source', 'offset_s', 'condition', 'enrolled_at')
_ITEM_FIELDS = (*_REQUIRED_ITEM_FIELDS, 'level_dbfs', 'sample_rate')


class BankError(ValueError):
    """The bank is invalid, inconsistent, corrupt or incompatible."""


class BankNotFound(BankError):
    """No bank (or no such version) exists at the given place."""


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
        """
        items = list(items)
        new = {name: _as_embeddings(name, arr) for name, arr in embeddings.items()}
        if set(model_ids) != set(new):
            raise BankError(
                f"bank add: model_ids for {sorted(model_ids)} but embeddings for {sorted(new)}"
            )
        for name, arr in new.items():
            if arr.shape[0] != len(items):
                raise BankError(f"bank add: backbone {name!r}: {arr.shape[0]} embeddings for {len(items)} new items")
        if self.model_ids:
            if set(new) != set(self.embeddings):
                raise BankError(
                    f"bank add: backbone mismatch: expected {self.backbones}, got {sorted(new)}"
                )
            self.check_compatible(model_ids)
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
            model_ids=dict(model_ids),
            parent=_parent_of(self),
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
    if not isinstance(name, str) or not _BACKBONE_RE.fullmatch(name):
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


class BankStore:
    """Versioned bank directory: atomic saves, verified loads, rollback."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def _versions_dir(self) -> Path:
        return self.path / 'versions'

    @property
    def _current_file(self) -> Path:
        return self.path / 'CURRENT'

    def exists(self) -> bool:
        """Whether a bank has been saved here (a CURRENT pointer exists)."""
        return self._current_file.is_file()

    def current(self) -> str | None:
        """Name of the current version, or None if nothing was saved yet."""
        try:
            text = self._current_file.read_text(encoding='utf-8')
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise BankError(f"bank {self._current_file}: unreadable ({exc})") from None
        name = text.strip()
        if not _VERSION_RE.fullmatch(name):
            raise BankError(f"bank {self._current_file}: invalid version name {name[:40]!r}")
        return name

    def versions(self) -> list[str]:
        """All version folders, oldest first (whether loadable or not)."""
        try:
            names = [entry.name for entry in os.scandir(self._versions_dir) if entry.is_dir()]
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise BankError(f"bank {self._versions_dir}: unreadable ({exc})") from None
        return sorted(name for name in names if _VERSION_RE.fullmatch(name))

    def load(self, version: str | None = None) -> Bank:
        """Load and verify a version (the current one when None)."""
        if version is None:
            if not self.path.is_dir():
                raise BankNotFound(f"bank {self.path}: directory not found")
            version = self.current()
            if version is None:
                raise BankNotFound(f"bank {self.path}: no CURRENT file (nothing saved yet)")
            if not (self._versions_dir / version).is_dir():
                # Not BankNotFound: a dangling pointer is damage, not a fresh bank.
                raise BankError(f"bank {self._current_file}: points to missing version {version}")
        bank = _read_version(self._version_dir(version))
        logger.debug("loaded bank %s version %s: %d items, backbones %s", self.path, version, len(bank), bank.backbones)
        return bank

    def save(self, bank: Bank, note: str = '') -> str:
        """Write the bank as a new version, make it current and return its name.

        Order matters for crash safety: the version is fully written and synced
        under a temporary name, renamed into place, and only then does CURRENT
        move to it.  Existing versions, valid or corrupt, are never touched.
        """
        # Rebuilding re-runs every check, since a Bank's fields may have been
        # reassigned since it was constructed.
        bank = replace(bank)
        if not isinstance(note, str):
            raise BankError(f"bank save: note must be a string, got {note!r}")
        _make_dirs(self._versions_dir)
        with self._lock():
            self._remove_stale_temporaries()
            existing = [int(name[1:]) for name in os.listdir(self._versions_dir) if _VERSION_RE.fullmatch(name)]
            version = f"v{max(existing, default=0) + 1:06d}"
            tmp = self._versions_dir / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
            tmp.mkdir()
            _write_version(tmp, bank, version, note)
            _fsync_dir(tmp)
            os.rename(tmp, self._versions_dir / version)
            _fsync_dir(self._versions_dir)
            # Never point CURRENT at something that does not read back.
            _read_version(self._versions_dir / version)
            self._write_current(version)
        logger.info("saved bank %s version %s (%d items, parent %s)", self.path, version, len(bank), _parent_of(bank))
        return version

    def set_current(self, version: str) -> None:
        """Point CURRENT at an existing, verified version (rollback / roll forward)."""
        if not self.path.is_dir():
            raise BankNotFound(f"bank {self.path}: directory not found")
        with self._lock():
            _read_version(self._version_dir(version))
            self._write_current(version)
        logger.info("bank %s current version set to %s", self.path, version)

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` versions; the current one is always kept.

        A version is first renamed to a temporary name (atomic: readers never see it half
        deleted), then removed. Returns the versions removed.
        """
        if keep < 1:
            raise BankError(f"bank prune: keep must be >= 1, got {keep}")
        with self._lock():
            current = self.current()
            versions = self.versions()
            doomed = [v for v in versions[:-keep] if v != current]
            for version in doomed:
                trash = self._versions_dir / f"{_TMP_PREFIX}pruned-{version}"
                os.rename(self._versions_dir / version, trash)
                shutil.rmtree(trash, ignore_errors=True)
            if doomed:
                _fsync_dir(self._versions_dir)
        logger.info("bank %s: pruned %s", self.path, ", ".join(doomed) or "nothing")
        return doomed

    def export(self, destination: Path, version: str | None = None) -> str:
        """Write one verified version as a .tar.gz (for another box or a backup)."""
        version = version or self.current()
        if version is None:
            raise BankNotFound(f"bank {self.path}: nothing to export (no CURRENT)")
        folder = self._version_dir(version)
        _read_version(folder)
        tmp = destination.with_name(destination.name + '.partial')
        with tarfile.open(tmp, 'w:gz') as archive:
            archive.add(folder, arcname=version)
        os.replace(tmp, destination)
        return version

    def import_archive(self, archive_path: Path, replace_models: bool = False, note: str = '') -> str:
        """Verify an exported version and save it here as a new current version.

        Refused, with nothing changed, when the archive is not a bank export, fails its
        checksums, or holds embeddings of other models than this bank's current version
        (unless ``replace_models``: the daemon's config must then name those models).
        """
        try:
            archive = tarfile.open(archive_path, 'r:gz')
        except (OSError, tarfile.TarError) as exc:
            raise BankError(f"bank import {archive_path}: not a bank export ({exc})") from None
        with archive, tempfile.TemporaryDirectory(prefix='asd-bank-import-') as tmp:
            members = archive.getmembers()
            tops = {Path(m.name).parts[0] for m in members if m.name}
            if len(tops) != 1 or not _VERSION_RE.fullmatch(next(iter(tops))):
                raise BankError(f"bank import {archive_path}: expected one version folder, found {sorted(tops)[:3]}")
            unsafe = [m.name for m in members if not (m.isfile() or m.isdir()) or Path(m.name).is_absolute()
                      or '..' in Path(m.name).parts]
            if unsafe:
                raise BankError(f"bank import {archive_path}: refusing unsafe member {unsafe[0]!r}")
            try:
                archive.extractall(tmp)  # members checked above (Python < 3.11.4 has no extraction filter)
            except (OSError, tarfile.TarError) as exc:
                raise BankError(f"bank import {archive_path}: cannot unpack ({exc})") from None
            imported = _read_version(Path(tmp) / next(iter(tops)))
        if not replace_models:
            try:
                current = self.load()
            except BankNotFound:
                current = None
            if current is not None and current.model_ids != imported.model_ids:
                raise BankError(
                    f"bank import {archive_path}: embeddings of {imported.model_ids} do not match this bank's "
                    f"{current.model_ids} (another backbone or model version); nothing imported"
                )
        fresh = Bank(items=imported.items, embeddings=imported.embeddings, model_ids=imported.model_ids,
                     parent=self.current() if self.path.is_dir() else None)
        return self.save(fresh, note=note or f"imported from {Path(archive_path).name} ({imported.version})")

    def _version_dir(self, version: str) -> Path:
        if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
            raise BankError(f"bank {self.path}: invalid version name {version!r}")
        path = self._versions_dir / version
        if not path.is_dir():
            raise BankNotFound(f"bank {path}: version not found")
        return path

    def _write_current(self, version: str) -> None:
        tmp = self.path / 'CURRENT.tmp'
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(version + '\n')
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._current_file)
        _fsync_dir(self.path)

    def _remove_stale_temporaries(self) -> None:
        """Remove folders of saves that crashed; safe since writers hold the lock."""
        for entry in os.scandir(self._versions_dir):
            if entry.name.startswith(_TMP_PREFIX) and entry.is_dir(follow_symlinks=False):
                logger.warning("removing stale temporary bank folder %s", entry.path)
                try:
                    shutil.rmtree(entry.path)
                except OSError as exc:
                    # Leftovers are ignored by readers, so failing to tidy must not block a save.
                    logger.warning("cannot remove %s: %s", entry.path, exc)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise writers (e.g. the daemon and an enrolment CLI) on DIR/LOCK."""
        with open(self.path / 'LOCK', 'a+b') as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _parent_of(bank: Bank) -> str | None:
    return bank.version if bank.version is not None else bank.parent


class _HashingWriter:
    """File wrapper that hashes exactly the bytes written, so no re-read is needed."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self._f.write(data)


def _write_file(path: Path, write: Callable[[_HashingWriter], object]) -> str:
    """Create path, fill it with write(file), fsync it and return its sha256."""
    with open(path, 'xb') as f:
        hashing = _HashingWriter(f)
        write(hashing)
        f.flush()
        os.fsync(f.fileno())
    return hashing.sha256.hexdigest()


def _write_version(folder: Path, bank: Bank, version: str, note: str) -> None:
    backbones = {}
    for name in bank.backbones:
        arr = bank.embeddings[name]
        file = f"{name}.npy"
        digest = _write_file(folder / file, lambda f, a=arr: np.save(f, a, allow_pickle=False))
        backbones[name] = {
            'model_id': bank.model_ids[name], 'dim': int(arr.shape[1]), 'count': int(arr.shape[0]),
            'file': file, 'sha256': digest,
        }
    lines = b''.join(
        json.dumps(asdict(item), ensure_ascii=False, allow_nan=False).encode('utf-8') + b'\n' for item in bank.items
    )
    manifest = {
        'format': FORMAT,
        'format_version': FORMAT_VERSION,
        'version': version,
        'created': datetime.now(timezone.utc).isoformat(timespec='seconds'),
        'parent': _parent_of(bank),
        'note': note,
        'backbones': backbones,
        'items_file': ITEMS_FILE,
        'items_sha256': _write_file(folder / ITEMS_FILE, lambda f: f.write(lines)),
    }
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + '\n'
    _write_file(folder / MANIFEST_FILE, lambda f: f.write(text.encode('utf-8')))


def _read_version(folder: Path) -> Bank:
    """Read one version folder, verifying everything the manifest promises."""
    manifest_path = folder / MANIFEST_FILE
    manifest = _read_manifest(manifest_path)

    def fail(what: str) -> BankError:
        return BankError(f"bank {manifest_path}: {what}")

    if manifest.get('format') != FORMAT:
        raise fail(f"format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get('format_version') != FORMAT_VERSION:
        raise fail(f"unsupported format_version {manifest.get('format_version')!r} (expected {FORMAT_VERSION})")
    if manifest.get('version') != folder.name:
        raise fail(f"version {manifest.get('version')!r} does not match folder {folder.name!r}")
    for key, types in (('created', str), ('parent', (str, type(None))), ('note', str),
                       ('backbones', dict), ('items_file', str), ('items_sha256', str)):
        if not isinstance(manifest.get(key), types):
            raise fail(f"missing or invalid {key!r}: {manifest.get(key)!r}")

    embeddings, model_ids = {}, {}
    for name, entry in manifest['backbones'].items():
        if not _BACKBONE_RE.fullmatch(name) or not isinstance(entry, dict):
            raise fail(f"invalid backbone entry {name!r}")
        for key, types in (('model_id', str), ('dim', int), ('count', int), ('file', str), ('sha256', str)):
            if not isinstance(entry.get(key), types) or isinstance(entry.get(key), bool):
                raise fail(f"backbone {name!r}: missing or invalid {key!r}: {entry.get(key)!r}")
        path = folder / _plain_name(entry['file'], fail)
        arr = _load_npy(path, _read_verified(path, entry['sha256']))
        if arr.dtype != np.float32 or arr.shape != (entry['count'], entry['dim']):
            expected = (entry['count'], entry['dim'])
            raise BankError(f"bank {path}: {arr.dtype} {arr.shape} does not match manifest float32 {expected}")
        if not np.isfinite(arr).all():
            raise BankError(f"bank {path}: embeddings contain NaN or Inf")
        embeddings[name], model_ids[name] = arr, entry['model_id']

    items_path = folder / _plain_name(manifest['items_file'], fail)
    items = _parse_items(items_path, _read_verified(items_path, manifest['items_sha256']))
    for name, arr in embeddings.items():
        if arr.shape[0] != len(items):
            raise BankError(f"bank {items_path}: {len(items)} items but backbone {name!r} has {arr.shape[0]} rows")
    try:
        return Bank(
            version=folder.name, items=items, embeddings=embeddings, model_ids=model_ids,
            created=manifest['created'], parent=manifest['parent'], note=manifest['note'],
        )
    except BankError as exc:
        raise fail(str(exc)) from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BankError(f"bank {path}: missing") from None
    except OSError as exc:
        raise BankError(f"bank {path}: unreadable ({exc.strerror or exc})") from None


def _read_manifest(path: Path) -> dict[str, Any]:
    data = _read_bytes(path)
    try:
        manifest = json.loads(data.decode('utf-8'))
    except UnicodeDecodeError:
        raise BankError(f"bank {path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise BankError(f"bank {path}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(manifest, dict):
        raise BankError(f"bank {path}: expected a JSON object, got {type(manifest).__name__}")
    return manifest


def _plain_name(name: str, fail: Callable[[str], BankError]) -> str:
    """Manifest file names must stay inside the version folder."""
    if not name or name != Path(name).name or name.startswith('.'):
        raise fail(f"invalid file name {name!r}")
    return name


def _read_verified(path: Path, sha256: str) -> bytes:
    """Read a whole file and check it against its manifest digest.

    The bytes that were hashed are the bytes that get parsed, so a file cannot
    change between verification and use.
    """
    data = _read_bytes(path)
    if hashlib.sha256(data).hexdigest() != sha256.lower():
        raise BankError(f"bank {path}: sha256 mismatch (corrupt file)")
    return data


def _load_npy(path: Path, data: bytes) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BankError(f"bank {path}: not a valid .npy array ({reason})") from None
    if not isinstance(arr, np.ndarray):
        raise BankError(f"bank {path}: not a single .npy array")
    return arr


def _parse_items(path: Path, data: bytes) -> list[BankItem]:
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError:
        raise BankError(f"bank {path}: not UTF-8 text") from None
    lines = text.split('\n')
    if lines[-1] == '':
        lines.pop()
    items = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BankError(f"bank {path}: line {number}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not set(_REQUIRED_ITEM_FIELDS) <= set(record) <= set(_ITEM_FIELDS):
            raise BankError(f"bank {path}: line {number}: expected an object with keys {', '.join(_ITEM_FIELDS)}")
        try:
            items.append(BankItem(**record))
        except BankError as exc:
            raise BankError(f"bank {path}: line {number}: {exc}") from None
    return items


def _make_dirs(path: Path) -> None:
    """mkdir -p that also syncs every new directory entry to disk."""
    missing = []
    for parent in [path, *path.parents]:
        if parent.is_dir():
            break
        missing.append(parent)
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            if not folder.is_dir():
                raise BankError(f"bank {folder}: exists but is not a directory") from None
        except OSError as exc:
            raise BankError(f"bank {folder}: cannot create directory ({exc.strerror or exc})") from None
        _fsync_dir(folder.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
