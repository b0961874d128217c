"""The evaluation grid on a synthetic cohort stored with put_dataset + put_embedding."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from scdm_embed.errors import ScdmError, StoreError
from scdm_embed.store import EmbeddingStore
from scdm_embed.testing import synthetic_cohort
from scdm_eval import METRICS, RESULT_COLUMNS, run_evaluation, summarize
from tests.scdm_eval.conftest import FAST, build_store, embeddings, run_quiet

_run = run_quiet  # run_evaluation with FAST settings, n_jobs 1, quiet


def test_pooled_grid_shape_counts_and_skill(cohort_store):
    res = _run(cohort_store, classifiers=("logreg", "majority"), folds=3, group_key="sample")
    assert list(res.columns) == list(RESULT_COLUMNS)
    assert len(res) == 2 * 1 * 3 * 2  # models x categories x folds x classifiers
    assert set(res["model"]) == {"pca", "sig"} and set(res["category"]) == {"all"}
    assert (res["n_train"] == res["train_sensitive"] + res["train_resistant"]).all()
    assert (res["n_test"] == res["test_sensitive"] + res["test_resistant"]).all()
    assert (res["n_train"] + res["n_test"] == 720).all()
    assert res[list(METRICS)].stack().between(0, 1).all()
    s = summarize(res).set_index(["model", "classifier"])
    assert s.loc[("pca", "logreg"), "auroc_mean"] > 0.9
    assert s.loc[("pca", "majority"), "auroc_mean"] == 0.5
    assert res.attrs["split"].startswith("pooled-all-k3-sample-s0-")
    assert EmbeddingStore(cohort_store).splits() == [res.attrs["split"]]


def test_by_category_with_groups(cohort_store):
    res = _run(cohort_store, models=["sig"], by="tissue", classifiers=("logreg",), folds=3, group_key="sample")
    assert len(res) == 1 * 2 * 3 * 1
    assert sorted(res["category"].unique()) == ["breast", "lung"]
    assert (res.groupby("category")["n_test"].sum() == 360).all()


def test_cross_scheme_reports_each_held_out_study(cohort_store):
    res = _run(cohort_store, scheme="cross", by="drug", classifiers=("logreg", "xgboost"))
    assert len(res) == 2 * 4 * 2  # models x (2 drugs x 2 studies) x classifiers
    assert set(res["partition"]) == {"study1", "study2", "study3", "study4"}
    assert (res["n_test"] == 180).all() and (res["n_train"] == 180).all()
    by_drug = res.drop_duplicates("partition").groupby("category")["partition"].apply(sorted).to_dict()
    assert by_drug == {"erlotinib": ["study1", "study2"], "paclitaxel": ["study3", "study4"]}
    assert res["auroc"].notna().all() and res["accuracy"].notna().all()
    # across studies a batch shift can push every cell of a held-out study to one side: then
    # precision is undefined (NaN with a reason), never 0
    undefined = res["precision"].isna()
    assert (res.loc[undefined, "reason"] == "precision: no cell predicted sensitive").all()
    assert (res.loc[~undefined, "reason"] == "").all()
    assert res.attrs["params"]["scheme"] == "cross"


def test_single_class_held_out_study_has_nan_with_reason(tmp_path):
    a = synthetic_cohort(n_studies=3, samples_per_study=4, cells_per_sample=15, n_genes=60, n_signal_genes=10)
    a.obs.loc[a.obs["study"] == "study3", "response"] = "resistant"
    path = build_store(tmp_path / "s.zarr", a)
    res = _run(path, scheme="cross", classifiers=("logreg",))
    row = res.set_index(["model", "partition"]).loc[("pca", "study3")]
    assert math.isnan(row["auroc"]) and math.isnan(row["auprc"]) and math.isnan(row["recall"])
    assert 0.0 <= row["accuracy"] <= 1.0
    assert "test cells are all resistant" in row["reason"]
    assert not math.isnan(res.set_index(["model", "partition"]).loc[("pca", "study1"), "auroc"])
    s = summarize(res).set_index("model")
    assert s.loc["pca", "auroc_n"] == 2 and s.loc["pca", "accuracy_n"] == 3


def test_same_seed_identical_results_serial_or_parallel(cohort_store, tmp_path):
    kw = {"classifiers": ("mlp", "xgboost", "logreg"), "folds": 3, "group_key": "sample", "seed": 7}
    one = _run(cohort_store, n_jobs=1, **kw)
    two = _run(cohort_store, n_jobs=2, **kw)
    pd.testing.assert_frame_equal(one, two)
    assert len(one) == 2 * 3 * 3


def test_outputs_written(cohort_store, tmp_path):
    out = tmp_path / "out"
    res = _run(cohort_store, by="tissue", classifiers=("logreg",), folds=3, group_key="sample", out=out)
    for f in ("results.parquet", "results.csv", "summary.csv", "summary.md", "summary.png", "skipped.csv"):
        assert (out / f).stat().st_size > 0, f
    back = pd.read_parquet(out / "results.parquet")
    pd.testing.assert_frame_equal(back, res, check_dtype=False)
    md = (out / "summary.md").read_text()
    assert "## tissue: breast" in md and "Student-t" in md and "| pca | logreg | 3 |" in md
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"


def test_skipped_category_is_recorded(tmp_path):
    a = synthetic_cohort(n_studies=4, samples_per_study=4, cells_per_sample=10, n_genes=60, n_signal_genes=10)
    a.obs.loc[a.obs["tissue"] == "breast", "response"] = "sensitive"
    path = build_store(tmp_path / "s.zarr", a)
    with pytest.warns(UserWarning, match="breast: only sensitive cells"):
        res = run_evaluation(path, models=["pca"], by="tissue", classifiers=("logreg",), folds=2,
                             group_key="sample", n_jobs=1, out=tmp_path / "out")
    assert set(res["category"]) == {"lung"}
    assert [s["category"] for s in res.attrs["skipped"]] == ["breast"]
    assert "breast" in (tmp_path / "out" / "skipped.csv").read_text()
    assert "## Skipped" in (tmp_path / "out" / "summary.md").read_text()


def test_leakage_warning_reaches_the_caller_and_the_report(cohort_store, tmp_path):
    with pytest.warns(UserWarning, match="confounded with 'sample'"):
        res = run_evaluation(cohort_store, models=["sig"], classifiers=("logreg",), folds=3, n_jobs=1,
                             group_key="none", out=tmp_path / "o")  # the default would group by sample
    assert any("sample" in w for w in res.attrs["warnings"]) and res["leak_prone"].all()
    assert "## Warnings" in (tmp_path / "o" / "summary.md").read_text()


def test_bad_requests(cohort_store, tmp_path, cohort):
    with pytest.raises(StoreError, match="model 'scgpt' has no embeddings.*has: pca, sig"):
        _run(cohort_store, models=["scgpt"], classifiers=("logreg",))
    with pytest.raises(ScdmError, match="unknown classifier 'svm'"):
        _run(cohort_store, classifiers=("logreg", "svm"))
    with pytest.raises(ScdmError, match="not evaluated"):
        run_evaluation(cohort_store, classifiers=("logreg",), classifier_options={"mlp": {"max_epochs": 1}})
    with pytest.raises(ScdmError, match="bad options for classifier 'mlp'"):
        run_evaluation(cohort_store, classifiers=("mlp",), classifier_options={"mlp": {"epochs": 1}})
    with pytest.raises(StoreError, match="no scdm store"):
        run_evaluation(tmp_path / "missing.zarr")
    # a model without embeddings for one dataset cannot be compared on the same cells
    st = EmbeddingStore(cohort_store, mode="a")
    st.put_embedding("partial", "cohortA", embeddings(cohort)["sig"][:360])
    with pytest.raises(StoreError, match=r"'partial' lacks complete, current embeddings for dataset\(s\) \['cohortB'\]"):
        _run(cohort_store, models=["partial"], classifiers=("logreg",))
    res = _run(cohort_store, classifiers=("logreg",), folds=3, group_key="sample")  # default: complete models only
    assert set(res["model"]) == {"pca", "sig"}


# -- engine: refits, presets, threads (E1) ----------------------------------------------------
def test_a_fold_refit_reproduces_the_grid_row_bit_for_bit(cohort_store):
    from scdm_eval import compute_metrics, make_classifier
    from scdm_eval._run import _task_seed

    res = _run(cohort_store, models=["pca"], classifiers=("mlp", "xgboost"), folds=3, group_key="sample", seed=4)
    splits = make_splits_for(cohort_store, res)
    st = EmbeddingStore(cohort_store)
    X, cells = st.load("pca")
    X, cells = X[cells.index.get_indexer(splits.table.index)], cells.reindex(splits.table.index)
    y = splits.table["label"].to_numpy().astype(int)
    part = list(splits)[1]
    for c in ("mlp", "xgboost"):
        clf = make_classifier(c, seed=_task_seed(4, part.category, part.fold), **res.attrs["params"]["settings"][c])
        clf.fit(X[part.train], y[part.train], groups=cells["sample"].to_numpy()[part.train])
        met = compute_metrics(y[part.test], clf.predict_proba(X[part.test])[:, 1])
        row = res[(res["classifier"] == c) & (res["fold"] == part.fold)].iloc[0]
        for m in METRICS:
            assert met[m] == row[m], (c, m)  # same process, same code path: bit for bit


def make_splits_for(store, res):
    from scdm_eval import load_splits

    return load_splits(store, res.attrs["split"])


def test_protocols_set_what_they_say(cohort_store):
    res = _run(cohort_store, models=["sig"], classifiers=("mlp",), folds=3, protocol="scdrugmap",
               classifier_options={"mlp": {"hidden": (16, 16)}})  # the user's settings lie over the preset
    p = res.attrs["params"]
    assert p["protocol"] == "scdrugmap" and p["group_key"] is None  # random cell-level folds, as the paper
    assert p["settings"]["mlp"] == {**p["settings"]["mlp"], "hidden": "16,16", "lr": 1e-4, "weight_decay": 0.01,
                                    "batch_size": 128, "max_epochs": 10, "early_stopping": False, "keep": "last",
                                    "scale": False, "loss": "bce"}
    d = _run(cohort_store, models=["sig"], classifiers=("mlp",), folds=3, group_key="sample").attrs["params"]
    assert d["protocol"] == "scdm" and d["settings"]["mlp"]["early_stopping"] is True
    assert d["settings"]["mlp"]["max_epochs"] == FAST["mlp"]["max_epochs"]
    with pytest.raises(ScdmError, match="scdrugmap uses random cell-level folds"):
        _run(cohort_store, classifiers=("mlp",), protocol="scdrugmap", group_key="sample")
    with pytest.raises(ScdmError, match="unknown protocol 'paper'"):
        _run(cohort_store, classifiers=("mlp",), protocol="paper")


def test_workers_times_threads_never_exceed_the_cores():
    from scdm_eval._run import plan_workers

    assert plan_workers(-1, 30, cores=8) == (1, 8) and plan_workers(1, 30, cores=8) == (1, 8)
    assert plan_workers(4, 30, cores=8) == (4, 2) and plan_workers(64, 30, cores=8) == (8, 1)
    assert plan_workers(3, 2, cores=8) == (2, 4)
    for n_jobs in (-1, 1, 2, 3, 5, 16):
        w, t = plan_workers(n_jobs, 100, cores=4)
        assert w * t <= 4


def test_non_finite_row_in_a_later_block_is_named():
    """The finite check runs in row blocks: a NaN far past the first block is still found, and named."""
    from scdm_eval._run import check_finite

    X = np.zeros((40_000, 3), np.float32)
    X[33_333, 1] = np.inf
    keys = [f"d/c{i}" for i in range(len(X))]
    with pytest.raises(StoreError, match=r"1 cells with non-finite embeddings \(e\.g\. d/c33333\)"):
        check_finite(X, "m", keys)
    assert check_finite(X[:33_333], "m", keys) is not None


def test_the_xgboost_grid_streams_its_rows_from_the_store(tmp_path, monkeypatch):
    """XGBoost fits read their cells from the store a block at a time: no read is the whole slice
    (logreg's grid reads it whole, once), and the xgboost rows do not depend on what else is fitted."""
    from scdm_embed.store import EmbeddingRows

    a = synthetic_cohort(n_studies=2, samples_per_study=4, cells_per_sample=900, n_genes=40, seed=0)
    store = build_store(tmp_path / "s.zarr", a, models={"pca": embeddings(a)["pca"]})
    reads: list[int] = []
    read = EmbeddingRows.read

    def spy(self, at=None, **kw):
        reads.append(len(self) if at is None else len(at))
        return read(self, at, **kw)

    monkeypatch.setattr(EmbeddingRows, "read", spy)
    res = _run(store, classifiers=("xgboost",), folds=3, group_key="sample")
    n = a.n_obs
    assert (res["n_train"] + res["n_test"] == n).all()
    assert reads and max(reads) <= 4096 < n, reads  # blocks: finite check and chunks 2,048, the bins' sample 4,096
    reads.clear()
    both = _run(store, classifiers=("logreg", "xgboost"), folds=3, group_key="sample")
    assert reads.count(n) == 1  # logreg's slice, read once
    for m in METRICS:
        assert both.loc[both["classifier"] == "xgboost", m].tolist() == res[m].tolist(), m
    assert res.attrs["params"]["streamed"] == ["xgboost"]
    reads.clear()
    held = _run(store, classifiers=("xgboost",), folds=3, group_key="sample", stream=False)
    assert reads == [n] and held.attrs["params"]["streamed"] == []  # the slice, read once
    for m in METRICS:  # the same cells, the same fits: bit for bit
        assert held[m].tolist() == res[m].tolist(), m
