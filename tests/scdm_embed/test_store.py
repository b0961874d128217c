"""The Zarr store: format attributes, partial reads, staleness, overwrite, float16."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

from scdm_embed import EmbeddingStore, StaleCacheError, StoreError, extract, store_table
from scdm_embed.store import FORMAT_VERSION, VERSIONS


@pytest.fixture(scope="module")
def store(tmp_path_factory, pc9_small):
    path = tmp_path_factory.mktemp("store") / "s.zarr"
    extract(pc9_small, model="pca", store=path, dataset="pc9", chunk_size=100, progress=False)
    extract(pc9_small, model="hvg", store=path, dataset="pc9", chunk_size=100, progress=False, store_dtype="float16")
    return path


def test_every_group_is_versioned(store):
    groups = [p for p in store.rglob("zarr.json") if json.loads(p.read_text())["node_type"] == "group"]
    assert len(groups) >= 8
    for p in groups:
        attrs = json.loads(p.read_text())["attributes"]
        assert "encoding-type" in attrs and "encoding-version" in attrs, p
    root = json.loads((store / "zarr.json").read_text())
    assert root["zarr_format"] == 3 and root["attributes"]["encoding-type"] == "scdm-store"


def test_each_element_kind_carries_its_own_version(store):
    """Every scdm group and array is stamped with the schema's current version of its kind."""
    seen = set()
    for p in store.rglob("zarr.json"):
        attrs = json.loads(p.read_text())["attributes"]
        kind = attrs.get("encoding-type")
        if kind in VERSIONS:  # anndata's own elements (dataframes, their columns) carry anndata's versions
            assert attrs["encoding-version"] == VERSIONS[kind], (p, kind)
            seen.add(kind)
    assert seen == set(VERSIONS) - {"scdm-split"}  # no split made here
    assert VERSIONS["scdm-store"] == FORMAT_VERSION


def test_provenance_reads_as_typed_records(store):
    st = EmbeddingStore(store)
    rec = st.embedding_record("pca", "pc9")
    assert (rec.model, rec.dim, rec.chunk_rows, rec.complete, rec.trust_checkpoint) == ("pca", 50, 100, True, False)
    assert rec.telemetry.cells_per_s > 0 and rec.telemetry.batch_size > 0
    assert rec.missing == ("cell_context",) and rec.extra == {}  # pca's cells do not attend to each other
    assert rec.provenance.input_hash == st.dataset_record("pc9").input_hash
    assert st.dataset_record("pc9").missing == () and st.dataset_record("pc9").cells_hash.startswith("sha256:")
    assert st.embedding_record("pca", "nope") is None


def test_provenance_recorded(store):
    g = EmbeddingStore(store).embedding_group("pca", "pc9")
    a = dict(g.attrs)
    for key in ("model", "model_version", "checkpoint_hash", "settings", "input_hash", "scdm_version", "created",
                "device", "telemetry", "gene_overlap", "complete", "dim"):
        assert key in a, key
    assert a["complete"] is True and a["dim"] == 50
    assert a["telemetry"]["cells_per_s"] > 0 and a["telemetry"]["peak_rss_mb"] > 0
    assert a["gene_overlap"]["n_vocab"] == 2000 and a["gene_overlap"]["n_data"] == 25077
    assert g["X"].chunks == (100, 50)
    assert a["settings"]["reference"]["n_top_genes"] == 2000


def test_cells_and_labels(store, pc9_small):
    cells = EmbeddingStore(store).cells()
    src = ad.read_h5ad(pc9_small, backed="r")
    assert len(cells) == 240 and cells["label"].sum() == 120
    assert list(cells.index[:2]) == [f"pc9/{c}" for c in src.obs_names[:2]]
    assert (cells["response"] == src.obs["response"].to_numpy()).all()
    assert set(cells.columns) >= {"dataset", "row", "label", "study", "drug", "tissue"}


def test_cell_table_strings_are_shared(tmp_path):
    """A cell table read back keeps its values and holds each repeated string once."""
    import pandas as pd

    st = EmbeddingStore(tmp_path / "s.zarr", mode="a")
    cells = pd.DataFrame({"label": np.array([1, 0, 1, 0], np.int8),
                          "response": ["sensitive", "resistant", "sensitive", "resistant"],
                          "sample": ["s1", "s1", "s3", "s2"]},
                         index=pd.Index([f"c{i}" for i in range(4)], name="cell_id"))
    st.put_dataset("d", cells, input_hash="h")
    got = EmbeddingStore(tmp_path / "s.zarr").cells()
    assert list(got["response"]) == list(cells["response"]) and list(got["sample"]) == list(cells["sample"])
    assert got["response"].iloc[0] is got["response"].iloc[2]
    assert got["sample"].iloc[0] is got["sample"].iloc[1]


def test_shared_strings_keeps_missing_values():
    from scdm_embed.store import shared_strings

    vals = np.array(["s-1", None, "s-2", np.nan, "".join(["s-", "1"])], dtype=object)
    assert vals[0] is not vals[4]  # two equal strings, two objects
    out = shared_strings(vals)
    assert out.dtype == object and out[1] is None and isinstance(out[3], float) and np.isnan(out[3])
    assert list(out[[0, 2, 4]]) == ["s-1", "s-2", "s-1"] and out[0] is out[4]


