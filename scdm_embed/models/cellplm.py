"""CellPLM (OmicsFormer) cell embeddings: a clean PyTorch re-implementation of the inference
path of ``CellPLM.pipeline.cell_embedding.CellEmbeddingPipeline.predict`` (github:OmicsML/CellPLM,
PyPI ``cellplm`` 0.1.0.post2), i.e. ``OmicsFormer(head_type='embedder')`` in eval mode.

Checkpoint: the release folder layout read by ``CellPLM.pipeline.load_pretrain``:
``<prefix>.config.json`` (the OmicsFormer kwargs, including the 19,374-Ensembl ``gene_list``) and
``<prefix>.best.ckpt`` (``{'model_state_dict': ...}``), e.g. ``20230926_85M``.

Per batch of cells (cells are the tokens; there is no per-cell sequence):

1. genes are matched by Ensembl id (``GeneTable.ensembl``; never a web query); the first
   occurrence of a duplicated id is kept, as ``var_names_make_unique`` does in the original;
2. ``OmicsEmbeddingLayer``: ``log1p(raw counts)`` (no library-size normalisation) times the
   gene-embedding rows of the matched genes, then ``extra_linear`` (Linear, ReLU, Dropout,
   GroupNorm(4)); the spatial positional encoding adds ``0.`` for non-spatial data;
3. flowformer encoder: pre-norm layers whose Flow-Attention attends ACROSS THE CELLS of the batch;
4. ``pre_latent_norm`` (LayerNorm), then the GMVAE inference net: a cluster one-hot ``y`` from
   ``q(y|h)`` and the Gaussian mean ``mu(h, y)`` = the embedding (``post_latent_dim``: 512 for
   the released model).

Quirk reproduced: in eval mode the original still draws ``y`` as a HARD GUMBEL-SOFTMAX SAMPLE
(``torch.rand_like`` noise, ``hard=True``), so its embeddings depend on the global torch RNG state.
Here (``cluster='sample'``, the default) the uniform noise is drawn per cell from
``cell_seed(cell_id, seed)``: same distribution as the original, but reproducible and tied to
the cell rather than to its position. ``cluster='argmax'`` uses the noise-free mode of
``q(y|h)`` instead. A batch may carry ``cluster`` (int64 per cell) to replay recorded draws.

Module names follow the original state dict (``embedder.feat_enc.emb``,
``encoder.layers.<i>.self_attn.{query,key,value,out}_projection``, ``_ff_block``, ``norm1/2``,
``pre_latent_norm.norm``, ``latent.layers.1.inference.{inference_qyx.0.logits,
inference_qzyx.0, inference_qzyx.2.mu}``); every projection is a real module call on the
forward path, so LoRA can wrap them. Checkpoint keys that the embedding does not use (the
decoder/objective heads, the unused ``norm0``/positional-encoding tables, the GMVAE variance
and prior layers) are recognised by prefix and skipped; any other unknown or missing key is
an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, InputError
from ..genes import GeneTable
from ._checkpoint import load_strict
from ._safe_load import torch_load
from .base import Adapter, CellChunk, GeneOverlap, GenePlan, cell_seed
from .options import Option, at_least

_CONFIG_SUFFIX = ".config.json"
_CKPT_SUFFIX = ".best.ckpt"
#: checkpoint keys recognised and intentionally not loaded (not on the embedding path):
#: decoder / objective / task heads; ``embedder.norm0`` (its call is commented out in the
#: original); the 2-D positional encoding (the original adds ``pe = 0.``); the GMVAE variance
#: head and the prior p(z|y) (only used by the training loss).
_SKIP_PREFIXES = (
    "decoder.", "objective.", "head.", "mask_model.",
    "embedder.norm0.", "embedder.pe_enc.",
    "latent.layers.1.inference.inference_qzyx.2.var.",
    "latent.layers.1.inference.y_mu.", "latent.layers.1.inference.y_var.",
)
#: the hidden width of ``q(z|x,y)``, hard-coded in the original ``InferenceNet``
_QZYX_HIDDEN = 512
#: ``GroupNorm`` groups, hard-coded in the original ``create_norm``
_GROUPS = 4
_CLUSTER_MODES = ("sample", "argmax")


# -- the model --------------------------------------------------------------------------------
def _create_norm(name: str, dim: int) -> nn.Module:
    """``CellPLM.utils.create_norm`` for the norms the released configs use."""
    if name == "groupnorm":
        return nn.GroupNorm(_GROUPS, dim)
    if name == "layernorm":
        return nn.LayerNorm(dim)
    raise CheckpointError(f"CellPLM config norm={name!r} is not supported",
                          "use a released CellPLM config (norm 'groupnorm' or 'layernorm')")


class _OmicsEmbedder(nn.Module):
    """``OmicsEmbedder``: the gene-embedding table (``emb``, one row per vocabulary gene)."""

    def __init__(self, n_genes: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Parameter(torch.zeros(n_genes, dim))

    def forward(self, counts: torch.Tensor, gene_idx: torch.Tensor) -> torch.Tensor:
        """``counts`` (B, G) raw counts of the matched genes, ``gene_idx`` (G,) vocabulary rows."""
        x = torch.log1p(counts.float()).to(self.emb.dtype)
        return x @ self.emb.index_select(0, gene_idx)


class _OmicsEmbeddingLayer(nn.Module):
    """``OmicsEmbeddingLayer`` with ``cat_pe=False`` and no covariate injection."""

    def __init__(self, n_genes: int, dim: int, norm: str, dropout: float) -> None:
        super().__init__()
        self.feat_enc = _OmicsEmbedder(n_genes, dim)
        self.extra_linear = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout),
                                          _create_norm(norm, dim))

    def forward(self, counts: torch.Tensor, gene_idx: torch.Tensor) -> torch.Tensor:
        return self.extra_linear(self.feat_enc(counts, gene_idx))


class _FlowAttention(nn.Module):
    """Flow-Attention (Flowformer, non-causal) over the cells of one batch.

    Linear in the number of cells: sigmoid feature maps for queries and keys, incoming /
    outgoing flow normalisation with conservation refinement, sigmoid allocation of sinks and
    a softmax competition of sources over the cells. The flow statistics are computed in
    float32 (sums run over every cell of the batch).
    """

    def __init__(self, dim: int, heads: int, eps: float = 1e-6, dropout: float = 0.01) -> None:
        super().__init__()
        if dim % heads:
            raise CheckpointError(f"CellPLM enc_hid {dim} is not divisible by enc_head {heads}",
                                  "use a released CellPLM config")
        self.n_heads = heads
        self.eps = eps
        self.query_projection = nn.Linear(dim, dim)
        self.key_projection = nn.Linear(dim, dim)
        self.value_projection = nn.Linear(dim, dim)
        self.out_projection = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        n, d = x.shape
        return x.float().view(n, self.n_heads, d // self.n_heads).transpose(0, 1)  # (H, N, dh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (N, D): the N cells of the batch are the sequence."""
        n, d = x.shape
        eps = self.eps
        q = torch.sigmoid(self._heads(self.query_projection(x)))
        k = torch.sigmoid(self._heads(self.key_projection(x)))
        v = self._heads(self.value_projection(x))
        # incoming flow of each sink (query) and outgoing flow of each source (key)
        sink_in = 1.0 / ((q + eps) @ (k.sum(1) + eps).unsqueeze(-1)).squeeze(-1)  # (H, N)
        source_out = 1.0 / ((k + eps) @ (q.sum(1) + eps).unsqueeze(-1)).squeeze(-1)
        # conservation refinement
        conserved_sink = ((q + eps) @ ((k * source_out.unsqueeze(-1)).sum(1) + eps).unsqueeze(-1)).squeeze(-1)
        conserved_source = ((k + eps) @ ((q * sink_in.unsqueeze(-1)).sum(1) + eps).unsqueeze(-1)).squeeze(-1)
        conserved_source = conserved_source.clamp(-1.0, 1.0)
        # competition (softmax over the cells) and allocation (queries and keys: same cells)
        allocation = torch.sigmoid(conserved_sink)
        competition = torch.softmax(conserved_source, dim=-1) * float(n)
        kv = k.transpose(1, 2) @ (v * competition.unsqueeze(-1))  # (H, dh, dh)
        out = ((q * sink_in.unsqueeze(-1)) @ kv) * allocation.unsqueeze(-1)  # (H, N, dh)
        out = out.transpose(0, 1).reshape(n, d).to(x.dtype)
        return self.dropout(self.out_projection(out))


