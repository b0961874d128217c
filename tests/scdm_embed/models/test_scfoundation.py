"""scFoundation adapter: reproduces the ORIGINAL get_embedding.py cell embeddings of the
reference fixture, batch invariance, determinism, strict loading, LoRA gradients."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scdm_embed.errors import CheckpointError, InputError, ScdmError
from scdm_embed.genes import GeneTable
from scdm_embed.models import get_adapter
from scdm_embed.models.scfoundation import ScFoundationAdapter
from scdm_embed.runner import collate, embed_matrix

from ._shared import CPU, load_adapter, make_chunk, read_cells


@pytest.fixture(scope="module")
def fx(fixtures_dir: Path) -> Path:
    return fixtures_dir / "scfoundation"


@pytest.fixture(scope="module")
def gene_index(vocab_dir: Path) -> Path:
    return vocab_dir / "scfoundation" / "OS_scRNA_gene_index.19264.tsv"


@pytest.fixture(scope="module")
def cells(fx: Path) -> ad.AnnData:
    return read_cells(fx / "cells.h5ad")


@pytest.fixture(scope="module")
def genes(cells: ad.AnnData) -> GeneTable:
    return GeneTable.from_var(cells.var)


def _adapter(ckpt: Path, gene_index: Path | None, genes: GeneTable | None = None, **opts) -> ScFoundationAdapter:
    if gene_index is not None:
        opts["gene_index"] = gene_index
    return load_adapter("scfoundation", ckpt, genes, **opts)


@pytest.fixture(scope="module")
def adapter(fx: Path, gene_index: Path, genes: GeneTable) -> ScFoundationAdapter:
    return _adapter(fx / "checkpoint", gene_index, genes)


@pytest.fixture(scope="module")
def embeddings(adapter: ScFoundationAdapter, cells: ad.AnnData, genes: GeneTable) -> np.ndarray:
    """All 64 fixture cells through tokenize + engine batching + forward + pool."""
    return embed_matrix(adapter, cells.X, genes, cells.obs_names, batch_size=16)


def _tokenize(a: ScFoundationAdapter, X, genes: GeneTable, ids) -> list[dict[str, np.ndarray]]:
    return a.tokenize(make_chunk(X, genes, ids), a.prepare(genes))


@pytest.fixture(scope="module")
def varied(cells: ad.AnnData) -> sp.csr_matrix:
    """64 cells with very different numbers of non-zero genes (12 .. ~1,200)."""
    rng = np.random.default_rng(0)
    X = sp.csr_matrix(cells.X, dtype=np.float32, copy=True)
    sizes = np.resize(np.unique(np.geomspace(12, 1500, 64).astype(int)), 64)
    rng.shuffle(sizes)
    for r in range(64):
        a, b = X.indptr[r], X.indptr[r + 1]
        X.data[a + rng.choice(b - a, size=b - a - sizes[r], replace=False)] = 0
    X.eliminate_zeros()
    return X


# -- fixture reproduction ---------------------------------------------------------------------
def test_metadata(adapter: ScFoundationAdapter) -> None:
    assert adapter.dim == 256  # 4 x 64 (3,072 for the released model)
    assert adapter.model is adapter.torch_module()
    s = adapter.settings()
    assert s["checkpoint_entry"] == "cell" and s["tgthighres"] == "t4" and s["pool_type"] == "all"


def test_gene_overlap(adapter: ScFoundationAdapter, genes: GeneTable) -> None:
    ov = adapter.prepare(genes).overlap
    assert (ov.n_vocab, ov.n_vocab_in_data, ov.n_data) == (19264, 13133, 25077)  # README: 13,133 present


def test_tokens_match_reference_inputs(adapter: ScFoundationAdapter, cells: ad.AnnData, genes: GeneTable,
                                       fx: Path) -> None:
    ref = np.load(fx / "reference_inputs.npz")
    toks = _tokenize(adapter, cells.X, genes, cells.obs_names)
    X = sp.csr_matrix(cells.X)
    vocab = adapter._read_gene_index()
    assert len(toks) == cells.n_obs == 64
    for i, tok in enumerate(toks):
        want = ref[f"cell{i:02d}_values"]
        # the sequence (which genes, in which order) is exact; the values carry float32 round-off of the
        # normalisation / log, which differs by 1 ulp across SIMD widths (AVX2 vs AVX-512)
        assert tok["values"].shape == want.shape and tok["values"].dtype == np.float32
        np.testing.assert_allclose(tok["values"], want, rtol=1e-6, atol=0)
        assert len(tok["gene_ids"]) == len(want)
        assert tok["gene_ids"][-2:].tolist() == [19264, 19265]
        assert np.all(np.diff(tok["gene_ids"]) > 0)
    # T = 4 and S = log10(sum of the ALIGNED counts), not of the full library
    vocab_set = set(vocab)
    aligned = np.array([s in vocab_set for s in cells.var_names])
    tot = X[0][:, aligned].sum()
    assert toks[0]["values"][-2] == 4.0
    assert abs(toks[0]["values"][-1] - np.log10(tot)) < 1e-6
    assert abs(np.log10(tot) - 4.3119) < 1e-4 and abs(np.log10(cells.obs["n_counts"].iloc[0]) - 4.3580) < 1e-4


def test_reproduces_original_embeddings(embeddings: np.ndarray, fx: Path) -> None:
    ref = np.load(fx / "reference_embeddings.npy")
    assert embeddings.shape == ref.shape == (64, 256)
    assert np.abs(embeddings - ref).max() <= 1e-4
    np.testing.assert_allclose(embeddings, ref, atol=1e-5, rtol=1e-4)


def test_concat_order_is_s_t_max_mean(adapter: ScFoundationAdapter, cells: ad.AnnData, genes: GeneTable,
                                      embeddings: np.ndarray) -> None:
    toks = _tokenize(adapter, cells.X[:1], genes, cells.obs_names[:1])
    batch = collate(toks, sequence_keys=adapter.sequence_keys, pad_values=dict(adapter.pad_values), device=CPU)
    with torch.inference_mode():
        h = adapter.forward(batch)[0]
    parts = [h[-1], h[-2], h[:-2].amax(0), h[:-2].mean(0)]
    np.testing.assert_allclose(torch.cat(parts).numpy(), embeddings[0], atol=1e-5)


# -- batching -----------------------------------------------------------------------------------
def test_batch_invariance(adapter: ScFoundationAdapter, varied: sp.csr_matrix, genes: GeneTable) -> None:
    ids = [f"c{i}" for i in range(64)]
    lengths = [len(t["values"]) for t in _tokenize(adapter, varied, genes, ids)]
    assert min(lengths) < 20 and max(lengths) > 1000
    together = embed_matrix(adapter, varied, genes, ids, batch_size=64)
    alone = embed_matrix(adapter, varied, genes, ids, batch_size=1)
    assert np.isfinite(together).all()
    assert np.abs(together - alone).max() <= 1e-5


def test_padding_does_not_leak(adapter: ScFoundationAdapter, varied: sp.csr_matrix, genes: GeneTable) -> None:
    """Changing what sits in the pad positions changes nothing."""
    toks = _tokenize(adapter, varied[:4], genes, ["a", "b", "c", "d"])
    batch = collate(toks, sequence_keys=adapter.sequence_keys, pad_values=dict(adapter.pad_values), device=CPU)
    noisy = dict(batch)
    pad = ~batch["attention_mask"]
    noisy["values"] = batch["values"].masked_fill(pad, 7.5)
    noisy["gene_ids"] = batch["gene_ids"].masked_fill(pad, 123)
    with torch.inference_mode():
        a = adapter.pool(adapter.forward(batch), batch)
        b = adapter.pool(adapter.forward(noisy), noisy)
    assert torch.equal(a, b)


def test_determinism(adapter: ScFoundationAdapter, varied: sp.csr_matrix, genes: GeneTable) -> None:
    ids = [f"c{i}" for i in range(16)]
    a = embed_matrix(adapter, varied[:16], genes, ids, batch_size=8)
    b = embed_matrix(adapter, varied[:16], genes, ids, batch_size=8)
    assert np.array_equal(a, b)


def test_gene_order_and_extra_genes_do_not_matter(adapter: ScFoundationAdapter, varied: sp.csr_matrix,
                                                  genes: GeneTable) -> None:
    X = varied[:6]
    perm = np.random.default_rng(1).permutation(X.shape[1])
    g2 = GeneTable(symbols=genes.symbols[perm], ensembl=genes.ensembl[perm])
    ids = [f"c{i}" for i in range(6)]
    base = embed_matrix(adapter, X, genes, ids)
    shuffled = embed_matrix(adapter, X[:, perm], g2, ids)
    assert np.abs(base - shuffled).max() <= 1e-6


def test_prepare_exact_symbols_first_duplicate(adapter: ScFoundationAdapter, genes: GeneTable) -> None:
    g = GeneTable(symbols=np.array(["A2M", "a2m", "A1BG", "A2M", "", "NOT_A_GENE"], dtype=object),
                  ensembl=np.array([""] * 6, dtype=object))
    ov = adapter.prepare(g).overlap
    assert (ov.n_vocab_in_data, ov.n_data_used, ov.n_data) == (2, 2, 6)
    X = sp.csr_matrix(np.array([[3, 100, 1, 50, 9, 9]], dtype=np.float32))
    (tok,) = _tokenize(adapter, X, g, ["x"])
    assert tok["gene_ids"].tolist() == [0, 2, 19264, 19265]  # A1BG(0), A2M(2, first column)
    np.testing.assert_allclose(tok["values"][:2], np.log1p(np.array([1, 3]) / 4 * 1e4), rtol=1e-6)
    assert np.isclose(tok["values"][-1], np.log10(4))
    with pytest.raises(InputError, match="no positive counts"):
        _tokenize(adapter, sp.csr_matrix(np.array([[0, 5, 0, 0, 1, 1]], dtype=np.float32)), g, ["empty"])


def test_options(fx: Path, gene_index: Path, genes: GeneTable, varied: sp.csr_matrix) -> None:
    a = _adapter(fx / "checkpoint", gene_index, genes, tgthighres="f2", pool_type="max", version="rde")
    assert a.dim == 64 and a.settings()["checkpoint_entry"] == "rde"
    (tok,) = _tokenize(a, varied[:1], genes, ["x"])
    assert np.isclose(tok["values"][-2], tok["values"][-1] + np.log10(2), atol=1e-6)
    emb = embed_matrix(a, varied[:2], genes, ["x", "y"])
    assert emb.shape == (2, 64) and np.isfinite(emb).all()
    with pytest.raises(ScdmError, match="tgthighres"):
        get_adapter("scfoundation")(fx / "checkpoint", tgthighres="x4")
    with pytest.raises(ScdmError, match="pre_normalized"):
        get_adapter("scfoundation")(fx / "checkpoint", pre_normalized="A")


# -- gradients (LoRA) ---------------------------------------------------------------------------
def _target_modules(model: torch.nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules()
            if any(n.endswith(t) for t in ScFoundationAdapter.lora_targets) and "encoder." in n]


def test_gradients_reach_every_projection(fx: Path, gene_index: Path, genes: GeneTable,
                                          varied: sp.csr_matrix) -> None:
    a = _adapter(fx / "checkpoint", gene_index, genes)
    targets = _target_modules(a.model)
    assert len(targets) == 4 * 2
    names = {n for n, _ in a.model.named_modules()}
    assert {"encoder.transformer_encoder.0.self_attn.out_proj", "encoder.transformer_encoder.1.linear2"} <= names
    toks = _tokenize(a, varied[:3], genes, ["a", "b", "c"])
    batch = collate(toks, sequence_keys=a.sequence_keys, pad_values=dict(a.pad_values), device=CPU)
    a.model.train()
    a.pool(a.forward(batch), batch).pow(2).sum().backward()
    mods = dict(a.model.named_modules())
    for t in targets:
        for p in mods[t].parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, t


def test_peft_lora_gradients(fx: Path, gene_index: Path, genes: GeneTable, varied: sp.csr_matrix) -> None:
    import peft
    a = _adapter(fx / "checkpoint", gene_index, genes)
    model = peft.get_peft_model(a.model, peft.LoraConfig(r=4, target_modules=list(ScFoundationAdapter.lora_targets)))
    a.model = model
    toks = _tokenize(a, varied[:3], genes, ["a", "b", "c"])
    batch = collate(toks, sequence_keys=a.sequence_keys, pad_values=dict(a.pad_values), device=CPU)
    a.pool(a.forward(batch), batch).sum().backward()
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert len(lora_b) == 4 * 2
    for n, p in lora_b.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


# -- strict loading -----------------------------------------------------------------------------
def _corrupt(fx: Path, tmp: Path, edit) -> Path:
    raw = torch.load(fx / "checkpoint" / "models.ckpt", map_location="cpu", weights_only=True)
    raw["cell"] = dict(raw["cell"], state_dict=dict(raw["cell"]["state_dict"]))
    edit(raw["cell"]["state_dict"])
    out = tmp / "ckpt"
    out.mkdir()
    torch.save(raw, out / "models.ckpt")
    return out


@pytest.mark.parametrize("case", ["missing", "unknown", "shape"])
def test_strict_loading_errors(fx: Path, gene_index: Path, tmp_path: Path, case: str) -> None:
    def edit(sd: dict) -> None:
        if case == "missing":
            del sd["model.encoder.transformer_encoder.1.linear1.weight"]
        elif case == "unknown":
            sd["model.encoder.transformer_encoder.2.linear1.weight"] = torch.zeros(3)
        else:
            sd["model.token_emb.emb.weight"] = torch.zeros(100, 32)

    ckpt = _corrupt(fx, tmp_path, edit)
    with pytest.raises(CheckpointError, match={"missing": "missing 1 key", "unknown": "1 unexpected key", "shape": "shape mismatch"}[case]):
        _adapter(ckpt, gene_index)


def test_decoder_keys_are_recognised(fx: Path, gene_index: Path, tmp_path: Path) -> None:
    """Decoder weights are not loaded (not needed for cell embeddings) and not required."""
    ckpt = _corrupt(fx, tmp_path, lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("model.decoder.")])
    a = _adapter(ckpt, gene_index)
    assert not any(n.startswith("decoder") for n, _ in a.model.named_parameters())


def test_missing_files(fx: Path, gene_index: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        get_adapter("scfoundation")(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="models.ckpt"):
        _adapter(tmp_path, gene_index)
    # no gene index beside the checkpoint and none given
    with pytest.raises(CheckpointError, match="OS_scRNA_gene_index"):
        _adapter(fx / "checkpoint", None)
    with pytest.raises(CheckpointError, match="gene_index"):
        _adapter(fx / "checkpoint", tmp_path / "missing.tsv")
    # the official layout: <dir>/models/models.ckpt + <dir>/OS_scRNA_gene_index.19264.tsv
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "models.ckpt").symlink_to(fx / "checkpoint" / "models.ckpt")
    (tmp_path / gene_index.name).symlink_to(gene_index)
    a = _adapter(tmp_path, None)
    assert a.dim == 256
    with pytest.raises(CheckpointError, match="'gene_x'"):
        _adapter(fx / "checkpoint", gene_index, key="gene_x")
