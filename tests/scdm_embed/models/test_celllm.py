"""CellLM adapter: official key layout loads strictly, the CLS + expressed-gene sequence and
bins of PerformerLM_CellLM.forward, genes kept in place, the original's padding to
max_seq_len reproduced (one weighted PAD key == thousands of explicit pads), batch
invariance, determinism, LoRA-target gradients.

No original-code fixture exists (weights and the 19,379-gene list are not public):
checkpoints are small random ones in the official layout (``_performer_ckpt``) over a
stand-in 19,379-gene axis (scGPT vocabulary symbols).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scdm_embed.errors import CheckpointError
from scdm_embed.genes import GeneTable
from scdm_embed.models import get_adapter
from scdm_embed.models.celllm import CellLMAdapter
from scdm_embed.runner import collate, embed_matrix

from ._performer_ckpt import (
    CELLLM_GENES,
    reference_encode,
    save_training_checkpoint,
    scgpt_symbols,
    write_celllm_checkpoint,
)
from ._shared import CPU, load_adapter, make_chunk, read_cells, tokenize_fresh

N_CELLS = 8


@pytest.fixture(scope="module")
def model_genes(vocab_dir: Path) -> list[str]:
    return scgpt_symbols(vocab_dir, CELLLM_GENES, skip=5000)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, model_genes: list[str]) -> Path:
    return write_celllm_checkpoint(tmp_path_factory.mktemp("celllm"), model_genes)


@pytest.fixture(scope="module")
def cells(fixtures_dir: Path) -> ad.AnnData:
    return read_cells(fixtures_dir / "tgpt" / "cells.h5ad", rows=np.r_[0:N_CELLS // 2, 32:32 + N_CELLS // 2])


@pytest.fixture(scope="module")
def genes(cells: ad.AnnData) -> GeneTable:
    return GeneTable.from_var(cells.var)


_adapter = partial(load_adapter, "celllm")  # (ckpt, genes=None, **options)


@pytest.fixture(scope="module")
def adapter(ckpt: Path, genes: GeneTable) -> CellLMAdapter:
    return _adapter(ckpt, genes)


@pytest.fixture(scope="module")
def embeddings(adapter: CellLMAdapter, cells: ad.AnnData, genes: GeneTable) -> np.ndarray:
    return embed_matrix(adapter, cells.X, genes, cells.obs_names, batch_size=N_CELLS)


_chunk = make_chunk  # (X, genes): float32 CSR, ids c0, c1, ...


_tok = tokenize_fresh  # (adapter, X, genes)


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt / "checkpoint4_fixed.pth", weights_only=True)["model_state_dict"]


def _hand_sequence(cells: ad.AnnData, r: int, model_genes: list[str], max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised full-length vector on the model axis (the Fullseq input), then the
    sequence PerformerLM_CellLM.forward builds from it, by hand."""
    col: dict[str, int] = {}
    for i, g in enumerate(cells.var_names):
        col.setdefault(g, i)
    row = cells.X[r].toarray()[0].astype(np.float64)
    counts = np.array([row[col[g]] if g in col else 0.0 for g in model_genes])
    x = np.log2(1.0 + counts / counts.sum() * 1e4)
    pos = np.flatnonzero(x > 0)
    exp = x[pos]
    exp[exp > 5] = 5  # cls_token_id - 1
    tokens = np.concatenate([[6], exp.astype(np.int64)])[:max_seq_len]
    gene_pos = np.concatenate([[CELLLM_GENES], pos])[:max_seq_len]
    return tokens, gene_pos


# -- loading --------------------------------------------------------------------------------
def test_registered_and_described(adapter: CellLMAdapter) -> None:
    assert get_adapter("celllm") is CellLMAdapter
    assert adapter.dim == 16 and adapter.sequence_keys == ("tokens", "genes")
    assert (adapter.cls_token, adapter.pad_token, adapter.max_bin) == (6, 7, 5)
    assert (adapter.cls_gene, adapter.pad_gene) == (CELLLM_GENES, CELLLM_GENES + 1)
    json.dumps(adapter.settings())
    assert adapter.settings()["gene2vec_cross_checked"] is True


