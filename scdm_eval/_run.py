"""The evaluation grid: models x partitions x classifiers, in parallel, deterministic."""

from __future__ import annotations

import contextlib
import tempfile
import warnings
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from scdm_embed.errors import ScdmError, StoreError
from scdm_embed.store import EmbeddingRows, EmbeddingStore

from ._classifiers import (
    PROTOCOLS,
    available_cores,
    check_classifiers,
    concurrent_fits,
    fit_score,
    fit_score_concurrently,
    release_heap,
    resolve_settings,
    steady_heap,
    streams_rows,
)
from ._metrics import METRICS
from ._splits import (
    CELL_LEVEL,
    LeakageWarning,
    Partition,
    Splits,
    SplitWarning,
    make_splits,
    open_store,
    save_splits,
)

#: Columns of the results table, in order.
RESULT_COLUMNS: tuple[str, ...] = (
    "model", "scheme", "by", "category", "fold", "partition", "classifier",
    "n_train", "n_test", "train_sensitive", "train_resistant", "test_sensitive", "test_resistant",
    *METRICS, "reason", "split", "seed", "leak_prone", "correction", "transductive",
)
#: Columns of ``predictions.parquet``: one row per test cell x model x partition x classifier.
PREDICTION_COLUMNS: tuple[str, ...] = (
    "cell_id", "dataset", "study", "sample", "model", "scheme", "category", "fold", "partition", "classifier",
    "y_true", "p_sensitive",
)


def _check_models(st: EmbeddingStore, models: Sequence[str] | None, datasets: Sequence[str]) -> list[str]:
    entries = st.entries()
    usable = {(e.model, e.dataset) for e in entries if e.complete and not e.stale}
    known = sorted({e.model for e in entries})
    if models is None:
        models = [m for m in known if all((m, d) in usable for d in datasets)]
        if not models:
            raise StoreError(f"no model in {str(st.path)!r} has complete embeddings for every dataset {list(datasets)}"
                             + (f" (models: {known})" if known else ""),
                             "run `scdm-embed extract INPUT --model NAME --store PATH` for each dataset, or pass datasets=")
        return models
    models = [models] if isinstance(models, str) else list(models)
    if len(set(models)) != len(models):
        raise ScdmError(f"model listed twice: {models}", "list each model once")
    for m in models:
        if m not in known:
            raise StoreError(f"model {m!r} has no embeddings in {str(st.path)!r} (has: {', '.join(known) or 'none'})",
                             f"pick one of those, or run `scdm-embed extract INPUT --model {m} --store {st.path}`")
        missing = [d for d in datasets if (m, d) not in usable]
        if missing:
            raise StoreError(f"model {m!r} lacks complete, current embeddings for dataset(s) {missing}; splits cover "
                             "every dataset so that all models see the same cells",
                             f"run `scdm-embed extract ... --model {m} --dataset NAME` for them (or resume it), "
                             "or restrict datasets=")
    return models


def _rows(st: EmbeddingStore, model: str, datasets: Sequence[str], splits: Splits) -> EmbeddingRows:
    """``model``'s embeddings of the split's cells (row ``i`` = ``splits.table`` row ``i``), checked finite, unread."""
    return check_finite(st.rows(model, datasets=list(datasets), cells=splits.table.index), model, splits.table.index)


def _load(st: EmbeddingStore, model: str, datasets: Sequence[str], splits: Splits) -> np.ndarray:
    """``model``'s embeddings of the split's cells, in its row order, read whole (checked finite)."""
    X = st.rows(model, datasets=list(datasets), cells=splits.table.index).read()
    return check_finite(X, model, splits.table.index)


