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
import os
import re
import secrets
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from monitor.bank.model import BACKBONE_NAME, Bank, BankItem, parent_of
from monitor.errors import (
    AsdError,
    BankCurrentMissing,
    BankError,
    BankNotFound,
    first_line,
)

log = logging.getLogger(__name__)

FORMAT = 'asd-bank'
FORMAT_VERSION = 1
ITEMS_FILE = 'items.jsonl'
MANIFEST_FILE = 'manifest.json'

_VERSION_RE = re.compile(r'v\d{6}')
_TMP_PREFIX = '.tmp-'
_REQUIRED_ITEM_FIELDS = ('source', 'offset_s', 'condition', 'enrolled_at')
_ITEM_FIELDS = (*_REQUIRED_ITEM_FIELDS, 'level_dbfs', 'sample_rate')


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
                self._refuse_missing_current()
                raise BankNotFound(f"bank {self.path}: no CURRENT file (nothing saved yet)")
            if not (self._versions_dir / version).is_dir():
                # Not BankNotFound: a dangling pointer is damage, not a fresh bank.
                raise BankError(f"bank {self._current_file}: points to missing version {version}")
        bank = _read_version(self._version_dir(version))
        log.debug("loaded bank %s version %s: %d items, backbones %s", self.path, version, len(bank), bank.backbones)
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
        log.info("saved bank %s version %s (%d items, parent %s)", self.path, version, len(bank), parent_of(bank))
        return version

    def set_current(self, version: str) -> None:
        """Point CURRENT at an existing, verified version (rollback / roll forward)."""
        if not self.path.is_dir():
            raise BankNotFound(f"bank {self.path}: directory not found")
        with self._lock():
            _read_version(self._version_dir(version))
            self._write_current(version)
        log.info("bank %s current version set to %s", self.path, version)

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` versions; the current one is always kept.

        A version is first renamed to a temporary name (atomic: readers never see it half
        deleted), then removed. Returns the versions removed.
        """
        if keep < 1:
            raise BankError(f"bank prune: keep must be >= 1, got {keep}")
        with self._lock():
            current = self.current()
            if current is None:
                self._refuse_missing_current()
            versions = self.versions()
            doomed = [v for v in versions[:-keep] if v != current]
            for version in doomed:
                trash = self._versions_dir / f"{_TMP_PREFIX}pruned-{version}"
                os.rename(self._versions_dir / version, trash)
                shutil.rmtree(trash, ignore_errors=True)
            if doomed:
                _fsync_dir(self._versions_dir)
        log.info("bank %s: pruned %s", self.path, ", ".join(doomed) or "nothing")
        return doomed

    def export(self, destination: Path, version: str | None = None) -> str:
        """Write one verified version as a .tar.gz (for another box or a backup)."""
        version = version or self.current()
        if version is None:
            self._refuse_missing_current()
            raise BankNotFound(f"bank {self.path}: nothing to export (no CURRENT)")
        folder = self._version_dir(version)
        _read_version(folder)
        tmp = destination.with_name(destination.name + '.partial')
        with tarfile.open(tmp, 'w:gz') as archive:
            archive.add(folder, arcname=version)
        os.replace(tmp, destination)
        return version

    def import_archive(self, archive_path: Path, replace_models: bool = False, note: str = '',
                       check: Callable[[Bank], object] | None = None, config_source: str = 'the config') -> str:
        """Verify an exported version and save it here as a new current version.

        Refused, with nothing changed, when the archive is not a bank export, fails its
        checksums, or holds embeddings of other models than this bank's current version
        (unless ``replace_models``: the daemon's config must then name those models).
        ``check`` is the daemon's own bank check for the models of ``config_source`` (the
        detector's): an archive it refuses is refused here too, even into an empty bank, because
        the daemon would refuse the bank at its next start and leave the machine unmonitored
        (another box's bank enrolled with another backbone or model version).
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
        if check is not None:
            try:
                check(imported)
            except AsdError as exc:
                raise BankError(f"bank import {archive_path}: the daemon of {config_source} would refuse it "
                                f"({first_line(exc)}); nothing imported") from None
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

    def _refuse_missing_current(self) -> None:
        """Raise when versions exist although CURRENT does not (deleted, or lost in a crash of
        the very first save). Which version was in use is then unknown, so nothing guesses it:
        enrolling on as if the bank were empty would drop every enrolled window, and a daemon
        would watch the machine unscored."""
        versions = self.versions()
        if versions:
            raise BankCurrentMissing(
                f"bank {self.path}: CURRENT is missing but {len(versions)} version(s) exist "
                f"({versions[0]}..{versions[-1]}): pick the one to use (asd-monitor bank list --bank {self.path}), "
                f"then: asd-monitor bank use --bank {self.path} --version {versions[-1]}")

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
                log.warning("removing stale temporary bank folder %s", entry.path)
                try:
                    shutil.rmtree(entry.path)
                except OSError as exc:
                    # Leftovers are ignored by readers, so failing to tidy must not block a save.
                    log.warning("cannot remove %s: %s", entry.path, exc)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise writers (e.g. the daemon and an enrolment CLI) on DIR/LOCK."""
        with open(self.path / 'LOCK', 'a+b') as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


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
        'parent': parent_of(bank),
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
        if not BACKBONE_NAME.fullmatch(name) or not isinstance(entry, dict):
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