class _FlowformerLayer(nn.Module):
    """``FlowformerLayer``: pre-norm (LayerNorm) attention + GELU feed-forward (2x width)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = _FlowAttention(dim, heads)
        self._ff_block = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Dropout(dropout),
                                       nn.Linear(dim * 2, dim), nn.Dropout(dropout))
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout1(self.self_attn(self.norm1(x)))
        return x + self._ff_block(self.norm2(x))


class _Encoder(nn.Module):
    def __init__(self, dim: int, heads: int, n_layers: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_FlowformerLayer(dim, heads, dropout) for _ in range(n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class _PreLatentNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class _GumbelSoftmax(nn.Module):
    """``q(y|h)``: cluster logits (``logits``) and a hard one-hot draw with a straight-through
    gradient, as ``GumbelSoftmax(hard=True, temperature=1)``."""

    def __init__(self, dim: int, n_clusters: int) -> None:
        super().__init__()
        self.logits = nn.Linear(dim, n_clusters)

    def forward(self, h: torch.Tensor, noise: torch.Tensor | None,
                cluster: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(h)
        if cluster is not None:
            y = F.one_hot(cluster.long(), logits.shape[-1]).to(logits.dtype)
            return logits, y
        z = logits.float()
        if noise is not None:  # Gumbel(0, 1) from uniform noise, as ``sample_gumbel``
            z = z - torch.log(-torch.log(noise.float() + 1e-20) + 1e-20)
        soft = torch.softmax(z, dim=-1)
        hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
        return logits, ((hard - soft).detach() + soft).to(logits.dtype)


class _GaussianMean(nn.Module):
    """The mean head of ``Gaussian`` (its ``var`` head is not needed for the embedding)."""

    def __init__(self, dim: int, latent: int) -> None:
        super().__init__()
        self.mu = nn.Linear(dim, latent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mu(x)


class _InferenceNet(nn.Module):
    def __init__(self, dim: int, latent: int, n_clusters: int) -> None:
        super().__init__()
        self.inference_qyx = nn.ModuleList([_GumbelSoftmax(dim, n_clusters)])
        self.inference_qzyx = nn.ModuleList([nn.Linear(dim + n_clusters, _QZYX_HIDDEN), nn.ReLU(),
                                             _GaussianMean(_QZYX_HIDDEN, latent)])

    def forward(self, h: torch.Tensor, noise: torch.Tensor | None,
                cluster: torch.Tensor | None) -> dict[str, torch.Tensor]:
        logits, y = self.inference_qyx[0](h, noise, cluster)
        z = torch.cat([h, y], dim=1)
        for layer in self.inference_qzyx:
            z = layer(z)
        return {"mean": z, "logits": logits, "cluster": y.argmax(-1)}


class _GMVAELatent(nn.Module):
    def __init__(self, dim: int, latent: int, n_clusters: int) -> None:
        super().__init__()
        self.inference = _InferenceNet(dim, latent, n_clusters)

    def forward(self, h: torch.Tensor, noise: torch.Tensor | None,
                cluster: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return self.inference(h, noise, cluster)


class _LatentModel(nn.Module):
    """``LatentModel``: slot 0 is the parameter-free placeholder, slot 1 the GMVAE layer."""

    def __init__(self, dim: int, latent: int, n_clusters: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Identity(), _GMVAELatent(dim, latent, n_clusters)])

    def forward(self, h: torch.Tensor, noise: torch.Tensor | None,
                cluster: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return self.layers[1](self.layers[0](h), noise, cluster)


class CellPLMModel(nn.Module):
    """The embedding path of ``OmicsFormer`` (flowformer encoder + GMVAE latent).

    ``train()`` only switches on the original dropout layers (``model_dropout``; 0.01 inside
    Flow-Attention); the output is always the latent mean, without the original's training-time
    cell masking/dropping or Gaussian sampling.
    """

    def __init__(self, *, n_genes: int, enc_hid: int, enc_layers: int, enc_head: int,
                 post_latent_dim: int, num_clusters: int, norm: str, dropout: float) -> None:
        super().__init__()
        self.embedder = _OmicsEmbeddingLayer(n_genes, enc_hid, norm, dropout)
        self.encoder = _Encoder(enc_hid, enc_head, enc_layers, dropout)
        self.pre_latent_norm = _PreLatentNorm(enc_hid)
        self.latent = _LatentModel(enc_hid, post_latent_dim, num_clusters)

    def forward(self, counts: torch.Tensor, gene_idx: torch.Tensor, *,
                noise: torch.Tensor | None = None,
                cluster: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``counts`` (B, G) raw counts of the matched genes, ``gene_idx`` (G,) their vocabulary
        rows; ``noise`` (B, K) uniform noise for the Gumbel draw (``None``: argmax);
        ``cluster`` (B,) forces the cluster. Returns ``mean`` (B, latent), ``logits``,
        ``cluster``. All B cells attend to each other."""
        h = self.embedder(counts, gene_idx)
        h = self.encoder(h)
        h = self.pre_latent_norm(h)
        return self.latent(h, noise, cluster)


