"""Helpers for tests, benches and demos: the reference-fixture model table and small random
checkpoints in official layouts (public: ``bench/`` and users' own tests import them).

* :func:`fixture_models` — how to build each model of ``shared/reference_fixtures`` (random
  weights in the official layouts, checked against the original code's embeddings);
  :data:`FIXTURE_MODELS` names them, the one list every test and bench uses.
* :func:`write_scbert_checkpoint` / :func:`write_celllm_checkpoint` — small random
  ``PerformerLM`` checkpoints in the OFFICIAL key layout (no original-code fixtures exist for
  these two models). Key names and shapes follow ``PerformerLM`` of
  github:TencentAILabHealthcare/scBERT@262fd4b9 (``performer_pytorch/performer_pytorch.py``),
  which ``PerformerLM_CellLM`` of github:PharMolix/OpenBioMed shares, as
  ``model.state_dict()`` lists them and ``utils.save_ckpt`` saves them (``{'epoch',
  'model_state_dict', 'optimizer_state_dict', 'scheduler_state_dict', 'losses'}``). They are
  written here by hand, independently of the adapters' modules, so tests check the names as
  well as the numbers. Depth and widths are reduced; the gene axis (16,906 / 19,379) is kept.

The ``shared/`` folder is found by :func:`scdm_embed.locations.shared_dir`.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._synthetic import synthetic_cohort
from .locations import shared_dir

#: the models with a reference fixture (``shared/reference_fixtures/<model>/checkpoint``)
FIXTURE_MODELS: tuple[str, ...] = ("geneformer", "tgpt", "scgpt", "scfoundation", "uce", "cellplm")


def fixture_models(shared: Path | None = None) -> dict[str, tuple[Path, dict[str, Any]]]:
    """model -> (checkpoint, options) for the reference fixtures under ``shared`` (default: :func:`shared_dir`)."""
    shared = shared_dir() if shared is None else Path(shared)
    fx, vocab = shared / "reference_fixtures", shared / "vocab"
    gc30m = vocab / "geneformer" / "gc30M"
    options: dict[str, dict[str, Any]] = {
        "geneformer": {"token_dictionary": str(gc30m / "token_dictionary_gc30M.pkl"),
                       "gene_median_dictionary": str(gc30m / "gene_median_dictionary_gc30M.pkl")},
        "scfoundation": {"gene_index": str(vocab / "scfoundation" / "OS_scRNA_gene_index.19264.tsv")},
    }
    return {m: (fx / m / "checkpoint", options.get(m, {})) for m in FIXTURE_MODELS}


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


def _write_performer(folder: Path, genes: list[str], *, weights: str, gene2vec_file: str, num_tokens: int,
                     extra_rows: list[float], dim: int, seed: int, write_genes: bool, write_gene2vec: bool,
                     **kw: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g2v = _gene2vec(len(genes), dim, seed)
    sd = performer_state_dict(num_tokens=num_tokens, gene2vec=g2v, extra_rows=extra_rows, seed=seed, **kw)  # type: ignore[arg-type]
    save_training_checkpoint(folder / weights, sd)
    if write_genes:
        (folder / "genes.txt").write_text("\n".join(genes) + "\n")
    if write_gene2vec:
        np.save(folder / gene2vec_file, g2v)
    return folder


def write_scbert_checkpoint(folder: Path, genes: list[str], *, dim: int = 16, seed: int = 0,
                            write_genes: bool = True, write_gene2vec: bool = True, **kw: object) -> Path:
    """``panglao_pretrain.pth`` (+ ``genes.txt``, ``gene2vec_16906.npy``) in ``folder``."""
    return _write_performer(folder, genes, weights="panglao_pretrain.pth", gene2vec_file="gene2vec_16906.npy",
                            num_tokens=7, extra_rows=[0.0], dim=dim, seed=seed, write_genes=write_genes,
                            write_gene2vec=write_gene2vec, **kw)


def write_celllm_checkpoint(folder: Path, genes: list[str], *, dim: int = 16, seed: int = 1,
                            write_genes: bool = True, write_gene2vec: bool = True, **kw: object) -> Path:
    """``checkpoint4_fixed.pth`` (+ ``genes.txt``, ``gene2vec_19379_512.npy``) in ``folder``."""
    return _write_performer(folder, genes, weights="checkpoint4_fixed.pth", gene2vec_file="gene2vec_19379_512.npy",
                            num_tokens=8, extra_rows=[1.0, 0.0], dim=dim, seed=seed, write_genes=write_genes,
                            write_gene2vec=write_gene2vec, **kw)


__all__ = ["CELLLM_GENES", "FIXTURE_MODELS", "SCBERT_GENES", "fixture_models", "orthogonal_features", "synthetic_cohort",
           "performer_state_dict", "save_training_checkpoint", "scgpt_symbols", "write_celllm_checkpoint",
           "write_scbert_checkpoint"]

