"""CLI parity: ``scdm-embed extract`` with DEFAULT options reproduces the ORIGINAL code's
embeddings of the reference fixtures (what a user types, read back from the store).

Tolerance 1e-5 (max abs): both sides run the same float32 network on the same tokens; only
float32 round-off of differently ordered reductions (batching, BLAS kernels, AVX2 vs AVX-512)
separates them. The fixtures' closest pair of cells is 0.014 apart, far above it.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import scdm_embed
from scdm_embed.cli import app
from tests.conftest import store_snapshot

from .models._shared import geneformer_v2_tokens, read_pickle_dict

ATOL = 1e-5  # float32 round-off (see the module docstring)
SMALL_ROWS = [0, 1, 2, 3, 32, 33, 34, 35]  #: fixture cells of the fast tests (4 per class)


def _extract(store: Path, cells: Path, model: str, ckpt: Path, *extra: str) -> tuple[int, str]:
    r = CliRunner().invoke(app, ["extract", str(cells), "--model", model, "--checkpoint", str(ckpt),
                                 "--store", str(store), "--quiet", *extra])
    if r.exit_code not in (0, 2):  # a crash: show it
        raise AssertionError(r.output) from r.exception
    return r.exit_code, r.output


def _stored(store: Path, model: str) -> np.ndarray:
    X, cells = scdm_embed.EmbeddingStore(store).load(model)
    return X


def _attrs(store: Path, model: str, dataset: str) -> dict:
    return dict(scdm_embed.EmbeddingStore(store, mode="r").embedding_group(model, dataset).attrs)


def _link_dir(dst: Path, *files: Path) -> Path:
    dst.mkdir()
    for f in files:
        (dst / f.name).symlink_to(f)
    return dst


# -- Geneformer V1 (gc30M) ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def gf(fixtures_dir: Path) -> Path:
    return fixtures_dir / "geneformer"


@pytest.fixture(scope="module")
def gf_ckpt(tmp_path_factory: pytest.TempPathFactory, gf: Path, vocab_dir: Path) -> Path:
    """The fixture weights + the gc30M dictionaries, in the official folder layout."""
    d = tmp_path_factory.mktemp("gf") / "ckpt"
    return _link_dir(d, gf / "checkpoint" / "config.json", gf / "checkpoint" / "model.safetensors",
                     *sorted((vocab_dir / "geneformer" / "gc30M").glob("*.pkl")))


@pytest.fixture(scope="module")
def gf_small(tmp_path_factory: pytest.TempPathFactory, gf: Path) -> Path:
    """8 fixture cells (4 per class), as written by a user."""
    a = ad.read_h5ad(gf / "cells.h5ad")
    p = tmp_path_factory.mktemp("gf_small") / "cells8.h5ad"
    a[SMALL_ROWS].copy().write_h5ad(p)
    return p


def test_geneformer_default_equals_original(tmp_path: Path, gf: Path, gf_ckpt: Path) -> None:
    code, out = _extract(tmp_path / "s.zarr", gf / "cells.h5ad", "geneformer", gf_ckpt)
    assert code == 0, out
    emb = _stored(tmp_path / "s.zarr", "geneformer")
    ref = np.load(gf / "reference_embeddings.npy")
    assert emb.shape == ref.shape == (64, 64)
    assert np.abs(emb - ref).max() <= ATOL
    a = _attrs(tmp_path / "s.zarr", "geneformer", "cells")
    # the README's 14,181 columns of var.ensembl_id (14 ids twice), nothing looked up by symbol
    ov = a["gene_overlap"]
    assert (ov["n_data_used"], ov["n_vocab_in_data"]) == (14181, 14167)
    assert ov["details"]["gene_ids"] == "var['ensembl_id']" and "resolved_by_symbol" not in ov["details"]
    assert a["settings"]["map_symbols"] is False


def test_geneformer_gene_key_ensembl_id_accepts_duplicates(tmp_path: Path, gf: Path, gf_small: Path,
                                                           gf_ckpt: Path) -> None:
    """``var.ensembl_id`` repeats 14 used ids (and ""): accepted, each column its own gene."""
    code, out = _extract(tmp_path / "s.zarr", gf_small, "geneformer", gf_ckpt, "--gene-key", "ensembl_id")
    assert code == 0, out
    ref = np.load(gf / "reference_embeddings.npy")[SMALL_ROWS]
    assert np.abs(_stored(tmp_path / "s.zarr", "geneformer") - ref).max() <= ATOL
    a = _attrs(tmp_path / "s.zarr", "geneformer", "cells8")
    assert a["gene_key"] == "ensembl_id" and a["gene_overlap"]["n_data_used"] == 14181


def test_duplicate_gene_key_still_refused_for_other_models(tmp_path: Path, gf: Path, fixtures_dir: Path) -> None:
    store = tmp_path / "s.zarr"
    code, out = _extract(store, gf / "cells.h5ad", "tgpt", fixtures_dir / "tgpt" / "checkpoint",
                         "--gene-key", "ensembl_id")
    assert code == 2 and "duplicate gene ids" in out and "Traceback" not in out
    assert not store.exists()


def test_geneformer_map_symbols_uses_more_genes(tmp_path: Path, gf_small: Path, gf_ckpt: Path, gf: Path) -> None:
    store = tmp_path / "s.zarr"
    assert _extract(store, gf_small, "geneformer", gf_ckpt)[0] == 0
    code, out = _extract(store, gf_small, "geneformer", gf_ckpt, "-o", "map_symbols=true", "--dataset", "mapped")
    assert code == 0, out
    default, mapped = _attrs(store, "geneformer", "cells8"), _attrs(store, "geneformer", "mapped")
    d, m = default["gene_overlap"], mapped["gene_overlap"]
    assert m["n_data_used"] > d["n_data_used"] == 14181
    assert m["details"]["used_by_symbol"] == m["n_data_used"] - d["n_data_used"] > 0
    assert m["details"]["resolved_by_symbol"] >= m["details"]["used_by_symbol"]
    assert mapped["settings"]["map_symbols"] is True and mapped["options"]["map_symbols"] is True
    X, cells = scdm_embed.EmbeddingStore(store).load("geneformer", datasets=["cells8", "mapped"])
    ref = np.load(gf / "reference_embeddings.npy")[SMALL_ROWS]
    assert np.abs(X[:8] - ref).max() <= ATOL
    assert np.abs(X[8:] - ref).max() > 1e-3  # other tokens: no longer the original's embedding


def test_geneformer_refuses_symbols_without_ensembl_ids(tmp_path: Path, gf_small: Path, gf_ckpt: Path) -> None:
    a = ad.read_h5ad(gf_small)
    del a.var["ensembl_id"]
    p = tmp_path / "symbols.h5ad"
    a.write_h5ad(p)
    store = tmp_path / "s.zarr"
    code, out = _extract(store, p, "geneformer", gf_ckpt)
    assert code == 2 and "map_symbols=true" in out and "ensembl_id" in out and "Traceback" not in out
    assert not store.exists()
    # the opt-in runs
    code, out = _extract(store, p, "geneformer", gf_ckpt, "--option", "map_symbols=true")
    assert code == 0, out
    assert _attrs(store, "geneformer", "symbols")["gene_overlap"]["details"]["gene_ids"] == "none"


def test_geneformer_ensembl_var_names_stand_in(tmp_path: Path, gf_small: Path, gf_ckpt: Path) -> None:
    """No ``ensembl_id`` column but Ensembl ``var_names``: those are the ids (the original's
    ``use_h5ad_index``), giving what the same file with the column gives."""
    a = ad.read_h5ad(gf_small)
    ens = a.var["ensembl_id"].astype(str)
    a = a[:, (ens != "").to_numpy() & ~ens.duplicated().to_numpy()].copy()  # var_names must be unique
    a.var_names = a.var["ensembl_id"].astype(str).to_numpy()
    a.write_h5ad(tmp_path / "with_column.h5ad")
    del a.var["ensembl_id"]
    a.write_h5ad(tmp_path / "names_only.h5ad")
    store = tmp_path / "s.zarr"
    for name in ("with_column", "names_only"):
        code, out = _extract(store, tmp_path / f"{name}.h5ad", "geneformer", gf_ckpt)
        assert code == 0, out
    assert _attrs(store, "geneformer", "names_only")["gene_overlap"]["details"]["gene_ids"] == "var_names"
    X, _ = scdm_embed.EmbeddingStore(store).load("geneformer", datasets=["with_column", "names_only"])
    np.testing.assert_array_equal(X[:8], X[8:])  # same tokens, same process: bit-identical


def test_geneformer_bad_n_counts_refused(tmp_path: Path, gf_small: Path, gf_ckpt: Path) -> None:
    a = ad.read_h5ad(gf_small)
    a.obs["n_counts"] = a.obs["n_counts"].astype(float)
    a.obs.iloc[2, a.obs.columns.get_loc("n_counts")] = 0.0
    p = tmp_path / "bad.h5ad"
    a.write_h5ad(p)
    store = tmp_path / "s.zarr"
    before = store_snapshot(store)
    code, out = _extract(store, p, "geneformer", gf_ckpt)
    assert code == 2 and "n_counts" in out and "Traceback" not in out
    assert store_snapshot(store) == before


# -- Geneformer V2 (gc95M): a tiny random model, the original's rule re-stated (_shared) -------
@pytest.fixture(scope="module")
def v2_ckpt(tmp_path_factory: pytest.TempPathFactory, vocab_dir: Path) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    gc95m = vocab_dir / "geneformer" / "gc95M"
    d = _link_dir(tmp_path_factory.mktemp("gf_v2") / "ckpt", *sorted(gc95m.glob("*.pkl")))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(read_pickle_dict(gc95m / "token_dictionary_gc95M.pkl")), hidden_size=16,
                     num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=4096, hidden_act="relu", pad_token_id=0)
    BertForMaskedLM(cfg).eval().save_pretrained(d)
    return d


def test_geneformer_v2_default_equals_original_rule(tmp_path: Path, gf_small: Path, v2_ckpt: Path,
                                                    vocab_dir: Path) -> None:
    from transformers import BertForMaskedLM

    code, out = _extract(tmp_path / "s.zarr", gf_small, "geneformer", v2_ckpt)
    assert code == 0, out
    emb = _stored(tmp_path / "s.zarr", "geneformer")
    a = _attrs(tmp_path / "s.zarr", "geneformer", "cells8")
    assert a["settings"]["generation"] == "v2" and a["gene_overlap"]["details"]["columns_summed"] is True

    cells = ad.read_h5ad(gf_small)
    ens = [str(e) for e in cells.var["ensembl_id"]]
    toks = geneformer_v2_tokens(cells.X, ens, vocab_dir / "geneformer" / "gc95M",
                                n_counts=cells.obs["n_counts"].to_numpy(np.float64))
    model = BertForMaskedLM.from_pretrained(v2_ckpt).eval()
    for i, t in enumerate(toks):
        assert 1000 < len(t) <= 4096 and t[0] == 2 and t[-1] == 3  # <cls> genes <eos>
        with torch.inference_mode():
            h = model(input_ids=torch.from_numpy(t)[None], output_hidden_states=True).hidden_states[-1][0]
        # mean over the gene tokens (<cls>/<eos> excluded), as EmbExtractor(emb_mode="cell")
        np.testing.assert_allclose(emb[i], h[1:-1].mean(0).numpy(), atol=ATOL, rtol=0)


# -- tGPT, scFoundation -------------------------------------------------------------------------
def test_tgpt_default_equals_original(tmp_path: Path, fixtures_dir: Path) -> None:
    fx = fixtures_dir / "tgpt"
    code, out = _extract(tmp_path / "s.zarr", fx / "cells.h5ad", "tgpt", fx / "checkpoint")
    assert code == 0, out
    ref = np.load(fx / "reference_embeddings.npy")
    emb = _stored(tmp_path / "s.zarr", "tgpt")
    assert emb.shape == ref.shape and np.abs(emb - ref).max() <= ATOL


def test_scfoundation_default_equals_original(tmp_path: Path, fixtures_dir: Path, vocab_dir: Path) -> None:
    fx = fixtures_dir / "scfoundation"
    ckpt = _link_dir(tmp_path / "ckpt", fx / "checkpoint" / "models.ckpt",
                     vocab_dir / "scfoundation" / "OS_scRNA_gene_index.19264.tsv")
    code, out = _extract(tmp_path / "s.zarr", fx / "cells.h5ad", "scfoundation", ckpt)
    assert code == 0, out
    ref = np.load(fx / "reference_embeddings.npy")
    emb = _stored(tmp_path / "s.zarr", "scfoundation")
    assert emb.shape == ref.shape and np.abs(emb - ref).max() <= ATOL