def check_finite(X: np.ndarray | EmbeddingRows, model: str, keys: Sequence[str]):
    """``X`` if every row is finite; else a StoreError naming the model and a cell (``keys[row]``).

    Checked in blocks of rows: no boolean copy of the whole matrix (a quarter of its size); a
    source of rows (:class:`~scdm_embed.store.EmbeddingRows`) is read block by block.
    """
    bad, step = np.zeros(len(X), bool), 1 << 11  # a 1 MB mask at 512-d
    for a in range(0, len(X), step):
        block = X[a:a + step] if isinstance(X, np.ndarray) else X.read(np.arange(a, min(a + step, len(X))))
        bad[a:a + step] = ~np.isfinite(block).all(axis=1)
    if bad.any():
        raise StoreError(f"model {model!r} has {int(bad.sum())} cells with non-finite embeddings "
                         f"(e.g. {keys[np.flatnonzero(bad)[0]]})",
                         f"re-extract with `scdm-embed extract ... --model {model} --overwrite`")
    return X


def _check_out(out: str | Path) -> None:
    """Refuse an ``out`` that cannot become a results folder, before any fitting."""
    import os

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ScdmError(f"--out {str(out)!r} is a file, not a folder", "pass --out with a folder (it is created if absent)")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ScdmError(f"--out {str(out)!r} cannot be created: {str(parent)!r} is a file", "pass --out with a folder path")
    if not os.access(parent, os.W_OK):
        raise ScdmError(f"--out {str(out)!r} is not writable ({str(parent)!r} refuses writes)",
                        "pass --out with a folder you can write to")


def _task_seed(seed: int, category: str, fold: int) -> int:
    return int(np.random.SeedSequence([seed, zlib.crc32(category.encode()), fold]).generate_state(1)[0] % (2**31))


def _row(model: str, splits: Splits, part: Partition, classifier: str, metrics: Mapping[str, Any],
         y: np.ndarray, seed: int, correction: str = "none") -> dict[str, Any]:
    ytr, yte = y[part.train], y[part.test]
    p = splits.params
    return {"model": model, "scheme": p["scheme"], "by": p["by"], "category": part.category, "fold": part.fold,
            "partition": part.name, "classifier": classifier, "n_train": len(ytr), "n_test": len(yte),
            "train_sensitive": int((ytr == 1).sum()), "train_resistant": int((ytr == 0).sum()),
            "test_sensitive": int((yte == 1).sum()), "test_resistant": int((yte == 0).sum()),
            **{m: metrics[m] for m in METRICS}, "reason": metrics["reason"], "split": splits.name, "seed": seed,
            "leak_prone": bool(p.get("leak_prone", False)),
            "correction": correction, "transductive": correction != "none"}  # the test cells' embeddings shaped it


def predictions_table(cells: pd.DataFrame, splits: Splits,
                      blocks: Sequence[tuple[str, Partition, str, np.ndarray]]) -> pd.DataFrame:
    """Per-cell test predictions (columns :data:`PREDICTION_COLUMNS`) of ``(model, partition, classifier, proba)``.

    ``cells`` is the store's cell table (any order; aligned to ``splits.table`` here); within a
    block, rows are in the partition's test order, so the metrics recompute exactly from them.
    """
    cells = cells.reindex(splits.table.index)
    keys = splits.table.index.to_numpy(dtype=object)
    y = splits.table["label"].to_numpy().astype(np.int8)
    pos = [part.test for _, part, _, _ in blocks]
    at = np.concatenate(pos) if pos else np.empty(0, dtype=np.int64)
    sizes = [len(t) for t in pos]

    def per_block(values: list[Any]) -> pd.Categorical:
        cats = list(dict.fromkeys(values))
        codes = np.array([cats.index(v) for v in values], dtype=np.int64)
        return pd.Categorical.from_codes(np.repeat(codes, sizes), categories=cats)

    def meta(col: str) -> pd.Categorical:
        if col not in cells.columns:
            return pd.Categorical([None] * len(at), categories=[])
        return pd.Categorical(cells[col].astype(str).to_numpy(dtype=object)[at])

    ds = cells["dataset"].astype(str).to_numpy(dtype=object)[at]
    cell_id = np.array([k[len(d) + 1:] for k, d in zip(keys[at], ds, strict=True)], dtype=object)
    proba = [np.asarray(b[3], dtype=np.float64).ravel() for b in blocks]
    return pd.DataFrame({
        "cell_id": cell_id, "dataset": pd.Categorical(ds), "study": meta("study"), "sample": meta("sample"),
        "model": per_block([b[0] for b in blocks]), "scheme": per_block([splits.params["scheme"]] * len(blocks)),
        "category": per_block([b[1].category for b in blocks]),
        "fold": np.repeat(np.array([b[1].fold for b in blocks], dtype=np.int64), sizes),
        "partition": per_block([b[1].name for b in blocks]), "classifier": per_block([b[2] for b in blocks]),
        "y_true": y[at], "p_sensitive": np.concatenate(proba) if proba else np.empty(0),
    }, columns=list(PREDICTION_COLUMNS))


