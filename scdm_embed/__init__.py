"""scdm-embed: single-cell foundation-model cell embeddings, computed once, stored in Zarr.

>>> import scdm_embed as se                                       # doctest: +SKIP
>>> se.extract("cells.h5ad", model="pca", store="store/scdm.zarr")  # doctest: +SKIP
>>> X, cells = se.EmbeddingStore("store/scdm.zarr").load("pca")     # doctest: +SKIP
"""

from ._batching import embed_matrix
from ._engine import ExtractionResult, extract
from ._errors import CheckpointError, InputError, ScdmError, StaleCacheError, StoreError
from ._genes import GeneTable, ensembl_to_symbols, symbols_to_ensembl
from ._input import LabelSpec, read_input
from ._inspect import store_table
from ._store import DEFAULT_STORE, EmbeddingStore
from ._version import __version__
from .models import Adapter, available_models, get_adapter

__all__ = [
    "Adapter",
    "CheckpointError",
    "DEFAULT_STORE",
    "EmbeddingStore",
    "ExtractionResult",
    "GeneTable",
    "InputError",
    "LabelSpec",
    "ScdmError",
    "StaleCacheError",
    "StoreError",
    "__version__",
    "available_models",
    "embed_matrix",
    "ensembl_to_symbols",
    "extract",
    "get_adapter",
    "read_input",
    "store_table",
    "symbols_to_ensembl",
]
