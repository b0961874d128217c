"""Cell quality control as the seed paper did it (Seurat: nFeature_RNA > 500, percent.mt < 10%).

>>> from scdm_embed.qc import qc
>>> filtered, report = qc("cells.h5ad")            # doctest: +SKIP
>>> report.table                                    # cells each rule removed, per sample  # doctest: +SKIP

A cell is kept when it has **more than** ``min_genes`` detected genes and a mitochondrial
fraction of counts **below** ``max_mito``. Mitochondrial genes are found by symbol prefix
(``MT-`` human, ``mt-`` mouse) or Ensembl id (the 37 genes of the human chromosome MT from the
offline Ensembl 100 table; the 37 mouse ones, ENSMUSG00000064336-64372). The per-sample table of
what each rule removed is printed, stored in the output's ``uns["scdm_qc"]`` (and, on
``scdm-embed extract --qc paper``, in the store's dataset attributes and the array's
provenance). A sample that loses every cell is a warning; a class left with fewer than
``min_cells_per_class`` cells is refused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import InputError, ScdmError
from .inputs import LabelSpec

#: the paper's thresholds, the ``--qc paper`` preset
PAPER = {"min_genes": 500, "max_mito": 0.10}
QC_PRESETS: dict[str, dict[str, float]] = {"paper": PAPER}
#: mouse mitochondrial genes: Ensembl's 37 consecutive ids (mt-Tf .. mt-Tp)
MOUSE_MT_ENSEMBL = frozenset(f"ENSMUSG{n:011d}" for n in range(64336, 64373))
#: columns of :attr:`QCReport.table`
QC_COLUMNS = ("sample", "cells", "low_genes", "high_mito", "removed", "kept")


class QCWarning(UserWarning):
    """QC removed every cell of a sample (the sample is then absent from the output)."""


@functools.cache
def human_mt_ensembl() -> frozenset[str]:
    """Ensembl ids of the human mitochondrial genes (chromosome MT of the offline table)."""
    from .genes import gene_table

    t = gene_table()
    return frozenset(t.loc[t["Chromosome"].astype(str) == "MT", "ensembl_id"].astype(str))


def mito_mask(var: pd.DataFrame, *, gene_key: str | None = None) -> np.ndarray:
    """Bool mask of ``var``'s mitochondrial genes (symbol prefix MT-/mt- or a known Ensembl id)."""
    from .genes import GeneTable

    genes = GeneTable.from_var(var, gene_key=gene_key)
    sym = pd.Series(genes.symbols, dtype=object).astype(str)
    by_symbol = sym.str.upper().str.startswith("MT-").to_numpy()
    ens = pd.Series(genes.ensembl, dtype=object).astype(str)
    known = human_mt_ensembl() | MOUSE_MT_ENSEMBL
    return by_symbol | ens.isin(known).to_numpy()


