"""Ranked gene sentences, shared by the text-like adapters (tGPT, language models, Geneformer).

A cell becomes its expressed genes in descending expression order. Ranking is written once
here, vectorised over a CSR chunk: one ``np.lexsort`` over the chunk's non-zeros, no loop over
genes. Ties are broken stably by column index, i.e. in ``var`` order (as the tGPT reference
fixture does with ``np.argsort(-x, kind="stable")``).

Also holds the small Hugging Face helpers these adapters share (offline, quiet, strict loading,
masked mean pooling).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from .._errors import CheckpointError
from ._base import masked_mean
from ._safe_load import check_torch_file


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


# -- Hugging Face helpers ---------------------------------------------------------------------
def hf_offline() -> None:
    """Keep the Hugging Face libraries off the network (checkpoints are local folders)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """Silence transformers' load reports and progress bars for the duration (restored after)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def read_hf_config(config_cls: Any, checkpoint: Path, *, fix: str) -> Any:
    """``config_cls.from_pretrained`` on the local folder; any failure -> :class:`CheckpointError`."""
    try:
        return config_cls.from_pretrained(str(checkpoint), local_files_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read {checkpoint}/config.json: {err}", fix) from err


def load_hf_weights(model_cls: Any, checkpoint: Path, *, what: str, fix: str, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """``model_cls.from_pretrained`` on the local folder, quietly, with its loading info
    (check it with :func:`check_loading_info`); any failure -> :class:`CheckpointError`.

    ``model.safetensors`` is preferred (as transformers does); a ``pytorch_model*.bin`` is never
    fully unpickled: it is scanned for globals ``weights_only`` refuses first, then loaded with
    ``weights_only=True`` (forced, whatever ``kwargs`` say)."""
    folder = Path(checkpoint)
    if folder.is_dir() and not any(folder.glob("model*.safetensors*")):
        for bin_file in sorted(folder.glob("pytorch_model*.bin")):
            check_torch_file(bin_file, fix="re-download it from the official source (prefer its "
                             "model.safetensors, which cannot hold code)")
    kwargs["weights_only"] = True
    # shape mismatches come back in the loading info, where check_loading_info names each tensor
    # with both shapes; without this transformers raises "look at the above report", a report
    # that quiet_hf keeps from being printed
    kwargs.setdefault("ignore_mismatched_sizes", True)
    try:
        with quiet_hf():
            return model_cls.from_pretrained(str(checkpoint), output_loading_info=True, local_files_only=True,
                                             **kwargs)
    except Exception as err:  # noqa: BLE001 - unreadable or shape-mismatched weights
        raise CheckpointError(f"cannot load {what} in {str(checkpoint)!r}: {err}", fix) from err


def check_loading_info(
    info: dict[str, Any],
    checkpoint: Path,
    *,
    allow_unexpected: Any = None,
    fix: str,
) -> list[str]:
    """Raise :class:`CheckpointError` on missing / mismatched / unexpected weights.

    ``allow_unexpected(key) -> bool`` may accept unexpected keys (e.g. an unused LM head);
    the accepted ones are returned, sorted.
    """
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(_mismatch(k) for k in info.get("mismatched_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    allowed = [k for k in unexpected if allow_unexpected is not None and allow_unexpected(k)]
    rejected = [k for k in unexpected if k not in allowed]
    errors = list(info.get("error_msgs") or [])
    problems = []
    for what, keys in (("missing", missing), ("shape-mismatched", mismatched), ("unexpected", rejected),
                       ("load errors", errors)):
        if keys:
            shown = ", ".join(map(str, keys[:5])) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
            problems.append(f"{len(keys)} {what}: {shown}")
    if problems:
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} does not match its config ("
                              + "; ".join(problems) + ")", fix)
    return allowed


def _mismatch(entry: Any) -> str:
    """A ``(key, checkpoint shape, config shape)`` entry of transformers' loading info, readable."""
    if isinstance(entry, (tuple, list)) and len(entry) == 3:
        key, ckpt, model = entry
        return f"{key} (checkpoint {tuple(ckpt)} vs config {tuple(model)})"
    return str(entry)


def zeroed_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Float32 mean of ``hidden`` (B, L, D) over ``mask`` (B, L), masked positions zeroed first
    (so a non-finite state at a pad can never reach the mean)."""
    mask = mask.bool()
    return masked_mean(hidden.float().masked_fill(~mask.unsqueeze(-1), 0.0), mask)
