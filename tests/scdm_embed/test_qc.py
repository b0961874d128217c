"""`scdm-embed qc` and `extract --qc paper` on real PC9 cells: counts per rule and sample, recorded QC."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from scdm_embed.cli import app
from scdm_embed.qc import mito_mask, qc
from scdm_embed.store import EmbeddingStore
from tests._cli import assert_refused
from tests.conftest import store_snapshot

runner = CliRunner()


def _ok(args):
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return r


def _expected(a: ad.AnnData, by: str) -> pd.DataFrame:
    """The paper's two rules computed here independently (obs n_genes, MT- symbols)."""
    X = a.X.tocsr()
    mt = a.var_names.str.startswith("MT-")
    frac = np.asarray(X[:, mt].sum(axis=1)).ravel() / np.asarray(X.sum(axis=1)).ravel()
    low = a.obs["n_genes"].to_numpy() <= 500
    high = frac >= 0.10
    return pd.DataFrame({"sample": a.obs[by].astype(str), "low": low, "high": high, "kept": ~(low | high)}) \
        .groupby("sample").sum()


def test_qc_cli_counts_each_rule_per_sample(pc9_small, tmp_path):
    out = tmp_path / "qc.h5ad"
    r = _ok(["qc", str(pc9_small), "--out", str(out), "--sample-key", "condition"])
    assert "Day11_control" in r.output and "kept" in r.output
    a = ad.read_h5ad(pc9_small)
    exp = _expected(a, "condition")
    got = ad.read_h5ad(out)
    table = got.uns["scdm_qc"]["per_sample"].set_index("sample")
    for s in exp.index:
        assert table.loc[s, "low_genes"] == exp.loc[s, "low"]
        assert table.loc[s, "high_mito"] == exp.loc[s, "high"]
        assert table.loc[s, "kept"] == exp.loc[s, "kept"]
    assert got.n_obs == int(exp["kept"].sum()) and 0 < got.n_obs < a.n_obs
    assert (got.obs["n_genes"] > 500).all()
    assert got.uns["scdm_qc"]["settings"]["min_genes"] == 500


def test_thresholds_are_options(pc9_small):
    a = ad.read_h5ad(pc9_small)
    loose, rep = qc(a, min_genes=200, max_mito=1.0)
    assert loose.n_obs == a.n_obs - int((a.obs["n_genes"] <= 200).sum())
    assert rep.table["high_mito"].sum() == 0  # max_mito 1: the rule is off
    assert rep.settings["n_mito_genes"] == int(a.var_names.str.startswith("MT-").sum()) > 10


def test_a_sample_qc_removes_entirely_is_a_warning(pc9_small, tmp_path):
    a = ad.read_h5ad(pc9_small)
    cut = int(np.sort(a.obs["n_genes"].to_numpy())[9])  # the 10 shallowest cells form one sample
    a.obs["sample"] = np.where(a.obs["n_genes"] <= cut, "shallow", a.obs["condition"].astype(str))
    path = tmp_path / "with_sample.h5ad"
    a.write_h5ad(path)
    r = _ok(["qc", str(path), "--out", str(tmp_path / "o.h5ad"), "--min-genes", str(cut)])
    assert "warning" in r.output and "shallow" in r.output


def test_extract_with_qc_records_it_and_is_not_mixed(pc9_small, tmp_path):
    store = tmp_path / "s.zarr"
    _ok(["extract", str(pc9_small), "--model", "pca", "--store", str(store), "--qc", "paper", "-q"])
    st = EmbeddingStore(store)
    ds = st.datasets()[0]
    attrs = st.dataset_attrs(ds)
    assert attrs["qc"]["settings"]["min_genes"] == 500 and attrs["qc"]["settings"]["preset"] == "paper"
    kept = attrs["qc"]["n_kept"]
    assert attrs["n_cells"] == kept < 240
    assert sum(r["removed"] for r in attrs["qc"]["per_sample"]) == 240 - kept
    prov = dict(st.embedding_group("pca", ds).attrs)
    assert prov["qc"]["max_mito"] == 0.10 and prov["input_path"] == str(pc9_small)
    X, _ = st.load("pca")
    assert X.shape[0] == kept
    # the same file without QC is another input: refused under the same name, kept apart under another
    before = store_snapshot(store)
    assert_refused(runner.invoke(app, ["extract", str(pc9_small), "--model", "pca", "--store", str(store), "-q"]),
                   "different input")
    assert store_snapshot(store) == before
    _ok(["extract", str(pc9_small), "--model", "pca", "--store", str(store), "--dataset", "raw", "-q"])
    assert EmbeddingStore(store).dataset_attrs("raw").get("qc") is None
    # re-running with QC is up to date
    r = _ok(["extract", str(pc9_small), "--model", "pca", "--store", str(store), "--qc", "paper", "-q"])
    assert "already complete" in r.output


def test_mitochondrial_genes_by_ensembl_id_human_and_mouse():
    var = pd.DataFrame(index=["ENSG00000198888", "ENSG00000198712", "ENSG00000141510", "mt-Co1", "Actb",
                              "ENSMUSG00000064351", "ENSMUSG00000029580"])
    m = mito_mask(var.iloc[:3])
    assert m.tolist() == [True, True, False]  # MT-ND1, MT-CO2 by id; TP53 not
    assert mito_mask(var.iloc[3:5]).tolist() == [True, False]  # mouse symbol prefix
    assert mito_mask(var.iloc[5:]).tolist() == [True, False]  # mouse mt-Co1 by id; Actb not


def test_qc_refusals(pc9_small, tmp_path):
    out = str(tmp_path / "o.h5ad")
    assert_refused(runner.invoke(app, ["qc", str(pc9_small), "--out", out, "--min-genes", "5000"]),
                   "min-cells-per-class")
    assert_refused(runner.invoke(app, ["qc", str(pc9_small), "--out", str(tmp_path / "o.csv")]), ".h5ad")
    assert_refused(runner.invoke(app, ["qc", str(tmp_path / "none.h5ad"), "--out", out]), "does not exist")
    assert_refused(runner.invoke(app, ["qc", str(pc9_small), "--out", out, "--max-mito", "0"]), "max_mito")
    assert_refused(runner.invoke(app, ["qc", str(pc9_small), "--out", out, "--sample-key", "patient"]), "patient")
    store = tmp_path / "s.zarr"
    assert_refused(runner.invoke(app, ["extract", str(pc9_small), "--model", "pca", "--store", str(store),
                                       "--qc", "strict"]), "paper")
    assert not store.exists()


@pytest.mark.parametrize("key", ["condition"])
def test_qc_on_all_real_pc9_cells(pc9_path, key):
    a = ad.read_h5ad(pc9_path)
    out, rep = qc(a, sample_key=key)
    exp = _expected(a, key)
    assert rep.table.set_index("sample")["kept"].to_dict() == exp["kept"].to_dict()
    assert rep.classes["sensitive"]["kept"] + rep.classes["resistant"]["kept"] == out.n_obs
