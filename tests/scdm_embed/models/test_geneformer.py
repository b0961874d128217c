"""Geneformer adapter: tokens and embeddings equal the original code's (V1 fixture, last and
penultimate layer), V2 tokenization (<cls>/<eos>, 4,096 truncation, id collapsing), pooling,
batch invariance, determinism, strict loading, and the gene overlap on PC9."""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file, save_file

from scdm_embed.errors import CheckpointError, InputError, ScdmError
from scdm_embed.genes import GeneTable
from scdm_embed.models import get_adapter
from scdm_embed.models.base import CellChunk, GenePlan
from scdm_embed.models.geneformer import GeneformerAdapter
from scdm_embed.runner import collate, embed_matrix

from ._shared import (
    CPU,
    geneformer_v2_tokens,
    load_adapter,
    make_chunk,
    read_cells,
    read_pickle_dict,
)


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fx(fixtures_dir: Path) -> Path:
    return fixtures_dir / "geneformer"


@pytest.fixture(scope="module")
def gc30m(vocab_dir: Path) -> dict[str, str]:
    d = vocab_dir / "geneformer" / "gc30M"
    return {"token_dictionary": str(d / "token_dictionary_gc30M.pkl"),
            "gene_median_dictionary": str(d / "gene_median_dictionary_gc30M.pkl")}


@pytest.fixture(scope="module")
def gc95m_dir(vocab_dir: Path) -> Path:
    return vocab_dir / "geneformer" / "gc95M"


@pytest.fixture(scope="module")
def cells(fx: Path) -> ad.AnnData:
    return read_cells(fx / "cells.h5ad", float32=True)


@pytest.fixture(scope="module")
def genes(cells: ad.AnnData) -> GeneTable:
    """The genes as the CLI builds them (``read_input``); the adapter reads ``var.ensembl_id``
    from it as the original tokenizer does."""
    return GeneTable.from_var(cells.var)


_load = partial(load_adapter, GeneformerAdapter)  # (path, genes=None, **options)
_chunk = make_chunk  # (X, genes): float32 CSR, ids c0, c1, ...


@pytest.fixture(scope="module")
def v1(fx: Path, genes: GeneTable, gc30m: dict[str, str]) -> GeneformerAdapter:
    return _load(fx / "checkpoint", **gc30m)


@pytest.fixture(scope="module")
def v1_plan(v1: GeneformerAdapter, genes: GeneTable) -> GenePlan:
    return v1.prepare(genes)


# -- V1: the reference fixture ------------------------------------------------------------------
def test_registered() -> None:
    assert get_adapter("geneformer") is GeneformerAdapter


def test_tokens_equal_original(v1: GeneformerAdapter, v1_plan: GenePlan, cells: ad.AnnData, genes: GeneTable,
                               fx: Path) -> None:
    ref = np.load(fx / "reference_inputs.npz")
    toks = v1.tokenize(_chunk(cells.X, genes), v1_plan)
    assert len(toks) == 64
    for i, t in enumerate(toks):
        n = int(ref["lengths"][i])
        assert len(t["input_ids"]) == n == 2048
        np.testing.assert_array_equal(t["input_ids"], ref["input_ids"][i, :n])
    # the V1 quirk: duplicated Ensembl ids stay separate columns, so a token can occur twice
    assert any(len(np.unique(t["input_ids"])) < len(t["input_ids"]) for t in toks)
    assert v1.settings()["generation"] == "v1" and v1.settings()["max_length"] == 2048


@pytest.fixture(scope="module")
def v1_last(v1: GeneformerAdapter, cells: ad.AnnData, genes: GeneTable) -> np.ndarray:
    return embed_matrix(v1, cells.X, genes, cells.obs_names, batch_size=32)


def test_fixture_last_layer(v1_last: np.ndarray, fx: Path) -> None:
    ref = np.load(fx / "reference_embeddings.npy")
    assert v1_last.shape == ref.shape == (64, 64)
    assert np.abs(v1_last - ref).max() <= 1e-4


def test_fixture_penultimate_layer(fx: Path, cells: ad.AnnData, genes: GeneTable, gc30m: dict[str, str]) -> None:
    a = _load(fx / "checkpoint", layer=-2, **gc30m)
    emb = embed_matrix(a, cells.X, genes, cells.obs_names, batch_size=32)
    ref = np.load(fx / "reference_embeddings_penultimate_layer.npy")
    assert np.abs(emb - ref).max() <= 1e-4
    assert a.settings()["layer"] == -2


