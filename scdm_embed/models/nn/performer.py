"""FAVOR+ Performer torch modules shared by scBERT and CellLM (no checkpoint mapping here).

A clean re-implementation of the inference path of ``performer_pytorch`` as vendored by
github:TencentAILabHealthcare/scBERT@262fd4b9 (``performer_pytorch/performer_pytorch.py``)
and copied unchanged (apart from the LM wrapper) into github:PharMolix/OpenBioMed
(``open_biomed/models/cell/performer_celllm.py``). Only the configuration both models use
is built: non-causal FAVOR+ softmax-kernel attention (``generalized_attention=False``,
``no_projection=False``, ``local_attn_heads=0``), pre-LayerNorm blocks, GELU feed-forward,
a gene2vec position embedding and a final LayerNorm. Module and parameter names are the
ORIGINAL ``state_dict`` names (listed in :mod:`scdm_embed.models._performer`, which maps
checkpoints onto these modules).

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
  :mod:`scdm_embed.models.celllm`), and batch padding gets weight 0 (excluded from sums and from the key max).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

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


class PerformerSelfAttention(nn.Module):
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
            attn = PerformerSelfAttention(cfg.dim, cfg.heads, cfg.dim_head, cfg.nb_features, cfg.qkv_bias)
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



__all__ = [
    "Chunk", "FastAttention", "FeedForward", "Gene2VecPositionalEmbedding", "Performer", "PerformerConfig",
    "PerformerEncoder", "PerformerSelfAttention", "PreLayerNorm", "SequentialSequence",
]
