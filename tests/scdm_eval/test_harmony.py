"""`scdm-eval run --correct harmony --batch-key study`: a planted study shift that Harmony removes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from scdm_embed.store import EmbeddingStore
from scdm_eval._correct import batch_entropy, correct_embeddings
from scdm_eval.cli import app
from tests._cli import assert_refused
from tests.conftest import store_snapshot

runner = CliRunner()


def _shifted_cohort(seed: int = 0):
    """3 studies x 4 samples x 40 cells; 10-d embeddings: label on dim 0, a large offset per study."""
    rng = np.random.default_rng(seed)
    rows, Z = [], []
    offsets = rng.normal(0, 1.0, (3, 10))
    for s in range(3):
        for k in range(4):
            lab = k % 2
            for c in range(40):
                rows.append({"cell_id": f"st{s}_s{k}_c{c}", "label": lab, "response": "sensitive" if lab else "resistant",
                             "study": f"study{s}", "sample": f"st{s}_s{k}"})
                z = rng.normal(0, 1, 10) + offsets[s]
                z[0] += 2.0 * lab
                Z.append(z)
    cells = pd.DataFrame(rows).set_index("cell_id")
    cells["label"] = cells["label"].astype(np.int8)
    return cells, np.asarray(Z, dtype=np.float32)


@pytest.fixture
def shifted_store(tmp_path):
    cells, Z = _shifted_cohort()
    st = EmbeddingStore(tmp_path / "h.zarr", mode="a")
    st.put_dataset("cohort", cells, input_hash="synthetic-shift")
    st.put_embedding("emb", "cohort", Z)
    return tmp_path / "h.zarr"


def test_harmony_removes_a_planted_study_shift():
    cells, Z = _shifted_cohort()
    study = cells["study"].to_numpy()
    fixed = correct_embeddings(Z, study, np.arange(len(Z)), method="harmony")
    before, after = batch_entropy(Z, study), batch_entropy(fixed, study)
    assert before < 0.4, before  # neighbours mostly from the cell's own study
    assert after > 0.8, after  # studies mixed (1 = fully)
    # and the label, which Harmony never saw, still separates the cells within each study
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(cells["label"], fixed[:, 0]) > 0.8
    assert np.array_equal(correct_embeddings(Z, study, np.arange(10), method="none"), Z)


def test_run_scores_corrected_and_uncorrected_side_by_side(shifted_store, tmp_path):
    out = tmp_path / "o"
    r = runner.invoke(app, ["run", "--store", str(shifted_store), "--scheme", "cross", "--classifier", "logreg",
                            "--correct", "harmony", "--batch-key", "study", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    res = pd.read_parquet(out / "results.parquet")
    assert sorted(res["model"].unique()) == ["emb", "emb+harmony"]
    by = res.set_index("model")
    assert set(by.loc["emb", "correction"]) == {"none"} and not by.loc["emb", "transductive"].any()
    assert set(by.loc["emb+harmony", "correction"]) == {"harmony"} and by.loc["emb+harmony", "transductive"].all()
    assert (res.groupby("model")["auroc"].mean() > 0.8).all()
    md = (out / "summary.md").read_text()
    assert "emb+harmony" in md and "## Statistics" in md  # side by side, and the paired comparison


def test_harmony_refusals(shifted_store, tmp_path):
    before = store_snapshot(shifted_store)
    assert_refused(runner.invoke(app, ["run", "--store", str(shifted_store), "--correct", "harmony", "--batch-key",
                                       "batch", "--classifier", "logreg", "--out", str(tmp_path / "o")]), "batch")
    r = runner.invoke(app, ["run", "--store", str(shifted_store), "--correct", "combat", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2  # not a choice (typer's usage error)
    assert store_snapshot(shifted_store) == before
