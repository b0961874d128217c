"""Sharded extraction: concurrent `--shard i/n` processes write one store, identical to one process;
a killed shard resumes; `finalize`; shards as tasks on a real local Dask cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from scdm_embed import EmbeddingStore, StoreError, extract
from scdm_embed._shard import Shard, finalize
from scdm_embed.cli import app
from tests._cli import assert_refused
from tests.conftest import store_snapshot

CHUNK = 24  # 240 cells -> 10 chunks
CLI = str(Path(sys.executable).with_name("scdm-embed"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
runner = CliRunner()

SLOW_SHARD = textwrap.dedent(
    """
    import sys, time
    from scdm_embed import extract
    from scdm_embed.models import register_adapter
    from scdm_embed.models._reference import PCAAdapter

    class SlowPCA(PCAAdapter):
        name = "pca"
        def tokenize(self, chunk, plan):
            time.sleep(0.5)
            return super().tokenize(chunk, plan)

    register_adapter("pca", SlowPCA)
    extract(sys.argv[1], model="pca", store=sys.argv[2], dataset="pc9", chunk_size=int(sys.argv[3]),
            progress=False, shard=sys.argv[4])
    """
)


@pytest.fixture(scope="module")
def single(pc9_small, tmp_path_factory) -> Path:
    """The reference: one process, the whole input."""
    path = tmp_path_factory.mktemp("single") / "one.zarr"
    r = extract(pc9_small, model="pca", store=path, dataset="pc9", chunk_size=CHUNK, progress=False)
    assert r.complete and r.chunks_computed == 10
    return path


def _assert_same_store(a: Path, b: Path) -> None:
    """Array for array: embeddings, done flags, fitted reference, cell table."""
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for key in ("embeddings/pca/pc9/X", "embeddings/pca/pc9/done", "references/pca/components",
                "references/pca/mean", "references/pca/genes"):
        assert np.array_equal(ga[key][:], gb[key][:]), key
    Xa, ca = EmbeddingStore(a).load("pca")
    Xb, cb = EmbeddingStore(b).load("pca")
    assert Xa.tobytes() == Xb.tobytes()
    assert ca.equals(cb)
    assert gb["embeddings/pca/pc9"].attrs["complete"] is True


def _done(store: Path) -> np.ndarray | None:
    try:
        return zarr.open_group(str(store), mode="r")["embeddings/pca/pc9/done"][:]
    except (OSError, LookupError, ValueError):  # not created yet, or being written
        return None


def test_concurrent_cli_shards_equal_one_process(pc9_small, single, tmp_path):
    store = tmp_path / "sharded.zarr"
    procs = [subprocess.Popen([CLI, "extract", str(pc9_small), "--model", "pca", "--store", str(store), "--dataset",
                               "pc9", "--chunk-size", str(CHUNK), "--shard", f"{i}/3", "-q"], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(3)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    _assert_same_store(single, store)
    # each chunk was computed by its own shard exactly once: a re-run of any shard does nothing
    r = extract(pc9_small, model="pca", store=store, dataset="pc9", chunk_size=CHUNK, progress=False, shard="1/3")
    assert r.status == "up-to-date" and r.chunks_computed == 0


def test_killed_shard_resumes_and_finalize(pc9_small, single, tmp_path):
    store = tmp_path / "killed.zarr"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SHARD, str(pc9_small), str(store), str(CHUNK), "0/2"], env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline:
        d = _done(store)
        if d is not None and d.sum() >= 2:
            break
        assert proc.poll() is None, "the slow shard ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _done(store).copy()
    own = np.arange(10) % 2 == 0
    assert 2 <= before.sum() < own.sum() and not before[~own].any(), "shard 0 wrote only (some of) its own chunks"

    r1 = extract(pc9_small, model="pca", store=store, dataset="pc9", chunk_size=CHUNK, progress=False, shard=(1, 2))
    assert r1.status == "resumed" and r1.chunks_computed == 5 and not r1.complete
    with pytest.raises(StoreError, match="incomplete"):
        EmbeddingStore(store).load("pca")

    snap = store_snapshot(store)
    res = runner.invoke(app, ["finalize", "--store", str(store), "--dataset", "pc9", "--model", "pca"])
    out = assert_refused(res, "missing")
    missing = np.flatnonzero(~_done(store))
    assert all(str(c) in out for c in missing)
    assert store_snapshot(store) == snap, "a refused finalize changed the store"

    r0 = extract(pc9_small, model="pca", store=store, dataset="pc9", chunk_size=CHUNK, progress=False, shard=(0, 2))
    assert r0.status == "resumed" and r0.complete
    assert r0.chunks_computed == int((own & ~before).sum()), "finished chunks were recomputed"
    _assert_same_store(single, store)
    assert finalize(store, model="pca", dataset="pc9").status == "already-complete"
    res = runner.invoke(app, ["finalize", "--store", str(store), "--dataset", "pc9", "--model", "pca"])
    assert res.exit_code == 0 and "complete" in res.output


def test_finalize_marks_complete_when_all_chunks_done(pc9_small, single, tmp_path):
    store = tmp_path / "fin.zarr"
    extract(pc9_small, model="pca", store=store, dataset="pc9", chunk_size=CHUNK, progress=False, shard="0/2")
    extract(pc9_small, model="pca", store=store, dataset="pc9", chunk_size=CHUNK, progress=False, shard="1/2")
    g = zarr.open_group(str(store), mode="a")["embeddings/pca/pc9"]
    assert g.attrs["complete"] is True  # the last shard marked it
    g.attrs["complete"] = False  # as if the last shard died between its last chunk and the mark
    res = runner.invoke(app, ["finalize", "--store", str(store), "--dataset", "pc9", "--model", "pca"])
    assert res.exit_code == 0, res.output
    _assert_same_store(single, store)


@pytest.mark.parametrize("spec", ["3/2", "-1/2", "0/0", "x", "1/2/3"])
def test_bad_shard_is_refused_before_any_write(pc9_small, tmp_path, spec):
    store = tmp_path / "s.zarr"
    res = runner.invoke(app, ["extract", str(pc9_small), "--model", "pca", "--store", str(store), f"--shard={spec}"])
    assert_refused(res, "shard")
    assert not store.exists()


def test_shard_options_refused(pc9_small, single, tmp_path):
    store = tmp_path / "s.zarr"
    assert_refused(runner.invoke(app, ["extract", str(pc9_small), "--model", "pca", "--store", str(store),
                                       "--shards", "2"]), "--dask-workers")
    assert_refused(runner.invoke(app, ["extract", str(pc9_small), "--model", "pca", "--store", str(store),
                                       "--dask-workers", "2", "--shard", "0/2"]), "--shard")
    assert_refused(runner.invoke(app, ["extract", str(pc9_small), "--model", "pca", "--store", str(store),
                                       "--dask-workers", "0"]), "--dask-workers")
    assert_refused(runner.invoke(app, ["extract", str(pc9_small), "--model", "pca", "--store", str(store),
                                       "--scheduler", "nonsense"]), "scheduler")
    assert not store.exists()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:  # an object-store URL is read-only to scdm: refused, and no local "s3:" folder appears
        assert_refused(runner.invoke(app, ["extract", str(pc9_small), "--model", "pca", "--store", "s3://b/s.zarr"]),
                       "URL")
        assert_refused(runner.invoke(app, ["extract", str(pc9_small), "--model", "pca", "--store", "s3://b/s.zarr",
                                           "--dask-workers", "2"]), "URL")
        assert sorted(p.name for p in tmp_path.iterdir()) == []
    finally:
        os.chdir(cwd)
    assert_refused(runner.invoke(app, ["finalize", "--store", str(single), "--dataset", "pc9", "--model", "hvg"]),
                   "hvg")
    assert_refused(runner.invoke(app, ["finalize", "--store", str(tmp_path / "none.zarr"), "--dataset", "pc9",
                                       "--model", "pca"]), "store")


def test_shard_chunks_are_a_disjoint_cover():
    todo = list(range(11))
    parts = [Shard(i, 4).chunks(todo) for i in range(4)]
    assert sorted(sum(parts, [])) == todo
    assert all(set(a).isdisjoint(b) for k, a in enumerate(parts) for b in parts[k + 1:])


def test_extract_on_local_dask_cluster_equals_one_process(pc9_small, single, tmp_path):
    store = tmp_path / "dask.zarr"
    res = runner.invoke(app, ["extract", str(pc9_small), "--model", "pca", "--store", str(store), "--dataset", "pc9",
                              "--chunk-size", str(CHUNK), "--dask-workers", "2", "--shards", "3", "-q"])
    assert res.exit_code == 0, res.output
    assert "3 shards" in res.output and "complete" in res.output
    _assert_same_store(single, store)
