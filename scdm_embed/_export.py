"""Embeddings back into AnnData: ``obsm["X_<model>"]`` for scanpy (``scdm-embed export``).

The export holds a dataset's cells in the store's order, ``obs`` from the store's cell table
(label, response, study, sample, every kept column; ``cell_id`` is the index), one
``obsm["X_<model>"]`` per model (the stored float32 values, bit for bit) and, with
``results=``, per-cell predictions of ``scdm-eval run`` (``predictions.parquet``): one
``obs`` column ``p_sensitive_<model>_<classifier>`` per model x classifier, the mean over the
folds that tested the cell (each cell is tested once per scheme). ``uns["scdm"]`` records
where it came from; each array's provenance is a JSON string in
``uns["scdm"]["provenance"]["X_<model>"]`` (``json.loads`` it: h5ad cannot hold nulls).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from ._version import __version__
from .errors import InputError, StoreError
from .store import EmbeddingStore

#: the ``uns`` key of the export's provenance
UNS_KEY = "scdm"


def obsm_key(model: str) -> str:
    """``"pca"`` -> ``"X_pca"`` (scanpy's convention; ``external:scvi`` -> ``X_external:scvi``)."""
    return f"X_{model}"


def _open(store: str | Path | EmbeddingStore) -> EmbeddingStore:
    return store if isinstance(store, EmbeddingStore) else EmbeddingStore(store)


def _models(st: EmbeddingStore, dataset: str, models: Sequence[str] | None) -> list[str]:
    usable = [e.model for e in st.entries() if e.dataset == dataset and e.complete and not e.stale]
    if models is None:
        if not usable:
            raise StoreError(f"no model has complete embeddings for dataset {dataset!r} in {str(st.path)!r}",
                             f"run `scdm-embed extract INPUT --model NAME --dataset {dataset} --store {st.path}` first")
        return usable
    models = [models] if isinstance(models, str) else list(models)
    if len(set(models)) != len(models):
        raise StoreError(f"model listed twice: {models}", "list each --model once")
    for m in models:
        if m not in usable:
            raise StoreError(f"model {m!r} has no complete, current embeddings for dataset {dataset!r} "
                             f"(usable: {usable or 'none'})",
                             f"pick one of those, or run `scdm-embed extract ... --model {m} --dataset {dataset}`")
    return models


def _provenance(st: EmbeddingStore, model: str, dataset: str) -> str:
    rec = st.embedding_record(model, dataset)
    return json.dumps({"model": model, "dataset": dataset, **(rec.to_attrs() if rec is not None else {})},
                      sort_keys=True)


def prediction_columns(results: str | Path, dataset: str, cell_ids: pd.Index,
                       models: Sequence[str] | None = None) -> pd.DataFrame:
    """Per-cell mean ``p_sensitive`` of ``results/predictions.parquet``, one column per model x classifier.

    Columns are ``p_sensitive_<model>_<classifier>`` (``..._<model>_<scheme>_<classifier>`` when the
    results hold several schemes); cells a model never tested are NaN. Rows follow ``cell_ids``.
    """
    path = Path(results)
    path = path / "predictions.parquet" if path.is_dir() else path
    if not path.is_file():
        raise InputError(f"no predictions.parquet in {str(results)!r}",
                         "pass --results the --out folder of `scdm-eval run` (it writes predictions.parquet)")
    try:
        p = pd.read_parquet(path, columns=["cell_id", "dataset", "model", "scheme", "classifier", "p_sensitive"])
    except Exception as e:  # noqa: BLE001 - any unreadable parquet is the user's file
        raise InputError(f"cannot read {str(path)!r} as scdm predictions ({type(e).__name__}: {e})",
                         "pass the predictions.parquet written by `scdm-eval run`") from None
    p = p[p["dataset"].astype(str) == dataset]
    if models is not None:
        p = p[p["model"].astype(str).isin(list(models))]
    if p.empty:
        raise InputError(f"{str(path)!r} holds no predictions for dataset {dataset!r}"
                         + (f" and models {list(models)}" if models is not None else ""),
                         "pass the results of a `scdm-eval run` that evaluated this dataset, or drop --results")
    several = p["scheme"].nunique() > 1
    out: dict[str, pd.Series] = {}
    for (model, scheme, clf), g in p.groupby(["model", "scheme", "classifier"], observed=True, sort=True):
        name = f"p_sensitive_{model}_{scheme}_{clf}" if several else f"p_sensitive_{model}_{clf}"
        out[name] = g.groupby(g["cell_id"].astype(str))["p_sensitive"].mean().reindex(cell_ids)
    return pd.DataFrame(out, index=cell_ids)


def to_anndata(
    store: str | Path | EmbeddingStore,
    dataset: str,
    *,
    models: Sequence[str] | None = None,
    results: str | Path | None = None,
) -> ad.AnnData:
    """An AnnData of ``dataset``'s cells with ``obsm["X_<model>"]`` per model (default: every complete one).

    ``obs``: the store's cell table (index = cell id) plus, with ``results`` (a ``scdm-eval run``
    output folder), ``p_sensitive_<model>_<classifier>`` columns. ``X`` is empty (0 genes):
    the export carries embeddings, not counts; see ``into=`` of :func:`export_anndata`.
    """
    st = _open(store)
    st.dataset_attrs(dataset)  # a clear StoreError for an unknown dataset
    names = _models(st, dataset, models)
    cells = st.cells([dataset])
    obs = cells.drop(columns=["dataset", "row"])
    obs.index = pd.Index([k[len(dataset) + 1:] for k in cells.index], name="cell_id")
    obsm: dict[str, np.ndarray] = {}
    prov: dict[str, str] = {}
    for m in names:
        X, _ = st.load(m, datasets=[dataset])
        obsm[obsm_key(m)] = X
        prov[obsm_key(m)] = _provenance(st, m, dataset)
    uns: dict[str, Any] = {"store": str(st.path), "dataset": dataset, "models": list(names),
                           "scdm_version": __version__, "provenance": prov}
    if results is not None:
        preds = prediction_columns(results, dataset, obs.index, models=names if models is not None else None)
        obs = pd.concat([obs, preds], axis=1)
        uns["results"] = str(results)
        uns["prediction_columns"] = list(preds.columns)
    a = ad.AnnData(obs=obs, obsm=obsm)
    a.uns[UNS_KEY] = uns
    return a


def _read_h5ad(path: Path) -> ad.AnnData:
    if not path.is_file():
        raise InputError(f"--into file {str(path)!r} does not exist", "pass your own existing .h5ad (or drop --into)")
    try:
        return ad.read_h5ad(path)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file is the user's input
        raise InputError(f"cannot read {str(path)!r} as an .h5ad ({type(e).__name__}: {e})",
                         "pass an intact AnnData .h5ad file") from None


def merge_into(target: ad.AnnData, export: ad.AnnData, *, where: str = "the target") -> ad.AnnData:
    """Add ``export``'s ``obsm``, prediction columns and ``uns["scdm"]`` to ``target``, matched by cell id.

    Refuses (InputError) unless both hold exactly the same, unique cell ids; nothing is changed then.
    """
    ids, theirs = export.obs_names, target.obs_names
    if not theirs.is_unique:
        raise InputError(f"{where} has duplicate cell ids (obs_names)", "make obs_names unique, then export again")
    if len(ids) != len(theirs) or not theirs.isin(ids).all():
        missing = ids.difference(theirs)
        extra = theirs.difference(ids)
        raise InputError(f"the cell ids of {where} do not match the store's dataset ({len(missing)} of the store's "
                         f"cells are not in it, e.g. {list(missing[:3])}; {len(extra)} of its cells are not in the "
                         f"store, e.g. {list(extra[:3])})",
                         "pass the .h5ad the dataset was extracted from (same obs_names), or export with --out alone")
    order = ids.get_indexer(theirs)
    for k, v in export.obsm.items():
        target.obsm[k] = np.asarray(v)[order]
    for c in export.uns.get(UNS_KEY, {}).get("prediction_columns", []):
        target.obs[c] = export.obs[c].to_numpy()[order]
    target.uns[UNS_KEY] = export.uns[UNS_KEY]
    return target


def write_h5ad_atomic(a: ad.AnnData, out: Path) -> Path:
    """Write ``a`` to a temporary file beside ``out``, then rename it over ``out`` (never half-written)."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        a.write_h5ad(tmp)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return out


def export_anndata(
    store: str | Path | EmbeddingStore,
    dataset: str,
    *,
    out: str | Path | None = None,
    models: Sequence[str] | None = None,
    results: str | Path | None = None,
    into: str | Path | None = None,
) -> Path:
    """Write :func:`to_anndata` to ``out`` (``.h5ad``); with ``into``, into a copy of that ``.h5ad``.

    ``into`` alone rewrites that file in place (atomically); ``into`` + ``out`` leaves it as it is
    and writes the merged file to ``out``. Returns the path written.
    """
    if out is None and into is None:
        raise InputError("nothing to write to", "pass --out cells.h5ad (or --into your.h5ad)")
    dest = Path(out if out is not None else into)  # type: ignore[arg-type]
    if dest.suffix != ".h5ad":
        raise InputError(f"the output {str(dest)!r} does not end in .h5ad", "name the output file like cells.h5ad")
    if dest.is_dir():
        raise InputError(f"the output {str(dest)!r} is a folder", "pass a file path like out/cells.h5ad")
    if not dest.parent.exists():
        raise InputError(f"the folder of the output {str(dest)!r} does not exist", "create it first, or pick another path")
    a = to_anndata(store, dataset, models=models, results=results)
    if into is not None:
        a = merge_into(_read_h5ad(Path(into)), a, where=str(into))
    return write_h5ad_atomic(a, dest)


__all__ = ["UNS_KEY", "export_anndata", "merge_into", "obsm_key", "prediction_columns", "to_anndata",
           "write_h5ad_atomic"]
