"""scdm-embed: single-cell foundation-model cell embeddings, computed once, stored in Zarr.

>>> import scdm_embed as se                                       # doctest: +SKIP
>>> se.extract("cells.h5ad", model="pca", store="store/scdm.zarr")  # doctest: +SKIP
>>> X, cells = se.EmbeddingStore("store/scdm.zarr").load("pca")     # doctest: +SKIP

Names are imported on first use, so ``import scdm_embed`` stays light (torch and scanpy load
only when an extraction or adapter needs them).
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__
from .errors import CheckpointError, InputError, ScdmError, StaleCacheError, StoreError

_LAZY = {
    "embed_matrix": ".runner",
    "Runner": ".runner",
    "ExtractionResult": "._engine",
    "extract": "._engine",
    "finalize": "._shard",
    "extract_on_dask": "._dask",
    "GeneTable": ".genes",
    "ensembl_to_symbols": ".genes",
    "symbols_to_ensembl": ".genes",
    "LabelSpec": ".inputs",
    "read_input": ".inputs",
    "store_table": "._inspect",
    "DEFAULT_STORE": ".store",
    "EmbeddingStore": ".store",
    "Adapter": ".models",
    "GenePlan": ".models",
    "Option": ".models",
    "available_models": ".models",
    "get_adapter": ".models",
    "register_adapter": ".models",
    "datasets": ".datasets",
    "to_anndata": "._export",
    "export_anndata": "._export",
    "import_embeddings": "._import",
    "checkpoint_entry": "._download",
    "download_checkpoint": "._download",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        mod = importlib.import_module(_LAZY[name], __name__)
        return mod if name == "datasets" else getattr(mod, name)
    raise AttributeError(f"module 'scdm_embed' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["CheckpointError", "InputError", "ScdmError", "StaleCacheError", "StoreError", "__version__", *_LAZY]
