"""The synthetic cohort: raw integer counts, per-sample labels, a planted signal, study batch shifts."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict

from scdm_embed._synthetic import synthetic_cohort
from scdm_embed.inputs import META_KEYS, read_input


def _lognorm(a) -> np.ndarray:
    X = a.X.toarray()
    return np.log1p(X / X.sum(axis=1, keepdims=True) * 1e4)


def _grouped_auroc(a) -> float:
    y = (a.obs["response"] == "sensitive").to_numpy()
    p = cross_val_predict(LogisticRegression(max_iter=500), _lognorm(a), y, groups=a.obs["sample"],
                          cv=GroupKFold(4), method="predict_proba")[:, 1]
    return roc_auc_score(y, p)


@pytest.fixture(scope="module")
def cohort():
    return synthetic_cohort(cells_per_sample=20, seed=0)


def test_shape_and_metadata(cohort):
    a = cohort
    assert a.shape == (4 * 6 * 20, 500)
    assert list(a.var_names[:2]) == ["GENE0001", "GENE0002"]
    assert a.obs_names.is_unique
    for c in ("response", *META_KEYS):
        assert c in a.obs, c
    assert set(a.obs["response"]) == {"sensitive", "resistant"}
    assert a.obs["study"].nunique() == 4 and a.obs["sample"].nunique() == 24
    # every tissue and every drug spans two studies (so leave-one-study-out works inside them)
    assert a.obs.groupby("tissue")["study"].nunique().eq(2).all()
    assert a.obs.groupby("drug")["study"].nunique().eq(2).all()
    assert dict(a.obs.groupby("drug")["drug_type"].first()) == {"erlotinib": "targeted", "paclitaxel": "chemotherapy"}
    assert int((a.var["signal"] != 0).sum()) == 25


def test_raw_integer_counts(cohort):
    d = cohort.X.data
    assert np.all(d == np.round(d)) and d.min() >= 0
    assert (np.asarray(cohort.X.sum(axis=1)).ravel() > 0).all()


def test_labels_are_per_sample_and_balanced_within_study(cohort):
    obs = cohort.obs
    assert obs.groupby("sample")["response"].nunique().eq(1).all()
    per_study = obs.drop_duplicates("sample").groupby("study")["response"].value_counts().unstack()
    assert (per_study["sensitive"] == 3).all() and (per_study["resistant"] == 3).all()


def test_seeded(cohort):
    again = synthetic_cohort(cells_per_sample=20, seed=0)
    assert (again.X != cohort.X).nnz == 0 and again.obs.equals(cohort.obs)
    other = synthetic_cohort(cells_per_sample=20, seed=1)
    assert (other.X != cohort.X).nnz > 0


def test_signal_beats_chance_and_vanishes_without_signal(cohort):
    assert _grouped_auroc(cohort) > 0.85  # sample-grouped CV: no leakage, the planted genes carry it
    assert _grouped_auroc(synthetic_cohort(cells_per_sample=20, signal=0.0, seed=0)) < 0.7


def test_batch_shift_separates_studies():
    def spread(a):
        L = _lognorm(a)
        cent = np.array([L[(a.obs["study"] == s).to_numpy()].mean(0) for s in sorted(a.obs["study"].unique())])
        return np.linalg.norm(cent[:, None] - cent[None], axis=2)[np.triu_indices(len(cent), 1)].mean()

    shifted = spread(synthetic_cohort(cells_per_sample=20, signal=0.0, batch_shift=0.5))
    flat = spread(synthetic_cohort(cells_per_sample=20, signal=0.0, batch_shift=0.0))
    assert shifted > 2.5 * flat


def test_gene_names_and_bad_arguments():
    names = [f"G{i}" for i in range(30)]
    a = synthetic_cohort(n_studies=2, samples_per_study=2, cells_per_sample=5, n_genes=30, n_signal_genes=4,
                         gene_names=names)
    assert list(a.var_names) == names
    with pytest.raises(ValueError, match="gene_names"):
        synthetic_cohort(n_genes=30, n_signal_genes=4, gene_names=names[:-1])
    with pytest.raises(ValueError, match="n_signal_genes"):
        synthetic_cohort(n_genes=10, n_signal_genes=20)


def test_reads_as_valid_input(cohort, tmp_path):
    path = tmp_path / "cohort.h5ad"
    cohort.write_h5ad(path)
    ds = read_input(path)
    try:
        assert ds.is_integer and ds.n_cells == cohort.n_obs
        assert set(META_KEYS) <= set(ds.cells.columns)
        assert ds.cells["label"].tolist() == (cohort.obs["response"] == "sensitive").astype(int).tolist()
    finally:
        ds.close()
