"""`scdm-embed export`: embeddings back into AnnData for scanpy (real PC9 cells, pca + hvg)."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from scdm_embed import EmbeddingStore
from scdm_embed.cli import app
from scdm_eval.cli import app as eval_app
from tests._cli import assert_refused
from tests.conftest import store_snapshot

runner = CliRunner()


@pytest.fixture(scope="module")
def pc9_store(tmp_path_factory, pc9_small):
    """240 real PC9 cells with pca and hvg embeddings, and a 3-fold logreg run on pca."""
    tmp = tmp_path_factory.mktemp("export")
    store = tmp / "s.zarr"
    for m in ("pca", "hvg"):
        r = runner.invoke(app, ["extract", str(pc9_small), "--model", m, "--store", str(store), "-q"])
        assert r.exit_code == 0, r.output
    res = tmp / "res"
    r = runner.invoke(eval_app, ["run", "--store", str(store), "--model", "pca", "--classifier", "logreg",
                                 "--folds", "3", "--group-key", "none", "--out", str(res), "-q"])
    assert r.exit_code == 0, r.output
    return store, res


def test_export_runs_scanpy_neighbors_and_umap(pc9_store, pc9_small, tmp_path):
    import scanpy as sc

    store, res = pc9_store
    out = tmp_path / "cells.h5ad"
    r = runner.invoke(app, ["export", "--store", str(store), "--dataset", "pc9_small", "--out", str(out),
                            "--results", str(res)])
    assert r.exit_code == 0, r.output
    a = ad.read_h5ad(out)
    src = ad.read_h5ad(pc9_small)
    assert list(a.obs_names) == list(src.obs_names.astype(str))
    assert {"X_pca", "X_hvg"} <= set(a.obsm)
    X, _ = EmbeddingStore(store).load("pca", datasets=["pc9_small"])
    assert np.array_equal(a.obsm["X_pca"], X)
    assert (a.obs["response"].to_numpy() == src.obs["response"].astype(str).to_numpy()).all()
    assert set(a.obs["label"].unique()) == {0, 1}
    # predictions: every cell tested once in 3 folds -> one value per cell, a probability
    p = a.obs["p_sensitive_pca_logreg"]
    assert p.notna().all() and ((p >= 0) & (p <= 1)).all()
    preds = pd.read_parquet(res / "predictions.parquet")
    mine = preds[preds["classifier"] == "logreg"].groupby("cell_id")["p_sensitive"].mean()
    np.testing.assert_allclose(p.to_numpy(), mine.reindex(a.obs_names).to_numpy(), rtol=0, atol=1e-12)
    prov = json.loads(a.uns["scdm"]["provenance"]["X_pca"])
    assert prov["model"] == "pca" and len(prov["input_hash"]) >= 64 and prov["checkpoint_hash"]
    sc.pp.neighbors(a, use_rep="X_pca", n_neighbors=10)
    sc.tl.umap(a)
    assert a.obsm["X_umap"].shape == (a.n_obs, 2) and np.isfinite(a.obsm["X_umap"]).all()


def test_python_twin_one_model(pc9_store):
    import scdm_embed as se

    store, _ = pc9_store
    a = se.to_anndata(store, "pc9_small", models=["hvg"])
    assert list(a.obsm) == ["X_hvg"] and a.n_vars == 0 and a.uns["scdm"]["models"] == ["hvg"]


def test_into_users_file_by_cell_id(pc9_store, pc9_small, tmp_path):
    store, _ = pc9_store
    mine = ad.read_h5ad(pc9_small)
    mine = mine[::-1].copy()  # another order: matched by id
    mine.obs["mine"] = np.arange(mine.n_obs)
    path = tmp_path / "mine.h5ad"
    mine.write_h5ad(path)
    r = runner.invoke(app, ["export", "--store", str(store), "--dataset", "pc9_small", "--into", str(path)])
    assert r.exit_code == 0, r.output
    back = ad.read_h5ad(path)
    assert back.n_vars == mine.n_vars and (back.obs["mine"].to_numpy() == np.arange(mine.n_obs)).all()
    X, cells = EmbeddingStore(store).load("pca", datasets=["pc9_small"])
    order = pd.Index([c.split("/", 1)[1] for c in cells.index]).get_indexer(back.obs_names)
    assert np.array_equal(back.obsm["X_pca"], X[order])


def test_into_refuses_other_cells_and_leaves_file(pc9_store, pc9_small, tmp_path):
    store, _ = pc9_store
    other = ad.read_h5ad(pc9_small)[:100].copy()
    path = tmp_path / "other.h5ad"
    other.write_h5ad(path)
    before = path.read_bytes()
    r = runner.invoke(app, ["export", "--store", str(store), "--dataset", "pc9_small", "--into", str(path)])
    assert_refused(r, "match")
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize(("args", "word"), [
    (["--dataset", "nope", "--out", "x.h5ad"], "nope"),
    (["--dataset", "pc9_small", "--model", "scgpt", "--out", "x.h5ad"], "scgpt"),
    (["--dataset", "pc9_small", "--out", "x.csv"], ".h5ad"),
    (["--dataset", "pc9_small"], "--out"),
    (["--dataset", "pc9_small", "--out", "x.h5ad", "--results", "missing_dir"], "predictions"),
    (["--dataset", "pc9_small", "--into", "missing.h5ad"], "missing.h5ad"),
])
def test_bad_export_refused(pc9_store, tmp_path, monkeypatch, args, word):
    store, _ = pc9_store
    monkeypatch.chdir(tmp_path)
    before = store_snapshot(store)
    r = runner.invoke(app, ["export", "--store", str(store), *args])
    assert_refused(r, word)
    assert store_snapshot(store) == before and not (tmp_path / "x.h5ad").exists()
