"""Saved classifiers: train on all selected cells, save a bundle in safe formats, predict new cells.

A bundle is a folder::

    bundle.json            format, classifier + settings + seed, the embedding's provenance,
                           the training selection, and the sha256 of every other file
    weights.safetensors    MLP: the torch state dict; logreg: coef, intercept, classes
    scaler.safetensors     MLP: mean, scale; logreg: the StandardScaler's mean, scale, var, n_seen
    model.ubj              XGBoost: ``Booster.save_model`` (UBJSON)

Nothing is pickled: arrays are safetensors, XGBoost its own format, the rest JSON. A bundle
predicts only embeddings whose provenance (model, model version, checkpoint hash, settings,
cell context, width) equals the one it was trained on.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scdm_embed.errors import ScdmError, StoreError
from scdm_embed.models.base import sha256_file as _sha256
from scdm_embed.store import EmbeddingStore

from ._classifiers import check_classifiers, make_classifier, steady_heap

FORMAT = "scdm-classifier-bundle"
FORMAT_VERSION = 1
#: provenance fields that must match between the bundle and an embedding it predicts
IDENTITY: tuple[str, ...] = ("model", "model_version", "checkpoint_hash", "settings", "cell_context", "dim")
#: files a bundle may hold (bundle.json lists which ones it has, with their sha256)
FILES: tuple[str, ...] = ("bundle.json", "weights.safetensors", "scaler.safetensors", "model.ubj")
#: columns of a predictions table from :func:`predict`
PREDICT_COLUMNS: tuple[str, ...] = ("cell_id", "dataset", "study", "sample", "model", "classifier", "y_true",
                                    "p_sensitive", "predicted")


def _norm(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def _usable(st: EmbeddingStore, model: str) -> list[str]:
    return sorted(e.dataset for e in st.entries() if e.model == model and e.complete and not e.stale)


def _record(st: EmbeddingStore, model: str, dataset: str):
    rec = st.embedding_record(model, dataset)
    if rec is None or dataset not in _usable(st, model):
        have = _usable(st, model)
        raise StoreError(f"the store {str(st.path)!r} has no complete, current {model!r} embeddings of dataset "
                         f"{dataset!r} ({model} has: {', '.join(have) or 'none'})",
                         f"run `scdm-embed extract INPUT --model {model} --dataset {dataset} --store {st.path}` first")
    return rec


def _identity(rec) -> dict[str, Any]:
    return {k: getattr(rec, k) for k in IDENTITY}


def provenance_of(st: EmbeddingStore, model: str, datasets: Sequence[str]) -> dict[str, Any]:
    """The embedding provenance shared by ``model``'s arrays of ``datasets`` (refused when they differ)."""
    recs = {d: _record(st, model, d) for d in datasets}
    first = next(iter(recs.values()))
    ident = _identity(first)
    for d, rec in recs.items():
        diff = [k for k in IDENTITY if _norm(getattr(rec, k)) != _norm(ident[k])]
        if diff:
            raise ScdmError(f"the {model} embeddings of datasets {datasets[0]!r} and {d!r} were computed with a "
                            f"different {', '.join(diff)}, so one classifier cannot serve both",
                            "re-extract them with the same checkpoint and options, or fit on one of them (--dataset)")
    return {**ident, "options": first.options, "checkpoint": first.checkpoint, "gene_key": first.gene_key,
            "scdm_version": first.scdm_version,
            "datasets": {d: {"input_hash": r.input_hash, "n_cells": r.n_cells, "gene_overlap": r.gene_overlap}
                         for d, r in recs.items()}}


