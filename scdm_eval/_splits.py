"""Honest, reusable train/test partitions, computed once and saved in the store.

Both schemes partition the cells of each category: every evaluated cell is a test cell in
exactly one partition (a k-fold fold, or the fold of its held-out study) and a training cell
in the category's other partitions. So the split table has **one row per cell**:

========== ===============================================================================
index      cell key ``"<dataset>/<cell_id>"`` (the store's cell index, in store order)
category   the value of the ``by`` column (``"all"`` for ``by="all"``)
fold       the partition in which this cell is tested; ``-1`` = not evaluated (skipped)
label      1 sensitive / 0 resistant (what the folds were stratified on)
========== ===============================================================================

Partition ``(category, fold)`` tests the category's cells with that fold and trains on its
other evaluated cells. The per-partition description (name, train/test sizes and class
counts, skip reason) and the parameters live in the split's attributes. A split is named by
its parameters plus a hash of everything it depends on (cell index, labels, category, group
and study columns), so every model, classifier and later stage reuses identical partitions
and a changed store never reuses stale ones.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from scdm_embed.errors import ScdmError, StoreError
from scdm_embed.store import EmbeddingStore, SplitRecord, shared_strings

from ._choices import BY_CHOICES, SCHEMES, By, Scheme

_NOT_META = ("row", "label", "response")
_CLASS = {1: "sensitive", 0: "resistant"}
#: ends the skip reason of a category that holds one class only
_ONE_CLASS = "a classifier cannot be trained on one class"
#: ``group_key`` value that asks for cell-level folds explicitly (``--group-key none``)
CELL_LEVEL = "none"


class LeakageWarning(UserWarning):
    """Cell-level folds would put cells of one sample (or condition, batch) on both sides."""


class SplitWarning(UserWarning):
    """A category or partition could not be evaluated and was skipped (with a recorded reason)."""


@dataclass(frozen=True)
class Partition:
    """One train/test partition; ``train``/``test`` are row positions into ``Splits.table``."""

    category: str
    fold: int
    name: str
    train: np.ndarray
    test: np.ndarray


@dataclass
class Splits:
    """A split table (one row per cell), its partitions and its parameters."""

    name: str
    table: pd.DataFrame
    partitions: pd.DataFrame
    params: dict[str, Any] = field(default_factory=dict)
    #: False for splits computed by ``make_splits(..., save=False)`` and not saved yet
    saved: bool = True

    @property
    def skipped(self) -> pd.DataFrame:
        """Categories / partitions not evaluated, with their reasons."""
        return self.partitions[self.partitions["skipped"] != ""].reset_index(drop=True)

    def __iter__(self) -> Iterator[Partition]:
        """The evaluable partitions, in (category, fold) order."""
        cat = self.table["category"].to_numpy()
        fold = self.table["fold"].to_numpy()
        for row in self.partitions.itertuples(index=False):
            if row.skipped:
                continue
            if self.params.get("scheme") == "transfer":  # train: the category's TRAIN_FOLD cells, every time
                yield Partition(row.category, int(row.fold), row.name, np.flatnonzero((cat == row.category) & (fold == -2)),
                                np.flatnonzero((cat == row.category) & (fold == row.fold)))
                continue
            members = np.flatnonzero((cat == row.category) & (fold >= 0))
            test = members[fold[members] == row.fold]
            yield Partition(row.category, int(row.fold), row.name, members[fold[members] != row.fold], test)

    def __len__(self) -> int:
        return int((self.partitions["skipped"] == "").sum())

    def __repr__(self) -> str:
        return (f"Splits({self.name!r}: {len(self.table)} cells, {len(self)} partitions, "
                f"{len(self.skipped)} skipped)")


# -- store helpers --------------------------------------------------------------------------
def open_store(store: str | Path | EmbeddingStore, *, write: bool = False) -> EmbeddingStore:
    """An :class:`EmbeddingStore` from a path or store, reopened for writing when asked."""
    if isinstance(store, EmbeddingStore):
        return EmbeddingStore(store.path, mode="a") if write and store.mode == "r" else store
    st = EmbeddingStore(store)  # a clear StoreError when there is no store
    return EmbeddingStore(store, mode="a") if write else st


def _cells(st: EmbeddingStore, datasets: Sequence[str] | None) -> pd.DataFrame:
    have = st.datasets()
    if not have:
        raise StoreError(f"the store {str(st.path)!r} holds no datasets", "run `scdm-embed extract` into it first")
    if datasets is not None:
        bad = [d for d in datasets if d not in have]
        if bad:
            raise StoreError(f"dataset(s) {bad} are not in the store (has: {have})", "check the dataset names")
    cells = st.cells(sorted(datasets) if datasets is not None else have)
    if not cells.index.is_unique:
        raise StoreError("the store's cell keys are not unique", "re-extract the datasets with unique cell ids")
    return cells


# -- validation -----------------------------------------------------------------------------
def labels_per_sample(cells: pd.DataFrame) -> bool:
    """True when the cells have a ``sample`` column with >= 2 samples and each sample holds one label."""
    if "sample" not in cells.columns:
        return False
    s = cells["sample"].astype(str).to_numpy()
    return pd.unique(s).size >= 2 and int(cells["label"].groupby(s).nunique().max()) == 1


def resolve_group_key(cells: pd.DataFrame, scheme: str, group_key: str | None) -> str | None:
    """The column the folds are grouped by (``None``: cell-level folds).

    ``group_key=None`` (the default) groups pooled folds by ``sample`` when the labels are
    constant within samples (cell-level folds would then score sample identity);
    ``"none"`` asks for cell-level folds explicitly; any other value is that column.
    """
    if group_key == CELL_LEVEL:
        return None
    if group_key is not None:
        return group_key
    return "sample" if scheme == "pooled" and labels_per_sample(cells) else None


def _check_params(cells: pd.DataFrame, scheme: str, by: str, folds: int, group_key: str | None) -> str:
    if scheme not in SCHEMES:
        raise ScdmError(f"unknown scheme {scheme!r}", f"use one of {', '.join(SCHEMES)}")
    meta = [c for c in cells.columns if c not in _NOT_META]
    if by != "all":
        if by not in BY_CHOICES:
            raise ScdmError(f"unknown --by {by!r}", f"use one of {', '.join(BY_CHOICES)}")
        if by not in cells.columns:
            raise ScdmError(f"--by {by}: the cell table has no {by!r} column (it has: {', '.join(meta)})",
                            f"pick another --by, or re-extract with --{by.replace('_', '-')}-key COLUMN")
    if scheme == "pooled" and (not isinstance(folds, (int, np.integer)) or folds < 2):
        raise ScdmError(f"--folds must be an integer >= 2 (got {folds!r})", "use e.g. --folds 5 or --folds 10")
    if group_key is not None and (group_key not in cells.columns or group_key in _NOT_META):
        raise ScdmError(f"group key {group_key!r} is not a metadata column (the cell table has: {', '.join(meta)})",
                        "pass --group-key with one of those columns (usually sample), or leave it out")
    return "study" if "study" in cells.columns else "dataset"


def _hash(cells: pd.DataFrame, cols: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update("\0".join(cells.index).encode())
    h.update(cells["label"].to_numpy().astype(np.int8).tobytes())
    for c in cols:
        h.update(f"\1{c}\1".encode())
        h.update("\0".join(cells[c].astype(str)).encode())
    return h.hexdigest()


def split_name(scheme: str, by: str, folds: int, group_key: str | None, seed: int, study_key: str, cell_hash: str) -> str:
    if scheme == "cross":
        return f"cross-{by}-{study_key}-{cell_hash[:12]}"
    return f"pooled-{by}-k{folds}-{group_key or 'cells'}-s{seed}-{cell_hash[:12]}"


def _counts(y: np.ndarray) -> tuple[int, int]:
    n1 = int(np.sum(y == 1))
    return n1, int(len(y) - n1)


def _partition_row(category: str, fold: int, name: str, y: np.ndarray, train: np.ndarray, test: np.ndarray,
                   skipped: str = "") -> dict[str, Any]:
    tr1, tr0 = _counts(y[train])
    te1, te0 = _counts(y[test])
    return {"category": category, "fold": int(fold), "name": name, "n_train": int(len(train)), "n_test": int(len(test)),
            "train_sensitive": tr1, "train_resistant": tr0, "test_sensitive": te1, "test_resistant": te0,
            "skipped": skipped}


def _skip_category(category: str, reason: str) -> dict[str, Any]:
    return {"category": category, "fold": -1, "name": "", "n_train": 0, "n_test": 0, "train_sensitive": 0,
            "train_resistant": 0, "test_sensitive": 0, "test_resistant": 0, "skipped": reason}


# -- the two schemes ------------------------------------------------------------------------
def _fewer(n: int) -> str:
    return f"use --folds {n} or fewer" if n >= 2 else "no k-fold split can hold it out and train on it"


def _pooled(category: str, y: np.ndarray, groups: np.ndarray | None, folds: int, seed: int,
            group_key: str | None) -> tuple[np.ndarray | None, list[dict[str, Any]]]:
    n1, n0 = _counts(y)
    if n1 == 0 or n0 == 0:
        return None, [_skip_category(category, f"only {_CLASS[int(n1 > 0)]} cells ({len(y)}); {_ONE_CLASS}")]
    if groups is not None:
        per_class = {c: int(pd.unique(groups[y == c]).size) for c in (1, 0)}
        low = min(per_class, key=per_class.get)
        if per_class[low] < folds:
            return None, [_skip_category(category, f"only {per_class[low]} {group_key} group(s) hold {_CLASS[low]} cells, "
                                                   f"fewer than {folds} folds ({_fewer(per_class[low])})")]
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        parts = splitter.split(np.zeros(len(y)), y, groups)
    else:
        low = 1 if n1 < n0 else 0
        if min(n1, n0) < folds:
            return None, [_skip_category(category, f"only {min(n1, n0)} {_CLASS[low]} cells, fewer than {folds} folds "
                                                   f"({_fewer(min(n1, n0))})")]
        parts = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)
    fold = np.full(len(y), -1, dtype=np.int16)
    for f, (_, test) in enumerate(parts):
        fold[test] = f
    rows = []
    for f in range(folds):
        test = np.flatnonzero(fold == f)
        train = np.flatnonzero(fold != f)
        tr1, tr0 = _counts(y[train])
        if len(test) == 0 or tr1 == 0 or tr0 == 0:
            raise ScdmError(f"category {category!r}: fold {f} would have "
                            + ("no test cells" if len(test) == 0 else f"only {_CLASS[int(tr1 > 0)]} cells in training"),
                            "use a smaller --folds, or a coarser --by")
        rows.append(_partition_row(category, f, f"fold{f}", y, train, test))
    return fold, rows


def _cross(category: str, y: np.ndarray, study: np.ndarray) -> tuple[np.ndarray | None, list[dict[str, Any]]]:
    studies = sorted(pd.unique(study))
    if len(studies) < 2:
        return None, [_skip_category(category, f"one study only ({studies[0]}); leave-one-study-out needs >= 2")]
    n1, n0 = _counts(y)
    if n1 == 0 or n0 == 0:
        return None, [_skip_category(category, f"only {_CLASS[int(n1 > 0)]} cells ({len(y)}); {_ONE_CLASS}")]
    fold = np.full(len(y), -1, dtype=np.int16)
    rows = []
    for f, s in enumerate(studies):
        fold[study == s] = f
        test = np.flatnonzero(study == s)
        train = np.flatnonzero(study != s)
        tr1, tr0 = _counts(y[train])
        reason = "" if tr1 and tr0 else f"the other studies hold only {_CLASS[int(tr1 > 0)]} cells"
        rows.append(_partition_row(category, f, str(s), y, train, test, reason))
    return fold, rows


def _leakage(cells: pd.DataFrame, category: np.ndarray, by: str) -> bool:
    """Warn about metadata columns perfectly confounded with the label (cell-level folds only).

    Returns whether the folds are leak-prone: some metadata column with >= 2 values (sample,
    condition, dataset, ...) holds one label per value in an evaluated category.
    """
    y = cells["label"].to_numpy()
    hits: dict[str, list[str]] = {}
    cols = [c for c in cells.columns if c not in _NOT_META and c != by]
    for cat in pd.unique(category):
        m = category == cat
        if np.unique(y[m]).size < 2:
            continue
        sub = cells.loc[m, cols]
        for c in cols:
            v = sub[c].astype(str)
            if v.nunique() >= 2 and (pd.Series(y[m], index=v.index).groupby(v.to_numpy()).nunique() == 1).all():
                hits.setdefault(c, []).append(str(cat))
    for c, cats in hits.items():
        where = "" if cats == ["all"] else f" in {', '.join(cats)}"
        warnings.warn(
            f"the label is perfectly confounded with {c!r}{where}: every {c} is all-sensitive or all-resistant. "
            f"Cell-level folds put cells of one {c} in training and test, so scores can reflect recognising each "
            f"{c} rather than drug response. Fix: pass group_key={c!r} (--group-key {c}) or use scheme='cross'.",
            LeakageWarning, stacklevel=4)
    if "sample" in cells.columns and "sample" not in hits:
        warnings.warn("the cells have a 'sample' column but no group key was given: cells of one sample sit in "
                      "training and test. Fix: pass group_key='sample' (--group-key sample).", LeakageWarning, stacklevel=4)
    elif "sample" not in cells.columns and not hits:
        warnings.warn("the cells have no 'sample' column, so cell-level folds cannot keep samples apart: if the labels "
                      "were assigned per sample or condition (e.g. treated vs control), scores may reflect sample "
                      "identity. Fix: extract with --sample-key COLUMN and pass --group-key sample, or use "
                      "scheme='cross'.", LeakageWarning, stacklevel=4)
    return bool(hits)


# -- transfer: fit on one selection of cells, predict each dataset of another -----------------------
#: ``fold`` of a transfer split's training cells: in the training set of every partition of their category
TRAIN_FOLD = -2
#: layout of a saved split's fold codes: 2 added TRAIN_FOLD (transfer); a newer layout is refused
SPLIT_LAYOUT = 2


def select_cells(cells: pd.DataFrame, items: Sequence[str], what: str) -> np.ndarray:
    """Mask of the cells a selector picks: dataset names and/or ``COLUMN=VALUE`` (union of the items)."""
    if not items:
        raise ScdmError(f"--scheme transfer needs --{what}", f"pass --{what} DATASET or --{what} COLUMN=VALUE "
                        "(repeatable), e.g. --train collection=primary --test collection=external")
    mask = np.zeros(len(cells), dtype=bool)
    datasets = set(cells["dataset"].astype(str))
    for item in items:
        col, eq, value = str(item).partition("=")
        if eq:
            col = col.strip()
            if col not in cells.columns or col in _NOT_META:
                meta = [c for c in cells.columns if c not in _NOT_META]
                raise ScdmError(f"--{what} {item!r}: the cell table has no column {col!r} (it has: {', '.join(meta)})",
                                f"write --{what} COLUMN=VALUE with one of those columns, or a dataset name")
            hit = cells[col].astype(str).to_numpy() == value.strip()
        else:
            if item not in datasets:
                raise ScdmError(f"--{what} {item!r} is neither a dataset of the store ({', '.join(sorted(datasets))}) "
                                "nor COLUMN=VALUE", f"pass --{what} with a dataset name or COLUMN=VALUE")
            hit = cells["dataset"].astype(str).to_numpy() == item
        if not hit.any():
            raise ScdmError(f"--{what} {item!r} selects no cell", f"check the value (--{what} COLUMN=VALUE)")
        mask |= hit
    return mask


def _check_disjoint(cells: pd.DataFrame, train: np.ndarray, test: np.ndarray) -> None:
    both = train & test
    if both.any():
        raise ScdmError(f"--train and --test both select {int(both.sum())} cells (e.g. {cells.index[both][0]!r})",
                        "make the selectors disjoint (e.g. --train collection=primary --test collection=external)")
    for col in ("study", "sample"):
        if col in cells.columns:
            v = cells[col].astype(str).to_numpy()
            shared = sorted(set(v[train]) & set(v[test]))
            if shared:
                raise ScdmError(f"--train and --test share {len(shared)} {col}(s) (e.g. {shared[0]!r}): a transfer "
                                f"score must come from {col}s the classifier never saw",
                                f"select whole {col}s on one side only (e.g. by dataset or by a {col}-level column)")


def transfer_splits(cells: pd.DataFrame, *, train: Sequence[str], test: Sequence[str], by: str = "all",
                    strict: bool = False) -> Splits:
    """Transfer splits: per category, train on every ``train`` cell, test each ``test`` dataset.

    Partition ``(category, f)`` tests the category's cells of the ``f``-th test dataset (sorted
    names; the partition is named by it) with a classifier fitted on all of the category's training
    cells. Refuses selectors that overlap or share a sample or a study.
    """
    study_key = _check_params(cells, "transfer", by, 2, None)
    tr, te = select_cells(cells, train, "train"), select_cells(cells, test, "test")
    _check_disjoint(cells, tr, te)
    cols = [c for c in dict.fromkeys([by, study_key, "sample"]) if c != "all" and c in cells.columns]
    cell_hash = _hash(cells, cols)
    sel = hashlib.sha256("\0".join(["train", *map(str, train), "test", *map(str, test)]).encode()).hexdigest()[:8]
    name = f"transfer-{by}-{sel}-{cell_hash[:12]}"
    y = cells["label"].to_numpy().astype(np.int8)
    category = _categories(cells, by)
    ds = cells["dataset"].astype(str).to_numpy()
    test_sets = sorted(pd.unique(ds[te]))
    fold = np.full(len(cells), -1, dtype=np.int16)
    rows: list[dict[str, Any]] = []
    for cat in sorted(pd.unique(category[tr | te])):
        in_cat = category == cat
        tr_idx = np.flatnonzero(in_cat & tr)
        n1, n0 = _counts(y[tr_idx])
        if n1 == 0 or n0 == 0:
            why = (f"no training cells ({int((in_cat & te).sum())} test cells)" if not len(tr_idx) else
                   f"the training cells are all {_CLASS[int(n1 > 0)]} ({len(tr_idx)}); {_ONE_CLASS}")
            rows.append(_skip_category(cat, why))
            continue
        fold[tr_idx] = TRAIN_FOLD
        for f, d in enumerate(test_sets):
            te_idx = np.flatnonzero(in_cat & te & (ds == d))
            if len(te_idx):
                fold[te_idx] = f
                rows.append(_partition_row(cat, f, d, y, tr_idx, te_idx))
    parts = pd.DataFrame(rows)
    _check_skips(parts, "transfer", by, strict)
    params = {"scheme": "transfer", "by": by, "folds": None, "group_key": None, "seed": None, "study_key": study_key,
              "cell_hash": cell_hash, "n_cells": int(len(cells)), "datasets": sorted(pd.unique(ds).tolist()),
              "leak_prone": False, "train": [str(t) for t in train], "test": [str(t) for t in test],
              "test_datasets": test_sets, "layout": SPLIT_LAYOUT}
    table = pd.DataFrame({"category": shared_strings(category), "fold": fold, "label": y},
                         index=pd.Index(cells.index.astype(str), name="cell"))
    return Splits(name, table, parts, params)


# -- public API -----------------------------------------------------------------------------
def _identify(cells: pd.DataFrame, scheme: str, by: str, folds: int, group_key: str | None,
              seed: int) -> tuple[str, str, str]:
    """(study key, cell hash, split name) for these cells and parameters."""
    study_key = _check_params(cells, scheme, by, folds, group_key)
    cols = [c for c in dict.fromkeys([by, group_key, study_key]) if c not in (None, "all")]
    cell_hash = _hash(cells, cols)
    return study_key, cell_hash, split_name(scheme, by, folds, group_key, seed, study_key, cell_hash)


def _categories(cells: pd.DataFrame, by: str) -> np.ndarray:
    if by == "all":
        return np.full(len(cells), "all", dtype=object)
    return cells[by].astype(str).to_numpy(dtype=object)


def _check_skips(parts: pd.DataFrame, scheme: str, by: str, strict: bool) -> None:
    bad = parts[parts["skipped"] != ""]
    if not len(bad):
        return
    what = "category" if scheme == "pooled" else "category / held-out study"
    fix = _skip_fix(bad, scheme, by)
    listing = "; ".join(f"{r.category}{'' if r.fold < 0 else '/' + r.name}: {r.skipped}" for r in bad.itertuples())
    if len(bad) == len(parts):
        raise ScdmError(f"no {what} can be evaluated with scheme={scheme}, by={by}: {listing}", fix)
    if strict:
        raise ScdmError(f"{len(bad)} {what}(s) cannot be evaluated with scheme={scheme}, by={by}: {listing}", fix)
    warnings.warn(f"skipping {len(bad)} {what}(s) (reasons are recorded in the results): {listing}",
                  SplitWarning, stacklevel=3)


def _skip_fix(bad: pd.DataFrame, scheme: str, by: str) -> str:
    """Advice that can help with these skipped categories / partitions."""
    one_class = [str(r.category) for r in bad.itertuples() if r.skipped.endswith(_ONE_CLASS)]
    fixes = []
    if one_class and by == "all":
        fixes.append("every cell of the store's datasets is of one class, and no split can change that: extract a "
                     "dataset that holds the other class into the store (`scdm-embed extract ... --store PATH`), or "
                     "check the labels given at extraction (--response-key / --sensitive / --resistant)")
    elif one_class:
        shown = ", ".join(repr(c) for c in one_class[:5]) + (f" (+{len(one_class) - 5} more)" if len(one_class) > 5 else "")
        fixes.append(f"--by {by} categor{'y' if len(one_class) == 1 else 'ies'} {shown} "
                     f"hold{'s' if len(one_class) == 1 else ''} one class only: pool them with cells of the "
                     "other class through a coarser --by (e.g. --by all), or extract a dataset that holds the "
                     "other class for them")
    if len(bad) > len(one_class):
        fixes.append("use a smaller --folds, a coarser --by, or a --group-key with more groups (--group-key none: "
                     "cell-level folds, which score sample identity too and are flagged leak_prone)" if scheme == "pooled"
                     else "use a --by whose categories hold >= 2 studies with both classes, or --scheme pooled")
    return "; ".join(fixes)


def compute_splits(
    cells: pd.DataFrame,
    *,
    scheme: Literal["pooled", "cross"] = "pooled",
    by: str = "all",
    folds: int = 10,
    group_key: str | None = None,
    seed: int = 0,
    strict: bool = False,
) -> Splits:
    """Compute (without saving) the splits of a cell table (see :func:`make_splits`)."""
    group_key = resolve_group_key(cells, scheme, group_key)
    study_key, cell_hash, name = _identify(cells, scheme, by, folds, group_key, seed)
    y = cells["label"].to_numpy().astype(np.int8)
    category = _categories(cells, by)
    leak_prone = scheme == "pooled" and group_key is None and _leakage(cells, category, by)
    fold = np.full(len(cells), -1, dtype=np.int16)
    rows: list[dict[str, Any]] = []
    groups = cells[group_key].astype(str).to_numpy(dtype=object) if group_key else None
    study = cells[study_key].astype(str).to_numpy(dtype=object)
    if scheme == "cross" and groups is not None:
        spans = pd.Series(study).groupby(groups).nunique()
        if (spans > 1).any():
            raise ScdmError(f"{int((spans > 1).sum())} {group_key} group(s) span several {study_key}s (e.g. "
                            f"{spans[spans > 1].index[0]!r}), so leaving one {study_key} out would split them",
                            f"give each {group_key} a {study_key}-specific id, or drop --group-key for --scheme cross")
    for cat in sorted(pd.unique(category)):
        idx = np.flatnonzero(category == cat)
        if scheme == "pooled":
            f, r = _pooled(cat, y[idx], None if groups is None else groups[idx], folds, seed, group_key)
        else:
            f, r = _cross(cat, y[idx], study[idx])
        if f is not None:
            fold[idx] = f
        rows += r
    parts = pd.DataFrame(rows)
    _check_skips(parts, scheme, by, strict)
    params = {"scheme": scheme, "by": by, "folds": int(folds) if scheme == "pooled" else None, "group_key": group_key,
              "seed": int(seed) if scheme == "pooled" else None, "study_key": study_key, "cell_hash": cell_hash,
              "n_cells": int(len(cells)), "datasets": sorted(pd.unique(cells["dataset"]).tolist()),
              "leak_prone": bool(leak_prone)}
    table = pd.DataFrame({"category": shared_strings(category), "fold": fold, "label": y},
                         index=pd.Index(cells.index.astype(str), name="cell"))
    return Splits(name, table, parts, params)


def make_splits(
    store: str | Path | EmbeddingStore,
    *,
    scheme: Literal["pooled", "cross"] = "pooled",
    by: str = "all",
    folds: int = 10,
    group_key: str | None = None,
    seed: int = 0,
    datasets: Sequence[str] | None = None,
    strict: bool = False,
    overwrite: bool = False,
    save: bool = True,
    train: Sequence[str] | None = None,
    test: Sequence[str] | None = None,
) -> Splits:
    """The splits of the store's cells: loaded when saved before, else computed and saved.

    ``scheme="pooled"``: stratified ``folds``-fold CV inside each category (``by="all"``: one
    category; otherwise one per value of the ``by`` column); with ``group_key`` (e.g.
    ``"sample"``) stratified *group* folds, so a group never sits on both sides. By default
    (``group_key=None``) pooled folds are grouped by ``sample`` when the cells have that column
    and each sample holds one label; ``group_key="none"`` asks for cell-level folds, and
    cell-level folds on label-confounded cells set ``params["leak_prone"]`` (a column of the results).
    ``scheme="cross"``: leave-one-study-out inside each category (the ``study`` column, or
    ``dataset`` when there is none). Splits cover every cell of ``datasets`` (default: all
    datasets in the store), so all models are compared on the same partitions.

    A category that cannot be evaluated (one class; too few cells or groups of a class for
    ``folds``; one study) is skipped with a recorded reason and a :class:`SplitWarning`
    (an :class:`~scdm_embed.ScdmError` with ``strict`` or when nothing is left). Without a
    group key, a :class:`LeakageWarning` flags metadata columns confounded with the label.
    ``save=False`` computes new splits without saving them (``splits.saved`` is then False): a
    caller that must validate more first (a run) saves them with :func:`save_splits` once that
    succeeded, so a failing run leaves the store as it was.
    ``scheme="transfer"``: see :func:`transfer_splits` (``train`` / ``test`` selectors).
    """
    st = open_store(store)
    cells = _cells(st, datasets)
    if scheme == "transfer":
        splits = transfer_splits(cells, train=train or (), test=test or (), by=by, strict=strict)
        held = None if overwrite else _read(st, splits.name, cells)
        if held is not None:
            return held
        splits.saved = False
        if save:
            save_splits(st, splits)
        return splits
    if train or test:
        raise ScdmError("--train / --test select the cells of --scheme transfer", "add --scheme transfer, or drop them")
    if not overwrite:
        resolved = resolve_group_key(cells, scheme, group_key)
        _, _, name = _identify(cells, scheme, by, folds, resolved, seed)
        held = _read(st, name, cells)
        if held is not None:
            leak = scheme == "pooled" and resolved is None and _leakage(cells, _categories(cells, by), by)
            held.params["leak_prone"] = bool(leak)  # splits saved before 0.3 lack it
            _check_skips(held.partitions, scheme, by, strict)
            return held
    splits = compute_splits(cells, scheme=scheme, by=by, folds=folds, group_key=group_key, seed=seed, strict=strict)
    splits.saved = False
    if save:
        save_splits(st, splits)
    return splits


def save_splits(store: str | Path | EmbeddingStore, splits: Splits) -> None:
    """Save ``splits`` into the store (a :class:`SplitWarning` if the store cannot be written)."""
    st = open_store(store)
    try:
        record = SplitRecord.from_attrs({**splits.params, "partitions": splits.partitions.to_dict("records")},
                                        f"split {splits.name}")
        open_store(st, write=True).put_splits(splits.name, splits.table, record)
        splits.saved = True
    except OSError as e:
        warnings.warn(f"could not save the splits into {str(st.path)!r} ({e}); they were computed in memory",
                      SplitWarning, stacklevel=3)


def load_splits(
    store: str | Path | EmbeddingStore,
    name: str | None = None,
    *,
    scheme: Literal["pooled", "cross"] = "pooled",
    by: str = "all",
    folds: int = 10,
    group_key: str | None = None,
    seed: int = 0,
    datasets: Sequence[str] | None = None,
) -> Splits | None:
    """Saved splits by ``name``, or by parameters for the store's current cells; ``None`` if not saved."""
    st = open_store(store)
    if name is not None:
        got = st.get_splits(name)
        return None if got is None else _from_saved(name, *got)
    cells = _cells(st, datasets)
    return _read(st, _identify(cells, scheme, by, folds, resolve_group_key(cells, scheme, group_key), seed)[2], cells)


