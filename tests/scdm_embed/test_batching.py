"""The engine's batching: token budgets, bucketing order, OOM back-off, chunk-boundary invariance,
padding never reaching an embedding, and vocabulary-overlap refusal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scdm_embed import InputError, extract
from scdm_embed._batching import embed_cells, embed_matrix, plan_batches
from scdm_embed._genes import GeneTable
from scdm_embed.models._base import Adapter, GeneOverlap, masked_mean
from tests.scdm_embed.models._shared import load_adapter, read_cells


def test_plan_batches_budget_and_bucketing():
    lengths = np.array([5, 100, 7, 90, 3, 100, 50])
    batches = plan_batches(lengths, batch_size=4, token_budget=200)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(7))
    for b in batches:
        assert len(b) * lengths[b].max() <= 200 or len(b) == 1
        assert len(b) <= 4
    assert list(lengths[flat]) == sorted(lengths, reverse=True)  # longest first, stable
    assert [b.tolist() for b in plan_batches(lengths, batch_size=3, bucket=False)] == [[0, 1, 2], [3, 4, 5], [6]]


class _ToyAdapter(Adapter):
    """Sum-of-embeddings model that runs out of memory above ``limit`` cells per batch."""

    name = "toy"
    sequence_keys = ("ids",)
    limit = 4
    seen: list[int] = []

    def load(self, *, device, dtype):
        torch.manual_seed(0)
        self.model = torch.nn.Embedding(50, 6)

    def prepare(self, genes):
        return GeneOverlap(1, 1, 1, 1)

    def tokenize(self, chunk):
        raise NotImplementedError

    def forward(self, batch):
        n = batch["ids"].shape[0]
        _ToyAdapter.seen.append(n)
        if n > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(batch["ids"])

    def pool(self, output, batch):
        return masked_mean(output, batch["attention_mask"])

    @property
    def dim(self):
        return 6


def test_oom_halves_the_batch_and_keeps_results():
    a = _ToyAdapter()
    a.load(device=torch.device("cpu"), dtype=torch.float32)
    rng = np.random.default_rng(0)
    cells = [{"ids": rng.integers(1, 50, rng.integers(2, 9))} for _ in range(16)]
    _ToyAdapter.seen.clear()
    out = embed_cells(a, cells, batch_size=16)
    assert _ToyAdapter.seen[:3] == [16, 8, 4]  # halved until it fits
    a.limit = 100
    np.testing.assert_allclose(out, embed_cells(a, cells, batch_size=1), atol=1e-6)


@pytest.fixture(scope="module")
def tgpt(fixtures_dir):
    """tGPT (fixture) on 64 real cells restricted to 200 random genes, so token counts vary."""
    from scdm_embed.models import CellChunk

    cells = read_cells(fixtures_dir / "tgpt" / "cells.h5ad", float32=True)
    keep = np.sort(np.random.default_rng(1).permutation(cells.n_vars)[:200])
    genes = GeneTable.from_var(cells.var.iloc[keep])
    X, ids = cells.X[:, keep], np.asarray(cells.obs_names)
    a = load_adapter("tgpt", fixtures_dir / "tgpt" / "checkpoint", genes)
    toks = a.tokenize(CellChunk(X=X, cell_ids=ids, genes=genes))
    assert len({len(t["input_ids"]) for t in toks}) > 5, "cells of different lengths"
    return a, X, ids, genes, toks


def test_chunk_boundaries_batches_and_budgets_do_not_change_embeddings(tgpt):
    a, X, ids, genes, _ = tgpt
    ref = embed_matrix(a, X, genes, ids, batch_size=64, chunk_size=64)
    for kw in ({"batch_size": 1, "chunk_size": 64}, {"batch_size": 64, "chunk_size": 7}, {"batch_size": 5, "chunk_size": 13},
               {"batch_size": 64, "chunk_size": 64, "token_budget": 300}):
        np.testing.assert_allclose(embed_matrix(a, X, genes, ids, **kw), ref, atol=1e-5)
    np.testing.assert_array_equal(embed_matrix(a, X, genes, ids, batch_size=64, chunk_size=64), ref)  # re-run


def test_extra_padding_never_reaches_an_embedding(tgpt):
    a, _, _, _, toks = tgpt
    np.testing.assert_allclose(embed_cells(a, toks, batch_size=64), embed_cells(a, toks, batch_size=64, pad_to=64, bucket=False),
                               atol=1e-5)


def test_vocabulary_overlap_refusal(fixtures_dir, tmp_path, vocab_dir):
    """Mouse-style symbols share no genes with Geneformer's vocabulary: refused, no store written."""
    cells = read_cells(fixtures_dir / "geneformer" / "cells.h5ad")
    cells.var_names = [f"{s.capitalize()}_mm{i}" for i, s in enumerate(cells.var_names)]
    cells.var = cells.var.drop(columns=["ensembl_id"])
    cells.write_h5ad(tmp_path / "mouse.h5ad")
    gf = vocab_dir / "geneformer" / "gc30M"
    with pytest.raises(InputError, match="barely share genes"):
        extract(tmp_path / "mouse.h5ad", model="geneformer", store=tmp_path / "s.zarr", progress=False,
                checkpoint=fixtures_dir / "geneformer" / "checkpoint",
                model_options={"token_dictionary": gf / "token_dictionary_gc30M.pkl",
                               "gene_median_dictionary": gf / "gene_median_dictionary_gc30M.pkl",
                               "map_symbols": True})  # look the symbols up: none is human
    assert not (tmp_path / "s.zarr").exists()
