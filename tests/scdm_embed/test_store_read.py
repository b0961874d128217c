"""EmbeddingStore.load returns exactly the stored rows, whatever the selection or the array's codec."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from scdm_embed.errors import ScdmError, StoreError
from scdm_embed.store import EmbeddingStore, _chunks

N, DIM, CHUNK = 37, 6, 8  # a partial last chunk on purpose


@pytest.fixture
def store(tmp_path):
    """Two datasets of N cells, chunks of CHUNK rows; returns (path, {dataset: matrix})."""
    rng = np.random.default_rng(0)
    st = EmbeddingStore(tmp_path / "s.zarr", mode="a")
    mats = {}
    for ds in ("a", "b"):
        cells = pd.DataFrame({"label": rng.integers(0, 2, N).astype("int8")},
                             index=pd.Index([f"c{i}" for i in range(N)], name="cell_id"))
        st.put_dataset(ds, cells, input_hash=f"h-{ds}")
        mats[ds] = rng.standard_normal((N, DIM)).astype(np.float32)
        st.put_embedding("m", ds, mats[ds], chunk_rows=CHUNK)
    return tmp_path / "s.zarr", mats


def _expected(mats, keys):
    return np.stack([mats[k.split("/")[0]][int(k.split("/c")[1])] for k in keys])


def test_new_arrays_carry_a_checksum_per_chunk(store):
    path, _ = store
    meta = json.loads((path / "embeddings" / "m" / "a" / "X" / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]] == ["bytes", "crc32c"]


# small reads decode in the calling thread; from THREADED_READ_BYTES on, on reader threads
@pytest.mark.parametrize("threaded", [False, True], ids=["calling-thread", "reader-threads"])
@pytest.mark.parametrize("pick", ["all", "contiguous", "every_other", "sparse", "reversed", "interleaved", "duplicates"])
def test_load_returns_exactly_the_selected_rows(store, pick, threaded, monkeypatch):
    if threaded:
        monkeypatch.setattr(_chunks, "THREADED_READ_BYTES", 0)
    path, mats = store
    keys_a = [f"a/c{i}" for i in range(N)]
    keys_b = [f"b/c{i}" for i in range(N)]
    keys = {"all": keys_a + keys_b,
            "contiguous": keys_a[9:30] + keys_b[:5],
            "every_other": keys_a[::2] + keys_b[1::2],
            "sparse": [keys_a[3], keys_a[35], keys_b[17]],  # chunks in between are skipped
            "reversed": keys_b[::-1] + keys_a[::-3],
            "interleaved": [k for pair in zip(keys_a, keys_b, strict=True) for k in pair],
            "duplicates": keys_a[5:9] + keys_a[5:9] + keys_b[:2]}[pick]
    st = EmbeddingStore(path)
    X, table = st.load("m", datasets=["a", "b"], cells=keys)
    assert list(table.index) == keys
    np.testing.assert_array_equal(X, _expected(mats, keys))  # copies of stored float32: bit-exact


def test_whole_model_load(store):
    path, mats = store
    X, table = EmbeddingStore(path).load("m")
    np.testing.assert_array_equal(X, np.concatenate([mats["a"], mats["b"]]))
    assert len(table) == 2 * N


def _rewrite_x(path, ds, X, **kw):
    """Rewrite one array's X with other codecs or dtype (as an older or other writer would), keeping its attributes."""
    g = zarr.open_group(str(path / "embeddings" / "m" / ds), mode="r+")
    attrs = dict(g["X"].attrs)
    del g["X"]
    x = g.create_array("X", shape=X.shape, chunks=(CHUNK, X.shape[1]), dtype=X.dtype, fill_value=np.nan, **kw)
    x[:] = X
    x.attrs.update(attrs)


def test_arrays_written_with_the_earlier_lz4_codec_still_read(store):
    path, mats = store
    _rewrite_x(path, "a", mats["a"], compressors=(BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()))
    assert "blosc" in (path / "embeddings" / "m" / "a" / "X" / "zarr.json").read_text()
    st = EmbeddingStore(path)
    keys = [f"a/c{i}" for i in range(0, N, 3)] + [f"b/c{i}" for i in range(4, 20)]
    X, _ = st.load("m", cells=keys)
    np.testing.assert_array_equal(X, _expected(mats, keys))


def test_float16_arrays_load_as_float32(store):
    path, mats = store
    half = mats["a"].astype(np.float16)
    _rewrite_x(path, "a", half, compressors=(Crc32cCodec(),))
    X, _ = EmbeddingStore(path).load("m", datasets=["a"], cells=[f"a/c{i}" for i in range(10, 20)])
    assert X.dtype == np.float32
    np.testing.assert_array_equal(X, half[10:20].astype(np.float32))  # float16 -> float32 is exact


def test_incomplete_array_reads_nan_for_missing_chunks(tmp_path):
    st = EmbeddingStore(tmp_path / "s.zarr", mode="a")
    cells = pd.DataFrame({"label": np.zeros(N, "int8")}, index=pd.Index([f"c{i}" for i in range(N)], name="cell_id"))
    st.put_dataset("a", cells, input_hash="h")
    st.create_embedding("m", "a", n_cells=N, dim=DIM, chunk_rows=CHUNK, input_hash="h")
    first = np.ones((CHUNK, DIM), np.float32)
    st.write_chunk("m", "a", 0, first)
    with pytest.raises(StoreError, match="incomplete"):
        st.load("m")
    X, _ = st.load("m", allow_incomplete=True)
    np.testing.assert_array_equal(X[:CHUNK], first)
    assert np.isnan(X[CHUNK:]).all()