# -- helpers ------------------------------------------------------------------------------------
def _find_files(checkpoint: Path, prefix: str | None) -> tuple[Path, Path]:
    """``<prefix>.config.json`` and ``<prefix>.best.ckpt`` inside ``checkpoint``."""
    layout = f"<prefix>{_CONFIG_SUFFIX} + <prefix>{_CKPT_SUFFIX} (e.g. 20230926_85M)"
    folder = checkpoint
    if checkpoint.is_file():
        name = checkpoint.name
        for suffix in (_CONFIG_SUFFIX, _CKPT_SUFFIX):
            if name.endswith(suffix):
                folder, prefix = checkpoint.parent, prefix or name[: -len(suffix)]
                break
        else:
            raise CheckpointError(f"{str(checkpoint)!r} is not a CellPLM checkpoint file",
                                  f"pass the folder holding {layout}")
    if prefix is None:
        found = sorted(p.name[: -len(_CONFIG_SUFFIX)] for p in folder.glob(f"*{_CONFIG_SUFFIX}"))
        paired = [p for p in found if (folder / f"{p}{_CKPT_SUFFIX}").exists()]
        if len(paired) != 1:
            what = "no" if not paired else f"{len(paired)} ({', '.join(paired)})"
            raise CheckpointError(f"{str(folder)!r} holds {what} CellPLM checkpoint(s) ({layout})",
                                  "put exactly one there, or pick one with the option prefix=NAME")
        prefix = paired[0]
    config, ckpt = folder / f"{prefix}{_CONFIG_SUFFIX}", folder / f"{prefix}{_CKPT_SUFFIX}"
    for f in (config, ckpt):
        if not f.exists():
            raise CheckpointError(f"CellPLM checkpoint file {str(f)!r} is missing",
                                  f"the folder must hold {layout}")
    return config, ckpt


