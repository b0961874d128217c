"""scGPT adapter: values against the ORIGINAL code's fixture (scgpt 0.2.4 ``embed_data``)."""

from __future__ import annotations

import json
import shutil
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
from scdm_embed.models.base import CellChunk, GenePlan
from scdm_embed.models.scgpt import ScGPTAdapter
from scdm_embed.runner import embed_matrix

from ._shared import load_adapter, read_cells, reference


@pytest.fixture(scope="module")
def fx(fixtures_dir: Path) -> Path:
    return fixtures_dir / "scgpt"


@pytest.fixture(scope="module")
def cells(fx: Path) -> ad.AnnData:
    return read_cells(fx / "cells.h5ad")


@pytest.fixture(scope="module")
def genes(cells: ad.AnnData) -> GeneTable:
    return GeneTable.from_var(cells.var)


@pytest.fixture(scope="module")
def ref(fx: Path) -> dict[str, np.ndarray]:
    return reference(fx)


_load = partial(load_adapter, ScGPTAdapter)  # (checkpoint, genes=None, **options)


@pytest.fixture(scope="module")
def adapter(fx: Path) -> ScGPTAdapter:
    return _load(fx / "checkpoint")


@pytest.fixture(scope="module")
def plan(adapter: ScGPTAdapter, genes: GeneTable) -> GenePlan:
    return adapter.prepare(genes)


@pytest.fixture(scope="module")
def embedded(adapter: ScGPTAdapter, cells: ad.AnnData, genes: GeneTable) -> np.ndarray:
    return embed_matrix(adapter, cells.X, genes, cells.obs_names, batch_size=64)


def _ref_batch(ref: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {"gene_ids": torch.from_numpy(ref["gene_ids"]), "values": torch.from_numpy(ref["values"]),
            "attention_mask": torch.from_numpy(~ref["pad_mask"])}


def _cls(adapter: ScGPTAdapter, batch: dict[str, torch.Tensor], *, normalize: bool) -> np.ndarray:
    adapter.normalize = normalize
    try:
        with torch.inference_mode():
            return adapter.pool(adapter.forward(batch), batch).numpy()
    finally:
        adapter.normalize = True


# -- (1) forward pass = original -----------------------------------------------------------------
def test_registered() -> None:
    assert get_adapter("scgpt") is ScGPTAdapter


def test_reference_inputs_reproduce_original(adapter: ScGPTAdapter, ref: dict[str, np.ndarray]) -> None:
    batch = _ref_batch(ref)
    raw = _cls(adapter, batch, normalize=False)
    emb = _cls(adapter, batch, normalize=True)
    assert raw.shape == emb.shape == (64, 64) == (64, adapter.dim)
    assert np.abs(raw - ref["cls_unnormalized"]).max() <= 1e-4
    assert np.abs(emb - ref["embeddings"]).max() <= 1e-4
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)


def test_padding_never_reaches_real_tokens(adapter: ScGPTAdapter, ref: dict[str, np.ndarray]) -> None:
    """Cells cut to different lengths, padded with junk: same <cls> as each cell alone, unpadded."""
    rng = np.random.default_rng(0)
    lengths = [1200, 37, 500, 2, 901, 64]
    width = max(lengths)
    ids = rng.integers(0, 60000, (len(lengths), width))
    vals = rng.uniform(-2, 60, (len(lengths), width)).astype(np.float32)
    mask = np.zeros((len(lengths), width), bool)
    singles = []
    for r, n in enumerate(lengths):
        ids[r, :n], vals[r, :n], mask[r, :n] = ref["gene_ids"][r, :n], ref["values"][r, :n], True
        one = {"gene_ids": torch.from_numpy(ref["gene_ids"][r:r + 1, :n]),
               "values": torch.from_numpy(ref["values"][r:r + 1, :n]),
               "attention_mask": torch.ones(1, n, dtype=torch.bool)}
        singles.append(_cls(adapter, one, normalize=False)[0])
    batch = {"gene_ids": torch.from_numpy(ids), "values": torch.from_numpy(vals),
             "attention_mask": torch.from_numpy(mask)}
    together = _cls(adapter, batch, normalize=False)
    assert np.abs(together - np.stack(singles)).max() <= 1e-5
    assert np.abs(together[0] - ref["cls_unnormalized"][0]).max() <= 1e-4