# -- saving and loading the fitted classifiers -------------------------------------------------
def _arrays_out(clf: Any, name: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """(weights, scaler, JSON state) of a fitted classifier."""
    if name == "mlp":
        weights = {k: v.detach().cpu().numpy() for k, v in clf.net_.state_dict().items()}
        return weights, {"mean": clf.mean_, "scale": clf.scale_}, {}
    if name == "logreg":
        sc, lr = clf.model_[0], clf.model_[-1]
        weights = {"coef": lr.coef_, "intercept": lr.intercept_, "classes": np.asarray(lr.classes_, dtype=np.int64),
                   "n_iter": np.asarray(lr.n_iter_)}
        scaler = {"mean": sc.mean_, "scale": sc.scale_, "var": sc.var_,
                  "n_samples_seen": np.asarray(sc.n_samples_seen_, dtype=np.int64)}
        return weights, scaler, {}
    if name == "xgboost":
        return {}, {}, {"best_round": int(clf.best_round_), "n_rounds": int(clf.n_rounds_)}
    return {}, {}, {"p": float(clf.p_)}  # majority


def _restore(name: str, clf: Any, folder: Path, state: Mapping[str, Any], dim: int) -> Any:
    """Put a saved classifier's fitted state back into a fresh ``clf``."""
    from safetensors.numpy import load_file

    if name == "mlp":
        import torch

        clf.net_ = clf._net(dim)
        clf.net_.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(folder / "weights.safetensors").items()},
                                 strict=True)
        clf.net_.eval()
        sc = load_file(folder / "scaler.safetensors")
        clf.mean_, clf.scale_ = sc["mean"], sc["scale"]
    elif name == "logreg":
        from ._classifiers import logreg_pipeline

        w, s = load_file(folder / "weights.safetensors"), load_file(folder / "scaler.safetensors")
        clf.model_ = logreg_pipeline(s["mean"], s["scale"], s["n_samples_seen"], w["coef"], w["intercept"],
                                     w["n_iter"], C=clf.C, max_iter=clf.max_iter, seed=clf.seed)
    elif name == "xgboost":
        import xgboost as xgb

        clf.model_ = xgb.Booster()
        clf.model_.load_model(str(folder / "model.ubj"))
        clf.best_round_, clf.n_rounds_ = int(state["best_round"]), int(state["n_rounds"])
    else:
        clf.p_ = float(state["p"])
    return clf


@dataclass
class Bundle:
    """A fitted classifier with the provenance of the embeddings it was trained on."""

    path: Path
    meta: dict[str, Any]
    classifier: Any

    @property
    def model(self) -> str:
        """The foundation model whose embeddings the classifier reads."""
        return self.meta["provenance"]["model"]

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """P(sensitive) per row of ``X`` (embeddings of the bundle's provenance)."""
        X = np.asarray(X, dtype=np.float32)
        dim = self.meta["provenance"]["dim"]
        if X.ndim != 2 or X.shape[1] != dim:
            raise ScdmError(f"the embeddings are {X.shape[-1] if X.ndim else 0}-d but the bundle's {self.model} "
                            f"classifier takes {dim}-d", "give embeddings of the bundle's model")
        return np.asarray(self.classifier.predict_proba(X), dtype=np.float64)[:, 1]


def _selection(st: EmbeddingStore, model: str, datasets: Sequence[str] | None, by: str,
               category: Sequence[str] | None) -> tuple[list[str], pd.DataFrame]:
    usable = _usable(st, model)
    known = sorted({e.model for e in st.entries()})
    if model not in known:
        raise StoreError(f"model {model!r} has no embeddings in {str(st.path)!r} (has: {', '.join(known) or 'none'})",
                         f"pick one of those, or run `scdm-embed extract INPUT --model {model} --store {st.path}`")
    dsets = sorted(datasets) if datasets else usable
    for d in dsets:
        _record(st, model, d)
    if not dsets:
        raise StoreError(f"model {model!r} has no complete embeddings in {str(st.path)!r}",
                         f"finish `scdm-embed extract ... --model {model}` first")
    cells = st.cells(dsets)
    cats = list(category or [])
    if by == "all" and cats:
        raise ScdmError("--category needs --by COLUMN (which metadata column the category is a value of)",
                        "pass e.g. --by cancer_type --category lung")
    if by != "all":
        if by not in cells.columns:
            meta = [c for c in cells.columns if c not in ("row", "label", "response")]
            raise ScdmError(f"--by {by}: the cell table has no {by!r} column (it has: {', '.join(meta)})",
                            "pick another --by, or re-extract with that metadata key")
        if not cats:
            raise ScdmError(f"--by {by} needs --category VALUE (which {by} to train on)",
                            f"pass --category with one of: {', '.join(sorted(cells[by].astype(str).unique())[:12])}")
        values = cells[by].astype(str)
        missing = [c for c in cats if c not in set(values)]
        if missing:
            raise ScdmError(f"--category {missing} not among the {by} values ({', '.join(sorted(set(values))[:12])})",
                            "check the spelling (values are case-sensitive)")
        cells = cells[values.isin(cats).to_numpy()]
    y = cells["label"].to_numpy()
    if not np.isin(y, (0, 1)).all() or np.unique(y).size < 2:
        only = "no labelled" if not np.isin(y, (0, 1)).any() else f"only {'sensitive' if (y == 1).any() else 'resistant'}"
        raise ScdmError(f"the selected cells ({len(cells)}) hold {only} cells; a classifier needs both classes",
                        "select datasets / categories that hold sensitive and resistant cells")
    return dsets, cells


