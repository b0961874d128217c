"""Splits: stratified / grouped k-fold, leave-one-study-out, loud refusals, stability, saved in the store."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

import scdm_eval._splits as splits_mod
from scdm_embed.errors import ScdmError
from scdm_embed.store import EmbeddingStore
from scdm_embed.testing import synthetic_cohort
from scdm_eval import LeakageWarning, SplitWarning, load_splits, make_splits
from scdm_eval._splits import compute_splits, list_splits
from tests.scdm_eval.conftest import build_store, cell_table


@pytest.fixture(scope="module")
def cells(cohort) -> pd.DataFrame:
    """The cohort's cell table as the store returns it (dataset column, global keys)."""
    t = cell_table(cohort)
    t.insert(0, "row", np.arange(len(t)))
    t.insert(0, "dataset", "cohort")
    t.index = pd.Index([f"cohort/{c}" for c in t.index], name="cell")
    return t


def _quiet(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kw.pop("fn", compute_splits)(**kw)


def test_pooled_is_stratified_and_tests_every_cell_once(cells):
    s = _quiet(cells=cells, folds=5, seed=0, group_key="none")  # explicit cell-level folds
    assert len(s) == 5 and (s.table["fold"] >= 0).all()
    assert s.table.index.equals(cells.index)
    rate = cells["label"].mean()
    for p in s:
        assert len(np.intersect1d(p.train, p.test)) == 0 and len(p.train) + len(p.test) == len(cells)
        y_test = cells["label"].to_numpy()[p.test]
        assert abs(y_test.mean() - rate) < 0.02  # stratified
    assert s.partitions["n_test"].sum() == len(cells)


def test_grouped_folds_never_split_a_sample(cells):
    s = compute_splits(cells, folds=3, group_key="sample", seed=0)
    per_sample = s.table.groupby(cells["sample"].to_numpy())["fold"].nunique()
    assert (per_sample == 1).all()
    assert len(s) == 3
    for p in s:  # both classes in every training set and every test fold
        assert set(cells["label"].to_numpy()[p.train]) == {0, 1}
        assert set(cells["label"].to_numpy()[p.test]) == {0, 1}
    # the default groups these per-sample labels too; explicit cell-level folds straddle samples
    assert compute_splits(cells, folds=3, seed=0).table["fold"].equals(s.table["fold"])
    assert s.params["leak_prone"] is False
    loose = _quiet(cells=cells, folds=3, seed=0, group_key="none")
    assert loose.params["leak_prone"] is True and loose.params["group_key"] is None
    assert (loose.table.groupby(cells["sample"].to_numpy())["fold"].nunique() > 1).any()


def test_by_category_keeps_training_inside_the_category(cells):
    s = compute_splits(cells, by="tissue", folds=3, group_key="sample", seed=0)
    assert sorted(s.partitions["category"].unique()) == ["breast", "lung"]
    assert len(s) == 6
    tissue = cells["tissue"].to_numpy()
    for p in s:
        assert set(tissue[p.train]) == set(tissue[p.test]) == {p.category}


def test_leave_one_study_out(cells):
    s = compute_splits(cells, scheme="cross", by="tissue")
    assert s.params["study_key"] == "study" and s.params["folds"] is None
    study = cells["study"].to_numpy()
    names = []
    for p in s:
        held = set(study[p.test])
        assert held == {p.name}
        assert p.name not in set(study[p.train]) and len(set(study[p.train])) == 1  # the category's other study
        names.append(p.name)
    assert sorted(names) == ["study1", "study2", "study3", "study4"]


def test_cross_skips_categories_with_one_study(cells):
    c = cells.copy()
    c.loc[c["study"] == "study4", "tissue"] = "skin"  # skin: one study; breast: one study left too
    with pytest.warns(SplitWarning, match="one study only"):
        s = compute_splits(c, scheme="cross", by="tissue")
    assert set(s.skipped["category"]) == {"breast", "skin"}
    assert (s.table.loc[c["tissue"].isin(["breast", "skin"]).to_numpy(), "fold"] == -1).all()
    assert len(s) == 2
    with pytest.raises(ScdmError, match="cannot be evaluated"):
        compute_splits(c, scheme="cross", by="tissue", strict=True)
    with pytest.raises(ScdmError, match="no category / held-out study can be evaluated") as e:
        compute_splits(c, scheme="cross", by="study")
    assert "--scheme pooled" in e.value.fix


def test_cross_single_class_study(cells):
    c = cells.copy()
    m = (c["study"] == "study1").to_numpy()
    c.loc[m, "label"] = 0  # held-out study1 is all resistant: still evaluated (metrics decide what is defined)
    s = compute_splits(c, scheme="cross", by="all")
    row = s.partitions.set_index("name").loc["study1"]
    assert row["skipped"] == "" and row["test_sensitive"] == 0
    # two studies, each single-class: training on the other one has a single class -> skipped with a reason
    two = c[c["study"].isin(["study1", "study2"]).to_numpy()].copy()
    two.loc[two["study"] == "study2", "label"] = 1
    with pytest.raises(ScdmError, match="the other studies hold only"):
        compute_splits(two, scheme="cross", by="all")


def test_single_class_category_is_refused_loudly(cells):
    c = cells.copy()
    c["label"] = 1
    with pytest.raises(ScdmError, match="category 'all'|no category can be evaluated") as e:
        _quiet(cells=c, folds=5)
    assert "only sensitive cells" in str(e.value) and e.value.fix
    # one tissue single-class: skipped with a recorded reason, or refused with strict
    c = cells.copy()
    c.loc[c["tissue"] == "lung", "label"] = 0
    with pytest.warns(SplitWarning, match="lung: only resistant cells"):
        s = compute_splits(c, by="tissue", folds=3, group_key="sample")
    assert list(s.skipped["category"]) == ["lung"] and len(s) == 3
    with pytest.raises(ScdmError, match="lung"):
        compute_splits(c, by="tissue", folds=3, group_key="sample", strict=True)


def test_too_few_groups_for_k_folds_says_so(cells):
    with pytest.raises(ScdmError) as e:
        compute_splits(cells, by="tissue", folds=10, group_key="sample")
    msg = str(e.value)
    assert "6 sample group(s) hold" in msg and "fewer than 10 folds" in msg and "--folds 6" in msg
    small = cells.iloc[:50]
    with pytest.raises(ScdmError, match="fewer than 10 folds"):
        _quiet(cells=small.assign(label=np.r_[np.ones(5), np.zeros(45)].astype(np.int8)), folds=10)


def test_leakage_warnings(cells):
    with pytest.warns(LeakageWarning, match="perfectly confounded with 'sample'"):
        compute_splits(cells, folds=5, group_key="none")
    c = cells.drop(columns="sample").assign(condition=np.where(cells["label"] == 1, "treated", "control"))
    with pytest.warns(LeakageWarning, match="confounded with 'condition'.*--group-key condition"):
        compute_splits(c, folds=5)
    with pytest.warns(LeakageWarning, match="no 'sample' column"):
        compute_splits(cells.drop(columns="sample"), folds=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LeakageWarning)
        compute_splits(cells, folds=3, group_key="sample")  # grouped: no warning
        compute_splits(cells, scheme="cross")


def test_bad_parameters(cells):
    with pytest.raises(ScdmError, match="--folds must be an integer >= 2"):
        compute_splits(cells, folds=1, group_key="sample")
    with pytest.raises(ScdmError, match="unknown --by 'colour'"):
        compute_splits(cells, by="colour", group_key="sample")
    with pytest.raises(ScdmError, match="no 'regimen' column"):
        compute_splits(cells.drop(columns="regimen"), by="regimen", group_key="sample")
    with pytest.raises(ScdmError, match="group key 'patient' is not a metadata column"):
        compute_splits(cells, group_key="patient")
    with pytest.raises(ScdmError, match="unknown scheme"):
        compute_splits(cells, scheme="loso")


def test_stable_across_runs_and_seeded(cells):
    a = compute_splits(cells, folds=3, group_key="sample", seed=0)
    b = compute_splits(cells, folds=3, group_key="sample", seed=0)
    c = compute_splits(cells, folds=3, group_key="sample", seed=1)
    pd.testing.assert_frame_equal(a.table, b.table)
    assert a.name == b.name and a.name != c.name
    assert not a.table["fold"].equals(c.table["fold"])


def test_saved_in_the_store_and_reused(cohort_store, monkeypatch):
    s = make_splits(cohort_store, folds=3, group_key="sample", seed=0)
    st = EmbeddingStore(cohort_store)
    assert st.splits() == [s.name]
    assert s.name.startswith("pooled-all-k3-sample-s0-")
    assert set(s.params["datasets"]) == {"cohortA", "cohortB"} and len(s.table) == len(st.cells())
    loaded = load_splits(cohort_store, folds=3, group_key="sample", seed=0)
    pd.testing.assert_frame_equal(loaded.table, s.table)
    pd.testing.assert_frame_equal(loaded.partitions, s.partitions)
    assert load_splits(cohort_store, s.name).name == s.name
    assert load_splits(cohort_store, folds=3, group_key="sample", seed=1) is None

    def boom(*a, **k):
        raise AssertionError("splits were recomputed instead of loaded")

    monkeypatch.setattr(splits_mod, "compute_splits", boom)
    again = make_splits(cohort_store, folds=3, group_key="sample", seed=0)  # loaded, not recomputed
    pd.testing.assert_frame_equal(again.table, s.table)
    monkeypatch.undo()
    listing = list_splits(cohort_store)
    assert list(listing["name"]) == [s.name] and listing["partitions"].iloc[0] == 3


def test_new_cells_get_new_splits(tmp_path):
    a = synthetic_cohort(n_studies=2, samples_per_study=6, cells_per_sample=10, n_genes=40, n_signal_genes=4)
    path = build_store(tmp_path / "s.zarr", a, datasets={"one": ["study1"]})
    first = make_splits(path, folds=3, group_key="sample")
    build_store(path, a, datasets={"two": ["study2"]})  # another dataset arrives
    second = make_splits(path, folds=3, group_key="sample")
    assert first.name != second.name and len(second.table) == 2 * len(first.table)
    assert len(EmbeddingStore(path).splits()) == 2
    only_one = make_splits(path, folds=3, group_key="sample", datasets=["one"])
    assert only_one.name == first.name


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(ScdmError, match="no scdm store"):
        make_splits(tmp_path / "nope.zarr")


def test_cross_with_a_group_key_checks_groups_stay_inside_studies(cells):
    s = compute_splits(cells, scheme="cross", group_key="sample")
    assert len(s) == 4
    c = cells.copy()
    c.loc[c["sample"] == "study2_sample1", "sample"] = "study1_sample1"  # one sample id in two studies
    with pytest.raises(ScdmError, match="span several studys|span several study"):
        compute_splits(c, scheme="cross", group_key="sample")