# -- (2) tokenization: genes and binning -----------------------------------------------------------
def _digitize(counts: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    edges = np.quantile(counts, np.linspace(0, 1, 50))
    return np.digitize(x, edges), np.digitize(x, edges, right=True)


def test_tokens_match_original_where_deterministic(adapter: ScGPTAdapter, plan: GenePlan, fx: Path,
                                                   cells: ad.AnnData, genes: GeneTable,
                                                   ref: dict[str, np.ndarray]) -> None:
    vocab = json.loads((fx / "checkpoint" / "vocab.json").read_text())
    col_ids = np.array([vocab.get(s, -1) for s in cells.var_names])
    dense = cells.X.toarray()
    X = sp.csr_matrix(cells.X, dtype=np.float32)
    ids = cells.obs_names.to_numpy()
    sampled = adapter.tokenize(CellChunk(X=X, cell_ids=ids, genes=genes), plan)
    unsampled = _load(fx / "checkpoint", max_length=100_000)
    full = unsampled.tokenize(CellChunk(X=X, cell_ids=ids, genes=genes), unsampled.prepare(genes))
    n_fixed = n_checked = 0
    for r in range(64):
        nz = np.flatnonzero((dense[r] > 0) & (col_ids >= 0))
        counts = dense[r, nz].astype(np.float32)
        gene_of = dict(zip(col_ids[nz], counts, strict=True))
        for tok in (sampled[r], full[r]):
            assert tok["gene_ids"][0] == vocab["<cls>"] and tok["values"][0] == -2.0
            assert tok["gene_ids"].dtype == np.int64 and tok["values"].dtype == np.float32
        # no sampling: exactly the cell's non-zero in-vocab genes, in dataset order
        np.testing.assert_array_equal(full[r]["gene_ids"][1:], col_ids[nz])
        # sampling: max_length tokens, a subset of those genes, bins computed BEFORE sampling
        assert len(sampled[r]["gene_ids"]) == 1200 == ref["gene_ids"].shape[1]
        bins_full = dict(zip(full[r]["gene_ids"][1:], full[r]["values"][1:], strict=True))
        assert len(set(sampled[r]["gene_ids"][1:])) == 1199
        picked = sampled[r]["gene_ids"][1:]
        np.testing.assert_array_equal(sampled[r]["values"][1:], [bins_full[g] for g in picked])
        # the original's genes are also a subset; bins agree wherever no random tie-breaking happens
        ref_genes, ref_vals = ref["gene_ids"][r, 1:], ref["values"][r, 1:]
        assert set(ref_genes) <= set(gene_of)
        left, right = _digitize(counts, np.array([gene_of[g] for g in ref_genes]))
        fixed = left == right
        assert np.all(ref_vals[fixed] == left[fixed])
        assert np.all((ref_vals >= right + 1) & (ref_vals <= left) | fixed)  # ties: inside the same range
        mine = np.array([bins_full[g] for g in ref_genes])
        assert np.all(mine[fixed] == ref_vals[fixed])
        assert np.all((mine >= right + 1) & (mine <= left) | fixed)
        n_fixed += int(fixed.sum())
        n_checked += len(fixed)
        all_bins = full[r]["values"][1:]
        assert all_bins.min() >= 1 and all_bins.max() <= 50
    assert n_fixed > 1000, (n_fixed, n_checked)


def test_gene_overlap_and_settings(adapter: ScGPTAdapter, genes: GeneTable) -> None:
    ov = adapter.prepare(genes).overlap
    assert (ov.n_data, ov.n_data_used, ov.n_vocab_in_data, ov.n_vocab) == (25077, 21052, 21052, 60694)
    s = adapter.settings()
    json.dumps(s)
    assert s["max_length"] == 1200 and s["binning"]["n_bins"] == 51 and s["pooling"] == "cls"


def test_empty_cell(adapter: ScGPTAdapter, plan: GenePlan, genes: GeneTable) -> None:
    X = sp.csr_matrix((2, len(genes)), dtype=np.float32)
    toks = adapter.tokenize(CellChunk(X=X, cell_ids=np.array(["a", "b"], dtype=object), genes=genes), plan)
    assert [t["gene_ids"].tolist() for t in toks] == [[60695], [60695]]


# -- (3) strict loading --------------------------------------------------------------------------
def _variant(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for f in ("vocab.json", "args.json"):
        shutil.copy(src / f, dst / f)
    state = torch.load(src / "best_model.pt", map_location="cpu", weights_only=True)
    torch.save(edit(dict(state)), dst / "best_model.pt")
    return dst


def test_extra_key_is_an_error(fx: Path, tmp_path: Path) -> None:
    ck = _variant(fx / "checkpoint", tmp_path / "ck", lambda s: {**s, "foo.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="unexpected key.*foo.weight"):
        _load(ck)


@pytest.mark.parametrize("key", ["transformer_encoder.layers.1.self_attn.Wqkv.bias", "mvc_decoder.W.weight",
                                 "encoder.enc_norm.weight"])
def test_missing_key_is_an_error(fx: Path, tmp_path: Path, key: str) -> None:
    ck = _variant(fx / "checkpoint", tmp_path / "ck", lambda s: {k: v for k, v in s.items() if k != key})
    with pytest.raises(CheckpointError, match=f"missing 1 key.*{key}"):
        _load(ck)


def test_shape_mismatch_is_an_error(fx: Path, tmp_path: Path) -> None:
    def cut(s):
        s["encoder.embedding.weight"] = s["encoder.embedding.weight"][:-1]
        return s

    with pytest.raises(CheckpointError, match="shape mismatch"):
        _load(_variant(fx / "checkpoint", tmp_path / "ck", cut))


def test_missing_file_is_an_error(fx: Path, tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    ck.mkdir()
    shutil.copy(fx / "checkpoint" / "args.json", ck / "args.json")
    with pytest.raises(CheckpointError, match="best_model.pt, vocab.json"):
        _load(ck)
    with pytest.raises(CheckpointError):
        ScGPTAdapter(tmp_path / "nowhere")


def test_in_proj_key_names_load_the_same(fx: Path, tmp_path: Path, ref: dict[str, np.ndarray]) -> None:
    """The non-flash ``self_attn.in_proj_{weight,bias}`` spelling loads to the same model."""
    def rename(s):
        return {k.replace("self_attn.Wqkv.", "self_attn.in_proj_"): v for k, v in s.items()}

    ck = _variant(fx / "checkpoint", tmp_path / "ck", rename)
    assert any("in_proj_weight" in k for k in torch.load(ck / "best_model.pt", weights_only=True))
    a = _load(ck)
    emb = _cls(a, _ref_batch(ref), normalize=True)
    assert np.abs(emb - ref["embeddings"]).max() <= 1e-4


# -- (4) determinism and batch invariance -----------------------------------------------------------
def test_deterministic_and_batch_invariant(adapter: ScGPTAdapter, cells: ad.AnnData, genes: GeneTable,
                                           embedded: np.ndarray) -> None:
    again = embed_matrix(adapter, cells.X, genes, cells.obs_names, batch_size=64)
    assert np.array_equal(embedded, again)
    for r in (0, 17, 40, 63):
        alone = embed_matrix(adapter, cells.X[r:r + 1], genes, cells.obs_names[r:r + 1], batch_size=1)
        assert np.abs(alone[0] - embedded[r]).max() <= 1e-5
    # the sampled tokens differ from the original's random draw, but the embedding stays close
    np.testing.assert_allclose(np.linalg.norm(embedded, axis=1), 1.0, atol=1e-6)


def test_batch_invariant_with_padding(adapter: ScGPTAdapter, plan: GenePlan, cells: ad.AnnData,
                                      genes: GeneTable) -> None:
    """Cells of very different lengths (so batches are padded): alone == in a batch of 64."""
    X = sp.csr_matrix(cells.X, dtype=np.float32)
    keep_cols = np.linspace(300, X.shape[1], 64).astype(int)  # cell r keeps genes < keep_cols[r]
    rows, cols = X.nonzero()
    X = sp.csr_matrix((np.asarray(X[rows, cols]).ravel() * (cols < keep_cols[rows]), (rows, cols)), shape=X.shape)
    ids = cells.obs_names.to_numpy()
    lengths = [len(t["gene_ids"]) for t in adapter.tokenize(CellChunk(X=X, cell_ids=ids, genes=genes), plan)]
    assert min(lengths) < 100 and max(lengths) == 1200 and len(set(lengths)) > 20
    batch = embed_matrix(adapter, X, genes, ids, batch_size=64)
    for r in (0, 1, 5, 30, 63):
        alone = embed_matrix(adapter, X[r:r + 1], genes, ids[r:r + 1], batch_size=1)
        assert np.abs(alone[0] - batch[r]).max() <= 1e-5


def test_seed_changes_only_sampled_cells(fx: Path, cells: ad.AnnData, genes: GeneTable,
                                         embedded: np.ndarray) -> None:
    other = _load(fx / "checkpoint", seed=1)
    emb = embed_matrix(other, cells.X[:4], genes, cells.obs_names[:4], batch_size=4)
    assert np.abs(emb - embedded[:4]).max() > 1e-3  # different ties and sample -> different embedding
    raw = _load(fx / "checkpoint", normalize=False)
    emb = embed_matrix(raw, cells.X[:4], genes, cells.obs_names[:4], batch_size=4)
    assert not np.allclose(np.linalg.norm(emb, axis=1), 1.0)
    assert np.abs(emb / np.linalg.norm(emb, axis=1, keepdims=True) - embedded[:4]).max() <= 1e-5


# -- (5) LoRA targets are on the forward path ------------------------------------------------------
def test_gradient_reaches_every_lora_target(fx: Path, ref: dict[str, np.ndarray]) -> None:
    a = _load(fx / "checkpoint")
    batch = _ref_batch(ref)
    batch = {k: v[:4, :300] for k, v in batch.items()}
    batch["attention_mask"][1, 100:] = False  # some padding too
    emb = a.pool(a.forward(batch), batch)
    (emb * torch.randn(emb.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    targets = {n: m for n, m in a.model.named_modules()
               if n.startswith("transformer_encoder.") and n.rsplit(".", 1)[-1] in ("Wqkv", "out_proj",
                                                                                   "linear1", "linear2")}
    assert len(targets) == 4 * 2
    for n, m in targets.items():
        assert isinstance(m, torch.nn.Linear), n
        assert m.weight.grad is not None and m.weight.grad.abs().max() > 0, n


def test_scgpt_human_extras_load(fx: Path, tmp_path: Path, ref: dict[str, np.ndarray]) -> None:
    """``flag_encoder.weight`` (generative pre-training, in scGPT_human) and the ``_impl.`` spelling
    of newer flash-attn wrappers load strictly; the embedding does not use the flag encoder."""
    def edit(s):
        s = {k.replace("self_attn.", "self_attn._impl."): v for k, v in s.items()}
        return {**s, "flag_encoder.weight": torch.randn(2, 64)}

    a = _load(_variant(fx / "checkpoint", tmp_path / "ck", edit))
    assert tuple(a.model.flag_encoder.weight.shape) == (2, 64)
    assert np.abs(_cls(a, _ref_batch(ref), normalize=True) - ref["embeddings"]).max() <= 1e-4


def test_bad_options_and_order(fx: Path, genes: GeneTable) -> None:
    with pytest.raises(ScdmError, match="max_length"):
        ScGPTAdapter(fx / "checkpoint", max_length=1)
    with pytest.raises(RuntimeError, match=r"call load\(\) before prepare"):
        ScGPTAdapter(fx / "checkpoint").prepare(genes)
