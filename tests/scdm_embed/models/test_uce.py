"""UCE adapter: original-code fixture, tokenizer structure, batch invariance, strict loading."""

from __future__ import annotations

import json
import pickle
import shutil
from functools import partial
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scdm_embed.errors import CheckpointError
from scdm_embed.genes import GeneTable
from scdm_embed.models import get_adapter
from scdm_embed.models.base import CellChunk
from scdm_embed.models.uce import UCEAdapter
from scdm_embed.runner import collate, embed_matrix

from ._shared import CPU, load_adapter, make_chunk, read_cells


@pytest.fixture(scope="module")
def uce_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "uce"


@pytest.fixture(scope="module")
def cells(uce_dir: Path) -> ad.AnnData:
    return read_cells(uce_dir / "cells.h5ad")


@pytest.fixture(scope="module")
def genes(cells: ad.AnnData) -> GeneTable:
    return GeneTable.from_var(cells.var)


_adapter = partial(load_adapter, "uce")  # (ckpt, genes=None, **options)


@pytest.fixture(scope="module")
def adapter(uce_dir: Path, genes: GeneTable) -> UCEAdapter:
    return _adapter(uce_dir / "checkpoint", genes)


@pytest.fixture(scope="module")
def small(uce_dir: Path, genes: GeneTable) -> UCEAdapter:
    """Short sentences (64 sampled genes) for the cheap forward tests."""
    return _adapter(uce_dir / "checkpoint", genes, sample_size=64)


@pytest.fixture(scope="module")
def vocab(uce_dir: Path) -> dict[str, tuple[int, int, int]]:
    """Independent expectation from the files: SYMBOL -> (token, chromosome token, start)."""
    files = uce_dir / "checkpoint" / "model_files"
    pe = torch.load(files / "protein_embeddings" / "Homo_sapiens.GRCh38.gene_symbol_to_embedding_ESM2.pt")
    with open(files / "species_offsets.pkl", "rb") as fh:
        offset = pickle.load(fh)["human"]
    chrom_offset = json.loads((uce_dir / "checkpoint" / "uce_args.json").read_text())["CHROM_TOKEN_OFFSET"]
    df = pd.read_csv(files / "species_chrom.csv")
    df["code"] = pd.Categorical(df["species"] + "_" + df["chromosome"]).codes
    df = df[df["species"] == "human"].set_index("gene_symbol")
    keys = [k.upper() for k in pe]
    return {k: (i + offset, int(df.loc[k, "code"]) + chrom_offset, int(df.loc[k, "start"]))
            for i, k in enumerate(keys)}


def _tokenize(a: UCEAdapter, X: sp.csr_matrix, ids: np.ndarray, genes: GeneTable) -> list[np.ndarray]:
    return [c["input_ids"] for c in a.tokenize(make_chunk(X, genes, ids), a.prepare(genes))]


