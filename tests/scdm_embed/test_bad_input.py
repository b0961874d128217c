"""Bad input: a clear message naming problem and fix, a non-zero exit, and an untouched store."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from scdm_embed.cli import app
from tests.conftest import store_snapshot

runner = CliRunner()


@pytest.fixture(scope="module")
def base(pc9_small):
    a = ad.read_h5ad(pc9_small)
    a.X = sp.csr_matrix(a.X)
    return a


@pytest.fixture(scope="module")
def populated_store(tmp_path_factory, pc9_small):
    """A store that already holds pca embeddings of the good file."""
    store = tmp_path_factory.mktemp("st") / "s.zarr"
    r = runner.invoke(app, ["extract", str(pc9_small), "--model", "pca", "--store", str(store), "--dataset", "good", "-q"])
    assert r.exit_code == 0, r.output
    return store


def _write(tmp_path, a, name="bad.h5ad"):
    p = tmp_path / name
    a.write_h5ad(p)
    return p


def _variant(base, kind, tmp_path):
    """Build one kind of bad input; returns (input path, extra CLI args)."""
    a = base.copy()
    X = a.X.toarray().astype(np.float32)
    if kind == "nan":
        X[3, np.flatnonzero(X[3])[0]] = np.nan
    elif kind == "negative":
        X[5, 0] = -1.0
    elif kind == "normalised":
        X = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    elif kind == "zero_cell":
        X[7] = 0
    if kind in ("nan", "negative", "normalised", "zero_cell"):
        a.X = sp.csr_matrix(X)
    if kind == "dup_cells":
        a.obs_names = [a.obs_names[0]] * 2 + list(a.obs_names[2:])
    elif kind == "dup_genes":
        a.var_names = [a.var_names[0]] * 2 + list(a.var_names[2:])
    elif kind == "empty":
        a = a[:0].copy()
    elif kind == "unknown_label":
        a.obs["response"] = a.obs["response"].astype(str)
        a.obs.iloc[0, a.obs.columns.get_loc("response")] = "partial"
    elif kind == "missing_values":  # two cells without a sample: they must not become one sample "nan"
        a.obs["sample"] = pd.Categorical(["s1", None, "s2", None] + ["s3"] * (a.n_obs - 4))
    elif kind == "no_response":
        a.obs = a.obs.drop(columns=["response"])
    elif kind == "mouse_genes":
        a.var_names = [f"Gm{i}" for i in range(a.n_vars)]
        a.var = a.var.drop(columns=["ensembl_id"])
    if kind == "missing_file":
        return tmp_path / "nope.h5ad", []
    if kind == "not_anndata":
        p = tmp_path / "junk.h5ad"
        p.write_text("barcode,gene\nAAAC,3\n")
        return p, []
    extra = {"missing_meta": ["--sample-key", "patient_id"], "missing_layer": ["--layer", "counts"],
             "both_classes": ["--sensitive", "sensitive", "--resistant", "sensitive"],
             "unknown_model": [], "no_checkpoint": [], "bad_dtype": ["--dtype", "float8"],
             "bad_option": ["--option", "n_top_genes"], "bad_store_dtype": ["--store-dtype", "float8"],
             "no_gpu": ["--device", "cuda"]}.get(kind, [])
    return _write(tmp_path, a), extra


CASES = {
    # kind: (words the message must contain, model)
    "missing_file": ("does not exist", "pca"),
    "not_anndata": ("cannot open", "pca"),
    "nan": ("non-finite", "pca"),
    "negative": ("negative values", "pca"),
    "normalised": ("non-integer", "pca"),
    "zero_cell": ("zero counts", "pca"),
    "dup_cells": ("duplicate cell ids", "pca"),
    "dup_genes": ("duplicate gene ids", "pca"),
    "empty": ("empty", "pca"),
    "unknown_label": ("unknown label values", "pca"),
    "no_response": ("response column 'response' is not in obs", "pca"),
    "missing_meta": ("metadata column 'patient_id'", "pca"),
    "missing_values": ("2 cells with no value", "pca"),
    "missing_layer": ("layer 'counts' is not in", "pca"),
    "both_classes": ("mapped to both classes", "pca"),
    "mouse_genes": ("barely share genes", "pca"),
    "unknown_model": ("unknown model 'nosuchmodel'", "nosuchmodel"),
    "no_checkpoint": ("needs a checkpoint directory", "geneformer"),
    "bad_dtype": ("unknown dtype", "pca"),
    "bad_option": ("not KEY=VALUE", "pca"),
    "bad_store_dtype": ("unknown store dtype", "pca"),
    "no_gpu": ("no CUDA GPU is visible", "pca"),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_bad_input_is_refused_cleanly(kind, base, populated_store, tmp_path):
    if kind == "no_gpu" and __import__("torch").cuda.is_available():
        pytest.skip("a GPU is visible: --device cuda is valid here")
    words, model = CASES[kind]
    path, extra = _variant(base, kind, tmp_path)
    before = store_snapshot(populated_store)
    r = runner.invoke(app, ["extract", str(path), "--model", model, "--store", str(populated_store),
                            "--dataset", "other", "-q", *extra])
    assert r.exit_code == 2, r.output
    assert "error:" in r.output and "fix:" in r.output, r.output
    assert words in r.output.replace("\n", " "), r.output
    assert "Traceback" not in r.output
    assert store_snapshot(populated_store) == before, "a refused command must leave the store as it was"


def test_stale_input_refused_then_overwritten(base, populated_store, tmp_path):
    """Same dataset name, different matrix: refused (store untouched) unless --overwrite."""
    a = base.copy()
    a = a[10:].copy()
    p = _write(tmp_path, a, "changed.h5ad")
    before = store_snapshot(populated_store)
    args = ["extract", str(p), "--model", "pca", "--store", str(populated_store), "--dataset", "good", "-q"]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "different input" in r.output and "--overwrite" in r.output
    assert store_snapshot(populated_store) == before


def test_new_store_not_created_on_bad_input(base, tmp_path):
    path, _ = _variant(base, "nan", tmp_path)
    store = tmp_path / "fresh.zarr"
    r = runner.invoke(app, ["extract", str(path), "--model", "pca", "--store", str(store), "-q"])
    assert r.exit_code == 2
    assert not store.exists()


def test_bad_input_found_mid_extraction_is_rolled_back(pc9_small, populated_store, tmp_path):
    """An adapter that only discovers bad input while tokenizing chunk 2 (as scFoundation does for
    a cell without counts on its genes) leaves an existing store byte-identical and creates none."""
    from scdm_embed import InputError, extract
    from scdm_embed.models import _EXTRA, register_adapter
    from scdm_embed.models._reference import PCAAdapter

    class PickyPCA(PCAAdapter):
        name = "picky"

        def tokenize(self, chunk, plan):
            if chunk.start >= 48:
                raise InputError(f"cell {chunk.cell_ids[0]} has no counts on the model's genes", "filter such cells first")
            return super().tokenize(chunk, plan)

    register_adapter("picky", PickyPCA)
    try:
        before = store_snapshot(populated_store)
        with pytest.raises(InputError, match="no counts"):
            extract(pc9_small, model="picky", store=populated_store, dataset="other", chunk_size=24, progress=False)
        assert store_snapshot(populated_store) == before
        fresh = tmp_path / "new.zarr"
        with pytest.raises(InputError):
            extract(pc9_small, model="picky", store=fresh, chunk_size=24, progress=False)
        assert not fresh.exists()
    finally:
        _EXTRA.pop("picky", None)
