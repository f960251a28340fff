"""KNN search at scale: exact (faiss IndexFlatL2, numpy matmul) vs approximate (faiss HNSW, IVF).

The daemon searches one query per window (every hop, per machine and backbone) against a
machine's bank, split by operating condition. This measures, for banks of 1e3 .. 1e6 embeddings
of d = 512 (the aisfx embedding size), two kinds of data:

* ``random``: i.i.d. Gaussian, the worst case for approximate search (no structure to exploit);
* ``clustered``: 200 overlapping clusters, each a 16-dimensional Gaussian subspace plus isotropic
  noise, closer to raw embeddings (low intrinsic dimension, several operating modes);

and for each index:

* single-query latency (the daemon's pattern), median and p95 over up to ``--single`` queries
  (time-capped), with 1 and with 2 threads (faiss OpenMP / numpy OpenBLAS, via threadpoolctl);
* batch throughput (queries/s) for one batch of queries, all threads;
* for the approximate indexes, recall@1 and recall@10 against the exact neighbours and the
  relative error of the nearest distance (what a KNN anomaly score is made of);
* build time and index memory.

Then ``monitor.scoring.knn.KnnScorer`` itself (Mahalanobis, the default metric) with ``index`` flat vs
hnsw: construction, the exact leave-one-out reference, and one score.

    .venv/bin/python benchmarks/knn.py                 # about 12 min here (19 min with --hnsw-max-clustered 1e6)
    .venv/bin/python benchmarks/knn.py --sizes 1e3,1e4 # quick

Results: ``benchmarks/results/knn.json`` (with the load average during the run).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import time
from collections.abc import Callable, Iterator

import faiss  # noqa: E402  (after common, which puts the repository on sys.path)
import numpy as np
from common import LoadMonitor, percentile, table, write_json

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # a test dependency (via scikit-learn); without it threads are not pinned
    threadpool_limits = None

D = 512
K = 10
CLUSTERS = 200
CLUSTER_RANK = 16
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
EF_SEARCH = (16, 64, 128, 256)
NPROBE = (8, 32)


# ----------------------------------------------------------------------------- data

def make_data(kind: str, n: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A bank [n, D] and held-out queries [queries, D] from the same distribution (float32)."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return (rng.standard_normal((n, D), dtype=np.float32),
                rng.standard_normal((queries, D), dtype=np.float32))
    # Centres ~9.6 apart; within a cluster two points differ by ~5.7 along its 16-d subspace and
    # ~3.2 of isotropic noise: clusters are distinct but not trivially separated.
    centres = 0.3 * rng.standard_normal((CLUSTERS, D), dtype=np.float32)
    bases = rng.standard_normal((CLUSTERS, CLUSTER_RANK, D), dtype=np.float32) / math.sqrt(D)

    def draw(count: int) -> np.ndarray:
        labels = rng.integers(0, CLUSTERS, count)
        out = 0.1 * rng.standard_normal((count, D), dtype=np.float32)
        for c in range(CLUSTERS):
            rows = np.flatnonzero(labels == c)
            if rows.size:
                z = rng.standard_normal((rows.size, CLUSTER_RANK), dtype=np.float32)
                out[rows] += centres[c] + z @ bases[c]
        return out

    return draw(n), draw(queries)


# -------------------------------------------------------------------------- timing

@contextlib.contextmanager
def threads(count: int | None, api: str | None = None) -> Iterator[None]:
    """Limit BLAS/OpenMP threads (faiss's OpenMP pool is set directly as well)."""
    previous = faiss.omp_get_max_threads()
    if count is not None:
        faiss.omp_set_num_threads(count)
    limiter = threadpool_limits(limits=count, user_api=api) if (threadpool_limits and count) else contextlib.nullcontext()
    try:
        with limiter:
            yield
    finally:
        faiss.omp_set_num_threads(previous)


def single_latency(search: Callable[[np.ndarray], object], queries: np.ndarray, cap_s: float) -> dict:
    """ms per single-query call: median and p95 over the queries done within ``cap_s`` (>= 5)."""
    search(queries[:1])  # warm-up
    times = []
    began = time.perf_counter()
    for q in queries:
        t = time.perf_counter()
        search(q[None, :])
        times.append((time.perf_counter() - t) * 1e3)
        if len(times) >= 5 and time.perf_counter() - began > cap_s:
            break
    return {"median_ms": round(float(np.median(times)), 4), "p95_ms": round(percentile(times, 95), 4), "queries": len(times)}


def batch_throughput(search: Callable[[np.ndarray], object], queries: np.ndarray) -> dict:
    t = time.perf_counter()
    search(queries)
    seconds = time.perf_counter() - t
    return {"batch": len(queries), "seconds": round(seconds, 4), "qps": round(len(queries) / seconds, 1)}


# --------------------------------------------------------------------------- numpy

class NumpyExact:
    """Exact L2 top-k by matmul (|x|^2 - 2 x.q + |q|^2), bank in chunks to bound memory."""

    def __init__(self, bank: np.ndarray, chunk: int = 262144) -> None:
        self.bank = bank
        self.norms = np.einsum("ij,ij->i", bank, bank)
        self.chunk = chunk

    def search(self, queries: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
        best_d = np.full((len(queries), 0), np.inf, np.float32)
        best_i = np.zeros((len(queries), 0), np.int64)
        for start in range(0, len(self.bank), self.chunk):
            part = self.bank[start:start + self.chunk]
            d = self.norms[start:start + self.chunk][None, :] - 2.0 * (queries @ part.T)
            kk = min(k, d.shape[1])
            idx = np.argpartition(d, kk - 1, axis=1)[:, :kk]
            best_d = np.concatenate([best_d, np.take_along_axis(d, idx, 1)], axis=1)
            best_i = np.concatenate([best_i, idx + start], axis=1)
        order = np.argsort(best_d, axis=1)[:, :k]
        qn = np.einsum("ij,ij->i", queries, queries)[:, None]
        return np.take_along_axis(best_d, order, 1) + qn, np.take_along_axis(best_i, order, 1)


# ----------------------------------------------------------------------- accuracy

def accuracy(found_d: np.ndarray, found_i: np.ndarray, exact_d: np.ndarray, exact_i: np.ndarray) -> dict:
    """recall@1, recall@10, and the relative error of the nearest (L2, not squared) distance."""
    r1 = float(np.mean(found_i[:, 0] == exact_i[:, 0]))
    r10 = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found_i[:, :K], exact_i[:, :K])]))
    true = np.sqrt(np.maximum(exact_d[:, 0], 0))
    got = np.sqrt(np.maximum(found_d[:, 0], 0))
    err = (got - true) / np.maximum(true, 1e-12)
    return {"recall_at_1": round(r1, 4), "recall_at_10": round(r10, 4),
            "dist_err_mean": float(f"{err.mean():.3g}"), "dist_err_p99": float(f"{np.percentile(err, 99):.3g}"),
            "share_dist_err_over_1pct": round(float(np.mean(err > 0.01)), 4)}


