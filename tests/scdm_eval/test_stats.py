"""Statistics: paired tests (known effect found, no effect at the stated rate), Holm, calibration
metrics, and the label-permutation null on real PC9 cells (`scdm-eval run --permutations`, `compare`)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import brier_score_loss
from typer.testing import CliRunner

from scdm_embed.cli import app as embed_app
from scdm_eval import compute_metrics
from scdm_eval._stats import holm, paired_test, paired_tests
from scdm_eval.cli import app as eval_app
from tests._cli import assert_refused

runner = CliRunner()


def _ok(app, args):
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return r


# -- paired tests: pure numpy ---------------------------------------------------------------------
def _folds(rng, n=10, effect=0.0):
    base = rng.uniform(0.6, 0.8, n)  # fold difficulty shared by both models (what pairing removes)
    return base + effect + rng.normal(0, 0.02, n), base + rng.normal(0, 0.02, n)


def test_a_known_effect_is_detected():
    hits = 0
    for seed in range(50):
        a, b = _folds(np.random.default_rng(seed), effect=0.04)
        r = paired_test(a, b)
        hits += r["p_ttest"] < 0.05 and r["p_wilcoxon"] < 0.05
        assert r["effect_size"] > 0
    assert hits >= 45  # d_z = 0.04 / 0.028 ~ 1.4 over 10 folds: power ~0.99 (t), Wilcoxon similar


def test_no_effect_gives_false_positives_at_alpha():
    n_rep = 400
    t_hits = w_hits = 0
    for seed in range(n_rep):
        a, b = _folds(np.random.default_rng(1000 + seed))
        r = paired_test(a, b)
        t_hits += r["p_ttest"] < 0.05
        w_hits += r["p_wilcoxon"] < 0.05
    # binomial(400, 0.05): mean 20, s.d. 4.4 -> [6, 34] is beyond +-3 s.d.
    assert 6 <= t_hits <= 34, t_hits
    assert 4 <= w_hits <= 34, w_hits  # exact Wilcoxon with n=10 is slightly conservative


def test_identical_rows_are_not_different_and_nan_pairs_drop():
    a = np.array([0.7, 0.8, np.nan, 0.75])
    r = paired_test(a, a)
    assert r["p_ttest"] == 1.0 and r["n_folds"] == 3
    assert np.isnan(paired_test([0.5], [0.4])["p_ttest"])  # one pair: no test


def test_holm_matches_the_step_down_definition():
    p = np.array([0.01, 0.04, 0.03, np.nan, 0.005])
    got = holm(p)
    # sorted 0.005, 0.01, 0.03, 0.04 with m = 4: 0.02, 0.03, 0.06, 0.06 (monotone)
    np.testing.assert_allclose(got[[4, 0, 2, 1]], [0.02, 0.03, 0.06, 0.06], atol=1e-12)
    assert np.isnan(got[3])


def test_paired_tests_over_a_results_table():
    rng = np.random.default_rng(0)
    rows = []
    for fold in range(10):
        base = rng.uniform(0.6, 0.8)
        for model, shift in (("good", 0.05), ("same1", 0.0), ("same2", 0.0)):
            for clf in ("logreg", "mlp"):
                v = base + shift + rng.normal(0, 0.01)
                rows.append({"model": model, "scheme": "pooled", "by": "all", "category": "all", "classifier": clf,
                             "fold": fold, "partition": f"fold{fold}", "auroc": v, "brier": 0.3 - v / 2})
    s = paired_tests(pd.DataFrame(rows), metrics=("auroc", "brier"))
    models = s[(s["compared"] == "model") & (s["fixed"] == "logreg")].set_index(["metric", "a", "b"])
    assert models.loc[("auroc", "good", "same1"), "significant"]
    assert models.loc[("auroc", "good", "same1"), "better"] == "good"
    assert models.loc[("brier", "good", "same1"), "better"] == "good"  # lower Brier is better
    assert not models.loc[("auroc", "same1", "same2"), "significant"]
    # Holm: adjusted >= raw, within each family
    assert (s["p_ttest_holm"] >= s["p_ttest"] - 1e-15).all()


# -- calibration metrics --------------------------------------------------------------------------
def test_brier_and_ece():
    rng = np.random.default_rng(3)
    p = rng.uniform(0, 1, 20000)
    y = (rng.uniform(0, 1, p.size) < p).astype(int)  # calibrated by construction
    m = compute_metrics(y, p)
    assert abs(m["brier"] - brier_score_loss(y, p)) <= 1e-12
    assert m["ece"] < 0.02
    over = compute_metrics(y, np.clip(p + 0.3, 0, 1))  # over-confident in "sensitive"
    assert over["ece"] > 0.2 and over["brier"] > m["brier"]


# -- permutation null on real PC9 cells ----------------------------------------------------------
@pytest.fixture(scope="module")
def pc9_stores(tmp_path_factory, pc9_small):
    """pca embeddings of 240 real PC9 cells, with the real labels and with shuffled labels."""
    tmp = tmp_path_factory.mktemp("pc9stats")
    a = ad.read_h5ad(pc9_small)
    shuffled = a.copy()
    shuffled.obs["response"] = np.random.default_rng(0).permutation(a.obs["response"].to_numpy())
    shuffled.write_h5ad(tmp / "shuffled.h5ad")
    out = {}
    for name, path in (("real", pc9_small), ("shuffled", tmp / "shuffled.h5ad")):
        store = tmp / f"{name}.zarr"
        _ok(embed_app, ["extract", str(path), "--model", "pca", "--store", str(store), "--dataset", "pc9", "-q"])
        out[name] = store
    return out


def _perm_run(store, out, n):
    r = _ok(eval_app, ["run", "--store", str(store), "--classifier", "logreg", "--set", "logreg.C=0.1",
                       "--folds", "5", "--permutations", str(n), "--out", str(out), "-q"])
    return r, pd.read_csv(out / "permutation.csv").set_index(["classifier", "metric"])


def test_permutation_null_real_labels_significant(pc9_stores, tmp_path):
    r, perm = _perm_run(pc9_stores["real"], tmp_path / "real", 29)
    assert "permutation" in r.output and "paired tests" in r.output
    row = perm.loc[("logreg", "auroc")]
    assert row["observed"] > 0.8  # treated vs control cells separate (see SOURCES.md)
    assert abs(row["null_mean"] - 0.5) < 0.1
    assert row["n_permutations"] == 29 and row["p_value"] == pytest.approx(1 / 30, abs=1e-12)
    md = (tmp_path / "real" / "summary.md").read_text()
    assert "## Statistics" in md and "Label-permutation null" in md


def test_permutation_null_shuffled_labels_near_chance(pc9_stores, tmp_path):
    _, perm = _perm_run(pc9_stores["shuffled"], tmp_path / "shuffled", 19)
    row = perm.loc[("logreg", "auroc")]
    assert abs(row["observed"] - 0.5) < 0.12
    assert abs(row["null_mean"] - 0.5) < 0.1
    assert row["p_value"] > 0.05


def test_compare_cli_rewrites_the_stats(pc9_stores, tmp_path):
    out = tmp_path / "res"
    _ok(eval_app, ["run", "--store", str(pc9_stores["real"]), "--classifier", "logreg", "--classifier", "majority",
                   "--folds", "5", "--out", str(out), "-q"])
    (out / "stats.csv").unlink()
    r = _ok(eval_app, ["compare", "--results", str(out)])
    assert "significant" in r.output and (out / "stats.csv").exists()
    stats = pd.read_parquet(out / "stats.parquet")
    au = stats[(stats["metric"] == "auroc") & (stats["compared"] == "classifier")].iloc[0]
    assert au["significant"] and au["better"] == "logreg"  # logreg beats majority on AUROC, 5 paired folds
    assert (out / "summary.md").read_text().count("## Statistics") == 1


def test_compare_and_permutations_refuse_bad_input(pc9_stores, tmp_path):
    assert_refused(runner.invoke(eval_app, ["compare", "--results", str(tmp_path)]), "results.parquet")
    (tmp_path / "results.parquet").write_text("not parquet")
    assert_refused(runner.invoke(eval_app, ["compare", "--results", str(tmp_path)]), "results")
    assert_refused(runner.invoke(eval_app, ["run", "--store", str(pc9_stores["real"]), "--classifier", "logreg",
                                            "--permutations", "-1", "--out", str(tmp_path / "o")]), "permutations")


def test_permutations_shuffle_within_groups_and_categories():
    from scdm_eval._stats import permute_labels

    rng = np.random.default_rng(0)
    groups = np.repeat([f"s{i}" for i in range(12)], 10)
    y = np.repeat(np.arange(12) % 2, 10)
    category = np.repeat(["a", "b"], 60)
    moved = 0
    for _ in range(20):
        yp = permute_labels(y, category, groups, rng)
        per_group = pd.Series(yp).groupby(groups).nunique()
        assert (per_group == 1).all()  # a sample keeps one label
        for c in ("a", "b"):  # labels move only within a category: its class counts stay
            assert yp[category == c].sum() == y[category == c].sum()
        moved += not np.array_equal(yp, y)
    assert moved >= 18
    cells = permute_labels(y, category, None, rng)  # no groups: cells shuffled within each category
    assert cells[category == "a"].sum() == y[category == "a"].sum()
    assert pd.Series(cells).groupby(groups).nunique().max() == 2
