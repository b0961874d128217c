"""The one Runner: tokenized cells -> batches -> forward -> pool, with or without gradients.

Extraction (:func:`scdm_embed.extract`), LoRA training and inference, and any prediction
path drive a model through this class, so batching is written once:

* length bucketing (batch-invariant models) and a padded-token budget per batch;
* collation: sequence keys right-padded with the adapter's pad values, a bool
  ``attention_mask`` (True on real tokens), fixed-shape keys stacked;
* CUDA out-of-memory back-off: a batch that does not fit is halved and retried (inference),
  or split into micro-batches whose gradients add up to the whole batch's (training);
* device placement and autocast.

Models whose cells attend to each other (``batch_invariant = False``, CellPLM) are never
re-sorted or split: the batch is part of what an embedding means.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from .errors import InputError, ScdmError
from .genes import GeneTable
from .models.base import Adapter, CellChunk

log = logging.getLogger(__name__)

#: padded tokens per batch when the user sets none: attention scores grow with batch x length^2,
#: and on CPU large long-sequence batches are memory-bound (bench/bench_extract.py)
DEFAULT_TOKEN_BUDGET = {"cpu": 4096, "cuda": 65536}

Cells = Sequence[dict[str, np.ndarray]]


def default_token_budget(device: torch.device) -> int:
    """Padded tokens per batch for ``device`` when the user sets none."""
    return DEFAULT_TOKEN_BUDGET.get(device.type, DEFAULT_TOKEN_BUDGET["cuda"])


def token_lengths(cells: Cells, sequence_keys: Sequence[str]) -> np.ndarray:
    """Token count per cell (1 for adapters without sequences)."""
    if not sequence_keys:
        return np.ones(len(cells), dtype=np.int64)
    k = sequence_keys[0]
    return np.fromiter((len(c[k]) for c in cells), dtype=np.int64, count=len(cells))


def plan_batches(lengths: np.ndarray, *, batch_size: int, token_budget: int | None = None,
                 bucket: bool = True) -> list[np.ndarray]:
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


def collate(cells: Cells, *, sequence_keys: Sequence[str], pad_values: dict[str, int | float],
            device: torch.device, pad_to: int | None = None,
            shared_keys: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Stack per-cell token dicts; pad sequence keys on the right; add ``attention_mask``.

    ``shared_keys`` hold the same array for every cell of a batch (e.g. the gene plan's
    vocabulary rows): passed once, not stacked; cells whose arrays differ are refused.
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
        elif key in shared_keys:
            if any(c[key] is not cells[0][key] and not np.array_equal(c[key], first) for c in cells[1:]):
                raise InputError(f"the cells of one batch carry different {key!r} (they come from different "
                                 "gene plans)", "embed the cells of one dataset (one prepare()) per batch")
            arr = first
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


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is an accelerator out-of-memory error."""
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


