"""The embedding store (public): a Zarr v3 hierarchy keyed by model/dataset.

The on-disk format is documented in ``store/README.md``; its schema (element kinds, their
versions, typed records) lives in :mod:`scdm_embed.store.schema`, and
:func:`~scdm_embed.store.migrate.migrate_store` upgrades a store of the previous format.
"""

from __future__ import annotations

from ._core import (
    DEFAULT_STORE,
    EMBEDDING_CODECS,
    EmbeddingInfo,
    EmbeddingRows,
    EmbeddingStore,
    cells_hash,
    check_name,
    check_store_path,
    is_write_failure,
    shared_strings,
    store_lock,
    store_os_error,
    store_writable,
)
from .migrate import Migration, migrate_store
from .schema import (
    FORMAT_VERSION,
    VERSIONS,
    DatasetRecord,
    EmbeddingRecord,
    Provenance,
    SplitRecord,
    StoreRecord,
    Telemetry,
)

__all__ = ["DEFAULT_STORE", "EMBEDDING_CODECS", "FORMAT_VERSION", "VERSIONS", "DatasetRecord", "EmbeddingInfo",
           "EmbeddingRecord", "EmbeddingRows", "EmbeddingStore", "Migration", "Provenance", "SplitRecord", "StoreRecord", "Telemetry",
           "cells_hash", "check_name", "check_store_path", "is_write_failure", "migrate_store", "shared_strings",
           "store_lock", "store_os_error", "store_writable"]
