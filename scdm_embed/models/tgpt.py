"""tGPT: a GPT-2 language model over ranked gene-symbol sentences (Shen et al., 2023).

Checkpoint: a Hugging Face GPT-2 folder (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``) with tGPT's gene-level WordLevel tokenizer (``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``), e.g.
``lixiangchun/transcriptome-gpt-1024-8-16-64``. The tokenizer may live elsewhere
(option ``tokenizer=DIR``).

What the published feature extraction (tGPT README, github:deeplearningplus/tGPT@9714a988) does,
reproduced here:

* a cell is the text of its gene symbols ranked by expression, with ``-``/``.`` replaced by
  ``_``; tGPT ships no counts-to-ranking script, so the ranking follows the reference fixture:
  raw counts, descending, stable (ties in ``var`` order), genes with count > 0 whose
  normalised symbol is a vocabulary token;
* the tokenizer (``max_length = 64``, truncation) frames it as ``</b>`` + 62 genes + ``</s>``;
  here the ids come straight from the vocabulary (vectorised; equal to the tokenizer's output);
* ``GPT2LMHeadModel(...).transformer``; the embedding is the mean of ``last_hidden_state``
  over the gene tokens, i.e. positions ``1 .. eos - 1`` (``</b>`` and ``</s>`` excluded).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from ..errors import CheckpointError
from ..genes import GeneTable
from ._hf import check_loading_info, hf_offline, load_hf_weights, read_hf_config
from ._sentences import ranked_columns, wrap_sequences, zeroed_mean
from .base import Adapter, CellChunk, GeneOverlap, GenePlan, hash_path
from .options import Option, at_least

_SYMBOL_SUB = r"[-.]"  #: characters the tGPT LineDataset replaces with "_"
_WORD = re.compile(r"\w+")  #: what survives the tokenizer's Whitespace pre-tokenizer as one token
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json",)


class TGPTAdapter(Adapter):
    """tGPT (GPT-2 over the top-expressed gene symbols); mean of the last layer over genes."""

    name: ClassVar[str] = "tgpt"
    lora_targets: ClassVar[tuple[str, ...]] = ("c_attn",)
    version: ClassVar[str] = "1"
    description: ClassVar[str] = "tGPT: GPT-2 on the top-62 ranked gene symbols; mean of last hidden state over gene tokens"
    checkpoint_layout: ClassVar[str | None] = (
        "a Hugging Face GPT-2 folder (config.json + model.safetensors or pytorch_model.bin) with the tGPT "
        "tokenizer (tokenizer.json, tokenizer_config.json, special_tokens_map.json), "
        "e.g. lixiangchun/transcriptome-gpt-1024-8-16-64"
    )
    needs_counts: ClassVar[bool] = True
    sequence_keys: ClassVar[tuple[str, ...]] = ("input_ids",)
    pad_values: ClassVar[dict[str, int]] = {"input_ids": 0}
    batch_invariant: ClassVar[bool] = True
    default_batch_size: ClassVar[int] = 64
    options_spec: ClassVar[tuple[Option, ...]] = (
        Option("max_len", int, None, "tokens per cell (<bos> + genes + <eos>), 3 .. the model's n_positions; "
               "default: n_positions", check=at_least(3)),
        Option("tokenizer", Path, None, "tokenizer folder or tokenizer.json; default: the checkpoint folder's"),
    )

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        super().__init__(checkpoint, **options)
        self.model: torch.nn.Module | None = None

    # -- set-up ---------------------------------------------------------------------------
    def _tokenizer_dir(self) -> Path:
        tok = self.options["tokenizer"]
        return Path(tok) if tok is not None else self.checkpoint

    def _check_files(self) -> None:
        ckpt = self.checkpoint
        fix = f"pass --checkpoint DIR holding {self.checkpoint_layout}"
        if not ckpt.is_dir():
            raise CheckpointError(f"tGPT checkpoint {str(ckpt)!r} is not a directory", fix)
        if not (ckpt / "config.json").is_file():
            raise CheckpointError(f"tGPT checkpoint {str(ckpt)!r} has no config.json", fix)
        if not any((ckpt / w).is_file() for w in _WEIGHTS):
            raise CheckpointError(f"tGPT checkpoint {str(ckpt)!r} has no weights (looked for {', '.join(_WEIGHTS)})", fix)
        tok = self._tokenizer_dir()
        if tok.is_file():
            return
        if not all((tok / f).is_file() for f in _TOKENIZER_FILES):
            raise CheckpointError(
                f"the tGPT tokenizer (tokenizer.json) is missing from {str(tok)!r}",
                "copy gpt2tokenizer/ of github:deeplearningplus/tGPT into the checkpoint, or pass tokenizer=DIR",
            )

    def _load_tokenizer(self) -> Any:
        from transformers import PreTrainedTokenizerFast

        tok = self._tokenizer_dir()
        try:
            if tok.is_file():
                return PreTrainedTokenizerFast(tokenizer_file=str(tok), bos_token="</b>", eos_token="</s>",
                                               unk_token="<unk>", pad_token="<pad>")
            return PreTrainedTokenizerFast.from_pretrained(str(tok), local_files_only=True)
        except Exception as err:
            raise CheckpointError(f"cannot read the tGPT tokenizer in {str(tok)!r}: {err}",
                                  "use the official gpt2tokenizer/ files of github:deeplearningplus/tGPT") from err

    def load(self, *, device: torch.device, dtype: torch.dtype) -> None:
        """Read the GPT-2 weights strictly and the gene vocabulary; keep ``.transformer``."""
        hf_offline()
        self._check_files()
        from transformers import GPT2Config, GPT2LMHeadModel

        fix = f"pass --checkpoint DIR holding {self.checkpoint_layout}"
        config = read_hf_config(GPT2Config, self.checkpoint, fix=fix)
        if config.model_type != "gpt2":
            raise CheckpointError(f"tGPT checkpoint {str(self.checkpoint)!r} is a {config.model_type!r} model, not GPT-2", fix)
        tokenizer = self._load_tokenizer()
        lm, info = load_hf_weights(GPT2LMHeadModel, self.checkpoint, what="the tGPT weights", fix=fix,
                                   config=config, dtype=dtype)
        check_loading_info(info, self.checkpoint, fix="re-download the checkpoint: its weights do not match config.json")

        vocab: dict[str, int] = tokenizer.get_vocab()
        specials = {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token}
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise CheckpointError("the tGPT tokenizer defines no </b> (bos) or </s> (eos) token",
                                  "use the official gpt2tokenizer/ files of github:deeplearningplus/tGPT")
        if max(vocab.values()) >= config.vocab_size:
            raise CheckpointError(f"the tokenizer has ids up to {max(vocab.values())} but the model only "
                                  f"{config.vocab_size} embeddings", "pair the checkpoint with its own tokenizer")
        self._vocab = {t: i for t, i in vocab.items() if t not in specials and _WORD.fullmatch(t)}
        self._bos = int(tokenizer.bos_token_id)
        self._eos = int(tokenizer.eos_token_id)
        self._pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id or 0)
        self.pad_values = {"input_ids": self._pad}

        max_len = self.options["max_len"] if self.options["max_len"] is not None else int(config.n_positions)
        if not 3 <= max_len <= config.n_positions:
            raise CheckpointError(f"max_len={max_len} does not fit this tGPT model (3 .. {config.n_positions} positions)",
                                  f"use max_len <= {config.n_positions}")
        self._max_len = max_len
        tok = self._tokenizer_dir()
        self._tokenizer_hash = hash_path(tok if tok.is_file() else tok / "tokenizer.json")
        self.tokenizer = tokenizer
        self.config = config
        self.model = lm.transformer.eval().to(device)
        self.device, self.dtype = device, dtype
        self._dim = int(config.n_embd)

    def prepare(self, genes: GeneTable) -> GenePlan:
        """Map each dataset gene (symbol, ``-``/``.`` -> ``_``) to its vocabulary id.

        ``data["token_of"]`` is the token of every dataset column (-1 where none).
        """
        self.require_loaded("prepare()")
        names = pd.Series(np.asarray(genes.symbols, dtype=object)).fillna("").astype(str)
        names = names.str.replace(_SYMBOL_SUB, "_", regex=True)
        ids = names.map(self._vocab).to_numpy()
        hit = pd.notna(ids) & (names.to_numpy() != "")
        cols = np.flatnonzero(hit)
        token_of = np.full(len(names), -1, dtype=np.int64)
        token_of[cols] = ids[hit].astype(np.int64)
        overlap = GeneOverlap(n_vocab=len(self._vocab), n_vocab_in_data=len(np.unique(token_of[cols])),
                              n_data=len(names), n_data_used=len(cols))
        return GenePlan(overlap, columns=cols, vocab_ids=token_of[cols], data={"token_of": token_of})

    # -- per chunk / batch ----------------------------------------------------------------
    @property
    def n_genes(self) -> int:
        """Genes per sentence: ``max_len`` minus ``</b>`` and ``</s>`` (62 for the published model)."""
        return self._max_len - 2

    def tokenize(self, chunk: CellChunk, plan: GenePlan) -> list[dict[str, np.ndarray]]:
        """``</b>`` + top expressed in-vocabulary genes (descending, ties in var order) + ``</s>``."""
        cols, offsets = ranked_columns(chunk.X, self.n_genes, columns=plan.columns)
        seqs = wrap_sequences(plan["token_of"][cols], offsets, prefix=self._bos, suffix=self._eos)
        return [{"input_ids": s} for s in seqs]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long(), use_cache=False)
        return out.last_hidden_state

    def pool(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean over positions ``1 .. eos - 1`` (the gene tokens), as the tGPT README does."""
        mask = batch["attention_mask"].bool()
        length = mask.sum(1, keepdim=True)
        pos = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
        genes = mask & (pos >= 1) & (pos < length - 1)
        return zeroed_mean(output, genes)

    # -- description ----------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {
            "max_len": getattr(self, "_max_len", self.options["max_len"]),
            "n_genes": getattr(self, "_max_len", 64) - 2,
            "ranking": "value desc (raw counts), stable: ties in var order; genes with value > 0 in the vocabulary",
            "symbol_normalisation": "'-' and '.' -> '_'",
            "sequence": "</b> + genes + </s>",
            "special_ids": {"bos": getattr(self, "_bos", None), "eos": getattr(self, "_eos", None),
                            "pad": getattr(self, "_pad", None)},
            "pooling": "mean of last_hidden_state over gene tokens (positions 1..eos-1)",
            "tokenizer": "option" if self.options["tokenizer"] else "checkpoint",
            "tokenizer_hash": getattr(self, "_tokenizer_hash", None),
        }
