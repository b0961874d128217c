"""Embeddings computed elsewhere into the store (``scdm-embed import``).

An ``obsm`` key of an ``.h5ad`` (scVI's ``X_scVI``, a newer foundation model, an
``scdm-embed export``), or a ``.npy`` matrix with a text file of cell ids (one a line, in row
order), becomes model ``external:<name>`` of an existing dataset, so ``scdm-eval run --model
external:<name>`` scores it on the same saved folds as every other model. The cells must be
exactly the dataset's (matched by id, reordered to the store's order); values are stored as
float32 (an export re-imports bit for bit). Provenance: the source file, its sha256, the
``obsm`` key or cell-id file, and the source dtype. ``<name>`` is letters, digits, ``.``, ``_``
and ``-``; the ``:`` of ``external:`` is a plain character of the store key (POSIX file names).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ._version import __version__
from .errors import InputError, StoreError
from .store import EmbeddingStore
from .store._core import store_lock

#: the model-name prefix of imported embeddings
PREFIX = "external:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ImportResult:
    """What ``import_embeddings`` wrote."""

    model: str
    dataset: str
    n_cells: int
    dim: int
    source_sha256: str


def external_model(name: str) -> str:
    """``"scvi"`` -> ``"external:scvi"`` (an ``external:`` prefix already given is kept)."""
    bare = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if not _NAME.match(bare):
        raise InputError(f"import name {name!r} is not usable",
                         "use letters, digits, '.', '_' or '-' (at most 64, starting with a letter or digit), e.g. --name scvi")
    return PREFIX + bare


def _from_h5ad(path: Path, key: str) -> tuple[np.ndarray, pd.Index]:
    import anndata as ad

    try:
        a = ad.read_h5ad(path, backed="r")
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file is the user's input
        raise InputError(f"cannot read {str(path)!r} as an .h5ad ({type(e).__name__}: {e})",
                         "pass an intact AnnData .h5ad file") from None
    try:
        if key not in a.obsm:
            raise InputError(f"{str(path)!r} has no obsm[{key!r}] (has: {list(a.obsm.keys()) or 'none'})",
                             "pass --obsm one of those keys")
        X = a.obsm[key]
        X = X.to_numpy() if isinstance(X, pd.DataFrame) else X
        if hasattr(X, "toarray"):
            X = X.toarray()
        return np.asarray(X), pd.Index(a.obs_names.astype(str))
    finally:
        a.file.close()


def _from_npy(path: Path, ids_path: Path) -> tuple[np.ndarray, pd.Index]:
    try:
        X = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"cannot read {str(path)!r} as a .npy array ({e})",
                         "save a plain numeric array with numpy.save (no pickled objects)") from None
    if not ids_path.is_file():
        raise InputError(f"cell-id file {str(ids_path)!r} does not exist", "pass --cell-ids a text file, one id a line")
    ids = [line.strip() for line in ids_path.read_text().splitlines() if line.strip()]
    return X, pd.Index(ids)


def _check_matrix(X: np.ndarray, ids: pd.Index, src: str) -> np.ndarray:
    if X.ndim != 2 or X.shape[1] == 0:
        raise InputError(f"{src} has shape {X.shape}, not cells x dims", "pass a 2-D array with one row per cell")
    if X.dtype.kind not in "fiu":
        raise InputError(f"{src} has dtype {X.dtype}, not numeric", "pass a numeric array")
    if X.shape[0] != len(ids):
        raise InputError(f"{src} has {X.shape[0]} rows but {len(ids)} cell ids",
                         "give one cell id per row, in row order")
    if not ids.is_unique:
        raise InputError(f"the cell ids of {src} are not unique", "make them unique (one id per cell)")
    if not np.isfinite(X).all():
        raise InputError(f"{src} holds {int((~np.isfinite(X)).sum())} non-finite values (NaN/inf)",
                         "fill or drop them before importing")
    X32 = X.astype(np.float32)
    if X.dtype.kind == "f" and not np.isfinite(X32).all():
        raise InputError(f"{src} has values too large for float32", "rescale the embeddings before importing")
    return X32


def import_embeddings(
    store: str | Path,
    dataset: str,
    *,
    name: str,
    input: str | Path | None = None,
    obsm: str | None = None,
    npy: str | Path | None = None,
    cell_ids: str | Path | None = None,
    overwrite: bool = False,
) -> ImportResult:
    """Import ``input.obsm[obsm]`` (or ``npy`` + ``cell_ids``) as model ``external:<name>`` of ``dataset``.

    Everything is checked before the store is written: the cells must be exactly the
    dataset's cells (order free), values finite; an existing import of that name is replaced
    only with ``overwrite``.
    """
    from .models.base import sha256_file

    model = external_model(name)
    if (input is None) == (npy is None):
        raise InputError("give either --input FILE.h5ad --obsm KEY or --npy FILE.npy --cell-ids IDS.txt",
                         "pass exactly one source of embeddings")
    if input is not None:
        if obsm is None:
            raise InputError("--input needs --obsm KEY (the embedding to import)", "add e.g. --obsm X_scVI")
        if cell_ids is not None:
            raise InputError("--cell-ids goes with --npy, not --input (an .h5ad has its obs_names)", "drop --cell-ids")
        src = Path(input)
        if not src.is_file():
            raise InputError(f"input {str(src)!r} does not exist", "check the path of the .h5ad")
        X, ids = _from_h5ad(src, obsm)
        what = f"obsm[{obsm!r}] of {str(src)!r}"
    else:
        if cell_ids is None:
            raise InputError("--npy needs --cell-ids IDS.txt (one cell id a line, in row order)", "add --cell-ids")
        if obsm is not None:
            raise InputError("--obsm goes with --input, not --npy", "drop --obsm")
        src = Path(npy)  # type: ignore[arg-type]
        if not src.is_file():
            raise InputError(f"input {str(src)!r} does not exist", "check the path of the .npy")
        X, ids = _from_npy(src, Path(cell_ids))
        what = str(src)
    X32 = _check_matrix(X, ids, what)
    st = EmbeddingStore(store)
    st.dataset_attrs(dataset)  # a clear StoreError for an unknown dataset
    cells = st.cells([dataset])
    want = pd.Index([k[len(dataset) + 1:] for k in cells.index])
    pos = ids.get_indexer(want)
    if len(ids) != len(want) or (pos < 0).any():
        missing = want[pos < 0]
        extra = ids.difference(want)
        raise InputError(f"the cells of {what} do not match dataset {dataset!r} ({len(missing)} of its {len(want)} cells "
                         f"are missing, e.g. {list(missing[:3])}; {len(extra)} are not in it, e.g. {list(extra[:3])})",
                         f"import embeddings of exactly the cells extracted as {dataset!r} (same cell ids)")
    if st.embedding_group(model, dataset) is not None and not overwrite:
        raise StoreError(f"{model}/{dataset} is already in the store", "pass --overwrite to replace it, or pick another --name")
    digest = sha256_file(src)
    prov = {"source": "import", "source_file": str(src.resolve()), "source_sha256": digest,
            "source_dtype": str(X.dtype), "obsm_key": obsm,
            "cell_ids_file": str(Path(cell_ids).resolve()) if cell_ids is not None else None,
            "cell_ids_sha256": sha256_file(Path(cell_ids)) if cell_ids is not None else None}
    with store_lock(store) as lk:
        w = EmbeddingStore(store, mode="a")
        lk.keep()
        w.put_embedding(model, dataset, X32[pos], checkpoint=str(src.resolve()), checkpoint_hash="sha256:" + digest,
                        model_version="external", settings=prov, scdm_version=__version__,
                        options={}, trust_checkpoint=False)
    return ImportResult(model, dataset, len(want), X32.shape[1], digest)


__all__ = ["PREFIX", "ImportResult", "external_model", "import_embeddings"]