def _read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read the CellPLM config {str(path)!r}: {err}",
                              "use the config.json released with the checkpoint") from err
    missing = [k for k in ("gene_list", "enc_hid", "enc_layers", "post_latent_dim") if k not in cfg]
    if missing:
        raise CheckpointError(f"the CellPLM config {str(path)!r} lacks {', '.join(missing)}",
                              "use the config.json released with the checkpoint")
    unsupported = {
        "enc_mod": (cfg.get("enc_mod", "flowformer"), "flowformer"),
        "latent_mod": (cfg.get("latent_mod", "vae"), "gmvae"),
        "dsbn": (bool(cfg.get("dsbn", False)), False),
        "dar": (bool(cfg.get("dar", False)), False),
        "ecs": (bool(cfg.get("ecs", False)), False),
        "cat_pe": (bool(cfg.get("cat_pe", True)), False),
        "input_covariate": (bool(cfg.get("input_covariate", False)), False),
        "mask_type": (cfg.get("mask_type", "input"), "input"),
    }
    bad = [f"{k}={got!r} (need {want!r})" for k, (got, want) in unsupported.items() if got != want]
    if bad:
        raise CheckpointError(f"the CellPLM config {str(path)!r} uses an unsupported architecture: "
                              + ", ".join(bad), "use a released CellPLM checkpoint (e.g. 20230926_85M)")
    return cfg


def _read_state_dict(path: Path, *, trust: bool = False) -> dict[str, torch.Tensor]:
    obj = torch_load(path, trust=trust, what="the CellPLM checkpoint")
    if not isinstance(obj, dict) or not isinstance(obj.get("model_state_dict"), dict):
        raise CheckpointError(f"{str(path)!r} has no 'model_state_dict' entry",
                              "use the .best.ckpt released with CellPLM")
    return obj["model_state_dict"]


