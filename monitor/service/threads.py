"""How many threads numpy's BLAS and faiss's OpenMP may use in the daemon.

The daemon scores one window at a time: a matrix-vector product, a flat search of a few
thousand rows. Splitting such small work across threads costs more than it saves, and
on a box whose cores are busy with onnxruntime and the rest of the plant's software the
threads wait for each other. Measured with ``benchmarks/daemon.py`` on the shared 2-core
machine under load: starting the daemon (bank fit: Mahalanobis leave-one-out, ten
eigendecompositions per machine) took 13.5 s with the libraries' default threads and 0.9 s
with one; a flat faiss query over 1e4 embeddings 16 ms with two OpenMP threads and 0.7 ms
with one (``benchmarks/knn.py``).

OpenMP keeps its thread count per calling thread (a thread started later gets the
library's default again), so every thread that computes must call ``limit_compute_threads``
itself; the daemon does so at the start of each of its threads. OpenBLAS's limit is global.
"""

from __future__ import annotations

from threadpoolctl import threadpool_limits


def limit_compute_threads(threads: int) -> None:
    """Limit BLAS and OpenMP pools seen from the calling thread to ``threads`` (0: leave
    the libraries' defaults)."""
    if threads > 0:
        threadpool_limits(limits=threads)
