"""The Performer adapter plumbing scBERT and CellLM share: checkpoint mapping, genes, values.

The torch modules live in :mod:`scdm_embed.models.nn.performer`.

The modules use the ORIGINAL ``state_dict`` names of ``performer_pytorch`` (as vendored by
github:TencentAILabHealthcare/scBERT@262fd4b9 and copied into github:PharMolix/OpenBioMed), so
official checkpoints load strictly (:func:`._checkpoint.load_strict`)::

    token_emb.weight                                           (num_tokens, dim)
    pos_emb.emb.weight                                         (n_positions, dim), frozen
    performer.calls_since_last_redraw                          int64 scalar (kept, unused)
    performer.net.layers.<i>.0.norm.{weight,bias}              pre-attention LayerNorm
    performer.net.layers.<i>.0.fn.fast_attention.projection_matrix   (nb_features, dim_head)
    performer.net.layers.<i>.0.fn.{to_q,to_k,to_v}.weight      (heads*dim_head, dim)
    performer.net.layers.<i>.0.fn.to_out.{weight,bias}         (dim, heads*dim_head)
    performer.net.layers.<i>.1.norm.{weight,bias}              pre-FF LayerNorm
    performer.net.layers.<i>.1.fn.fn.{w1,w2}.{weight,bias}     FeedForward inside Chunk
    norm.{weight,bias}                                         final LayerNorm
    to_out.{weight,bias}                                       MLM head (recognised, not built)

The architecture (dim, depth, heads, dim_head, nb_features, feed-forward width, qkv bias) is
read from the tensor shapes. The LM head ``to_out`` is checked and then left out of the
module: it is not on the embedding path, and a top-level module called ``to_out`` would
otherwise be caught by LoRA ``target_modules=["to_out"]`` without ever receiving a gradient.

The choices of the attention itself (per-cell key stabiliser, weighted keys) are described in
:mod:`scdm_embed.models.nn.performer`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import CheckpointError, InputError
from ..genes import GeneTable, looks_like_ensembl, strip_version
from ._checkpoint import load_strict
from ._safe_load import read_npy, torch_load
from .base import Adapter, CellChunk, GeneOverlap, GenePlan, sha256_file
from .nn.performer import PerformerConfig, PerformerEncoder
from .options import Option, greater_than

log = logging.getLogger(__name__)

# -- checkpoints ------------------------------------------------------------------------------
_LAYER_RE = re.compile(r"^performer\.net\.layers\.(\d+)\.")
#: task heads of ``PerformerLM`` recognised (and not loaded): the pre-training MLM head and
#: scBERT's fine-tuning classifier (``finetune.py``'s ``Identity``)
HEAD_LAYOUTS: dict[str, frozenset[str]] = {
    "mlm": frozenset({"to_out.weight", "to_out.bias"}),
    "scbert_finetune": frozenset(f"to_out.{m}.{p}" for m in ("conv1", "fc1", "fc2", "fc3")
                                 for p in ("weight", "bias")),
}


def read_state_dict(path: Path, *, trust: bool = False) -> dict[str, torch.Tensor]:
    """The ``model_state_dict`` of a ``torch.save``d training checkpoint (or a bare state
    dict); a uniform DDP ``module.`` prefix is removed. Read with ``weights_only=True`` unless
    ``trust`` (``--trust-checkpoint``)."""
    raw = torch_load(path, trust=trust, what="the Performer checkpoint")
    if isinstance(raw, Mapping) and "model_state_dict" in raw:
        raw = raw["model_state_dict"]
    if not isinstance(raw, Mapping) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        found = sorted(raw)[:8] if isinstance(raw, Mapping) else type(raw).__name__
        raise CheckpointError(f"{str(path)!r} holds no 'model_state_dict' of tensors (found: {found})",
                              "pass the checkpoint saved by the original training script "
                              "({'model_state_dict': ..., ...})")
    state = {str(k): v for k, v in raw.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _need(state: Mapping[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{str(path)!r} lacks {key!r}: not a PerformerLM checkpoint",
                              "pass the official checkpoint (its 'model_state_dict')")
    return state[key]


def infer_config(state: Mapping[str, torch.Tensor], path: Path) -> PerformerConfig:
    """Read the architecture from the tensor shapes of a ``PerformerLM`` state dict."""
    num_tokens, dim = _need(state, "token_emb.weight", path).shape
    n_positions = _need(state, "pos_emb.emb.weight", path).shape[0]
    layers = sorted({int(m.group(1)) for k in state if (m := _LAYER_RE.match(k))})
    if not layers or layers != list(range(len(layers))):
        raise CheckpointError(f"{str(path)!r}: performer layers {layers[:10]} are not 0..depth-1",
                              "pass the official checkpoint")
    pre = "performer.net.layers.0."
    nb_features, dim_head = _need(state, pre + "0.fn.fast_attention.projection_matrix", path).shape
    inner = _need(state, pre + "0.fn.to_q.weight", path).shape[0]
    ff_hidden = _need(state, pre + "1.fn.fn.w1.weight", path).shape[0]
    if inner % dim_head:
        raise CheckpointError(f"{str(path)!r}: to_q width {inner} is not a multiple of dim_head {dim_head}",
                              "pass the official checkpoint")
    return PerformerConfig(num_tokens=int(num_tokens), n_positions=int(n_positions), dim=int(dim),
                           depth=len(layers), heads=inner // dim_head, dim_head=int(dim_head),
                           nb_features=int(nb_features), ff_hidden=int(ff_hidden),
                           qkv_bias=pre + "0.fn.to_q.bias" in state)


def build_encoder(state: Mapping[str, torch.Tensor], path: Path, *, model: str) -> tuple[PerformerEncoder, str]:
    """Build the encoder and load ``state`` strictly; returns it and the head layout found.

    Every key must be either an encoder key or belong to exactly one known head layout;
    every encoder key must be present with the right shape.
    """
    cfg = infer_config(state, path)
    enc = PerformerEncoder(cfg)
    head_keys = {k for k in state if k == "to_out" or k.startswith("to_out.")}
    layout = next((name for name, keys in HEAD_LAYOUTS.items() if head_keys == keys), None)
    missing: list[str] = []
    unknown: list[str] = []
    if layout is None:  # report against the closest known head layout
        closest = max(HEAD_LAYOUTS.values(), key=lambda keys: len(keys & head_keys))
        unknown, missing = sorted(head_keys - closest), sorted(closest - head_keys)
    bad = []
    if layout == "mlm" and tuple(state["to_out.weight"].shape) != (cfg.num_tokens, cfg.dim):
        bad.append(f"to_out.weight: {tuple(state['to_out.weight'].shape)} vs {(cfg.num_tokens, cfg.dim)}")
    load_strict(enc, {k: v for k, v in state.items() if k not in head_keys},
                what=f"{str(path)!r} does not match the {model} PerformerLM layout",
                fix=f"pass the official {model} checkpoint, unmodified",
                extra_missing=missing, extra_unexpected=unknown, extra_shapes=bad)
    return enc, layout


# -- genes and values -------------------------------------------------------------------------
_HEADER_NAMES = {"gene", "genes", "gene_name", "gene_names", "gene_symbol", "symbol", "symbols",
                 "feature_name", "gene_id", "gene_ids", "ensembl_id", "var_names", "index", ""}


def read_gene_list(path: Path) -> np.ndarray:
    """Genes in model order from an ``.h5ad`` (its ``var_names``, as the original takes them
    from ``panglao_10000.h5ad``), or a text/csv/tsv file (one gene a line, or a column named
    like ``gene_name``/``symbol``/``gene``; otherwise the first column, no header)."""
    if not path.is_file():
        raise CheckpointError(f"gene list {str(path)!r} does not exist",
                              "pass gene_list=PATH (a .txt/.csv/.tsv gene list or the h5ad whose var_names "
                              "are the model's gene order)")
    if path.suffix == ".h5ad":
        import anndata as ad

        try:
            adata = ad.read_h5ad(path, backed="r")
            genes = np.array([str(g) for g in adata.var_names], dtype=object)
            adata.file.close()
        except Exception as err:  # anndata raises many types on a damaged file
            raise CheckpointError(f"gene list {str(path)!r} is not a readable h5ad ({err})",
                                  "pass the h5ad whose var_names are the model's gene order") from err
        return genes
    lines = [ln.rstrip("\r\n") for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        raise CheckpointError(f"gene list {str(path)!r} is empty", "pass the model's gene list")
    sep = "\t" if "\t" in lines[0] else ("," if "," in lines[0] else None)
    rows = [[f.strip().strip('"') for f in (ln.split(sep) if sep else [ln])] for ln in lines]
    header = [f.lower() for f in rows[0]]
    col = 0
    if any(h in _HEADER_NAMES for h in header):
        names = ("gene_name", "gene_symbol", "symbol", "feature_name", "gene", "genes", "gene_names",
                 "symbols", "gene_id", "gene_ids", "ensembl_id", "var_names")
        col = next((header.index(n) for n in names if n in header), 0)
        rows = rows[1:]
    return np.array([r[col] if col < len(r) else "" for r in rows], dtype=object)


def align_genes(model_genes: np.ndarray, genes: GeneTable) -> tuple[np.ndarray, GeneOverlap]:
    """For each model gene, the dataset column holding it (``-1`` if absent); matched by exact
    symbol (by Ensembl id when the model's list is Ensembl), first duplicate wins (as the
    original's ``obj.index(gene)``)."""
    ensembl = looks_like_ensembl(model_genes)
    keys = strip_version(model_genes) if ensembl else model_genes
    data = genes.ensembl if ensembl else genes.symbols
    first: dict[str, int] = {}
    for i, g in enumerate(data):
        g = str(g)
        if g and g not in first:
            first[g] = i
    src = np.array([first.get(str(g), -1) for g in keys], dtype=np.int64)
    used = np.unique(src[src >= 0])
    return src, GeneOverlap(n_vocab=len(model_genes), n_vocab_in_data=int((src >= 0).sum()),
                            n_data=len(genes), n_data_used=len(used))


def selection_matrix(src: np.ndarray, n_data: int) -> sp.csr_matrix:
    """``S`` (n_data, n_model) with ``X @ S`` = the dataset laid out on the model's gene axis."""
    cols = np.flatnonzero(src >= 0)
    return sp.csr_matrix((np.ones(len(cols), dtype=np.float32), (src[cols], cols)),
                         shape=(n_data, len(src)))


def log_normalize(X: sp.csr_matrix, *, target_sum: float, log_base: float | None) -> sp.csr_matrix:
    """``sc.pp.normalize_total(target_sum)`` then ``sc.pp.log1p(base=log_base)``, in float32
    as scanpy computes them on a float32 matrix (cells with no counts stay zero)."""
    X = sp.csr_matrix(X, dtype=np.float32, copy=True)
    X.sort_indices()
    total = np.asarray(X.sum(axis=1), dtype=np.float32).ravel()
    scale = total / np.float32(target_sum)
    scale[scale == 0] = 1.0
    X.data = X.data / np.repeat(scale, np.diff(X.indptr))
    X.data = np.log1p(X.data)
    if log_base is not None:
        X.data = (X.data.astype(np.float64) / np.log(log_base)).astype(np.float32)
    return X


def bin_values(values: np.ndarray, max_bin: int) -> np.ndarray:
    """``v[v > max_bin] = max_bin; v.long()``: clip, then truncate to an integer bin."""
    return np.trunc(np.minimum(values, np.float32(max_bin))).astype(np.int64)


# -- the shared adapter -----------------------------------------------------------------------
class PerformerAdapter(Adapter):
    """What scBERT and CellLM share: checkpoint + gene list files, strict loading, gene
    alignment by identity, ``normalize_total`` + ``log1p`` on the model's gene axis.

    Subclasses set the class attributes below and implement tokenize/forward/pool.
    """

    #: checkpoint file names looked for in the checkpoint folder, in order
    checkpoint_names: ClassVar[tuple[str, ...]] = ()
    #: gene2vec file (optional, cross-checked against the checkpoint's ``pos_emb``)
    gene2vec_name: ClassVar[str] = ""
    #: gene-list files looked for in the checkpoint folder, in order
    gene_list_names: ClassVar[tuple[str, ...]] = ("genes.txt", "genes.csv", "genes.tsv")
    #: extra gene2vec rows after the genes (scBERT: 1 zero row; CellLM: CLS + PAD rows)
    n_extra_positions: ClassVar[int] = 1
    #: module-name suffixes of the projections (for LoRA ``target_modules``)
    lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v")  # the paper's (scBERT / CellLM)
    #: options every Performer adapter accepts (subclasses add theirs)
    options_spec: ClassVar[tuple[Option, ...]] = (
        Option("gene_list", Path, None, "the model's genes in model order (text/csv, or an h5ad whose var_names "
               "define them); default: genes.txt beside the checkpoint"),
        Option("checkpoint_file", Path, None, "checkpoint file name in the checkpoint folder (or an absolute "
               "path); default: the official name, else the only *.pth/*.pt/*.ckpt"),
        Option("gene2vec", Path, None, "gene2vec .npy, only cross-checked against the checkpoint's pos_emb; "
               "default: the official file beside the checkpoint, when present"),
        Option("target_sum", float, 1e4, "normalize_total target over the model's genes (preprocess.py)",
               check=greater_than(0)),
        Option("log_base", float, 2.0, "log1p base (preprocess.py passes 2); e for the natural log",
               check=greater_than(1), aliases={"e": None}),
    )

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        super().__init__(checkpoint, **options)
        self.target_sum: float = self.options["target_sum"]
        self.log_base: float | None = self.options["log_base"]
        self.model: PerformerEncoder | None = None
        self.head_layout = ""
        self._ckpt_path: Path | None = None
        self._gene_list_path: Path | None = None
        self._model_genes: np.ndarray | None = None
        self._gene2vec_checked = False

    # -- files ------------------------------------------------------------------------------
    def _ckpt_file(self) -> Path:
        assert self.checkpoint is not None
        if self.checkpoint.is_file():
            return self.checkpoint
        given = self.options["checkpoint_file"]
        if given is not None:
            path = Path(given) if Path(given).is_absolute() else self.checkpoint / given
            if not path.is_file():
                raise CheckpointError(f"checkpoint_file {str(path)!r} does not exist",
                                      f"pass checkpoint_file=NAME of a file in {str(self.checkpoint)!r}")
            return path
        for name in self.checkpoint_names:
            if (self.checkpoint / name).is_file():
                return self.checkpoint / name
        found = sorted(p for ext in ("*.pth", "*.pt", "*.ckpt") for p in self.checkpoint.glob(ext))
        if len(found) == 1:
            return found[0]
        raise CheckpointError(
            f"no single {self.name} checkpoint in {str(self.checkpoint)!r} "
            f"(looked for {', '.join(self.checkpoint_names)}; found {[p.name for p in found]})",
            f"pass --checkpoint DIR holding {self.checkpoint_layout}, or checkpoint_file=NAME")

    def _ckpt_dir(self) -> Path:
        return self._ckpt_file().parent

    def _gene_list_file(self) -> Path:
        given = self.options["gene_list"]
        if given is not None:
            return Path(given)
        folder = self._ckpt_dir()
        for name in self.gene_list_names:
            if (folder / name).is_file():
                return folder / name
        raise CheckpointError(
            f"{self.name}: the model's gene list was not found in {str(folder)!r} "
            f"(looked for {', '.join(self.gene_list_names)})",
            "pass gene_list=PATH: a text/csv file with the model's genes in model order, or the "
            "h5ad whose var_names define it (the original takes them from its reference h5ad)")

    def model_genes(self) -> np.ndarray:
        """The model's gene axis (read once)."""
        if self._model_genes is None:
            path = self._gene_list_file()
            genes = read_gene_list(path)
            if any(not g for g in genes):
                raise CheckpointError(f"gene list {str(path)!r} has empty entries", "pass one gene name per row")
            self._model_genes, self._gene_list_path = genes, path
        return self._model_genes

    # -- set-up -----------------------------------------------------------------------------
    def load(self, *, device: torch.device, dtype: torch.dtype) -> None:
        """Read the checkpoint strictly, check it against the gene list (and gene2vec file)."""
        path = self._ckpt_file()
        state = read_state_dict(path, trust=self.trust_checkpoint)
        enc, self.head_layout = build_encoder(state, path, model=self.name)
        n_genes = enc.config.n_positions - self.n_extra_positions
        genes = self.model_genes()
        if len(genes) != n_genes:
            raise CheckpointError(
                f"the gene list {str(self._gene_list_path)!r} has {len(genes)} genes but the checkpoint's "
                f"gene2vec table has {enc.config.n_positions} rows = {n_genes} genes + "
                f"{self.n_extra_positions} special row(s)",
                "pass the gene list that defines this checkpoint's gene axis")
        self._check_gene2vec(enc, n_genes)
        self._check_config(enc.config)
        self.model = enc.to(device=device, dtype=dtype).eval()
        self.device, self.dtype, self._ckpt_path = device, dtype, path
        self._dim = int(enc.config.dim)

    def _check_config(self, cfg: PerformerConfig) -> None:
        """Model-specific checks of the architecture (token ids)."""

    def _check_gene2vec(self, enc: PerformerEncoder, n_genes: int) -> None:
        given = self.options["gene2vec"]
        path = Path(given) if given is not None else self._ckpt_dir() / self.gene2vec_name
        if given is None and not path.is_file():
            return  # optional: the checkpoint's pos_emb is what the original uses after load
        if not path.is_file():
            raise CheckpointError(f"gene2vec file {str(path)!r} does not exist", "pass gene2vec=PATH or leave it out")
        g2v = read_npy(path)
        if g2v.shape != (n_genes, enc.config.dim):
            raise CheckpointError(
                f"{str(path)!r} has shape {g2v.shape} but the checkpoint expects ({n_genes}, {enc.config.dim})",
                "pass the gene2vec file that belongs to the checkpoint")
        table = enc.pos_emb.emb.weight.detach()[:n_genes].double().numpy()
        if not np.allclose(table, g2v, atol=1e-5):
            log.warning("%s: %s differs from the checkpoint's pos_emb.emb.weight; the checkpoint's table "
                        "is used (as load_state_dict does in the original)", self.name, path)
        self._gene2vec_checked = True

    def prepare(self, genes: GeneTable) -> GenePlan:
        """Place the dataset's genes on the model's gene axis by identity (not column order).

        The plan's ``columns``/``vocab_ids`` are the dataset column and model position of each
        matched model gene; ``plan["select"]`` is the (n_data, n_model) selection matrix."""
        src, overlap = align_genes(self.model_genes(), genes)
        pos = np.flatnonzero(src >= 0)
        return GenePlan(overlap=overlap, columns=src[pos], vocab_ids=pos,
                        data={"select": selection_matrix(src, len(genes))})

    def model_values(self, chunk: CellChunk, plan: GenePlan) -> sp.csr_matrix:
        """The chunk's counts on the model's gene axis, ``normalize_total`` + ``log1p``
        (library size = sum over the model's genes, as ``preprocess.py`` normalises after
        laying the data on the reference gene axis). CSR with sorted indices."""
        select = plan["select"]
        if select.shape[0] != chunk.X.shape[1]:
            raise InputError(f"{self.name}: the chunk has {chunk.X.shape[1]} genes but the gene plan was made "
                             f"for {select.shape[0]}", "tokenize with the plan prepare() made for these genes")
        counts = sp.csr_matrix(chunk.X @ select, dtype=np.float32)
        counts.eliminate_zeros()
        return log_normalize(counts, target_sum=self.target_sum, log_base=self.log_base)

    def _require_model(self) -> PerformerEncoder:
        self.require_loaded("forward")
        assert self.model is not None
        return self.model

    # -- description ------------------------------------------------------------------------
    def base_settings(self) -> dict[str, Any]:
        gl = self._gene_list_path
        return {
            "checkpoint_file": self._ckpt_path.name if self._ckpt_path is not None else None,
            "architecture": asdict(self.model.config) if self.model is not None else None,
            "head_in_checkpoint": self.head_layout,
            "gene_list": str(gl) if gl is not None else None,
            "gene_list_sha256": "sha256:" + sha256_file(gl) if gl is not None and gl.is_file() else None,
            "n_genes": len(self._model_genes) if self._model_genes is not None else None,
            "gene_matching": "exact symbol (Ensembl id for an Ensembl list), first duplicate wins",
            "gene2vec_cross_checked": self._gene2vec_checked,
            "normalize_total": {"target_sum": self.target_sum, "library": "sum over the model's genes"},
            "log1p_base": self.log_base if self.log_base is not None else "e",
            "attention": "FAVOR+ softmax kernel, checkpoint projection matrix, no redraw, per-cell key max",
        }


__all__ = [
    "HEAD_LAYOUTS", "PerformerAdapter", "align_genes", "bin_values", "build_encoder", "infer_config",
    "log_normalize", "read_gene_list", "read_state_dict", "selection_matrix",
]
