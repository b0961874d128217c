"""Small random ``PerformerLM`` checkpoints in the OFFICIAL key layout, for the scBERT and
CellLM tests (no original-code fixtures exist for these two models).

Key names and shapes follow ``PerformerLM`` of github:TencentAILabHealthcare/scBERT@262fd4b9
(``performer_pytorch/performer_pytorch.py``), which ``PerformerLM_CellLM`` of
github:PharMolix/OpenBioMed shares, as ``model.state_dict()`` lists them and
``utils.save_ckpt`` saves them (``{'epoch', 'model_state_dict', 'optimizer_state_dict',
'scheduler_state_dict', 'losses'}``). They are written here by hand, independently of the
adapter's module, so the tests check the names as well as the numbers. Depth and widths are
reduced; the gene axis (16,906 / 19,379 genes) is kept.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

SCBERT_GENES = 16906
CELLLM_GENES = 19379


def orthogonal_features(nb_features: int, dim_head: int, gen: torch.Generator) -> torch.Tensor:
    """A Gaussian orthogonal random matrix (nb_features, dim_head), like
    ``gaussian_orthogonal_random_matrix(scaling=0)``: stacked orthogonal blocks, rows scaled by
    the norms of Gaussian vectors."""
    blocks = []
    for _ in range(math.ceil(nb_features / dim_head)):
        q, _ = torch.linalg.qr(torch.randn(dim_head, dim_head, generator=gen))
        blocks.append(q.t())
    mat = torch.cat(blocks)[:nb_features]
    norms = torch.randn(nb_features, dim_head, generator=gen).norm(dim=1)
    return norms[:, None] * mat


def performer_state_dict(*, num_tokens: int, gene2vec: np.ndarray, extra_rows: list[float], depth: int = 2,
                         heads: int = 2, dim_head: int = 8, nb_features: int | None = None,
                         ff_mult: int = 4, qkv_bias: bool = False, head: str = "mlm",
                         seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    """``PerformerLM(...).state_dict()`` with random weights (dim = gene2vec width).

    ``extra_rows``: the constant rows the original appends to gene2vec (scBERT ``[0.0]``;
    CellLM ``[1.0, 0.0]`` for CLS and PAD). ``pos_emb.emb.weight`` is float64, as
    ``nn.Embedding.from_pretrained(torch.from_numpy(float64 array))`` leaves it.
    """
    gen = torch.Generator().manual_seed(seed)
    dim = gene2vec.shape[1]
    inner = heads * dim_head
    nb_features = nb_features or int(dim_head * math.log(dim_head))

    def rnd(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    def ln(prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1.0 + rnd(dim, scale=0.1), f"{prefix}.bias": rnd(dim, scale=0.1)}

    pos = np.concatenate([gene2vec] + [np.full((1, dim), v) for v in extra_rows]).astype(np.float64)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    sd["token_emb.weight"] = rnd(num_tokens, dim, scale=1.0)
    sd["pos_emb.emb.weight"] = torch.from_numpy(pos)
    sd["performer.calls_since_last_redraw"] = torch.tensor(0)
    for i in range(depth):
        a = f"performer.net.layers.{i}.0"
        sd.update(ln(f"{a}.norm"))
        sd[f"{a}.fn.fast_attention.projection_matrix"] = orthogonal_features(nb_features, dim_head, gen)
        for name in ("to_q", "to_k", "to_v"):
            sd[f"{a}.fn.{name}.weight"] = rnd(inner, dim, scale=dim ** -0.5)
            if qkv_bias:
                sd[f"{a}.fn.{name}.bias"] = rnd(inner, scale=0.05)
        sd[f"{a}.fn.to_out.weight"] = rnd(dim, inner, scale=inner ** -0.5)
        sd[f"{a}.fn.to_out.bias"] = rnd(dim, scale=0.05)
        f = f"performer.net.layers.{i}.1"
        sd.update(ln(f"{f}.norm"))
        sd[f"{f}.fn.fn.w1.weight"] = rnd(dim * ff_mult, dim, scale=dim ** -0.5)
        sd[f"{f}.fn.fn.w1.bias"] = rnd(dim * ff_mult, scale=0.05)
        sd[f"{f}.fn.fn.w2.weight"] = rnd(dim, dim * ff_mult, scale=(dim * ff_mult) ** -0.5)
        sd[f"{f}.fn.fn.w2.bias"] = rnd(dim, scale=0.05)
    sd.update(ln("norm"))
    if head == "mlm":
        sd["to_out.weight"] = rnd(num_tokens, dim, scale=dim ** -0.5)
        sd["to_out.bias"] = rnd(num_tokens, scale=0.05)
    elif head == "scbert_finetune":  # finetune.py's Identity head (shrunk widths)
        n_pos = pos.shape[0]
        sd["to_out.conv1.weight"] = rnd(1, 1, 1, dim, scale=0.1)
        sd["to_out.conv1.bias"] = rnd(1, scale=0.1)
        for name, (o, i_) in {"fc1": (8, n_pos), "fc2": (4, 8), "fc3": (2, 4)}.items():
            sd[f"to_out.{name}.weight"] = rnd(o, i_, scale=0.1)
            sd[f"to_out.{name}.bias"] = rnd(o, scale=0.1)
    return sd


def save_training_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """``utils.save_ckpt``'s dict layout."""
    torch.save({"epoch": 1, "model_state_dict": state, "optimizer_state_dict": {},
                "scheduler_state_dict": {}, "losses": [0.5]}, path)
    return path


