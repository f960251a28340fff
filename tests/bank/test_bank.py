"""Tests for monitor.bank.store: round trips, versioning, crash safety and verification."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from monitor.bank import store as bank_module
from monitor.bank.model import Bank, BankItem
from monitor.bank.store import BankStore
from monitor.errors import BankError, BankNotFound

MODELS = {'beats': 'beats-iter3-as2m', 'eat': 'eat-base-epoch30'}
DIMS = {'beats': 768, 'eat': 512}


def _items(n: int, start: int = 0) -> list[BankItem]:
    return [
        BankItem(source=f"/data/normal_{i:03d}.wav" if i % 3 else f"live:mic0:{i}",
                 offset_s=10.0 * (i % 4), condition=('fast', 'slow', 'idle')[i % 3],
                 enrolled_at=f"2025-01-01T00:{i % 60:02d}:00+00:00")
        for i in range(start, start + n)
    ]


def _embeddings(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=(n, dim)).astype(np.float32) for name, dim in DIMS.items()}


def _bank(n: int = 7, seed: int = 0) -> Bank:
    return Bank().add(_items(n), _embeddings(n, seed), MODELS)


def _assert_same(a: Bank, b: Bank) -> None:
    assert a.items == b.items
    assert a.model_ids == b.model_ids
    assert a.backbones == b.backbones
    for name in a.backbones:
        assert a.embeddings[name].dtype == b.embeddings[name].dtype == np.float32
        assert a.embeddings[name].tobytes() == b.embeddings[name].tobytes()


def _version_dir(store: BankStore, version: str) -> Path:
    return store.path / 'versions' / version


# --- Bank -----------------------------------------------------------------


def test_bank_properties() -> None:
    bank = _bank(5)
    assert len(bank) == 5
    assert bank.backbones == ['beats', 'eat']
    assert bank.dims == DIMS
    assert bank.conditions == ['fast', 'idle', 'slow']
    assert bank.condition_labels() == ['fast', 'slow', 'idle', 'fast', 'slow']


def test_add_returns_a_new_bank_without_mutation() -> None:
    first = _bank(4, seed=1)
    before = {name: arr.copy() for name, arr in first.embeddings.items()}
    more = _embeddings(3, seed=2)
    second = first.add(_items(3, start=4), more, MODELS)
    assert len(first) == 4 and len(second) == 7
    for name in DIMS:
        np.testing.assert_array_equal(first.embeddings[name], before[name])
        np.testing.assert_array_equal(second.embeddings[name][4:], more[name])
    assert second.items[:4] == first.items


def test_add_copies_the_callers_arrays() -> None:
    emb = _embeddings(2, seed=3)
    bank = Bank().add(_items(2), emb, MODELS)
    emb['beats'][:] = 0.0
    assert np.any(bank.embeddings['beats'] != 0.0)


@pytest.mark.parametrize(('embeddings', 'model_ids', 'message'), [
    (_embeddings(2, 5), MODELS | {'beats': 'beats-other'}, "'beats'.*model_id mismatch.*beats-iter3-as2m.*beats-other"),
    ({'beats': np.zeros((2, 512), np.float32), 'eat': np.zeros((2, 512), np.float32)}, MODELS,
     "'beats'.*dim mismatch: expected 768, got 512"),
    ({'beats': np.zeros((2, 768), np.float32)}, {'beats': MODELS['beats']},
     r"no embeddings or model_id for backbone\(s\) eat of the bank \(offered: beats\)"),
    (_embeddings(2, 5), {'beats': MODELS['beats']}, r"no embeddings or model_id for backbone\(s\) eat"),
    (_embeddings(3, 5), MODELS, "add: backbone 'beats': 3 embeddings for 2 new items"),
    ({'beats': np.full((2, 768), np.nan, np.float32), 'eat': np.zeros((2, 512), np.float32)}, MODELS, 'NaN'),
])
def test_add_rejects_mismatches(embeddings: dict, model_ids: dict, message: str) -> None:
    with pytest.raises(BankError, match=message):
        _bank(2).add(_items(2), embeddings, model_ids)


def test_an_empty_bank_refuses_a_bad_backbone_name() -> None:
    with pytest.raises(BankError, match='invalid name'):
        Bank().add(_items(2), {'../evil': np.zeros((2, 4), np.float32)}, {'../evil': 'x'})


def test_a_bank_keeps_its_layout_when_more_backbones_are_offered() -> None:
    # A bank enrolled before every output was kept gets rows for its own backbones only: a
    # backbone with rows for some windows alone could never be scored.
    bank = _bank(2).add(_items(3), _embeddings(3, 5) | {'clap': np.ones((3, 8), np.float32)}, MODELS | {'clap': 'c'})
    assert bank.backbones == ['beats', 'eat'] and len(bank) == 5 and bank.model_ids == MODELS
    # An empty bank takes everything offered with a model_id.
    offered = _embeddings(3, 5) | {'clap': np.ones((3, 8), np.float32)}
    assert Bank().add(_items(3), offered, MODELS | {'clap': 'c'}).backbones == ['beats', 'clap', 'eat']
    assert Bank().add(_items(3), offered, MODELS).backbones == ['beats', 'eat']
    with pytest.raises(BankError, match="nothing to keep"):
        Bank().add(_items(3), offered, {'other': 'o'})


def test_check_compatible() -> None:
    bank = _bank(2)
    bank.check_compatible(MODELS)
    with pytest.raises(BankError, match="'eat'"):
        bank.check_compatible(MODELS | {'eat': 'eat-large'})
    with pytest.raises(BankError, match="'eat'"):
        bank.check_compatible({'beats': MODELS['beats']})
    with pytest.raises(BankError, match="'clap'"):
        bank.check_compatible(MODELS | {'clap': 'clap-v1'})
    Bank().check_compatible(MODELS)  # an empty bank takes any models


@pytest.mark.parametrize('kwargs', [
    {'source': 3, 'offset_s': 0.0, 'condition': 'a', 'enrolled_at': 't'},
    {'source': 's', 'offset_s': float('nan'), 'condition': 'a', 'enrolled_at': 't'},
    {'source': 's', 'offset_s': True, 'condition': 'a', 'enrolled_at': 't'},
    {'source': 's', 'offset_s': 0.0, 'condition': None, 'enrolled_at': 't'},
])
def test_bank_item_validation(kwargs: dict) -> None:
    with pytest.raises(BankError):
        BankItem(**kwargs)


# --- BankStore: round trip and versions ------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    store = BankStore(tmp_path / 'bank')
    assert not store.exists() and store.current() is None and store.versions() == []
    bank = _bank(9)
    version = store.save(bank, note='first enrolment')
    assert version == 'v000001'
    assert store.exists() and store.current() == 'v000001'
    assert (store.path / 'CURRENT').read_text() == 'v000001\n'

    loaded = store.load()
    _assert_same(bank, loaded)
    assert loaded.version == 'v000001' and loaded.parent is None and loaded.note == 'first enrolment'
    assert loaded.created is not None and loaded.created.endswith('+00:00')

    manifest = json.loads((_version_dir(store, version) / 'manifest.json').read_text())
    assert manifest['format'] == 'asd-bank' and manifest['format_version'] == 1
    assert manifest['backbones']['beats'] == {
        'model_id': MODELS['beats'], 'dim': 768, 'count': 9, 'file': 'beats.npy',
        'sha256': hashlib.sha256((_version_dir(store, version) / 'beats.npy').read_bytes()).hexdigest(),
    }
    np.testing.assert_array_equal(np.load(_version_dir(store, version) / 'eat.npy'), bank.embeddings['eat'])
    lines = (_version_dir(store, version) / 'items.jsonl').read_text().splitlines()
    assert [BankItem(**json.loads(line)) for line in lines] == bank.items


def test_versions_increment_and_parent_is_recorded(tmp_path: Path) -> None:
    store = BankStore(tmp_path)
    store.save(_bank(3))
    grown = store.load().add(_items(2, start=3), _embeddings(2, seed=9), MODELS)
    assert grown.version is None and grown.parent == 'v000001'
    assert store.save(grown, note='more') == 'v000002'
    again = store.load()
    assert again.version == 'v000002' and again.parent == 'v000001' and len(again) == 5
    assert store.save(again) == 'v000003'
    assert store.load().parent == 'v000002'
    assert store.versions() == ['v000001', 'v000002', 'v000003']
    _assert_same(store.load('v000001'), _bank(3))


def test_empty_bank_round_trip(tmp_path: Path) -> None:
    store = BankStore(tmp_path)
    store.save(Bank())
    loaded = store.load()
    assert len(loaded) == 0 and loaded.backbones == []


def test_unicode_items_round_trip(tmp_path: Path) -> None:
    items = [BankItem('/données/ventilateur é.wav', 2.5, 'vitesse élevée', '2025-03-01T12:00:00Z')]
    bank = Bank().add(items, {'beats': np.ones((1, 4), np.float32)}, {'beats': 'm'})
    store = BankStore(tmp_path)
    store.save(bank)
    assert store.load().items == items


def test_set_current_rolls_back(tmp_path: Path) -> None:
    store = BankStore(tmp_path)
    store.save(_bank(2, seed=1))
    store.save(_bank(3, seed=2))
    store.set_current('v000001')
    assert store.current() == 'v000001'
    _assert_same(store.load(), _bank(2, seed=1))
    # A save after a rollback never reuses a number.
    assert store.save(store.load()) == 'v000003'
    assert store.load().parent == 'v000001'


def test_set_current_to_missing_version_leaves_current(tmp_path: Path) -> None:
    store = BankStore(tmp_path)
    store.save(_bank(2))
    with pytest.raises(BankError, match='v000007'):
        store.set_current('v000007')
    with pytest.raises(BankError, match='invalid version name'):
        store.set_current('../v000001')
    assert store.current() == 'v000001'
    assert (tmp_path / 'CURRENT').read_text() == 'v000001\n'


def test_set_current_to_corrupt_version_is_refused(tmp_path: Path) -> None:
    store = BankStore(tmp_path)
    store.save(_bank(2))
    store.save(_bank(3))
    _flip_byte(_version_dir(store, 'v000001') / 'eat.npy')
    with pytest.raises(BankError, match='eat.npy: sha256 mismatch'):
        store.set_current('v000001')
    assert store.current() == 'v000002'


def test_missing_bank(tmp_path: Path) -> None:
    with pytest.raises(BankNotFound, match='directory not found'):
        BankStore(tmp_path / 'nope').load()
    with pytest.raises(BankNotFound, match='no CURRENT'):
        BankStore(tmp_path).load()
    with pytest.raises(BankNotFound):
        BankStore(tmp_path / 'nope').set_current('v000001')
    store = BankStore(tmp_path)
    store.save(_bank(1))
    with pytest.raises(BankNotFound, match='v000002'):
        store.load('v000002')


def test_dangling_current_is_an_error_not_a_missing_bank(tmp_path: Path) -> None:
    store = BankStore(tmp_path)
    store.save(_bank(1))
    (tmp_path / 'CURRENT').write_text('v000005\n')
    with pytest.raises(BankError, match='CURRENT: points to missing version v000005') as info:
        store.load()
    assert not isinstance(info.value, BankNotFound)
    (tmp_path / 'CURRENT').write_text('garbage\n')
    with pytest.raises(BankError, match="CURRENT: invalid version name 'garbage'"):
        store.load()


# --- crash safety ------------------------------------------------------------


def _fail_on(monkeypatch: pytest.MonkeyPatch, name: str, when: str) -> None:
    """Make bank_module.os.<name> raise when the destination path contains `when`."""
    real = getattr(os, name)

    def crash(src: os.PathLike, dst: os.PathLike, *args: object, **kwargs: object) -> None:
        if when in str(dst):
            raise OSError(f"simulated crash in {name}")
        real(src, dst, *args, **kwargs)

    monkeypatch.setattr(bank_module.os, name, crash)


@pytest.mark.parametrize(('name', 'when'), [('rename', 'v000002'), ('replace', 'CURRENT')])
def test_crash_mid_save_keeps_previous_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               name: str, when: str) -> None:
    store = BankStore(tmp_path)
    original = _bank(4, seed=1)
    store.save(original)
    with monkeypatch.context() as patch:
        _fail_on(patch, name, when)
        with pytest.raises(OSError, match='simulated crash'):
            store.save(_bank(6, seed=2))
    assert store.current() == 'v000001'
    _assert_same(store.load(), original)

    # The next save works, never reuses a number, and cleans up the leftovers.
    version = store.save(_bank(5, seed=3))
    assert version == ('v000002' if name == 'rename' else 'v000003')
    _assert_same(store.load(), _bank(5, seed=3))
    assert not [p for p in (tmp_path / 'versions').iterdir() if p.name.startswith('.tmp-')]
    _assert_same(store.load('v000001'), original)


def test_crash_while_writing_files_keeps_previous_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = BankStore(tmp_path)
    store.save(_bank(2))
    real_write_version = bank_module._write_version

    def half_write(folder: Path, *args: object) -> None:
        real_write_version(folder, *args)
        (folder / 'manifest.json').write_text('{"format": "asd-ba')  # torn write
        raise OSError('simulated crash while writing')

    monkeypatch.setattr(bank_module, '_write_version', half_write)
    with pytest.raises(OSError, match='simulated crash'):
        store.save(_bank(3))
    monkeypatch.undo()
    assert store.versions() == ['v000001']
    _assert_same(store.load(), _bank(2))


def test_leftover_temporary_folder_is_ignored_and_removed(tmp_path: Path) -> None:
    store = BankStore(tmp_path)
    store.save(_bank(2))
    stale = tmp_path / 'versions' / '.tmp-deadbeef'
    stale.mkdir()
    (stale / 'beats.npy').write_bytes(b'half written')
    assert store.versions() == ['v000001']
    _assert_same(store.load(), _bank(2))
    assert store.save(_bank(3)) == 'v000002'
    assert not stale.exists()


def test_stale_current_tmp_is_ignored(tmp_path: Path) -> None:
    store = BankStore(tmp_path)
    store.save(_bank(2))
    (tmp_path / 'CURRENT.tmp').write_text('v0000')
    assert store.current() == 'v000001'
    assert store.save(_bank(3)) == 'v000002'
    assert store.current() == 'v000002'


def test_save_never_overwrites_a_corrupt_version(tmp_path: Path) -> None:
    store = BankStore(tmp_path)
    store.save(_bank(2))
    store.save(_bank(3))
    broken = _version_dir(store, 'v000002')
    (broken / 'manifest.json').write_text('not json')
    before = {p.name: p.read_bytes() for p in broken.iterdir()}
    assert store.save(_bank(4)) == 'v000003'
    assert {p.name: p.read_bytes() for p in broken.iterdir()} == before
    # Even a bare folder whose number is the highest blocks its number.
    (tmp_path / 'versions' / 'v000009').mkdir()
    assert store.save(_bank(1)) == 'v000010'


# --- corruption ------------------------------------------------------------


def _flip_byte(path: Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _rewrite_manifest(folder: Path, change: dict) -> None:
    manifest = json.loads((folder / 'manifest.json').read_text())
    manifest.update(change)
    (folder / 'manifest.json').write_text(json.dumps(manifest))


def _saved(tmp_path: Path) -> tuple[BankStore, Path]:
    store = BankStore(tmp_path)
    store.save(_bank(4))
    return store, _version_dir(store, 'v000001')


def _corrupt_npy_with_valid_hash(folder: Path) -> None:
    (folder / 'beats.npy').write_bytes(b'\x93NUMPY garbage')
    manifest = json.loads((folder / 'manifest.json').read_text())
    manifest['backbones']['beats']['sha256'] = hashlib.sha256(b'\x93NUMPY garbage').hexdigest()
    (folder / 'manifest.json').write_text(json.dumps(manifest))


def _wrong_shape_with_valid_hash(folder: Path) -> None:
    np.save(folder / 'eat.npy', np.zeros((4, 3), np.float32))
    manifest = json.loads((folder / 'manifest.json').read_text())
    manifest['backbones']['eat']['sha256'] = hashlib.sha256((folder / 'eat.npy').read_bytes()).hexdigest()
    (folder / 'manifest.json').write_text(json.dumps(manifest))


def _bad_items_with_valid_hash(folder: Path) -> None:
    data = b'{"source": "a", "offset_s": 0, "condition": "x", "enrolled_at": "t"}\nnot json\n'
    (folder / 'items.jsonl').write_bytes(data)
    _rewrite_manifest(folder, {'items_sha256': hashlib.sha256(data).hexdigest()})


@pytest.mark.parametrize(('damage', 'file', 'message'), [
    (lambda d: _flip_byte(d / 'beats.npy'), 'beats.npy', 'sha256 mismatch \\(corrupt file\\)'),
    (lambda d: (d / 'eat.npy').unlink(), 'eat.npy', 'missing'),
    (lambda d: (d / 'items.jsonl').write_bytes((d / 'items.jsonl').read_bytes()[:-30]), 'items.jsonl',
     'sha256 mismatch'),
    (lambda d: (d / 'manifest.json').write_text('{"format": "asd-bank", '), 'manifest.json', 'invalid JSON'),
    (lambda d: (d / 'manifest.json').write_bytes(b'\xff\xfe'), 'manifest.json', 'not UTF-8'),
    (lambda d: (d / 'manifest.json').write_text('[1, 2]'), 'manifest.json', 'expected a JSON object'),
    (lambda d: (d / 'manifest.json').unlink(), 'manifest.json', 'missing'),
    (lambda d: _rewrite_manifest(d, {'format_version': 2}), 'manifest.json', 'unsupported format_version 2'),
    (lambda d: _rewrite_manifest(d, {'format': 'other'}), 'manifest.json', "format is 'other'"),
    (lambda d: _rewrite_manifest(d, {'version': 'v000002'}), 'manifest.json', 'does not match folder'),
    (lambda d: _rewrite_manifest(d, {'items_file': '../../CURRENT'}), 'manifest.json', 'invalid file name'),
    (lambda d: _rewrite_manifest(d, {'backbones': []}), 'manifest.json', "invalid 'backbones'"),
    (_corrupt_npy_with_valid_hash, 'beats.npy', 'not a valid .npy array'),
    (_wrong_shape_with_valid_hash, 'eat.npy', 'does not match manifest'),
    (_bad_items_with_valid_hash, 'items.jsonl', 'line 2: invalid JSON'),
])
def test_corruption_is_reported_with_the_file(tmp_path: Path, damage, file: str, message: str) -> None:
    store, folder = _saved(tmp_path)
    damage(folder)
    with pytest.raises(BankError, match=message) as info:
        store.load()
    text = str(info.value)
    assert text.startswith(f"bank {folder / file}:"), text
    assert '\n' not in text


def test_items_count_mismatch_is_reported(tmp_path: Path) -> None:
    store, folder = _saved(tmp_path)
    data = b''.join(line + b'\n' for line in (folder / 'items.jsonl').read_bytes().splitlines()[:3])
    (folder / 'items.jsonl').write_bytes(data)
    _rewrite_manifest(folder, {'items_sha256': hashlib.sha256(data).hexdigest()})
    with pytest.raises(BankError, match=r'items.jsonl: 3 items but backbone .* has 4 rows'):
        store.load()


def test_save_revalidates_a_bank_changed_after_construction(tmp_path: Path) -> None:
    bank = _bank(2)
    bank.items = bank.items[:1]
    store = BankStore(tmp_path)
    with pytest.raises(BankError, match='2 embeddings for 1 items'):
        store.save(bank)
    assert store.versions() == [] and store.current() is None


_WRITER = """
import sys
import numpy as np
from monitor.bank.store import BankStore
from monitor.bank.model import Bank, BankItem