def index_bytes(index: faiss.Index) -> int:
    return int(faiss.serialize_index(index).size)


def approximate_search(index: faiss.Index, batch: np.ndarray, evalq: np.ndarray,
                       exact: tuple[np.ndarray, np.ndarray], args: argparse.Namespace) -> dict:
    """An approximate index at its current setting: batch throughput, recall against the
    exact neighbours, and single-query latency on one thread."""
    with threads(args.threads):
        result = {"batch": batch_throughput(lambda q: index.search(q, K), batch)}
        found_d, found_i = index.search(evalq, K)
    result.update(accuracy(found_d, found_i, *exact))
    with threads(1):
        result["single_t1"] = single_latency(lambda q: index.search(q, 1), evalq, args.cap)
    return result


# --------------------------------------------------------------------------- runs

def bench_size(kind: str, n: int, args: argparse.Namespace) -> dict:
    big = n >= 1_000_000
    n_eval = 100 if big else 200
    n_batch = 200 if big else 1000
    bank, queries = make_data(kind, n, max(n_eval, n_batch), seed=n + (7 if kind == "random" else 0))
    evalq = queries[:n_eval]
    cap = args.cap
    out: dict = {"kind": kind, "n": n, "dim": D}

    # exact: faiss flat
    t = time.perf_counter()
    flat = faiss.IndexFlatL2(D)
    flat.add(bank)
    out["flat"] = {"build_s": round(time.perf_counter() - t, 3), "bytes": n * D * 4}
    with threads(args.threads):
        out["flat"]["batch"] = batch_throughput(lambda q: flat.search(q, K), queries[:n_batch])
        exact_d, exact_i = flat.search(evalq, K)
    for th in (1, args.threads):
        with threads(th):
            out["flat"][f"single_t{th}"] = single_latency(lambda q: flat.search(q, 1), evalq, cap)

    # exact: numpy matmul
    numpy_index = NumpyExact(bank)
    with threads(args.threads, "blas"):
        out["numpy"] = {"batch": batch_throughput(lambda q: numpy_index.search(q), queries[:n_batch])}
        nd, ni = numpy_index.search(evalq)
    out["numpy"]["agrees_with_flat_at_1"] = round(float(np.mean(ni[:, 0] == exact_i[:, 0])), 4)
    for th in (1, args.threads):
        with threads(th, "blas"):
            out["numpy"][f"single_t{th}"] = single_latency(lambda q: numpy_index.search(q, 1), evalq, cap)
    del numpy_index
    gc.collect()

    # approximate: HNSW
    if n <= args.hnsw_max.get(kind, 0):
        with threads(args.threads):
            t = time.perf_counter()
            hnsw = faiss.IndexHNSWFlat(D, HNSW_M)
            hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            hnsw.add(bank)
            build = time.perf_counter() - t
        entry = {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "build_s": round(build, 2),
                 "bytes": index_bytes(hnsw), "ef_search": {}}
        for ef in EF_SEARCH:
            hnsw.hnsw.efSearch = ef
            entry["ef_search"][ef] = approximate_search(hnsw, queries[:n_batch], evalq, (exact_d, exact_i), args)
        out["hnsw"] = entry
        del hnsw
        gc.collect()
    else:
        out["hnsw"] = {"skipped": f"size above --hnsw-max for {kind} (build time; see the 1e5 figure)"}

    # approximate: IVF
    if n >= 10_000:
        nlist = 2 ** int(round(math.log2(min(4 * math.sqrt(n), n / 39))))
        nlist = min(nlist, 1024)
        with threads(args.threads):
            t = time.perf_counter()
            quantizer = faiss.IndexFlatL2(D)
            ivf = faiss.IndexIVFFlat(quantizer, D, nlist)
            ivf.cp.niter = 10
            rng = np.random.default_rng(1)
            sample = bank[rng.choice(n, min(n, 40 * nlist), replace=False)]
            ivf.train(sample)
            train = time.perf_counter() - t
            ivf.add(bank)
            build = time.perf_counter() - t
        entry = {"nlist": nlist, "train_s": round(train, 2), "build_s": round(build, 2),
                 "bytes": index_bytes(ivf), "nprobe": {}}
        for nprobe in NPROBE:
            ivf.nprobe = nprobe
            entry["nprobe"][nprobe] = approximate_search(ivf, queries[:n_batch], evalq, (exact_d, exact_i), args)
        out["ivf"] = entry
        del ivf
    del flat, bank
    gc.collect()
    return out


