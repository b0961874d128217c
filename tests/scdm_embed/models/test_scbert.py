"""scBERT adapter: official key layout loads strictly, values binned as preprocess.py +
SCDataset, genes kept in place, the Performer reproduces a literal transcription of
PerformerLM.forward, batch invariance, determinism, LoRA-target gradients.

No original-code fixture exists (the 16,906-gene list and gene2vec file are not public):
checkpoints are small random ones in the official layout (``_performer_ckpt``) over a
stand-in 16,906-gene axis (the first 16,906 symbols of the scGPT vocabulary).
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

from scdm_embed.errors import CheckpointError, ScdmError
from scdm_embed.genes import GeneTable
from scdm_embed.models import get_adapter
from scdm_embed.models._performer import read_gene_list
from scdm_embed.models.scbert import ScBERTAdapter
from scdm_embed.runner import collate, embed_matrix

from ._performer_ckpt import (
    SCBERT_GENES,
    performer_state_dict,
    reference_encode,
    save_training_checkpoint,
    scgpt_symbols,
    write_scbert_checkpoint,
)
from ._shared import CPU, load_adapter, make_chunk, read_cells, tokenize_fresh

N_CELLS = 8  # every cell is 16,907 tokens long: keep the count small


@pytest.fixture(scope="module")
def model_genes(vocab_dir: Path) -> list[str]:
    return scgpt_symbols(vocab_dir, SCBERT_GENES)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, model_genes: list[str]) -> Path:
    return write_scbert_checkpoint(tmp_path_factory.mktemp("scbert"), model_genes)


@pytest.fixture(scope="module")
def cells(fixtures_dir: Path) -> ad.AnnData:
    return read_cells(fixtures_dir / "tgpt" / "cells.h5ad", rows=np.r_[0:N_CELLS // 2, 32:32 + N_CELLS // 2])  # sensitive + resistant


@pytest.fixture(scope="module")
def genes(cells: ad.AnnData) -> GeneTable:
    return GeneTable.from_var(cells.var)


_adapter = partial(load_adapter, "scbert")  # (ckpt, genes=None, **options)


@pytest.fixture(scope="module")
def adapter(ckpt: Path, genes: GeneTable) -> ScBERTAdapter:
    return _adapter(ckpt, genes)


@pytest.fixture(scope="module")
def embeddings(adapter: ScBERTAdapter, cells: ad.AnnData, genes: GeneTable) -> np.ndarray:
    return embed_matrix(adapter, cells.X, genes, cells.obs_names, batch_size=N_CELLS)


_chunk = make_chunk  # (X, genes): float32 CSR, ids c0, c1, ...


_tok = tokenize_fresh  # (adapter, X, genes)


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt / "panglao_pretrain.pth", weights_only=True)["model_state_dict"]


# -- loading --------------------------------------------------------------------------------
def test_registered_and_described(adapter: ScBERTAdapter) -> None:
    assert get_adapter("scbert") is ScBERTAdapter
    assert adapter.dim == 16 and adapter.sequence_keys == ()
    assert adapter.max_bin == 5  # num_tokens 7 = bin_num 5 + 2
    json.dumps(adapter.settings())
    assert adapter.settings()["gene2vec_cross_checked"] is True
    assert adapter.settings()["head_in_checkpoint"] == "mlm"


def test_official_key_names_load_strictly(adapter: ScBERTAdapter, ckpt: Path) -> None:
    state = _state(ckpt)
    own = adapter.model.state_dict()
    assert set(own) == set(state) - {"to_out.weight", "to_out.bias"}
    for k, v in own.items():
        assert torch.equal(v, state[k].to(v.dtype)), k
    cfg = adapter.model.config
    assert (cfg.depth, cfg.heads, cfg.dim_head, cfg.nb_features, cfg.ff_hidden, cfg.qkv_bias) == (2, 2, 8, 16, 64, False)
    assert cfg.n_positions == SCBERT_GENES + 1
    # the pre-training LM head is not part of the module (it is off the embedding path)
    assert not hasattr(adapter.model, "to_out")


def test_missing_key_is_an_error(tmp_path: Path, ckpt: Path, model_genes: list[str]) -> None:
    state = _state(ckpt)
    del state["performer.net.layers.1.0.fn.to_k.weight"]
    save_training_checkpoint(tmp_path / "panglao_pretrain.pth", state)
    (tmp_path / "genes.txt").write_text("\n".join(model_genes))
    with pytest.raises(CheckpointError, match="missing.*to_k"):
        _adapter(tmp_path)


def test_unexpected_key_is_an_error(tmp_path: Path, ckpt: Path, model_genes: list[str]) -> None:
    state = _state(ckpt)
    state["performer.net.layers.0.0.fn.extra.weight"] = torch.zeros(2)
    save_training_checkpoint(tmp_path / "panglao_pretrain.pth", state)
    (tmp_path / "genes.txt").write_text("\n".join(model_genes))
    with pytest.raises(CheckpointError, match="unexpected.*extra"):
        _adapter(tmp_path)


def test_missing_head_and_bad_shape_are_errors(tmp_path: Path, ckpt: Path, model_genes: list[str]) -> None:
    (tmp_path / "genes.txt").write_text("\n".join(model_genes))
    state = _state(ckpt)
    del state["to_out.bias"]
    save_training_checkpoint(tmp_path / "panglao_pretrain.pth", state)
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\) \[.to_out.bias.\]"):
        _adapter(tmp_path)
    state = _state(ckpt)
    state["performer.net.layers.1.1.fn.fn.w2.bias"] = torch.zeros(3)
    save_training_checkpoint(tmp_path / "panglao_pretrain.pth", state)
    with pytest.raises(CheckpointError, match="shape mismatch.*w2.bias"):
        _adapter(tmp_path)


def test_files_missing_or_mismatched_are_errors(tmp_path: Path, model_genes: list[str]) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        get_adapter("scbert")(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no single scbert checkpoint"):
        _adapter(tmp_path)
    write_scbert_checkpoint(tmp_path, model_genes, write_genes=False)
    with pytest.raises(CheckpointError, match="gene list was not found"):
        _adapter(tmp_path)
    (tmp_path / "genes.txt").write_text("\n".join(model_genes[:-1]))
    with pytest.raises(CheckpointError, match="16905 genes"):
        _adapter(tmp_path)
    (tmp_path / "genes.txt").write_text("\n".join(model_genes))
    np.save(tmp_path / "gene2vec_16906.npy", np.zeros((SCBERT_GENES, 3), np.float32))
    with pytest.raises(CheckpointError, match="gene2vec"):
        _adapter(tmp_path)
    (tmp_path / "panglao_pretrain.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="readable"):
        _adapter(tmp_path)
    with pytest.raises(ScdmError, match="unknown scbert option 'bins'"):
        get_adapter("scbert")(tmp_path, bins=3)


def test_finetuned_checkpoint_head_is_recognised(tmp_path: Path, model_genes: list[str]) -> None:
    g2v = np.random.default_rng(0).normal(size=(SCBERT_GENES, 8)).astype(np.float32)
    sd = performer_state_dict(num_tokens=7, gene2vec=g2v, extra_rows=[0.0], depth=1, head="scbert_finetune")
    save_training_checkpoint(tmp_path / "finetuned.pth", sd)
    a = _adapter(tmp_path / "finetuned.pth", gene_list=_write(tmp_path / "g.txt", model_genes))
    assert a.head_layout == "scbert_finetune" and a.dim == 8


def _write(path: Path, genes: list[str]) -> Path:
    path.write_text("\n".join(genes) + "\n")
    return path


def test_gene_list_formats(tmp_path: Path) -> None:
    names = ["TP53", "EGFR", "KRAS"]
    assert list(read_gene_list(_write(tmp_path / "g.txt", names))) == names
    (tmp_path / "g.csv").write_text("idx,gene_name,x\n0,TP53,1\n1,EGFR,2\n2,KRAS,3\n")
    assert list(read_gene_list(tmp_path / "g.csv")) == names
    ad.AnnData(X=np.zeros((1, 3), np.float32), var={"x": [1, 2, 3]}).write_h5ad(tmp_path / "g.h5ad")
    a = ad.read_h5ad(tmp_path / "g.h5ad")
    a.var_names = names
    a.write_h5ad(tmp_path / "g.h5ad")
    assert list(read_gene_list(tmp_path / "g.h5ad")) == names


# -- tokenization ---------------------------------------------------------------------------
def test_binning_matches_hand_computation(adapter: ScBERTAdapter, cells: ad.AnnData, genes: GeneTable,
                                          model_genes: list[str]) -> None:
    """preprocess.py (reference gene axis, normalize_total 1e4, log1p base 2) then SCDataset
    (``x[x > 5] = 5``, ``.long()``, append 0), by hand, gene by gene, on real PC9 cells."""
    col = {}
    for i, g in enumerate(cells.var_names):
        col.setdefault(g, i)
    dense = cells.X[:3].toarray().astype(np.float64)
    toks = _tok(adapter, cells.X[:3], genes)
    for r in range(3):
        counts = np.array([dense[r, col[g]] if g in col else 0.0 for g in model_genes])
        values = np.log2(1.0 + counts / counts.sum() * 1e4)
        values[values > 5] = 5
        expected = np.append(values.astype(np.int64), 0)
        got = toks[r]["tokens"]
        assert got.shape == (SCBERT_GENES + 1,) and got.dtype == np.uint8
        np.testing.assert_array_equal(got.astype(np.int64), expected)
        assert len(np.unique(expected)) >= 4  # several bins really occur


def test_gene_identity_not_column_order(adapter: ScBERTAdapter, cells: ad.AnnData, genes: GeneTable,
                                        embeddings: np.ndarray) -> None:
    X = sp.csr_matrix(cells.X[:2], dtype=np.float32)
    perm = np.random.default_rng(0).permutation(X.shape[1])
    shuffled = GeneTable(symbols=genes.symbols[perm], ensembl=genes.ensembl[perm])
    a = _adapter(adapter.checkpoint, shuffled)
    t0 = _tok(adapter, X, genes)
    t1 = _tok(a, X[:, perm], shuffled)
    for x, y in zip(t0, t1, strict=True):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    emb = embed_matrix(a, X[:, perm], shuffled, ["a", "b"], batch_size=2)
    np.testing.assert_allclose(emb, embeddings[:2], atol=1e-5, rtol=0)


def test_gene_missing_from_dataset_becomes_zero(adapter: ScBERTAdapter, cells: ad.AnnData, genes: GeneTable,
                                                model_genes: list[str]) -> None:
    X = sp.csr_matrix(cells.X[:1], dtype=np.float32)
    dense = X.toarray()[0]
    pos = {g: i for i, g in enumerate(model_genes)}
    # an expressed dataset gene that the model knows
    j = next(j for j in np.argsort(-dense) if genes.symbols[j] in pos)
    g = genes.symbols[j]
    keep = np.r_[0:j, j + 1:X.shape[1]]
    dropped = GeneTable(symbols=genes.symbols[keep], ensembl=genes.ensembl[keep])
    a = _adapter(adapter.checkpoint, dropped)
    without = _tok(a, X[:, keep], dropped)[0]["tokens"]
    assert _tok(adapter, X, genes)[0]["tokens"][pos[g]] > 0
    assert without[pos[g]] == 0
    zeroed = X.toarray()
    zeroed[0, j] = 0
    np.testing.assert_array_equal(without, _tok(adapter, zeroed, genes)[0]["tokens"])
    overlap = a.prepare(dropped).overlap
    assert overlap.n_vocab == SCBERT_GENES and overlap.n_data == X.shape[1] - 1
    assert overlap.n_vocab_in_data == adapter.prepare(genes).overlap.n_vocab_in_data - 1


# -- the model ------------------------------------------------------------------------------
def test_matches_literal_performer_forward(adapter: ScBERTAdapter, ckpt: Path, cells: ad.AnnData,
                                           genes: GeneTable, embeddings: np.ndarray) -> None:
    """The adapter == a float64 transcription of PerformerLM.forward on one cell (predict.py)."""
    state = _state(ckpt)
    for r in (0, N_CELLS - 1):
        tokens = torch.from_numpy(_tok(adapter, cells.X[r:r + 1], genes)[0]["tokens"]).long()
        ref = reference_encode(state, tokens[None]).mean(dim=1)[0].numpy()
        np.testing.assert_allclose(embeddings[r], ref, atol=1e-5, rtol=0)


def test_embeddings_batch_invariant_and_deterministic(adapter: ScBERTAdapter, cells: ad.AnnData,
                                                      genes: GeneTable, embeddings: np.ndarray) -> None:
    assert embeddings.shape == (N_CELLS, 16) and np.isfinite(embeddings).all()
    assert np.abs(embeddings[0] - embeddings[-1]).max() > 1e-3  # cells differ
    for r in (0, 5):
        alone = embed_matrix(adapter, cells.X[r:r + 1], genes, cells.obs_names[r:r + 1], batch_size=1)
        np.testing.assert_allclose(alone[0], embeddings[r], atol=1e-5, rtol=0)
    again = embed_matrix(adapter, cells.X, genes, cells.obs_names, batch_size=3)
    np.testing.assert_allclose(again, embeddings, atol=1e-5, rtol=0)
    a2 = _adapter(adapter.checkpoint, genes)
    np.testing.assert_array_equal(embed_matrix(a2, cells.X[:2], genes, cells.obs_names[:2], batch_size=2),
                                  embed_matrix(adapter, cells.X[:2], genes, cells.obs_names[:2], batch_size=2))


def test_lora_targets_get_gradients(adapter: ScBERTAdapter, cells: ad.AnnData, genes: GeneTable) -> None:
    """Every to_q/to_k/to_v/to_out is a real call on the path to the pooled output."""
    a = _adapter(adapter.checkpoint, genes)
    batch = collate(_tok(a, cells.X[:2], genes), sequence_keys=(), pad_values={}, device=CPU)
    a.model.train()
    emb = a.pool(a.forward(batch), batch)
    (emb * torch.randn(emb.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    targets = [(n, m) for n, m in a.model.named_modules() if n.split(".")[-1] in ("to_q", "to_k", "to_v", "to_out")]
    assert len(targets) == 4 * a.model.config.depth
    for n, m in targets:
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0, n
    assert a.model.pos_emb.emb.weight.grad is None  # frozen gene2vec, as from_pretrained
    # no feature redraw: the projection matrices are the checkpoint's after training mode
    state = _state(adapter.checkpoint)
    key = "performer.net.layers.0.0.fn.fast_attention.projection_matrix"
    assert torch.equal(a.model.state_dict()[key], state[key])
