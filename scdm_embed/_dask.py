"""Extraction on a ``dask.distributed`` cluster: the shards of :mod:`._shard` as Dask tasks.

:func:`dask_client` opens a client on a running scheduler (``tcp://HOST:8786``) or on a
:class:`~distributed.LocalCluster` of worker processes bound to 127.0.0.1; ``scdm-eval`` uses it too.
:func:`extract_on_dask` submits shard ``i/n`` of one extraction per task (GPU workers: pass
``resources={"GPU": 1}`` and start them with ``dask worker ... --resources GPU=1``); every worker
opens the input and the store by path, so both must be reachable by every worker.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import ScdmError

#: seconds to wait for a local cluster's workers
CONNECT_TIMEOUT = 30


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, *, n_workers: int | None = None) -> Iterator[Any]:
    """A ``distributed.Client`` on ``scheduler`` or on a local cluster of ``n_workers`` processes x 1 thread.

    The local cluster (and its dashboard) binds 127.0.0.1 and is closed on exit.
    """
    if (scheduler is None) == (n_workers is None):
        raise ScdmError("give either a scheduler address or a number of local Dask workers",
                        "pass --scheduler tcp://HOST:8786 (a running cluster) or --dask-workers N (a local one)")
    if n_workers is not None and (not isinstance(n_workers, int) or n_workers < 1):
        raise ScdmError(f"--dask-workers must be at least 1 (got {n_workers!r})", "pass --dask-workers 2 (or more)")
    if scheduler is not None and ("://" not in scheduler and ":" not in scheduler):
        raise ScdmError(f"--scheduler {scheduler!r} is not a scheduler address",
                        "pass it like --scheduler tcp://HOST:8786 (what `dask scheduler` prints)")
    import logging

    from distributed import Client, LocalCluster

    with contextlib.ExitStack() as stack:
        if scheduler is not None:
            try:  # how long to try: dask's distributed.comm.timeouts.connect (30 s by default)
                client = stack.enter_context(Client(scheduler))
            except (OSError, TimeoutError, ValueError) as e:
                raise ScdmError(f"cannot reach the Dask scheduler at {scheduler!r} ({type(e).__name__}: {e})",
                                "start it (`dask scheduler`, then `dask worker tcp://HOST:8786` on each node) or "
                                "check the address; --dask-workers N runs a local cluster instead") from None
        else:
            logging.getLogger("distributed").setLevel(logging.ERROR)  # start-up and shutdown chatter
            cluster = stack.enter_context(LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                                       host="127.0.0.1", dashboard_address="127.0.0.1:0"))
            client = stack.enter_context(Client(cluster))
            client.wait_for_workers(n_workers, timeout=CONNECT_TIMEOUT)
        yield client


def worker_threads(client: Any) -> int:
    """Threads over the cluster's workers (at least 1)."""
    workers = client.scheduler_info().get("workers", {})
    return max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))


def run_remote(fn: Any, *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """Run ``fn`` on a worker; a :class:`ScdmError` comes back as data (its hint survives the trip)."""
    try:
        return "ok", fn(*args, **kwargs)
    except ScdmError as e:
        return "error", (type(e).__module__, type(e).__qualname__, e.problem, e.fix)


def unwrap(outcome: tuple[str, Any]) -> Any:
    """The value of :func:`run_remote`'s outcome, or its error raised again here."""
    kind, value = outcome
    if kind == "ok":
        return value
    import importlib

    module, qualname, problem, fix = value
    cls = getattr(importlib.import_module(module), qualname, ScdmError)
    raise (cls if isinstance(cls, type) and issubclass(cls, ScdmError) else ScdmError)(problem, fix)


def _shard_task(input: str, shard: tuple[int, int], kwargs: dict[str, Any]) -> Any:
    from ._engine import extract

    return extract(input, shard=shard, progress=False, **kwargs)


def _done_count(store: Path, model: str, dataset: str) -> tuple[int, int] | None:
    import zarr

    try:
        done = zarr.open_group(str(store), mode="r")[f"embeddings/{model}/{dataset}/done"][:]
    except (OSError, LookupError, ValueError):  # not created yet, or being written
        return None
    return int(done.sum()), len(done)


def extract_on_dask(
    input: str | Path,
    *,
    model: str,
    store: str | Path,
    scheduler: str | None = None,
    dask_workers: int | None = None,
    shards: int | None = None,
    resources: Mapping[str, float] | None = None,
    dataset: str | None = None,
    progress: bool = True,
    **options: Any,
) -> list[Any]:
    """Run :func:`~scdm_embed.extract` as ``shards`` Dask tasks (default: one per worker thread).

    ``options`` are :func:`~scdm_embed.extract`'s (``checkpoint``, ``chunk_size``, ...). Returns
    the shards' :class:`~scdm_embed.ExtractionResult` in shard order; the array is complete when
    they all succeeded. A failed shard's error is raised here once the others have finished; re-run
    the same command to resume.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import store as stores
    from .store._core import store_location

    if isinstance(store_location(store), str):
        raise ScdmError(f"extraction writes a local store; {str(store)!r} is a URL",
                        "use a path every worker reaches (a shared file system), then copy the store up")
    store = store_location(store)
    if shards is not None and (not isinstance(shards, int) or shards < 1):
        raise ScdmError(f"--shards must be at least 1 (got {shards!r})", "pass --shards N, or omit it (one per worker)")
    stores.check_store_path(store)
    input_path = Path(input).absolute()
    if not input_path.exists():
        raise ScdmError(f"input {str(input)!r} does not exist", "check the path (every Dask worker must reach it too)")
    store_path = Path(store).absolute()
    name = dataset or input_path.stem
    kwargs = {"model": model, "store": str(store_path), "dataset": name, **options}
    with dask_client(scheduler, n_workers=dask_workers) as client:
        n = shards or worker_threads(client)
        futures = [client.submit(run_remote, _shard_task, str(input_path), (i, n), kwargs, key=f"scdm-shard-{i}-of-{n}-"
                                 f"{model}-{name}-{time.time_ns()}", resources=dict(resources) if resources else None,
                                 pure=False) for i in range(n)]
        with Progress(TextColumn(f"[bold]{model}[/] · {name} · {n} shards"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("chunks"), TimeElapsedColumn(), disable=not progress) as bar:
            task = bar.add_task("shards", total=None)
            while not all(f.done() for f in futures):
                counts = _done_count(store_path, model, name)
                if counts is not None:
                    bar.update(task, completed=counts[0], total=counts[1])
                time.sleep(0.5)
            counts = _done_count(store_path, model, name)
            if counts is not None:
                bar.update(task, completed=counts[0], total=counts[1])
        outcomes = client.gather(futures)
    return [unwrap(o) for o in outcomes]


def parse_resources(items: list[str] | None) -> dict[str, float] | None:
    """``["GPU=1"]`` -> ``{"GPU": 1.0}`` (None when none are given)."""
    out: dict[str, float] = {}
    for item in items or []:
        name, _, amount = item.partition("=")
        try:
            out[name.strip()] = float(amount)
        except ValueError:
            raise ScdmError(f"--dask-resource {item!r} is not NAME=AMOUNT", "write it like --dask-resource GPU=1") from None
        if not name.strip() or out[name.strip()] <= 0:
            raise ScdmError(f"--dask-resource {item!r} is not NAME=AMOUNT", "write it like --dask-resource GPU=1")
    return out or None
