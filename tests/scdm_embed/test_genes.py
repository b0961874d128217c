"""Offline gene identifiers."""

from __future__ import annotations

import numpy as np
import pandas as pd

from scdm_embed import GeneTable, ensembl_to_symbols, symbols_to_ensembl
from scdm_embed._genes import looks_like_ensembl, strip_version


def test_symbol_to_ensembl_known_genes():
    got = symbols_to_ensembl(["TP53", "egfr", "ACTB", "NOT_A_GENE"])
    assert list(got) == ["ENSG00000141510", "ENSG00000146648", "ENSG00000075624", ""]


def test_previous_symbol_resolves():
    # HGNC previous symbol C10orf2 -> TWNK (ENSG00000107815)
    assert symbols_to_ensembl(["C10orf2"])[0] == "ENSG00000107815"


def test_ensembl_versions_stripped_and_mapped_back():
    ids = ["ENSG00000141510.17", "ENSG00000146648.21"]
    assert list(strip_version(ids)) == ["ENSG00000141510", "ENSG00000146648"]
    assert list(ensembl_to_symbols(ids)) == ["TP53", "EGFR"]
    assert looks_like_ensembl(ids) and not looks_like_ensembl(["TP53", "EGFR"])


def test_gene_table_from_ensembl_var():
    var = pd.DataFrame(index=["ENSG00000141510.3", "ENSG00000075624"])
    gt = GeneTable.from_var(var)
    assert list(gt.symbols) == ["TP53", "ACTB"] and list(gt.ensembl) == ["ENSG00000141510", "ENSG00000075624"]


def test_gene_table_prefers_given_ensembl(pc9_path):
    import anndata as ad

    var = ad.read_h5ad(pc9_path, backed="r").var
    gt = GeneTable.from_var(var)
    given = var["ensembl_id"].astype(str).to_numpy()
    has = np.array([g.startswith("ENS") for g in given])
    assert (gt.ensembl[has] == given[has]).all()
    assert (gt.ensembl != "").sum() >= has.sum()
