"""The input layer: .h5ad and AnnData-in-Zarr, label vocabularies, metadata roles, gene ids."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from scdm_embed import EmbeddingStore, InputError, LabelSpec, extract, read_input


@pytest.fixture(scope="module")
def small(pc9_small):
    return ad.read_h5ad(pc9_small)


def test_reads_real_pc9(pc9_path):
    d = read_input(pc9_path)
    assert d.n_cells == 2121 and d.n_genes == 25077 and d.is_integer
    assert d.cells["label"].sum() == 586 and (d.cells["label"] == 0).sum() == 1535
    assert {"study", "drug", "tissue"} <= set(d.cells.columns) and "sample" not in d.cells
    assert (d.cells["study"] == "GSE149214").all()
    assert (d.genes.ensembl != "").sum() >= 18513
    X = d.read_rows(0, 5)
    assert X.shape == (5, 25077) and X.dtype == np.float32
    d.close()


def test_hash_is_content_based(pc9_small, small, tmp_path):
    a = read_input(pc9_small).content_hash
    small.copy().write_h5ad(tmp_path / "copy.h5ad", compression="gzip")
    assert read_input(tmp_path / "copy.h5ad").content_hash == a  # same content, other bytes
    b = small.copy()
    b.X = b.X.copy()
    b.X[0, b.X[0].nonzero()[1][0]] += 1
    b.write_h5ad(tmp_path / "changed.h5ad")
    assert read_input(tmp_path / "changed.h5ad").content_hash != a


def test_zarr_anndata_gives_same_embeddings(pc9_small, small, tmp_path):
    small.write_zarr(tmp_path / "cells.zarr")
    d = read_input(tmp_path / "cells.zarr")
    assert d.content_hash == read_input(pc9_small).content_hash
    extract(pc9_small, model="pca", store=tmp_path / "a.zarr", dataset="x", progress=False)
    extract(tmp_path / "cells.zarr", model="pca", store=tmp_path / "b.zarr", dataset="x", progress=False)
    np.testing.assert_array_equal(EmbeddingStore(tmp_path / "a.zarr").load("pca")[0],
                                  EmbeddingStore(tmp_path / "b.zarr").load("pca")[0])


@pytest.mark.parametrize(("sens", "res", "spec"), [
    ("1", "0", LabelSpec(key="resp")),
    ("responder", "non-responder", LabelSpec(key="resp")),
    ("Sensitive", "RESISTANT", LabelSpec(key="resp")),
    ("CR", "PD", LabelSpec(key="resp", sensitive=("CR", "PR"), resistant=("PD", "SD"))),
])
def test_label_vocabularies(small, tmp_path, sens, res, spec):
    a = small.copy()
    a.obs["resp"] = np.where(a.obs["response"] == "sensitive", sens, res)
    a.write_h5ad(tmp_path / "l.h5ad")
    d = read_input(tmp_path / "l.h5ad", labels=spec)
    np.testing.assert_array_equal(d.cells["label"].to_numpy(), (small.obs["response"] == "sensitive").to_numpy().astype(int))


def test_metadata_roles_and_layers(small, tmp_path):
    a = small.copy()
    a.obs["patient"] = np.where(a.obs["response"] == "sensitive", "P1", "P2")
    a.layers["counts"] = a.X.copy()
    a.X = a.X.astype(np.float32) / 2.0
    a.write_h5ad(tmp_path / "m.h5ad")
    with pytest.raises(InputError, match="non-integer"):
        read_input(tmp_path / "m.h5ad")
    d = read_input(tmp_path / "m.h5ad", layer="counts", meta_keys={"sample": "patient", "cancer_type": None})
    assert set(d.cells["sample"]) == {"P1", "P2"} and "cancer_type" not in d.cells


def test_ensembl_var_names(small, tmp_path):
    a = small[:, small.var["ensembl_id"].astype(str).str.startswith("ENS").to_numpy()].copy()
    a = a[:, ~a.var["ensembl_id"].duplicated().to_numpy()].copy()
    a.var_names = [f"{e}.5" for e in a.var["ensembl_id"]]
    a.var = a.var.drop(columns=["ensembl_id"])
    a.write_h5ad(tmp_path / "e.h5ad")
    d = read_input(tmp_path / "e.h5ad")
    assert d.genes.ensembl[0] == a.var_names[0].split(".")[0]
    assert (d.genes.symbols != "").mean() > 0.95
