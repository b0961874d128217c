"""Honest default folds (grouped by sample, leak_prone flag) and per-cell predictions.parquet."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm
from typer.testing import CliRunner

from scdm_embed.testing import synthetic_cohort
from scdm_eval import METRICS, RESULT_COLUMNS, compute_metrics, summarize
from scdm_eval.cli import app
from tests.scdm_eval.conftest import build_store, run_quiet

KEYS = ["model", "scheme", "category", "fold", "classifier"]


_run = run_quiet  # run_evaluation with FAST settings, n_jobs 1, quiet


@pytest.fixture(scope="module")
def noise_store(tmp_path_factory):
    """40 samples x 20 cells, labels per sample; embeddings = a per-sample offset + noise (no label signal)."""
    a = synthetic_cohort(n_studies=4, samples_per_study=10, cells_per_sample=20, n_genes=50, seed=3)
    rng = np.random.default_rng(7)
    samples = a.obs["sample"].astype(str).to_numpy()
    names, codes = np.unique(samples, return_inverse=True)
    offset = rng.normal(size=(len(names), 64)).astype(np.float32)
    Z = offset[codes] + 0.3 * rng.normal(size=(len(samples), 64)).astype(np.float32)
    assert a.obs.groupby("sample", observed=True)["response"].nunique().max() == 1  # labels are per sample
    return build_store(tmp_path_factory.mktemp("noise") / "n.zarr", a, models={"noise": Z})


def test_default_groups_by_sample_and_scores_chance_on_noise(noise_store):
    default = _run(noise_store, classifiers=("logreg",), folds=5)
    assert default.attrs["params"]["group_key"] == "sample"
    assert "-sample-" in default.attrs["split"] and not default["leak_prone"].any()
    auroc = default["auroc"].mean()
    assert abs(auroc - 0.5) < 0.2, auroc  # nothing to learn across samples
    # cell-level folds need an explicit choice, score sample identity, and are flagged
    cells = _run(noise_store, classifiers=("logreg",), folds=5, group_key="none")
    assert cells.attrs["params"]["group_key"] is None and "-cells-" in cells.attrs["split"]
    assert cells["leak_prone"].all()
    assert cells["auroc"].mean() > 0.85  # the optimism the default avoids
    s = summarize(cells)
    assert s["leak_prone"].all() and not summarize(default)["leak_prone"].any()


def test_cli_group_key_none_is_flagged_in_results_and_report(noise_store, tmp_path):
    out = tmp_path / "res"
    r = CliRunner().invoke(app, ["run", "--store", str(noise_store), "--classifier", "logreg", "--folds", "3",
                                 "--group-key", "none", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    res = pd.read_parquet(out / "results.parquet")
    assert res["leak_prone"].all()
    md = (out / "summary.md").read_text()
    assert "leak_prone" in md and "noise (leak_prone)" in md
    assert "(leak_prone)" in r.output.replace("\n", " ")


def test_cross_scheme_is_not_leak_prone(noise_store):
    res = _run(noise_store, scheme="cross", classifiers=("majority",))
    assert res.attrs["params"]["group_key"] is None and not res["leak_prone"].any()


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.parametrize("scheme", ["pooled", "cross"])
def test_predictions_recompute_every_metric_exactly(cohort_store, tmp_path, scheme):
    out = tmp_path / "res"
    clfs = ("logreg", "majority", "mlp")
    res = _run(cohort_store, scheme=scheme, classifiers=clfs, folds=3, out=out)
    pred = pd.read_parquet(out / "predictions.parquet")
    stored = pd.read_parquet(out / "results.parquet")
    assert list(stored.columns) == list(RESULT_COLUMNS)
    assert list(pred.columns) == ["cell_id", "dataset", "study", "sample", "model", "scheme", "category", "fold",
                                  "partition", "classifier", "y_true", "p_sensitive"]
    assert len(pred) == int(stored["n_test"].sum())
    assert pred["p_sensitive"].dtype == np.float64
    groups = dict(list(pred.groupby(KEYS, observed=True, sort=False)))
    assert len(groups) == len(stored) == len(res)
    checked = 0
    for row in stored.itertuples(index=False):
        g = groups[(row.model, row.scheme, row.category, row.fold, row.classifier)]
        assert len(g) == row.n_test and int(g["y_true"].sum()) == row.test_sensitive
        assert (g["partition"] == row.partition).all()
        y, p = g["y_true"].to_numpy(), g["p_sensitive"].to_numpy()
        again = compute_metrics(y, p)  # the project's metric functions: the stored values exactly
        for m in METRICS:
            assert _same(again[m], getattr(row, m)), (row, m)
        assert again["reason"] == row.reason
        # and sklearn.metrics on the same predictions (tolerance 1e-12: sklearn sums in another order)
        hat = (p >= 0.5).astype(int)
        ref = {"accuracy": skm.accuracy_score(y, hat)}
        if 0 < y.sum() < len(y):
            ref |= {"auroc": skm.roc_auc_score(y, p), "auprc": skm.average_precision_score(y, p)}
        if hat.sum():
            ref["precision"] = skm.precision_score(y, hat, zero_division=np.nan)
        if y.sum():
            ref["recall"] = skm.recall_score(y, hat)
        if y.sum() or hat.sum():
            ref["f1"] = skm.f1_score(y, hat)
        for m, v in ref.items():
            assert abs(getattr(row, m) - v) <= 1e-12, (m, getattr(row, m), v)
        checked += 1
    assert checked == len(stored)
    # the cells are the store's: ids, datasets, studies and samples match the cell table
    from scdm_embed.store import EmbeddingStore

    cells = EmbeddingStore(cohort_store).cells()
    keys = pred["dataset"].astype(str) + "/" + pred["cell_id"].astype(str)
    assert keys.isin(cells.index).all()
    meta = cells.loc[keys.to_numpy()]
    assert (meta["study"].to_numpy() == pred["study"].astype(str).to_numpy()).all()
    assert (meta["sample"].to_numpy() == pred["sample"].astype(str).to_numpy()).all()
    assert (meta["label"].to_numpy() == pred["y_true"].to_numpy()).all()
    # every cell is tested once per model x category x classifier; grouped folds keep samples apart
    per = pred.groupby(["model", "category", "classifier"], observed=True)["cell_id"]
    assert (per.nunique() == per.size()).all()
    if scheme == "pooled":
        assert (pred.groupby(["model", "classifier", "sample"], observed=True)["fold"].nunique() == 1).all()
