"""tGPT adapter: tokens and embeddings equal the original feature-extraction code's (fixture),
batch invariance, determinism, strict loading; plus the shared ranking helper."""

from __future__ import annotations

import re
import shutil
from functools import partial
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file, save_file

from scdm_embed.errors import CheckpointError
from scdm_embed.genes import GeneTable
from scdm_embed.models import get_adapter
from scdm_embed.models._sentences import ranked_columns, ranked_genes, wrap_sequences
from scdm_embed.models.base import CellChunk, GenePlan
from scdm_embed.models.tgpt import TGPTAdapter
from scdm_embed.runner import embed_matrix

from ._shared import load_adapter, read_cells


@pytest.fixture(scope="module")
def fx(fixtures_dir: Path) -> Path:
    return fixtures_dir / "tgpt"


@pytest.fixture(scope="module")
def cells(fx: Path) -> ad.AnnData:
    return read_cells(fx / "cells.h5ad", float32=True)


@pytest.fixture(scope="module")
def genes(cells: ad.AnnData) -> GeneTable:
    """The genes as the CLI builds them (``read_input``): the symbols are the var_names."""
    return GeneTable.from_var(cells.var)


_load = partial(load_adapter, TGPTAdapter)  # (path, genes=None, **options)


@pytest.fixture(scope="module")
def adapter(fx: Path) -> TGPTAdapter:
    return _load(fx / "checkpoint")


@pytest.fixture(scope="module")
def plan(adapter: TGPTAdapter, genes: GeneTable) -> GenePlan:
    return adapter.prepare(genes)


def _chunk(cells: ad.AnnData, genes: GeneTable, X: sp.csr_matrix | None = None) -> CellChunk:
    return CellChunk(X=cells.X if X is None else X, cell_ids=cells.obs_names.to_numpy(), genes=genes)


def _varied(X: sp.csr_matrix, columns: np.ndarray) -> sp.csr_matrix:
    """Cell i keeps only its top (1 + i) in-vocab genes: 64 cells of 64 different lengths."""
    ranked = ranked_genes(X, None, columns=columns)
    rows = np.concatenate([np.full(min(i + 1, len(r)), i) for i, r in enumerate(ranked)])
    cols = np.concatenate([r[: i + 1] for i, r in enumerate(ranked)])
    vals = np.asarray(X[rows, cols]).ravel()
    return sp.csr_matrix((vals, (rows, cols)), shape=X.shape, dtype=np.float32)


# -- the shared ranking helper ----------------------------------------------------------------
def _naive_rank(X: sp.csr_matrix, n: int | None, columns=None) -> list[np.ndarray]:
    dense = X.toarray()
    keep = np.zeros(X.shape[1], bool)
    keep[np.arange(X.shape[1]) if columns is None else columns] = True
    out = []
    for x in dense:
        order = np.argsort(-x, kind="stable")
        order = order[(x[order] > 0) & keep[order]]
        out.append(order[:n])
    return out


def test_ranked_genes_matches_stable_argsort():
    rng = np.random.default_rng(0)
    dense = rng.integers(0, 4, size=(50, 40)).astype(np.float32)  # many ties
    dense[3] = 0  # an empty cell
    X = sp.csr_matrix(dense)
    X.data[::7] = 0  # explicit zeros stay unranked
    X = sp.csr_matrix((X.data, X.indices, X.indptr), shape=X.shape)
    cols = np.sort(rng.choice(40, 25, replace=False))
    for n, c in ((5, None), (None, None), (7, cols), (1000, cols)):
        got = ranked_genes(X, n, columns=c)
        want = _naive_rank(X, n, c)
        assert len(got) == len(want) == 50
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
    # unsorted CSR indices give the same answer (ties still in column order)
    U = X.copy()
    for i in range(U.shape[0]):
        s, e = U.indptr[i], U.indptr[i + 1]
        U.indices[s:e] = U.indices[s:e][::-1].copy()
        U.data[s:e] = U.data[s:e][::-1].copy()
    U.has_sorted_indices = False
    for g, w in zip(ranked_genes(U, 6), _naive_rank(X, 6), strict=True):
        np.testing.assert_array_equal(g, w)


def test_wrap_sequences():
    col, off = ranked_columns(sp.csr_matrix(np.array([[0, 2, 1], [0, 0, 0], [5, 0, 5]], np.float32)), None)
    seqs = wrap_sequences(col + 10, off, prefix=1, suffix=2)
    assert [s.tolist() for s in seqs] == [[1, 11, 12, 2], [1, 2], [1, 10, 12, 2]]
    assert [s.tolist() for s in wrap_sequences(col, off, suffix=9)] == [[1, 2, 9], [9], [0, 2, 9]]


# -- tokens equal the original's --------------------------------------------------------------
def test_tokens_equal_reference_inputs(adapter, plan, cells, genes, fx):
    toks = adapter.tokenize(_chunk(cells, genes), plan)
    ids = np.stack([t["input_ids"] for t in toks])
    ref = np.load(fx / "reference_inputs.npz")
    assert ids.shape == (64, 64) and ref["attention_mask"].all()
    np.testing.assert_array_equal(ids, ref["input_ids"])
    assert adapter.n_genes == 62 and (ids[:, 0] == 1).all() and (ids[:, -1] == 2).all()


def test_ranking_equals_gene_rankings_txt(adapter, plan, cells, genes, fx):
    lines = (fx / "gene_rankings.txt").read_text().splitlines()
    ranked = ranked_genes(cells.X, adapter.n_genes, columns=plan.columns)
    symbols = np.asarray(cells.var_names)
    for line, r in zip(lines, ranked, strict=True):
        assert symbols[r].tolist() == line.split()[:62]