def _memmap(X: np.ndarray, folder: str) -> np.ndarray:
    """``X`` as a read-only memmap, so loky workers share one file (no per-task hashing or copies)."""
    path = Path(folder) / f"X{len(list(Path(folder).iterdir()))}.npy"
    np.save(path, X)
    return np.load(path, mmap_mode="r")


def plan_workers(n_jobs: int, n_tasks: int, cores: int | None = None) -> tuple[int, int]:
    """(workers, threads per fit) for ``n_jobs``: workers x threads never exceed the cores.

    ``n_jobs=-1`` (default) and ``1``: one fit at a time in this process with every core (no
    worker start-up, no re-imports, no copies; XGBoost hist uses the threads; MLP fits on the
    CPU run one per core at once instead, see :func:`_grid`). ``n_jobs=k``: ``k`` loky workers
    (at most the cores) x ``cores // k`` threads.
    """
    cores = available_cores() if cores is None else cores
    workers = 1 if n_jobs < 0 else max(1, min(int(n_jobs), cores, n_tasks))
    return workers, max(1, cores // workers)


def _grid(tasks: list[tuple[tuple, dict[str, Any]]], n_jobs: int, threads: int, advance,
          concurrent: Mapping[str, int] | None = None) -> list[dict[str, Any]]:
    """Run ``fit_score(*args, threads=threads, **kw)`` for each task: in this process, or over loky workers.

    In this process, the tasks of a classifier in ``concurrent`` (name -> fits at once, see
    :func:`concurrent_fits`) run that many at a time on ``threads // fits`` cores each.
    """
    out: list[dict[str, Any] | None] = []
    if n_jobs == 1:
        concurrent = {c: k for c, k in (concurrent or {}).items() if k > 1}
        for args, kw in tasks:
            if args[4] in concurrent:
                out.append(None)
                continue
            out.append(fit_score(*args, threads=threads, **kw))
            advance()
        for c, k in concurrent.items():
            at = [i for i, (args, _) in enumerate(tasks) if args[4] == c]
            done = fit_score_concurrently([tasks[i] for i in at], k, max(1, threads // k), advance)
            for i, r in zip(at, done, strict=True):
                out[i] = r
        return out
    from joblib import Parallel, delayed, parallel_config

    # X is a read-only memmap (joblib passes its file name, not its bytes); tasks read their
    # rows in place, so workers stay under loky's memory-leak guard and are never restarted
    with parallel_config(backend="loky", inner_max_num_threads=threads):
        gen = Parallel(n_jobs=n_jobs, return_as="generator")(delayed(fit_score)(*a, threads=threads, **kw) for a, kw in tasks)
        for r in gen:
            out.append(r)
            advance()
    return out


def run_evaluation(
    store: str | Path | EmbeddingStore,
    *,
    models: Sequence[str] | None = None,
    scheme: Literal["pooled", "cross", "transfer"] = "pooled",
    by: str = "all",
    classifiers: Sequence[str] = ("mlp", "xgboost", "logreg"),
    folds: int = 10,
    group_key: str | None = None,
    seed: int = 0,
    n_jobs: int = -1,
    out: str | Path | None = None,
    datasets: Sequence[str] | None = None,
    classifier_options: Mapping[str, Mapping[str, Any]] | None = None,
    strict: bool = False,
    progress: bool = False,
    protocol: str = "scdm",
    train: Sequence[str] | None = None,
    test: Sequence[str] | None = None,
    correct: str = "none",
    batch_key: str = "study",
    permutations: int = 0,
    scheduler: str | None = None,
    dask_workers: int | None = None,
    stream: bool = True,
) -> pd.DataFrame:
    """Evaluate classifiers on cached embeddings under honest splits.

    ``scheme="transfer"``: fit on the ``train`` cells (dataset names or ``COLUMN=VALUE``) per
    category, predict each ``test`` dataset (one row each). ``correct="harmony"``: every model
    is scored as extracted and Harmony-corrected on ``batch_key`` (rows ``<model>+harmony``,
    ``correction`` / ``transductive`` columns; see :mod:`._correct`). ``permutations=N``: a
    label-permutation null on the same folds (``.attrs["permutation"]``; :mod:`._stats`).
    ``scheduler="tcp://HOST:8786"`` (or ``dask_workers=N``, a local cluster): the fits run as
    ``dask.distributed`` tasks, each reading its partition's rows from the store (a path every
    worker reaches); the results equal the in-process run's (:mod:`._distributed`).
    With ``out``, paired tests between models and classifiers go to ``stats.parquet``/``.csv``
    and a section of ``summary.md``.

    The splits (see :func:`make_splits`) are made once per store and reused; for every
    ``models`` x partition x ``classifiers`` a classifier is fitted on the partition's
    training cells and scored on its test cells. ``n_jobs=-1``/``1``: one fit at a time with
    every core, except MLP fits on the CPU, which run one per core at once in this process
    (:func:`~scdm_eval._classifiers.concurrent_fits`; their recorded ``threads`` setting is the
    count each ran on); ``n_jobs=k``: k loky workers x (cores // k) threads (:func:`plan_workers`);
    the same ``seed`` and cores give identical results. In this process, the fits of classifiers
    that stream their rows (xgboost) run first and read them from the store block by block
    (:meth:`~scdm_embed.store.EmbeddingStore.rows`), so their grid never holds the slice whole
    (a local store, as extracted; ``stream=False``: they read the slice held in memory, as the
    others do; same results). ``.attrs["params"]["streamed"]`` lists them.
    ``protocol``: ``"scdm"`` (defaults, early stopping) or ``"scdrugmap"`` (the released
    scDrugMap MLP schedule and random cell-level folds; see :data:`PROTOCOLS`);
    ``classifier_options`` are laid over it, typed and checked, and every setting is
    recorded in ``.attrs["params"]["settings"]`` and the summary.

    Returns one row per model x category x fold x classifier (columns
    :data:`RESULT_COLUMNS`); metrics undefined on a fold are NaN with a ``reason``.
    ``classifier_options`` maps a classifier name to options (e.g.
    ``{"mlp": {"max_epochs": 20}}``). With ``out``, writes ``results.parquet``,
    ``results.csv``, ``summary.csv``, ``summary.md``, ``summary.png`` and ``skipped.csv``.
    Skipped categories/partitions and warnings are in ``.attrs["skipped"]`` / ``.attrs["warnings"]``.
    """
    steady_heap()  # before the store is read: see its docstring
    st = open_store(store)
    if not isinstance(n_jobs, (int, np.integer)) or n_jobs == 0:
        raise ScdmError(f"n_jobs must be a non-zero integer (got {n_jobs!r})", "use -1 for all cores, or 1, 2, ...")
    if not isinstance(stream, bool):
        raise ScdmError(f"stream must be True or False (got {stream!r})", "pass stream=True (default) or stream=False")
    classifiers = check_classifiers(classifiers)
    options = {k: dict(v) for k, v in (classifier_options or {}).items()}
    unused = sorted(set(options) - set(classifiers))
    if unused:
        raise ScdmError(f"options given for classifier(s) {unused} that are not evaluated", "drop them or add the classifier")
    if protocol not in PROTOCOLS:
        raise ScdmError(f"unknown protocol {protocol!r}", f"use one of {', '.join(PROTOCOLS)}")
    # every setting, typed and checked here (not in a worker), preset first, the user's on top
    settings = {c: resolve_settings(c, {**PROTOCOLS[protocol].get(c, {}), **options.get(c, {})}) for c in classifiers}
    if protocol == "scdrugmap":
        if group_key not in (None, CELL_LEVEL):
            raise ScdmError(f"--protocol scdrugmap uses random cell-level folds, as the paper; --group-key {group_key} "
                            "contradicts it", "drop --group-key, or use --protocol scdm --group-key "
                            f"{group_key} --set mlp.KEY=VALUE for the settings you want")
        group_key = CELL_LEVEL  # explicit: the paper's folds (rows are flagged leak_prone where they leak)
    all_ds = st.datasets()
    dsets = sorted(datasets) if datasets is not None else all_ds
    if not dsets:
        raise StoreError(f"the store {str(st.path)!r} holds no datasets", "run `scdm-embed extract` into it first")
    models = _check_models(st, models, dsets)
    from ._correct import check_correction

    cells = st.cells(dsets)  # once: each call is a fresh copy of every cell table
    check_correction(correct, batch_key, cells.columns)
    if not isinstance(permutations, (int, np.integer)) or isinstance(permutations, bool) or permutations < 0:
        raise ScdmError(f"permutations must be an integer >= 0 (got {permutations!r})", "use e.g. --permutations 100")
    if out is not None:
        _check_out(out)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LeakageWarning)
        warnings.simplefilter("always", SplitWarning)
        # a new split is saved only once the run succeeded: a failed run leaves the store as it was
        splits = make_splits(st, save=False, scheme=scheme, by=by, folds=folds, group_key=group_key, seed=seed,
                                               datasets=datasets, strict=strict, train=train, test=test)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    notes = [str(w.message) for w in caught if issubclass(w.category, (LeakageWarning, SplitWarning))]

    y = splits.table["label"].to_numpy().astype(np.int64)
    parts = list(splits)
    variants = [(m, fix) for m in models for fix in dict.fromkeys(("none", correct))]  # as extracted, corrected
    n_tasks = len(variants) * len(parts) * len(classifiers)
    workers, threads = plan_workers(int(n_jobs), n_tasks)
    n_tasks *= 1 + permutations
    # in this process, MLP fits run one per core at once (concurrent_fits); their settings then
    # record the thread count each fit ran on, so that a fold refit reproduces its row
    in_process = workers == 1 and scheduler is None and dask_workers is None
    concurrent = {c: concurrent_fits(c, settings[c], threads, len(variants) * len(parts)) if in_process else 1
                  for c in classifiers}
    grid_settings = {c: {**o, "threads": max(1, threads // concurrent[c])} if concurrent[c] > 1 else o
                     for c, o in settings.items()}
    gkey = splits.params.get("group_key")
    groups = (cells[gkey].reindex(splits.table.index).astype(str).to_numpy(dtype=object)
              if gkey else None)  # early-stopping splits of a grouped fold are grouped too
    rows, metrics = [], []
    fixes: dict[str, str] = {}  # row model name -> correction
    streamed_all: list[str] = []  # classifiers whose fits read their rows from the store
    null: list[dict[str, Any]] = []  # label-permutation fits
    batch = cells[batch_key].reindex(splits.table.index).astype(str).to_numpy() if correct != "none" else None
    del cells  # the store keeps its own copy; predictions_table asks it again at the end
    with contextlib.ExitStack() as stack:
        dist = None  # executor hook: the fits as Dask tasks that read their rows from the store
        if scheduler is not None or dask_workers is not None:
            from ._distributed import open_grid

            dist = stack.enter_context(open_grid(
                scheduler, dask_workers, store=st.path, datasets=dsets, splits=splits, y=y, groups=groups,
                settings=settings, warm_torch="mlp" in classifiers, correct=correct, permutations=permutations))
            workers, threads = dist.workers, 1
        advance = lambda: None  # noqa: E731
        if progress:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            bar = stack.enter_context(Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                               transient=True))
            at_once = "".join(f"; {c}: {k} fits at once x {max(1, threads // k)} thread"
                              f"{'s' if threads // k > 1 else ''}" for c, k in concurrent.items() if k > 1)
            task = bar.add_task(f"fitting ({workers} worker{'s' if workers > 1 else ''} x {threads} thread"
                                f"{'s' if threads > 1 else ''}{at_once})", total=n_tasks)
            advance = lambda: bar.advance(task)  # noqa: E731
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="scdm-eval-")) if workers > 1 else None
        for base, fix in variants:  # one model in memory at a time
            from ._correct import correct_embeddings

            m = base if fix == "none" else f"{base}+{fix}"
            fixes[m] = fix
            if dist is not None:
                specs = [(k, c, _task_seed(seed, p.category, p.fold)) for k, p in enumerate(parts) for c in classifiers]
                rows += [(m, parts[k], c) for k, c, _ in specs]
                metrics += dist.grid(base, specs, advance)
                continue
            # classifiers that stream (xgboost) read their rows from the store, fit by fit, before
            # the others hold the whole slice: their grid never holds it (in this process, as extracted)
            streamed = [c for c in classifiers
                        if stream and fix == "none" and tmp is None and isinstance(st.path, Path) and streams_rows(c)]
            held = [c for c in classifiers if c not in streamed]
            done: dict[tuple[int, str], dict[str, Any]] = {}

            def grid(X, names: list[str], done: dict = done) -> None:
                tasks, at = [], []
                for k, part in enumerate(parts):
                    s = _task_seed(seed, part.category, part.fold)
                    for c in names:
                        tasks.append(((X, y, part.train, part.test, c, grid_settings[c], s,
                                       "mlp" in classifiers and workers > 1),
                                      {"groups": groups}))
                        at.append((k, c))
                done.update(zip(at, _grid(tasks, workers, threads, advance, concurrent), strict=True))

            if streamed:
                streamed_all += streamed
                grid(_rows(st, base, dsets, splits), streamed)
            if held or permutations:
                X = correct_embeddings(_load(st, base, dsets, splits), batch,
                                       np.flatnonzero(splits.table["fold"] != -1), method=fix,
                                       seed=seed)  # every evaluated cell, no labels
                if tmp is not None and X.nbytes > 1 << 20:
                    X = _memmap(X, tmp)
                release_heap()  # the read's decode buffers: freed, but glibc keeps them (11 MB at 20k x 512)
                if held:
                    grid(X, held)
                if permutations:
                    from ._stats import model_null

                    null += model_null(X, y, parts, splits, m, classifiers, settings, seed=seed, n=permutations,
                                       groups=groups, threads=threads, advance=advance)
                del X
            for k, part in enumerate(parts):
                for c in classifiers:
                    rows.append((m, part, c))
                    metrics.append(done[(k, c)])
    results = pd.DataFrame([_row(m, splits, part, c, met, y, seed, fixes[m])
                            for (m, part, c), met in zip(rows, metrics, strict=True)], columns=list(RESULT_COLUMNS))
    results = results.astype({"fold": np.int64, "seed": np.int64, "leak_prone": bool})
    results.attrs.update({"split": splits.name, "skipped": splits.skipped.to_dict("records"), "warnings": notes,
                          "params": {**splits.params, "models": list(models), "classifiers": list(classifiers),
                                     "store": str(st.path), "protocol": protocol, "settings": grid_settings,
                                     "workers": workers, "threads_per_fit": threads,
                                     "concurrent_fits": {c: k for c, k in concurrent.items() if k > 1},
                                     "streamed": sorted(set(streamed_all)),
                                     "correction": correct,
                                     "batch_key": batch_key if correct != "none" else None,
                                     "permutations": int(permutations)}})
    perm = None
    if permutations:
        from ._stats import permutation_pvalues

        perm = permutation_pvalues(results, pd.DataFrame(null))
        results.attrs["permutation"] = perm.to_dict("records")
    if out is not None:
        from ._report import write_report
        from ._stats import write_stats

        blocks = [(m, part, c, met["proba"]) for (m, part, c), met in zip(rows, metrics, strict=True)]
        write_report(results, out, predictions=predictions_table(st.cells(dsets), splits, blocks))
        write_stats(results, out, permutation=perm)
    if not splits.saved:
        save_splits(st, splits)
    return results