def _check_bundle_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ScdmError(f"--out {str(out)!r} is a file", "pass a folder path for the bundle (it is created)")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "bundle.json").exists():
            raise ScdmError(f"--out {str(out)!r} is a folder that holds other files", "pass a new or empty folder")
        if not overwrite:
            raise ScdmError(f"--out {str(out)!r} already holds a bundle", "pass --overwrite to replace it, or another --out")


def fit_classifier(
    store: str | Path | EmbeddingStore,
    *,
    model: str,
    classifier: str = "logreg",
    out: str | Path,
    datasets: Sequence[str] | None = None,
    by: str = "all",
    category: str | Sequence[str] | None = None,
    settings: Mapping[str, Any] | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> Bundle:
    """Train ``classifier`` on every selected cell's ``model`` embedding and save it as a bundle in ``out``.

    Cells: every dataset of the store with complete ``model`` embeddings (or ``datasets``),
    restricted to ``by`` = ``category`` values when given. ``settings`` are the classifier's
    (as ``--set``); the same ``seed`` and settings give the model :func:`make_classifier` fits
    in memory. Returns the loaded :class:`Bundle`.
    """
    from safetensors.numpy import save_file

    from ._run import check_finite
    from ._splits import open_store

    steady_heap()
    st = open_store(store)
    (classifier,) = check_classifiers([classifier])
    cats = [category] if isinstance(category, str) else list(category or [])
    out = Path(out)
    _check_bundle_out(out, overwrite)
    clf = make_classifier(classifier, seed=seed, **dict(settings or {}))
    dsets, cells = _selection(st, model, datasets, by, cats)
    prov = provenance_of(st, model, dsets)
    X, table = st.load(model, datasets=dsets)
    pos = table.index.get_indexer(cells.index)
    X = X[pos] if not np.array_equal(pos, np.arange(len(table))) else X
    check_finite(X, model, cells.index)
    y = cells["label"].to_numpy().astype(np.int64)
    groups = cells["sample"].astype(str).to_numpy() if "sample" in cells.columns else None
    clf.fit(X, y, groups=groups)
    weights, scaler, state = _arrays_out(clf, classifier)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out.parent))
    try:
        if weights:
            save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        if scaler:
            save_file({k: np.ascontiguousarray(v) for k, v in scaler.items()}, str(tmp / "scaler.safetensors"))
        if classifier == "xgboost":
            clf.model_.save_model(str(tmp / "model.ubj"))
        from scdm_embed import __version__

        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "scdm_version": __version__,
            "classifier": classifier, "settings": dict(getattr(clf, "settings", {})), "seed": int(seed),
            "state": state, "provenance": prov,
            "training": {"store": str(st.path), "datasets": dsets, "by": by, "category": cats, "n_cells": int(len(y)),
                         "sensitive": int((y == 1).sum()), "resistant": int((y == 0).sum())},
        }
        seal_bundle(tmp, meta, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_bundle(out)


def seal_bundle(tmp: Path, meta: Mapping[str, Any], final: Path) -> None:
    """Write ``bundle.json`` (``meta`` + the sha256 of every file in ``tmp``), then move ``tmp`` to ``final``."""
    full = {**meta, "files": {f.name: _sha256(f) for f in sorted(tmp.iterdir())}}
    (tmp / "bundle.json").write_text(json.dumps(full, indent=2, default=str), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def read_manifest(path: Path, *, fmt: str, version: Any, allowed: Iterable[str], what: str, hint: str,
                  recreate: str) -> dict[str, Any]:
    """The checked ``bundle.json`` of a bundle folder: its format and version, no file it does not
    list or know (``allowed``), every listed file present with its recorded sha256."""
    meta_path = path / "bundle.json"
    if not meta_path.is_file():
        raise ScdmError(f"{str(path)!r} is not a {what} (no bundle.json)", hint)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ScdmError(f"the {what}'s bundle.json cannot be read ({e})", recreate) from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise ScdmError(f"{str(meta_path)!r} is not a {fmt} file", hint)
    if meta.get("format_version") != version:
        raise ScdmError(f"the {what} has format version {meta.get('format_version')!r}; this scdm reads {version}",
                        recreate)
    files = meta.get("files", {})
    extra = sorted(p.name for p in path.iterdir() if p.name != "bundle.json" and p.name not in files)
    unknown = sorted(set(files) - set(allowed))
    if extra or unknown:
        raise ScdmError(f"the {what} holds files it does not list or know: {extra + unknown}", recreate)
    for name, digest in files.items():
        if not (path / name).is_file() or _sha256(path / name) != digest:
            raise ScdmError(f"the {what}'s {name} is missing or changed since it was saved (sha256 differs)", recreate)
    return meta


def load_bundle(path: str | Path) -> Bundle:
    """Read a bundle folder (checked: format, file list, sha256 of every file; nothing unpickled)."""
    path = Path(path)
    meta = read_manifest(path, fmt=FORMAT, version=FORMAT_VERSION, allowed=FILES, what="classifier bundle",
                         hint="pass the folder written by `scdm-eval fit --out BUNDLE`",
                         recreate="a bundle holds only bundle.json, *.safetensors and model.ubj: re-create it with "
                                  "`scdm-eval fit`")
    name = meta.get("classifier")
    check_classifiers([name])
    clf = make_classifier(name, seed=int(meta.get("seed", 0)), **meta.get("settings", {}))
    clf = _restore(name, clf, path, meta.get("state", {}), int(meta["provenance"]["dim"]))
    return Bundle(path, meta, clf)


def _leaves(want: Any, got: Any, key: str) -> list[str]:
    """``key.sub: bundle X, embedding Y`` for each differing leaf of two JSON values."""
    if isinstance(want, dict) and isinstance(got, dict):
        return [d for k in sorted(set(want) | set(got), key=str)
                for d in _leaves(want.get(k), got.get(k), f"{key}.{k}") if _norm(want.get(k)) != _norm(got.get(k))]
    return [f"{key}: bundle {str(want)[:60]!r}, embedding {str(got)[:60]!r}"]


def _check_provenance(bundle: Bundle, rec, where: str) -> None:
    want = {k: bundle.meta["provenance"].get(k) for k in IDENTITY}
    got = _identity(rec)
    diff = [k for k in IDENTITY if _norm(got[k]) != _norm(want[k])]
    if diff:
        shown = "; ".join(d for k in diff for d in _leaves(want[k], got[k], k)[:4])
        fit_note = (" (pca/hvg fit their coordinates on the store: embed new cells into the training store, "
                    "--store TRAINING_STORE, to reuse that fit)" if want["model"] in ("pca", "hvg") else "")
        raise ScdmError(f"{where} was not computed like the embeddings the bundle was trained on ({shown})",
                        f"embed the cells with the bundle's model, checkpoint and options{fit_note}, "
                        "or fit a bundle on these embeddings")


def _embed_input(bundle: Bundle, input: Path, checkpoint: Path | None, store: Path | None, dataset: str | None,
                 tmp: str, *, trust_checkpoint: bool = False) -> tuple[Path, str]:
    """Embed ``input`` with the bundle's model and options through ``scdm_embed.extract``."""
    import scdm_embed as se
    from scdm_embed.inputs import read_input
    from scdm_embed.models import get_adapter

    prov = bundle.meta["provenance"]
    model = prov["model"]
    if checkpoint is None and prov.get("checkpoint"):
        checkpoint = Path(prov["checkpoint"])
    target = store if store is not None else Path(tmp) / "embed.zarr"
    name = dataset or Path(input).stem
    adapter = get_adapter(model)
    data = read_input(input, require_labels=False, require_counts=bool(getattr(adapter, "needs_counts", True)),
                      allow_single_class=True)
    try:
        opts = {k: v for k, v in (prov.get("options") or {}).items() if v is not None}
        se.extract(data, model=model, store=target, dataset=name, checkpoint=checkpoint, model_options=opts,
                   progress=False, trust_checkpoint=trust_checkpoint)
    finally:
        data.close()
    return target, name


def predict(
    bundle: str | Path | Bundle,
    store: str | Path | EmbeddingStore | None = None,
    *,
    dataset: str | None = None,
    input: str | Path | None = None,
    checkpoint: str | Path | None = None,
    trust_checkpoint: bool = False,
    out: str | Path | None = None,
) -> pd.DataFrame:
    """Per-cell P(sensitive) of the bundle's classifier on a store dataset, or on raw cells.

    ``store`` + ``dataset``: the dataset's embeddings of the bundle's model. ``input`` (an
    .h5ad, with ``checkpoint``; default: the bundle's recorded checkpoint): embedded first
    with the bundle's model and options into ``store`` when given (needed for pca/hvg, which
    reuse the store's fit), else a temporary store. An embedding whose provenance differs
    from the bundle's is refused. Returns :data:`PREDICT_COLUMNS` (``y_true`` -1 when the
    cells are unlabelled); with ``out``, also writes it (``.parquet``, or ``.csv``).
    ``trust_checkpoint`` unpickles the checkpoint's files in full when a model is loaded.
    A LoRA fit folder of ``scdm-eval lora`` (:mod:`scdm_eval._lora_bundle`) embeds raw cells with
    its base checkpoint + adapter: ``input``, or the raw input a store records for ``dataset``
    (:func:`~scdm_eval._lora_bundle.predict_lora`).
    """
    from ._splits import open_store

    if not isinstance(bundle, Bundle):
        from ._lora_bundle import is_lora_bundle, predict_lora

        if is_lora_bundle(bundle):  # base model + LoRA adapter + head: embeds raw cells itself
            return predict_lora(bundle, input=input, store=store, dataset=dataset, checkpoint=checkpoint,
                                trust_checkpoint=trust_checkpoint, out=out)
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    check_predict_out(out)
    if input is None and trust_checkpoint:
        raise ScdmError("--trust-checkpoint is only used with --input (to load the model that embeds raw cells)",
                        "drop --trust-checkpoint, or add --input")
    if input is None and (store is None or dataset is None):
        raise ScdmError("nothing to predict: give --store and --dataset, or --input CELLS.h5ad",
                        "e.g. scdm-eval predict --bundle B --store S --dataset D --out preds.parquet")
    if input is None and checkpoint is not None:
        raise ScdmError("--checkpoint is only used with --input (to embed raw cells)", "drop --checkpoint, or add --input")
    with tempfile.TemporaryDirectory(prefix="scdm-predict-") as tmp:
        if input is not None:
            if not Path(input).is_file():
                raise ScdmError(f"--input {str(input)!r} does not exist", "pass an .h5ad file")
            spath = None if store is None else (store.path if isinstance(store, EmbeddingStore) else Path(store))
            spath, dataset = _embed_input(b, Path(input), None if checkpoint is None else Path(checkpoint), spath,
                                          dataset, tmp, trust_checkpoint=trust_checkpoint)
            st = EmbeddingStore(spath)
        else:
            st = open_store(store)
            check_dataset(st, dataset)
        model = b.model
        rec = _record(st, model, dataset)
        _check_provenance(b, rec, f"the {model} embedding of dataset {dataset!r} in {str(st.path)!r}")
        X, cells = st.load(model, datasets=[dataset])
        if not np.isfinite(X).all():
            raise StoreError(f"the {model} embedding of {dataset!r} holds non-finite values",
                             f"re-extract it with `scdm-embed extract ... --model {model} --overwrite`")
        p = b.predict_proba(X)
    res = predictions_frame(cells, dataset, model, b.meta["classifier"], p)
    if out is not None:
        write_predictions(res, out)
    return res


def check_dataset(st: EmbeddingStore, dataset: str) -> None:
    """Refuse a dataset the store does not hold."""
    if dataset not in st.datasets():
        raise StoreError(f"dataset {dataset!r} is not in {str(st.path)!r} (has: {', '.join(st.datasets())})",
                         "check --dataset")


def check_predict_out(out: str | Path | None) -> None:
    """Refuse a predictions path that is neither .parquet nor .csv."""
    if out is not None and Path(out).suffix not in (".parquet", ".csv"):
        raise ScdmError(f"--out {str(out)!r} must end in .parquet or .csv", "pass e.g. --out preds.parquet")


def predictions_frame(cells: pd.DataFrame, dataset: str, model: str, classifier: str, p: np.ndarray) -> pd.DataFrame:
    """:data:`PREDICT_COLUMNS` of ``cells`` (index ``dataset/cell_id``) with P(sensitive) ``p``."""
    n = len(cells)

    def col(c: str) -> pd.Categorical:
        return pd.Categorical(cells[c].astype(str).to_numpy()) if c in cells.columns else pd.Categorical([None] * n)

    y = cells["label"].to_numpy().astype(np.int8) if "label" in cells.columns else np.full(n, -1, np.int8)
    return pd.DataFrame({
        "cell_id": [k[len(dataset) + 1:] for k in cells.index], "dataset": pd.Categorical([dataset] * n),
        "study": col("study"), "sample": col("sample"), "model": pd.Categorical([model] * n),
        "classifier": pd.Categorical([classifier] * n), "y_true": y, "p_sensitive": p,
        "predicted": pd.Categorical(np.where(p >= 0.5, "sensitive", "resistant"), categories=["resistant", "sensitive"]),
    }, columns=list(PREDICT_COLUMNS))


def write_predictions(res: pd.DataFrame, out: str | Path) -> Path:
    """Write a predictions table as ``.csv`` or ``.parquet`` (by the suffix of ``out``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res.to_csv(out, index=False) if out.suffix == ".csv" else res.to_parquet(out, index=False)
    return out


__all__ = ["FILES", "FORMAT", "IDENTITY", "PREDICT_COLUMNS", "Bundle", "fit_classifier", "load_bundle", "predict",
           "provenance_of"]
