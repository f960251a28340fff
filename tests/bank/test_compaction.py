"""monitor.bank.compaction and ``asd-monitor bank compact``: large conditions as k-means centroids,
small ones verbatim, every backbone's centroid standing for the same windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from monitor.bank.compaction import compact
from monitor.bank.model import Bank, BankItem
from monitor.bank.store import BankStore
from monitor.cli import main
from monitor.errors import BankError

NOW = "2026-01-01T00:00:00+00:00"


def _bank(seed: int = 0) -> tuple[Bank, np.ndarray]:
    rng = np.random.default_rng(seed)
    big = np.concatenate([rng.normal(c, 0.1, size=(100, 8)) for c in (-2.0, 2.0)])  # two clusters
    small = rng.normal(0.0, 0.1, size=(5, 8))
    first = np.concatenate([big, small]).astype(np.float32)
    mix = rng.normal(size=(8, 12))  # the second backbone: a linear map of the first
    items = [BankItem(f"a{i}.wav", 0.0, "steady", NOW, -20.0, 16000) for i in range(200)]
    items += [BankItem(f"b{i}.wav", 10.0, "startup", NOW, -30.0, 16000) for i in range(5)]
    bank = Bank().add(items, {"one": first, "two": (first @ mix).astype(np.float32)}, {"one": "m1", "two": "m2"})
    return bank, mix


def test_large_conditions_become_centroids_and_small_ones_stay() -> None:
    bank, mix = _bank()
    out = compact(bank, 16)
    steady = [i for i, c in enumerate(out.condition_labels()) if c == "steady"]
    startup = [i for i, c in enumerate(out.condition_labels()) if c == "startup"]
    assert 2 <= len(steady) <= 16 and len(startup) == 5
    assert [out.items[i] for i in startup] == bank.items[200:]  # verbatim, embeddings too
    np.testing.assert_array_equal(out.embeddings["one"][startup], bank.embeddings["one"][200:])
    counts = [int(out.items[i].source.split()[2]) for i in steady]
    assert sum(counts) == 200 and all(out.items[i].source.startswith("centroid of ") for i in steady)
    assert {out.items[i].level_dbfs for i in steady} == {-20.0} and out.recorded_rates == {16000}
    # Both backbones' centroids average the same windows: the linear map carries one onto the other.
    np.testing.assert_allclose(out.embeddings["one"][steady] @ mix, out.embeddings["two"][steady], rtol=1e-4, atol=1e-4)
    # The two clusters are not averaged into each other.
    assert set(np.sign(out.embeddings["one"][steady].mean(axis=1)).tolist()) == {-1.0, 1.0}
    again = compact(bank, 16)
    np.testing.assert_array_equal(again.embeddings["one"], out.embeddings["one"])


@pytest.mark.parametrize("bad", [1, 0, 2.5, True])
def test_bad_sizes_are_refused(bad) -> None:
    with pytest.raises(BankError, match="max_windows must be an integer >= 2"):
        compact(_bank()[0], bad)


def test_bank_compact_command_writes_a_new_version_that_rolls_back(tmp_path: Path, capsys) -> None:
    store = BankStore(tmp_path / "bank")
    store.save(_bank()[0])
    assert main(["bank", "compact", "--bank", str(store.path), "--max-windows", "8"]) == 0
    out = capsys.readouterr().out
    assert "version v000002" in out and "was 205 in v000001" in out and "rollback" in out
    compacted = store.load()
    assert len(compacted) <= 8 + 5 and compacted.note.startswith("compacted from v000001")
    assert main(["bank", "rollback", "--bank", str(store.path)]) == 0
    assert store.current() == "v000001" and len(store.load()) == 205
    assert main(["bank", "compact", "--bank", str(store.path), "--max-windows", "1"]) == 65
    assert "max_windows must be an integer >= 2" in capsys.readouterr().err
