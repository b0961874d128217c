"""The Performer encoder shared by scBERT and CellLM, and the adapter plumbing both use.

A clean re-implementation of the inference path of ``performer_pytorch`` as vendored by
github:TencentAILabHealthcare/scBERT@262fd4b9 (``performer_pytorch/performer_pytorch.py``)
and copied unchanged (apart from the LM wrapper) into github:PharMolix/OpenBioMed
(``open_biomed/models/cell/performer_celllm.py``). Only the configuration both models use
is built: non-causal FAVOR+ softmax-kernel attention (``generalized_attention=False``,
``no_projection=False``, ``local_attn_heads=0``), pre-LayerNorm blocks, GELU feed-forward,
a gene2vec position embedding and a final LayerNorm.

Module and parameter names are the ORIGINAL ``state_dict`` names, so official checkpoints
load strictly::

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

FAVOR+ (``softmax_kernel`` + ``linear_attention``): with ``x' = x * d**-0.25``,
``phi(x) = M**-0.5 * (exp(x' P^T - |x'|^2/2 - stab) + 1e-4)`` where ``stab`` is the row max
for queries and the max over the whole key tensor for keys, and
``out = phi(q) (phi(k)^T v) / (phi(q) . sum_n phi(k_n))``. The projection matrix ``P`` is the
checkpoint's buffer; it is never redrawn (the original redraws only in training mode every
1,000 calls; here there is no redraw at all, in any mode).

Two deliberate, documented choices:

* The key stabiliser is taken per CELL (over heads, positions and features), which is
  exactly the original's ``torch.max(data_dash)`` at batch size 1 (scBERT's ``predict.py``
  runs one cell at a time). The original takes it over the whole batch, which makes a
  cell's embedding depend on its batch mates through the ``+1e-4`` term; per cell it does not.
* Attention accepts per-key weights, so a run of identical padding keys can be represented
  by one position with weight ``n`` (CellLM pads every cell to ``max_seq_len``; see
  :mod:`.celllm`), and batch padding gets weight 0 (excluded from sums and from the key max).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from .._errors import CheckpointError, ScdmError
from .._genes import GeneTable, looks_like_ensembl, strip_version
from ._base import Adapter, CellChunk, GeneOverlap, sha256_file
from ._checkpoint import require_keys, shape_mismatches
from ._options import Option, greater_than
from ._safe_load import read_npy, torch_load

log = logging.getLogger(__name__)

#: ``softmax_kernel`` epsilon of the original
_KERNEL_EPS = 1e-4


# -- the model --------------------------------------------------------------------------------
def _softmax_features(x: torch.Tensor, projection: torch.Tensor, *, is_query: bool,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """FAVOR+ positive random features of ``x`` (B, H, N, d) -> (B, H, N, M), in float32.

    Queries are stabilised by their row max; keys by the max over everything of the cell
    (heads, positions, features), positions with ``valid`` False excluded.
    """
    normalizer = x.shape[-1] ** -0.25
    ratio = projection.shape[0] ** -0.5
    dash = torch.matmul(normalizer * x, projection.t())
    diag = ((x ** 2).sum(dim=-1, keepdim=True) / 2.0) * (normalizer ** 2)
    if is_query:
        stab = dash.amax(dim=-1, keepdim=True)
    else:
        if valid is not None:  # -inf: out of the max, exp -> 0 (no inf/NaN, also in backward)
            dash = dash.masked_fill(~valid[:, None, :, None], float("-inf"))
        stab = dash.amax(dim=(1, 2, 3), keepdim=True)
    return ratio * (torch.exp(dash - diag - stab) + _KERNEL_EPS)


class FastAttention(nn.Module):
    """Non-causal FAVOR+ linear attention with a fixed projection matrix (a buffer)."""

    def __init__(self, dim_head: int, nb_features: int) -> None:
        super().__init__()
        self.register_buffer("projection_matrix", torch.zeros(nb_features, dim_head))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``q, k, v``: (B, H, N, d). ``key_weight`` (B, N): multiplicity of each key in the
        sums (1 = an ordinary token, 0 = ignored, n = n identical keys). Float32 inside."""
        dtype = q.dtype
        q, k, v = q.float(), k.float(), v.float()
        proj = self.projection_matrix.float()
        valid = None if key_weight is None else key_weight > 0
        qf = _softmax_features(q, proj, is_query=True)
        kf = _softmax_features(k, proj, is_query=False, valid=valid)
        if key_weight is not None:
            w = key_weight.float()[:, None, :, None]
            kf = torch.where(valid[:, None, :, None], kf * w, torch.zeros((), device=kf.device))
        k_sum = kf.sum(dim=-2)  # (B, H, M)
        d_inv = 1.0 / torch.matmul(qf, k_sum.unsqueeze(-1)).squeeze(-1)  # (B, H, N)
        context = torch.matmul(kf.transpose(-1, -2), v)  # (B, H, M, e)
        out = torch.matmul(qf, context) * d_inv.unsqueeze(-1)
        return out.to(dtype)