def test_official_key_names_load_strictly(adapter: CellLMAdapter, ckpt: Path) -> None:
    state = _state(ckpt)
    own = adapter.model.state_dict()
    assert set(own) == set(state) - {"to_out.weight", "to_out.bias"}
    for k, v in own.items():
        assert torch.equal(v, state[k].to(v.dtype)), k
    # gene2vec + CLS row of ones + PAD row of zeros
    table = own["pos_emb.emb.weight"]
    assert table.shape[0] == CELLLM_GENES + 2
    assert torch.all(table[CELLLM_GENES] == 1) and torch.all(table[CELLLM_GENES + 1] == 0)


def test_checkpoint_errors(tmp_path: Path, ckpt: Path, model_genes: list[str]) -> None:
    (tmp_path / "genes.txt").write_text("\n".join(model_genes))
    state = _state(ckpt)
    del state["performer.net.layers.0.1.norm.bias"]
    save_training_checkpoint(tmp_path / "checkpoint4_fixed.pth", state)
    with pytest.raises(CheckpointError, match="missing.*layers.0.1.norm.bias"):
        _adapter(tmp_path)
    state = _state(ckpt)
    state["performer.net.layers.0.0.fn.local_attn.rel_pos.weight"] = torch.zeros(2)
    save_training_checkpoint(tmp_path / "checkpoint4_fixed.pth", state)
    with pytest.raises(CheckpointError, match="unexpected.*local_attn"):
        _adapter(tmp_path)
    save_training_checkpoint(tmp_path / "checkpoint4_fixed.pth", _state(ckpt))
    (tmp_path / "genes.txt").write_text("\n".join(model_genes[:100]))
    with pytest.raises(CheckpointError, match="19381 rows"):
        _adapter(tmp_path)
    (tmp_path / "genes.txt").unlink()
    with pytest.raises(CheckpointError, match="gene list was not found"):
        _adapter(tmp_path)
    assert _adapter(tmp_path, gene_list=ckpt / "genes.txt").dim == 16


# -- tokenization ---------------------------------------------------------------------------
def test_sequence_matches_hand_computation(adapter: CellLMAdapter, cells: ad.AnnData, genes: GeneTable,
                                           model_genes: list[str]) -> None:
    toks = _tok(adapter, cells.X[:3], genes)
    for r in range(3):
        tokens, gene_pos = _hand_sequence(cells, r, model_genes, 6000)
        np.testing.assert_array_equal(toks[r]["tokens"], np.append(tokens, 7))
        np.testing.assert_array_equal(toks[r]["genes"], np.append(gene_pos, CELLLM_GENES + 1))
        assert 1000 < len(tokens) < 6000 and len(np.unique(tokens[1:])) >= 4


def test_truncation_to_max_seq_len(ckpt: Path, cells: ad.AnnData, genes: GeneTable, model_genes: list[str]) -> None:
    a = _adapter(ckpt, genes, max_seq_len=50)
    t = _tok(a, cells.X[:1], genes)[0]
    tokens, gene_pos = _hand_sequence(cells, 0, model_genes, 50)
    assert len(t["tokens"]) == 51  # CLS + 49 genes, + the PAD key (weight 0 here)
    np.testing.assert_array_equal(t["tokens"][:-1], tokens)
    np.testing.assert_array_equal(t["genes"][:-1], gene_pos)


def test_gene_identity_not_column_order(adapter: CellLMAdapter, cells: ad.AnnData, genes: GeneTable,
                                        embeddings: np.ndarray, model_genes: list[str]) -> None:
    X = sp.csr_matrix(cells.X[:2], dtype=np.float32)
    perm = np.random.default_rng(1).permutation(X.shape[1])
    shuffled = GeneTable(symbols=genes.symbols[perm], ensembl=genes.ensembl[perm])
    a = _adapter(adapter.checkpoint, shuffled)
    for x, y in zip(_tok(adapter, X, genes), _tok(a, X[:, perm], shuffled), strict=True):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
        np.testing.assert_array_equal(x["genes"], y["genes"])
    emb = embed_matrix(a, X[:, perm], shuffled, ["a", "b"], batch_size=2)
    np.testing.assert_allclose(emb, embeddings[:2], atol=1e-5, rtol=0)
    # a model gene the dataset lacks is zero, i.e. absent from the sequence
    pos = {g: i for i, g in enumerate(model_genes)}
    j = next(j for j in np.argsort(-X[0].toarray()[0]) if genes.symbols[j] in pos)
    keep = np.r_[0:j, j + 1:X.shape[1]]
    dropped = GeneTable(symbols=genes.symbols[keep], ensembl=genes.ensembl[keep])
    seq = _tok(_adapter(adapter.checkpoint, dropped), X[:1, keep], dropped)[0]
    assert pos[genes.symbols[j]] in _tok(adapter, X[:1], genes)[0]["genes"]
    assert pos[genes.symbols[j]] not in seq["genes"]


