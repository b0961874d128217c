"""End to end through both CLIs: AnnData -> scdm-embed extract -> store -> scdm-eval run."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from scdm_embed.cli import app as embed_app
from scdm_embed.testing import synthetic_cohort
from scdm_eval.cli import app as eval_app

runner = CliRunner()


def _ok(app, args):
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def cohort_store(tmp_path_factory):
    """A 4-study synthetic cohort (labels per sample, study batch shifts) embedded with pca."""
    tmp = tmp_path_factory.mktemp("e2e")
    a = synthetic_cohort(n_studies=4, samples_per_study=4, cells_per_sample=40, n_genes=600, signal=1.5, seed=3)
    a.write_h5ad(tmp / "cohort.h5ad")
    store = tmp / "s.zarr"
    _ok(embed_app, ["extract", str(tmp / "cohort.h5ad"), "--model", "pca", "--store", str(store), "--dataset", "cohort",
                    "--sample-key", "sample", "-q", "--option", "n_comps=20"])
    return store, a


def test_cross_study_leave_one_out(cohort_store, tmp_path):
    store, a = cohort_store
    out = tmp_path / "cross"
    _ok(eval_app, ["run", "--store", str(store), "--scheme", "cross", "--classifier", "logreg", "--out", str(out), "-q"])
    res = pd.read_csv(out / "results.csv")
    assert len(res) == 4 and res["n_test"].sum() == a.n_obs  # every study held out once
    assert (res["n_test"] == a.obs.groupby("study", observed=True).size().to_numpy()).all()
    assert res["auroc"].mean() > 0.7  # the planted signal transfers across studies


def test_grouped_pooled_folds_keep_samples_apart(cohort_store, tmp_path):
    import scdm_eval

    store, a = cohort_store
    out = tmp_path / "pooled"
    _ok(eval_app, ["run", "--store", str(store), "--scheme", "pooled", "--folds", "4", "--group-key", "sample",
                   "--classifier", "logreg", "--classifier", "xgboost", "--out", str(out), "-q"])
    res = pd.read_parquet(out / "results.parquet")
    assert len(res) == 4 * 2
    splits = scdm_eval.load_splits(store, scheme="pooled", folds=4, group_key="sample")
    sample = np.array([a.obs["sample"].iloc[i] for i in range(a.n_obs)])
    assert splits is not None and len(splits) == 4
    for part in splits:
        assert not set(sample[part.train]) & set(sample[part.test])


def test_every_fixture_model_in_one_results_table(pc9_path, fixtures_dir, vocab_dir, tmp_path):
    """Geneformer, tGPT, scGPT, scFoundation, UCE, CellPLM (fixture checkpoints), MiniLM and pca on
    96 real PC9 cells, scored together by scdm-eval."""
    src = ad.read_h5ad(pc9_path)
    resp = src.obs["response"].to_numpy()
    pick = np.concatenate([np.flatnonzero(resp == "sensitive")[:48], np.flatnonzero(resp == "resistant")[:48]])
    src[pick].copy().write_h5ad(tmp_path / "cells.h5ad")
    store = tmp_path / "s.zarr"
    gf = vocab_dir / "geneformer" / "gc30M"
    runs = {
        "pca": [],
        "lm": ["--checkpoint", "minilm", "--option", "n_genes=32"],
        "geneformer": ["--checkpoint", str(fixtures_dir / "geneformer" / "checkpoint"),
                       "--option", f"token_dictionary={gf / 'token_dictionary_gc30M.pkl'}",
                       "--option", f"gene_median_dictionary={gf / 'gene_median_dictionary_gc30M.pkl'}",
                       "--option", "max_length=256"],
        "tgpt": ["--checkpoint", str(fixtures_dir / "tgpt" / "checkpoint")],
        "scgpt": ["--checkpoint", str(fixtures_dir / "scgpt" / "checkpoint"), "--option", "max_length=256"],
        "scfoundation": ["--checkpoint", str(fixtures_dir / "scfoundation" / "checkpoint"),
                         "--option", f"gene_index={vocab_dir / 'scfoundation' / 'OS_scRNA_gene_index.19264.tsv'}"],
        "uce": ["--checkpoint", str(fixtures_dir / "uce" / "checkpoint"), "--option", "sample_size=256"],
        "cellplm": ["--checkpoint", str(fixtures_dir / "cellplm" / "checkpoint")],
    }
    for model, extra in runs.items():
        _ok(embed_app, ["extract", str(tmp_path / "cells.h5ad"), "--model", model, "--store", str(store),
                        "--dataset", "pc9", "-q", *extra])
    listing = _ok(embed_app, ["inspect", str(store)])
    for model in runs:
        assert model in listing
    out = tmp_path / "res"
    _ok(eval_app, ["run", "--store", str(store), "--folds", "3", "--classifier", "logreg", "--out", str(out), "-q"])
    res = pd.read_csv(out / "results.csv")
    assert sorted(res["model"].unique()) == sorted(runs)
    assert len(res) == len(runs) * 3
    assert res.groupby("model")["auroc"].mean()["pca"] > 0.7
