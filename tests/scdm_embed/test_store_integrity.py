"""Store and engine integrity: every store error a user can reach is a clear exit 2 with the store
untouched, and nothing is silently wrong (corrupt chunks, stale labels, racing extractions)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import zarr
from typer.testing import CliRunner
from zarr.codecs import BloscCodec

from scdm_embed import EmbeddingStore, StoreError
from scdm_embed.cli import app
from tests.conftest import ROOT, store_snapshot

runner = CliRunner()


def _extract(inp: Path, store: Path, *args: str):
    return runner.invoke(app, ["extract", str(inp), "--model", "pca", "--store", str(store), "-q", *args])


def _refused(r, *words: str) -> None:
    """Exit 2, ``error:`` + ``fix:`` lines naming ``words``, no traceback."""
    assert r.exit_code == 2, r.output
    assert "error:" in r.output and "fix:" in r.output, r.output
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit), r.output
    for w in words:
        assert w in r.output, (w, r.output)


@pytest.fixture(scope="module")
def tiny(pc9_small, tmp_path_factory) -> Path:
    """32 real PC9 cells (16 sensitive, 16 resistant) with raw counts."""
    a = ad.read_h5ad(pc9_small)
    r = a.obs["response"].to_numpy()
    idx = np.concatenate([np.flatnonzero(r == "sensitive")[:16], np.flatnonzero(r == "resistant")[:16]])
    path = tmp_path_factory.mktemp("tiny") / "tiny.h5ad"
    a[np.sort(idx)].copy().write_h5ad(path)
    return path


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size)`` -> a fresh tmpfs of that size (root only: skipped where mount is not permitted)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no `mount` command to make a small file system")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


# -- 1. a store path that is a file ---------------------------------------------------------------
def test_store_path_that_is_a_file_or_under_one_is_refused(tiny, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    _refused(_extract(tiny, f), "is a file", str(f))
    _refused(_extract(tiny, f / "s.zarr"), "lies under the file", str(f))
    assert f.read_text() == "mine"
    with pytest.raises(StoreError, match="is a file"):
        EmbeddingStore(f)
    with pytest.raises(StoreError, match="lies under the file"):
        EmbeddingStore(f / "deeper" / "s.zarr", mode="a")


# -- 2. a read-only store -------------------------------------------------------------------------
def test_read_only_store_is_refused_untouched(tiny, tmp_path, tmpfs):
    # chmod does not stop root: a read-only file system does
    store = tmpfs("8m") / "s.zarr" if os.geteuid() == 0 else tmp_path / "s.zarr"
    assert _extract(tiny, store, "--dataset", "a").exit_code == 0
    before = store_snapshot(store)
    if os.geteuid() == 0:
        r = subprocess.run(["mount", "-o", "remount,ro", str(store.parent)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount the tmpfs read-only: {r.stderr.strip()}")
    else:
        for p in [store, *store.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
    try:
        assert not os.access(store, os.W_OK)
        _refused(_extract(tiny, store, "--dataset", "b"), "not writable", str(store))
        assert store_snapshot(store) == before
        # what needs no write still works on a read-only store
        r = _extract(tiny, store, "--dataset", "a")
        assert r.exit_code == 0 and "already complete" in r.output, r.output
        X, cells = EmbeddingStore(store).load("pca")
        assert X.shape == (32, 31) and len(cells) == 32
        assert store_snapshot(store) == before
    finally:
        if os.geteuid() != 0:
            for p in [store, *store.rglob("*")]:
                p.chmod(p.stat().st_mode | 0o200)


# -- 3. a full disk -------------------------------------------------------------------------------
def test_full_disk_is_a_store_error_and_a_new_store_is_rolled_back(pc9_small, tmpfs):
    # 400 KiB holds the hvg reference and cell table but not the 10 chunks (~70 KiB each)
    store = tmpfs("400k") / "s.zarr"
    r = runner.invoke(app, ["extract", str(pc9_small), "--model", "hvg", "--store", str(store), "--chunk-size", "24", "-q"])
    _refused(r, "no space left", str(store))
    assert not store.exists(), "what the failed run created is rolled back"
    assert list(store.parent.iterdir()) == []


def test_full_disk_while_resuming_keeps_the_earlier_chunks(pc9_small, tmpfs):
    fs = tmpfs("4m")
    store = fs / "s.zarr"
    args = ["extract", str(pc9_small), "--model", "hvg", "--store", str(store), "--chunk-size", "24", "--dataset", "pc9", "-q"]
    assert runner.invoke(app, args).exit_code == 0
    full, _ = EmbeddingStore(store).load("hvg")
    # leave the store as an interrupted run does: chunks 0-4 done, 5-9 never written
    g = zarr.open_group(str(store / "embeddings" / "hvg" / "pc9"), mode="r+")
    g["done"][5:] = False
    g.attrs["complete"] = False
    for c in range(5, 10):
        (store / "embeddings" / "hvg" / "pc9" / "X" / "c" / str(c) / "0").unlink()
    kept = {k: v for k, v in store_snapshot(store).items() if "/X/c/" in k}
    filler = fs / "filler"
    with open(filler, "wb") as fh:  # fill the disk to the last byte
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    r = runner.invoke(app, args)
    _refused(r, "no space left", str(store))
    st = EmbeddingStore(store)
    assert st.done_flags("hvg", "pc9").tolist() == [True] * 5 + [False] * 5
    assert {k: v for k, v in store_snapshot(store).items() if "/X/c/" in k} == kept, "earlier chunks are kept"
    filler.unlink()
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "resumed" in r.output and "5 chunks" in r.output, r.output
    X, _ = EmbeddingStore(store).load("hvg")
    # same code, same process and CPU: the recomputed chunks equal the first run's to float32 rounding
    np.testing.assert_allclose(X, full, rtol=1e-6, atol=1e-6)


# -- 4./5. corrupted chunks and checksums ---------------------------------------------------------
@pytest.fixture
def pca_store(tiny, tmp_path) -> Path:
    store = tmp_path / "s.zarr"
    r = _extract(tiny, store, "--chunk-size", "8")
    assert r.exit_code == 0, r.output
    return store


def _chunk(store: Path, c: int) -> Path:
    return store / "embeddings" / "pca" / "tiny" / "X" / "c" / str(c) / "0"


def test_arrays_are_written_with_crc32c(pca_store):
    for arr in ("X", "done"):
        meta = json.loads((pca_store / "embeddings" / "pca" / "tiny" / arr / "zarr.json").read_text())
        names = [c["name"] for c in meta["codecs"]]
        assert names[-1] == "crc32c", names


def test_undecodable_chunk_is_a_store_error_in_load_and_eval(pca_store, tiny, tmp_path):
    from scdm_eval.cli import app as eval_app

    good, _ = EmbeddingStore(pca_store).load("pca")
    p = _chunk(pca_store, 1)
    p.write_bytes(b"\x07" * len(p.read_bytes()))
    with pytest.raises(StoreError, match=r"pca/tiny.*damaged") as e:
        EmbeddingStore(pca_store).load("pca")
    assert "--overwrite" in e.value.fix
    # other chunks stay readable
    X, _ = EmbeddingStore(pca_store).load("pca", cells=list(EmbeddingStore(pca_store).cells().index[:8]))
    np.testing.assert_array_equal(X, good[:8])  # same bytes read back: bit-exact
    r = runner.invoke(eval_app, ["run", "--store", str(pca_store), "--out", str(tmp_path / "res"), "-c", "logreg",
                                 "--folds", "2", "-q"])
    _refused(r, "pca/tiny", "damaged", "--overwrite")
    # the fix it names works
    r = _extract(tiny, pca_store, "--chunk-size", "8", "--overwrite")
    assert r.exit_code == 0 and "written" in r.output, r.output
    X, _ = EmbeddingStore(pca_store).load("pca")
    np.testing.assert_allclose(X, good, rtol=1e-6, atol=1e-6)  # recomputed in-process: float32 rounding at most


def test_checksum_catches_a_chunk_that_still_decompresses(pca_store, tmp_path):
    p = _chunk(pca_store, 2)
    old = p.read_bytes()
    # validly compressed other data (same codecs), with the old chunk's checksum kept
    other = zarr.create_array(str(tmp_path / "other.zarr"), shape=(8, 31), chunks=(8, 31), dtype="float32",
                            compressors=(BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),))
    other[:] = 1.5
    payload = (tmp_path / "other.zarr" / "c" / "0" / "0").read_bytes()
    p.write_bytes(payload + old[-4:])
    # without a checksum this chunk would silently decode to other numbers
    plain = zarr.create_array(str(tmp_path / "plain.zarr"), shape=(8, 31), chunks=(8, 31), dtype="float32",
                            compressors=(BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),))
    (tmp_path / "plain.zarr" / "c" / "0").mkdir(parents=True)
    (tmp_path / "plain.zarr" / "c" / "0" / "0").write_bytes(payload)
    assert np.all(plain[:] == 1.5)
    with pytest.raises(StoreError, match=r"pca/tiny") as e:
        EmbeddingStore(pca_store).load("pca")
    assert "checksum" in e.value.problem and "--overwrite" in e.value.fix


def test_store_written_without_checksums_still_opens(pca_store):
    """A store from before the crc32c codec: X and done rewritten with the old codecs still load."""
    good, cells = EmbeddingStore(pca_store).load("pca")
    g = zarr.open_group(str(pca_store / "embeddings" / "pca" / "tiny"), mode="r+")
    done = g["done"][:]
    attrs = {k: dict(g[k].attrs) for k in ("X", "done")}
    del g["X"], g["done"]
    x = g.create_array("X", shape=good.shape, chunks=(8, good.shape[1]), dtype="float32", fill_value=np.nan,
                       compressors=BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"))
    x[:] = good
    d = g.create_array("done", shape=done.shape, chunks=(1,), dtype="bool", fill_value=False)
    d[:] = done
    x.attrs.update(attrs["X"])
    d.attrs.update(attrs["done"])
    assert "crc32c" not in (pca_store / "embeddings" / "pca" / "tiny" / "X" / "zarr.json").read_text()
    X, cells2 = EmbeddingStore(pca_store).load("pca")
    np.testing.assert_array_equal(X, good)  # the same float32 values written back: bit-exact
    assert cells2.equals(cells)


# -- 6. bad dataset names -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["..", "a/b", ".x", "", "__x", " pad"])
def test_bad_dataset_name_refused_before_anything_is_created(name, tiny, pca_store, tmp_path):
    fresh = tmp_path / "fresh.zarr"
    _refused(_extract(tiny, fresh, "--dataset", name), "dataset name")
    assert not fresh.exists()
    before = store_snapshot(pca_store)
    _refused(_extract(tiny, pca_store, "--dataset", name), "dataset name")
    assert store_snapshot(pca_store) == before


def test_bad_name_from_the_file_stem_is_refused_too(tiny, tmp_path):
    hidden = tmp_path / ".hidden.h5ad"
    shutil.copy(tiny, hidden)
    fresh = tmp_path / "fresh.zarr"
    _refused(_extract(hidden, fresh), "'.hidden'", "dataset name")
    assert not fresh.exists()


def test_refusal_under_the_store_lock_leaves_nothing(tiny, pca_store, tmp_path):
    """The gene-overlap check runs with the lock held (the lock file and its folders exist by then)."""
    fresh = tmp_path / "a" / "b" / "s.zarr"
    _refused(_extract(tiny, fresh, "--min-overlap", "1.01"), "barely share genes")
    assert not (tmp_path / "a").exists()
    (pca_store / ".scdm.lock").unlink()  # as in a store written before the lock existed
    before = store_snapshot(pca_store)
    _refused(_extract(tiny, pca_store, "--dataset", "other", "--min-overlap", "1.01"), "barely share genes")
    assert store_snapshot(pca_store) == before and not (pca_store / ".scdm.lock").exists()


# -- 7. a folder that is not a store --------------------------------------------------------------
def test_non_empty_folder_that_is_not_a_store_is_refused(tiny, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "keep.csv").write_text("a,b\n")
    _refused(_extract(tiny, folder), "not an scdm store", "keep.csv", "empty folder")
    assert sorted(p.name for p in folder.iterdir()) == ["keep.csv"]
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _extract(tiny, empty)
    assert r.exit_code == 0, r.output
    assert EmbeddingStore(empty).datasets() == ["tiny"]


# -- 8. changed labels are not silently ignored ---------------------------------------------------
def test_changed_labels_rewrite_the_cell_table_not_the_embeddings(tiny, tmp_path):
    store = tmp_path / "s.zarr"
    assert _extract(tiny, store).exit_code == 0
    a = ad.read_h5ad(tiny)
    a.obs["response"] = a.obs["response"].map({"sensitive": "resistant", "resistant": "sensitive"}).astype(str)
    flipped = tmp_path / "tiny.h5ad"  # same name: the same dataset
    a.write_h5ad(flipped)
    old_labels = EmbeddingStore(store).cells()["label"].to_numpy()
    emb = {k: v for k, v in store_snapshot(store).items() if k.startswith("embeddings")}
    r = _extract(flipped, store)
    assert r.exit_code == 0 and "metadata-updated" in r.output, r.output
    X, cells = EmbeddingStore(store).load("pca")
    np.testing.assert_array_equal(cells["label"].to_numpy(), 1 - old_labels)
    assert {k: v for k, v in store_snapshot(store).items() if k.startswith("embeddings")} == emb
    r = _extract(flipped, store)
    assert r.exit_code == 0 and "already complete" in r.output, r.output


# -- 9. concurrent extractions into a new store ----------------------------------------------------
def test_concurrent_extractions_into_a_new_store_share_one_reference(pc9_small, tmp_path):
    a = ad.read_h5ad(pc9_small)
    parts = {}
    for k, name in enumerate(("even", "odd")):  # two different datasets, both classes in each
        parts[name] = tmp_path / f"{name}.h5ad"
        a[k::2].copy().write_h5ad(parts[name])
    store = tmp_path / "new" / "s.zarr"
    exe = Path(sys.executable).with_name("scdm-embed")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from scdm_embed.cli import main; main()"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([*cmd, "extract", str(p), "--model", "pca", "--store", str(store), "-q"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in parts.values()]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    st = EmbeddingStore(store)
    _, ref = st.get_reference("pca")
    hashes = {e.dataset: e.attrs["checkpoint_hash"] for e in st.entries()}
    assert set(hashes) == {"even", "odd"}
    assert set(hashes.values()) == {ref["fit_hash"]}, "both arrays are projected with the stored reference"
    # projecting each dataset with the winner's reference in a fresh store gives the same embeddings
    check = tmp_path / "check.zarr"
    for name, p in parts.items():
        r = _extract(p, check, "--reference", ref["fitted_on"])
        assert r.exit_code == 0, r.output
        X, _ = st.load("pca", datasets=[name])
        Y, _ = EmbeddingStore(check).load("pca", datasets=[name])
        # the same fit and projection in another process: equal up to float32 rounding
        np.testing.assert_allclose(X, Y, rtol=1e-4, atol=1e-4)