@pytest.mark.parametrize("max_len", [64, 20])
def test_vectorised_ids_equal_tokenizer(adapter, plan, cells, genes, fx, max_len):
    """Direct vocabulary lookup == the tGPT README path (regex + PreTrainedTokenizerFast)."""
    a = adapter if max_len == 64 else _load(fx / "checkpoint", max_len=max_len)
    X = _varied(cells.X, plan.columns)  # 1..64 genes per cell, so some cells are short
    symbols = np.asarray(cells.var_names, dtype=object)
    lines = [re.sub(r"-|\.", "_", " ".join(symbols[r]))
             for r in ranked_genes(X, None, columns=plan.columns)]
    enc = adapter.tokenizer(lines, max_length=max_len, truncation=True)
    ours = [t["input_ids"].tolist() for t in a.tokenize(_chunk(cells, genes, X), a.prepare(genes))]
    assert ours == enc["input_ids"]
    assert {len(o) for o in ours} == set(range(3, max_len + 1))


# -- embeddings ---------------------------------------------------------------------------------
def test_fixture_embeddings(adapter, cells, genes, fx):
    emb = embed_matrix(adapter, cells.X, genes, cells.obs_names, batch_size=64)
    ref = np.load(fx / "reference_embeddings.npy")
    assert emb.shape == ref.shape == (64, adapter.dim) and adapter.dim == 64
    assert np.abs(emb - ref).max() <= 1e-4
    np.testing.assert_allclose(emb, ref, atol=1e-5, rtol=1e-4)


def test_batch_invariance_and_original_padding_semantics(adapter, plan, cells, genes):
    X = _varied(cells.X, plan.columns)
    batched = embed_matrix(adapter, X, genes, cells.obs_names, batch_size=64)
    alone = embed_matrix(adapter, X, genes, cells.obs_names, batch_size=1)
    assert np.isfinite(batched).all()
    assert np.abs(batched - alone).max() <= 1e-5
    # the README's loop: tokenizer padding=True, model(**batch), mean of hidden[1:eos_idx]
    symbols = np.asarray(cells.var_names, dtype=object)
    lines = [re.sub(r"-|\.", "_", " ".join(symbols[r])) for r in ranked_genes(X, None, columns=plan.columns)]
    enc = adapter.tokenizer(lines, max_length=64, truncation=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = adapter.model(**enc).last_hidden_state
    eos = enc["attention_mask"].sum(1) - 1
    want = np.stack([hidden[j, 1:int(eos[j])].mean(0).numpy() if eos[j] > 1 else np.zeros(adapter.dim)
                     for j in range(len(lines))])
    assert np.abs(batched - want).max() <= 1e-5


def test_determinism(adapter, cells, genes):
    a = embed_matrix(adapter, cells.X[:16], genes, cells.obs_names[:16], batch_size=5)
    b = embed_matrix(adapter, cells.X[:16], genes, cells.obs_names[:16], batch_size=16)
    c = embed_matrix(adapter, cells.X[:16], genes, cells.obs_names[:16], batch_size=5)
    np.testing.assert_array_equal(a, c)
    assert np.abs(a - b).max() <= 1e-5


def test_registry_and_settings(adapter):
    assert get_adapter("tgpt") is TGPTAdapter
    s = adapter.settings()
    assert s["max_len"] == 64 and s["n_genes"] == 62 and s["special_ids"] == {"bos": 1, "eos": 2, "pad": 0}


def test_prepare_overlap(adapter, genes):
    ov = adapter.prepare(genes).overlap
    assert ov.n_data == 25077 and ov.n_data_used == 14071  # as the fixture README counts
    assert ov.n_vocab == 21145  # 21,150 tokens minus 4 specials and ':'


# -- strict loading --------------------------------------------------------------------------
def _copy(fx: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(fx / "checkpoint", dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def test_missing_checkpoint_dir(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        TGPTAdapter(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="needs a checkpoint"):
        TGPTAdapter(None)


@pytest.mark.parametrize("remove", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_files(fx, tmp_path, remove):
    ckpt = _copy(fx, tmp_path)
    (ckpt / remove).unlink()
    with pytest.raises(CheckpointError, match=re.escape(remove.split(".")[0])):
        _load(ckpt)


def test_tokenizer_elsewhere(fx, tmp_path, vocab_dir, genes, cells):
    ckpt = _copy(fx, tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (ckpt / f).unlink()
    a = _load(ckpt, tokenizer=vocab_dir / "tgpt")
    ref = np.load(fx / "reference_inputs.npz")["input_ids"]
    toks = a.tokenize(_chunk(cells, genes), a.prepare(genes))
    np.testing.assert_array_equal(np.stack([t["input_ids"] for t in toks]), ref)


def test_corrupted_weights(fx, tmp_path):
    ckpt = _copy(fx, tmp_path)
    sd = load_file(ckpt / "model.safetensors")
    dropped = next(k for k in sd if k.endswith("h.1.mlp.c_fc.weight"))
    del sd[dropped]
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing"):
        _load(ckpt)


def test_shape_mismatch_and_wrong_model(fx, tmp_path):
    ckpt = _copy(fx, tmp_path)
    sd = load_file(ckpt / "model.safetensors")
    key = next(k for k in sd if k.endswith("h.0.ln_1.weight"))
    sd[key] = torch.ones(65)
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError):
        _load(ckpt)
    ckpt2 = _copy(fx, tmp_path / "b")
    cfg = (ckpt2 / "config.json").read_text().replace('"model_type": "gpt2"', '"model_type": "bert"')
    (ckpt2 / "config.json").write_text(cfg)
    with pytest.raises(CheckpointError):
        _load(ckpt2)


def test_max_len_beyond_positions(fx):
    with pytest.raises(CheckpointError, match="max_len"):
        _load(fx / "checkpoint", max_len=65)
