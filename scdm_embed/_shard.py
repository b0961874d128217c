"""Sharded extraction: ``n`` processes embed disjoint chunks of one input into one store.

Shard ``i`` of ``n`` computes the row chunks ``c`` with ``c % n == i`` (a deterministic, disjoint
cover of the input, whatever the number of cells). Every shard checks and hashes the whole input,
and takes the store lock for metadata only: the first shard to hold it fits the reference (pca,
hvg), writes the cell table and creates the array; the others find them and resume into them.
Chunks are separate Zarr chunks and every done flag is a Zarr chunk of its own, so concurrent
writes never touch the same file. The shard that finds every flag set marks the array complete;
:func:`finalize` does the same afterwards (e.g. after a shard was lost).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import store as stores
from .errors import ScdmError, StoreError
from .store import EmbeddingStore


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (0-based) of ``count``: the chunks ``c`` with ``c % count == index``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        ok = (isinstance(self.index, (int, np.integer)) and isinstance(self.count, (int, np.integer))
              and self.count >= 1 and 0 <= self.index < self.count)
        if not ok:
            raise ScdmError(f"shard {self.index!r}/{self.count!r} does not exist: a shard is i/n with n >= 1 and "
                            "0 <= i < n", "pass --shard 0/4, 1/4, 2/4 and 3/4 to four processes (e.g. "
                            "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")

    def chunks(self, todo: list[int]) -> list[int]:
        """The chunks of ``todo`` that belong to this shard."""
        return [c for c in todo if c % self.count == self.index]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def as_shard(shard: Shard | tuple[int, int] | str | None) -> Shard | None:
    """``"1/4"``, ``(1, 4)`` or a :class:`Shard` as a Shard (``None`` stays None)."""
    if shard is None or isinstance(shard, Shard):
        return shard
    if isinstance(shard, str):
        parts = shard.strip().split("/")
        try:
            i, n = (int(p) for p in parts)
        except ValueError:
            raise ScdmError(f"--shard {shard!r} is not i/n", "write it like --shard 0/4 (shard 0 of 4)") from None
        return Shard(i, n)
    try:
        i, n = shard
    except (TypeError, ValueError):
        raise ScdmError(f"shard {shard!r} is not (index, count)", "pass shard=(0, 4) or shard='0/4'") from None
    return Shard(i, n)


@dataclass(frozen=True)
class FinalizeResult:
    """What :func:`finalize` found: ``status`` "completed" or "already-complete"."""

    model: str
    dataset: str
    store: Path
    status: str
    n_chunks: int


def missing_chunks(st: EmbeddingStore, model: str, dataset: str) -> list[int]:
    """The chunk indices of ``model``/``dataset`` not flagged done."""
    return [int(c) for c in np.flatnonzero(~st.done_flags(model, dataset))]


def _describe(chunks: list[int], limit: int = 20) -> str:
    shown = ", ".join(map(str, chunks[:limit]))
    return shown + (f", ... ({len(chunks)} in all)" if len(chunks) > limit else "")


def finalize(store: str | Path, *, model: str, dataset: str) -> FinalizeResult:
    """Mark ``model``/``dataset`` complete once every chunk is done (after sharded extraction).

    Refuses (:class:`StoreError` listing them) while chunks are missing: re-run the shards that
    own them (chunk ``c`` belongs to shard ``c % n``).
    """
    stores.check_store_path(store)
    path = Path(store)
    ro = EmbeddingStore(path, mode="r")
    if ro.embedding_group(model, dataset) is None:
        have = sorted(f"{e.model}/{e.dataset}" for e in ro.entries())
        raise StoreError(f"the store {str(path)!r} has no array {model}/{dataset} (has: {', '.join(have) or 'none'})",
                         "check --model and --dataset, or run `scdm-embed extract ... --shard i/n` first")
    with stores.store_lock(path) as lock:
        st = EmbeddingStore(path, mode="a" if lock.writable else "r")
        n_chunks = len(st.done_flags(model, dataset))
        if st.embedding_group(model, dataset).attrs.get("complete"):
            return FinalizeResult(model, dataset, path, "already-complete", n_chunks)
        missing = missing_chunks(st, model, dataset)
        if missing:
            raise StoreError(f"{model}/{dataset} is not finished: {len(missing)} of {n_chunks} chunks are missing "
                             f"(chunks {_describe(missing)})",
                             "re-run the shards that own them (chunk c belongs to shard c % n; each resumes "
                             "where it stopped), then finalize again")
        if not lock.writable:
            raise StoreError(f"the store {str(path)!r} is not writable", "make it writable, then finalize again")
        st.finish_embedding(model, dataset)
        lock.keep()
    return FinalizeResult(model, dataset, path, "completed", n_chunks)