def _from_saved(name: str, table: pd.DataFrame, record: SplitRecord) -> Splits:
    params = record.params()
    if int(params.get("layout") or 1) > SPLIT_LAYOUT:
        raise StoreError(f"split {name!r} was saved with fold layout {params['layout']}, newer than this scdm reads "
                         f"({SPLIT_LAYOUT})", "upgrade scdm, or remake the splits with --overwrite")
    parts = pd.DataFrame(record.partitions)
    table = table.astype({"category": str, "fold": np.int16, "label": np.int8})
    table["category"] = shared_strings(table["category"].to_numpy())  # a few categories, not one string per cell
    table.index = table.index.astype(str)
    table.index.name = "cell"
    return Splits(name, table, parts, params)


def _read(st: EmbeddingStore, name: str, cells: pd.DataFrame) -> Splits | None:
    got = st.get_splits(name)
    if got is None:
        return None
    splits = _from_saved(name, *got)
    index = cells.index.astype(str)
    if not splits.table.index.equals(index):
        return None  # same hash prefix, other cells: recompute
    splits.table.index = index  # the cells' own strings: not a second copy of every cell id
    return splits


def list_splits(store: str | Path | EmbeddingStore) -> pd.DataFrame:
    """One row per saved split: name, scheme, by, folds, group key, seed, cells, partitions, skipped."""
    st = open_store(store)
    rows = []
    for name in st.splits():
        got = st.get_splits(name)
        if got is None:
            continue
        s = _from_saved(name, *got)
        p = s.params
        rows.append({"name": name, "scheme": p.get("scheme"), "by": p.get("by"), "folds": p.get("folds"),
                     "group_key": p.get("group_key"), "seed": p.get("seed"), "n_cells": len(s.table),
                     "partitions": len(s), "skipped": len(s.skipped), "created": got[1].created})
    df = pd.DataFrame(rows, columns=["name", "scheme", "by", "folds", "group_key", "seed", "n_cells", "partitions",
                                     "skipped", "created"])
    return df.astype({"folds": "Int64", "seed": "Int64"})


__all__ = ["BY_CHOICES", "CELL_LEVEL", "SCHEMES", "By", "LeakageWarning", "Partition", "Scheme", "SplitWarning", "Splits",
           "compute_splits", "labels_per_sample", "list_splits", "load_splits", "make_splits", "open_store",
           "resolve_group_key", "select_cells", "transfer_splits"]
