"""Ranked gene sentences, shared by the text-like adapters (tGPT, language models, Geneformer).

A cell becomes its expressed genes in descending expression order. Ranking is written once
here, vectorised over a CSR chunk: one ``np.lexsort`` over the chunk's non-zeros, no loop over
genes. Ties are broken stably by column index, i.e. in ``var`` order (as the tGPT reference
fixture does with ``np.argsort(-x, kind="stable")``).

Also holds the masked mean pooling these adapters share; their Hugging Face loading helpers are
in :mod:`._hf`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from .base import masked_mean


def ranked_columns(
    X: sp.csr_matrix,
    n: int | None,
    *,
    columns: np.ndarray | Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``n`` expressed columns per cell, flat: ``(cols, offsets)``.

    ``cols[offsets[i]:offsets[i + 1]]`` are the column indices (into ``X``'s gene axis) of cell
    ``i``'s genes with a value > 0, restricted to ``columns`` (all when ``None``), by value
    descending, ties in column (``var``) order; at most ``n`` per cell (all when ``None``).
    """
    X = sp.csr_matrix(X)
    if not X.has_sorted_indices:
        X = X.copy()
        X.sort_indices()
    n_cells = X.shape[0]
    row = np.repeat(np.arange(n_cells, dtype=np.int64), np.diff(X.indptr))
    keep = X.data > 0
    if columns is not None:
        allowed = np.zeros(X.shape[1], dtype=bool)
        allowed[np.asarray(columns, dtype=np.int64)] = True
        keep &= allowed[X.indices]
    row, col, val = row[keep], X.indices[keep].astype(np.int64), X.data[keep]
    # lexsort is stable and the last key is primary: by row, then value descending; equal
    # values keep their incoming order, which is ascending column (indices are sorted)
    order = np.lexsort((-val, row))
    row, col = row[order], col[order]
    counts = np.bincount(row, minlength=n_cells)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if n_cells else np.zeros(0, np.int64)
    if n is not None:
        rank = np.arange(len(row)) - starts[row]
        col = col[rank < n]
        counts = np.minimum(counts, n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return col, offsets


def ranked_genes(
    X: sp.csr_matrix,
    n: int | None,
    *,
    columns: np.ndarray | Sequence[int] | None = None,
) -> list[np.ndarray]:
    """Per cell, the column indices of its top-``n`` expressed genes (see :func:`ranked_columns`)."""
    col, offsets = ranked_columns(X, n, columns=columns)
    return np.split(col, offsets[1:-1])


def wrap_sequences(
    tokens: np.ndarray,
    offsets: np.ndarray,
    *,
    prefix: int | None = None,
    suffix: int | None = None,
) -> list[np.ndarray]:
    """Split flat per-cell tokens by ``offsets`` and add an optional ``prefix``/``suffix`` token
    to every cell, without a per-cell Python concatenation."""
    n_cells = len(offsets) - 1
    counts = np.diff(offsets)
    extra = int(prefix is not None) + int(suffix is not None)
    out = np.empty(len(tokens) + extra * n_cells, dtype=np.int64)
    new_starts = offsets[:-1] + extra * np.arange(n_cells)
    shift = np.repeat(new_starts - offsets[:-1] + int(prefix is not None), counts)
    out[np.arange(len(tokens)) + shift] = tokens
    if prefix is not None:
        out[new_starts] = prefix
    if suffix is not None:
        out[new_starts + counts + int(prefix is not None)] = suffix
    new_offsets = np.concatenate([new_starts, [len(out)]])
    return np.split(out, new_offsets[1:-1])


# -- pooling ------------------------------------------------------------------------------------
def zeroed_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Float32 mean of ``hidden`` (B, L, D) over ``mask`` (B, L), masked positions zeroed first
    (so a non-finite state at a pad can never reach the mean)."""
    mask = mask.bool()
    return masked_mean(hidden.float().masked_fill(~mask.unsqueeze(-1), 0.0), mask)
