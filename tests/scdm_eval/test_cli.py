"""The scdm-eval CLI: runs, writes its files, and fails clearly (exit 2, no traceback) on bad input."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from scdm_embed.store import EmbeddingStore
from scdm_eval.cli import app

runner = CliRunner()


def _ok(args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    return r


def _fails(args, *needles):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    for n in needles:
        assert n in r.output, (n, r.output)
    return r


def test_run_writes_results_and_prints_a_table(cohort_store, tmp_path):
    out = tmp_path / "res"
    r = _ok(["run", "--store", cohort_store, "--classifier", "logreg", "-c", "mlp", "--max-epochs", "3",
             "--folds", "3", "--group-key", "sample", "--n-jobs", "1", "--out", out, "-q"])
    assert "AUROC" in r.output and "logreg" in r.output and "mlp" in r.output
    for f in ("results.parquet", "results.csv", "summary.md", "summary.png", "summary.csv", "skipped.csv"):
        assert (out / f).exists(), f
    res = pd.read_parquet(out / "results.parquet")
    assert len(res) == 2 * 3 * 2 and set(res["classifier"]) == {"logreg", "mlp"}


def test_bad_inputs_fail_clearly(cohort_store, tmp_path):
    out = tmp_path / "o"
    _fails(["run", "--store", tmp_path / "nope.zarr", "--out", out], "error:", "no scdm store", "fix:")
    _fails(["run", "--store", cohort_store, "--model", "scgpt", "--out", out, "-c", "logreg"],
           "model 'scgpt' has no embeddings", "pca, sig")
    _fails(["run", "--store", cohort_store, "--classifier", "svm", "--out", out], "unknown classifier 'svm'",
           "mlp, xgboost, logreg")
    _fails(["run", "--store", cohort_store, "-c", "logreg", "--folds", "10", "--group-key", "sample",
            "--by", "tissue", "--out", out], "fewer than 10 folds", "--folds 6")
    _fails(["run", "--store", cohort_store, "-c", "logreg", "--group-key", "patient", "--out", out],
           "group key 'patient'")
    r = runner.invoke(app, ["run", "--store", str(cohort_store), "--scheme", "loso", "--out", str(out)])
    assert r.exit_code == 2 and "loso" in r.output  # typer's own choice check
    assert not out.exists()


def test_splits_make_and_show(cohort_store):
    r = _ok(["splits", "show", "--store", cohort_store])
    assert "no saved splits" in r.output
    r = _ok(["splits", "make", "--store", cohort_store, "--scheme", "cross", "--by", "tissue"])
    assert "study1" in r.output and "4 partitions" in r.output
    name = EmbeddingStore(cohort_store).splits()[0]
    r = _ok(["splits", "show", "--store", cohort_store])
    assert "cross" in r.output and "tissue" in r.output
    r = _ok(["splits", "show", "--store", cohort_store, "--name", name])
    assert "study4" in r.output
    _fails(["splits", "show", "--store", cohort_store, "--name", "nope"], "no split named 'nope'")


@pytest.fixture(scope="module")
def pc9_store(tmp_path_factory, pc9_path):
    """The real PC9 cells, embedded quickly: log1p-normalised counts of the 50 most variable genes."""
    a = ad.read_h5ad(pc9_path)
    X = a.X.tocsr().astype(np.float64)
    lib = np.asarray(X.sum(axis=1)).ravel()
    L = X.multiply(1e4 / lib[:, None]).tocsr()
    L.data = np.log1p(L.data)
    mean = np.asarray(L.mean(axis=0)).ravel()
    var = np.asarray(L.multiply(L).mean(axis=0)).ravel() - mean**2
    top = np.sort(np.argsort(-var)[:50])
    Z = L[:, top].toarray().astype(np.float32)
    cells = pd.DataFrame(index=pd.Index(a.obs_names.astype(str), name="cell_id"))
    cells["label"] = (a.obs["response"].to_numpy() == "sensitive").astype(np.int8)
    cells["response"] = a.obs["response"].astype(str).to_numpy()
    for c in ("study", "tissue", "drug", "condition"):
        cells[c] = a.obs[c].astype(str).to_numpy()
    path = tmp_path_factory.mktemp("pc9") / "pc9.zarr"
    st = EmbeddingStore(path, mode="a")
    st.put_dataset("pc9", cells, input_hash="pc9-test")
    st.put_embedding("hvg50", "pc9", Z)
    return path


def test_real_pc9_pooled_logreg(pc9_store, tmp_path):
    out = tmp_path / "pc9"
    r = _ok(["run", "--store", pc9_store, "-c", "logreg", "--folds", "5", "--n-jobs", "1", "--out", out, "-q"])
    # condition (Day11_control / Day11_erlotinib) is the label: the CLI must say so
    assert "warning:" in r.output and "confounded with 'condition'" in r.output
    res = pd.read_parquet(out / "results.parquet")
    assert len(res) == 5 and (res["n_test"].sum() == 2121)
    assert res["auroc"].mean() > 0.8, res["auroc"].tolist()


def test_real_pc9_xgboost_streamed_from_the_store_equals_the_slice_in_memory(pc9_store, tmp_path):
    """The default (XGBoost fits read their cells from the store block by block) and --no-stream
    (the slice read once, held in memory) fit the same trees on real cells: identical results."""
    args = ["run", "--store", pc9_store, "-c", "xgboost", "--set", "xgboost.n_estimators=20", "--folds", "5", "-q"]
    _ok([*args, "--out", tmp_path / "s"])
    _ok([*args, "--no-stream", "--out", tmp_path / "h"])
    s, h = (pd.read_parquet(tmp_path / d / "predictions.parquet") for d in ("s", "h"))
    assert len(s) == 2121 and s.equals(h)
    assert pd.read_parquet(tmp_path / "s" / "results.parquet")["auroc"].mean() > 0.8


def test_run_protocol_and_typed_settings(cohort_store, tmp_path):
    out = tmp_path / "p"
    _ok(["run", "--store", cohort_store, "-c", "mlp", "-c", "xgboost", "--protocol", "scdrugmap", "--set", "mlp.hidden=16,16",
         "--set", "mlp.max_epochs=2", "--set", "xgboost.max_depth=2", "--set", "xgboost.n_estimators=5", "--folds", "3",
         "--out", out, "-q"])
    md = (out / "summary.md").read_text()
    assert "protocol: scdrugmap" in md and "mlp settings: hidden=16,16, lr=0.0001" in md and "loss=bce" in md
    assert "xgboost settings: n_estimators=5, max_depth=2" in md
    bad = tmp_path / "bad"
    _fails(["run", "--store", cohort_store, "-c", "mlp", "--set", "mlp.lr=fast", "--out", bad],
           "bad options for classifier 'mlp'", "lr (float, default 0.001)", "max_epochs (int")
    _fails(["run", "--store", cohort_store, "-c", "mlp", "--set", "mlp.epochs=3", "--out", bad], "unknown mlp option 'epochs'")
    _fails(["run", "--store", cohort_store, "-c", "mlp", "--set", "xgboost.max_depth=3", "--out", bad], "not evaluated")
    _fails(["run", "--store", cohort_store, "-c", "mlp", "--set", "mlp.lr", "--out", bad], "CLASSIFIER.KEY=VALUE")
    _fails(["run", "--store", cohort_store, "-c", "mlp", "--protocol", "scdrugmap", "--group-key", "sample",
            "--out", bad], "cell-level folds")
    assert not bad.exists()
