"""The evaluation grid on a ``dask.distributed`` cluster (``scdm-eval run --scheduler / --dask-workers``).

What every task shares (the split's labels, partitions, groups, the cells' store keys) is
scattered to the workers once per run; a task is then (model, partition index, classifier, seed)
plus the store's path. Each worker opens the store itself and reads only the rows of its
partition (train and test cells), so no embedding matrix travels through the scheduler (XGBoost
tasks on a store path read them block by block as they fit, see :meth:`EmbeddingStore.rows`). A task
fits exactly what the in-process grid fits, in the same order, with the same seed.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scdm_embed.errors import ScdmError

from ._classifiers import fit_score, streams_rows

#: per worker process: the stores it has open, by (run, path) (the cell table is read once per run)
_STORES: dict[tuple[str, str], Any] = {}


def _store(run: str, path: str):
    from scdm_embed.store import EmbeddingStore

    key = (run, path)
    if key not in _STORES:
        for old in [k for k in _STORES if k[0] != run]:
            del _STORES[old]
        _STORES[key] = EmbeddingStore(path)
    return _STORES[key]


def read_slice(store: Any, model: str, datasets: Sequence[str], keys: np.ndarray, *, stream: bool = False) -> Any:
    """Rows ``keys`` (global cell keys, in this order) of ``model``'s embeddings; only their chunks are read.

    ``stream``: an unread :class:`~scdm_embed.store.EmbeddingRows` of them instead (checked finite
    block by block), for a classifier that reads its rows a block at a time."""
    from ._run import check_finite

    rows = store.rows(model, datasets=list(datasets), cells=keys)
    return check_finite(rows if stream else rows.read(), model, keys)


def grid_task(ctx: Mapping[str, Any], model: str, part: int, classifier: str, seed: int) -> dict[str, Any]:
    """One fit on a worker: read the partition's rows from the store, then :func:`fit_score` them."""
    from distributed import get_worker

    from scdm_embed._dask import run_remote

    def fit() -> dict[str, Any]:
        train, test = ctx["parts"][part]
        rows = np.union1d(train, test)  # ascending: one pass over the chunks that hold them
        X = read_slice(_store(ctx["run"], ctx["store"]), model, ctx["datasets"], ctx["keys"][rows],
                       stream=streams_rows(classifier) and "://" not in ctx["store"])  # a URL: read once
        groups = None if ctx["groups"] is None else ctx["groups"][rows]
        return fit_score(X, ctx["y"][rows], np.searchsorted(rows, train), np.searchsorted(rows, test), classifier,
                         ctx["settings"][classifier], seed, ctx["warm_torch"], threads=_nthreads(get_worker()),
                         groups=groups)

    return run_remote(fit)


def _nthreads(worker: Any) -> int:
    n = getattr(worker, "nthreads", None) or getattr(getattr(worker, "state", None), "nthreads", None)
    return max(1, int(n or 1))


class DaskGrid:
    """Runs grid tasks on a client's workers (see :func:`open_grid`)."""

    def __init__(self, client: Any, ctx: Mapping[str, Any]) -> None:
        from scdm_embed._dask import worker_threads

        self.client = client
        self.workers = worker_threads(client)
        self._ctx = client.scatter([dict(ctx)], broadcast=True)[0]  # once per run, not per task

    def grid(self, model: str, specs: Sequence[tuple[int, str, int]], advance: Callable[[], None]) -> list[dict[str, Any]]:
        """Fit ``(partition index, classifier, seed)`` of ``model``; results in ``specs`` order."""
        from distributed import as_completed

        from scdm_embed._dask import unwrap

        futures = [self.client.submit(grid_task, self._ctx, model, k, c, s, pure=False) for k, c, s in specs]
        for _ in as_completed(futures):
            advance()
        return [unwrap(o) for o in self.client.gather(futures)]


@contextlib.contextmanager
def open_grid(scheduler: str | None, dask_workers: int | None, *, store: str | Path, datasets: Sequence[str],
              splits: Any, y: np.ndarray, groups: np.ndarray | None, settings: Mapping[str, Any],
              warm_torch: bool, correct: str = "none", permutations: int = 0) -> Iterator[DaskGrid]:
    """A :class:`DaskGrid` on ``scheduler`` (or a local cluster of ``dask_workers`` processes)."""
    from scdm_embed._dask import dask_client

    if correct != "none" or permutations:
        raise ScdmError("--correct and --permutations run in-process, not on a Dask cluster",
                        "drop --scheduler/--dask-workers for that run, or drop --correct/--permutations")
    path = str(store) if "://" in str(store) else str(Path(store).absolute())
    ctx = {"run": uuid.uuid4().hex, "store": path, "datasets": list(datasets),
           "keys": splits.table.index.to_numpy(dtype=object), "y": np.asarray(y),
           "parts": [(np.asarray(p.train), np.asarray(p.test)) for p in splits],
           "groups": groups, "settings": dict(settings), "warm_torch": bool(warm_torch)}
    with dask_client(scheduler, n_workers=dask_workers) as client:
        yield DaskGrid(client, ctx)
