"""Geneformer (Theodoris et al. 2023; V1 gc30M and V2 gc95M dictionaries).

A cell becomes its *rank value encoding*: each gene's count is scaled by the cell's total count
(over all genes of the dataset) x 10,000 and divided by the gene's non-zero median expression
across the pretraining corpus; the expressed genes, ranked by that value (descending), are the
token sequence, truncated to the model's input size. V2 (gc95M) wraps it as
``<cls> genes... <eos>`` in 4,096 positions; V1 (gc30M) has no special tokens and 2,048 positions.

The cell embedding is the mean of one layer's hidden states over the gene tokens (pads, and for
V2 ``<cls>``/``<eos>``, excluded, as Geneformer's ``EmbExtractor(emb_mode="cell")`` does).
The default is the LAST layer (scDrugMap); Geneformer's own default ``emb_layer=-1`` is the
penultimate layer (``layer=-2`` here). ``pooling="cls"`` (V2 only) takes the ``<cls>`` state.

Quirks of the original kept on purpose (see ``reference_fixtures/geneformer/README.md``):

* V1 does not merge genes sharing an Ensembl id: each column is ranked on its own, so a token
  can occur twice. V2 maps ids through the gc95M Ensembl mapping dictionary and sums the counts
  of columns that land on the same id (``collapse_gene_ids``), as the newer tokenizer does.
* Values are computed in float64 as ``count / total * 10000 / median`` in that order, so ranks
  equal the original's bit for bit; ties are broken stably in column order.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch

from .._errors import CheckpointError, ScdmError
from .._genes import GeneTable
from ._base import Adapter, CellChunk, GeneOverlap, first_token, masked_mean, sha256_file
from ._sentences import check_loading_info, load_hf_weights, ranked_columns

log = logging.getLogger(__name__)

_TARGET_SUM = 10_000.0
_SPECIAL = ("<pad>", "<mask>", "<cls>", "<eos>")
#: option name -> file-name pattern looked for in the checkpoint folder
_DICTS: dict[str, str] = {
    "token_dictionary": "token_dictionary*.pkl",
    "gene_median_dictionary": "gene_median_dictionary*.pkl",
    "gene_name_id_dictionary": "gene_name_id_dict*.pkl",
    "ensembl_mapping_dictionary": "ensembl_mapping_dict*.pkl",
}
_REQUIRED_DICTS = ("token_dictionary", "gene_median_dictionary")
_ARCHITECTURES = ("BertForMaskedLM", "BertForSequenceClassification", "BertForTokenClassification",
                  "BertModel")
_LAYOUT = ("Hugging Face Geneformer folder: config.json + model.safetensors (or pytorch_model.bin), "
           "token_dictionary*.pkl and gene_median_dictionary*.pkl (or pass them as options)")


class GeneformerAdapter(Adapter):
    """Geneformer V1/V2: rank value encoding -> BERT -> mean of one layer over gene tokens."""

    name: ClassVar[str] = "geneformer"
    lora_targets: ClassVar[tuple[str, ...]] = ("query", "value")
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ("Geneformer (BERT on rank-value-encoded Ensembl genes; V1 gc30M / V2 gc95M), "
                                  "mean of the last layer over gene tokens")
    checkpoint_layout: ClassVar[str | None] = _LAYOUT
    needs_counts: ClassVar[bool] = True
    sequence_keys: ClassVar[tuple[str, ...]] = ("input_ids",)
    pad_values: ClassVar[dict[str, int]] = {"input_ids": 0}
    batch_invariant: ClassVar[bool] = True
    default_batch_size: ClassVar[int] = 32

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        super().__init__(checkpoint, **options)
        known = {"generation", "max_length", "layer", "pooling", "collapse_gene_ids", *_DICTS}
        unknown = sorted(set(self.options) - known)
        if unknown:
            raise ScdmError(f"unknown geneformer option(s): {', '.join(unknown)}",
                            f"use only: {', '.join(sorted(known))}")
        pooling = self.options.get("pooling", "mean")
        if pooling not in ("mean", "cls"):
            raise ScdmError(f"geneformer pooling={pooling!r} is not supported", "use pooling=mean or pooling=cls")
        generation = self.options.get("generation")
        if generation is not None and str(generation).lower() not in ("v1", "v2"):
            raise ScdmError(f"geneformer generation={generation!r} is not supported",
                            "use generation=v1 (gc30M, 2,048 tokens) or generation=v2 (gc95M, 4,096 tokens)")
        for key in ("layer", "max_length"):
            if key in self.options:
                _as_int(self.options[key], key)
        if "collapse_gene_ids" in self.options:
            _as_bool(self.options["collapse_gene_ids"], "collapse_gene_ids")
        self.model: torch.nn.Module | None = None
        self._config: Any = None
        self._files: dict[str, Path] = {}
        self._token_dict: dict[str, int] = {}
        self._median: dict[str, float] = {}
        self._name_id: dict[str, str] = {}
        self._mapping: dict[str, str] | None = None
        self._generation = "v1"
        self._max_length = 2048
        self._layer = -1
        self._collapse = False
        self._special_ids: dict[str, int] = {}
        self._agg: sp.csr_matrix | None = None
        self._feat_tokens = np.zeros(0, np.int64)
        self._feat_median = np.zeros(0, np.float64)

    # -- set-up ---------------------------------------------------------------------------------
    def load(self, *, device: torch.device, dtype: torch.dtype) -> None:
        """Read config, weights (strictly) and the token / median dictionaries."""
        assert self.checkpoint is not None
        ckpt = self.checkpoint
        self._config = _read_config(ckpt)
        self._files = self._find_dictionaries(ckpt)
        self._token_dict = {str(k): int(v) for k, v in _read_pickle(self._files["token_dictionary"]).items()}
        self._median = {str(k): float(v) for k, v in _read_pickle(self._files["gene_median_dictionary"]).items()}
        self._name_id = ({str(k): str(v) for k, v in _read_pickle(self._files["gene_name_id_dictionary"]).items()}
                         if "gene_name_id_dictionary" in self._files else {})
        self._mapping = ({str(k): str(v) for k, v in _read_pickle(self._files["ensembl_mapping_dictionary"]).items()}
                         if "ensembl_mapping_dictionary" in self._files else None)
        self._check_dictionaries()
        self._resolve_settings()

        self.model = _load_bert(ckpt, self._config, dtype).to(device).eval()
        self.device, self.dtype = device, dtype

    def _find_dictionaries(self, ckpt: Path) -> dict[str, Path]:
        """Dictionary files: the options first, else ``<pattern>`` inside the checkpoint folder."""
        found: dict[str, Path] = {}
        folder = ckpt if ckpt.is_dir() else ckpt.parent
        for key, pattern in _DICTS.items():
            given = self.options.get(key)
            if given is not None:
                p = Path(given)
                if not p.is_file():
                    raise CheckpointError(f"geneformer {key}={str(p)!r} is not a file",
                                          f"pass the path of the official {pattern} file")
                found[key] = p
                continue
            hits = sorted(folder.glob(pattern))
            if len(hits) > 1:
                raise CheckpointError(
                    f"checkpoint {str(folder)!r} holds several {pattern} files: {', '.join(h.name for h in hits)}",
                    f"choose one with the option {key}=PATH")
            if hits:
                found[key] = hits[0]
        missing = [k for k in _REQUIRED_DICTS if k not in found]
        if missing:
            names = ", ".join(_DICTS[k] for k in missing)
            opts = " ".join(f"{k}=PATH" for k in missing)
            raise CheckpointError(
                f"the Geneformer checkpoint {str(folder)!r} lacks its dictionaries ({names})",
                f"copy token_dictionary_gcXX.pkl and gene_median_dictionary_gcXX.pkl (and "
                f"gene_name_id_dict_gcXX.pkl, ensembl_mapping_dict_gcXX.pkl) of the matching generation "
                f"(gc30M for 2,048-token V1 models, gc95M for 4,096-token V2 models) into the folder, or "
                f"pass the options {opts}")
        return found

    def _check_dictionaries(self) -> None:
        """The dictionaries must fit the checkpoint's vocabulary (same generation)."""
        vocab_size = int(self._config.vocab_size)
        if len(self._token_dict) != vocab_size or max(self._token_dict.values(), default=-1) >= vocab_size:
            raise CheckpointError(
                f"token dictionary {self._files['token_dictionary'].name!r} has {len(self._token_dict):,} tokens but "
                f"the model's vocabulary has {vocab_size:,}: dictionary and checkpoint are of different generations",
                "use the gc30M dictionaries with V1 (30M, 2,048-token) models and the gc95M ones with V2 "
                "(95M, 4,096-token) models (options token_dictionary=, gene_median_dictionary=)")
        genes = self._vocab_genes()
        if not genes:
            raise CheckpointError(
                f"no gene of {self._files['token_dictionary'].name!r} has a median in "
                f"{self._files['gene_median_dictionary'].name!r}",
                "pass the token and gene median dictionaries of the same generation")
        self._special_ids = {t: self._token_dict[t] for t in _SPECIAL if t in self._token_dict}

    def _vocab_genes(self) -> set[str]:
        return {g for g in self._token_dict if g not in _SPECIAL and g in self._median}

    def _resolve_settings(self) -> None:
        has_special = "<cls>" in self._token_dict and "<eos>" in self._token_dict
        generation = self.options.get("generation")
        generation = str(generation).lower() if generation is not None else ("v2" if has_special else "v1")
        if generation == "v2" and not has_special:
            raise CheckpointError(
                f"generation=v2 needs <cls> and <eos> in the token dictionary, "
                f"{self._files['token_dictionary'].name!r} has neither",
                "use the gc95M token dictionary for V2 models, or generation=v1")
        n_pos = int(self._config.max_position_embeddings)
        max_length = _as_int(self.options.get("max_length", n_pos), "max_length")
        lo = 3 if generation == "v2" else 1
        if not lo <= max_length <= n_pos:
            raise ScdmError(f"geneformer max_length={max_length} is outside {lo}..{n_pos} "
                            f"(the model has {n_pos} positions)",
                            f"pass max_length between {lo} and {n_pos}")
        n_layers = int(self._config.num_hidden_layers)
        layer = _as_int(self.options.get("layer", -1), "layer")
        if not -(n_layers + 1) <= layer <= n_layers:
            raise ScdmError(f"geneformer layer={layer} is outside the model's hidden states "
                            f"(0 = embeddings .. {n_layers} = last; negative counts from the end)",
                            f"pass layer between {-(n_layers + 1)} and {n_layers} (-1 = last, -2 = penultimate)")
        pooling = self.options.get("pooling", "mean")
        if pooling == "cls" and generation != "v2":
            raise ScdmError("geneformer pooling=cls needs a V2 model (its inputs start with <cls>)",
                            "use pooling=mean with V1 (gc30M) models")
        self._generation = generation
        self._max_length = max_length
        self._layer = layer
        self._collapse = _as_bool(self.options.get("collapse_gene_ids", generation == "v2"), "collapse_gene_ids")

    # -- genes ----------------------------------------------------------------------------------
    def prepare(self, genes: GeneTable) -> GeneOverlap:
        """Map the dataset's genes to vocabulary features (one per kept column in V1, one per
        collapsed Ensembl id in V2) and build the column -> feature summing matrix."""
        if self.model is None:
            raise RuntimeError("call load() before prepare()")
        ids = self._dataset_ids(genes)
        vocab = self._vocab_genes()
        if self._collapse:
            mapping = ({k: v for k, v in self._mapping.items() if v in vocab} if self._mapping is not None
                       else {g: g for g in vocab})
            target = [mapping.get(i.upper()) if i else None for i in ids]
            feat_of: dict[str, int] = {}
            cols, feats = [], []
            for j, t in enumerate(target):
                if t is not None:
                    cols.append(j)
                    feats.append(feat_of.setdefault(t, len(feat_of)))
            feat_ids = list(feat_of)
        else:
            cols = [j for j, i in enumerate(ids) if i in vocab]
            feats = list(range(len(cols)))
            feat_ids = [ids[j] for j in cols]
        n_feat = len(feat_ids)
        self._agg = sp.csr_matrix((np.ones(len(cols)), (np.asarray(cols, np.int64), np.asarray(feats, np.int64))),
                                  shape=(len(genes), n_feat), dtype=np.float64)
        self._feat_tokens = np.array([self._token_dict[g] for g in feat_ids], dtype=np.int64)
        self._feat_median = np.array([self._median[g] for g in feat_ids], dtype=np.float64)
        return GeneOverlap(n_vocab=len(vocab), n_vocab_in_data=len(set(feat_ids)), n_data=len(genes),
                           n_data_used=len(cols))

    def _dataset_ids(self, genes: GeneTable) -> list[str]:
        """Ensembl ids of the dataset's genes; symbols without one are looked up in the
        checkpoint's gene name -> id dictionary."""
        out = []
        for sym, ens in zip(genes.symbols, genes.ensembl, strict=True):
            ens = str(ens) if isinstance(ens, str) else ""
            if not ens and self._name_id and isinstance(sym, str):
                ens = self._name_id.get(sym) or self._name_id.get(sym.upper()) or ""
            out.append(ens)
        return out

    # -- per chunk / batch ------------------------------------------------------------------------
    def tokenize(self, chunk: CellChunk) -> list[dict[str, np.ndarray]]:
        """Rank value encoding of every cell of the chunk (vectorised over the CSR)."""
        if self._agg is None:
            raise RuntimeError("call prepare() before tokenize()")
        X = sp.csr_matrix(chunk.X, dtype=np.float64)
        n_cells = X.shape[0]
        totals = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
        F = sp.csr_matrix(X @ self._agg)
        F.eliminate_zeros()
        F.sort_indices()
        row = np.repeat(np.arange(n_cells, dtype=np.int64), np.diff(F.indptr))
        # same float64 operations, same order, as the original: x / n_counts * 10000 / median
        val = F.data / totals[row]
        val = val * _TARGET_SUM
        val = val / self._feat_median[F.indices]
        v2 = self._generation == "v2"
        n_genes = self._max_length - 2 if v2 else self._max_length
        # value descending, ties in column order, top n_genes per cell (values > 0 only)
        col, offsets = ranked_columns(sp.csr_matrix((val, F.indices, F.indptr), shape=F.shape), n_genes)
        tokens = self._feat_tokens[col]
        counts = np.diff(offsets)
        parts = np.split(tokens, offsets[1:-1]) if n_cells else []
        empty = int((counts == 0).sum())
        if empty:
            log.warning("geneformer: %d cell(s) express no vocabulary gene; their mean-pooled embedding is zero", empty)
        cells = []
        pad = self._special_ids.get("<pad>", 0)
        for p in parts:
            if v2:
                p = np.concatenate([[self._special_ids["<cls>"]], p, [self._special_ids["<eos>"]]])
            elif len(p) == 0:
                p = np.array([pad])  # one masked-out token so the forward pass has a position
            cells.append({"input_ids": np.ascontiguousarray(p, dtype=np.int64)})
        return cells

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hidden states of the chosen layer, ``(B, L, D)`` (``hidden_states[layer]``)."""
        assert self.model is not None
        n_layers = int(self._config.num_hidden_layers)
        last = self._layer % (n_layers + 1) == n_layers
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long(),
                         output_hidden_states=not last, return_dict=True)
        # the last layer is the encoder output: no need to keep every layer's states alive
        return out.last_hidden_state if last else out.hidden_states[self._layer]

    def pool(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean over gene tokens (pads and ``<cls>``/``<eos>`` excluded), or the ``<cls>`` state."""
        if self.options.get("pooling", "mean") == "cls":
            return first_token(output)
        ids = batch["input_ids"]
        mask = batch["attention_mask"].bool()
        for tok in ("<pad>", "<cls>", "<eos>"):
            if tok in self._special_ids:
                mask = mask & (ids != self._special_ids[tok])
        return masked_mean(output.float(), mask)

    # -- description ------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        if self._config is None:
            raise RuntimeError("call load() first")
        return int(self._config.hidden_size)

    def settings(self) -> dict[str, Any]:
        return {
            "generation": self._generation,
            "max_length": self._max_length,
            "special_tokens": self._generation == "v2",
            "collapse_gene_ids": self._collapse,
            "target_sum": int(_TARGET_SUM),
            "normalisation": "count / cell total (all genes) * 10000 / gene non-zero median",
            "ranking": "descending, ties in column order",
            "layer": self._layer,
            "pooling": self.options.get("pooling", "mean"),
            "dictionaries": {k: {"file": p.name, "sha256": sha256_file(p)} for k, p in sorted(self._files.items())},
        }