store = BankStore(sys.argv[1])
n = 6000  # 12 MB of float32 per version: a save takes long enough to be caught inside
items = [BankItem(f"clip{i}.wav", 0.0, "default", "2026-01-01T00:00:00+00:00") for i in range(n)]
bank = Bank().add(items, {"aisfx": np.random.default_rng(int(sys.argv[2])).normal(size=(n, 512)).astype(np.float32)},
                  {"aisfx": "m"})
while True:
    print(store.save(bank), flush=True)
"""


def _wait_for_temporary_folder(versions: Path, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if versions.is_dir() and any(p.name.startswith(".tmp-") for p in versions.iterdir()):
            return True
        time.sleep(0.001)
    return False


def test_kill_9_during_saves_never_leaves_a_broken_bank(tmp_path: Path) -> None:
    """A real SIGKILL of a process saving versions back to back: in 4 rounds the moment a
    version's temporary folder appears (inside a save), in 4 at fixed times. The bank always
    loads (verified against its checksums) as the last version reported saved or a later
    complete one, every listed version loads, and the next save continues after them."""
    path = tmp_path / "bank"
    for round_, delay in enumerate((None, 0.7, None, 1.3, None, 1.9, None, 2.5)):
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(round_)], stdout=subprocess.PIPE,
                                  text=True, cwd=Path(__file__).resolve().parents[2])
        if delay is None:
            assert _wait_for_temporary_folder(path / "versions"), "no save started"
        else:
            time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
        saved = writer.communicate(timeout=10)[0].split()
        store = BankStore(path)
        if not store.exists():
            assert not saved  # killed before the first version was complete
            continue
        bank = store.load()  # verifies every file
        assert len(bank) == 6000 and bank.version == store.current()
        if saved:
            assert store.current() >= saved[-1]
        assert all(len(store.load(v)) == 6000 for v in store.versions())
    store = BankStore(path)
    before = store.versions()
    follow = store.save(Bank().add(_items(2), _embeddings(2, 0), MODELS))
    assert follow > max(before) and store.current() == follow
