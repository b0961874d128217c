"""scFoundation (MaeAutobin) cell embeddings: a clean PyTorch re-implementation of the
inference path of ``model/get_embedding.py`` (``--output_type cell``) of
github:biomap-research/scFoundation.

Checkpoint: the official ``models.ckpt`` (a dict with ``'gene'``, ``'cell'`` and ``'rde'``
entries, each ``{'config': ..., 'state_dict': {'model.<name>': tensor}}``), read as
``load.load_model_frommmf`` reads it, plus the 19,264-gene index
``OS_scRNA_gene_index.19264.tsv`` (beside the checkpoint or given as ``gene_index=PATH``).

Per cell (``pre_normalized='F'``):

1. the dataset's genes are aligned by exact symbol to the 19,264-gene index (missing genes
   count as zero, as ``main_gene_selection`` fills them);
2. ``total`` = sum of the ALIGNED counts (not the full library size: the original normalises
   after alignment); values ``log1p(x / total * 1e4)``, then two extra tokens
   ``T`` (target resolution, ``tgthighres``: ``t4`` -> 4.0) and ``S = log10(total)``;
3. the encoder sees only the positive entries of the 19,266-vector, in index order
   (``gatherData``), with position ids = index positions (T = 19,264, S = 19,265);
4. token embedding = soft-binned value embedding (``AutoDiscretizationEmbedding2``) +
   positional embedding, then a post-norm transformer encoder and a final LayerNorm;
5. ``pool_type='all'``: ``concat[last token (S), second-to-last (T), max over the rest,
   mean over the rest]`` -> 4 x hidden (3,072 for the released model).

Cells are batched with right padding and a key-padding mask; pads never enter attention or
pooling, so a cell's embedding does not depend on its batch. Only the encoder is built: the
decoder's checkpoint keys (``decoder.*``, ``decoder_embed.*``, ``norm.*``, ``to_final.*``)
are recognised and intentionally not loaded; any other unknown or missing key is an error.

Module names follow the original (``token_emb``, ``pos_emb``,
``encoder.transformer_encoder.<i>.{self_attn.out_proj, linear1, linear2, norm1, norm2}``,
``encoder.norm``). The one difference: ``nn.MultiheadAttention``'s packed
``self_attn.in_proj_weight``/``in_proj_bias`` parameters live in an ``nn.Linear`` called
``self_attn.in_proj`` (checkpoint keys are renamed on load), so the q/k/v projection is a
module that LoRA can wrap. Every projection is a real module call on the forward path.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, InputError, ScdmError
from ..genes import GeneTable
from ._checkpoint import load_strict
from ._safe_load import torch_load
from .base import Adapter, CellChunk, GeneOverlap, GenePlan, masked_max, masked_mean, sha256_file
from .nn.attention import encoder_layers
from .options import Option

_CKPT_NAME = "models.ckpt"
_GENE_INDEX_NAME = "OS_scRNA_gene_index.19264.tsv"
#: checkpoint keys of the decoder half of MaeAutobin: recognised, not loaded (not needed
#: for cell embeddings)
_DECODER_PREFIXES = ("decoder.", "decoder_embed.", "norm.", "to_final.")
#: ``--version`` of get_embedding.py -> checkpoint entry
_VERSION_KEYS = {"ce": "cell", "rde": "rde"}
_IN_PROJ_RENAMES = {"self_attn.in_proj_weight": "self_attn.in_proj.weight",
                    "self_attn.in_proj_bias": "self_attn.in_proj.bias"}


# -- the model --------------------------------------------------------------------------------
class _AutoDiscretizationEmbedding(nn.Module):
    """Soft-binned scalar value embedding (``AutoDiscretizationEmbedding2``).

    ``softmax(mlp2(a) + bin_alpha * a)`` with ``a = LeakyReLU_0.1(mlp(x))`` weights a table of
    ``bin_num`` bin embeddings. Values equal to the mask/pad token id get the mask/pad
    embedding instead (as in the original, a real value of exactly that id does too).
    """

    def __init__(self, dim: int, bin_num: int, bin_alpha: float, mask_token_id: int,
                 pad_token_id: int) -> None:
        super().__init__()
        self.bin_num = bin_num
        self.bin_alpha = bin_alpha
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id
        self.mlp = nn.Linear(1, bin_num)
        self.mlp2 = nn.Linear(bin_num, bin_num)
        self.emb = nn.Embedding(bin_num, dim)
        self.emb_mask = nn.Embedding(1, dim)
        self.emb_pad = nn.Embedding(1, dim)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (B, L) -> (B, L, dim)."""
        h = F.leaky_relu(self.mlp(values.unsqueeze(-1)), 0.1)
        weight = torch.softmax(self.mlp2(h) + self.bin_alpha * h, dim=-1)
        table = self.emb(torch.arange(self.bin_num, device=values.device))
        x = weight @ table
        zero = torch.zeros(1, dtype=torch.long, device=values.device)
        x = torch.where((values == self.mask_token_id).unsqueeze(-1), self.emb_mask(zero).to(x.dtype), x)
        x = torch.where((values == self.pad_token_id).unsqueeze(-1), self.emb_pad(zero).to(x.dtype), x)
        return x


