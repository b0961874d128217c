"""The store schema: per-element versions, typed records, the previous format and its migration.

``tests/data/store-0.1.0.zarr`` was written by the code before the schema module (format 0.1.0:
one version for every group, no ``cells_hash``/``trust_checkpoint``, no crc32c): pca (4
components on 200 genes) of 24 fixture cells in chunks of 8, and one split. Every test works on a
copy; the committed store is never modified.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from scdm_embed.cli import app
from scdm_embed.errors import StoreError
from scdm_embed.inputs import read_input
from scdm_embed.store import (
    FORMAT_VERSION,
    VERSIONS,
    DatasetRecord,
    EmbeddingRecord,
    EmbeddingStore,
    SplitRecord,
    Telemetry,
    cells_hash,
    migrate_store,
)
from scdm_eval import load_splits
from tests.conftest import store_snapshot
from tests.scdm_embed.models._shared import read_cells

OLD = Path(__file__).resolve().parents[1] / "data" / "store-0.1.0.zarr"
SPLIT = "pooled-all-k2-sample-s0-a6bc943dac7c"
PCA_OPTS = ["-o", "n_comps=4", "-o", "n_top_genes=200", "--chunk-size", "8"]
runner = CliRunner()


@pytest.fixture
def old_store(tmp_path) -> Path:
    """A private copy of the committed 0.1.0 store."""
    path = tmp_path / "old.zarr"
    shutil.copytree(OLD, path)
    return path


@pytest.fixture(scope="module")
def legacy_input(tmp_path_factory, fixtures_dir) -> Path:
    """The 24 cells the 0.1.0 store was extracted from (fixture rows 0-11 and 32-43, its cell table's metadata)."""
    a = read_cells(fixtures_dir / "scgpt" / "cells.h5ad", rows=np.r_[0:12, 32:44])
    group = zarr.open_group(str(OLD / "datasets" / "legacy"), mode="r")
    obs = ad.io.read_elem(group["cells"])[["response", "study", "sample", "tissue", "drug"]].copy()
    obs.index.name = None
    path = tmp_path_factory.mktemp("legacy") / "legacy.h5ad"
    ad.AnnData(X=a.X, obs=obs, var=a.var.copy()).write_h5ad(path)  # without n_counts, as then
    assert read_input(path).content_hash == group.attrs["input_hash"]  # exactly the cells the store holds
    return path


def _attrs(path: Path) -> dict:
    return json.loads((path / "zarr.json").read_text())["attributes"]


def _set_attrs(path: Path, **attrs) -> None:
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"].update(attrs)
    (path / "zarr.json").write_text(json.dumps(meta))


def _extract(path: Path, store: Path, *extra: str):
    return runner.invoke(app, ["extract", str(path), "--model", "pca", "--store", str(store), "-q", *PCA_OPTS, *extra])


def test_the_committed_store_is_the_previous_format():
    assert _attrs(OLD)["encoding-version"] == "0.1.0" != FORMAT_VERSION
    assert "cells_hash" not in _attrs(OLD / "datasets" / "legacy")
    assert "crc32c" not in (OLD / "embeddings" / "pca" / "legacy" / "X" / "zarr.json").read_text()


def test_previous_format_reads_as_it_is(old_store):
    before = store_snapshot(old_store)
    st = EmbeddingStore(old_store)
    X, cells = st.load("pca")
    assert X.shape == (24, 4) and X.dtype == np.float32 and np.isfinite(X).all()
    assert list(cells.index[:2]) == ["legacy/D11C_CGGACATTTTTC", "legacy/D11C_AATCAAACCAAN"]
    assert cells["label"].tolist() == [1] * 12 + [0] * 12
    assert {"study", "sample", "tissue", "drug"} <= set(cells.columns)

    ds = st.dataset_record("legacy")  # fields added since read as None, and say so
    assert ds.cells_hash is None and ds.missing == ("cells_hash",) and ds.n_cells == 24 and ds.n_genes == 25077
    emb = st.embedding_record("pca", "legacy")
    assert emb.trust_checkpoint is None and "trust_checkpoint" in emb.missing
    assert (emb.model, emb.dataset, emb.dim, emb.chunk_rows, emb.complete) == ("pca", "legacy", 4, 8, True)
    assert emb.options == {"n_comps": 4, "n_top_genes": 200} and emb.checkpoint is None
    assert isinstance(emb.telemetry, Telemetry) and emb.telemetry.cells_per_s > 0 and emb.telemetry.peak_gpu_mb is None
    assert emb.provenance.settings["reference"]["n_top_genes"] == 200
    assert [e.record.model for e in st.entries()] == ["pca"]

    splits = load_splits(old_store, SPLIT)
    assert splits is not None and len(splits) == 2 and len(splits.table) == 24
    assert splits.params["scheme"] == "pooled" and splits.params["group_key"] == "sample"
    assert splits.table.index.equals(cells.index)
    assert (splits.table["fold"] >= 0).all()

    inspect = runner.invoke(app, ["inspect", str(old_store)])
    assert inspect.exit_code == 0, inspect.output
    assert "0.1.0" in inspect.output and "scdm-embed migrate" in inspect.output
    assert store_snapshot(old_store) == before  # reading changed nothing


def test_previous_embeddings_are_what_this_version_computes(tmp_path, legacy_input):
    """Re-extracting the same cells today gives the 0.1.0 store's numbers."""
    r = _extract(legacy_input, tmp_path / "new.zarr", "--dataset", "legacy")
    assert r.exit_code == 0, r.output
    new, _ = EmbeddingStore(tmp_path / "new.zarr").load("pca")
    old, _ = EmbeddingStore(OLD).load("pca")
    # 0.1.0 fitted the PCA basis in float32 LAPACK, whose components differ by CPU (3.9e-4 on these
    # cells between the machine that wrote the store and an AMD EPYC one); the basis is
    # now fitted in float64, so the old numbers carry their own float32 error (6.8e-5 here)
    np.testing.assert_allclose(new, old, rtol=0, atol=2e-4)


def test_writing_into_the_previous_format_is_refused_naming_the_migration(old_store, legacy_input):
    before = store_snapshot(old_store)
    with pytest.raises(StoreError, match="format 0.1.0") as e:
        EmbeddingStore(old_store, mode="a")
    assert f"scdm-embed migrate {old_store}" in e.value.fix
    r = _extract(legacy_input, old_store, "--dataset", "again")
    out = r.output.replace("\n", " ")
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert "scdm-embed migrate" in out and "Traceback" not in out
    assert store_snapshot(old_store) == before


def test_migrate_upgrades_in_place_and_then_writes(old_store, legacy_input):
    before = store_snapshot(old_store)
    X_before, _ = EmbeddingStore(old_store).load("pca")

    dry = runner.invoke(app, ["migrate", str(old_store), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would upgrade datasets/legacy" in dry.output.replace("\n", " ")
    assert store_snapshot(old_store) == before

    r = runner.invoke(app, ["migrate", str(old_store)])
    assert r.exit_code == 0, r.output
    assert f"format 0.1.0 -> {FORMAT_VERSION}" in r.output
    after = store_snapshot(old_store)
    # attributes only: every chunk, cell table and split is byte-identical
    assert {k: v for k, v in after.items() if not k.endswith("zarr.json")} == \
           {k: v for k, v in before.items() if not k.endswith("zarr.json")} | {".scdm.lock": b""}

    root = _attrs(old_store)
    assert root["encoding-version"] == FORMAT_VERSION and root["migrations"][0]["from"] == "0.1.0"
    ds = _attrs(old_store / "datasets" / "legacy")
    assert ds["encoding-version"] == VERSIONS["scdm-dataset"]
    # the hash an extraction computes from the input's cell table
    assert ds["cells_hash"] == cells_hash(read_input(legacy_input).cells)
    # an array without a trust record or checksums cannot be 0.2.0: it keeps the version that says so
    assert _attrs(old_store / "embeddings" / "pca" / "legacy")["encoding-version"] == "0.1.0"
    assert "kept embeddings/pca/legacy: scdm-embedding 0.1.0" in r.output.replace("\n", " ")
    assert _attrs(old_store / "embeddings" / "pca" / "legacy" / "X")["encoding-version"] == VERSIONS["array"]

    st = EmbeddingStore(old_store, mode="a")  # now writable
    X, _ = st.load("pca")
    np.testing.assert_array_equal(X, X_before)  # the same bytes read back
    assert st.embedding_record("pca", "legacy").trust_checkpoint is None
    assert load_splits(old_store, SPLIT) is not None

    migrated = store_snapshot(old_store)
    same = _extract(legacy_input, old_store, "--dataset", "legacy")  # same cells, same cell table: nothing to do
    assert same.exit_code == 0 and "already complete" in same.output, same.output
    assert store_snapshot(old_store) == migrated
    again = _extract(legacy_input, old_store, "--dataset", "again")
    assert again.exit_code == 0, again.output
    X2, _ = EmbeddingStore(old_store).load("pca", datasets=["again"])  # projected with the stored reference
    np.testing.assert_allclose(X2, X_before, rtol=0, atol=1e-5)
    assert _attrs(old_store / "embeddings" / "pca" / "again")["encoding-version"] == VERSIONS["scdm-embedding"]
    assert "crc32c" in (old_store / "embeddings" / "pca" / "again" / "X" / "zarr.json").read_text()

    twice = runner.invoke(app, ["migrate", str(old_store)])
    assert twice.exit_code == 0 and "nothing to migrate" in twice.output, twice.output


def test_a_store_written_between_the_formats_is_upgraded_whole(tmp_path, legacy_input):
    """Stores written after trust_checkpoint/crc32c but still labelled 0.1.0 conform: every element is raised."""
    store = tmp_path / "between.zarr"
    assert _extract(legacy_input, store, "--dataset", "legacy").exit_code == 0
    for p in store.rglob("zarr.json"):
        attrs = json.loads(p.read_text())["attributes"]
        if attrs.get("encoding-type", "").startswith("scdm-"):
            _set_attrs(p.parent, **{"encoding-version": "0.1.0"})
    m = migrate_store(store)
    assert m.from_version == "0.1.0" and m.kept == ()
    for p in store.rglob("zarr.json"):
        attrs = json.loads(p.read_text())["attributes"]
        if attrs.get("encoding-type") in VERSIONS:
            assert attrs["encoding-version"] == VERSIONS[attrs["encoding-type"]], p


def test_a_newer_major_format_is_refused(old_store):
    _set_attrs(old_store, **{"encoding-version": "1.0.0"})
    before = store_snapshot(old_store)
    with pytest.raises(StoreError, match="newer") as e:
        EmbeddingStore(old_store)
    assert "upgrade scdm" in e.value.fix
    for args in (["inspect", str(old_store)], ["migrate", str(old_store)]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and "upgrade scdm" in r.output and "Traceback" not in r.output, r.output
    assert store_snapshot(old_store) == before


def test_a_newer_major_element_is_refused(old_store):
    _set_attrs(old_store / "datasets" / "legacy", **{"encoding-version": "1.0.0"})
    with pytest.raises(StoreError, match=r"datasets/legacy .*scdm-dataset version 1\.0\.0, newer"):
        EmbeddingStore(old_store).load("pca")


@pytest.mark.parametrize("element, read", [
    (Path("splits") / SPLIT, lambda st: st.get_splits(SPLIT)),
    (Path("datasets") / "legacy", lambda st: st.cells()),
    (Path("embeddings") / "pca" / "legacy", lambda st: st.load("pca")),
    (Path("embeddings") / "pca" / "legacy" / "X", lambda st: st.load("pca")),
    (Path("references") / "pca", lambda st: st.get_reference("pca")),
])
def test_an_unknown_element_kind_is_refused(old_store, element, read):
    _set_attrs(old_store / element, **{"encoding-type": "scdm-hologram"})
    st = EmbeddingStore(old_store)
    with pytest.raises(StoreError, match="'scdm-hologram', which this scdm does not know") as e:
        read(st)
    assert str(element) in e.value.problem and "upgrade scdm" in e.value.fix
    before = store_snapshot(old_store)
    with pytest.raises(StoreError, match="scdm-hologram"):
        migrate_store(old_store)  # checked before anything is written
    assert store_snapshot(old_store) == before


def test_records_round_trip_and_show_missing_and_extra_fields(old_store):
    for rel, cls in (("datasets/legacy", DatasetRecord), ("embeddings/pca/legacy", EmbeddingRecord),
                     (f"splits/{SPLIT}", SplitRecord)):
        attrs = _attrs(old_store / rel)
        rec = cls.from_attrs(attrs)
        assert rec.extra == {}
        assert rec.to_attrs() == {k: v for k, v in attrs.items() if not k.startswith("encoding-")}, rel
    attrs = {**_attrs(old_store / "datasets" / "legacy"), "from_the_future": 3}
    rec = DatasetRecord.from_attrs(attrs)
    assert rec.extra == {"from_the_future": 3} and rec.to_attrs()["from_the_future"] == 3
    del attrs["input_hash"]
    with pytest.raises(StoreError, match="lacks the attribute.*input_hash"):
        DatasetRecord.from_attrs(attrs, "datasets/legacy")
