"""`scdm-eval run` error paths: fixes that can help, and a failed run that leaves the store as it was."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from scdm_embed.store import EmbeddingStore
from scdm_eval import list_splits
from scdm_eval.cli import app
from tests._cli import assert_refused
from tests.conftest import store_snapshot
from tests.scdm_eval.conftest import build_store, embeddings

runner = CliRunner()


def _refused(args, *words: str) -> str:
    return assert_refused(runner.invoke(app, [str(a) for a in args]), *words)


def _run(store, out, *extra, classifier="logreg"):
    return ["run", "--store", store, "-c", classifier, "--folds", "3", "--n-jobs", "1", "--out", out, "-q", *extra]


# logreg reads the slice whole; xgboost streams its rows from the store (checked block by block first)
@pytest.mark.parametrize("classifier", ["logreg", "xgboost"])
def test_failed_run_saves_no_split_and_a_good_run_does(cohort, cohort_store, tmp_path, classifier):
    """A model with non-finite embeddings fails after the splits were computed, before any fit: the
    store stays byte-identical (no split saved). The same run on good embeddings saves its split once."""
    Z = embeddings(cohort)["pca"].copy()
    Z[5, 0] = np.nan
    st = EmbeddingStore(cohort_store, mode="a")
    m = cohort.obs["study"].isin(["study1", "study2"]).to_numpy()
    st.put_embedding("bad", "cohortA", Z[m])
    st.put_embedding("bad", "cohortB", Z[~m])
    before = store_snapshot(cohort_store)
    _refused(_run(cohort_store, tmp_path / "o", "--model", "bad", classifier=classifier), "non-finite embeddings",
             "--overwrite")
    assert store_snapshot(cohort_store) == before, "a failed run must leave the store as it was"
    assert len(list_splits(cohort_store)) == 0

    r = runner.invoke(app, [str(a) for a in _run(cohort_store, tmp_path / "o", "--model", "pca", classifier=classifier)])
    assert r.exit_code == 0, r.output
    assert len(list_splits(cohort_store)) == 1


def test_out_that_is_a_file_is_refused_before_any_fit(cohort_store, tmp_path):
    out = tmp_path / "results.txt"
    out.write_text("not a folder")
    before = store_snapshot(cohort_store)
    _refused(_run(cohort_store, out), "results.txt", "is a file", "--out")
    assert store_snapshot(cohort_store) == before


@pytest.fixture
def one_class_store(cohort, tmp_path):
    """The cohort with every cell relabelled sensitive (as a mislabelled extraction would store it)."""
    a = cohort.copy()
    a.obs["response"] = "sensitive"
    return build_store(tmp_path / "one.zarr", a)


def test_single_class_store_gets_a_fix_that_can_help(one_class_store, tmp_path):
    before = store_snapshot(one_class_store)
    out = _refused(_run(one_class_store, tmp_path / "o"), "only sensitive cells")
    fix = out.split("fix:", 1)[1]
    # no split can help: the fix says to add the other class or check the labels, not to change --folds
    assert "holds the other class" in fix and "--response-key" in fix
    assert "--folds" not in fix
    assert store_snapshot(one_class_store) == before


def test_single_class_category_names_it_and_a_coarser_by(cohort, tmp_path):
    a = cohort.copy()
    a.obs["response"] = a.obs["response"].astype(str)
    a.obs.loc[a.obs["tissue"] == "breast", "response"] = "resistant"
    store = build_store(tmp_path / "s.zarr", a)
    out = _refused(_run(store, tmp_path / "o", "--by", "tissue", "--strict"), "breast")
    fix = out.split("fix:", 1)[1]
    assert "'breast'" in fix and "--by all" in fix
    # and the advice works: pooled over all tissues, the run goes through
    r = runner.invoke(app, [str(x) for x in _run(store, tmp_path / "o", "--by", "all")])
    assert r.exit_code == 0, r.output
