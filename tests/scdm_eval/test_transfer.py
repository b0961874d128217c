"""`scdm-eval run --scheme transfer`: fit on the --train cells, score every --test dataset apart."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from scdm_embed.store import EmbeddingStore
from scdm_eval import load_splits
from scdm_eval.cli import app
from tests._cli import assert_refused
from tests.conftest import store_snapshot as snapshot
from tests.scdm_eval.conftest import cell_table, embeddings

runner = CliRunner()


@pytest.fixture
def transfer_store(tmp_path, cohort):
    """Datasets: primary (studies 1, 2), extB (study 3), extC (study 4); a ``collection`` column says which."""
    a = cohort.copy()
    a.obs["collection"] = np.where(a.obs["study"].isin(["study1", "study2"]), "primary", "external")
    models = embeddings(a)
    st = EmbeddingStore(tmp_path / "t.zarr", mode="a")
    for name, studies in (("primary", ["study1", "study2"]), ("extB", ["study3"]), ("extC", ["study4"])):
        m = a.obs["study"].isin(studies).to_numpy()
        st.put_dataset(name, cell_table(a[m], ("collection",)), input_hash=f"synthetic-{name}")
        for model, Z in models.items():
            st.put_embedding(model, name, Z[m])
    return tmp_path / "t.zarr"


def _run(store, out, *extra):
    return runner.invoke(app, ["run", "--store", str(store), "--scheme", "transfer", "--classifier", "logreg",
                               "--out", str(out), "-q", *extra])


def test_transfer_fits_on_train_and_scores_each_test_dataset(transfer_store, tmp_path):
    r = _run(transfer_store, tmp_path / "o", "--train", "collection=primary", "--test", "collection=external")
    assert r.exit_code == 0, r.output
    res = pd.read_parquet(tmp_path / "o" / "results.parquet")
    assert set(res["scheme"]) == {"transfer"}
    assert len(res) == 2 * 2  # 2 models x 2 test datasets (one classifier)
    assert sorted(res["partition"].unique()) == ["extB", "extC"]
    assert set(res["fold"]) == {0, 1}  # fold = index of the test dataset
    assert (res["n_train"] == 2 * 6 * 30).all() and (res["n_test"] == 6 * 30).all()
    sig = res[res["model"] == "sig"]
    assert (sig["auroc"] > 0.7).all(), sig[["partition", "auroc"]]  # planted genes carry over between studies
    pred = pd.read_parquet(tmp_path / "o" / "predictions.parquet")
    assert set(pred["dataset"].astype(str)) == {"extB", "extC"}  # only test cells are predicted
    assert (pred.groupby(["model", "partition"], observed=True)["dataset"].nunique() == 1).all()
    # the split is saved (versioned layout) and reused
    s = load_splits(transfer_store, res["split"].iloc[0])
    assert s is not None and s.params["layout"] == 2 and s.params["train"] == ["collection=primary"]
    parts = list(s)
    assert all(len(np.intersect1d(p.train, p.test)) == 0 for p in parts)
    r2 = _run(transfer_store, tmp_path / "o2", "--train", "primary", "--test", "extB", "--test", "extC")
    assert r2.exit_code == 0, r2.output
    again = pd.read_parquet(tmp_path / "o2" / "results.parquet")
    np.testing.assert_allclose(np.sort(again["auroc"].to_numpy()), np.sort(res["auroc"].to_numpy()), atol=1e-12)


def test_transfer_per_category(transfer_store, tmp_path):
    r = _run(transfer_store, tmp_path / "o", "--train", "primary", "--test", "collection=external", "--by", "tissue")
    assert r.exit_code == 0, r.output
    res = pd.read_parquet(tmp_path / "o" / "results.parquet")
    # study3 is lung, study4 breast: each category has one test dataset
    assert sorted(zip(res["category"], res["partition"], strict=True))[::2] == [("breast", "extC"), ("lung", "extB")]


def test_transfer_refusals(transfer_store, tmp_path, cohort):
    before = snapshot(transfer_store)
    cases = [
        (["--train", "primary"], "--test"),  # no test selector
        (["--train", "primary", "--test", "primary"], "both select"),
        (["--train", "primary", "--test", "nosuch"], "nosuch"),
        (["--train", "colour=red", "--test", "extB"], "colour"),
        (["--train", "collection=nothing", "--test", "extB"], "selects no cell"),
        (["--train", "study=study1", "--test", "primary"], "both select"),
    ]
    for args, word in cases:
        assert_refused(_run(transfer_store, tmp_path / "o", *args), word)
    assert_refused(runner.invoke(app, ["run", "--store", str(transfer_store), "--train", "primary", "--out",
                                       str(tmp_path / "o"), "-q"]), "transfer")
    assert snapshot(transfer_store) == before


def test_transfer_refuses_a_shared_study_or_sample(tmp_path, cohort):
    a = cohort[cohort.obs["study"].isin(["study1", "study2"]).to_numpy()].copy()
    s = a.obs["sample"].astype(str)
    first = s.str.endswith(("sample1", "sample2", "sample3")).to_numpy()
    models = embeddings(a)
    st = EmbeddingStore(tmp_path / "s.zarr", mode="a")
    for name, m in (("half1", first), ("half2", ~first)):
        st.put_dataset(name, cell_table(a[m]), input_hash=f"synthetic-{name}")
        st.put_embedding("pca", name, models["pca"][m])
    assert_refused(_run(tmp_path / "s.zarr", tmp_path / "o", "--train", "half1", "--test", "half2"), "study")
