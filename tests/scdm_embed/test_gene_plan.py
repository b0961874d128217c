"""Gene plans, beyond the contract (``test_contract.py`` checks immutability and statelessness
for every model): mutable plan data is refused, a pca plan follows its fit, a chunk whose genes
do not fit the plan is refused, and CellPLM never mixes two plans in one batch."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scdm_embed.errors import InputError
from scdm_embed.genes import GeneTable
from scdm_embed.inputs import read_input
from scdm_embed.models import get_adapter
from scdm_embed.models.base import Adapter, GeneOverlap, GenePlan
from scdm_embed.runner import Runner

from .models._shared import make_chunk, read_cells

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tables(fixtures_dir: Path) -> tuple[tuple[GeneTable, sp.csr_matrix], tuple[GeneTable, sp.csr_matrix]]:
    """Table A: all 25,077 genes of the fixture cells; table B: 6,000 of them in another order."""
    cells: ad.AnnData = read_cells(fixtures_dir / "uce" / "cells.h5ad", float32=True)
    keep = np.random.default_rng(0).permutation(cells.n_vars)[:6000]
    return ((GeneTable.from_var(cells.var), cells.X),
            (GeneTable.from_var(cells.var.iloc[keep]), sp.csr_matrix(cells.X[:, keep])))


def _adapter(model: str, model_checkpoints: dict[str, str | None], cells8: Path) -> Adapter:
    a = get_adapter(model)(model_checkpoints[model])
    a.load(device=CPU, dtype=torch.float32)
    if a.requires_reference:
        data = read_input(cells8)
        try:
            a.set_reference(*a.fit_reference(data))
        finally:
            data.close()
    return a


def _tokens(a: Adapter, X: sp.csr_matrix, genes: GeneTable, plan: GenePlan) -> list[dict[str, np.ndarray]]:
    return a.tokenize(make_chunk(X[:8], genes), plan)


def test_mutable_plan_data_refused() -> None:
    with pytest.raises(TypeError, match="mutable list"):
        GenePlan(GeneOverlap(1, 1, 1, 1), columns=np.arange(1), vocab_ids=np.arange(1), data={"ids": [1]})


def test_reference_plan_follows_its_fit(model_checkpoints, cells8, tables) -> None:
    """pca: a plan made for one fitted reference is refused after the reference changes."""
    (genes, X), _ = tables
    a = _adapter("pca", model_checkpoints, cells8)
    plan = a.prepare(genes)
    a.set_reference(a.ref, {**a.ref_attrs, "fit_hash": "sha256:other"})  # as a refit on other cells would
    with pytest.raises(RuntimeError, match="another reference"):
        _tokens(a, X, genes, plan)
    assert len(_tokens(a, X, genes, a.prepare(genes))) == 8


@pytest.mark.parametrize("model", ["scfoundation", "uce", "cellplm", "scbert", "celllm"])
def test_plan_of_other_genes_is_refused(model: str, model_checkpoints, cells8, tables) -> None:
    """A chunk whose gene count does not fit the plan is an input error, not a silent mix-up."""
    (genes_a, X_a), (genes_b, _) = tables
    a = _adapter(model, model_checkpoints, cells8)
    with pytest.raises(InputError, match="gene plan"):
        _tokens(a, X_a, genes_a, a.prepare(genes_b))


def test_cellplm_batch_of_two_plans_is_refused(model_checkpoints, cells8, tables) -> None:
    """CellPLM carries the plan's vocabulary rows in the batch: cells of two plans never mix."""
    (genes_a, X_a), (genes_b, X_b) = tables
    a = _adapter("cellplm", model_checkpoints, cells8)
    mixed = _tokens(a, X_a, genes_a, a.prepare(genes_a))[:2] + _tokens(a, X_b, genes_b, a.prepare(genes_b))[:2]
    width = len(mixed[0]["counts"])  # pad B's rows to A's width so the two can be stacked
    for c in mixed[2:]:
        c["counts"] = np.resize(c["counts"], width)
        c["gene_idx"] = np.resize(c["gene_idx"], width)
    with pytest.raises(InputError, match="different gene plans"):
        Runner(a).collate(mixed)
