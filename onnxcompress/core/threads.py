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
