"""Fixtures for scdm-eval: small synthetic cohorts written into stores with put_dataset/put_embedding."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.decomposition import PCA

from scdm_embed.inputs import META_KEYS
from scdm_embed.store import EmbeddingStore
from scdm_embed.testing import synthetic_cohort

#: Fast classifier settings for tests.
FAST = {"mlp": {"max_epochs": 10, "hidden": (32, 32), "patience": 3, "batch_size": 64}, "xgboost": {"n_estimators": 10, "max_depth": 3}}


def cell_table(a: ad.AnnData, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """A store cell table (label, response, metadata roles) from a cohort's obs."""
    cells = pd.DataFrame(index=pd.Index(a.obs_names.astype(str), name="cell_id"))
    cells["label"] = (a.obs["response"].to_numpy() == "sensitive").astype(np.int8)
    cells["response"] = a.obs["response"].astype(str).to_numpy()
    for c in (*META_KEYS, *extra):
        if c in a.obs:
            cells[c] = a.obs[c].astype(str).to_numpy()
    return cells


def embeddings(a: ad.AnnData) -> dict[str, np.ndarray]:
    """Two quick 'models': a PCA of log-normalised counts and log1p of a few planted genes."""
    X = np.asarray(a.X.toarray() if hasattr(a.X, "toarray") else a.X, dtype=np.float64)
    L = np.log1p(X / X.sum(axis=1, keepdims=True) * 1e4)
    pca = PCA(12, random_state=0, svd_solver="full").fit_transform(L).astype(np.float32)
    sig = L[:, np.flatnonzero(a.var["signal"].to_numpy() != 0)[:6]].astype(np.float32)
    return {"pca": pca, "sig": sig}


def build_store(path: Path, a: ad.AnnData, *, datasets: Mapping[str, list[str]] | None = None,
                models: Mapping[str, np.ndarray] | None = None, extra: tuple[str, ...] = ()) -> Path:
    """Write cohort ``a`` into a store: one dataset per entry of ``datasets`` (name -> studies)."""
    datasets = datasets or {"cohort": sorted(a.obs["study"].unique())}
    models = embeddings(a) if models is None else models
    st = EmbeddingStore(path, mode="a")
    for name, studies in datasets.items():
        m = a.obs["study"].isin(studies).to_numpy()
        st.put_dataset(name, cell_table(a[m], extra), input_hash=f"synthetic-{name}")
        for model, Z in models.items():
            st.put_embedding(model, name, Z[m])
    return path


@pytest.fixture(scope="session")
def cohort() -> ad.AnnData:
    """4 studies (2 lung, 2 breast; 2 erlotinib, 2 paclitaxel) x 6 samples x 30 cells."""
    return synthetic_cohort(n_studies=4, samples_per_study=6, cells_per_sample=30, n_genes=200, seed=0)


@pytest.fixture(scope="session")
def _cohort_store(tmp_path_factory, cohort) -> Path:
    path = tmp_path_factory.mktemp("cohort") / "s.zarr"
    return build_store(path, cohort, datasets={"cohortA": ["study1", "study2"], "cohortB": ["study3", "study4"]})


@pytest.fixture
def cohort_store(_cohort_store, tmp_path) -> Path:
    """A fresh copy (no saved splits) of a two-dataset store of the cohort with models pca and sig."""
    path = tmp_path / "s.zarr"
    shutil.copytree(_cohort_store, path)
    return path


def run_quiet(store, **kw):
    """``run_evaluation`` with the FAST classifier settings, one process, warnings silenced."""
    import warnings

    from scdm_eval import run_evaluation

    kw.setdefault("n_jobs", 1)
    kw.setdefault("classifier_options", {k: v for k, v in FAST.items() if k in kw.get("classifiers", ())})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_evaluation(store, **kw)