# -- helpers ------------------------------------------------------------------------------------
def _as_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str, np.integer)):
        raise ScdmError(f"geneformer {key}={value!r} is not an integer", f"pass {key}=N")
    try:
        return int(value)
    except ValueError:
        raise ScdmError(f"geneformer {key}={value!r} is not an integer", f"pass {key}=N") from None


def _as_bool(value: Any, key: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ScdmError(f"geneformer {key}={value!r} is not true/false", f"pass {key}=true or {key}=false")


def _read_pickle(path: Path) -> dict[Any, Any]:
    try:
        with open(path, "rb") as fh:
            obj = pickle.load(fh)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(f"cannot read the Geneformer dictionary {str(path)!r}: {err}",
                              "re-download the official .pkl file") from err
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{str(path)!r} is not a Geneformer dictionary (expected a non-empty dict)",
                              "re-download the official .pkl file")
    return obj


def _read_config(ckpt: Path) -> Any:
    from transformers import BertConfig

    cfg = ckpt / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"checkpoint {str(ckpt)!r} has no config.json", f"pass the {_LAYOUT}")
    try:
        raw = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {str(cfg)!r}: {err}", "re-download config.json") from err
    if raw.get("model_type") != "bert":
        raise CheckpointError(f"{str(cfg)!r} is not a BERT config (model_type={raw.get('model_type')!r})",
                              f"pass the {_LAYOUT}")
    return BertConfig(**{k: v for k, v in raw.items() if k != "model_type"})


def _load_bert(ckpt: Path, config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """Load the checkpoint with its own architecture, strictly; return the ``BertModel`` encoder."""
    import transformers

    if not any((ckpt / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise CheckpointError(f"checkpoint {str(ckpt)!r} has no model.safetensors or pytorch_model.bin",
                              f"pass the {_LAYOUT}")
    arch = next((a for a in (config.architectures or []) if a in _ARCHITECTURES), "BertForMaskedLM")
    cls = getattr(transformers, arch)
    fix = f"re-download the checkpoint; it must hold every weight of {arch} for its config.json"
    model, info = load_hf_weights(cls, ckpt, what="the Geneformer weights", fix=fix)
    check_loading_info(info, ckpt, fix=fix)
    model = model.to(dtype)
    return model if arch == "BertModel" else model.bert