# -- the adapter --------------------------------------------------------------------------------
class CellPLMAdapter(Adapter):
    """CellPLM: the GMVAE latent mean of ``OmicsFormer`` (512-d for the released model).

    CELLS ATTEND TO EACH OTHER. In CellPLM the cells are the attention tokens: the flowformer
    encoder mixes information across all cells of a forward batch, so a cell's embedding
    depends on which cells are embedded with it. Hence ``batch_invariant = False``: the engine
    forms batches from consecutive cells in file order and never re-sorts or splits them (no
    length bucketing, no out-of-memory halving). The original ``CellEmbeddingPipeline.predict``
    embeds every cell of a sample (``obs['batch']``; the whole dataset when there is none) in
    ONE batch; ``score`` uses 50,000. ``default_batch_size`` is therefore 50,000 (the option
    ``batch_size=N`` overrides it). The engine never lets a batch cross a chunk, so a batch is
    at most one chunk of rows (``chunk_size``, default 1,024): raise the chunk size to embed
    more cells together. To reproduce the original's per-sample grouping, write the cells
    sorted by sample and choose batch/chunk sizes that match the sample sizes. The batch and
    chunk sizes are part of what an embedding means here; compare stores only when they agree.

    Options (keyword): ``prefix`` (which ``<prefix>.config.json``/``.best.ckpt`` pair; default:
    the only one in the folder), ``batch_size`` (cells per forward), ``cluster`` (``'sample'``:
    per-cell seeded Gumbel draw of the GMVAE cluster, as the original samples; ``'argmax'``:
    the most likely cluster), ``seed`` (global seed of the per-cell draws, default 0).

    Tokens: no sequence (``sequence_keys=()``); each cell is the dense row of its raw counts
    over the matched genes (``counts``, float32), the vocabulary rows of those genes
    (``gene_idx``, int32, the plan's ``vocab_ids``: the same for every cell of a dataset, so the
    forward needs no per-dataset state) plus, for ``cluster='sample'``, its uniform noise
    (``noise``, one value per cluster).
    """

    name: ClassVar[str] = "cellplm"
    lora_targets: ClassVar[tuple[str, ...]] = ("query_projection", "key_projection", "value_projection")  # the paper's
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ("CellPLM (OmicsFormer, flowformer over cells): GMVAE latent mean; "
                                  "cells in a batch attend to each other")
    checkpoint_layout: ClassVar[str | None] = "<prefix>.config.json + <prefix>.best.ckpt (e.g. 20230926_85M)"
    needs_counts: ClassVar[bool] = True
    sequence_keys: ClassVar[tuple[str, ...]] = ()
    pad_values: ClassVar[dict[str, int | float]] = {}
    #: the plan's vocabulary rows, the same for every cell of a dataset: one (G,) array per batch
    shared_keys: ClassVar[tuple[str, ...]] = ("gene_idx",)
    batch_invariant: ClassVar[bool] = False
    default_batch_size: ClassVar[int] = 50_000
    options_spec: ClassVar[tuple[Option, ...]] = (
        Option("prefix", str, None, "which <prefix>.config.json / <prefix>.best.ckpt pair; default: the only one "
               "in the folder"),
        Option("batch_size", int, None, "cells per forward, i.e. the cells attending to each other; default "
               "50,000 (as the original's score)", check=at_least(1)),
        Option("cluster", str, "sample", "sample: per-cell seeded Gumbel draw of the GMVAE cluster (as the "
               "original); argmax: the most likely cluster", choices=_CLUSTER_MODES),
        Option("seed", int, 0, "global seed of the per-cell cluster draws"),
    )

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        super().__init__(checkpoint, **options)
        if self.options["batch_size"] is not None:
            self.default_batch_size = self.options["batch_size"]  # type: ignore[misc]  # instance override
        self._cluster_mode: str = self.options["cluster"]
        self._seed: int = self.options["seed"]
        self.model: CellPLMModel | None = None
        self.config: dict[str, Any] = {}
        self.gene_list: list[str] = []
        self._prefix: str | None = None

    # -- set-up ---------------------------------------------------------------------------
    def load(self, *, device: torch.device, dtype: torch.dtype) -> None:
        assert self.checkpoint is not None
        config_path, ckpt_path = _find_files(self.checkpoint, self.options["prefix"])
        self._prefix = config_path.name[: -len(_CONFIG_SUFFIX)]
        cfg = _read_config(config_path)
        self.config = {k: v for k, v in cfg.items() if k != "gene_list"}
        self.gene_list = [str(g) for g in cfg["gene_list"]]
        model = CellPLMModel(
            n_genes=len(self.gene_list), enc_hid=int(cfg["enc_hid"]), enc_layers=int(cfg["enc_layers"]),
            enc_head=int(cfg.get("enc_head", 8)), post_latent_dim=int(cfg["post_latent_dim"]),
            num_clusters=int(cfg.get("num_clusters", 16)), norm=str(cfg.get("norm", "layernorm")),
            dropout=float(cfg.get("model_dropout", 0.1)))
        state = _read_state_dict(ckpt_path, trust=self.trust_checkpoint)
        load_strict(model, state, ignore=_SKIP_PREFIXES,
                    what=f"{str(ckpt_path)!r} does not match the CellPLM embedding model of {config_path.name}",
                    fix="use the .best.ckpt released with this config.json")
        self.device, self.dtype = device, dtype
        self.model = model.to(device=device, dtype=dtype).eval()
        self._dim = int(cfg["post_latent_dim"])

    def prepare(self, genes: GeneTable) -> GenePlan:
        """Match Ensembl ids to the config's gene list; ``columns`` are the matched dataset
        columns (dataset order) and ``vocab_ids`` their rows in the gene list."""
        self.require_loaded("prepare")
        ens = pd.Index(np.asarray(genes.ensembl, dtype=object).astype(str))
        pos = pd.Index(self.gene_list).get_indexer(ens)
        # ``var_names_make_unique``: only the first occurrence of an id keeps it; "" never matches
        keep = (~ens.duplicated(keep="first")) & (ens != "") & (pos >= 0)
        data_idx = np.flatnonzero(keep).astype(np.int64)
        gene_idx = pos[keep].astype(np.int64)
        if len(data_idx) == 0:
            raise InputError("no gene of the dataset matches CellPLM's Ensembl gene list",
                             "give var an 'ensembl_id' column (or Ensembl var_names)")
        overlap = GeneOverlap(n_vocab=len(self.gene_list), n_vocab_in_data=len(gene_idx),
                              n_data=len(genes), n_data_used=len(data_idx))
        return GenePlan(overlap=overlap, columns=data_idx, vocab_ids=gene_idx)

    def genes_used(self, plan: GenePlan) -> list[str]:
        """Ensembl ids of the matched genes, in dataset order (as the original feeds them)."""
        return [self.gene_list[i] for i in plan.vocab_ids]

    # -- per chunk / batch ----------------------------------------------------------------
    def tokenize(self, chunk: CellChunk, plan: GenePlan) -> list[dict[str, np.ndarray]]:
        """Per cell: ``counts`` on the matched genes, their vocabulary rows ``gene_idx`` (one
        shared read-only array) and, for ``cluster='sample'``, the per-cell ``noise``."""
        if plan.overlap.n_data != chunk.X.shape[1]:
            raise InputError(f"cellplm: the chunk has {chunk.X.shape[1]} genes but the gene plan was made "
                             f"for {plan.overlap.n_data}", "tokenize with the plan prepare() made for these genes")
        dense = sp.csr_matrix(chunk.X)[:, plan.columns].toarray().astype(np.float32, copy=False)
        gene_idx = plan.vocab_ids.astype(np.int32)
        gene_idx.setflags(write=False)
        cells: list[dict[str, np.ndarray]] = [{"counts": row, "gene_idx": gene_idx} for row in dense]
        if self._cluster_mode == "sample":
            k = int(self.config.get("num_clusters", 16))
            for cell, cid in zip(cells, chunk.cell_ids, strict=True):
                rng = np.random.default_rng(cell_seed(str(cid), self._seed))
                cell["noise"] = rng.random(k, dtype=np.float32)
        return cells

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """All cells of ``batch`` are embedded together (they attend to each other)."""
        self.require_loaded("forward")
        return self.model(batch["counts"], batch["gene_idx"].long(), noise=batch.get("noise"),
                          cluster=batch.get("cluster"))

    def pool(self, output: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return output["mean"].float()

    # -- description ----------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {
            "checkpoint_prefix": self._prefix,
            "genes": "Ensembl ids matched to the config gene_list; first occurrence of a duplicate kept",
            "input": "log1p(raw counts), no library-size normalisation",
            "encoder": f"flowformer x{self.config.get('enc_layers')}, cells attend across the batch",
            "batch_size": int(self.default_batch_size),
            "batching": "consecutive cells in file order (not batch-invariant)",
            "pooling": "gmvae latent mean (q(z|h,y) mean)",
            "cluster": self._cluster_mode,
            "seed": self._seed if self._cluster_mode == "sample" else None,
        }