def test_batch_invariance_and_determinism(fx: Path, cells: ad.AnnData, genes: GeneTable,
                                          gc30m: dict[str, str]) -> None:
    a = _load(fx / "checkpoint", max_length=300, **gc30m)
    # mixed lengths: each cell keeps a different random share of its genes
    rng = np.random.default_rng(0)
    X = cells.X.tocoo()
    keep_p = rng.uniform(0.005, 0.2, size=X.shape[0])[X.row]
    keep = rng.random(X.nnz) < keep_p
    Xs = sp.csr_matrix((X.data[keep], (X.row[keep], X.col[keep])), shape=X.shape)
    lengths = [len(t["input_ids"]) for t in a.tokenize(_chunk(Xs, genes), a.prepare(genes))]
    assert len(set(lengths)) > 20 and min(lengths) < 60 and max(lengths) == 300
    together = embed_matrix(a, Xs, genes, cells.obs_names, batch_size=64)
    again = embed_matrix(a, Xs, genes, cells.obs_names, batch_size=64)
    np.testing.assert_array_equal(together, again)
    for i in range(0, 64, 3):
        alone = embed_matrix(a, Xs[i:i + 1], genes, cells.obs_names[i:i + 1], batch_size=1)
        assert np.abs(alone[0] - together[i]).max() <= 1e-5, i


def test_pool_excludes_padding(v1: GeneformerAdapter, v1_plan: GenePlan, cells: ad.AnnData, genes: GeneTable) -> None:
    toks = v1.tokenize(_chunk(cells.X[:1], genes), v1_plan)
    short = {"input_ids": toks[0]["input_ids"][:40]}
    batch = collate([short, {"input_ids": toks[0]["input_ids"][:100]}], sequence_keys=("input_ids",),
                    pad_values={"input_ids": 0}, device=CPU)
    with torch.inference_mode():
        out = v1.pool(v1.forward(batch), batch)
        hs = v1.model(input_ids=torch.from_numpy(short["input_ids"])[None], output_hidden_states=True).hidden_states
    torch.testing.assert_close(out[0], hs[-1][0].mean(0), atol=1e-5, rtol=1e-5)


def test_empty_cell_gets_zero_embedding(v1: GeneformerAdapter, cells: ad.AnnData, genes: GeneTable) -> None:
    X = sp.vstack([sp.csr_matrix((1, cells.n_vars), dtype=np.float32), cells.X[:1]]).tocsr()
    emb = embed_matrix(v1, X, genes, ["empty", "full"], batch_size=2)
    assert np.all(emb[0] == 0) and np.all(np.isfinite(emb)) and np.abs(emb[1]).max() > 0


# -- V2: gc95M dictionaries, tiny random model ----------------------------------------------------
@pytest.fixture(scope="module")
def v2_ckpt(tmp_path_factory: pytest.TempPathFactory, gc95m_dir: Path) -> Path:
    """A tiny random V2 model in the official folder layout, dictionaries inside it."""
    from transformers import BertConfig, BertForMaskedLM

    n_vocab = len(read_pickle_dict(gc95m_dir / "token_dictionary_gc95M.pkl"))
    d = tmp_path_factory.mktemp("gf_v2")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=n_vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=4096, hidden_act="relu", pad_token_id=0)
    BertForMaskedLM(cfg).eval().save_pretrained(d)
    for f in gc95m_dir.glob("*.pkl"):
        (d / f.name).symlink_to(f)
    return d


