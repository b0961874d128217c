"""scGPT (Cui et al. 2024): a clean PyTorch re-implementation of the inference forward pass.

Reads the OFFICIAL checkpoint directory (``best_model.pt`` + ``vocab.json`` + ``args.json``,
e.g. ``scGPT_human``) strictly and reproduces ``scgpt.tasks.embed_data``:

* genes are matched to the vocabulary by symbol; per cell only the NON-ZERO in-vocabulary
  genes are kept and ``<cls>`` (value = ``pad_value``) is prepended;
* values are binned per cell into 51 bins (``scgpt.preprocess.binning``): quantile edges
  ``np.quantile(nonzero, linspace(0, 1, 50))`` over ALL of the cell's non-zero genes, BEFORE
  sampling;
* cells with more than ``max_length - 1`` genes keep ``<cls>`` and ``max_length - 1``
  genes drawn at random;
* the cell embedding is the ``<cls>`` output of the transformer, L2-normalised.

Deviations from the original, both for reproducibility and batch invariance:

* Tie-breaking in binning: the original ``_digitize(side="both")`` gives a value that sits on
  one or more bin edges (counts are small integers, so most do) a uniformly random bin
  between its left and right ``np.digitize`` with the GLOBAL ``np.random.rand``. Here the
  uniform numbers come from a per-cell generator ``np.random.default_rng(cell_seed(cell_id,
  seed))`` (same formula, same distribution), so a cell's bins do not depend on its batch,
  its position in the file or the run.
* Sampling: the original keeps ``torch.randperm(n)[:max_length - 1]`` in permutation order;
  here the genes are drawn without replacement from the same per-cell generator (after the
  binning draws) and kept in dataset order. scGPT has no positional encoding, so the order
  of the genes does not change the embedding (beyond float round-off).

The attention block (shared :mod:`.nn.attention`, here with scGPT's ``self_attn.Wqkv`` name) is
written out (``Wqkv`` -> ``F.scaled_dot_product_attention`` -> ``self_attn.out_proj``) so every projection is a real ``nn.Linear`` call that LoRA can
wrap; no flash-attn and no torchtext are needed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..genes import GeneTable
from ._checkpoint import load_strict
from ._safe_load import torch_load
from .base import Adapter, CellChunk, GeneOverlap, GenePlan, cell_seed, first_token
from .nn.attention import Encoder
from .options import Option, at_least

_FILES = ("best_model.pt", "vocab.json", "args.json")
_SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")
#: ``scgpt.data_collator.DataCollator`` hard-codes 51 bins (``embed_data`` ignores args.n_bins)
_N_BINS = 51
#: ``args.json`` keys that ``embed_data`` reads (a KeyError there, a CheckpointError here)
_REQUIRED_ARGS = ("embsize", "nheads", "d_hid", "nlayers", "dropout", "pad_token", "pad_value")
#: key renames from the other official spellings to this module tree (flash-attn names)
_RENAMES = (
    (re.compile(r"\.self_attn\._impl\.Wqkv\."), ".self_attn.Wqkv."),
    (re.compile(r"\.self_attn\._impl\.out_proj\."), ".self_attn.out_proj."),
    (re.compile(r"\.self_attn\.in_proj_(weight|bias)$"), r".self_attn.Wqkv.\1"),
)


# -- the module tree (names follow scgpt.model.TransformerModel) ---------------------------------
class _GeneEncoder(nn.Module):
    """Token embedding + LayerNorm."""

    def __init__(self, n_tokens: int, d_model: int, padding_idx: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, d_model, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(ids))


class _ContinuousValueEncoder(nn.Module):
    """Scalar value -> vector: Linear(1, d) -> ReLU -> Linear(d, d) -> LayerNorm; clipped at 512."""

    def __init__(self, d_model: int, dropout: float, max_value: float = 512.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.max_value = max_value

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = values.unsqueeze(-1).clamp(max=self.max_value)
        return self.dropout(self.norm(self.linear2(self.activation(self.linear1(x)))))


class _ExprDecoder(nn.Module):
    """Per-gene expression head (pre-training objective; not used for embeddings)."""

    def __init__(self, d_model: int, zero_prob: bool) -> None:
        super().__init__()

        def mlp() -> nn.Sequential:
            return nn.Sequential(nn.Linear(d_model, d_model), nn.LeakyReLU(), nn.Linear(d_model, d_model),
                                 nn.LeakyReLU(), nn.Linear(d_model, 1))

        self.fc = mlp()
        if zero_prob:
            self.zero_logit = mlp()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc(hidden).squeeze(-1)


class _ClsDecoder(nn.Module):
    """Cell classification head ((Linear, ReLU, LayerNorm) x (n-1), Linear); not used here."""

    def __init__(self, d_model: int, n_cls: int, n_layers: int) -> None:
        super().__init__()
        self._decoder = nn.ModuleList()
        for _ in range(n_layers - 1):
            self._decoder.extend([nn.Linear(d_model, d_model), nn.ReLU(), nn.LayerNorm(d_model)])
        self.out_layer = nn.Linear(d_model, n_cls)

    def forward(self, cell: torch.Tensor) -> torch.Tensor:
        for layer in self._decoder:
            cell = layer(cell)
        return self.out_layer(cell)


class _MVCDecoder(nn.Module):
    """"Inner product" masked-value-for-cell head (pre-training objective; not used here)."""

    def __init__(self, d_model: int, zero_prob: bool) -> None:
        super().__init__()
        self.gene2query = nn.Linear(d_model, d_model)
        self.query_activation = nn.Sigmoid()
        self.W = nn.Linear(d_model, d_model, bias=False)
        if zero_prob:
            self.W_zero_logit = nn.Linear(d_model, d_model)

    def forward(self, cell: torch.Tensor, gene_embs: torch.Tensor) -> torch.Tensor:
        query = self.query_activation(self.gene2query(gene_embs))
        return torch.bmm(self.W(query), cell.unsqueeze(2)).squeeze(2)


class ScGPTModel(nn.Module):
    """``scgpt.model.TransformerModel`` as ``embed_data`` builds it (post-norm, continuous values).

    :meth:`forward` is ``TransformerModel._encode``: it returns the last hidden states
    (B, L, D). The heads (``decoder``, ``cls_decoder``, ``mvc_decoder``, ``flag_encoder``) are
    built only when the checkpoint holds them, so that every checkpoint tensor has a home.
    """

    def __init__(self, *, n_tokens: int, d_model: int, n_heads: int, d_hid: int, n_layers: int,
                 dropout: float, pad_id: int, heads: Mapping[str, Any]) -> None:
        super().__init__()
        self.d_model = d_model
        self.encoder = _GeneEncoder(n_tokens, d_model, pad_id)
        self.value_encoder = _ContinuousValueEncoder(d_model, dropout)
        self.transformer_encoder = Encoder(n_layers, d_model, n_heads, d_hid, dropout, qkv_name="Wqkv")
        if "decoder" in heads:
            self.decoder = _ExprDecoder(d_model, **heads["decoder"])
        if "cls_decoder" in heads:
            self.cls_decoder = _ClsDecoder(d_model, **heads["cls_decoder"])
        if "mvc_decoder" in heads:
            self.mvc_decoder = _MVCDecoder(d_model, **heads["mvc_decoder"])
        if "flag_encoder" in heads:  # generative pre-training flag embedding (scGPT_human)
            self.flag_encoder = nn.Embedding(heads["flag_encoder"]["n_flags"], d_model)

    def forward(self, gene_ids: torch.Tensor, values: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """``gene_ids``/``values`` (B, L); ``keep`` (B, L) bool, True on real tokens."""
        x = self.encoder(gene_ids) + self.value_encoder(values)
        return self.transformer_encoder(x, keep)


# -- checkpoint reading ---------------------------------------------------------------------------
def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read scGPT {what} {str(path)!r}: {err}",
                              "use the unmodified file from the official scGPT checkpoint folder") from err


def _read_vocab(path: Path) -> dict[str, int]:
    """``vocab.json`` (token -> index, consecutive from 0) + the specials ``embed_data`` appends."""
    raw = _read_json(path, "vocabulary")
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"{str(path)!r} is not a token -> index mapping",
                              "use the vocab.json of the official scGPT checkpoint")
    idx = sorted(raw.values()) if all(isinstance(i, int) for i in raw.values()) else None
    if idx is None or idx != list(range(len(raw))):
        raise CheckpointError(f"{str(path)!r}: token indices must be the integers 0..{len(raw) - 1}",
                              "use the vocab.json of the official scGPT checkpoint")
    vocab = {str(t): int(i) for t, i in raw.items()}
    for tok in _SPECIAL_TOKENS:
        vocab.setdefault(tok, len(vocab))
    return vocab


def _rename(key: str) -> str:
    for pat, repl in _RENAMES:
        key = pat.sub(repl, key)
    return key


def _heads(state: Mapping[str, torch.Tensor], n_layers_cls: int | None) -> dict[str, dict[str, Any]]:
    """Which optional heads the checkpoint holds, and their shapes."""
    heads: dict[str, dict[str, Any]] = {}
    if any(k.startswith("decoder.") for k in state):
        heads["decoder"] = {"zero_prob": any(k.startswith("decoder.zero_logit.") for k in state)}
    if any(k.startswith("cls_decoder.") for k in state):
        hidden = sorted({int(m.group(1)) for k in state if (m := re.match(r"cls_decoder\._decoder\.(\d+)\.", k))})
        n_layers = len(hidden) // 2 + 1  # each hidden block holds a Linear and a LayerNorm
        out = state.get("cls_decoder.out_layer.weight")
        heads["cls_decoder"] = {"n_cls": int(out.shape[0]) if out is not None else 1,
                                "n_layers": n_layers_cls if n_layers_cls is not None else n_layers}
    if any(k.startswith("mvc_decoder.") for k in state):
        heads["mvc_decoder"] = {"zero_prob": any(k.startswith("mvc_decoder.W_zero_logit.") for k in state)}
    if "flag_encoder.weight" in state:
        heads["flag_encoder"] = {"n_flags": int(state["flag_encoder.weight"].shape[0])}
    return heads


def _load_state(path: Path, *, trust: bool = False) -> dict[str, torch.Tensor]:
    state = torch_load(path, trust=trust, what="the scGPT weights")
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{str(path)!r} is not a state_dict (name -> tensor)",
                              "use the best_model.pt of the official scGPT checkpoint (a plain state_dict)")
    return {_rename(str(k)): v for k, v in state.items()}


# -- tokenization helpers -------------------------------------------------------------------------
def _bin_values(values: np.ndarray, rng: np.random.Generator, n_bins: int = _N_BINS) -> np.ndarray:
    """``scgpt.preprocess.binning`` of a cell's non-zero values, ties broken by ``rng``.

    Edges are ``np.quantile(values, linspace(0, 1, n_bins - 1))``. A value gets a bin drawn
    uniformly from ``right + 1 .. left`` (``left``/``right`` = ``np.digitize`` without/with
    ``right=True``), i.e. exactly ``left`` when it lies on no edge. Bins are 1..n_bins-1.
    """
    edges = np.quantile(values, np.linspace(0, 1, n_bins - 1))
    left = np.digitize(values, edges)
    right = np.digitize(values, edges, right=True)
    u = rng.random(len(values))
    return np.ceil(u * (right - left) + left).astype(np.int64)


# -- the adapter ----------------------------------------------------------------------------------
class ScGPTAdapter(Adapter):
    """scGPT ``<cls>`` cell embedding (``embed_data``), from the official checkpoint folder.

    Options: ``max_length`` (1200, tokens incl. ``<cls>``), ``seed`` (0, global seed of the
    per-cell tie-breaking/sampling generators), ``normalize`` (True, L2 per cell as
    ``embed_data``).
    """

    name: ClassVar[str] = "scgpt"
    #: the paper's: ``out_proj``, a real ``nn.Linear`` call here (stock ``nn.MultiheadAttention`` would bypass it)
    lora_targets: ClassVar[tuple[str, ...]] = ("self_attn.out_proj",)
    version: ClassVar[str] = "1"
    description: ClassVar[str] = "scGPT (whole-human) <cls> embedding, 51-bin values, 1,200 genes"
    checkpoint_layout: ClassVar[str | None] = "best_model.pt + vocab.json + args.json (official scGPT folder)"
    needs_counts: ClassVar[bool] = True
    sequence_keys: ClassVar[tuple[str, ...]] = ("gene_ids", "values")
    #: pads are masked out; forward() rewrites pad gene ids to the vocabulary's <pad>
    pad_values: ClassVar[Mapping[str, int | float]] = {"gene_ids": 0, "values": -2.0}
    batch_invariant: ClassVar[bool] = True
    default_batch_size: ClassVar[int] = 32
    options_spec: ClassVar[tuple[Option, ...]] = (
        Option("max_length", int, 1200, "tokens per cell: <cls> + up to max_length-1 sampled expressed genes "
               "(as embed_data)", check=at_least(2)),
        Option("seed", int, 0, "global seed of the per-cell gene sampling"),
        Option("normalize", bool, True, "L2-normalise the <cls> embedding (as embed_data)"),
    )

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        super().__init__(checkpoint, **options)
        self.max_length: int = self.options["max_length"]
        self.seed: int = self.options["seed"]
        self.normalize: bool = self.options["normalize"]
        self.model: ScGPTModel | None = None
        self.vocab: dict[str, int] = {}
        self.args: dict[str, Any] = {}

    # -- set-up -------------------------------------------------------------------------------
    def load(self, *, device: torch.device, dtype: torch.dtype) -> None:
        assert self.checkpoint is not None
        missing = [f for f in _FILES if not (self.checkpoint / f).is_file()]
        if missing:
            raise CheckpointError(f"scGPT checkpoint {str(self.checkpoint)!r} lacks {', '.join(missing)}",
                                  f"pass the official scGPT folder (e.g. scGPT_human) holding {', '.join(_FILES)}")
        args = _read_json(self.checkpoint / "args.json", "args")
        absent = [k for k in _REQUIRED_ARGS if not isinstance(args, dict) or k not in args]
        if absent:
            raise CheckpointError(f"scGPT args.json lacks {', '.join(absent)}",
                                  "use the args.json of the official scGPT checkpoint")
        style = args.get("input_emb_style", "continuous")
        if style != "continuous":
            raise CheckpointError(f"scGPT input_emb_style {style!r} is not supported (embed_data uses 'continuous')",
                                  "use a whole-human / continuous-value scGPT checkpoint")
        vocab = _read_vocab(self.checkpoint / "vocab.json")
        pad_token = str(args["pad_token"])
        if pad_token not in vocab:
            raise CheckpointError(f"pad token {pad_token!r} is not in vocab.json", "use the matching vocab.json")

        state = _load_state(self.checkpoint / "best_model.pt", trust=self.trust_checkpoint)
        n_cls_layers = args.get("n_layers_cls")
        model = ScGPTModel(n_tokens=len(vocab), d_model=int(args["embsize"]), n_heads=int(args["nheads"]),
                           d_hid=int(args["d_hid"]), n_layers=int(args["nlayers"]), dropout=float(args["dropout"]),
                           pad_id=vocab[pad_token],
                           heads=_heads(state, int(n_cls_layers) if n_cls_layers is not None else None))
        load_strict(model, state,
                    what=f"scGPT {str(self.checkpoint / 'best_model.pt')!r} does not match args.json/vocab.json "
                         f"({len(vocab)} tokens)",
                    fix="use best_model.pt, vocab.json and args.json from the same official scGPT checkpoint folder")
        model.eval().to(device=device, dtype=dtype)
        self.model, self.vocab, self.args = model, vocab, args
        self.device, self.dtype = device, dtype
        self._pad_id = vocab[pad_token]
        self._cls_id = vocab["<cls>"]
        self._pad_value = float(args["pad_value"])
        self._dim = model.d_model

    def prepare(self, genes: GeneTable) -> GenePlan:
        """Match the dataset's gene symbols to the vocabulary (exactly, as ``embed_data``)."""
        self.require_loaded("prepare()")
        ids = np.fromiter((self.vocab.get(str(s), -1) for s in genes.symbols), dtype=np.int64, count=len(genes))
        specials = {self.vocab[t] for t in _SPECIAL_TOKENS}
        ids[np.isin(ids, list(specials))] = -1
        cols = np.flatnonzero(ids >= 0)
        overlap = GeneOverlap(n_vocab=len(self.vocab) - len(specials), n_vocab_in_data=len(np.unique(ids[cols])),
                              n_data=len(genes), n_data_used=len(cols))
        return GenePlan(overlap, columns=cols, vocab_ids=ids[cols])

    # -- per chunk / batch --------------------------------------------------------------------
    def tokenize(self, chunk: CellChunk, plan: GenePlan) -> list[dict[str, np.ndarray]]:
        """Per cell: ``<cls>`` + non-zero in-vocab genes (binned, sampled to ``max_length``)."""
        X = chunk.X[:, plan.columns].tocsr()
        X.eliminate_zeros()
        X.sort_indices()
        keep = self.max_length - 1
        cells = []
        for r in range(X.shape[0]):
            lo, hi = X.indptr[r], X.indptr[r + 1]
            genes = plan.vocab_ids[X.indices[lo:hi]]
            values = X.data[lo:hi]
            rng = np.random.default_rng(cell_seed(str(chunk.cell_ids[r]), self.seed))
            bins = _bin_values(values, rng) if len(values) else np.empty(0, np.int64)
            if len(genes) > keep:
                pick = np.sort(rng.choice(len(genes), size=keep, replace=False))
                genes, bins = genes[pick], bins[pick]
            cells.append({
                "gene_ids": np.concatenate([[self._cls_id], genes]).astype(np.int64),
                "values": np.concatenate([[self._pad_value], bins]).astype(np.float32),
            })
        return cells

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Last hidden states (B, L, D) of ``TransformerModel._encode``; pads masked as keys."""
        self.require_loaded("forward()")
        keep = batch["attention_mask"].to(self.device, torch.bool)
        ids = batch["gene_ids"].to(self.device, torch.long).masked_fill(~keep, self._pad_id)
        values = batch["values"].to(self.device, self.dtype).masked_fill(~keep, self._pad_value)
        return self.model(ids, values, None if bool(keep.all()) else keep)

    def pool(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ``<cls>`` output, L2-normalised per cell when ``normalize``."""
        cls = first_token(output)
        return F.normalize(cls, p=2, dim=1) if self.normalize else cls

    # -- description --------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {
            "gene_match": "symbol (exact) -> vocab.json; special tokens excluded",
            "genes": "non-zero in-vocabulary genes; <cls> prepended with value pad_value",
            "binning": {"n_bins": _N_BINS, "edges": "np.quantile over all non-zero genes, before sampling",
                        "ties": "uniform between np.digitize left/right, per-cell seeded rng"},
            "max_length": self.max_length,
            "sampling": "without replacement, per-cell seeded rng, dataset order",
            "seed": self.seed,
            "rng": "numpy default_rng(cell_seed(cell_id, seed)): binning draws, then sampling",
            "pad_value": self._pad_value if self.model is not None else None,
            "value_clip": 512,
            "pooling": "cls",
            "normalize": self.normalize,
            "architecture": {k: self.args.get(k) for k in ("embsize", "nheads", "d_hid", "nlayers")},
        }


__all__ = ["ScGPTAdapter", "ScGPTModel"]