class _TransformerEncoder(nn.Module):
    """``pytorchTransformerModule``: a stack of post-norm layers (``nn.TransformerEncoderLayer``
    with ``batch_first=True``, ReLU, ``dim_feedforward = 4*dim``, dropout 0.1) and a final LayerNorm."""

    def __init__(self, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise CheckpointError(f"encoder hidden_dim {dim} is not divisible by heads {heads}",
                                  "use the official scFoundation checkpoint")
        self.transformer_encoder = encoder_layers(depth, dim, heads, 4 * dim, 0.1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        for layer in self.transformer_encoder:
            x = layer(x, key_mask)
        return self.norm(x)


class _MaeAutobinEncoder(nn.Module):
    """The encoder half of ``MaeAutobin`` (all the cell embedding needs)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        enc = cfg["encoder"]
        self.seq_len = int(cfg["seq_len"])
        self.pad_token_id = cfg["pad_token_id"]
        self.token_emb = _AutoDiscretizationEmbedding(
            enc["hidden_dim"], int(cfg["bin_num"]), float(cfg["bin_alpha"]),
            mask_token_id=cfg["mask_token_id"], pad_token_id=cfg["pad_token_id"])
        self.pos_emb = nn.Embedding(self.seq_len + 1, enc["hidden_dim"])
        self.encoder = _TransformerEncoder(enc["hidden_dim"], int(enc["depth"]), int(enc["heads"]))

    def forward(self, values: torch.Tensor, gene_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``values``/``gene_ids``/``attention_mask`` (B, L) -> hidden states (B, L, D).

        Keys are masked where the engine padded, and (as ``gatherData``'s
        ``padding_labels = values == pad_token_id`` does) where a value equals the pad id.
        """
        x = self.token_emb(values) + self.pos_emb(gene_ids)
        key_mask = attention_mask.bool() & (values != self.pad_token_id)
        return self.encoder(x, key_mask)


# -- helpers ------------------------------------------------------------------------------------
def _flatten_config(entry: dict[str, Any]) -> dict[str, Any]:
    """``load.convertconfig``: model config of the model type + the ``rnaseq`` data config."""
    try:
        model_type = entry["config"]["model"]
        cfg = dict(entry["config"]["model_config"][model_type])
        cfg.update(entry["config"].get("dataset_config", {}).get("rnaseq", {}))
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"the checkpoint entry has no usable 'config' ({err!r})",
                              "use the official scFoundation models.ckpt") from err
    cfg.setdefault("model", model_type)
    return cfg


def _parse_tgthighres(spec: str) -> tuple[str, float]:
    mode, rest = (spec[:1], spec[1:]) if spec else ("", "")
    try:
        amount = float(rest)
    except ValueError:
        amount = math.nan
    if mode not in ("t", "f", "a") or not math.isfinite(amount):
        raise ScdmError(f"scfoundation: tgthighres={spec!r} is not understood",
                        "use t<value> (target, e.g. t4), f<fold> (fold change) or a<add> (addition)")
    return mode, amount


def _check_tgthighres(spec: str) -> str | None:
    """``check`` of the ``tgthighres`` option."""
    try:
        _parse_tgthighres(spec)
    except ScdmError:
        return "is not understood: use t<value> (target, e.g. t4), f<fold> (fold change) or a<add> (addition)"
    return None


# -- the adapter --------------------------------------------------------------------------------
class ScFoundationAdapter(Adapter):
    """scFoundation (MaeAutobin) cell embeddings, as ``get_embedding.py --output_type cell``.

    Options (keyword-only):

    - ``gene_index``: path of ``OS_scRNA_gene_index.19264.tsv`` (default: found beside the
      checkpoint file, or in its parent folder as in the official ``model/`` layout);
    - ``version``: ``'ce'`` (default, checkpoint entry ``'cell'``) or ``'rde'`` (read-depth
      enhancement, entry ``'rde'``), as in get_embedding.py; ``key`` names the entry directly;
    - ``tgthighres``: ``'t4'`` (default), ``t<x>``: T = x; ``f<x>``: T = log10(total*x);
      ``a<x>``: T = log10(total)+x;
    - ``pre_normalized``: ``'F'`` (default, raw counts) or ``'T'`` (values already
      normalised + log1p; then total = sum of those values, as in the original);
    - ``pool_type``: ``'all'`` (default, 4 x hidden) or ``'max'`` (max over all tokens).

    ``models.ckpt`` is read with ``torch.load(weights_only=True)``; full unpickling only with
    ``trust_checkpoint=True`` (``--trust-checkpoint``).
    """

    name: ClassVar[str] = "scfoundation"
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ("scFoundation MaeAutobin encoder (19,264 genes; "
                                  "concat[S, T, max, mean] of the non-zero-gene encoding)")
    checkpoint_layout: ClassVar[str | None] = (
        f"{_CKPT_NAME} (official {{'gene','cell','rde'}} file) and {_GENE_INDEX_NAME} "
        "(beside it, or pass gene_index=PATH)")
    needs_counts: ClassVar[bool] = True
    sequence_keys: ClassVar[tuple[str, ...]] = ("values", "gene_ids")
    pad_values: ClassVar[dict[str, int | float]] = {"values": 0.0, "gene_ids": 0}
    batch_invariant: ClassVar[bool] = True
    default_batch_size: ClassVar[int] = 16
    #: module-name suffixes of the encoder's projections (for LoRA ``target_modules``)
    lora_targets: ClassVar[tuple[str, ...]] = ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2")
    options_spec: ClassVar[tuple[Option, ...]] = (
        Option("gene_index", Path, None, f"the {_GENE_INDEX_NAME} file; default: beside the checkpoint file "
               "or in its parent folder"),
        Option("version", str, "ce", "ce (checkpoint entry 'cell') or rde (read-depth enhancement, entry 'rde'), "
               "as get_embedding.py", choices=tuple(_VERSION_KEYS)),
        Option("key", str, None, "checkpoint entry to read; default: the one of version"),
        Option("tgthighres", str, "t4", "t<x>: T = x; f<x>: T = log10(total*x); a<x>: T = log10(total)+x",
               check=_check_tgthighres),
        Option("pre_normalized", str, "F", "F: raw counts; T: values already normalised + log1p (total = their "
               "sum); the original's A (total count as an extra column) does not fit gene alignment",
               choices=("F", "T")),
        Option("pool_type", str, "all", "all: concat[S, T, max, mean] (4 x hidden); max: max over all tokens",
               choices=("all", "max")),
    )

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        super().__init__(checkpoint, **options)
        self._tgt_mode, self._tgt_amount = _parse_tgthighres(self.options["tgthighres"])
        self._pre_normalized: str = self.options["pre_normalized"]
        if self._pre_normalized == "T":
            self.needs_counts = False  # instance override: values are normalised already
        self._pool_type: str = self.options["pool_type"]
        self._key: str = self.options["key"] or _VERSION_KEYS[self.options["version"]]
        self._cfg: dict[str, Any] = {}
        self._genes: np.ndarray | None = None
        self._gene_index_path: Path | None = None
        self.model: _MaeAutobinEncoder | None = None

    # -- files ------------------------------------------------------------------------------
    def _ckpt_file(self) -> Path:
        assert self.checkpoint is not None
        if self.checkpoint.is_file():
            return self.checkpoint
        for cand in (self.checkpoint / _CKPT_NAME, self.checkpoint / "models" / _CKPT_NAME):
            if cand.is_file():
                return cand
        raise CheckpointError(f"no {_CKPT_NAME} in {str(self.checkpoint)!r}",
                              f"pass --checkpoint DIR holding the official scFoundation {_CKPT_NAME}")

    def _gene_index_file(self) -> Path:
        given = self.options["gene_index"]
        if given is not None:
            path = Path(given)
            if not path.is_file():
                raise CheckpointError(f"gene_index {str(path)!r} does not exist",
                                      f"pass gene_index=PATH of the official {_GENE_INDEX_NAME}")
            return path
        ckpt = self._ckpt_file()
        for folder in (ckpt.parent, ckpt.parent.parent):
            if (folder / _GENE_INDEX_NAME).is_file():
                return folder / _GENE_INDEX_NAME
        raise CheckpointError(f"{_GENE_INDEX_NAME} was not found beside {str(ckpt)!r} (nor in its parent folder)",
                              f"put the official {_GENE_INDEX_NAME} beside {_CKPT_NAME} or pass gene_index=PATH")

    def _read_gene_index(self) -> np.ndarray:
        if self._genes is None:
            path = self._gene_index_file()
            try:
                df = pd.read_csv(path, sep="\t", header=0)
                genes = df["gene_name"].astype(str).to_numpy(dtype=object)
            except (KeyError, ValueError, pd.errors.ParserError) as err:
                raise CheckpointError(f"{str(path)!r} is not a gene index with a 'gene_name' column ({err})",
                                      f"use the official {_GENE_INDEX_NAME}") from err
            if len(set(genes)) != len(genes):
                raise CheckpointError(f"{str(path)!r} lists duplicated genes", f"use the official {_GENE_INDEX_NAME}")
            self._genes, self._gene_index_path = genes, path
        return self._genes

    # -- set-up -----------------------------------------------------------------------------
    def load(self, *, device: torch.device, dtype: torch.dtype) -> None:
        """Read the ``key`` entry of ``models.ckpt`` strictly (as ``load_model_frommmf``)."""
        path = self._ckpt_file()
        raw = torch_load(path, trust=self.trust_checkpoint, what="the scFoundation checkpoint")
        if not isinstance(raw, dict) or self._key not in raw:
            found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise CheckpointError(f"{str(path)!r} has no {self._key!r} entry (found: {found})",
                                  f"use the official {_CKPT_NAME} with 'gene', 'cell' and 'rde' entries")
        entry = raw[self._key]
        cfg = _flatten_config(entry)
        self._check_config(cfg, path)
        state = self._renamed_state(entry, path)
        model = _MaeAutobinEncoder(cfg)
        # the decoder half is recognised and not loaded (the module has no such keys)
        load_strict(model, state, ignore=_DECODER_PREFIXES,
                    what=f"{str(path)!r} entry {self._key!r} does not match the scFoundation encoder",
                    fix=f"use the official scFoundation {_CKPT_NAME}")
        genes = self._read_gene_index()
        if len(genes) != model.seq_len - 2:
            raise CheckpointError(
                f"the gene index has {len(genes)} genes but the checkpoint expects seq_len - 2 = "
                f"{model.seq_len - 2}", f"use the {_GENE_INDEX_NAME} that belongs to the checkpoint")
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype, self._cfg = device, dtype, cfg
        hidden = model.pos_emb.embedding_dim
        self._dim = 4 * hidden if self._pool_type == "all" else hidden

    @staticmethod
    def _check_config(cfg: dict[str, Any], path: Path) -> None:
        need = ("seq_len", "pad_token_id", "mask_token_id", "bin_num", "bin_alpha", "encoder")
        absent = [k for k in need if k not in cfg]
        if cfg.get("model") != "mae_autobin" or absent:
            raise CheckpointError(f"{str(path)!r} is not a mae_autobin checkpoint (model={cfg.get('model')!r}, "
                                  f"missing config keys {absent})", f"use the official scFoundation {_CKPT_NAME}")
        enc = cfg["encoder"]
        if enc.get("module_type") != "transformer":
            raise CheckpointError(f"encoder module_type {enc.get('module_type')!r} is not implemented",
                                  "only the released transformer encoder is supported")

    def _renamed_state(self, entry: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
        """Strip the ``model.`` prefix (``convertconfig``) and unpack the MHA parameter names."""
        sd = entry.get("state_dict") if isinstance(entry, dict) else None
        if not isinstance(sd, dict):
            raise CheckpointError(f"{str(path)!r} entry {self._key!r} has no state_dict",
                                  f"use the official scFoundation {_CKPT_NAME}")
        out: dict[str, torch.Tensor] = {}
        for key, val in sd.items():
            if not str(key).startswith("model."):
                raise CheckpointError(f"{str(path)!r}: state_dict key {key!r} lacks the 'model.' prefix",
                                      f"use the official scFoundation {_CKPT_NAME}")
            name = str(key)[len("model."):]
            for old, new in _IN_PROJ_RENAMES.items():
                if name.endswith(old) and not name.startswith(_DECODER_PREFIXES):
                    name = name[: -len(old)] + new
            out[name] = val
        return out

    def prepare(self, genes: GeneTable) -> GenePlan:
        """Exact symbol match to the gene index (``main_gene_selection``); the first of
        duplicated dataset symbols is used. ``columns`` are in gene-index order and
        ``vocab_ids`` their gene-index positions."""
        vocab = self._read_gene_index()
        pos = {g: i for i, g in enumerate(vocab)}
        data_pos = np.array([pos.get(str(s), -1) if s else -1 for s in genes.symbols], dtype=np.int64)
        cols = np.flatnonzero(data_pos >= 0)
        _, first = np.unique(data_pos[cols], return_index=True)
        cols = cols[np.sort(first)]
        order = np.argsort(data_pos[cols], kind="stable")
        data_cols = cols[order]
        vocab_pos = data_pos[data_cols]
        overlap = GeneOverlap(n_vocab=len(vocab), n_vocab_in_data=len(vocab_pos),
                              n_data=len(genes), n_data_used=len(vocab_pos))
        return GenePlan(overlap=overlap, columns=data_cols, vocab_ids=vocab_pos)

    # -- per chunk / batch ------------------------------------------------------------------
    def tokenize(self, chunk: CellChunk, plan: GenePlan) -> list[dict[str, np.ndarray]]:
        """Per cell: positive ``[log1p(x/total*1e4)..., T, S]`` values and their positions."""
        if plan.overlap.n_data != chunk.X.shape[1]:
            raise InputError(f"scfoundation: the chunk has {chunk.X.shape[1]} genes but the gene plan was made "
                             f"for {plan.overlap.n_data}", "tokenize with the plan prepare() made for these genes")
        n_genes = plan.overlap.n_vocab
        # float32 arithmetic throughout, as the original computes on a float32 matrix
        # (the reference inputs agree bit for bit); the total is accumulated in float64
        sub = sp.csr_matrix(chunk.X[:, plan.columns], dtype=np.float32)
        sub.sort_indices()
        total = np.asarray(sub.sum(axis=1, dtype=np.float64)).ravel().astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            if self._pre_normalized == "F":
                vals = np.log1p(sub.data / np.repeat(total, np.diff(sub.indptr)) * np.float32(1e4))
            else:
                vals = sub.data.copy()
            s_tok = np.log10(total)
            if self._tgt_mode == "t":
                t_tok = np.full_like(total, self._tgt_amount)
            elif self._tgt_mode == "f":
                t_tok = np.log10(total * np.float32(self._tgt_amount))
            else:
                t_tok = np.log10(total) + np.float32(self._tgt_amount)
        vals32 = vals.astype(np.float32)
        ids = plan.vocab_ids[sub.indices]
        tail_vals = np.stack([t_tok, s_tok], axis=1).astype(np.float32)
        tail_ids = np.array([n_genes, n_genes + 1], dtype=np.int64)
        cells: list[dict[str, np.ndarray]] = []
        short: list[str] = []
        for r in range(sub.shape[0]):
            a, b = sub.indptr[r], sub.indptr[r + 1]
            v = np.concatenate([vals32[a:b], tail_vals[r]])
            g = np.concatenate([ids[a:b], tail_ids])
            keep = v > 0  # gatherData keeps the positive entries (NaN/inf<=0 dropped)
            if keep.sum() < 3:
                short.append(str(chunk.cell_ids[r]))
            cells.append({"values": v[keep], "gene_ids": g[keep]})
        if short:
            raise InputError(f"scfoundation: {len(short)} cell(s) have no positive counts on the 19,264 "
                             f"scFoundation genes (fewer than 3 tokens), e.g. {short[:5]}",
                             "filter cells by their counts on the model's genes before embedding")
        return cells

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Encoder hidden states (B, L, D) of the gathered non-zero tokens."""
        self.require_loaded("forward")
        values = batch["values"].to(self.dtype)
        return self.model(values, batch["gene_ids"].long(), batch["attention_mask"])

    def pool(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``all``: concat[S (last real token), T (second to last), max, mean over the rest]."""
        mask = batch["attention_mask"].bool()
        if self._pool_type == "max":
            return masked_max(output, mask)
        n = mask.sum(1)
        rows = torch.arange(output.shape[0], device=output.device)
        last = output[rows, n - 1].float()
        second = output[rows, n - 2].float()
        genes = torch.arange(output.shape[1], device=output.device)[None, :] < (n - 2)[:, None]
        return torch.cat([last, second, masked_max(output, genes), masked_mean(output, genes)], dim=1)

    # -- description ------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        gi = self._gene_index_path
        return {
            "checkpoint_entry": self._key,
            "gene_index": gi.name if gi is not None else _GENE_INDEX_NAME,
            "gene_index_sha256": "sha256:" + sha256_file(gi) if gi is not None else None,
            "gene_matching": "exact symbol, first duplicate; missing genes = 0",
            "total_count": "sum over the aligned 19,264 genes",
            "pre_normalized": self._pre_normalized,
            "normalization": "log1p(x / total * 1e4)" if self._pre_normalized == "F" else "as given",
            "tgthighres": f"{self._tgt_mode}{self._tgt_amount:g}",
            "tokens": "positive values in gene-index order, then T, S (positive only)",
            "pool_type": self._pool_type,
            "pooling": ("concat[S token, T token, max over genes, mean over genes]"
                        if self._pool_type == "all" else "max over all tokens"),
            "attention": "scaled_dot_product_attention, key padding mask",
            "encoder": {k: self._cfg.get("encoder", {}).get(k) for k in ("hidden_dim", "depth", "heads")},
        }
