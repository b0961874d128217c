"""The adapter protocol: tokenize -> forward -> pool.

An adapter says only how ONE model turns cells into embeddings. Everything models share
(reading chunks, length bucketing, token-budget batching, padding + attention masks,
device and dtype, OOM back-off, resume, writing, telemetry) lives in
:mod:`scdm_embed._engine`.

Life cycle, driven by the engine and :class:`scdm_embed.runner.Runner`::

    a = Adapter(checkpoint=path, **options)   # cheap: options typed and checked, no weights read
    a.load(device=..., dtype=...)             # read the official checkpoint (strictly)
    plan = a.prepare(genes)                   # immutable GenePlan: the dataset's genes vs the vocabulary
    for each chunk of cells:
        cells = a.tokenize(chunk, plan)       # list of per-cell dicts of numpy arrays
        for each batch (Runner-collated, padded, with "attention_mask"):
            out = a.forward(batch)            # torch; under inference_mode unless training
            emb = a.pool(out, batch)          # (B, dim)

An adapter holds no per-dataset state: everything ``prepare`` learns about a dataset's genes
is in the returned :class:`GenePlan`, so one loaded adapter serves any number of datasets.
Adapters that fit coordinates on data (pca, hvg) say so with ``requires_reference`` and
implement :meth:`Adapter.fit_reference` / :meth:`Adapter.set_reference`.

Per-cell token dicts: keys listed in ``sequence_keys`` hold 1-D arrays of the cell's token
length (the engine pads them with ``pad_values[key]`` and adds a bool ``attention_mask``,
True on real tokens); every other key holds a fixed-shape array and is stacked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import types
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import CheckpointError
from ..genes import GeneTable
from ..locations import cache_dir
from .options import Option, resolve_options


@dataclass(frozen=True)
class CellChunk:
    """A block of cells handed to :meth:`Adapter.tokenize`.

    ``X`` is float32 CSR of the values as stored (raw counts for count models), in the
    dataset's gene order (``genes``). ``cell_ids`` are the obs names (for per-cell seeds).
    ``n_counts`` is the input's ``obs["n_counts"]`` for these cells when it has that column
    (float64; ``None`` otherwise): Geneformer's original tokenizer takes the cell total from it.
    """

    X: sp.csr_matrix
    cell_ids: np.ndarray
    genes: GeneTable
    start: int = 0
    n_counts: np.ndarray | None = None


@dataclass(frozen=True)
class GeneOverlap:
    """How a dataset's genes meet a model's vocabulary (recorded in the store)."""

    n_vocab: int  #: genes in the model's vocabulary
    n_vocab_in_data: int  #: vocabulary genes present in the dataset
    n_data: int  #: genes in the dataset
    n_data_used: int  #: dataset genes the model uses
    #: model-specific notes on how the genes were resolved (e.g. ids given vs looked up by symbol)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def n_data_ignored(self) -> int:
        return self.n_data - self.n_data_used

    @property
    def fraction_used(self) -> float:
        """Share of the dataset's genes the model uses."""
        return self.n_data_used / max(self.n_data, 1)

    @property
    def fraction_vocab(self) -> float:
        """Share of the model's vocabulary found in the dataset."""
        return self.n_vocab_in_data / max(self.n_vocab, 1)

    @property
    def coverage(self) -> float:
        """The larger of the two shares: near zero only when identifiers or species do not match."""
        return max(self.fraction_used, self.fraction_vocab)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not d["details"]:
            del d["details"]  # only models that resolve genes in several ways report them
        d["n_data_ignored"] = self.n_data_ignored
        d["fraction_used"] = round(self.fraction_used, 4)
        d["fraction_vocab"] = round(self.fraction_vocab, 4)
        return d


@dataclass(frozen=True)
class GenePlan:
    """How one dataset's genes meet one model's vocabulary, made once by :meth:`Adapter.prepare`.

    Immutable: arrays are read-only and ``data`` is a read-only mapping, so a plan can be
    shared by threads, processes (pickled) and training loops without copying the adapter.
    ``columns`` are the dataset's gene columns the model uses and ``vocab_ids`` the model's
    vocabulary id of each (``-1`` where a model has no integer vocabulary); ``data`` holds
    anything else the adapter's tokenizer needs (e.g. per-gene medians, a summing matrix).
    """

    overlap: GeneOverlap
    columns: np.ndarray
    vocab_ids: np.ndarray
    data: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("columns", "vocab_ids"):
            arr = np.array(getattr(self, name), dtype=np.int64)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        frozen = {}
        for k, v in dict(self.data).items():
            if isinstance(v, np.ndarray):
                v = v.copy()
                v.setflags(write=False)
            elif sp.issparse(v):
                v = v.copy()
                for part in ("data", "indices", "indptr"):
                    if hasattr(v, part):
                        getattr(v, part).setflags(write=False)
            elif isinstance(v, (list, dict, set)):
                raise TypeError(f"GenePlan.data[{k!r}] is a mutable {type(v).__name__}: use a tuple, "
                                "a frozenset, a read-only mapping or a numpy array")
            frozen[k] = v
        object.__setattr__(self, "data", types.MappingProxyType(frozen))

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __reduce__(self):  # MappingProxyType does not pickle: rebuild from a plain dict
        return (GenePlan, (self.overlap, np.array(self.columns), np.array(self.vocab_ids), dict(self.data)))