def scgpt_symbols(vocab_dir: Path, n: int, *, skip: int = 0) -> list[str]:
    """``n`` gene symbols from the scGPT census vocabulary, in its order (a stand-in gene axis:
    the real scBERT/CellLM gene lists are not public)."""
    vocab = json.loads((vocab_dir / "scgpt" / "default_census_vocab.json").read_text())
    syms = [g for g, _ in sorted(vocab.items(), key=lambda t: t[1]) if not g.startswith("<")]
    return syms[skip:skip + n]


def _gene2vec(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 0.5, size=(n, dim)).astype(np.float32)


def write_scbert_checkpoint(folder: Path, genes: list[str], *, dim: int = 16, seed: int = 0,
                            write_genes: bool = True, write_gene2vec: bool = True, **kw: object) -> Path:
    """``panglao_pretrain.pth`` (+ ``genes.txt``, ``gene2vec_16906.npy``) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    g2v = _gene2vec(len(genes), dim, seed)
    sd = performer_state_dict(num_tokens=7, gene2vec=g2v, extra_rows=[0.0], seed=seed, **kw)  # type: ignore[arg-type]
    save_training_checkpoint(folder / "panglao_pretrain.pth", sd)
    if write_genes:
        (folder / "genes.txt").write_text("\n".join(genes) + "\n")
    if write_gene2vec:
        np.save(folder / "gene2vec_16906.npy", g2v)
    return folder


def write_celllm_checkpoint(folder: Path, genes: list[str], *, dim: int = 16, seed: int = 1,
                            write_genes: bool = True, write_gene2vec: bool = True, **kw: object) -> Path:
    """``checkpoint4_fixed.pth`` (+ ``genes.txt``, ``gene2vec_19379_512.npy``) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    g2v = _gene2vec(len(genes), dim, seed)
    sd = performer_state_dict(num_tokens=8, gene2vec=g2v, extra_rows=[1.0, 0.0], seed=seed, **kw)  # type: ignore[arg-type]
    save_training_checkpoint(folder / "checkpoint4_fixed.pth", sd)
    if write_genes:
        (folder / "genes.txt").write_text("\n".join(genes) + "\n")
    if write_gene2vec:
        np.save(folder / "gene2vec_19379_512.npy", g2v)
    return folder


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