@dataclass
class QCReport:
    """What :func:`qc` did: its settings, a per-sample table of removed cells, per-class counts, warnings."""

    settings: dict[str, Any]
    table: pd.DataFrame
    classes: dict[str, dict[str, int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def n_in(self) -> int:
        return int(self.table["cells"].sum())

    @property
    def n_kept(self) -> int:
        return int(self.table["kept"].sum())

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (what the store records)."""
        return {"settings": self.settings, "per_sample": self.table.to_dict("records"), "classes": self.classes,
                "n_in": self.n_in, "n_kept": self.n_kept, "warnings": list(self.warnings)}

    def settings_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()

    def rich_table(self):
        """A :class:`rich.table.Table` of the per-sample table."""
        from rich.markup import escape
        from rich.table import Table

        s = self.settings
        t = Table(title=f"QC: keep cells with > {s['min_genes']} genes and mitochondrial fraction < {s['max_mito']:g} "
                        f"({s['n_mito_genes']} mitochondrial genes)")
        for c in QC_COLUMNS:
            t.add_column(c.replace("_", " "), justify="left" if c == "sample" else "right")
        for r in self.table.itertuples(index=False):
            t.add_row(escape(str(r.sample)), *(str(getattr(r, c)) for c in QC_COLUMNS[1:]))
        t.add_row("[bold]all[/]", *(f"[bold]{int(self.table[c].sum())}[/]" for c in QC_COLUMNS[1:]))
        return t


def _sample_column(obs: pd.DataFrame, sample_key: str | None) -> str | None:
    if sample_key is not None:
        if sample_key not in obs:
            raise InputError(f"sample column {sample_key!r} is not in obs; obs has: {list(obs.columns)}",
                             "pass --sample-key with one of those columns, or leave it out")
        return sample_key
    return next((c for c in ("sample", "study") if c in obs), None)


def _check_thresholds(min_genes: int, max_mito: float, min_cells_per_class: int) -> None:
    if isinstance(min_genes, bool) or not isinstance(min_genes, (int, np.integer)) or min_genes < 0:
        raise ScdmError(f"min_genes must be an integer >= 0 (got {min_genes!r})", "use e.g. --min-genes 500 (the paper's)")
    if not isinstance(max_mito, (int, float)) or not 0 < float(max_mito) <= 1:
        raise ScdmError(f"max_mito is a fraction in (0, 1] (got {max_mito!r})",
                        "use e.g. --max-mito 0.10 (the paper's 10%; 1 disables the rule)")
    if isinstance(min_cells_per_class, bool) or not isinstance(min_cells_per_class, (int, np.integer)) \
            or min_cells_per_class < 1:
        raise ScdmError(f"min_cells_per_class must be an integer >= 1 (got {min_cells_per_class!r})",
                        "use e.g. --min-cells-per-class 10")


def qc(
    adata_or_path: Any,
    *,
    min_genes: int = 500,
    max_mito: float = 0.10,
    sample_key: str | None = None,
    response_key: str | None = "response",
    labels: LabelSpec | None = None,
    min_cells_per_class: int = 10,
    gene_key: str | None = None,
    layer: str | None = None,
) -> tuple[Any, QCReport]:
    """Filter cells by detected genes and mitochondrial fraction; returns ``(filtered AnnData, report)``.

    ``sample_key``: the column the report is broken down by (default ``sample``, else ``study``,
    else one group). ``response_key`` (or ``labels``): the response column; when present, each
    class must keep ``min_cells_per_class`` cells (else an :class:`~scdm_embed.InputError`). The
    input is not modified; the output's ``uns["scdm_qc"]`` holds the report.
    """
    import anndata as ad

    _check_thresholds(min_genes, max_mito, min_cells_per_class)
    a = _read(adata_or_path) if not isinstance(adata_or_path, ad.AnnData) else adata_or_path
    if a.n_obs == 0:
        raise InputError("the AnnData has no cells", "give a file with cells")
    if layer is not None and layer not in a.layers:
        raise InputError(f"layer {layer!r} is not in the AnnData (layers: {list(a.layers)})", "pick one with --layer")
    X = a.layers[layer] if layer is not None else a.X
    X = sp.csr_matrix(X, copy=True)
    X.eliminate_zeros()
    n_genes = np.diff(X.indptr)
    total = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    mt = mito_mask(a.var, gene_key=gene_key)
    mt_counts = np.asarray(X[:, np.flatnonzero(mt)].sum(axis=1), dtype=np.float64).ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(total > 0, mt_counts / total, 0.0)
    low = n_genes <= min_genes
    high = frac >= max_mito if max_mito < 1 else np.zeros(a.n_obs, dtype=bool)
    keep = ~(low | high)
    col = _sample_column(a.obs, sample_key)
    sample = a.obs[col].astype(str).to_numpy() if col else np.full(a.n_obs, "all", dtype=object)
    df = pd.DataFrame({"sample": sample, "low_genes": low, "high_mito": high, "removed": ~keep, "kept": keep})
    table = df.groupby("sample", sort=True).agg(cells=("kept", "size"), low_genes=("low_genes", "sum"),
                                                high_mito=("high_mito", "sum"), removed=("removed", "sum"),
                                                kept=("kept", "sum")).reset_index()
    table = table[list(QC_COLUMNS)].astype({c: np.int64 for c in QC_COLUMNS[1:]})
    notes = []
    gone = table.loc[table["kept"] == 0, "sample"].tolist()
    if gone:
        msg = (f"QC removed every cell of {len(gone)} {col or 'sample'}(s): {', '.join(map(str, gone[:5]))}"
               f"{' ...' if len(gone) > 5 else ''}; they are absent from the output (lower --min-genes or raise "
               "--max-mito to keep them)")
        notes.append(msg)
        warnings.warn(msg, QCWarning, stacklevel=2)
    settings = {"min_genes": int(min_genes), "max_mito": float(max_mito), "rule": "n_genes > min_genes and "
                "mito_fraction < max_mito", "mito_genes": "symbol prefix MT-/mt- or human/mouse Ensembl MT ids",
                "n_mito_genes": int(mt.sum()), "sample_key": col, "min_cells_per_class": int(min_cells_per_class),
                "layer": layer, "gene_key": gene_key}
    classes = _check_classes(a.obs, keep, labels or (LabelSpec(key=response_key) if response_key else None),
                             min_cells_per_class, settings)
    report = QCReport(settings=settings, table=table, classes=classes, warnings=notes)
    out = a[keep].copy()
    out.uns["scdm_qc"] = {"settings": {k: ("" if v is None else v) for k, v in settings.items()},
                          "per_sample": table, "warnings": notes}
    return out, report


def _check_classes(obs: pd.DataFrame, keep: np.ndarray, labels: LabelSpec | None, minimum: int,
                   settings: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    if labels is None or labels.key not in obs:
        return {}
    y = labels.encode(obs[labels.key])
    out = {}
    for code, name in ((1, "sensitive"), (0, "resistant")):
        n_in = int((y == code).sum())
        if n_in == 0:
            continue
        n_kept = int(((y == code) & keep).sum())
        out[name] = {"cells": n_in, "kept": n_kept}
        if n_kept < minimum:
            raise InputError(f"QC (> {settings['min_genes']} genes, mitochondrial fraction < {settings['max_mito']:g}) "
                             f"leaves {n_kept} of {n_in} {name} cells, fewer than --min-cells-per-class {minimum}",
                             "lower --min-genes or raise --max-mito for these cells (shallow data), or lower "
                             "--min-cells-per-class")
    return out


def _read(path: str | Path):
    import anndata as ad

    path = Path(path)
    if not path.exists():
        raise InputError(f"input {str(path)!r} does not exist", "check the path (an .h5ad file or an AnnData .zarr folder)")
    try:
        return ad.read_zarr(path) if path.is_dir() or path.suffix == ".zarr" else ad.read_h5ad(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
        raise InputError(f"cannot read {str(path)!r} as AnnData ({e})", "give an .h5ad file or an AnnData .zarr") from e


def qc_file(input: str | Path, out: str | Path, *, preset: str | None = None, **kw: Any) -> QCReport:
    """:func:`qc` of a file, written to ``out`` (.h5ad); ``preset="paper"`` sets the paper's thresholds."""
    out = Path(out)
    if out.suffix != ".h5ad":
        raise ScdmError(f"--out {str(out)!r} must end in .h5ad", "pass e.g. --out qc.h5ad")
    if Path(input).exists() and out.exists() and out.resolve() == Path(input).resolve():
        raise ScdmError("--out is the input file", "write the filtered cells to another file")
    if preset is not None:
        if preset not in QC_PRESETS:
            raise ScdmError(f"unknown QC preset {preset!r}", f"use one of {', '.join(QC_PRESETS)}")
        kw = {**QC_PRESETS[preset], **kw}
    filtered, report = qc(input, **kw)
    out.parent.mkdir(parents=True, exist_ok=True)
    filtered.write_h5ad(out)
    return report


def qc_input(input: str | Path, *, preset: str, labels: LabelSpec | None = None,
             meta_keys: Mapping[str, str | None] | None = None, gene_key: str | None = None,
             layer: str | None = None, **read_kw: Any):
    """``--qc PRESET`` of ``scdm-embed extract``: the QC'd cells as an opened :class:`~scdm_embed.inputs.InputDataset`.

    The filtered cells are written to a temporary file, opened with :func:`~scdm_embed.inputs.read_input`
    (``read_kw``) and the file is unlinked (the open handle keeps it readable). The dataset keeps the
    input's path (name, provenance); its content hash includes the QC settings, so a store never
    takes the QC'd cells for the unfiltered ones. Returns ``(dataset, report)``.
    """
    import shutil
    import tempfile

    from .inputs import read_input

    if preset not in QC_PRESETS:
        raise ScdmError(f"unknown --qc {preset!r}", f"use one of {', '.join(QC_PRESETS)}")
    sample_key = (meta_keys or {}).get("sample")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", QCWarning)
        filtered, report = qc(input, **QC_PRESETS[preset], sample_key=sample_key, labels=labels or LabelSpec(),
                              gene_key=gene_key, layer=layer)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    report.settings["preset"] = preset
    tmp = Path(tempfile.mkdtemp(prefix="scdm-qc-"))
    try:
        path = tmp / f"{Path(input).stem}.h5ad"
        filtered.write_h5ad(path)
        data = read_input(path, labels=labels, meta_keys=meta_keys, gene_key=gene_key, layer=layer, **read_kw)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    data.path = Path(input)
    data.content_hash = hashlib.sha256(f"{data.content_hash}\0qc\0{report.settings_hash()}".encode()).hexdigest()
    return data, report


__all__ = ["MOUSE_MT_ENSEMBL", "PAPER", "QC_COLUMNS", "QC_PRESETS", "QCReport", "QCWarning", "human_mt_ensembl",
           "mito_mask", "qc", "qc_file", "qc_input"]
