"""Weight-free embedders whose coordinates are fitted once per store: ``hvg`` and ``pca``.

Cross-study evaluation trains on one study and tests on another, so a coordinate must mean
the same thing in every dataset of a store. The gene list (and PCA basis) is therefore
fitted ONCE — on the first dataset extracted into the store, or on a named reference
AnnData — recorded under ``references/<model>`` and reused for every later dataset. The
fit sees expression only, never labels.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp
import torch
from sklearn.decomposition import PCA

from ..genes import GeneTable
from .base import Adapter, CellChunk, GeneOverlap, GenePlan
from .options import Option, at_least

TARGET_SUM = 1e4
SCALE_CLIP = 10.0


def _lognorm(X: sp.csr_matrix) -> sp.csr_matrix:
    """log1p(counts / cell total x 1e4); totals over all of the dataset's genes."""
    totals = np.asarray(X.sum(axis=1)).ravel()
    Xn = sp.diags((TARGET_SUM / np.maximum(totals, 1e-12)).astype(np.float32)) @ X
    Xn = sp.csr_matrix(Xn, dtype=np.float32)
    np.log1p(Xn.data, out=Xn.data)
    return Xn


class FittedAdapter(Adapter):
    """Base of adapters with a per-store fitted reference instead of a checkpoint.

    ``requires_reference``: the engine attaches the store's fit (or fits one) with
    :meth:`set_reference` before :meth:`prepare`. The reference is model state, like weights;
    what ``prepare`` learns about a dataset is in the returned plan only.
    """

    requires_reference: ClassVar[bool] = True
    checkpoint_layout: ClassVar[str | None] = None
    needs_counts: ClassVar[bool] = True
    default_batch_size: ClassVar[int] = 1024
    fits_pca: ClassVar[bool] = False
    options_spec: ClassVar[tuple[Option, ...]] = (
        Option("n_top_genes", int, 2000, "highly variable genes kept (seurat flavour), fitted once per store",
               check=at_least(1)),
        Option("max_fit_cells", int, 10_000, "at most this many cells (a seeded random subset) fit the reference",
               check=at_least(1)),
    )

    def __init__(self, checkpoint=None, **options: Any) -> None:
        super().__init__(checkpoint, **options)
        self.n_top_genes: int = self.options["n_top_genes"]
        self.n_comps: int = self.options.get("n_comps", 0)  # declared by pca only
        self.max_fit_cells: int = self.options["max_fit_cells"]
        self.ref: dict[str, np.ndarray] | None = None
        self.ref_attrs: dict[str, Any] = {}

    def _default_dim(self) -> int:
        """Width before a reference is attached (the options'); the fit sets the real one."""
        return self.n_top_genes

    def load(self, *, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        if self.ref is None:
            self._dim = self._default_dim()

    # -- the fitted reference ---------------------------------------------------------------
    def fit_reference(self, data) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Fit the gene list (and basis) on ``data`` (an InputDataset); labels are never read."""
        n = data.n_cells
        rows = np.arange(n) if n <= self.max_fit_cells else np.sort(
            np.random.default_rng(0).choice(n, self.max_fit_cells, replace=False))
        blocks = [data.read_rows(s, min(s + 4096, n))[(rows[(rows >= s) & (rows < s + 4096)] - s)] for s in range(0, n, 4096)]
        X = _lognorm(sp.vstack(blocks).tocsr())
        symbols = np.array([str(s).upper() for s in data.genes.symbols], dtype=object)
        a = ad.AnnData(X=X, var={"sym": symbols})
        a.var_names = [f"g{i}" for i in range(len(symbols))]
        n_top = min(self.n_top_genes, a.n_vars)
        sc.pp.highly_variable_genes(a, flavor="seurat", n_top_genes=n_top)
        hv = np.flatnonzero(a.var["highly_variable"].to_numpy())
        genes = symbols[hv]
        arrays: dict[str, np.ndarray] = {"genes": genes.astype(str)}
        if self.fits_pca:
            Xh = X[:, hv].toarray()
            mean = Xh.mean(0, dtype=np.float64)
            std = Xh.std(0, ddof=1, dtype=np.float64)
            std[std == 0] = 1.0
            Z = np.clip((Xh - mean.astype(np.float32)) / std.astype(np.float32), None, SCALE_CLIP)
            k = min(self.n_comps, min(Z.shape) - 1)
            # the SVD in float64: float32 LAPACK gave components that differ by CPU (up to 3.9e-4 on 24
            # cells between two machines); float64 is stable to far below the float32 output
            pca = PCA(n_components=k, svd_solver="full", random_state=0).fit(Z.astype(np.float64))
            arrays |= {"mean": mean.astype(np.float32), "std": std.astype(np.float32),
                       "components": pca.components_.astype(np.float32),
                       "explained_variance_ratio": pca.explained_variance_ratio_.astype(np.float32)}
        h = hashlib.sha256()
        for k in sorted(arrays):
            h.update(k.encode())
            h.update(np.ascontiguousarray(arrays[k]).astype(str if arrays[k].dtype.kind in "OU" else arrays[k].dtype).tobytes())
        attrs = {"fitted_on": str(data.path), "fitted_on_hash": data.content_hash, "n_cells_used": int(len(rows)),
                 "flavor": "seurat", "n_top_genes": int(len(genes)), "normalisation": "log1p(counts/total*1e4)",
                 "fit_hash": "sha256:" + h.hexdigest()}
        if self.fits_pca:
            attrs |= {"n_comps": int(arrays["components"].shape[0]), "scale": f"z-score, clipped at {SCALE_CLIP}"}
        return arrays, attrs

    def set_reference(self, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
        self.ref = {k: np.asarray(v) for k, v in arrays.items()}
        self.ref_attrs = dict(attrs)
        self._dim = len(self.ref["genes"])
        if self.fits_pca:
            self._mean = torch.as_tensor(self.ref["mean"], device=self.device)
            self._std = torch.as_tensor(self.ref["std"], device=self.device)
            self._comp = torch.as_tensor(self.ref["components"], device=self.device)
            self._dim = int(self.ref["components"].shape[0])

    def checkpoint_hash(self) -> str:
        return self.ref_attrs.get("fit_hash", "unfitted")

    # -- protocol -----------------------------------------------------------------------------
    def prepare(self, genes: GeneTable) -> GenePlan:
        """Find the reference's genes (upper-cased symbols) among the dataset's columns.

        ``columns`` are the dataset columns found, ``vocab_ids`` each one's position in the
        reference gene list (reference genes missing from the dataset stay 0).
        """
        if self.ref is None:
            raise RuntimeError(f"{self.name}: set_reference() (or the engine's fit) must come before prepare()")
        ref_genes = [str(g) for g in self.ref["genes"]]
        pos = {str(s).upper(): i for i, s in enumerate(genes.symbols)}
        cols = np.array([pos.get(g, -1) for g in ref_genes], dtype=np.int64)
        found = cols >= 0
        overlap = GeneOverlap(n_vocab=len(ref_genes), n_vocab_in_data=int(found.sum()), n_data=len(genes),
                              n_data_used=int(found.sum()))
        return GenePlan(overlap, columns=cols[found], vocab_ids=np.flatnonzero(found),
                        data={"n_features": len(ref_genes), "fit_hash": self.checkpoint_hash()})

    def tokenize(self, chunk: CellChunk, plan: GenePlan) -> list[dict[str, np.ndarray]]:
        if plan["fit_hash"] != self.checkpoint_hash():
            raise RuntimeError(f"{self.name}: the gene plan was made for another reference; prepare() again")
        Xn = _lognorm(chunk.X)
        out = np.zeros((Xn.shape[0], plan["n_features"]), dtype=np.float32)
        out[:, plan.vocab_ids] = Xn[:, plan.columns].toarray()
        return [{"x": row} for row in out]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["x"]

    def pool(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return output.float()

    def settings(self) -> dict[str, Any]:
        return {"reference": {k: v for k, v in self.ref_attrs.items() if k not in ("created", "encoding-type", "encoding-version")},
                "pooling": "none"}


class HVGAdapter(FittedAdapter):
    """log1p-normalised expression of the store's highly variable genes (raw-expression baseline)."""

    name = "hvg"
    description = "log-normalised expression of 2,000 highly variable genes (raw-expression baseline; no weights)"


class PCAAdapter(FittedAdapter):
    """PCA of z-scored log-normalised highly variable genes, basis fitted once per store."""

    name = "pca"
    description = "50-component PCA of log-normalised highly variable genes (no weights)"
    fits_pca = True
    options_spec: ClassVar[tuple[Option, ...]] = (
        *FittedAdapter.options_spec,
        Option("n_comps", int, 50, "principal components (capped by the fitted cells and genes)", check=at_least(1)),
    )

    def _default_dim(self) -> int:
        return self.n_comps

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        z = ((batch["x"] - self._mean) / self._std).clamp(max=SCALE_CLIP)
        # projected in float64, then rounded: a float32 GEMM's last bits depend on the BLAS kernel,
        # which MKL picks by CPU, thread count and even buffer alignment (shards of one extraction
        # differed from one process by 1-2 ulp on an AVX-512 Xeon); float64 rounds to one float32
        return (z.double() @ self._comp.double().T).float()
