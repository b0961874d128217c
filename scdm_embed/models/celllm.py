"""CellLM cell embeddings: ``PerformerLM_CellLM`` of github:PharMolix/OpenBioMed
(``open_biomed/models/cell/performer_celllm.py``), configured as ``configs/ctc/cellLM.json``
(``num_tokens=8, dim=512, depth=10, heads=16, max_seq_len=6000, gene_num=19379``), pooled
as the mean of the last layer over the cell's tokens.

What the original code fixes (read from OpenBioMed; CellLM's paper and weights are not in
the repository):

* checkpoint: a ``torch.save`` dict whose ``'model_state_dict'`` (``param_key``) loads
  strictly into ``PerformerLM_CellLM`` (``ctc_model.py``); the key names are scBERT's
  PerformerLM names, the LM head ``to_out`` is ``Linear(dim, num_tokens)``. The architecture
  is read from the tensor shapes here;
* ``pos_emb.emb.weight``: ``gene2vec_19379_512.npy`` + a row of ones (CLS, row 19,379) + a
  row of zeros (PAD, row 19,380), frozen; the checkpoint's copy is used;
* tokens: ``num_tokens - 1`` = PAD (7), ``num_tokens - 2`` = CLS (6); expression bins
  ``0 .. CLS-1`` (the value is clipped at ``CLS - 1 = 5`` and truncated to an integer);
* the encoder's input is the full 19,379-gene vector of (normalised) values in the model's
  gene order (``CellFullseqFeaturizer``); inside ``forward`` only genes with value > 0 are
  kept, in gene order, after a CLS token: ``[CLS, g_1, ..., g_k]`` with gene2vec positions
  ``[19379, i_1, ..., i_k]``, truncated to ``max_seq_len`` (6,000) and then PADDED to
  ``max_seq_len`` with PAD tokens at position 19,380; the attention mask zeroes the pads'
  values but the pads' keys still enter the FAVOR+ normaliser and the key max, so the pad
  count ``max_seq_len - (k + 1)`` changes the result. This is reproduced exactly and cheaply:
  every pad has the same hidden state at every layer, so one PAD position with key weight
  ``max_seq_len - (k + 1)`` stands for all of them (weight 0 when there are none);
* the gene list: the var_names of the h5ad the model was trained/fine-tuned on
  (``zheng68k_hgnc.h5ad``, 19,379 HGNC symbols); no public copy exists, so it must be
  passed (``gene_list=PATH``, or ``genes.txt`` beside the checkpoint);
* values: OpenBioMed reads ``data.X`` of that pre-processed h5ad; the pre-processing is not
  in the repository. Inferred: scBERT's ``preprocess.py`` (CellLM is benchmarked against
  scBERT on the same data), i.e. ``normalize_total(1e4)`` on the model's genes then
  ``log1p(base=2)``; both are options.

Embedding: mean over the cell's real tokens (CLS + its expressed genes) of the final
LayerNorm output (``return_encodings=True``; pads are zeroed there by the original).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import CheckpointError
from ._performer import PerformerAdapter, bin_values
from .base import CellChunk, GenePlan, masked_mean
from .nn.performer import PerformerConfig
from .options import Option, at_least


class CellLMAdapter(PerformerAdapter):
    """CellLM (Performer over the expressed genes of 19,379, CLS first); 512-d mean of the
    last layer.

    Options (keyword-only): ``gene_list`` (PATH of the 19,379 genes in model order; default
    ``genes.txt`` beside the checkpoint), ``checkpoint_file``, ``gene2vec`` (PATH, cross-check
    only), ``max_seq_len`` (6000, the config's; sets truncation and the pad count),
    ``target_sum`` (1e4), ``log_base`` (2; ``'e'`` for natural log). Full unpickling of a
    trusted checkpoint only with ``--trust-checkpoint``.
    """

    name: ClassVar[str] = "celllm"
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ("CellLM Performer (CLS + expressed genes of 19,379, gene2vec "
                                  "positions); mean of the last layer")
    checkpoint_layout: ClassVar[str | None] = (
        "checkpoint4_fixed.pth (dict with 'model_state_dict'), genes.txt (the 19,379 genes in model "
        "order, or pass gene_list=PATH) and optionally gene2vec_19379_512.npy")
    needs_counts: ClassVar[bool] = True
    sequence_keys: ClassVar[tuple[str, ...]] = ("tokens", "genes")
    pad_values: ClassVar[dict[str, int | float]] = {"tokens": 0, "genes": 0}
    batch_invariant: ClassVar[bool] = True
    default_batch_size: ClassVar[int] = 8
    checkpoint_names: ClassVar[tuple[str, ...]] = ("checkpoint4_fixed.pth", "celllm.pth")
    gene2vec_name: ClassVar[str] = "gene2vec_19379_512.npy"
    n_extra_positions: ClassVar[int] = 2
    options_spec: ClassVar[tuple[Option, ...]] = (
        *PerformerAdapter.options_spec,
        Option("max_seq_len", int, 6000, "the config's max_seq_len: truncation (CLS + genes) and the pad count",
               check=at_least(2)),
    )

    def __init__(self, checkpoint: Any = None, **options: Any) -> None:
        super().__init__(checkpoint, **options)
        self.max_seq_len: int = self.options["max_seq_len"]
        self.pad_token = self.cls_token = self.max_bin = -1
        self.cls_gene = self.pad_gene = -1

    def _check_config(self, cfg: PerformerConfig) -> None:
        if cfg.num_tokens < 3:
            raise CheckpointError(f"celllm: token_emb has {cfg.num_tokens} rows; expected bins + CLS + PAD (8)",
                                  "pass the official CellLM checkpoint")
        self.pad_token, self.cls_token = cfg.num_tokens - 1, cfg.num_tokens - 2
        self.max_bin = self.cls_token - 1
        n_genes = cfg.n_positions - 2
        self.cls_gene, self.pad_gene = n_genes, n_genes + 1

    # -- per chunk / batch ------------------------------------------------------------------
    def tokenize(self, chunk: CellChunk, plan: GenePlan) -> list[dict[str, np.ndarray]]:
        """Per cell: ``[CLS, bins of expressed genes (gene order)..., PAD]`` and their gene2vec
        rows; the one PAD stands for all ``max_seq_len - (k + 1)`` pads of the original."""
        self.require_loaded("tokenize")
        vals = self.model_values(chunk, plan)
        keep = self.max_seq_len - 1
        bins = bin_values(vals.data, self.max_bin)
        cells: list[dict[str, np.ndarray]] = []
        for r in range(vals.shape[0]):
            a, b = vals.indptr[r], vals.indptr[r + 1]
            pos = vals.data[a:b] > 0
            genes, toks = vals.indices[a:b][pos][:keep], bins[a:b][pos][:keep]
            cells.append({
                "tokens": np.concatenate([[self.cls_token], toks, [self.pad_token]]).astype(np.int64),
                "genes": np.concatenate([[self.cls_gene], genes, [self.pad_gene]]).astype(np.int64),
            })
        return cells

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Final-LayerNorm hidden states (B, L, dim) and the real-token mask (B, L)."""
        model = self._require_model()
        genes = batch["genes"].long()
        in_batch = batch["attention_mask"].bool()
        pad = in_batch & (genes == self.pad_gene)
        real = in_batch & ~pad
        n_pad = (self.max_seq_len - real.sum(dim=1)).clamp_min(0)
        key_weight = real.float() + pad.float() * n_pad[:, None].float()
        hidden = model(batch["tokens"].long(), genes, key_weight=key_weight, value_mask=real)
        return hidden, real

    def pool(self, output: tuple[torch.Tensor, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean over CLS + the expressed genes."""
        hidden, real = output
        return masked_mean(hidden, real)

    def settings(self) -> dict[str, Any]:
        return {
            **self.base_settings(),
            "binning": f"genes with value > 0, clip at {self.max_bin} (CLS-1), truncate to int",
            "sequence": f"[CLS] + expressed genes in model order, truncated and padded to max_seq_len="
                        f"{self.max_seq_len} (pads as one weighted key)",
            "pooling": "mean over CLS + expressed genes of the final LayerNorm output",
        }
