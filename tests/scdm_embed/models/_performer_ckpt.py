"""The scBERT / CellLM test oracle: :func:`reference_encode`, a literal re-reading of
``PerformerLM.forward`` over an official state dict. The small official-layout checkpoints
themselves are written by :mod:`scdm_embed.testing` (re-exported here for the tests)."""

from __future__ import annotations

import torch

from scdm_embed.testing import (  # noqa: F401 - re-exported for the tests
    CELLLM_GENES,
    SCBERT_GENES,
    orthogonal_features,
    performer_state_dict,
    save_training_checkpoint,
    scgpt_symbols,
    write_celllm_checkpoint,
    write_scbert_checkpoint,
)


def reference_encode(state: dict[str, torch.Tensor], tokens: torch.Tensor, positions: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """A literal, unoptimised transcription of ``PerformerLM.forward(return_encodings=True)``
    for ONE batch, straight from an official state dict (float64 throughout).

    ``mask`` (B, N) as the original's ``mask``: values at False positions are zeroed, their
    keys still count. The key stabiliser is the max over the whole batch, as in the original
    (so call it with one cell to get the original's batch-size-1 result).
    """
    sd = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    if positions is None:
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    x = sd["token_emb.weight"][tokens] + sd["pos_emb.emb.weight"][positions]
    depth = len({k.split(".")[3] for k in sd if k.startswith("performer.net.layers.")})

    def layer_norm(t: torch.Tensor, prefix: str) -> torch.Tensor:
        return torch.nn.functional.layer_norm(t, t.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])

    def linear(t: torch.Tensor, prefix: str) -> torch.Tensor:
        out = t @ sd[f"{prefix}.weight"].T
        return out + sd[f"{prefix}.bias"] if f"{prefix}.bias" in sd else out

    for i in range(depth):
        a = f"performer.net.layers.{i}.0"
        proj = sd[f"{a}.fn.fast_attention.projection_matrix"]
        n_feat, dh = proj.shape
        h = layer_norm(x, f"{a}.norm")
        q, k, v = (linear(h, f"{a}.fn.{n}") for n in ("to_q", "to_k", "to_v"))
        b, n, inner = q.shape
        q, k, v = (t.reshape(b, n, inner // dh, dh).permute(0, 2, 1, 3) for t in (q, k, v))
        if mask is not None:
            v = v * mask[:, None, :, None]
        c = dh ** -0.25
        qd, kd = (torch.einsum("bhnd,md->bhnm", c * t, proj) for t in (q, k))
        qdiag, kdiag = ((t ** 2).sum(-1, keepdim=True) / 2 * c ** 2 for t in (q, k))
        qf = n_feat ** -0.5 * (torch.exp(qd - qdiag - qd.max(dim=-1, keepdim=True).values) + 1e-4)
        kf = n_feat ** -0.5 * (torch.exp(kd - kdiag - kd.max()) + 1e-4)
        ctx = torch.einsum("bhnm,bhne->bhme", kf, v)
        norm = torch.einsum("bhnm,bhm->bhn", qf, kf.sum(dim=2))
        att = torch.einsum("bhnm,bhme->bhne", qf, ctx) / norm[..., None]
        x = x + linear(att.permute(0, 2, 1, 3).reshape(b, n, inner), f"{a}.fn.to_out")
        f = f"performer.net.layers.{i}.1"
        h = layer_norm(x, f"{f}.norm")
        x = x + linear(torch.nn.functional.gelu(linear(h, f"{f}.fn.fn.w1")), f"{f}.fn.fn.w2")
    return layer_norm(x, "norm")