class SelfAttention(nn.Module):
    """Multi-head Performer self-attention (``to_q/to_k/to_v/to_out`` as in the original)."""

    def __init__(self, dim: int, heads: int, dim_head: int, nb_features: int, qkv_bias: bool) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.fast_attention = FastAttention(dim_head, nb_features)
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, key_weight: torch.Tensor | None = None,
                value_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        if value_mask is not None:  # the original zeroes v at masked positions
            v = v.masked_fill(~value_mask[:, None, :, None], 0.0)
        out = self.fast_attention(q, k, v, key_weight)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class FeedForward(nn.Module):
    """``w2(GELU(w1(x)))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)))


class Chunk(nn.Module):
    """``Chunk(ff_chunks=1, fn)``: a pass-through kept for the ``fn.fn`` key names."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.fn(x, **kwargs)


class PreLayerNorm(nn.Module):
    """``fn(LayerNorm(x))``."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.fn(self.norm(x), **kwargs)


class SequentialSequence(nn.Module):
    """``x = x + attn(x); x = x + ff(x)`` per layer (``net.layers.<i>.{0,1}``)."""

    def __init__(self, layers: nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor, key_weight: torch.Tensor | None = None,
                value_mask: torch.Tensor | None = None) -> torch.Tensor:
        for attn, ff in self.layers:
            x = x + attn(x, key_weight=key_weight, value_mask=value_mask)
            x = x + ff(x)
        return x


class Performer(nn.Module):
    """The layer stack. ``calls_since_last_redraw`` is kept only so checkpoints load strictly:
    projections are never redrawn here."""

    def __init__(self, cfg: PerformerConfig) -> None:
        super().__init__()
        layers = nn.ModuleList()
        for _ in range(cfg.depth):
            attn = SelfAttention(cfg.dim, cfg.heads, cfg.dim_head, cfg.nb_features, cfg.qkv_bias)
            ff = Chunk(FeedForward(cfg.dim, cfg.ff_hidden))
            layers.append(nn.ModuleList([PreLayerNorm(cfg.dim, attn), PreLayerNorm(cfg.dim, ff)]))
        self.net = SequentialSequence(layers)
        self.register_buffer("calls_since_last_redraw", torch.tensor(0))

    def forward(self, x: torch.Tensor, key_weight: torch.Tensor | None = None,
                value_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x, key_weight=key_weight, value_mask=value_mask)


class Gene2VecPositionalEmbedding(nn.Module):
    """The frozen gene2vec table (``nn.Embedding.from_pretrained``: no gradient)."""

    def __init__(self, n_positions: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(n_positions, dim)
        self.emb.weight.requires_grad_(False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.emb(positions)


@dataclass(frozen=True)
class PerformerConfig:
    """Architecture of a ``PerformerLM`` checkpoint (read from its tensor shapes)."""

    num_tokens: int
    n_positions: int
    dim: int
    depth: int
    heads: int
    dim_head: int
    nb_features: int
    ff_hidden: int
    qkv_bias: bool


class PerformerEncoder(nn.Module):
    """``PerformerLM(..., g2v_position_emb=True)`` up to the final LayerNorm
    (``return_encodings=True``); the LM head is not built."""

    def __init__(self, cfg: PerformerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.token_emb = nn.Embedding(cfg.num_tokens, cfg.dim)
        self.pos_emb = Gene2VecPositionalEmbedding(cfg.n_positions, cfg.dim)
        self.performer = Performer(cfg)
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, *,
                key_weight: torch.Tensor | None = None,
                value_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens`` (B, N) bin ids; ``positions`` (B, N) gene2vec rows (default ``0..N-1``,
        scBERT's layout). Returns the final-LayerNorm hidden states (B, N, dim)."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_emb(tokens) + self.pos_emb(positions).to(self.token_emb.weight.dtype)
        x = self.performer(x, key_weight=key_weight, value_mask=value_mask)
        return self.norm(x)


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
    expected = enc.state_dict()
    head_keys = {k for k in state if k == "to_out" or k.startswith("to_out.")}
    layout = next((name for name, keys in HEAD_LAYOUTS.items() if head_keys == keys), None)
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected) - head_keys)
    if layout is None:  # report against the closest known head layout
        closest = max(HEAD_LAYOUTS.values(), key=lambda keys: len(keys & head_keys))
        unknown = sorted(set(unknown) | (head_keys - closest))
        missing = sorted(set(missing) | (closest - head_keys))
    require_keys(missing, unknown, what=f"{str(path)!r} does not match the {model} PerformerLM layout",
                 fix=f"pass the official {model} checkpoint, unmodified")
    bad = shape_mismatches(expected, state)
    if layout == "mlm" and tuple(state["to_out.weight"].shape) != (cfg.num_tokens, cfg.dim):
        bad.append(f"to_out.weight: {tuple(state['to_out.weight'].shape)} vs {(cfg.num_tokens, cfg.dim)}")
    if bad:
        raise CheckpointError(f"{str(path)!r}: tensor shapes do not fit one PerformerLM: {bad[:5]}",
                              f"pass the official {model} checkpoint, unmodified")
    enc.load_state_dict({k: state[k] for k in expected}, strict=True)
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
    lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out")
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
        self._src = np.empty(0, dtype=np.int64)
        self._select: sp.csr_matrix | None = None
        self._n_data = -1

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

    def prepare(self, genes: GeneTable) -> GeneOverlap:
        """Place the dataset's genes on the model's gene axis by identity (not column order)."""
        self._src, overlap = align_genes(self.model_genes(), genes)
        self._select = selection_matrix(self._src, len(genes))
        self._n_data = len(genes)
        return overlap

    def model_values(self, chunk: CellChunk) -> sp.csr_matrix:
        """The chunk's counts on the model's gene axis, ``normalize_total`` + ``log1p``
        (library size = sum over the model's genes, as ``preprocess.py`` normalises after
        laying the data on the reference gene axis). CSR with sorted indices."""
        if self._select is None or self._n_data != chunk.X.shape[1]:
            raise ScdmError(f"{self.name}: prepare() was not called for these genes",
                            "call adapter.prepare(genes) before tokenize")
        counts = sp.csr_matrix(chunk.X @ self._select, dtype=np.float32)
        counts.eliminate_zeros()
        return log_normalize(counts, target_sum=self.target_sum, log_base=self.log_base)

    def _require_model(self) -> PerformerEncoder:
        if self.model is None:
            raise ScdmError(f"{self.name}: load() was not called", "call adapter.load(device=..., dtype=...)")
        return self.model

    # -- description ------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._require_model().config.dim

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
    "FastAttention", "HEAD_LAYOUTS", "PerformerAdapter", "PerformerConfig", "PerformerEncoder",
    "SelfAttention", "align_genes", "bin_values", "build_encoder", "infer_config", "log_normalize",
    "read_gene_list", "read_state_dict", "selection_matrix",
]
