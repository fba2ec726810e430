"""joblib's ``"flame"`` backend: ``Parallel`` (and so scikit-learn's ``n_jobs``) on a pool.

``flame.register_joblib()`` registers it; then::

    with joblib.parallel_config(backend="flame", pool=pool):
        GridSearchCV(model, grid, n_jobs=-1).fit(X, y)

Each batch joblib makes (its auto-batching, as with loky) is one call on the pool, the batch
an argument, so the arrays in it travel as flame's out-of-band buffers (shared memory
locally) rather than through joblib's memmapping. Without ``pool=``, a pool of ``n_jobs``
runners is made for the ``Parallel`` call and shut down after it. joblib is imported only here,
when this module is: flame does not need it.
"""
from __future__ import annotations

import os
import threading
import weakref
from typing import Any, Callable

from joblib._parallel_backends import AutoBatchingMixin, ParallelBackendBase

from .node.chunk import run_batch


class FlameBackend(AutoBatchingMixin, ParallelBackendBase):
    """Runs joblib's batches as calls on ``pool`` (a :class:`flame.Pool`), or on a pool of
    its own per ``Parallel`` call when none is given."""

    supports_retrieve_callback = True  # futures with done callbacks, as loky's
    supports_timeout = True
    uses_threads = False
    supports_sharedmem = False

    def __init__(self, pool: Any = None, nesting_level: int | None = None,
                 inner_max_num_threads: int | None = None, **kwargs: Any) -> None:
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads, **kwargs)
        self.pool = pool
        self._own: Any = None
        self._futures: weakref.WeakSet = weakref.WeakSet()  # the batches not yet done, to abort
        self._lock = threading.Lock()

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        pool = self.pool or self._own
        if pool is not None:  # the pool decides: as many calls as its runners run at once
            return pool.max * pool.max_concurrency
        if n_jobs is None:
            return 1
        return max((os.cpu_count() or 1) + 1 + n_jobs, 1) if n_jobs < 0 else n_jobs

    def configure(self, n_jobs: int | None = 1, parallel: Any = None, **kwargs: Any) -> int:
        self.parallel = parallel
        n = self.effective_n_jobs(n_jobs)
        if self.pool is None and self._own is None:
            from .pool import Pool
            self._own = Pool(max=n, name="joblib")
        return n

    def submit(self, func: Callable[[], Any], callback: Callable | None = None) -> Any:
        future = (self.pool or self._own).submit(run_batch, func)
        with self._lock:
            self._futures.add(future)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, future: Any) -> Any:
        return future.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """A task failed, or Ctrl-C (the stop button): cancelling a batch stops its remote work."""
        with self._lock:
            futures = list(self._futures)
        for future in futures:
            future.cancel()
        if not ensure_ready:
            self.terminate()

    def terminate(self) -> None:
        if self._own is not None:
            self._own.shutdown()
            self._own = None
        self.reset_batch_stats()


def register_joblib() -> None:
    """Register the joblib backend ``"flame"`` (see this module's docstring)."""
    import joblib
    joblib.register_parallel_backend("flame", FlameBackend)
