"""`scdm-eval run --scheduler / --dask-workers`: the grid on a real dask.distributed cluster (2 worker
processes x 1 thread) gives the in-process results, each task reading its rows from the store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from scdm_embed.errors import StoreError
from scdm_embed.store import EmbeddingStore
from scdm_eval._distributed import read_slice
from scdm_eval.cli import app
from tests._cli import assert_refused
from tests.conftest import store_snapshot

runner = CliRunner()
#: a small but complete grid: every classifier family, grouped early stopping, two datasets
ARGS = ["--model", "pca", "--folds", "3", "--group-key", "sample", "-q"]
ALL = ["-c", "logreg", "-c", "xgboost", "-c", "mlp", "--set", "mlp.max_epochs=5", "--set", "mlp.hidden=16",
       "--set", "xgboost.n_estimators=10"]


@pytest.fixture(scope="module")
def cluster():
    """A real LocalCluster (2 worker processes, 1 thread each) that the CLI reaches by address."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as c:
        yield c


def _run(store, out, *extra) -> pd.DataFrame:
    r = runner.invoke(app, ["run", "--store", str(store), "--out", str(out), *ARGS, *map(str, extra)])
    assert r.exit_code == 0, r.output
    return pd.read_parquet(out / "results.parquet")


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Identical rows: every metric bit for bit (NaN where NaN), every label."""
    a, b = a.reset_index(drop=True), b.reset_index(drop=True)
    assert list(a.columns) == list(b.columns) and len(a) == len(b) > 0
    num = a.select_dtypes("number").columns
    assert np.array_equal(a[num].to_numpy(float), b[num].to_numpy(float), equal_nan=True)
    assert a.drop(columns=num).equals(b.drop(columns=num))


@pytest.mark.parametrize("scheme", ["pooled", "cross"])
def test_scheduler_grid_equals_local_run(cohort_store, cluster, tmp_path, scheme):
    local = _run(cohort_store, tmp_path / "local", "--scheme", scheme, *ALL)
    url = f"file://{cohort_store}"  # workers open the store by its URL (an fsspec URL every worker reaches)
    dist = _run(url, tmp_path / "dask", "--scheme", scheme, "--scheduler", cluster.scheduler_address, *ALL)
    _same(local, dist)
    pl = pd.read_parquet(tmp_path / "local" / "predictions.parquet")
    pd_ = pd.read_parquet(tmp_path / "dask" / "predictions.parquet")
    assert np.array_equal(pl["p_sensitive"].to_numpy(), pd_["p_sensitive"].to_numpy())


def test_local_dask_workers_equal_local_run(cohort_store, tmp_path):
    # the command starts (and closes) its own local cluster; one fast classifier keeps it short
    local = _run(cohort_store, tmp_path / "local", "--scheme", "cross", "-c", "logreg")
    dist = _run(cohort_store, tmp_path / "dask", "--scheme", "cross", "--dask-workers", "2", "-c", "logreg")
    _same(local, dist)


def test_a_task_reads_the_rows_of_its_partition(cohort_store):
    st = EmbeddingStore(cohort_store)
    X, cells = st.load("pca")
    keys = cells.index.to_numpy(dtype=object)
    rows = np.array([3, 7, 100, 101, len(keys) - 1])
    assert np.array_equal(read_slice(st, "pca", st.datasets(), keys[rows]), X[rows])


def test_dask_options_refused_cleanly(cohort_store, tmp_path):
    import dask

    out = tmp_path / "o"
    snap = store_snapshot(cohort_store)
    base = ["run", "--store", str(cohort_store), "--out", str(out), "--model", "pca", "-c", "logreg", "--folds", "3"]
    assert_refused(runner.invoke(app, [*base, "--dask-workers", "0"]), "--dask-workers")
    assert_refused(runner.invoke(app, [*base, "--dask-workers", "2", "--scheduler", "tcp://127.0.0.1:1"]),
                   "--scheduler")
    assert_refused(runner.invoke(app, [*base, "--scheduler", "not-an-address"]), "scheduler")
    assert_refused(runner.invoke(app, [*base, "--dask-workers", "2", "--permutations", "3"]), "--permutations")
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):  # nothing listens on port 1
        assert_refused(runner.invoke(app, [*base, "--scheduler", "tcp://127.0.0.1:1"]), "127.0.0.1:1")
    assert not out.exists()
    assert store_snapshot(cohort_store) == snap


def test_memory_url_store_reads_and_evaluates(cohort_store, tmp_path):
    import uuid

    import fsspec

    url = f"memory://scdm-{uuid.uuid4().hex[:8]}.zarr"
    fsspec.filesystem("memory").put(str(cohort_store), url.removeprefix("memory://"), recursive=True)
    X, cells = EmbeddingStore(cohort_store).load("sig")
    st = EmbeddingStore(url)
    assert st.path == url and st.datasets() == ["cohortA", "cohortB"]
    Xm, cm = st.load("sig")
    assert Xm.tobytes() == X.tobytes() and cm.equals(cells)
    keys = cells.index[[9, 2, 50]]
    assert np.array_equal(st.load("sig", cells=keys)[0], X[[9, 2, 50]])
    local = _run(cohort_store, tmp_path / "local", "-c", "logreg")
    remote = _run(url, tmp_path / "remote", "-c", "logreg")  # read-only: the splits stay in memory
    _same(local.drop(columns="split"), remote.drop(columns="split"))
    with pytest.raises(OSError, match="read-only"):
        EmbeddingStore(url, mode="a")
    with pytest.raises(StoreError, match="no scdm store"):
        EmbeddingStore("memory://absent.zarr")
