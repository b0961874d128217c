"""Geneformer (Theodoris et al. 2023; V1 gc30M and V2 gc95M dictionaries).

A cell becomes its *rank value encoding*: each gene's count is scaled by the cell's total count
(``obs["n_counts"]``, else the sum over all genes) x 10,000 and divided by the gene's non-zero median expression
across the pretraining corpus; the expressed genes, ranked by that value (descending), are the
token sequence, truncated to the model's input size. V2 (gc95M) wraps it as
``<cls> genes... <eos>`` in 4,096 positions; V1 (gc30M) has no special tokens and 2,048 positions.

The cell embedding is the mean of one layer's hidden states over the gene tokens (pads, and for
V2 ``<cls>``/``<eos>``, excluded, as Geneformer's ``EmbExtractor(emb_mode="cell")`` does).
The default is the LAST layer (scDrugMap); Geneformer's own default ``emb_layer=-1`` is the
penultimate layer (``layer=-2`` here). ``pooling="cls"`` (V2 only) takes the ``<cls>`` state.

Genes are resolved exactly as the original tokenizers (V1: github jkobject/geneformer@95b63404;
V2: ctheodoris/Geneformer ``sum_ensembl_ids``) do, by default:

* the ids are ``var["ensembl_id"]`` as stored (no symbol look-up, no version stripping); an
  explicit ``--gene-key`` column of Ensembl ids, or Ensembl ``var_names`` (the original's
  ``use_h5ad_index``), stand in when there is no such column; otherwise the input is refused.
  ``map_symbols=true`` also looks symbols up (gene_name_id dictionary, then scdm's offline
  table): more genes, no longer the original's tokens; the overlap report counts them.
* the cell total is ``obs["n_counts"]`` when the input has it, as the original (which requires it).

Quirks of the original kept on purpose (see ``reference_fixtures/geneformer/README.md``):

* V1 does not merge genes sharing an Ensembl id: each column is ranked on its own, so a token
  can occur twice (a ``--gene-key`` column may therefore repeat ids). V2 upper-cases the ids and
  maps them through the gc95M Ensembl mapping dictionary; it sums the counts of columns landing
  on one id only when two distinct given ids meet there, else mapped columns stay separate
  (``collapse_gene_ids``), as the newer tokenizer does.
* Values are computed in float64 as ``count / total * 10000 / median`` in that order, so ranks
  equal the original's bit for bit; ties are broken stably in column order.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import CheckpointError, InputError, ScdmError
from ..genes import GeneTable, is_ensembl_id, looks_like_ensembl
from ._hf import check_loading_info, load_hf_weights
from ._safe_load import read_pickle
from ._sentences import ranked_columns
from .base import Adapter, CellChunk, GeneOverlap, GenePlan, first_token, masked_mean, sha256_file
from .options import Option, at_least

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
    lora_targets: ClassVar[tuple[str, ...]] = ("query", "key", "value")  # the paper's
    version: ClassVar[str] = "2"  # 2: genes and cell totals as the original tokenizer, by default
    description: ClassVar[str] = ("Geneformer (BERT on rank-value-encoded Ensembl genes; V1 gc30M / V2 gc95M), "
                                  "mean of the last layer over gene tokens")
    checkpoint_layout: ClassVar[str | None] = _LAYOUT
    needs_counts: ClassVar[bool] = True
    sequence_keys: ClassVar[tuple[str, ...]] = ("input_ids",)
    pad_values: ClassVar[dict[str, int]] = {"input_ids": 0}
    batch_invariant: ClassVar[bool] = True
    default_batch_size: ClassVar[int] = 32
    allows_duplicate_genes: ClassVar[bool] = True  # the V1 tokenizer keeps repeated ids as columns
    options_spec: ClassVar[tuple[Option, ...]] = (
        Option("generation", str, None, "v1 (gc30M, 2,048 tokens) or v2 (gc95M, 4,096 tokens, <cls>/<eos>); "
               "default: v2 when the token dictionary has <cls> and <eos>", choices=("v1", "v2")),
        Option("max_length", int, None, "input size in tokens (V2: including <cls>/<eos>); default: the model's "
               "max_position_embeddings", check=at_least(1)),
        Option("layer", int, -1, "hidden state pooled: 0 = embeddings .. N = last; negative counts from the end "
               "(-1 = last, -2 = penultimate, Geneformer's emb_layer=-1)"),
        Option("pooling", str, "mean", "mean over gene tokens, or cls (the <cls> state; V2 only)",
               choices=("mean", "cls")),
        Option("collapse_gene_ids", bool, None, "sum the counts of columns mapping to the same Ensembl id; "
               "default: true for V2, false for V1 (as the matching tokenizer)"),
        *(Option(key, Path, None, f"the {pattern} file; default: the one in the checkpoint folder")
          for key, pattern in _DICTS.items()),
        Option("map_symbols", bool, False, "also look up genes without an Ensembl id by symbol (offline table + "
               "gene_name_id dictionary); not what the original tokenizer does"),
    )

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        super().__init__(checkpoint, **options)
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

    # -- set-up ---------------------------------------------------------------------------------
    def load(self, *, device: torch.device, dtype: torch.dtype) -> None:
        """Read config, weights (strictly) and the token / median dictionaries."""
        assert self.checkpoint is not None
        ckpt = self.checkpoint
        self._config = _read_config(ckpt)
        self._files = self._find_dictionaries(ckpt)
        dicts = {key: _read_pickle(path, trust=self.trust_checkpoint) for key, path in self._files.items()}
        self._token_dict = {str(k): int(v) for k, v in dicts["token_dictionary"].items()}
        self._median = {str(k): float(v) for k, v in dicts["gene_median_dictionary"].items()}
        self._name_id = ({str(k): str(v) for k, v in dicts["gene_name_id_dictionary"].items()}
                         if "gene_name_id_dictionary" in dicts else {})
        self._mapping = ({str(k): str(v) for k, v in dicts["ensembl_mapping_dictionary"].items()}
                         if "ensembl_mapping_dictionary" in dicts else None)
        self._check_dictionaries()
        self._resolve_settings()

        self.model = _load_bert(ckpt, self._config, dtype).to(device).eval()
        self.device, self.dtype = device, dtype
        self._dim = int(self._config.hidden_size)

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
        generation = self.options["generation"] or ("v2" if has_special else "v1")
        if generation == "v2" and not has_special:
            raise CheckpointError(
                f"generation=v2 needs <cls> and <eos> in the token dictionary, "
                f"{self._files['token_dictionary'].name!r} has neither",
                "use the gc95M token dictionary for V2 models, or generation=v1")
        n_pos = int(self._config.max_position_embeddings)
        max_length = self.options["max_length"] if self.options["max_length"] is not None else n_pos
        lo = 3 if generation == "v2" else 1
        if not lo <= max_length <= n_pos:
            raise ScdmError(f"geneformer max_length={max_length} is outside {lo}..{n_pos} "
                            f"(the model has {n_pos} positions)",
                            f"pass max_length between {lo} and {n_pos}")
        n_layers = int(self._config.num_hidden_layers)
        layer = self.options["layer"]
        if not -(n_layers + 1) <= layer <= n_layers:
            raise ScdmError(f"geneformer layer={layer} is outside the model's hidden states "
                            f"(0 = embeddings .. {n_layers} = last; negative counts from the end)",
                            f"pass layer between {-(n_layers + 1)} and {n_layers} (-1 = last, -2 = penultimate)")
        if self.options["pooling"] == "cls" and generation != "v2":
            raise ScdmError("geneformer pooling=cls needs a V2 model (its inputs start with <cls>)",
                            "use pooling=mean with V1 (gc30M) models")
        self._generation = generation
        self._max_length = max_length
        self._layer = layer
        collapse = self.options["collapse_gene_ids"]
        self._collapse = generation == "v2" if collapse is None else collapse

    # -- genes ----------------------------------------------------------------------------------
    def prepare(self, genes: GeneTable) -> GenePlan:
        """Map the dataset's genes to vocabulary features as the original tokenizer does and
        build the column -> feature summing matrix.

        The plan's ``columns`` are the dataset columns used, ``vocab_ids`` the token of each;
        ``data`` holds the summing matrix ``agg`` (dataset columns x features, float64 CSR) and
        each feature's ``feature_tokens`` and ``feature_median``.

        V1 (``collapse_gene_ids=false``): a column is used when its id, as given, has a median;
        each column is its own feature, so a repeated id gives a repeated token. V2: ids are
        upper-cased and mapped through the Ensembl mapping dictionary (``sum_ensembl_ids``); only
        when two DISTINCT given ids land on one id are the columns of each id summed (the
        original's test), else every mapped column stays its own feature.
        """
        self.require_loaded("prepare()")
        ids, details = self._dataset_ids(genes)
        vocab = self._vocab_genes()
        if self._collapse:
            base = self._mapping if self._mapping is not None else {g: g for g in self._token_dict}
            mapping = {k: v for k, v in base.items() if v in self._token_dict}
            given = {i for i in ids if i in mapping}
            summed = len(given) != len({mapping[i] for i in given})
            target = [mapping.get(i.upper()) for i in ids]
            details["ids_mapped"] = sum(t is not None and t != i for i, t in zip(ids, target, strict=True))
            details["columns_summed"] = summed
            if summed:
                cols_of: dict[str, list[int]] = {}
                for j, t in enumerate(target):
                    if t is not None:
                        cols_of.setdefault(t, []).append(j)
                # the original keeps the unique ids in column order and appends the summed ones
                feat_ids = [t for t, c in cols_of.items() if len(c) == 1 and t in vocab]
                feat_ids += [t for t, c in cols_of.items() if len(c) > 1 and t in vocab]
                pairs = [(j, k) for k, t in enumerate(feat_ids) for j in cols_of[t]]
                cols, feats = [j for j, _ in pairs], [k for _, k in pairs]
            else:
                cols = [j for j, t in enumerate(target) if t in vocab]
                feats = list(range(len(cols)))
                feat_ids = [str(target[j]) for j in cols]
        else:
            cols = [j for j, i in enumerate(ids) if i in vocab]
            feats = list(range(len(cols)))
            feat_ids = [ids[j] for j in cols]
        if "resolved_by_symbol" in details:
            by_symbol = set(details.pop("_by_symbol"))
            details["used_by_symbol"] = sum(j in by_symbol for j in cols)
        n_feat = len(feat_ids)
        agg = sp.csr_matrix((np.ones(len(cols)), (np.asarray(cols, np.int64), np.asarray(feats, np.int64))),
                            shape=(len(genes), n_feat), dtype=np.float64)
        feat_tokens = np.array([self._token_dict[g] for g in feat_ids], dtype=np.int64)
        feat_median = np.array([self._median[g] for g in feat_ids], dtype=np.float64)
        overlap = GeneOverlap(n_vocab=len(vocab), n_vocab_in_data=len(set(feat_ids)), n_data=len(genes),
                              n_data_used=len(cols), details=details)
        return GenePlan(overlap, columns=np.asarray(cols, np.int64),
                        vocab_ids=feat_tokens[np.asarray(feats, np.int64)],
                        data={"agg": agg, "feature_tokens": feat_tokens, "feature_median": feat_median})

    def _dataset_ids(self, genes: GeneTable) -> tuple[list[str], dict[str, Any]]:
        """The Ensembl id of every dataset column, taken as the original tokenizer takes them.

        ``var["ensembl_id"]`` as stored (an explicit ``--gene-key`` column of Ensembl ids comes
        first; Ensembl ``var_names`` stand in when there is no such column). A table built by
        hand gives its ``ensembl``. Nothing is looked up by symbol unless ``map_symbols``: then
        genes without an Ensembl id are looked up in the checkpoint's gene name -> id dictionary,
        then in scdm's offline table (``GeneTable.ensembl``). Also returns what was done, for the
        overlap report.
        """
        source, given = _given_ids(genes)
        map_symbols = bool(self.options.get("map_symbols") or False)
        if given is None:
            if not map_symbols:
                hint = (f"pass --gene-key {genes.ensembl_column} (its Ensembl ids), "
                        if genes.ensembl_column and genes.ensembl_column != "ensembl_id" else
                        "omit --gene-key if var_names are Ensembl ids, " if genes.id_source != "var_names" else "")
                raise InputError(
                    f"geneformer reads Ensembl ids from var['ensembl_id'] (as the original tokenizer), but the "
                    f"input has no such column and its gene ids ({genes.id_source}) are not Ensembl ids",
                    f"{hint}add var['ensembl_id'] with each gene's Ensembl id, or pass --option map_symbols=true "
                    "to look the symbols up (the checkpoint's gene_name_id dictionary, then scdm's offline "
                    "Ensembl 100/HGNC table; the original tokenizer does not do this)")
            given, source = np.full(len(genes), "", dtype=object), "none"
        ids = [str(i) for i in given]
        details: dict[str, Any] = {"gene_ids": source, "map_symbols": map_symbols}
        if map_symbols:
            offline, mapped = genes.ensembl, genes.mapped_mask
            by_symbol, counts = [], {"gene_name_id_dictionary": 0, "offline_table": 0, "other_var_column": 0}
            for j, i in enumerate(ids):
                if is_ensembl_id(i):
                    continue
                sym = str(genes.symbols[j])
                hit = self._name_id.get(sym) or self._name_id.get(sym.upper())
                how = "gene_name_id_dictionary"
                if not hit:
                    e = offline[j]
                    hit = str(e) if isinstance(e, str) and e else ""
                    how = "offline_table" if mapped[j] else "other_var_column"
                if hit:
                    ids[j] = hit
                    by_symbol.append(j)
                    counts[how] += 1
            details["resolved_by_symbol"] = len(by_symbol)
            details["resolved_via"] = counts
            details["_by_symbol"] = by_symbol
        return ids, details

    # -- per chunk / batch ------------------------------------------------------------------------
    def tokenize(self, chunk: CellChunk, plan: GenePlan) -> list[dict[str, np.ndarray]]:
        """Rank value encoding of every cell of the chunk (vectorised over the CSR)."""
        X = sp.csr_matrix(chunk.X, dtype=np.float64)
        n_cells = X.shape[0]
        totals = _cell_totals(chunk, X)
        F = sp.csr_matrix(X @ plan["agg"])
        F.eliminate_zeros()
        F.sort_indices()
        row = np.repeat(np.arange(n_cells, dtype=np.int64), np.diff(F.indptr))
        # same float64 operations, same order, as the original: x / n_counts * 10000 / median
        val = F.data / totals[row]
        val = val * _TARGET_SUM
        val = val / plan["feature_median"][F.indices]
        v2 = self._generation == "v2"
        n_genes = self._max_length - 2 if v2 else self._max_length
        # value descending, ties in column order, top n_genes per cell (values > 0 only)
        col, offsets = ranked_columns(sp.csr_matrix((val, F.indices, F.indptr), shape=F.shape), n_genes)
        tokens = plan["feature_tokens"][col]
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
        self.require_loaded("forward()")
        n_layers = int(self._config.num_hidden_layers)
        last = self._layer % (n_layers + 1) == n_layers
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long(),
                         output_hidden_states=not last, return_dict=True)
        # the last layer is the encoder output: no need to keep every layer's states alive
        return out.last_hidden_state if last else out.hidden_states[self._layer]

    def pool(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean over gene tokens (pads and ``<cls>``/``<eos>`` excluded), or the ``<cls>`` state."""
        if self.options["pooling"] == "cls":
            return first_token(output)
        ids = batch["input_ids"]
        mask = batch["attention_mask"].bool()
        for tok in ("<pad>", "<cls>", "<eos>"):
            if tok in self._special_ids:
                mask = mask & (ids != self._special_ids[tok])
        return masked_mean(output.float(), mask)

    # -- description ------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {
            "generation": self._generation,
            "max_length": self._max_length,
            "special_tokens": self._generation == "v2",
            "collapse_gene_ids": self._collapse,
            "target_sum": int(_TARGET_SUM),
            "normalisation": "count / cell total * 10000 / gene non-zero median",
            "cell_total": "obs['n_counts'] when the input has it (as the original), else the sum over all genes",
            "gene_ids": "var['ensembl_id'] as stored (else an Ensembl --gene-key column or var_names), as the "
                        "original tokenizer",
            "map_symbols": bool(self.options.get("map_symbols") or False),
            "collapse_rule": ("upper-case, map through the Ensembl mapping dictionary; sum columns only when "
                              "distinct given ids meet (sum_ensembl_ids)") if self._collapse else
                             "none: each column with a median is its own feature",
            "ranking": "descending, ties in column order (summed ids last, as the original lays them out)",
            "layer": self._layer,
            "pooling": self.options["pooling"],
            "dictionaries": {k: {"file": p.name, "sha256": sha256_file(p)} for k, p in sorted(self._files.items())},
        }