def bench_scorer(n: int, args: argparse.Namespace) -> dict:
    """KnnScorer (mahalanobis, one condition) with index flat vs hnsw: build, LOO, one score."""
    from monitor.scoring.knn import KnnScorer

    bank, queries = make_data("clustered", n, 50, seed=99 + n)
    out: dict = {"n": n, "metric": "mahalanobis"}
    KnnScorer(bank[:200], metric="mahalanobis", index="hnsw").leave_one_out()  # warm-up (first-call costs)
    for index in ("flat", "hnsw"):
        with threads(args.threads):
            t = time.perf_counter()
            scorer = KnnScorer(bank, metric="mahalanobis", k=1, index=index)
            build = time.perf_counter() - t
        res: dict = {"build_s": round(build, 3)}
        with threads(1):
            res["score_single_t1"] = single_latency(lambda q: scorer.score(q), queries, args.cap)
        if n <= args.loo_max:
            with threads(args.threads):
                t = time.perf_counter()
                loo = scorer.leave_one_out()
                res["leave_one_out_s"] = round(time.perf_counter() - t, 3)
            res["loo_finite"] = bool(np.isfinite(loo).all())
            if index == "flat":
                reference = loo
            else:
                res["loo_identical_to_flat"] = bool(np.allclose(loo, reference, rtol=1e-6, atol=1e-6))
        exact = out.get("flat", {}).get("_scores")
        scores = scorer.score(queries)
        if exact is not None:
            err = (scores - exact) / exact
            res["score_rel_err_mean"] = float(f"{err.mean():.3g}")
            res["score_rel_err_max"] = float(f"{err.max():.3g}")
            res["score_share_err_over_1pct"] = round(float(np.mean(err > 0.01)), 3)
        res["_scores"] = scores
        out[index] = res
    for index in ("flat", "hnsw"):
        out[index].pop("_scores")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e3,1e4,1e5,1e6", help="bank sizes (comma separated)")
    parser.add_argument("--kinds", default="random,clustered")
    parser.add_argument("--threads", type=int, default=2, help="threads for builds and batches")
    parser.add_argument("--cap", type=float, default=2.0, help="seconds per single-query measurement (at least 5 queries)")
    parser.add_argument("--hnsw-max-random", type=float, default=1e5,
                        help="largest random bank to build HNSW for (1e6 takes minutes here)")
    parser.add_argument("--hnsw-max-clustered", type=float, default=1e5,
                        help="largest clustered bank to build HNSW for (1e6: 437 s of build here; the recorded run used 1e6)")
    parser.add_argument("--scorer-sizes", default="1e3,1e4,1e5", help="KnnScorer sizes ('' to skip)")
    parser.add_argument("--loo-max", type=float, default=1e4, help="largest bank to time the leave-one-out for (it is quadratic)")
    args = parser.parse_args()
    args.hnsw_max = {"random": int(args.hnsw_max_random), "clustered": int(args.hnsw_max_clustered)}
    sizes = [int(float(s)) for s in args.sizes.split(",") if s]
    kinds = [k for k in args.kinds.split(",") if k]
    scorer_sizes = [int(float(s)) for s in args.scorer_sizes.split(",") if s]

    results: list[dict] = []
    scorer: list[dict] = []
    started = time.perf_counter()
    with LoadMonitor() as load:
        for kind in kinds:
            for n in sizes:
                t = time.perf_counter()
                r = bench_size(kind, n, args)
                r["wall_s"] = round(time.perf_counter() - t, 1)
                results.append(r)
                print(f"{kind} n={n}: {r['wall_s']} s (load {load.samples[-1]})", flush=True)
        for n in scorer_sizes:
            scorer.append(bench_scorer(n, args))
    total = time.perf_counter() - started

    rows = []
    for r in results:
        f, npy = r["flat"], r["numpy"]
        rows.append([r["kind"], r["n"], "flat", f["single_t1"]["median_ms"], f[f"single_t{args.threads}"]["median_ms"],
                     f["batch"]["qps"], 1.0, 1.0, None, None, f["build_s"], f["bytes"] / 2**20])
        rows.append([r["kind"], r["n"], "numpy", npy["single_t1"]["median_ms"], npy[f"single_t{args.threads}"]["median_ms"],
                     npy["batch"]["qps"], npy["agrees_with_flat_at_1"], None, None, None, None, None])
        for ef, e in r["hnsw"].get("ef_search", {}).items():
            rows.append([r["kind"], r["n"], f"hnsw ef={ef}", e["single_t1"]["median_ms"], None, e["batch"]["qps"],
                         e["recall_at_1"], e["recall_at_10"], e["dist_err_mean"], e["dist_err_p99"], r["hnsw"]["build_s"],
                         r["hnsw"]["bytes"] / 2**20])
        for nprobe, e in r.get("ivf", {}).get("nprobe", {}).items():
            rows.append([r["kind"], r["n"], f"ivf{r['ivf']['nlist']} np={nprobe}", e["single_t1"]["median_ms"], None,
                         e["batch"]["qps"], e["recall_at_1"], e["recall_at_10"], e["dist_err_mean"], e["dist_err_p99"], r["ivf"]["build_s"],
                         r["ivf"]["bytes"] / 2**20])
    table(["data", "n", "index", "1q ms t1", f"1q ms t{args.threads}", "batch q/s", "R@1", "R@10", "dist err",
           "err p99", "build s", "MiB"], rows, title=f"KNN search, d={D}, k={K} (single query: median ms; batch: all threads)")
    if scorer:
        table(["n", "index", "build s", "score 1q ms", "LOO s", "LOO == flat", "score err mean", "max", ">1%"],
              [[s["n"], ix, s[ix]["build_s"], s[ix]["score_single_t1"]["median_ms"], s[ix].get("leave_one_out_s"),
                s[ix].get("loo_identical_to_flat"), s[ix].get("score_rel_err_mean"), s[ix].get("score_rel_err_max"),
                s[ix].get("score_share_err_over_1pct")] for s in scorer for ix in ("flat", "hnsw")],
              title="monitor.scoring.knn.KnnScorer, mahalanobis, clustered data, one condition")
    print(f"total {total:.0f} s; load (1 min) min/mean/max {load.summary()['min_1m']}/{load.summary()['mean_1m']}/{load.summary()['max_1m']}")
    write_json("knn", {"dim": D, "k": K, "threads": args.threads, "total_s": round(total, 1),
                       "notes": "single-query latency: median over time-capped runs; batch: one call with all threads; "
                                "absolute times on a shared 2-core machine: compare rows of one run",
                       "search": results, "scorer": scorer}, load)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
