"""`scdm-embed import`: embeddings computed elsewhere enter the store as model external:<name>."""

from __future__ import annotations

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
DS = "pc9_small"


@pytest.fixture(scope="module")
def pca_store(tmp_path_factory, pc9_small):
    """240 real PC9 cells embedded with pca, and their export as an .h5ad."""
    tmp = tmp_path_factory.mktemp("import")
    store = tmp / "s.zarr"
    r = runner.invoke(app, ["extract", str(pc9_small), "--model", "pca", "--store", str(store), "-q"])
    assert r.exit_code == 0, r.output
    out = tmp / "exported.h5ad"
    r = runner.invoke(app, ["export", "--store", str(store), "--dataset", DS, "--out", str(out)])
    assert r.exit_code == 0, r.output
    return store, out


def test_export_import_round_trips_bit_for_bit_and_evaluates(pca_store, tmp_path):
    store, exported = pca_store
    r = runner.invoke(app, ["import", "--store", str(store), "--dataset", DS, "--input", str(exported),
                            "--obsm", "X_pca", "--name", "roundtrip"])
    assert r.exit_code == 0, r.output
    st = EmbeddingStore(store)
    X, cells = st.load("pca", datasets=[DS])
    Y, cells2 = st.load("external:roundtrip", datasets=[DS])
    assert Y.dtype == X.dtype and np.array_equal(X.view(np.uint32), Y.view(np.uint32))
    assert cells.equals(cells2)
    rec = st.embedding_record("external:roundtrip", DS)
    assert rec.settings["obsm_key"] == "X_pca" and len(rec.settings["source_sha256"]) == 64
    assert rec.checkpoint_hash == "sha256:" + rec.settings["source_sha256"]
    res = tmp_path / "res"
    r = runner.invoke(eval_app, ["run", "--store", str(store), "--model", "external:roundtrip", "--model", "pca",
                                 "--classifier", "logreg", "--folds", "3", "--group-key", "none", "--out", str(res),
                                 "-q"])
    assert r.exit_code == 0, r.output
    t = pd.read_parquet(res / "results.parquet")
    assert set(t["model"]) == {"pca", "external:roundtrip"}
    by = t.groupby("model")["auroc"].mean()
    assert abs(by["pca"] - by["external:roundtrip"]) < 1e-9  # same values, same folds -> same scores


def test_npy_with_cell_ids_in_another_order(pca_store, tmp_path):
    store, exported = pca_store
    a = ad.read_h5ad(exported)
    rng = np.random.default_rng(0)
    order = rng.permutation(a.n_obs)
    Z = rng.normal(size=(a.n_obs, 7))  # float64 from elsewhere
    np.save(tmp_path / "z.npy", Z[order])
    (tmp_path / "ids.txt").write_text("\n".join(a.obs_names[order]) + "\n")
    r = runner.invoke(app, ["import", "--store", str(store), "--dataset", DS, "--npy", str(tmp_path / "z.npy"),
                            "--cell-ids", str(tmp_path / "ids.txt"), "--name", "scvi"])
    assert r.exit_code == 0, r.output
    Y, _ = EmbeddingStore(store).load("external:scvi", datasets=[DS])
    assert np.array_equal(Y, Z.astype(np.float32))  # back in the store's cell order
    r = runner.invoke(app, ["import", "--store", str(store), "--dataset", DS, "--npy", str(tmp_path / "z.npy"),
                            "--cell-ids", str(tmp_path / "ids.txt"), "--name", "scvi"])
    assert_refused(r, "--overwrite")


def _bad_files(tmp: object, exported) -> dict[str, list[str]]:
    a = ad.read_h5ad(exported)
    few = a[:100].copy()
    few.write_h5ad(tmp / "few.h5ad")
    nan = a.copy()
    nan.obsm["X_pca"] = nan.obsm["X_pca"].copy()
    nan.obsm["X_pca"][3, 1] = np.nan
    nan.write_h5ad(tmp / "nan.h5ad")
    np.save(tmp / "z.npy", np.zeros((a.n_obs, 3)))
    (tmp / "short_ids.txt").write_text("\n".join(a.obs_names[:10]))
    (tmp / "dup_ids.txt").write_text("\n".join([a.obs_names[0]] * a.n_obs))
    (tmp / "broken.h5ad").write_bytes(b"not an h5ad")
    return {
        "cells": ["--input", str(tmp / "few.h5ad"), "--obsm", "X_pca", "--name", "x"],
        "non-finite": ["--input", str(tmp / "nan.h5ad"), "--obsm", "X_pca", "--name", "x"],
        "X_nope": ["--input", str(exported), "--obsm", "X_nope", "--name", "x"],
        "name": ["--input", str(exported), "--obsm", "X_pca", "--name", "a/b"],
        "rows": ["--npy", str(tmp / "z.npy"), "--cell-ids", str(tmp / "short_ids.txt"), "--name", "x"],
        "unique": ["--npy", str(tmp / "z.npy"), "--cell-ids", str(tmp / "dup_ids.txt"), "--name", "x"],
        "--cell-ids": ["--npy", str(tmp / "z.npy"), "--name", "x"],
        "--obsm": ["--input", str(exported), "--name", "x"],
        "exactly one": ["--name", "x"],
        "h5ad": ["--input", str(tmp / "broken.h5ad"), "--obsm", "X_pca", "--name", "x"],
    }


def test_bad_imports_refused_and_store_untouched(pca_store, tmp_path):
    store, exported = pca_store
    cases = _bad_files(tmp_path, exported)
    before = store_snapshot(store)
    for word, args in cases.items():
        r = runner.invoke(app, ["import", "--store", str(store), "--dataset", DS, *args])
        assert_refused(r, word)
    r = runner.invoke(app, ["import", "--store", str(store), "--dataset", "nope", "--input", str(exported),
                            "--obsm", "X_pca", "--name", "x"])
    assert_refused(r, "nope")
    assert store_snapshot(store) == before
