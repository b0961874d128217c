"""Gene plans are immutable and adapters keep no per-dataset state: for geneformer, tgpt, scgpt,
lm (MiniLM), pca and hvg, two gene tables give two plans, tokenizing with the first plan after
making the second gives the same tokens, the plans' arrays are read-only and a plan pickles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scdm_embed.genes import GeneTable
from scdm_embed.inputs import read_input
from scdm_embed.models.base import Adapter, GenePlan

from .models._shared import load_adapter, make_chunk, read_cells

MODELS = ("geneformer", "tgpt", "scgpt", "lm", "pca", "hvg")


@pytest.fixture(scope="module")
def cells(fixtures_dir: Path) -> ad.AnnData:
    """The 64 fixture cells (the same cells and 25,077 genes in every fixture folder)."""
    return read_cells(fixtures_dir / "geneformer" / "cells.h5ad", float32=True)


@pytest.fixture(scope="module")
def tables(cells: ad.AnnData) -> tuple[tuple[GeneTable, sp.csr_matrix], tuple[GeneTable, sp.csr_matrix]]:
    """Table A: all genes; table B: 6,000 of them in another order (each with its matrix)."""
    keep = np.random.default_rng(0).permutation(cells.n_vars)[:6000]
    return ((GeneTable.from_var(cells.var), cells.X),
            (GeneTable.from_var(cells.var.iloc[keep]), sp.csr_matrix(cells.X[:, keep])))


@pytest.fixture(scope="module")
def gf_checkpoint(tmp_path_factory: pytest.TempPathFactory, fixtures_dir: Path, vocab_dir: Path) -> Path:
    """The Geneformer fixture checkpoint with the gc30M dictionaries beside it (found, not passed)."""
    d = tmp_path_factory.mktemp("geneformer")
    for f in (fixtures_dir / "geneformer" / "checkpoint").iterdir():
        (d / f.name).symlink_to(f)
    for name in ("token_dictionary_gc30M.pkl", "gene_median_dictionary_gc30M.pkl"):
        (d / name).symlink_to(vocab_dir / "geneformer" / "gc30M" / name)
    return d


def _adapter(model: str, request: pytest.FixtureRequest) -> Adapter:
    fixtures: Path = request.getfixturevalue("fixtures_dir")
    if model == "geneformer":
        return load_adapter(model, request.getfixturevalue("gf_checkpoint"))
    if model in ("tgpt", "scgpt"):
        return load_adapter(model, fixtures / model / "checkpoint")
    if model == "lm":
        return load_adapter(model, "minilm", n_genes=64)
    opts: dict[str, Any] = {"n_top_genes": 300} | ({"n_comps": 8} if model == "pca" else {})
    a = load_adapter(model, None, **opts)
    data = read_input(fixtures / "geneformer" / "cells.h5ad", require_labels=False)
    try:
        a.set_reference(*a.fit_reference(data))
    finally:
        data.close()
    return a


@pytest.fixture(scope="module", params=MODELS)
def adapter(request: pytest.FixtureRequest) -> Adapter:
    return _adapter(request.param, request)


def _tokens(a: Adapter, X: sp.csr_matrix, genes: GeneTable, plan: GenePlan) -> list[dict[str, np.ndarray]]:
    return a.tokenize(make_chunk(X[:8], genes), plan)


def _assert_same(t: list[dict[str, np.ndarray]], u: list[dict[str, np.ndarray]]) -> None:
    assert len(t) == len(u)
    for x, y in zip(t, u, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])  # same process, same inputs: bit-exact








def test_mutable_plan_data_refused() -> None:
    from scdm_embed.models.base import GeneOverlap

    with pytest.raises(TypeError, match="mutable list"):
        GenePlan(GeneOverlap(1, 1, 1, 1), columns=np.arange(1), vocab_ids=np.arange(1), data={"ids": [1]})


def test_reference_plan_follows_its_fit(request: pytest.FixtureRequest, tables) -> None:
    """pca: a plan made for one fitted reference is refused after the reference changes."""
    (genes, X), _ = tables
    a = _adapter("pca", request)
    plan = a.prepare(genes)
    arrays, attrs = a.ref, a.ref_attrs
    a.set_reference(arrays, {**attrs, "fit_hash": "sha256:other"})  # as a refit on other cells would
    with pytest.raises(RuntimeError, match="another reference"):
        _tokens(a, X, genes, plan)
    assert len(_tokens(a, X, genes, a.prepare(genes))) == 8
