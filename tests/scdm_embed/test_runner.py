"""The Runner: token budgets, bucketing order, collation, OOM back-off (inference halving,
training micro-batches with the whole batch's gradients), chunk-boundary invariance, padding
never reaching an embedding, and the engine's vocabulary-overlap refusal."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scdm_embed import InputError, extract
from scdm_embed.genes import GeneTable
from scdm_embed.models.base import Adapter, CellChunk, GeneOverlap, GenePlan, masked_mean
from scdm_embed.runner import DEFAULT_TOKEN_BUDGET, Runner, embed_matrix, plan_batches
from tests.scdm_embed.models._shared import load_prepared, read_cells

CPU = torch.device("cpu")


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
    """A real (tiny) model: embedding of each expressed gene -> linear -> masked mean.

    Runs "out of memory" (``torch.OutOfMemoryError``, as CUDA raises it) on batches of more
    than ``limit`` cells; ``seen`` records every batch size the forward was given.
    """

    name = "toy"
    sequence_keys = ("ids",)
    pad_values = {"ids": 0}

    def __init__(self, limit: int = 1000, **kw) -> None:
        super().__init__(**kw)
        self.limit = limit
        self.seen: list[int] = []

    def load(self, *, device, dtype):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Embedding(50, 6), torch.nn.Linear(6, 6))
        self.device, self.dtype = device, dtype
        self._dim = 6

    def prepare(self, genes):
        n = len(genes)
        return GenePlan(GeneOverlap(49, min(n, 49), n, min(n, 49)), columns=np.arange(min(n, 49)),
                        vocab_ids=np.arange(1, min(n, 49) + 1))

    def tokenize(self, chunk, plan):
        X = sp.csr_matrix(chunk.X[:, plan.columns])
        return [{"ids": plan.vocab_ids[X.indices[X.indptr[r]:X.indptr[r + 1]]]} for r in range(X.shape[0])]

    def forward(self, batch):
        n = batch["ids"].shape[0]
        self.seen.append(n)
        if n > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(batch["ids"])

    def pool(self, output, batch):
        return masked_mean(output, batch["attention_mask"])


class _ContextToy(_ToyAdapter):
    """Cells attend to each other (as CellPLM): batches are never re-sorted or split."""

    name = "context-toy"
    batch_invariant = False


def _toy(cls=_ToyAdapter, **kw) -> _ToyAdapter:
    a = cls(**kw)
    a.load(device=CPU, dtype=torch.float32)
    return a


def _cells(n: int = 16, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Tokenized cells of 2..30 tokens, through the toy's own prepare/tokenize."""
    rng = np.random.default_rng(seed)
    names = np.array([f"G{i}" for i in range(40)], dtype=object)
    genes = GeneTable(symbols=names, ensembl=np.full(40, "", dtype=object))
    dense = np.zeros((n, 40), np.float32)
    for r in range(n):
        dense[r, rng.choice(40, rng.integers(2, 31), replace=False)] = 1
    a = _toy()
    return a.tokenize(CellChunk(X=sp.csr_matrix(dense), cell_ids=np.arange(n).astype(str), genes=genes),
                      a.prepare(genes))


def test_runner_batches_token_budget_and_order():
    cells = _cells(40)
    lengths = np.array([len(c["ids"]) for c in cells])
    r = Runner(_toy(), batch_size=8, token_budget=60)
    batches = r.batches(cells)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(40))
    assert list(lengths[flat]) == sorted(lengths, reverse=True)  # bucketed: longest first
    assert all(len(b) <= 8 and (len(b) * lengths[b].max() <= 60 or len(b) == 1) for b in batches)
    assert len(batches) > 40 // 8  # the budget, not only batch_size, cut batches
    # None: the device default; 0: no cap (batch_size alone decides)
    assert Runner(_toy(), batch_size=8).token_budget == DEFAULT_TOKEN_BUDGET["cpu"]
    assert [len(b) for b in Runner(_toy(), batch_size=8, token_budget=0).batches(cells)] == [8] * 5
    # cells that see each other: file order, no budget
    ctx = Runner(_toy(_ContextToy), batch_size=8, token_budget=60)
    assert [b.tolist() for b in ctx.batches(cells)] == [list(range(i, i + 8)) for i in range(0, 40, 8)]