def test_v2_tokenization(v2_ckpt: Path, gc95m_dir: Path, cells: ad.AnnData, genes: GeneTable) -> None:
    a = _load(v2_ckpt)  # dictionaries found inside the checkpoint; generation from <cls>/<eos>
    s = a.settings()
    assert s["generation"] == "v2" and s["max_length"] == 4096 and s["collapse_gene_ids"]
    assert set(s["dictionaries"]) == {"token_dictionary", "gene_median_dictionary", "gene_name_id_dictionary",
                                      "ensembl_mapping_dictionary"}
    cls_id, eos_id = 2, 3
    # real cells: tokens equal the per-cell re-reading of the original, on var.ensembl_id as stored
    plan = a.prepare(genes)
    ov = plan.overlap
    assert ov.n_data == 25077 and ov.n_data_used > 14_000 and ov.n_vocab == 20271
    assert ov.details["columns_summed"] is True  # distinct given ids meet in the gc95M mapping
    toks = [t["input_ids"] for t in a.tokenize(_chunk(cells.X[:8], genes), plan)]
    ref = geneformer_v2_tokens(cells.X[:8], cells.var["ensembl_id"].astype(str), gc95m_dir)
    for t, r in zip(toks, ref, strict=True):
        np.testing.assert_array_equal(t, r)
        assert t[0] == cls_id and t[-1] == eos_id
        assert not np.isin(t[1:-1], [0, 1, cls_id, eos_id]).any()

    # a synthetic cell with 5,000 vocabulary genes: truncated to <cls> + 4,094 genes + <eos>
    tok = read_pickle_dict(gc95m_dir / "token_dictionary_gc95M.pkl")
    vocab_genes = [g for g in tok if g.startswith("ENSG")][:5000]
    ens = np.array([*vocab_genes, vocab_genes[0], "ENSG99999999999"], dtype=object)
    g = GeneTable(symbols=np.array([f"G{i}" for i in range(len(ens))], dtype=object), ensembl=ens)
    rng = np.random.default_rng(0)
    dense = rng.integers(1, 50, size=(2, len(ens))).astype(np.float32)
    dense[1, 100:] = 0  # a short second cell
    X = sp.csr_matrix(dense)
    plan = a.prepare(g)
    ov = plan.overlap
    # no two DISTINCT ids meet: the original sums nothing, the repeated id stays its own column
    assert (ov.n_data, ov.n_data_used, ov.n_vocab_in_data) == (5002, 5001, 5000)
    assert ov.details["columns_summed"] is False
    toks = [t["input_ids"] for t in a.tokenize(_chunk(X, g), plan)]
    assert len(toks[0]) == 4096 and len(toks[1]) == 102
    for t, r in zip(toks, geneformer_v2_tokens(X, ens, gc95m_dir), strict=True):
        np.testing.assert_array_equal(t, r)
    assert len(np.unique(toks[0])) < len(toks[0])

    # max_length option: 10 positions = <cls> + 8 genes + <eos>
    b = _load(v2_ckpt, max_length=10)
    t = b.tokenize(_chunk(X, g), b.prepare(g))[0]["input_ids"]
    np.testing.assert_array_equal(t, toks[0][:9].tolist() + [eos_id])


def test_v2_collision_sums_columns(v2_ckpt: Path, gc95m_dir: Path) -> None:
    """Two distinct given ids that the mapping sends to one id: every id's columns are summed
    (the repeated id too), the summed ids ranked after the unique ones on ties, lower case
    upper-cased, as ``sum_ensembl_ids``."""
    tok = read_pickle_dict(gc95m_dir / "token_dictionary_gc95M.pkl")
    mapping = read_pickle_dict(gc95m_dir / "ensembl_mapping_dict_gc95M.pkl")
    alias, target = next((k, v) for k, v in mapping.items() if k != v and v in tok and k.startswith("ENSG"))
    others = [g for g in tok if g.startswith("ENSG") and g != target and mapping.get(g) == g][:40]
    ens = np.array([target, *others, alias, others[0], others[1].lower(), "ENSG99999999999"], dtype=object)
    g = GeneTable(symbols=np.array([f"G{i}" for i in range(len(ens))], dtype=object), ensembl=ens)
    a = _load(v2_ckpt)
    plan = a.prepare(g)
    ov = plan.overlap
    assert ov.details["columns_summed"] is True
    assert (ov.n_data_used, ov.n_vocab_in_data) == (len(ens) - 1, 41)
    rng = np.random.default_rng(1)
    X = sp.csr_matrix(rng.integers(0, 4, size=(6, len(ens))).astype(np.float32))  # many ties
    toks = [t["input_ids"] for t in a.tokenize(_chunk(X, g), plan)]
    for t, r in zip(toks, geneformer_v2_tokens(X, ens, gc95m_dir), strict=True):
        np.testing.assert_array_equal(t, r)
        assert len(np.unique(t)) == len(t)  # one token per id


