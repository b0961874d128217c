"""The adapter protocol: tokenize -> forward -> pool.

An adapter says only how ONE model turns cells into embeddings. Everything models share
(reading chunks, length bucketing, token-budget batching, padding + attention masks,
device and dtype, OOM back-off, resume, writing, telemetry) lives in
:mod:`scdm_embed._engine`.

Life cycle, driven by the engine::

    a = Adapter(checkpoint=path, **options)   # cheap: no weights read yet
    a.load(device=..., dtype=...)             # read the official checkpoint (strictly)
    overlap = a.prepare(genes)                # align the dataset's genes to the vocabulary, once
    for each chunk of cells:
        cells = a.tokenize(chunk)             # list of per-cell dicts of numpy arrays
        for each batch (engine-collated, padded, with "attention_mask"):
            out = a.forward(batch)            # torch, under inference_mode
            emb = a.pool(out, batch)          # (B, dim)

Per-cell token dicts: keys listed in ``sequence_keys`` hold 1-D arrays of the cell's token
length (the engine pads them with ``pad_values[key]`` and adds a bool ``attention_mask``,
True on real tokens); every other key holds a fixed-shape array and is stacked.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch

from .._errors import CheckpointError
from .._genes import GeneTable
from ._options import Option, resolve_options


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
    def prepare(self, genes: GeneTable) -> GeneOverlap:
        """Align a dataset's genes to the model's vocabulary; called once per dataset."""

    # -- per chunk / batch ----------------------------------------------------------------
    @abstractmethod
    def tokenize(self, chunk: CellChunk) -> list[dict[str, np.ndarray]]:
        """Turn a chunk of cells into per-cell token dicts (no padding)."""

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
            raise RuntimeError(f"{self.name}: call load() first")
        return int(d)

    def settings(self) -> dict[str, Any]:
        """Tokenizer/preprocessing/pooling settings recorded as provenance (JSON-able)."""
        return {}

    def checkpoint_hash(self) -> str:
        """Content hash of the checkpoint directory (all files, sorted by relative path)."""
        return hash_path(self.checkpoint) if self.checkpoint is not None else "none"

    def torch_module(self) -> torch.nn.Module | None:
        """The underlying ``nn.Module`` (for LoRA); ``None`` for non-neural adapters."""
        return getattr(self, "model", None)


def hash_path(path: Path | None, *, block: int = 1 << 20) -> str:
    """sha256 over every file below ``path`` (relative names + bytes)."""
    if path is None:
        return "none"
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        _update_from_file(h, f, block)
    return "sha256:" + h.hexdigest()


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
