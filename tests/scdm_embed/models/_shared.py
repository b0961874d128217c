"""Helpers shared by the adapter tests: reading the reference-fixture cells, building gene
tables and chunks, loading an adapter on CPU."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from scdm_embed.genes import GeneTable
from scdm_embed.models import get_adapter
from scdm_embed.models.base import Adapter, CellChunk, GenePlan

CPU = torch.device("cpu")


def read_cells(path: Path, *, rows: Any = None, float32: bool = False) -> ad.AnnData:
    """A fixture's ``cells.h5ad`` (optionally only ``rows``; ``float32``: X as float32 CSR)."""
    a = ad.read_h5ad(path)
    if rows is not None:
        a = a[rows].copy()
    if float32:
        a.X = sp.csr_matrix(a.X, dtype=np.float32)
    return a


def exact_genes(cells: ad.AnnData) -> GeneTable:
    """The genes exactly as the fixture stores them: ``var_names`` and ``var.ensembl_id``
    ("" stays unmatched; no offline symbol -> Ensembl mapping). Parity tests use
    ``GeneTable.from_var(cells.var)`` instead, as the CLI does."""
    return GeneTable(symbols=np.asarray(cells.var_names, dtype=object),
                     ensembl=np.asarray(cells.var["ensembl_id"].astype(str), dtype=object))


def read_pickle_dict(path: Path) -> dict:
    """An official Geneformer dictionary of ``../shared`` (trusted test data, not user input)."""
    with open(path, "rb") as fh:
        return pickle.load(fh)


def geneformer_v2_tokens(X: Any, ens: Any, gc95m: Path, *, n_counts: Any = None,
                         n_genes: int = 4094) -> list[np.ndarray]:
    """Per-cell re-reading of Geneformer's V2 tokenizer (``sum_ensembl_ids`` +
    ``tokenize_anndata`` of ctheodoris/Geneformer), written independently of the adapter.

    Upper-cased ids are mapped through the mapping dictionary (values kept only when in the
    token dictionary). Columns are summed per mapped id only when two DISTINCT given ids
    collide: then the unique ids keep their column order and the summed ones are appended;
    otherwise every mapped column is its own gene (a repeated id repeats its token). Values
    ``x / n_counts * 10000 / median`` (``n_counts`` default: the row sums), descending (stable),
    ``<cls>`` + top ``n_genes`` + ``<eos>``.
    """
    tok, med, mapping = (read_pickle_dict(gc95m / f"{n}_gc95M.pkl")
                         for n in ("token_dictionary", "gene_median_dictionary", "ensembl_mapping_dict"))
    ens = [str(e) for e in ens]
    mapping = {k: v for k, v in mapping.items() if v in tok}
    given = {g for g in ens if g in mapping}
    collide = len(given) != len({mapping[g] for g in given})
    target = [mapping.get(g.upper()) for g in ens]
    if collide:
        groups: dict[str, list[int]] = {}
        for j, t in enumerate(target):
            if t is not None:
                groups.setdefault(t, []).append(j)
        layout = [t for t, c in groups.items() if len(c) == 1] + [t for t, c in groups.items() if len(c) > 1]
        cols = [groups[t] for t in layout]
    else:
        layout = [t for t in target if t is not None]
        cols = [[j] for j, t in enumerate(target) if t is not None]
    keep = [k for k, t in enumerate(layout) if t in tok and t in med]
    dense = sp.csr_matrix(X).toarray().astype(np.float64)
    totals = dense.sum(1) if n_counts is None else np.asarray(n_counts, dtype=np.float64)
    medians = np.array([med[layout[k]] for k in keep])
    out = []
    for r in range(dense.shape[0]):
        counts = np.array([dense[r, cols[k]].sum() for k in keep])
        v = counts / totals[r] * 10_000 / medians
        nz = np.flatnonzero(v)
        ranked = nz[np.argsort(-v[nz], kind="stable")][:n_genes]
        out.append(np.array([tok["<cls>"], *[tok[layout[keep[k]]] for k in ranked], tok["<eos>"]], dtype=np.int64))
    return out


def load_adapter(model: str | type[Adapter], checkpoint: Any, genes: GeneTable | None = None, *,
                 dtype: torch.dtype = torch.float32, **options: Any) -> Any:
    """``model`` (registry name or class) on ``checkpoint``, loaded on CPU.

    With ``genes``, also checks that ``prepare(genes)`` succeeds (the adapter keeps nothing of
    it: use :func:`load_prepared` for the plan).
    """
    cls = get_adapter(model) if isinstance(model, str) else model
    a = cls(checkpoint, **options)
    a.load(device=CPU, dtype=dtype)
    if genes is not None:
        a.prepare(genes)
    return a


def load_prepared(model: str | type[Adapter], checkpoint: Any, genes: GeneTable, *,
                  dtype: torch.dtype = torch.float32, **options: Any) -> tuple[Any, GenePlan]:
    """``model`` loaded on CPU and its gene plan for ``genes``: ``(adapter, plan)``."""
    a = load_adapter(model, checkpoint, dtype=dtype, **options)
    return a, a.prepare(genes)


def make_chunk(X: Any, genes: GeneTable, cell_ids: Any = None) -> CellChunk:
    """A float32 CSR chunk; cell ids ``c0, c1, ...`` unless given."""
    X = sp.csr_matrix(X, dtype=np.float32)
    ids = [f"c{i}" for i in range(X.shape[0])] if cell_ids is None else cell_ids
    return CellChunk(X=X, cell_ids=np.asarray(ids, dtype=object), genes=genes)


def reference(fx: Path) -> dict[str, np.ndarray]:
    """``reference_inputs.npz`` arrays plus ``reference_embeddings.npy`` as ``"embeddings"``."""
    z = np.load(fx / "reference_inputs.npz")
    out = {k: z[k] for k in z.files}
    out["embeddings"] = np.load(fx / "reference_embeddings.npy")
    return out


def tokenize_fresh(adapter: Any, X: Any, genes: GeneTable) -> list[dict[str, np.ndarray]]:
    """``adapter.tokenize`` of ``make_chunk(X, genes)`` following a fresh plan for ``genes``."""
    return adapter.tokenize(make_chunk(X, genes), adapter.prepare(genes))