class Adapter(ABC):
    """One model: subclass, set the class attributes, implement the methods, register it."""

    #: registry name (``--model NAME``)
    name: ClassVar[str]
    #: adapter version; bump when tokenization/pooling changes so stores go stale
    version: ClassVar[str] = "1"
    #: one-line description for ``scdm-embed list-models``
    description: ClassVar[str] = ""
    #: what the checkpoint directory must hold (``None`` = no checkpoint)
    checkpoint_layout: ClassVar[str | None] = None
    #: whether the model needs raw integer counts as input
    needs_counts: ClassVar[bool] = True
    #: keys of per-cell token dicts that are sequences (padded by the engine)
    sequence_keys: ClassVar[tuple[str, ...]] = ()
    #: padding value per sequence key (default 0)
    pad_values: ClassVar[Mapping[str, int | float]] = {}
    #: keys of per-cell token dicts that are the same array for every cell of a dataset (e.g.
    #: the plan's vocabulary rows): the Runner passes them once per batch instead of stacking
    shared_keys: ClassVar[tuple[str, ...]] = ()
    #: False when cells attend to each other (CellPLM): the engine then forms batches
    #: from consecutive cells in file order and never re-sorts them
    batch_invariant: ClassVar[bool] = True
    #: default cells per forward (the engine also respects ``token_budget``)
    default_batch_size: ClassVar[int] = 32
    #: module-name suffixes a LoRA adapter wraps (each a real module call on the forward path)
    lora_targets: ClassVar[tuple[str, ...]] = ()
    #: True when the model takes a ``--gene-key`` column with repeated ids as separate genes (as
    #: Geneformer V1's tokenizer does); ``var_names`` must be unique for every model
    allows_duplicate_genes: ClassVar[bool] = False
    #: the model's options (``--option KEY=VALUE``), declared once; see :mod:`._options`
    options_spec: ClassVar[tuple[Option, ...]] = ()
    #: True when the adapter fits coordinates on data instead of reading a checkpoint (pca,
    #: hvg): the engine attaches the store's fitted reference (or fits one) before ``prepare``
    requires_reference: ClassVar[bool] = False

    def __init__(self, checkpoint: str | Path | None = None, *, trust_checkpoint: bool = False,
                 **options: Any) -> None:
        # options first: a mistyped option is refused before any file is looked at
        self.options: dict[str, Any] = resolve_options(self.name, self.options_spec, options)
        self.trust_checkpoint = bool(trust_checkpoint)
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        if self.checkpoint_layout is not None:
            if self.checkpoint is None:
                raise CheckpointError(f"model {self.name!r} needs a checkpoint directory",
                                      f"pass --checkpoint DIR holding {self.checkpoint_layout}")
            if not self.checkpoint.exists():
                raise CheckpointError(f"checkpoint {str(self.checkpoint)!r} does not exist",
                                      f"pass --checkpoint DIR holding {self.checkpoint_layout}")

    # -- set-up ---------------------------------------------------------------------------
    def default_dtype(self, device: torch.device) -> torch.dtype:
        """dtype used when the user says ``--dtype auto``."""
        return torch.float32

    @abstractmethod
    def load(self, *, device: torch.device, dtype: torch.dtype) -> None:
        """Read the checkpoint (strictly: every key used, none missing) onto ``device``."""

    @abstractmethod
    def prepare(self, genes: GeneTable) -> GenePlan:
        """Align a dataset's genes to the model's vocabulary, once per dataset (no state kept)."""

    # -- fitted references (``requires_reference`` adapters only) -------------------------
    @property
    def reference_name(self) -> str:
        """Name of the store's ``references/<name>`` group this adapter's fit lives in."""
        return self.name

    def fit_reference(self, data: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Fit the adapter's coordinates on ``data`` (an InputDataset; labels never read)."""
        raise NotImplementedError(f"{self.name} does not fit a reference")

    def set_reference(self, arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any]) -> None:
        """Use a reference fitted earlier (read from the store)."""
        raise NotImplementedError(f"{self.name} does not fit a reference")

    # -- per chunk / batch ----------------------------------------------------------------
    @abstractmethod
    def tokenize(self, chunk: CellChunk, plan: GenePlan) -> list[dict[str, np.ndarray]]:
        """Turn a chunk of cells into per-cell token dicts (no padding), following ``plan``."""

    @abstractmethod
    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        """Run the model on an engine-collated batch (tensors on ``self.device``)."""

    @abstractmethod
    def pool(self, output: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Reduce the forward output to one ``(B, dim)`` embedding per cell."""

    # -- description ----------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Embedding width (valid after :meth:`load`); by default ``self._dim`` set by ``load``."""
        d = getattr(self, "_dim", None)
        if d is None:
            self.require_loaded("dim")
        return int(d)

    def require_loaded(self, what: str) -> None:
        """The one "load() not called" error (a programming error, not a user error)."""
        if getattr(self, "_dim", None) is None:
            raise RuntimeError(f"{self.name}: call load() before {what}")

    def settings(self) -> dict[str, Any]:
        """Tokenizer/preprocessing/pooling settings recorded as provenance (JSON-able)."""
        return {}

    def checkpoint_hash(self) -> str:
        """Content hash of the checkpoint directory (all files, sorted by relative path)."""
        return hash_path(self.checkpoint) if self.checkpoint is not None else "none"

    def torch_module(self) -> torch.nn.Module | None:
        """The underlying ``nn.Module`` (for LoRA); ``None`` for non-neural adapters."""
        return getattr(self, "model", None)


#: a file modified less than this many seconds before it is hashed is hashed but not cached:
#: an edit within the same mtime tick could otherwise go unseen (git's "racy" entries)
HASH_CACHE_RACY_S = 2.0
#: most checkpoints remembered in the hash cache (the oldest entries are dropped)
HASH_CACHE_MAX_ENTRIES = 256
_HASH_CACHE_FORMAT = 1


def hash_cache_file() -> Path:
    """The checkpoint-hash cache: ``checkpoint-hashes.json`` in :func:`scdm_embed.locations.cache_dir`."""
    return cache_dir() / "checkpoint-hashes.json"


def hash_path(path: Path | None, *, block: int = 1 << 20, cache: bool = True) -> str:
    """sha256 over every file below ``path`` (relative names + bytes), as ``"sha256:<hex>"``.

    With ``cache`` the result is remembered in :func:`hash_cache_file`, keyed by the absolute
    path and every file's (relative name, size, mtime_ns): a later call with all of them
    unchanged reads no file bytes (the whole 490 MB tGPT checkpoint was hashed on every
    extraction). Any changed, added or removed file means a full re-hash; an unreadable or
    corrupt cache is ignored, and a cache that cannot be written is skipped silently.
    """
    if path is None:
        return "none"
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    names = [f.name if path.is_file() else str(f.relative_to(path)) for f in files]
    if not cache:
        return _hash_files(files, names, block)
    stats = [f.stat() for f in files]
    stamp = [[n, st.st_size, st.st_mtime_ns] for n, st in zip(names, stats, strict=True)]
    key = str(path.resolve())
    entries = _read_hash_cache()
    hit = entries.get(key)
    if isinstance(hit, dict) and hit.get("files") == stamp and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    digest = _hash_files(files, names, block)
    newest = max((st.st_mtime_ns for st in stats), default=0)
    if time.time_ns() - newest >= HASH_CACHE_RACY_S * 1e9:
        entries.pop(key, None)
        entries[key] = {"files": stamp, "sha256": digest}
        _write_hash_cache(dict(list(entries.items())[-HASH_CACHE_MAX_ENTRIES:]))
    return digest


def _hash_files(files: list[Path], names: list[str], block: int) -> str:
    h = hashlib.sha256()
    for f, n in zip(files, names, strict=True):
        h.update(n.encode())
        _update_from_file(h, f, block)
    return "sha256:" + h.hexdigest()


def _read_hash_cache() -> dict[str, Any]:
    """The cache's entries; ``{}`` when it is missing, unreadable or not in the expected shape."""
    try:
        doc = json.loads(hash_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("format") != _HASH_CACHE_FORMAT or not isinstance(doc.get("entries"), dict):
        return {}
    return doc["entries"]


def _write_hash_cache(entries: dict[str, Any]) -> None:
    """Replace the cache atomically (temporary file + rename); give up quietly on any OS error."""
    target = hash_cache_file()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"format": _HASH_CACHE_FORMAT, "entries": entries}))
        os.replace(tmp, target)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def sha256_file(path: Path, *, block: int = 1 << 20) -> str:
    """Hex sha256 of one file's bytes (read in blocks; no ``sha256:`` prefix)."""
    return _update_from_file(hashlib.sha256(), path, block).hexdigest()


def _update_from_file(h: Any, path: Path, block: int) -> Any:
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h


# -- pooling shared by the adapters ----------------------------------------------------------
def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens: ``hidden`` (B, L, D), ``mask`` (B, L) bool/0-1. Float32 out."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return ((hidden * m).sum(1) / m.sum(1).clamp_min(1)).float()


def masked_max(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over real tokens (pads excluded). Float32 out."""
    fill = torch.finfo(hidden.dtype).min
    return hidden.masked_fill(~mask.bool().unsqueeze(-1), fill).amax(1).float()


def first_token(hidden: torch.Tensor) -> torch.Tensor:
    """The first position (``<cls>``). Float32 out."""
    return hidden[:, 0].float()


def cell_seed(cell_id: str, seed: int) -> int:
    """A stable per-cell seed: same cell + same global seed -> same sampling, in any batch."""
    d = hashlib.blake2b(f"{seed}\0{cell_id}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") & 0x7FFF_FFFF_FFFF_FFFF