# -- the model ------------------------------------------------------------------------------
@pytest.mark.parametrize("max_seq_len", [6000, 300])
def test_matches_explicitly_padded_forward(ckpt: Path, cells: ad.AnnData, genes: GeneTable,
                                           model_genes: list[str], max_seq_len: int) -> None:
    """One weighted PAD key == the original's explicit padding to max_seq_len (batch size 1),
    checked against a float64 transcription of PerformerLM_CellLM.forward. With 300 the cell
    is truncated and has no pads at all (the PAD key's weight is 0)."""
    a = _adapter(ckpt, genes, max_seq_len=max_seq_len)
    state = _state(ckpt)
    emb = embed_matrix(a, cells.X[:2], genes, cells.obs_names[:2], batch_size=2)
    for r in range(2):
        tokens, gene_pos = _hand_sequence(cells, r, model_genes, max_seq_len)
        n = len(tokens)
        t = np.full(max_seq_len, 7)
        g = np.full(max_seq_len, CELLLM_GENES + 1)
        t[:n], g[:n] = tokens, gene_pos
        mask = torch.arange(max_seq_len) < n
        hidden = reference_encode(state, torch.from_numpy(t)[None], torch.from_numpy(g)[None], mask[None])
        ref = (hidden[0] * mask[:, None]).sum(0) / n
        np.testing.assert_allclose(emb[r], ref.numpy(), atol=1e-5, rtol=0)


def test_pad_count_changes_the_embedding(ckpt: Path, cells: ad.AnnData, genes: GeneTable,
                                         embeddings: np.ndarray) -> None:
    """The original's pads enter the FAVOR+ normaliser: max_seq_len is part of the model."""
    a = _adapter(ckpt, genes, max_seq_len=12000)
    other = embed_matrix(a, cells.X[:1], genes, cells.obs_names[:1], batch_size=1)
    assert np.abs(other[0] - embeddings[0]).max() > 1e-4


def test_embeddings_batch_invariant_and_deterministic(adapter: CellLMAdapter, cells: ad.AnnData,
                                                      genes: GeneTable, embeddings: np.ndarray) -> None:
    lengths = [len(c["tokens"]) for c in _tok(adapter, cells.X, genes)]
    assert len(set(lengths)) == N_CELLS  # every batch pads some cells
    assert embeddings.shape == (N_CELLS, 16) and np.isfinite(embeddings).all()
    assert np.abs(embeddings[0] - embeddings[-1]).max() > 1e-3
    for r in (int(np.argmin(lengths)), int(np.argmax(lengths))):
        alone = embed_matrix(adapter, cells.X[r:r + 1], genes, cells.obs_names[r:r + 1], batch_size=1)
        np.testing.assert_allclose(alone[0], embeddings[r], atol=1e-5, rtol=0)
    again = embed_matrix(adapter, cells.X, genes, cells.obs_names, batch_size=3)
    np.testing.assert_allclose(again, embeddings, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(embed_matrix(adapter, cells.X, genes, cells.obs_names, batch_size=N_CELLS),
                                  embeddings)


def test_lora_targets_get_gradients(adapter: CellLMAdapter, cells: ad.AnnData, genes: GeneTable) -> None:
    a = _adapter(adapter.checkpoint, genes)
    batch = collate(_tok(a, cells.X[:3], genes), sequence_keys=a.sequence_keys,
                    pad_values=dict(a.pad_values), device=CPU)
    a.model.train()
    emb = a.pool(a.forward(batch), batch)
    assert torch.isfinite(emb).all()
    (emb * torch.randn(emb.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    targets = [(n, m) for n, m in a.model.named_modules() if n.split(".")[-1] in ("to_q", "to_k", "to_v", "to_out")]
    assert len(targets) == 4 * a.model.config.depth
    for n, m in targets:
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0, n
        assert torch.isfinite(m.weight.grad).all(), n