def test_map_symbols(v2_ckpt: Path, gc95m_dir: Path, cells: ad.AnnData, genes: GeneTable) -> None:
    """``map_symbols``: ids missing from var.ensembl_id are looked up by symbol (gene_name_id
    dictionary first, then the offline table); more genes, counted in the overlap report."""
    plain = _load(v2_ckpt).prepare(genes).overlap
    a = _load(v2_ckpt, map_symbols=True)
    plan = a.prepare(genes)
    ov = plan.overlap
    assert a.settings()["map_symbols"] is True and plain.details["map_symbols"] is False
    assert ov.n_data_used - plain.n_data_used == ov.details["used_by_symbol"] > 0
    name_id = read_pickle_dict(gc95m_dir / "gene_name_id_dict_gc95M.pkl")
    given = cells.var["ensembl_id"].astype(str).to_numpy()
    ens = [e if e.startswith("ENSG") else (name_id.get(s) or name_id.get(s.upper()) or o)
           for e, s, o in zip(given, genes.symbols, genes.ensembl, strict=True)]
    via = ov.details["resolved_via"]
    assert ov.details["resolved_by_symbol"] == sum(via.values()) == sum(e != "" for e in ens) - sum(given != "")
    assert via["gene_name_id_dictionary"] > 0 and via["offline_table"] > 0
    toks = [t["input_ids"] for t in a.tokenize(_chunk(cells.X[:4], genes), plan)]
    for t, r in zip(toks, geneformer_v2_tokens(cells.X[:4], ens, gc95m_dir), strict=True):
        np.testing.assert_array_equal(t, r)


def test_symbols_only_refused_unless_map_symbols(v1: GeneformerAdapter, cells: ad.AnnData) -> None:
    var = cells.var.drop(columns=["ensembl_id"])
    with pytest.raises(InputError, match="ensembl_id") as e:
        v1.prepare(GeneTable.from_var(var))
    assert "map_symbols=true" in str(e.value)
    # a var column of Ensembl ids under another name is suggested as --gene-key
    var["gene_ids"] = cells.var["ensembl_id"].astype(str).to_numpy()
    with pytest.raises(InputError) as e:
        v1.prepare(GeneTable.from_var(var))
    assert "--gene-key gene_ids" in str(e.value)
    assert v1.prepare(GeneTable.from_var(var, gene_key="gene_ids")).overlap.n_data_used == 14181


def test_cell_total_from_n_counts(v1: GeneformerAdapter, v1_plan: GenePlan, cells: ad.AnnData,
                                  genes: GeneTable) -> None:
    """``obs["n_counts"]`` (carried in the chunk) is the total; bad values are refused."""
    X = cells.X[:4]
    chunk = _chunk(X, genes)
    n = np.asarray(X.sum(1), dtype=np.float64).ravel()
    same = v1.tokenize(CellChunk(X=chunk.X, cell_ids=chunk.cell_ids, genes=genes, n_counts=n), v1_plan)
    for t, r in zip(same, v1.tokenize(chunk, v1_plan), strict=True):
        np.testing.assert_array_equal(t["input_ids"], r["input_ids"])
    for bad in (0.0, np.nan):
        with pytest.raises(InputError, match="n_counts"):
            v1.tokenize(CellChunk(X=chunk.X, cell_ids=chunk.cell_ids, genes=genes, n_counts=np.r_[n[:3], bad]),
                        v1_plan)


def test_v2_pooling(v2_ckpt: Path, cells: ad.AnnData, genes: GeneTable) -> None:
    from transformers import BertForMaskedLM

    ref_model = BertForMaskedLM.from_pretrained(v2_ckpt).eval()
    X = cells.X[:3]
    for pooling in ("mean", "cls"):
        a = _load(v2_ckpt, pooling=pooling, max_length=200)
        toks = a.tokenize(_chunk(X, genes), a.prepare(genes))
        emb = embed_matrix(a, X, genes, ["a", "b", "c"], batch_size=3)
        for i, t in enumerate(toks):
            with torch.inference_mode():
                h = ref_model(input_ids=torch.from_numpy(t["input_ids"])[None], output_hidden_states=True)
            last = h.hidden_states[-1][0]
            # Geneformer's emb_mode="cell": mean over genes, <cls> and <eos> excluded; "cls": position 0
            want = last[1:-1].mean(0) if pooling == "mean" else last[0]
            np.testing.assert_allclose(emb[i], want.numpy(), atol=1e-5, rtol=1e-5)


# -- errors -------------------------------------------------------------------------------------
def test_missing_dictionaries(fx: Path) -> None:
    a = GeneformerAdapter(fx / "checkpoint")
    with pytest.raises(CheckpointError, match="token_dictionary.*gene_median_dictionary") as e:
        a.load(device=CPU, dtype=torch.float32)
    assert "token_dictionary=PATH" in str(e.value) and "gene_median_dictionary=PATH" in str(e.value)


def test_wrong_generation_dictionary(fx: Path, gc95m_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="different generations"):
        _load(fx / "checkpoint", token_dictionary=str(gc95m_dir / "token_dictionary_gc95M.pkl"),
              gene_median_dictionary=str(gc95m_dir / "gene_median_dictionary_gc95M.pkl"))


