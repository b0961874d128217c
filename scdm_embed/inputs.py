"""Input layer: AnnData (``.h5ad`` or Zarr) read in row chunks, validated, labelled."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from .errors import InputError
from .genes import GeneTable

if TYPE_CHECKING:
    from .models.base import CellChunk

#: Metadata roles the evaluation understands, and their default ``obs`` column names.
META_KEYS: tuple[str, ...] = ("study", "sample", "tissue", "cancer_type", "drug", "drug_type", "regimen")

#: Values recognised as sensitive / resistant (case-insensitive) when no mapping is given.
DEFAULT_SENSITIVE = ("sensitive", "1", "1.0", "responder", "response", "true", "yes", "s", "sens")
DEFAULT_RESISTANT = ("resistant", "0", "0.0", "non-responder", "nonresponder", "non_responder", "non-response",
                     "no-response", "false", "no", "r", "res")

SENSITIVE, RESISTANT = 1, 0


@dataclass(frozen=True)
class LabelSpec:
    """How the response column maps to sensitive (1) / resistant (0)."""

    key: str = "response"
    sensitive: tuple[str, ...] = DEFAULT_SENSITIVE
    resistant: tuple[str, ...] = DEFAULT_RESISTANT

    def encode(self, values: pd.Series) -> np.ndarray:
        s = values.astype("string").str.strip().str.lower()
        sens = {v.lower() for v in self.sensitive}
        res = {v.lower() for v in self.resistant}
        if sens & res:
            raise InputError(f"label values {sorted(sens & res)} are mapped to both classes",
                             "give each value to only one of --sensitive / --resistant")
        out = np.full(len(s), -1, dtype=np.int8)
        out[s.isin(sens).fillna(False).to_numpy()] = SENSITIVE
        out[s.isin(res).fillna(False).to_numpy()] = RESISTANT
        bad = pd.unique(values[out < 0].astype("string").fillna("<missing>"))
        if len(bad):
            shown = ", ".join(repr(b) for b in list(bad)[:8])
            raise InputError(
                f"column {self.key!r} has {int((out < 0).sum())} cells with unknown label values: {shown}",
                "map them with --sensitive VALUE / --resistant VALUE (repeatable), or drop those cells",
            )
        return out


@dataclass
class InputDataset:
    """A validated AnnData opened for chunked reading.

    ``cells`` is the cell table (index = cell ids; ``label`` 1 = sensitive, 0 = resistant;
    the metadata roles of :data:`META_KEYS` that exist). ``genes`` holds symbols and
    Ensembl ids. The matrix is read lazily, in row blocks, by :meth:`read_rows`.
    """

    path: Path
    cells: pd.DataFrame
    genes: GeneTable
    var_names: np.ndarray
    content_hash: str
    is_integer: bool
    layer: str | None = None
    gene_key: str | None = None
    #: ``obs["n_counts"]`` as float64 (NaN where not a number) when obs has it, else ``None``
    n_counts: np.ndarray | None = None
    _x: object = field(default=None, repr=False)
    _handle: object = field(default=None, repr=False)

    @property
    def n_cells(self) -> int:
        return len(self.cells)

    @property
    def n_genes(self) -> int:
        return len(self.var_names)

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` as float32 CSR (raw values, as stored); an unreadable block is an :class:`InputError`."""
        with _reading(self.path):
            block = self._x[start:stop]
        return _as_csr(block)

    def cell_chunk(self, start: int, stop: int) -> CellChunk:
        """Cells ``start:stop`` as the :class:`~scdm_embed.models.base.CellChunk` adapters tokenize.

        The one way a block of an input becomes model input (extraction and LoRA both use it):
        rows as :meth:`read_rows`, their obs names, the genes and, when obs has it, ``n_counts``.
        """
        # imported here: torch loads with the first chunk, not with the input layer
        from .models.base import CellChunk

        X = self.read_rows(start, min(stop, self.n_cells))
        stop = start + X.shape[0]
        return CellChunk(X=X, cell_ids=self.cells.index.to_numpy()[start:stop], genes=self.genes, start=start,
                         n_counts=None if self.n_counts is None else self.n_counts[start:stop])

    def close(self) -> None:
        if isinstance(self._handle, h5py.File):
            self._handle.close()


def _as_csr(block) -> sp.csr_matrix:
    m = sp.csr_matrix(block)
    m.sum_duplicates()
    m.sort_indices()
    return m.astype(np.float32, copy=False)


