"""Batching mechanics shared by every model: collation, length bucketing, token budgets,
CUDA out-of-memory back-off. Pure functions over adapter outputs; no store access."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from ._genes import GeneTable
from .models._base import Adapter, CellChunk

log = logging.getLogger(__name__)


def token_lengths(cells: Sequence[dict[str, np.ndarray]], sequence_keys: Sequence[str]) -> np.ndarray:
    """Token count per cell (1 for adapters without sequences)."""
    if not sequence_keys:
        return np.ones(len(cells), dtype=np.int64)
    k = sequence_keys[0]
    return np.fromiter((len(c[k]) for c in cells), dtype=np.int64, count=len(cells))


def plan_batches(
    lengths: np.ndarray,
    *,
    batch_size: int,
    token_budget: int | None = None,
    bucket: bool = True,
) -> list[np.ndarray]:
    """Split cell positions into batches.

    With ``bucket`` cells are sorted by length (stable, longest first) so a batch pads only to
    its own longest cell; a batch holds at most ``batch_size`` cells and, when
    ``token_budget`` is set, at most ``token_budget`` padded tokens (never fewer than 1 cell).
    """
    n = len(lengths)
    order = np.argsort(-lengths, kind="stable") if bucket else np.arange(n)
    batches: list[np.ndarray] = []
    i = 0
    while i < n:
        j, longest = i, 0
        while j < n and j - i < batch_size:
            cand = max(longest, int(lengths[order[j]]))
            if token_budget is not None and j > i and cand * (j - i + 1) > token_budget:
                break
            longest = cand
            j += 1
        batches.append(order[i:j])
        i = j
    return batches


def collate(
    cells: Sequence[dict[str, np.ndarray]],
    *,
    sequence_keys: Sequence[str],
    pad_values: dict[str, int | float],
    device: torch.device,
    pad_to: int | None = None,
) -> dict[str, torch.Tensor]:
    """Stack per-cell token dicts; pad sequence keys on the right; add ``attention_mask``.

    ``pad_to`` pads every batch to a fixed width (the naive path benchmarks compare against).
    """
    out: dict[str, torch.Tensor] = {}
    lengths = token_lengths(cells, sequence_keys)
    width = int(lengths.max()) if len(cells) else 0
    if pad_to is not None:
        width = max(width, pad_to)
    for key in cells[0]:
        first = np.asarray(cells[0][key])
        if key in sequence_keys:
            arr = np.full((len(cells), width), pad_values.get(key, 0), dtype=first.dtype)
            for r, c in enumerate(cells):
                v = c[key]
                arr[r, : len(v)] = v
        else:
            arr = np.stack([np.asarray(c[key]) for c in cells])
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if t.dtype == torch.float64:
            t = t.float()
        out[key] = t.to(device, non_blocking=True)
    if sequence_keys:
        mask = np.arange(width)[None, :] < lengths[:, None]
        out["attention_mask"] = torch.from_numpy(mask).to(device)
    return out


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def embed_cells(
    adapter: Adapter,
    cells: Sequence[dict[str, np.ndarray]],
    *,
    batch_size: int,
    token_budget: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    bucket: bool = True,
    pad_to: int | None = None,
) -> np.ndarray:
    """Embed tokenized cells; returns ``(n, dim)`` float32 in the input order.

    Batches are length-bucketed unless the adapter is not batch-invariant (then consecutive
    cells form a batch, in order). On CUDA out-of-memory the batch is halved and retried.
    ``bucket=False`` / ``pad_to`` give the naive paths (file order, fixed padding) for benches.
    """
    n = len(cells)
    out = np.empty((n, adapter.dim), dtype=np.float32)
    if n == 0:
        return out
    lengths = token_lengths(cells, adapter.sequence_keys)
    invariant = adapter.batch_invariant
    pending = plan_batches(lengths, batch_size=batch_size, token_budget=token_budget if invariant else None,
                           bucket=invariant and bucket)
    pending.reverse()
    while pending:
        idx = pending.pop()
        try:
            batch = collate([cells[i] for i in idx], sequence_keys=adapter.sequence_keys,
                            pad_values=dict(adapter.pad_values), device=adapter.device, pad_to=pad_to)
            with torch.inference_mode():
                emb = adapter.pool(adapter.forward(batch), batch)
            out[idx] = emb.detach().float().cpu().numpy()
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err) or len(idx) == 1 or not invariant:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(idx) // 2
            log.warning("out of memory on a batch of %d cells: retrying as %d + %d", len(idx), half, len(idx) - half)
            pending.extend([idx[half:], idx[:half]])
            continue
        if on_batch is not None:
            on_batch(len(idx))
    return out


def embed_matrix(
    adapter: Adapter,
    X: sp.spmatrix | np.ndarray,
    genes: GeneTable,
    cell_ids: Sequence[str],
    *,
    batch_size: int | None = None,
    token_budget: int | None = None,
    chunk_size: int = 1024,
) -> np.ndarray:
    """In-memory convenience: embed a cells x genes matrix with a loaded, prepared adapter."""
    X = sp.csr_matrix(X, dtype=np.float32)
    cell_ids = np.asarray(cell_ids, dtype=object)
    parts = []
    for s in range(0, X.shape[0], chunk_size):
        chunk = CellChunk(X=X[s:s + chunk_size], cell_ids=cell_ids[s:s + chunk_size], genes=genes, start=s)
        parts.append(embed_cells(adapter, adapter.tokenize(chunk), batch_size=batch_size or adapter.default_batch_size,
                                 token_budget=token_budget))
    return np.concatenate(parts) if parts else np.empty((0, adapter.dim), np.float32)


#: padded tokens per batch when the user sets none: attention scores grow with batch x length^2,
#: and on CPU large long-sequence batches are memory-bound (bench/bench_extract.py)
DEFAULT_TOKEN_BUDGET = {"cpu": 4096, "cuda": 65536}


def default_token_budget(device: torch.device) -> int:
    return DEFAULT_TOKEN_BUDGET.get(device.type, DEFAULT_TOKEN_BUDGET["cuda"])


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        from ._errors import ScdmError

        raise ScdmError("--device cuda was asked for but no CUDA GPU is visible", "use --device auto or --device cpu")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str, adapter: Adapter, device: torch.device) -> torch.dtype:
    """``auto`` -> the adapter's choice for the device (float32 on CPU)."""
    if dtype == "auto":
        return adapter.default_dtype(device)
    if dtype not in _DTYPES:
        from ._errors import ScdmError

        raise ScdmError(f"unknown dtype {dtype!r}", f"use one of: auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]