def _copy_ckpt(fx: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(fx / "checkpoint" / f, dst / f)
    return dst


def test_corrupted_checkpoints(fx: Path, tmp_path: Path, gc30m: dict[str, str]) -> None:
    # a weight missing
    d = _copy_ckpt(fx, tmp_path / "missing")
    sd = load_file(d / "model.safetensors")
    key = next(k for k in sd if "layer.1.attention.self.query.weight" in k)
    del sd[key]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing"):
        _load(d, **gc30m)
    # an unexpected extra weight
    d = _copy_ckpt(fx, tmp_path / "extra")
    sd = load_file(d / "model.safetensors")
    sd["bert.encoder.layer.9.output.dense.weight"] = torch.zeros(2, 2)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="unexpected"):
        _load(d, **gc30m)
    # a truncated weights file
    d = _copy_ckpt(fx, tmp_path / "truncated")
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="cannot load"):
        _load(d, **gc30m)
    # no weights at all, no config
    d = _copy_ckpt(fx, tmp_path / "noweights")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        _load(d, **gc30m)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        _load(d, **gc30m)
    # a damaged dictionary
    bad = tmp_path / "token_dictionary_bad.pkl"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="cannot read the Geneformer dictionary"):
        _load(fx / "checkpoint", **{**gc30m, "token_dictionary": str(bad)})


def test_bad_options(fx: Path, gc30m: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ScdmError, match="pooling=cls needs a V2"):
        _load(fx / "checkpoint", pooling="cls", **gc30m)
    with pytest.raises(ScdmError, match="layer=5"):
        _load(fx / "checkpoint", layer=5, **gc30m)
    with pytest.raises(ScdmError, match="max_length=4096"):
        _load(fx / "checkpoint", max_length=4096, **gc30m)
    with pytest.raises(CheckpointError, match="generation=v2 needs <cls>"):
        _load(fx / "checkpoint", generation="v2", **gc30m)
    with pytest.raises(ScdmError, match="unknown geneformer option"):
        GeneformerAdapter(fx / "checkpoint", polling="mean")
    with pytest.raises(ScdmError, match="pooling='max'"):
        GeneformerAdapter(fx / "checkpoint", pooling="max")
    with pytest.raises(ScdmError, match="not an integer"):
        GeneformerAdapter(fx / "checkpoint", layer="last")
    with pytest.raises(CheckpointError, match="does not exist"):
        GeneformerAdapter(tmp_path / "nowhere")
    # two candidate dictionaries in the folder are refused, not guessed
    d = _copy_ckpt(fx, tmp_path / "two")
    for name in ("token_dictionary_a.pkl", "token_dictionary_b.pkl"):
        (d / name).symlink_to(gc30m["token_dictionary"])
    with pytest.raises(CheckpointError, match="several token_dictionary"):
        _load(d, gene_median_dictionary=gc30m["gene_median_dictionary"])


# -- gene overlap on the real dataset -------------------------------------------------------------
def test_pc9_overlap(pc9_path: Path, fx: Path, gc30m: dict[str, str], vocab_dir: Path) -> None:
    var = ad.read_h5ad(pc9_path, backed="r").var
    a = _load(fx / "checkpoint", **gc30m)
    # the CLI's table, default: var.ensembl_id as given, the README's 14,181 kept columns (14 ids twice)
    ov = a.prepare(GeneTable.from_var(var)).overlap
    assert (ov.n_data, ov.n_data_used, ov.n_vocab_in_data, ov.n_vocab) == (25077, 14181, 14167, 25424)
    # a table built by hand: its ensembl column counts as given
    given = GeneTable(symbols=np.asarray(var.index, dtype=object),
                      ensembl=np.asarray(var["ensembl_id"].astype(str), dtype=object))
    assert a.prepare(given).overlap.n_data_used == 14181
    # map_symbols: the gene_name_id dictionary, then the offline table, fill the missing ids
    b = _load(fx / "checkpoint", map_symbols=True,
              gene_name_id_dictionary=str(vocab_dir / "geneformer" / "gc30M" / "gene_name_id_dict_gc30M.pkl"),
              **gc30m)
    ov = b.prepare(GeneTable.from_var(var)).overlap
    assert (ov.n_data_used, ov.details["resolved_by_symbol"], ov.details["used_by_symbol"]) == (14208, 89, 27)
    assert b.prepare(given).overlap.n_data_used == 14183  # by hand: only the dictionary (no offline table)
