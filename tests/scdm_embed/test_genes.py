"""Offline gene identifiers."""

from __future__ import annotations

import numpy as np
import pandas as pd

from scdm_embed import GeneTable, ensembl_to_symbols, symbols_to_ensembl
from scdm_embed.genes import looks_like_ensembl, strip_version


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


def test_gene_table_keeps_what_was_given():
    """``ensembl`` is filled offline (and flagged in ``mapped``); the raw ids and
    ``var['ensembl_id']`` are kept as stored, for adapters that must not look anything up."""
    var = pd.DataFrame({"ensembl_id": ["ENSG00000141510.17", "", "ENSG00000141510.17"],
                        "sym": ["TP53", "EGFR", "TP53"]}, index=["TP53", "EGFR", "TP53-dup"])
    gt = GeneTable.from_var(var)
    assert list(gt.ensembl) == ["ENSG00000141510", "ENSG00000146648", "ENSG00000141510"]
    assert list(gt.mapped_mask) == [False, True, False]
    assert list(gt.var_ensembl_id) == ["ENSG00000141510.17", "", "ENSG00000141510.17"]
    assert list(gt.given_ids) == ["TP53", "EGFR", "TP53-dup"] and gt.id_source == "var_names"
    by_key = GeneTable.from_var(var, gene_key="ensembl_id")
    assert by_key.id_source == "ensembl_id" and by_key.given_ids[0] == "ENSG00000141510.17"
    sub = gt.subset(np.array([2, 1]))
    assert list(sub.symbols) == ["TP53-dup", "EGFR"] and list(sub.mapped_mask) == [False, True]
    assert list(sub.var_ensembl_id) == ["ENSG00000141510.17", ""]
    # a table built by hand: nothing flagged as looked up
    hand = GeneTable(symbols=np.array(["A"], dtype=object), ensembl=np.array(["ENSG00000141510"], dtype=object))
    assert hand.given_ids is None and not hand.mapped_mask.any()