# -- helpers ------------------------------------------------------------------------------------
def _given_ids(genes: GeneTable) -> tuple[str, np.ndarray | None]:
    """Where the original tokenizer would read the ids, and those ids (``None``: nowhere)."""
    if genes.given_ids is None:  # a table built by hand: its Ensembl ids are what was given
        keep = ~genes.mapped_mask
        return "GeneTable.ensembl", np.array([str(e) if k and isinstance(e, str) else ""
                                              for e, k in zip(genes.ensembl, keep, strict=True)], dtype=object)
    if genes.id_source != "var_names" and looks_like_ensembl(genes.given_ids):
        return f"var[{genes.id_source!r}]", genes.given_ids
    if genes.var_ensembl_id is not None:
        return "var['ensembl_id']", genes.var_ensembl_id
    if looks_like_ensembl(genes.given_ids):
        return "var_names", genes.given_ids
    return genes.id_source, None


def _cell_totals(chunk: CellChunk, X: sp.csr_matrix) -> np.ndarray:
    """The normalisation total of each cell: ``obs["n_counts"]`` when the input has it (the
    original tokenizer divides by that column), else the sum over all the dataset's genes."""
    if chunk.n_counts is None:
        return np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    totals = np.asarray(chunk.n_counts, dtype=np.float64).ravel()
    if totals.shape != (X.shape[0],):
        raise RuntimeError(f"chunk has {X.shape[0]} cells but {totals.size} n_counts")
    bad = np.flatnonzero(~np.isfinite(totals) | (totals <= 0))
    if bad.size:
        shown = ", ".join(f"{chunk.cell_ids[i]!s}={chunk.n_counts[i]!r}" for i in bad[:3])
        raise InputError(f"obs['n_counts'] is not a positive number for {bad.size} cell(s) (e.g. {shown}); "
                         "geneformer divides each cell's counts by it, as the original tokenizer",
                         "fix obs['n_counts'] (each cell's total count), or delete the column: scdm then "
                         "uses each cell's sum over all genes")
    return totals


def _read_pickle(path: Path, *, trust: bool = False) -> dict[Any, Any]:
    """A Geneformer dictionary, through the restricted unpickler (full only with ``trust``)."""
    obj = read_pickle(path, trust=trust, what="the Geneformer dictionary")
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
