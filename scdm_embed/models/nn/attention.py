"""Softmax-attention transformer blocks shared by the re-implemented encoders (scGPT, UCE, scFoundation).

All three use the layout of ``nn.TransformerEncoderLayer`` (post-norm, ReLU feed-forward,
LayerNorm eps 1e-5) with ``nn.MultiheadAttention``-style attention: one packed q/k/v
projection, then ``out_proj``. Here attention runs through ``F.scaled_dot_product_attention``
with a boolean key-padding mask, and every projection is a real ``nn.Linear`` call on the
forward path, so LoRA can wrap it. The packed projection's attribute name is a parameter
(``Wqkv`` for scGPT's flash-attn layout, ``in_proj`` otherwise) so that each model keeps its
own checkpoint key names and LoRA target names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MultiheadSelfAttention(nn.Module):
    """Multi-head softmax self-attention (``nn.MultiheadAttention`` layout): packed q/k/v ``Linear`` (named ``qkv_name``) -> SDPA -> ``out_proj``."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, *, qkv_name: str = "in_proj") -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"model width {d_model} is not divisible by {n_heads} heads")
        self.n_heads = n_heads
        self.dropout = dropout
        self._qkv_name = qkv_name
        setattr(self, qkv_name, nn.Linear(d_model, 3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` (B, L, D); ``key_mask`` (B, L) bool, True on keys that may be attended (None = all)."""
        b, n, d = x.shape
        qkv = getattr(self, self._qkv_name)(x).view(b, n, 3, self.n_heads, d // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, Dh)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class EncoderLayer(nn.Module):
    """Post-norm layer with the module names of ``nn.TransformerEncoderLayer`` (ReLU, eps 1e-5)."""

    def __init__(self, d_model: int, n_heads: int, d_hid: int, dropout: float, *,
                 qkv_name: str = "in_proj") -> None:
        super().__init__()
        self.self_attn = MultiheadSelfAttention(d_model, n_heads, dropout, qkv_name=qkv_name)
        self.linear1 = nn.Linear(d_model, d_hid)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_hid, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(x + self.dropout1(self.self_attn(x, key_mask)))
        return self.norm2(x + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x))))))


def encoder_layers(n_layers: int, d_model: int, n_heads: int, d_hid: int, dropout: float, *,
                   qkv_name: str = "in_proj") -> nn.ModuleList:
    """``n_layers`` identical :class:`EncoderLayer` s."""
    return nn.ModuleList(EncoderLayer(d_model, n_heads, d_hid, dropout, qkv_name=qkv_name)
                         for _ in range(n_layers))


class Encoder(nn.Module):
    """A stack of :class:`EncoderLayer` s under ``layers`` (``nn.TransformerEncoder`` naming)."""

    def __init__(self, n_layers: int, d_model: int, n_heads: int, d_hid: int, dropout: float, *,
                 qkv_name: str = "in_proj") -> None:
        super().__init__()
        self.layers = encoder_layers(n_layers, d_model, n_heads, d_hid, dropout, qkv_name=qkv_name)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, key_mask)
        return x


__all__ = ["Encoder", "EncoderLayer", "MultiheadSelfAttention", "encoder_layers"]
