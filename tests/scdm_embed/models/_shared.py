"""Helpers shared by the adapter tests: reading the reference-fixture cells, building gene
tables and chunks, loading an adapter on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from scdm_embed._genes import GeneTable
from scdm_embed.models import get_adapter
from scdm_embed.models._base import Adapter, CellChunk

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
    ("" stays unmatched; no offline symbol -> Ensembl mapping)."""
    return GeneTable(symbols=np.asarray(cells.var_names, dtype=object),
                     ensembl=np.asarray(cells.var["ensembl_id"].astype(str), dtype=object))


def load_adapter(model: str | type[Adapter], checkpoint: Any, genes: GeneTable | None = None, *,
                 dtype: torch.dtype = torch.float32, **options: Any) -> Any:
    """``model`` (registry name or class) on ``checkpoint``, loaded on CPU, prepared for ``genes``."""
    cls = get_adapter(model) if isinstance(model, str) else model
    a = cls(checkpoint, **options)
    a.load(device=CPU, dtype=dtype)
    if genes is not None:
        a.prepare(genes)
    return a


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