def test_a_damaged_chunk_is_refused_on_a_scattered_read(store):
    path, _ = store
    chunk = path / "embeddings" / "m" / "b" / "X" / "c" / "2" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[10] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    st = EmbeddingStore(path)
    st.load("m", cells=[f"b/c{i}" for i in (0, 1, 30)])  # chunks 0 and 3: the damaged one is not read
    with pytest.raises(StoreError, match=r"m/b.*damaged"):
        st.load("m", cells=[f"b/c{i}" for i in (0, 17, 30)])


@pytest.mark.parametrize("codecs", [
    (Crc32cCodec(),),
    (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),),
    (BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"), Crc32cCodec()),
    (zarr.codecs.ZstdCodec(level=3), Crc32cCodec()),  # not the store's layout: read through Zarr
], ids=["crc-only", "blosc-only", "blosc-zstd+crc", "zstd+crc"])
def test_every_codec_reads_what_zarr_reads(store, codecs):
    """The direct chunk reader and Zarr's pipeline agree on every layout, edge chunk included."""
    path, mats = store
    _rewrite_x(path, "a", mats["a"], compressors=codecs)
    keys = [f"a/c{i}" for i in (36, 0, 8, 9, 15, 16, 23, 35, 35)]
    X, _ = EmbeddingStore(path).load("m", datasets=["a"], cells=keys)
    z = zarr.open_array(path / "embeddings" / "m" / "a" / "X", mode="r")[:]
    np.testing.assert_array_equal(X, z[[int(k.split("/c")[1]) for k in keys]])


@pytest.mark.parametrize("damage", ["truncated", "empty", "crc"])
def test_a_truncated_or_altered_chunk_is_refused(store, damage):
    path, _ = store
    chunk = path / "embeddings" / "m" / "a" / "X" / "c" / "1" / "0"
    raw = chunk.read_bytes()
    chunk.write_bytes({"truncated": raw[: len(raw) // 2], "empty": b"", "crc": raw[:-1] + bytes([raw[-1] ^ 1])}[damage])
    with pytest.raises(StoreError, match="damaged"):
        EmbeddingStore(path).load("m", datasets=["a"])


def test_datasets_of_one_model_with_different_widths_are_refused(store):
    """Arrays of one model must share a width to be read together (e.g. two PCA references)."""
    path, mats = store
    _rewrite_x(path, "b", np.hstack([mats["b"], mats["b"]]), compressors=(Crc32cCodec(),))
    st = EmbeddingStore(path)
    assert st.load("m", datasets=["b"])[0].shape == (N, 2 * DIM)
    with pytest.raises(StoreError, match="12-d|6-d") as e:
        st.load("m")
    assert "damaged" not in str(e.value)


def test_a_cell_table_with_missing_text_is_refused(tmp_path):
    """A None / NaN sample would be written as the text "None" / "nan" and read back as one more sample."""
    st = EmbeddingStore(tmp_path / "s.zarr", mode="a")
    cells = pd.DataFrame({"label": np.array([1, 0, 1], np.int8), "sample": ["a", None, "b"]},
                         index=pd.Index(["c1", "c2", "c3"], name="cell_id"))
    with pytest.raises(ScdmError, match="sample"):
        st.put_dataset("d", cells, input_hash="h")
    assert st.datasets() == []
    cells["sample"] = ["a", "unknown", "b"]
    st.put_dataset("d", cells, input_hash="h")
    assert st.cells()["sample"].tolist() == ["a", "unknown", "b"]


@pytest.mark.parametrize("cells", ["all", "picked"])
def test_rows_read_any_positions_as_load_would(store, cells):
    """``rows`` checks like ``load`` but reads nothing until asked; any positions, any order, give load's rows."""
    path, mats = store
    st = EmbeddingStore(path)
    keys = ([f"a/c{i}" for i in range(N)] + [f"b/c{i}" for i in range(N)] if cells == "all"
            else [f"b/c{i}" for i in range(N - 1, 0, -4)] + [f"a/c{i}" for i in range(3, N, 5)])
    rows = st.rows("m", cells=None if cells == "all" else keys)
    assert rows.shape == (len(keys), DIM) and len(rows) == len(keys)
    np.testing.assert_array_equal(rows.read(), _expected(mats, keys))
    at = np.random.default_rng(1).permutation(len(keys))[: len(keys) // 2]
    np.testing.assert_array_equal(rows.read(at), _expected(mats, [keys[i] for i in at]))
    out = np.empty((len(at), DIM), np.float32)
    assert rows.read(at, out=out) is out
    with pytest.raises(ValueError, match="out must be float32"):
        rows.read(at, out=np.empty((len(at), DIM)))


def test_rows_of_cells_the_store_lacks_are_refused(store):
    path, _ = store
    with pytest.raises(StoreError, match=r"1 of the cells asked for are not in datasets \['a'\] \(e\.g\. 'b/c0'\)"):
        EmbeddingStore(path).rows("m", datasets=["a"], cells=["a/c1", "b/c0"])