def test_runner_collate_pads_and_masks():
    cells = [{"ids": np.array([3, 4, 5])}, {"ids": np.array([7])}]
    batch = Runner(_toy()).collate(cells)
    assert batch["ids"].tolist() == [[3, 4, 5], [7, 0, 0]]
    assert batch["attention_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert Runner(_toy()).collate(cells, pad_to=5)["ids"].shape == (2, 5)


def test_embed_keeps_input_order_and_counts_batches():
    a, cells = _toy(), _cells(16)
    done: list[int] = []
    out = Runner(a, batch_size=5).embed(cells, on_batch=done.append)
    assert out.shape == (16, 6) and out.dtype == np.float32 and sum(done) == 16
    alone = np.concatenate([Runner(a, batch_size=1).embed([c]) for c in cells])
    np.testing.assert_allclose(out, alone, atol=1e-6)
    np.testing.assert_array_equal(out, Runner(a, batch_size=5).embed(cells))  # same process: bit-exact


def test_oom_halves_the_batch_and_keeps_results():
    a, cells = _toy(limit=4), _cells(16)
    out = Runner(a, batch_size=16, token_budget=0).embed(cells)
    assert a.seen[:3] == [16, 8, 4]  # halved until it fits
    assert max(n for n in a.seen if n <= 4) == 4 and sum(n for n in a.seen if n <= 4) == 16
    b = _toy()
    np.testing.assert_allclose(out, Runner(b, batch_size=16, token_budget=0).embed(cells), atol=1e-6)
    assert b.seen == [16]


def test_oom_that_cannot_be_split_is_raised():
    cells = _cells(4)
    with pytest.raises(torch.OutOfMemoryError):
        Runner(_toy(limit=0), batch_size=4).embed(cells)  # not even one cell fits
    ctx = _toy(_ContextToy, limit=2)
    with pytest.raises(torch.OutOfMemoryError):
        Runner(ctx, batch_size=4).embed(cells)  # cells that see each other are never split
    assert ctx.seen == [4]

    class Broken(_ToyAdapter):
        def forward(self, batch):
            raise RuntimeError("shape mismatch")  # not an OOM: no retry

    broken = _toy(Broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        Runner(broken, batch_size=4).embed(cells)


def _grads(a: _ToyAdapter) -> list[torch.Tensor]:
    return [p.grad.clone() for p in a.model.parameters()]


def test_backward_micro_batches_give_the_whole_batch_gradient():
    cells = _cells(12, seed=3)
    w = torch.from_numpy(np.random.default_rng(1).standard_normal((12, 6)).astype(np.float32))

    def loss_fn(pooled: torch.Tensor, idx: np.ndarray) -> torch.Tensor:  # a SUM over cells
        return (pooled * w[torch.from_numpy(idx)]).sum()

    whole, split = _toy(), _toy(limit=3)
    total = Runner(whole, batch_size=12).backward(cells, loss_fn)
    total_split = Runner(split, batch_size=12).backward(cells, loss_fn)
    assert whole.seen == [12]
    assert split.seen == [12, 6, 3, 3, 6, 3, 3]  # halved until each micro-batch fits
    assert total == pytest.approx(total_split, abs=1e-5)
    for g, h in zip(_grads(whole), _grads(split), strict=True):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, h, atol=1e-5, rtol=1e-5)
    # a subset of positions: only those cells' terms
    sub = _toy()
    Runner(sub, batch_size=12).backward(cells, loss_fn, idx=np.array([0, 5]))
    assert sub.seen == [2]


def test_backward_refuses_a_non_finite_loss():
    with pytest.raises(FloatingPointError, match="toy"):
        Runner(_toy()).backward(_cells(2), lambda pooled, idx: pooled.sum() * float("nan"))


@pytest.fixture(scope="module")
def tgpt(fixtures_dir):
    """tGPT (fixture) on 64 real cells restricted to 200 random genes, so token counts vary."""
    cells = read_cells(fixtures_dir / "tgpt" / "cells.h5ad", float32=True)
    keep = np.sort(np.random.default_rng(1).permutation(cells.n_vars)[:200])
    genes = GeneTable.from_var(cells.var.iloc[keep])
    X, ids = cells.X[:, keep], np.asarray(cells.obs_names)
    a, plan = load_prepared("tgpt", fixtures_dir / "tgpt" / "checkpoint", genes)
    toks = a.tokenize(CellChunk(X=X, cell_ids=ids, genes=genes), plan)
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
    runner = Runner(a, batch_size=64)
    np.testing.assert_allclose(runner.embed(toks), runner.embed(toks, pad_to=64, bucket=False), atol=1e-5)


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