def test_partial_read_matches_full(store):
    st = EmbeddingStore(store)
    X, cells = st.load("pca")
    pick = list(cells.index[[200, 3, 150]])
    Xs, cs = st.load("pca", cells=pick)
    assert list(cs.index) == pick
    np.testing.assert_array_equal(Xs, X[[200, 3, 150]])


def test_float16_store(store):
    st = EmbeddingStore(store)
    assert st.embedding_group("hvg", "pc9")["X"].dtype == np.float16
    X, _ = st.load("hvg")
    assert X.dtype == np.float32 and X.shape == (240, 2000) and np.isfinite(X).all()


def test_inspect_table(store):
    t = store_table(store)
    assert set(t["model"]) == {"pca", "hvg"} and (t["status"] == "complete").all()


def test_missing_store_and_model(tmp_path, store):
    with pytest.raises(StoreError, match="no scdm store"):
        EmbeddingStore(tmp_path / "none.zarr")
    with pytest.raises(StoreError, match="has no embeddings"):
        EmbeddingStore(store).load("scgpt")


def test_overwrite_replaces_and_marks_others_stale(tmp_path, pc9_small):
    path = tmp_path / "s.zarr"
    extract(pc9_small, model="pca", store=path, dataset="pc9", progress=False)
    extract(pc9_small, model="hvg", store=path, dataset="pc9", progress=False)
    a = ad.read_h5ad(pc9_small)[:200].copy()
    changed = tmp_path / "changed.h5ad"
    a.write_h5ad(changed)
    with pytest.raises(StaleCacheError):
        extract(changed, model="pca", store=path, dataset="pc9", progress=False)
    extract(changed, model="pca", store=path, dataset="pc9", progress=False, overwrite=True)
    st = EmbeddingStore(path)
    X, cells = st.load("pca")
    assert X.shape[0] == 200 == len(cells)
    stale = {e.model: e.stale for e in st.entries()}
    assert stale == {"pca": False, "hvg": True}
    with pytest.raises(StaleCacheError, match="another version of the input"):
        st.load("hvg")


def test_changed_settings_are_stale(tmp_path, pc9_small):
    path = tmp_path / "s.zarr"
    extract(pc9_small, model="pca", store=path, dataset="pc9", progress=False, chunk_size=64)
    with pytest.raises(StaleCacheError, match="chunk_rows"):
        extract(pc9_small, model="pca", store=path, dataset="pc9", progress=False, chunk_size=100)


def _two_halves(tmp_path, pc9_small, path):
    """pca of the all-sensitive half (dataset a), then of the all-resistant half (b), pooled in one
    store; returns the store's pca reference after each."""
    a = ad.read_h5ad(pc9_small)
    refs = []
    for name, part in (("a", a[:120]), ("b", a[120:])):
        part.copy().write_h5ad(tmp_path / f"{name}.h5ad")
        extract(tmp_path / f"{name}.h5ad", model="pca", store=path, dataset=name, progress=False,
                allow_single_class=True)
        refs.append(EmbeddingStore(path).get_reference("pca"))
    return refs


def test_reference_fitted_once_per_store(tmp_path, pc9_small):
    """The second dataset reuses the first one's genes and basis, so coordinates agree."""
    path = tmp_path / "s.zarr"
    ref1, ref2 = _two_halves(tmp_path, pc9_small, path)
    np.testing.assert_array_equal(ref1[0]["components"], ref2[0]["components"])
    assert ref2[1]["fitted_on"].endswith("a.h5ad")
    # the same cells through the store's basis give the same coordinates in either dataset
    extract(pc9_small, model="pca", store=path, dataset="both", progress=False)
    st = EmbeddingStore(path)
    Xb, _ = st.load("pca", datasets=["b"])
    Xboth, _ = st.load("pca", datasets=["both"])
    np.testing.assert_allclose(Xb, Xboth[120:], atol=1e-5)


def test_load_keeps_the_order_of_interleaved_cells(tmp_path, pc9_small):
    """Cells from several datasets in any order come back row-aligned with the table."""
    path = tmp_path / "s.zarr"
    _two_halves(tmp_path, pc9_small, path)
    st = EmbeddingStore(path)
    X, cells = st.load("pca")
    pick = [cells.index[130], cells.index[5], cells.index[200], cells.index[6]]
    Xs, cs = st.load("pca", cells=pick)
    assert list(cs.index) == pick
    np.testing.assert_array_equal(Xs, X[[130, 5, 200, 6]])


def test_named_reference_is_used_and_a_different_one_refused(tmp_path, pc9_small):
    a = ad.read_h5ad(pc9_small)
    a[:120].copy().write_h5ad(tmp_path / "a.h5ad")
    a[120:].copy().write_h5ad(tmp_path / "b.h5ad")
    path = tmp_path / "s.zarr"
    extract(tmp_path / "a.h5ad", model="pca", store=path, dataset="a", reference=pc9_small, progress=False,
            allow_single_class=True)
    _, attrs = EmbeddingStore(path).get_reference("pca")
    assert attrs["fitted_on"] == str(pc9_small) and attrs["n_cells_used"] == 240
    with pytest.raises(StaleCacheError, match="reference was fitted on"):
        extract(tmp_path / "b.h5ad", model="pca", store=path, dataset="b", reference=tmp_path / "b.h5ad", progress=False,
                allow_single_class=True)
    assert "b" not in EmbeddingStore(path).datasets()