def _groups(sent: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Split ``<cls> (chrom genes 2)*`` into (chromosome token, gene tokens)."""
    assert sent[0] == 3
    out, i = [], 1
    while i < len(sent):
        close = i + 1 + int(np.argmax(sent[i + 1:] == 2))
        assert sent[close] == 2
        out.append((int(sent[i]), sent[i + 1:close]))
        i = close + 1
    return out


def _check_sentence(sent: np.ndarray, expressed: set[str], vocab: dict, n_genes: int) -> None:
    tok2 = {v[0]: (v[1], v[2]) for v in vocab.values()}
    allowed = {vocab[s][0] for s in expressed if s in vocab}
    groups = _groups(sent)
    assert len(sent) == 1 + n_genes + 2 * len(groups) <= 1536
    assert (sent != 0).all()  # no padding inside a cell's sentence
    chroms = [c for c, _ in groups]
    assert len(set(chroms)) == len(chroms)  # each chromosome opened once
    assert sum(len(g) for _, g in groups) == n_genes
    for chrom_tok, toks in groups:
        assert chrom_tok >= 19938
        assert set(toks.tolist()) <= allowed  # only the cell's expressed genes
        assert all(tok2[t][0] == chrom_tok for t in toks)  # genes sit in their chromosome
        starts = [tok2[t][1] for t in toks]
        assert starts == sorted(starts)  # genomic order


# -- the original code's numbers -----------------------------------------------------------------
def test_fixture_embeddings_match_original(adapter: UCEAdapter, uce_dir: Path) -> None:
    """The exact sentences the original sampled -> the original's X_uce (all 64 cells)."""
    z = np.load(uce_dir / "reference_inputs.npz")
    ref = np.load(uce_dir / "reference_embeddings.npy")
    batch = {"input_ids": torch.from_numpy(z["cell_sentences"]),
             "attention_mask": torch.from_numpy(z["mask"]).bool()}
    with torch.inference_mode():
        emb = adapter.pool(adapter.forward(batch), batch).numpy()
    assert emb.shape == ref.shape == (64, adapter.dim) and adapter.dim == 64
    assert np.abs(emb - ref).max() <= 1e-4
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_reference_sentences_follow_our_gene_maps(uce_dir: Path, cells: ad.AnnData, vocab: dict) -> None:
    """The original's sentences obey the token / chromosome / start maps we build from the files."""
    z = np.load(uce_dir / "reference_inputs.npz")
    X = sp.csr_matrix(cells.X)
    names = np.array([s.upper() for s in cells.var_names])
    for i, sent in enumerate(z["cell_sentences"]):
        _check_sentence(sent[z["mask"][i] > 0], set(names[X[i].indices]), vocab, 1024)


# -- tokenizer -------------------------------------------------------------------------------------
def test_tokenizer_structure(adapter: UCEAdapter, cells: ad.AnnData, genes: GeneTable, vocab: dict) -> None:
    sents = _tokenize(adapter, cells.X, cells.obs_names, genes)
    X = sp.csr_matrix(cells.X)
    names = np.array([s.upper() for s in cells.var_names])
    assert len(sents) == cells.n_obs > 0
    for i, sent in enumerate(sents):
        assert sent.dtype == np.int64
        _check_sentence(sent, set(names[X[i].indices]), vocab, 1024)
    # the original's sentences have as many chromosomes (cells express genes on all 24-25)
    z = np.load(Path(adapter.checkpoint).parent / "reference_inputs.npz")
    assert [len(s) for s in sents] == [int(m.sum()) for m in z["mask"]]


def test_tokenizer_uses_the_datasets_own_genes(adapter: UCEAdapter, cells: ad.AnnData, genes: GeneTable,
                                               vocab: dict) -> None:
    """Reordered / subset genes -> the maps follow the symbols, not the column positions."""
    sub = cells[:8, ::-1][:, 3000:]
    g = GeneTable.from_var(sub.var)
    X = sp.csr_matrix(sub.X)
    names = np.array([s.upper() for s in sub.var_names])
    ov = adapter.prepare(g).overlap
    assert ov.n_data == len(g) and ov.n_data_used < adapter.prepare(genes).overlap.n_data_used
    for i, sent in enumerate(_tokenize(adapter, X, sub.obs_names, g)):
        _check_sentence(sent, set(names[X[i].indices]), vocab, 1024)


def test_tokenizer_deterministic_and_batch_free(adapter: UCEAdapter, cells: ad.AnnData,
                                                genes: GeneTable) -> None:
    ids = cells.obs_names.to_numpy()
    a1 = _tokenize(adapter, cells.X, ids, genes)
    a2 = _tokenize(adapter, cells.X, ids, genes)
    assert all(np.array_equal(x, y) for x, y in zip(a1, a2, strict=True))
    for i in (0, 17, 63):  # the same cell alone == in its chunk
        alone = _tokenize(adapter, cells.X[i:i + 1], ids[i:i + 1], genes)[0]
        assert np.array_equal(alone, a1[i])
    rev = _tokenize(adapter, cells.X[::-1], ids[::-1], genes)[::-1]
    assert all(np.array_equal(x, y) for x, y in zip(a1, rev, strict=True))
    # the seed and the cell id drive the sampling
    assert UCEAdapter(adapter.checkpoint, seed=1).seed == 1
    adapter.seed = 1
    try:
        assert not np.array_equal(_tokenize(adapter, cells.X[:1], ids[:1], genes)[0], a1[0])
    finally:
        adapter.seed = 0
    assert not np.array_equal(_tokenize(adapter, cells.X[:1], np.array(["renamed"]), genes)[0], a1[0])


def test_sampling_weights_are_log1p_counts(adapter: UCEAdapter, genes: GeneTable) -> None:
    """Genes are drawn with replacement, p proportional to log1p(counts)."""
    col = {s: i for i, s in enumerate(genes.symbols)}
    picks = ["GAPDH", "ACTB", "EGFR"]
    counts = np.array([1.0, 10.0, 200.0])
    n = 40
    X = sp.lil_matrix((n, len(genes)), dtype=np.float32)
    for j, s in enumerate(picks):
        X[:, col[s]] = counts[j]
    sents = _tokenize(adapter, X.tocsr(), np.array([f"c{i}" for i in range(n)]), genes)
    toks = np.concatenate(sents)
    plan = adapter.prepare(genes)
    tok_of = plan.vocab_ids[np.searchsorted(plan.columns, [col[s] for s in picks])]
    freq = np.array([(toks == t).sum() for t in tok_of]) / (n * 1024)
    np.testing.assert_allclose(freq, np.log1p(counts) / np.log1p(counts).sum(), atol=0.01)
    assert len(set(map(len, sents))) == 1  # GAPDH/ACTB/EGFR: chromosomes 12, 7, 7 -> 2 groups
    assert len(sents[0]) == 1 + 1024 + 4


def test_empty_cell_is_cls_only(small: UCEAdapter, genes: GeneTable) -> None:
    X = sp.lil_matrix((2, len(genes)), dtype=np.float32)
    X[1, np.setdiff1d(np.arange(len(genes)), small.prepare(genes).columns)[0]] = 5.0  # a gene UCE cannot use
    X = X.tocsr()
    sents = _tokenize(small, X, np.array(["a", "b"]), genes)
    assert [s.tolist() for s in sents] == [[3], [3]]
    emb = embed_matrix(small, X, genes, ["a", "b"])
    assert np.isfinite(emb).all()


# -- forward ---------------------------------------------------------------------------------------
def test_batch_invariance(small: UCEAdapter, cells: ad.AnnData, genes: GeneTable) -> None:
    """A cell's embedding is the same alone, in a batch with other lengths, and across re-runs."""
    X = sp.csr_matrix(cells.X[:12], dtype=np.float32).tolil()
    X[10] = 0
    X[10, np.flatnonzero(genes.symbols == "GAPDH")[0]] = 7  # one gene -> one chromosome, short
    X[11, :] = X[11].multiply(sp.csr_matrix((np.arange(len(genes)) < 2000).astype(np.float32)))
    X = X.tocsr()
    ids = list(cells.obs_names[:12])
    lens = {len(s) for s in _tokenize(small, X, np.array(ids), genes)}
    assert len(lens) >= 3 and min(lens) == 1 + 64 + 2  # the batch really pads
    together = embed_matrix(small, X, genes, ids, batch_size=64)
    alone = embed_matrix(small, X, genes, ids, batch_size=1)
    again = embed_matrix(small, X, genes, ids, batch_size=5)
    # other batch shapes sum float32 GEMMs in another order: ~1e-7 typically, up to 1.5e-5 seen on
    # an AVX-512 Xeon (MKL); an unmasked pad moves embeddings by > 1e-3 (see the last line)
    assert np.abs(together - alone).max() <= 5e-5
    assert np.abs(together - again).max() <= 5e-5
    np.testing.assert_array_equal(together, embed_matrix(small, X, genes, ids, batch_size=64))
    assert np.abs(together[0] - together[1]).max() > 1e-3


def test_padding_is_masked_not_added(adapter: UCEAdapter, uce_dir: Path) -> None:
    """Truncated reference sentences padded in one batch == each run alone (bool mask)."""
    z = np.load(uce_dir / "reference_inputs.npz")["cell_sentences"]
    cells_ = [{"input_ids": z[i, :n]} for i, n in enumerate((300, 120, 41))]
    batch = collate(cells_, sequence_keys=("input_ids",), pad_values={"input_ids": 0}, device=CPU)
    with torch.inference_mode():
        both = adapter.pool(adapter.forward(batch), batch)
        for i, c in enumerate(cells_):
            b1 = collate([c], sequence_keys=("input_ids",), pad_values={"input_ids": 0}, device=CPU)
            assert (adapter.pool(adapter.forward(b1), b1)[0] - both[i]).abs().max() <= 1e-5


def test_lora_targets_get_gradients(small: UCEAdapter, cells: ad.AnnData, genes: GeneTable) -> None:
    """Backward from the pooled output reaches every in_proj / out_proj / linear1 / linear2."""
    m = small.torch_module()
    assert m is small.model
    names = dict(m.named_modules())
    targets = [n for n in names if n.endswith(("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2"))]
    assert sorted(targets) == sorted(f"transformer_encoder.layers.0.{s}"
                                     for s in ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2"))
    assert all(isinstance(names[n], torch.nn.Linear) for n in targets)
    toks = small.tokenize(CellChunk(X=sp.csr_matrix(cells.X[:3], dtype=np.float32),
                                    cell_ids=cells.obs_names[:3].to_numpy(), genes=genes), small.prepare(genes))
    toks[2] = {"input_ids": toks[2]["input_ids"][:30]}
    batch = collate(toks, sequence_keys=("input_ids",), pad_values={"input_ids": 0}, device=CPU)
    m.zero_grad(set_to_none=True)
    emb = small.pool(small.forward(batch), batch)
    (emb * torch.randn(emb.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    for n in targets:
        for p in names[n].parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    m.zero_grad(set_to_none=True)


def test_settings_and_overlap(adapter: UCEAdapter, genes: GeneTable) -> None:
    s = adapter.settings()
    json.dumps(s)
    assert s["token_table"] == "all_tokens.torch" and s["chrom_token_offset"] == 19938
    assert (s["nlayers"], s["d_model"], s["nhead"], s["token_dim"], s["d_hid"]) == (1, 1280, 20, 16, 64)
    ov = adapter.prepare(genes).overlap
    assert ov.n_vocab == 19927 and ov.n_data == len(genes) and 0 < ov.n_data_used < ov.n_data


# -- strict loading --------------------------------------------------------------------------------
@pytest.fixture()
def ckpt_copy(uce_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "checkpoint"
    shutil.copytree(uce_dir / "checkpoint", dst)
    return dst


def _load_err(path: Path, **options: object) -> str:
    with pytest.raises(CheckpointError) as err:
        _adapter(path, **options)
    return str(err.value)


def test_missing_protein_embedding_file(ckpt_copy: Path) -> None:
    (ckpt_copy / "model_files" / "protein_embeddings" / "Homo_sapiens.GRCh38.gene_symbol_to_embedding_ESM2.pt").unlink()
    assert "human protein-embedding" in _load_err(ckpt_copy)
    _adapter(ckpt_copy, species="mouse")  # other species still load


@pytest.mark.parametrize("name", ["all_tokens.torch", "species_chrom.csv", "species_offsets.pkl",
                                  "1layer_randinit_model.torch"])
def test_missing_files(ckpt_copy: Path, name: str) -> None:
    (ckpt_copy / "model_files" / name).unlink()
    assert "fix:" in _load_err(ckpt_copy)


def _edit_state(ckpt: Path, fn) -> None:
    p = ckpt / "model_files" / "1layer_randinit_model.torch"
    sd = torch.load(p, map_location="cpu")
    fn(sd)
    p.chmod(0o644)
    torch.save(sd, p)


def test_missing_and_extra_keys(ckpt_copy: Path) -> None:
    _edit_state(ckpt_copy, lambda sd: sd.pop("transformer_encoder.layers.0.self_attn.in_proj_bias"))
    assert "transformer_encoder.layers.0.self_attn.in_proj_bias" in _load_err(ckpt_copy)
    _edit_state(ckpt_copy, lambda sd: sd.update({"transformer_encoder.layers.0.self_attn.in_proj_bias": torch.zeros(3840),
                                                 "extra.weight": torch.zeros(1)}))
    assert "extra.weight" in _load_err(ckpt_copy)
    _edit_state(ckpt_copy, lambda sd: sd.pop("pe_embedding.weight"))
    assert "pe_embedding.weight" in _load_err(ckpt_copy)


def test_wrong_shape(ckpt_copy: Path) -> None:
    _edit_state(ckpt_copy, lambda sd: sd.update({"decoder.0.0.bias": torch.zeros(7)}))
    assert "shape" in _load_err(ckpt_copy)


def test_wrong_chrom_token_offset(ckpt_copy: Path) -> None:
    assert "chrom_token_offset" in _load_err(ckpt_copy, chrom_token_offset=143574)
    args = json.loads((ckpt_copy / "uce_args.json").read_text())
    args["nlayers"] = 4
    (ckpt_copy / "uce_args.json").chmod(0o644)
    (ckpt_copy / "uce_args.json").write_text(json.dumps(args))
    assert "nlayers" in _load_err(ckpt_copy)


def test_no_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        get_adapter("uce")(None)
    with pytest.raises(CheckpointError):
        get_adapter("uce")(tmp_path / "nope")
