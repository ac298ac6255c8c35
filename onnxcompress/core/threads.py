"""BLAS threads for the linear algebra of calibrate and decide.

LAPACK's pivoted Cholesky (`?pstrf`) and symmetric eigenvalue routines (`?syevd`, through the
tridiagonal reduction `?sytrd`) are latency-bound: one BLAS-2 call per column, each a fork-join of
the BLAS threads when there are several. On an idle machine a second thread gains little there;
on a busy one every join waits for a descheduled thread, and a decision that takes seconds takes
minutes. During calibration, BLAS threads that spin after a Gram update also take the cores
from the next ONNX Runtime call, which has one thread per core already (`runtime.py`).
`one_blas_thread()` runs its body with one BLAS thread when `threadpoolctl` is installed
(optional: without it, nothing changes). ONNX Runtime's own threads are not BLAS threads and are
not affected.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

log = logging.getLogger(__name__)


@contextmanager
def one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: BLAS keeps its default threads
        log.debug("threadpoolctl is not installed; decide runs with the default BLAS threads")
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def parallel_map(fn, items) -> list:
    """[fn(x) for x in items], computed on one thread per core (NumPy and LAPACK release the GIL,
    so independent sites' linear algebra runs side by side; with `one_blas_thread` each call keeps
    to its own thread). The results are in `items` order and do not depend on the scheduling; the
    first exception (in `items` order) is raised."""
    items = list(items)
    workers = min(len(items), os.cpu_count() or 1)
    if workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="onnxcompress") as pool:
        futures = [pool.submit(fn, x) for x in items]
        return [f.result() for f in futures]
