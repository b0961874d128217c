"""scBERT cell embeddings: the pre-trained ``PerformerLM`` of
github:TencentAILabHealthcare/scBERT@262fd4b9, run as ``predict.py``/``finetune.py`` feed it,
pooled as scDrugMap pools it (mean of the last layer), with the genes kept in place.

Checkpoint folder (``checkpoint_layout``):

* ``panglao_pretrain.pth``: the ``torch.save`` dict of ``utils.save_ckpt``; its
  ``'model_state_dict'`` is loaded strictly, as ``finetune.py`` does
  (``PerformerLM(num_tokens=7, dim=200, depth=6, max_seq_len=16907, heads=10,
  local_attn_heads=0, g2v_position_emb=True)``; the architecture is read from the tensor
  shapes, so other sizes load too). The MLM head ``to_out`` (or a fine-tuned classifier
  head) is recognised and not built;
* the model's 16,906-gene list in model order (``panglao_10000.h5ad`` var_names in the
  original): ``genes.txt`` beside the checkpoint, or ``gene_list=PATH`` (text/csv or h5ad);
* ``gene2vec_16906.npy`` (optional): the original constructor loads it, then
  ``load_state_dict`` overwrites the table with the checkpoint's ``pos_emb.emb.weight``
  (frozen in training, hence identical); when present it is cross-checked.

Per cell (``preprocess.py`` + the fine-tune ``SCDataset``):

1. the counts are laid on the model's 16,906-gene axis BY GENE IDENTITY (exact symbol; a
   gene the dataset lacks is 0);
2. ``normalize_total(target_sum=1e4)`` over those genes, then ``log1p(base=2)`` (the
   original ``preprocess.py`` passes ``base=2``);
3. ``x[x > 5] = 5; x.long()`` (``CLASS - 2`` with ``CLASS = bin_num + 2 = 7``; the clip is
   ``num_tokens - 2`` of the checkpoint), then a 0 token is appended: 16,907 tokens;
4. embedding = mean over all 16,907 positions of the final-LayerNorm hidden states
   (``return_encodings=True``).

Every cell is a fixed-length sequence (no padding), so ``sequence_keys`` is empty. The
original's ``filter_cells(min_genes=200)`` drops cells; here every cell is embedded.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import CheckpointError
from ._performer import PerformerAdapter, bin_values
from .base import CellChunk, GenePlan
from .nn.performer import PerformerConfig


class ScBERTAdapter(PerformerAdapter):
    """scBERT (Performer over 16,906 genes, 7 expression bins); 200-d mean of the last layer.

    Options (keyword-only): ``gene_list`` (PATH of the model's gene list; default
    ``genes.txt`` beside the checkpoint), ``checkpoint_file`` (name in the folder),
    ``gene2vec`` (PATH, cross-check only), ``target_sum`` (1e4), ``log_base`` (2; ``'e'`` for
    natural log). Full unpickling of a trusted checkpoint only with ``--trust-checkpoint``.
    """

    name: ClassVar[str] = "scbert"
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ("scBERT Performer (16,906 genes kept in model order, 7 bins); "
                                  "mean of the last layer")
    checkpoint_layout: ClassVar[str | None] = (
        "panglao_pretrain.pth (dict with 'model_state_dict'), genes.txt (the 16,906 genes in model "
        "order, or pass gene_list=PATH) and optionally gene2vec_16906.npy")
    needs_counts: ClassVar[bool] = True
    sequence_keys: ClassVar[tuple[str, ...]] = ()
    pad_values: ClassVar[dict[str, int | float]] = {}
    batch_invariant: ClassVar[bool] = True
    default_batch_size: ClassVar[int] = 4
    checkpoint_names: ClassVar[tuple[str, ...]] = ("panglao_pretrain.pth", "panglao_pretrained.pth")
    gene2vec_name: ClassVar[str] = "gene2vec_16906.npy"
    gene_list_names: ClassVar[tuple[str, ...]] = ("genes.txt", "genes.csv", "genes.tsv", "panglao_10000.h5ad")
    n_extra_positions: ClassVar[int] = 1

    def __init__(self, checkpoint: Any = None, **options: Any) -> None:
        super().__init__(checkpoint, **options)
        self.max_bin = 5

    def _check_config(self, cfg: PerformerConfig) -> None:
        if cfg.num_tokens < 3:
            raise CheckpointError(f"scbert: token_emb has {cfg.num_tokens} rows; expected bin_num + 2 (7)",
                                  "pass the official scBERT checkpoint")
        self.max_bin = cfg.num_tokens - 2  # CLASS - 2

    # -- per chunk / batch ------------------------------------------------------------------
    def tokenize(self, chunk: CellChunk, plan: GenePlan) -> list[dict[str, np.ndarray]]:
        """Per cell: the 16,907 bin ids (uint8) on the model's gene axis + the appended 0."""
        vals = self.model_values(chunk, plan)
        n_cells, n_genes = vals.shape
        tokens = np.zeros((n_cells, n_genes + 1), dtype=np.uint8)
        rows = np.repeat(np.arange(n_cells), np.diff(vals.indptr))
        tokens[rows, vals.indices] = bin_values(vals.data, self.max_bin)
        return [{"tokens": tokens[i]} for i in range(n_cells)]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final-LayerNorm hidden states (B, 16,907, dim)."""
        return self._require_model()(batch["tokens"].long())

    def pool(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean over all positions (every cell has the same, unpadded length)."""
        return output.float().mean(dim=1)

    def settings(self) -> dict[str, Any]:
        return {
            **self.base_settings(),
            "binning": f"clip at {self.max_bin} (CLASS-2), truncate to int; a 0 token appended",
            "sequence": "all model genes in model order + 1 (no padding)",
            "pooling": "mean over all positions of the final LayerNorm output",
        }