#: what h5py / zarr / anndata raise reading a file that opens but is damaged inside (e.g. HDF5
#: "wrong B-tree signature", "bad local heap signature", a truncated or garbled chunk)
_READ_ERRORS = (OSError, RuntimeError, KeyError, ValueError)


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn a reader failure inside an opened AnnData into an :class:`InputError` naming the file."""
    try:
        yield
    except _READ_ERRORS as e:
        reason = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        writer = "adata.write_zarr" if path.is_dir() or path.suffix == ".zarr" else "adata.write_h5ad"
        raise InputError(f"cannot read {str(path)!r} ({reason or type(e).__name__}): the file opens but is damaged "
                         "inside (or was not written by anndata)",
                         f"the file is damaged: re-download it or re-write it with {writer}") from e


def _open(path: Path, layer: str | None):
    if not path.exists():
        raise InputError(f"input {str(path)!r} does not exist", "check the path (an .h5ad file or an AnnData .zarr folder)")
    try:
        if path.is_dir() or path.suffix == ".zarr":
            handle = zarr.open_group(str(path), mode="r")
        else:
            handle = h5py.File(path, "r")
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
        raise InputError(f"cannot open {str(path)!r} as AnnData: {e}", "give an .h5ad file or an AnnData .zarr store") from e
    try:
        with _reading(path):
            for key in ("obs", "var", "X"):
                if key not in handle and not (key == "X" and layer):
                    raise InputError(f"{str(path)!r} is not an AnnData file (no {key!r} element)", "write it with adata.write_h5ad()")
            obs = ad.io.read_elem(handle["obs"])
            var = ad.io.read_elem(handle["var"])
            if layer is not None:
                if "layers" not in handle or layer not in handle["layers"]:
                    have = list(handle["layers"].keys()) if "layers" in handle else []
                    raise InputError(f"layer {layer!r} is not in {path.name} (layers: {have})", "pick one of those layers with --layer, or omit --layer to use X")
                elem = handle["layers"][layer]
            else:
                elem = handle["X"]
            enc = dict(elem.attrs).get("encoding-type", "array")
            x = ad.io.sparse_dataset(elem) if enc in ("csr_matrix", "csc_matrix") else elem
            _ = x.shape  # a damaged matrix header fails here, inside the guard
    except BaseException:
        if isinstance(handle, h5py.File):
            handle.close()
        raise
    return handle, obs, var, x


def _meta_columns(obs: pd.DataFrame, meta_keys: Mapping[str, str | None]) -> dict[str, str]:
    """Role -> column. Explicit columns must exist; defaults are used when present."""
    out = {}
    for role in META_KEYS:
        if role in meta_keys:
            col = meta_keys[role]
            if col is None:
                continue
            if col not in obs:
                raise InputError(f"metadata column {col!r} (for {role}) is not in obs; obs has: {list(obs.columns)}",
                                 f"pass --{role.replace('_', '-')}-key with one of those columns, or leave it out")
            out[role] = col
        elif role in obs:
            out[role] = role
    return out


def read_input(
    path: str | Path,
    *,
    labels: LabelSpec | None = None,
    meta_keys: Mapping[str, str | None] | None = None,
    gene_key: str | None = None,
    layer: str | None = None,
    require_counts: bool = True,
    require_labels: bool = True,
    chunk_size: int = 2048,
    allow_duplicate_genes: bool = False,
    allow_single_class: bool = False,
) -> InputDataset:
    """Open and validate an AnnData for extraction.

    One streaming pass over the matrix checks values (finite, non-negative, integer when
    ``require_counts``, no all-zero cell) and computes the content hash. Nothing is loaded
    whole. ``require_labels=False`` opens an unlabelled AnnData (e.g. a fitting reference).
    ``allow_duplicate_genes`` accepts repeated ids in a ``gene_key`` column (for models that
    take them as separate genes); repeated ``var_names`` are always refused.
    Labelled cells must hold both classes unless ``allow_single_class`` (a dataset meant to be
    pooled in the store with datasets that hold the other class).
    Raises :class:`~scdm_embed.InputError` naming the problem and the fix.
    """
    path = Path(path)
    labels = labels or LabelSpec()
    handle, obs, var, x = _open(path, layer)
    try:
        n_cells, n_genes = x.shape
        if n_cells == 0 or n_genes == 0:
            raise InputError(f"the matrix of {path.name} is empty ({n_cells} cells x {n_genes} genes)", "give a file with cells and genes")
        _check_unique(obs.index, "cell", "call adata.obs_names_make_unique() (or drop the duplicates) and save again")
        ids = var.index if gene_key is None else var.get(gene_key)
        if ids is None:
            raise InputError(f"gene column {gene_key!r} is not in var; var has: {list(var.columns)}", "pass --gene-key with one of those, or omit it to use var_names")
        if gene_key is None or not allow_duplicate_genes:
            _check_unique(pd.Index(ids.astype(str)), "gene", "call adata.var_names_make_unique() or aggregate duplicated genes")
        if require_labels and labels.key not in obs:
            raise InputError(f"response column {labels.key!r} is not in obs; obs has: {list(obs.columns)}", "pass --response-key with the column that holds sensitive/resistant")
        cells = pd.DataFrame(index=pd.Index(obs.index.astype(str), name="cell_id"))
        if require_labels:
            cells["label"] = labels.encode(obs[labels.key])
            if not allow_single_class:
                _check_two_classes(cells["label"].to_numpy(), path.name, labels.key)
            cells["response"] = np.where(cells["label"].to_numpy() == SENSITIVE, "sensitive", "resistant")
        for role, col in _meta_columns(obs, meta_keys or {}).items():
            missing = obs[col].isna().to_numpy()
            if missing.any():  # as a string, NaN would be one more study / sample / category: "nan"
                raise InputError(f"metadata column {col!r} (for {role}) has {int(missing.sum())} cells with no value "
                                 f"(e.g. {str(obs.index[np.flatnonzero(missing)[0]])!r})",
                                 "fill them (e.g. with 'unknown') or drop those cells before extracting"
                                 + ("" if role in (meta_keys or {}) else
                                    f"; or rename the column if it is not the {role}"))
            cells[role] = obs[col].astype(str).to_numpy()
        h, is_integer = _validate_and_hash(x, n_cells, chunk_size, path, require_counts, obs.index)
        h.update("\0".join(map(str, ids)).encode())
        h.update("\0".join(map(str, obs.index)).encode())
        n_counts = _obs_n_counts(obs)
        if n_counts is not None:  # Geneformer normalises by it: part of what the input means
            h.update(n_counts.tobytes())
        genes = GeneTable.from_var(var, gene_key=gene_key)
    except BaseException:
        if isinstance(handle, h5py.File):
            handle.close()
        raise
    return InputDataset(path=path, cells=cells, genes=genes, var_names=np.asarray(ids.astype(str)), content_hash=h.hexdigest(),
                        is_integer=is_integer, layer=layer, gene_key=gene_key, n_counts=n_counts, _x=x, _handle=handle)


def _obs_n_counts(obs: pd.DataFrame) -> np.ndarray | None:
    """``obs["n_counts"]`` as float64 (NaN where a value is not a number), ``None`` if absent."""
    if "n_counts" not in obs:
        return None
    return pd.to_numeric(obs["n_counts"].astype(object), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def _check_two_classes(label: np.ndarray, name: str, key: str) -> None:
    present = set(np.unique(label).tolist())
    if len(present) < 2:
        only = "sensitive" if SENSITIVE in present else "resistant"
        raise InputError(f"all {label.size} cells of {name} are {only} (column {key!r}): a drug-response classifier "
                         "needs sensitive and resistant cells",
                         "check --response-key / --sensitive / --resistant; if you will pool it with datasets that "
                         "hold the other class, pass --allow-single-class")


def _check_unique(index: pd.Index, what: str, fix: str) -> None:
    if not index.is_unique:
        dup = index[index.duplicated()].unique()[:5].tolist()
        raise InputError(f"{int(index.duplicated().sum())} duplicate {what} ids, e.g. {dup}", fix)


def _validate_and_hash(x, n_cells: int, chunk_size: int, path: Path, require_counts: bool, obs_names: Sequence[str]):
    name = path.name
    h = hashlib.sha256()
    is_integer = True
    for start in range(0, n_cells, chunk_size):
        with _reading(path):
            block = x[start:min(start + chunk_size, n_cells)]
        m = _as_csr(block)
        d = m.data
        if not np.all(np.isfinite(d)):
            raise InputError(f"{name} has non-finite values (NaN or inf) in rows {start}..{start + m.shape[0] - 1}",
                             "fix or drop those cells; raw counts are expected")
        if d.size and d.min() < 0:
            raise InputError(f"{name} has negative values (min {d.min():g}); this looks like scaled or centred data",
                             "give raw counts (e.g. --layer counts, or adata.raw) instead of scaled values")
        if is_integer and d.size and not np.all(d == np.round(d)):
            is_integer = False
            if require_counts:
                raise InputError(f"{name} has non-integer values (e.g. {d[d != np.round(d)][0]:g}): this model needs raw counts, not normalised data",
                                 "point --layer at the raw counts layer, or rebuild the AnnData from the count matrix")
        totals = np.asarray(m.sum(axis=1)).ravel()
        zero = np.flatnonzero(totals == 0)
        if zero.size:
            shown = [str(obs_names[start + i]) for i in zero[:5]]
            raise InputError(f"{name} has {zero.size}+ cells with zero counts, e.g. {shown}",
                             "filter them first, e.g. sc.pp.filter_cells(adata, min_counts=1)")
        h.update(np.diff(m.indptr).astype(np.int64).tobytes())
        h.update(m.indices.astype(np.int64).tobytes())
        h.update(m.data.astype(np.float32).tobytes())
    return h, is_integer
