"""Gene plans of scfoundation, uce, cellplm, scbert and celllm: two gene tables give two plans,
tokenizing with the first plan after making the second gives the same tokens (the adapter keeps
no per-dataset state), the plans' arrays are read-only and a plan pickles."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scdm_embed.errors import InputError
from scdm_embed.genes import GeneTable
from scdm_embed.models.base import Adapter, GenePlan
from scdm_embed.runner import collate
from scdm_embed.testing import scgpt_symbols, write_celllm_checkpoint, write_scbert_checkpoint

from .models._shared import load_adapter, make_chunk, read_cells

MODELS = ("scfoundation", "uce", "cellplm", "scbert", "celllm")


@pytest.fixture(scope="module")
def cells(fixtures_dir: Path) -> ad.AnnData:
    """The 64 fixture cells (the same cells and 25,077 genes in every fixture folder)."""
    return read_cells(fixtures_dir / "uce" / "cells.h5ad", float32=True)


@pytest.fixture(scope="module")
def tables(cells: ad.AnnData) -> tuple[tuple[GeneTable, sp.csr_matrix], tuple[GeneTable, sp.csr_matrix]]:
    """Table A: all genes; table B: 6,000 of them in another order (each with its matrix)."""
    keep = np.random.default_rng(0).permutation(cells.n_vars)[:6000]
    return ((GeneTable.from_var(cells.var), cells.X),
            (GeneTable.from_var(cells.var.iloc[keep]), sp.csr_matrix(cells.X[:, keep])))


def _adapter(model: str, request: pytest.FixtureRequest) -> Adapter:
    fixtures: Path = request.getfixturevalue("fixtures_dir")
    vocab: Path = request.getfixturevalue("vocab_dir")
    tmp: Path = request.getfixturevalue("tmp_path_factory").mktemp(model)
    if model == "scfoundation":
        return load_adapter(model, fixtures / model / "checkpoint",
                            gene_index=vocab / "scfoundation" / "OS_scRNA_gene_index.19264.tsv")
    if model == "uce":
        return load_adapter(model, fixtures / model / "checkpoint", sample_size=64)
    if model == "cellplm":
        return load_adapter(model, fixtures / model / "checkpoint")
    if model == "scbert":
        return load_adapter(model, write_scbert_checkpoint(tmp, scgpt_symbols(vocab, 16906), dim=4))
    return load_adapter(model, write_celllm_checkpoint(tmp, scgpt_symbols(vocab, 19379, skip=500), dim=4))


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




def test_plan_of_other_genes_is_refused(adapter: Adapter, tables) -> None:
    """A chunk whose gene count does not fit the plan is an input error, not a silent mix-up."""
    (genes_a, X_a), (genes_b, _) = tables
    with pytest.raises(InputError, match="gene plan"):
        _tokens(adapter, X_a, genes_a, adapter.prepare(genes_b))






def test_cellplm_batch_of_two_plans_is_refused(request: pytest.FixtureRequest, tables) -> None:
    """CellPLM carries the plan's vocabulary rows in the batch: cells of two plans never mix."""
    (genes_a, X_a), (genes_b, X_b) = tables
    a = _adapter("cellplm", request)
    mixed = _tokens(a, X_a, genes_a, a.prepare(genes_a))[:2] + _tokens(a, X_b, genes_b, a.prepare(genes_b))[:2]
    # same width only when the two plans match as many genes: pad B's rows to A's for the test
    width = len(mixed[0]["counts"])
    for c in mixed[2:]:
        c["counts"] = np.resize(c["counts"], width)
        c["gene_idx"] = np.resize(c["gene_idx"], width)
    batch = collate(mixed, sequence_keys=(), pad_values={}, device=torch.device("cpu"))
    with pytest.raises(InputError, match="different gene plans"), torch.inference_mode():
        a.forward(batch)