@dataclass
class Runner:
    """Drive one loaded adapter over tokenized cells.

    ``batch_size`` (default: the adapter's) caps cells per forward; ``token_budget`` caps
    padded tokens per batch (``None``: the device default, ``0``: no cap); ``autocast``
    runs the forward under ``torch.autocast`` in that dtype (e.g. bf16 LoRA training on CUDA).
    """

    adapter: Adapter
    batch_size: int | None = None
    token_budget: int | None = None
    autocast: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.batch_size is None:
            self.batch_size = self.adapter.default_batch_size
        if self.token_budget is None:
            self.token_budget = default_token_budget(self.device)
        elif self.token_budget == 0:
            self.token_budget = None

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    # -- batching ---------------------------------------------------------------------------
    def batches(self, cells: Cells, *, bucket: bool = True) -> list[np.ndarray]:
        """Positions of ``cells`` grouped into batches (bucketed, within the token budget)."""
        invariant = self.adapter.batch_invariant
        return plan_batches(token_lengths(cells, self.adapter.sequence_keys), batch_size=int(self.batch_size),
                            token_budget=self.token_budget if invariant else None, bucket=invariant and bucket)

    def collate(self, cells: Cells, *, pad_to: int | None = None) -> dict[str, torch.Tensor]:
        a = self.adapter
        return collate(cells, sequence_keys=a.sequence_keys, pad_values=dict(a.pad_values), device=self.device,
                       pad_to=pad_to, shared_keys=a.shared_keys)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def pooled(self, cells: Cells, *, grad: bool = False, pad_to: int | None = None) -> torch.Tensor:
        """``(len(cells), dim)`` float32 cell embeddings of ONE batch (gradients kept if ``grad``)."""
        batch = self.collate(cells, pad_to=pad_to)
        mode = contextlib.nullcontext() if grad else torch.inference_mode()
        with mode, self._autocast():
            return self.adapter.pool(self.adapter.forward(batch), batch).float()

    # -- inference --------------------------------------------------------------------------
    def embed(self, cells: Cells, *, on_batch: Callable[[int], None] | None = None, bucket: bool = True,
              pad_to: int | None = None) -> np.ndarray:
        """Embed tokenized cells; ``(n, dim)`` float32 in the input order.

        On CUDA out-of-memory a batch is halved and retried (batch-invariant models only).
        ``bucket=False`` / ``pad_to`` give the naive paths (file order, fixed padding) for benches.
        """
        n = len(cells)
        out = np.empty((n, self.adapter.dim), dtype=np.float32)
        if n == 0:
            return out
        pending = self.batches(cells, bucket=bucket)
        pending.reverse()
        while pending:
            idx = pending.pop()
            try:
                emb = self.pooled([cells[i] for i in idx], pad_to=pad_to)
                out[idx] = emb.detach().cpu().numpy()
            except (torch.OutOfMemoryError, RuntimeError) as err:
                halves = self._split_on_oom(err, idx)
                pending.extend(reversed(halves))
                continue
            if on_batch is not None:
                on_batch(len(idx))
        return out

    # -- training ---------------------------------------------------------------------------
    def backward(self, cells: Cells, loss_fn: Callable[[torch.Tensor, np.ndarray], torch.Tensor],
                 idx: np.ndarray | None = None) -> float:
        """Forward with gradients + ``backward()`` of ``loss_fn(pooled, positions)`` (a SUM over cells).

        ``positions`` index ``cells``. On CUDA out-of-memory the batch is split into
        micro-batches whose gradients add up to the whole batch's. Returns the summed loss.
        """
        pending = [np.arange(len(cells)) if idx is None else np.asarray(idx)]
        total = 0.0
        while pending:
            part = pending.pop()
            try:
                loss = loss_fn(self.pooled([cells[i] for i in part], grad=True), part)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the training loss of {self.adapter.name} is {loss.item()}")
                loss.backward()
                total += float(loss.detach())
            except (torch.OutOfMemoryError, RuntimeError) as err:
                pending.extend(self._split_on_oom(err, part))
        return total

    def _split_on_oom(self, err: BaseException, idx: np.ndarray) -> list[np.ndarray]:
        if not is_oom(err) or len(idx) == 1 or not self.adapter.batch_invariant:
            raise err
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(idx) // 2
        log.warning("out of memory on a batch of %d cells: retrying as %d + %d", len(idx), half, len(idx) - half)
        return [idx[:half], idx[half:]]



# -- functional shortcuts over the Runner -----------------------------------------------------
def embed_cells(adapter: Adapter, cells: Cells, *, batch_size: int, token_budget: int | None = None,
                on_batch: Callable[[int], None] | None = None, bucket: bool = True,
                pad_to: int | None = None) -> np.ndarray:
    """``Runner(adapter, batch_size, token_budget).embed(cells)`` (``token_budget=None``: no cap)."""
    runner = Runner(adapter, batch_size=batch_size, token_budget=token_budget or 0)
    return runner.embed(cells, on_batch=on_batch, bucket=bucket, pad_to=pad_to)


def embed_matrix(adapter: Adapter, X: sp.spmatrix | np.ndarray, genes: GeneTable, cell_ids: Sequence[str], *,
                 batch_size: int | None = None, token_budget: int | None = None,
                 chunk_size: int = 1024) -> np.ndarray:
    """In-memory convenience: embed a cells x genes matrix with a loaded adapter."""
    X = sp.csr_matrix(X, dtype=np.float32)
    cell_ids = np.asarray(cell_ids, dtype=object)
    runner = Runner(adapter, batch_size=batch_size, token_budget=token_budget or 0)
    plan = adapter.prepare(genes)
    parts = []
    for s in range(0, X.shape[0], chunk_size):
        chunk = CellChunk(X=X[s:s + chunk_size], cell_ids=cell_ids[s:s + chunk_size], genes=genes, start=s)
        parts.append(runner.embed(adapter.tokenize(chunk, plan)))
    return np.concatenate(parts) if parts else np.empty((0, adapter.dim), np.float32)


# -- device and dtype -------------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ScdmError("--device cuda was asked for but no CUDA GPU is visible", "use --device auto or --device cpu")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str, adapter: Adapter, device: torch.device) -> torch.dtype:
    """``auto`` -> the adapter's choice for the device (float32 on CPU)."""
    if dtype == "auto":
        return adapter.default_dtype(device)
    if dtype not in _DTYPES:
        raise ScdmError(f"unknown dtype {dtype!r}", f"use one of: auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


__all__ = ["DEFAULT_TOKEN_BUDGET", "Runner", "collate", "default_token_budget", "embed_cells", "embed_matrix",
           "is_oom", "plan_batches", "resolve_device", "resolve_dtype", "token_lengths"]
