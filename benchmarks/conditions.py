"""Operating conditions: one pooled bank against per-condition sub-banks (minimum over
conditions), with and without k-means compaction of large conditions, on ../shared/data/bench
(source domain = one condition with many clips, target = another with few).

    .venv/bin/python benchmarks/conditions.py      # prints a table, writes results/conditions.json
"""

from __future__ import annotations

import numpy as np
from common import SHARED_DATA, LoadMonitor, table, write_json

from monitor.audio.files import load_audio  # noqa: E402  (common puts the repository on sys.path)
from monitor.bank.compaction import compact  # noqa: E402
from monitor.bank.model import Bank, BankItem  # noqa: E402
from monitor.config import Config  # noqa: E402
from monitor.offline.dataset import scan_dataset  # noqa: E402
from monitor.offline.dcase import machine_figures  # noqa: E402
from monitor.scoring.detector import Detector  # noqa: E402
from monitor.scoring.knn import KnnScorer  # noqa: E402

SETS = ("uav-noisy", "fan-noisy")
CENTROIDS = (16, 32, 64)
NOW = "2026-01-01T00:00:00+00:00"


def main() -> None:
    detector = Detector.from_config(Config())
    rows = []
    with LoadMonitor() as load:
        for name in SETS:
            root = SHARED_DATA / "bench" / name
            if not root.is_dir():
                print(f"skipping {name}: {root} not found")
                continue
            for machine, clips in scan_dataset(root).items():
                train = [c for c in clips if c.split == "train" and c.label == "normal"]
                test = [c for c in clips if c.split == "test"]
                embed = lambda cs: np.stack([detector.embed(load_audio(c.path)).embeddings["aisfx"].mean(0) for c in cs])
                bank, queries = embed(train), embed(test)
                conditions = np.array([c.domain for c in train])
                domains, labels = [c.domain for c in test], [c.is_anomaly for c in test]
                variants = {"pooled": (bank, None), "per-condition": (bank, list(conditions))}
                enrolled = Bank().add([BankItem(c.path.name, 0.0, c.domain, NOW) for c in train], {"aisfx": bank},
                                      detector.model_ids)
                for size in CENTROIDS:
                    compacted = compact(enrolled, size)  # what `asd-monitor bank compact` writes
                    variants[f"per-condition, >{size} compacted"] = (compacted.embeddings["aisfx"],
                                                                     compacted.condition_labels())
                for k in (1, 3):
                    for variant, (emb, conds) in variants.items():
                        scores = KnnScorer(emb, conds, metric="mahalanobis", k=k, shrinkage=0.5).score(queries)
                        fig = machine_figures(domains, labels, scores)
                        rows.append([name, k, variant, fig.auc_source, fig.auc_target, fig.pauc, fig.official])
    headers = ["set", "k", "bank", "AUC src", "AUC tgt", "pAUC", "official"]
    table(headers, rows, "aisfx, Mahalanobis (shrinkage 0.5): pooled vs per-condition banks")
    write_json("conditions", {"rows": [dict(zip(headers, r)) for r in rows]}, load)


if __name__ == "__main__":
    main()
