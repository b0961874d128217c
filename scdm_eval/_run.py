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
from joblib import effective_n_jobs

from scdm_embed.errors import ScdmError, StoreError
from scdm_embed.store import EmbeddingStore

from ._classifiers import check_classifiers, fit_score, make_classifier
from ._metrics import METRICS
from ._splits import (
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
    *METRICS, "reason", "split", "seed",
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


def _load(st: EmbeddingStore, model: str, datasets: Sequence[str], splits: Splits) -> np.ndarray:
    X, table = st.load(model, datasets=list(datasets))
    pos = table.index.get_indexer(splits.table.index)
    if (pos < 0).any():
        raise StoreError(f"model {model!r}: {int((pos < 0).sum())} split cells have no embedding row",
                         "re-extract the model for every dataset")
    if not np.array_equal(pos, np.arange(len(pos))):
        X = X[pos]
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        raise StoreError(f"model {model!r} has {int(bad.sum())} cells with non-finite embeddings "
                         f"(e.g. {splits.table.index[np.flatnonzero(bad)[0]]})",
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
         y: np.ndarray, seed: int) -> dict[str, Any]:
    ytr, yte = y[part.train], y[part.test]
    p = splits.params
    return {"model": model, "scheme": p["scheme"], "by": p["by"], "category": part.category, "fold": part.fold,
            "partition": part.name, "classifier": classifier, "n_train": len(ytr), "n_test": len(yte),
            "train_sensitive": int((ytr == 1).sum()), "train_resistant": int((ytr == 0).sum()),
            "test_sensitive": int((yte == 1).sum()), "test_resistant": int((yte == 0).sum()),
            **{m: metrics[m] for m in METRICS}, "reason": metrics["reason"], "split": splits.name, "seed": seed}


def _memmap(X: np.ndarray, folder: str) -> np.ndarray:
    """``X`` as a read-only memmap, so loky workers share one file (no per-task hashing or copies)."""
    path = Path(folder) / f"X{len(list(Path(folder).iterdir()))}.npy"
    np.save(path, X)
    return np.load(path, mmap_mode="r")


def _grid(tasks: list[tuple], n_jobs: int, advance) -> list[dict[str, Any]]:
    from joblib import Parallel, delayed, parallel_config

    with parallel_config(backend="loky", inner_max_num_threads=1):
        out = []
        for r in Parallel(n_jobs=n_jobs, return_as="generator")(delayed(fit_score)(*t) for t in tasks):
            out.append(r)
            advance()
        return out


def run_evaluation(
    store: str | Path | EmbeddingStore,
    *,
    models: Sequence[str] | None = None,
    scheme: Literal["pooled", "cross"] = "pooled",
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
) -> pd.DataFrame:
    """Evaluate classifiers on cached embeddings under honest splits.

    The splits (see :func:`make_splits`) are made once per store and reused; for every
    ``models`` x partition x ``classifiers`` a classifier is fitted on the partition's
    training cells and scored on its test cells. Tasks run in parallel over ``n_jobs``
    loky workers, one thread each; the same ``seed`` gives identical results.

    Returns one row per model x category x fold x classifier (columns
    :data:`RESULT_COLUMNS`); metrics undefined on a fold are NaN with a ``reason``.
    ``classifier_options`` maps a classifier name to options (e.g.
    ``{"mlp": {"max_epochs": 20}}``). With ``out``, writes ``results.parquet``,
    ``results.csv``, ``summary.csv``, ``summary.md``, ``summary.png`` and ``skipped.csv``.
    Skipped categories/partitions and warnings are in ``.attrs["skipped"]`` / ``.attrs["warnings"]``.
    """
    st = open_store(store)
    if not isinstance(n_jobs, (int, np.integer)) or n_jobs == 0:
        raise ScdmError(f"n_jobs must be a non-zero integer (got {n_jobs!r})", "use -1 for all cores, or 1, 2, ...")
    classifiers = check_classifiers(classifiers)
    options = {k: dict(v) for k, v in (classifier_options or {}).items()}
    unused = sorted(set(options) - set(classifiers))
    if unused:
        raise ScdmError(f"options given for classifier(s) {unused} that are not evaluated", "drop them or add the classifier")
    for c in classifiers:
        make_classifier(c, seed=seed, **options.get(c, {}))  # bad options fail here, not in a worker
    all_ds = st.datasets()
    dsets = sorted(datasets) if datasets is not None else all_ds
    if not dsets:
        raise StoreError(f"the store {str(st.path)!r} holds no datasets", "run `scdm-embed extract` into it first")
    models = _check_models(st, models, dsets)
    if out is not None:
        _check_out(out)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LeakageWarning)
        warnings.simplefilter("always", SplitWarning)
        # a new split is saved only once the run succeeded: a failed run leaves the store as it was
        splits = make_splits(st, save=False, scheme=scheme, by=by, folds=folds, group_key=group_key, seed=seed,
                                               datasets=datasets, strict=strict)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    notes = [str(w.message) for w in caught if issubclass(w.category, (LeakageWarning, SplitWarning))]

    y = splits.table["label"].to_numpy().astype(np.int64)
    parts = list(splits)
    n_tasks = len(models) * len(parts) * len(classifiers)
    workers = min(effective_n_jobs(n_jobs), n_tasks)
    rows, metrics = [], []
    with contextlib.ExitStack() as stack:
        advance = lambda: None  # noqa: E731
        if progress:
            from rich.progress import Progress

            bar = stack.enter_context(Progress(transient=True))
            task = bar.add_task(f"fitting ({workers} worker{'s' if workers > 1 else ''})", total=n_tasks)
            advance = lambda: bar.advance(task)  # noqa: E731
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="scdm-eval-")) if workers > 1 else None
        for m in models:  # one model in memory at a time
            X = _load(st, m, dsets, splits)
            if tmp is not None and X.nbytes > 1 << 20:
                X = _memmap(X, tmp)
            tasks = []
            for part in parts:
                s = _task_seed(seed, part.category, part.fold)
                for c in classifiers:
                    tasks.append((X, y, part.train, part.test, c, options.get(c, {}), s, "mlp" in classifiers))
                    rows.append((m, part, c))
            metrics += _grid(tasks, workers, advance)
            del X
    results = pd.DataFrame([_row(m, splits, part, c, met, y, seed) for (m, part, c), met in zip(rows, metrics, strict=True)],
                           columns=list(RESULT_COLUMNS))
    results = results.astype({"fold": np.int64, "seed": np.int64})
    results.attrs.update({"split": splits.name, "skipped": splits.skipped.to_dict("records"), "warnings": notes,
                          "params": {**splits.params, "models": list(models), "classifiers": list(classifiers),
                                     "store": str(st.path)}})
    if out is not None:
        from ._report import write_report

        write_report(results, out)
    if not splits.saved:
        save_splits(st, splits)
    return results
