"""UCE (Universal Cell Embeddings, Rosen et al. 2023): a clean PyTorch re-implementation.

Reads the official ``model_files/`` layout (github snap-stanford/UCE, PyPI ``uce-model``):
the model ``.torch`` state dict, ``all_tokens.torch``, ``protein_embeddings/*.pt``,
``species_chrom.csv`` and ``species_offsets.pkl``.

Tokenization follows ``eval_data.sample_cell_sentences``: ``sample_size`` (1,024) genes are
drawn with replacement with probability proportional to ``log1p(counts)``; the sampled genes
are grouped by chromosome (chromosome order shuffled), each group is opened by its
chromosome token and closed by ``chrom_token_right_idx`` (2) with its genes in genomic
``start`` order, and the sentence starts with ``<cls>`` (3). The random draws use a per-cell
generator seeded by ``cell_seed(cell_id, seed)``, so a cell's sentence never depends on the
other cells of its chunk or batch. Gene tokens, chromosomes and starts are built in
:meth:`UCEAdapter.prepare` from the dataset's own genes.

The forward is ``TransformerModel.forward`` with batch-first tensors: L2-normalised token
vectors, ``Linear -> GELU -> LayerNorm``, ``* sqrt(d_model)``, sinusoidal positions, post-norm
transformer layers (ReLU feed-forward), then the decoder MLP at the ``<cls>`` position,
L2-normalised (the original's ``obsm["X_uce"]``).
"""

from __future__ import annotations

import json
import math
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
from ._safe_load import read_pickle, torch_load
from .base import Adapter, CellChunk, GeneOverlap, GenePlan, cell_seed
from .nn.attention import Encoder
from .options import Option, at_least

#: species -> protein-embedding file (``get_species_to_pe`` of the original)
_SPECIES_FILES: dict[str, str] = {
    "human": "Homo_sapiens.GRCh38.gene_symbol_to_embedding_ESM2.pt",
    "mouse": "Mus_musculus.GRCm39.gene_symbol_to_embedding_ESM2.pt",
    "frog": "Xenopus_tropicalis.Xenopus_tropicalis_v9.1.gene_symbol_to_embedding_ESM2.pt",
    "zebrafish": "Danio_rerio.GRCz11.gene_symbol_to_embedding_ESM2.pt",
    "mouse_lemur": "Microcebus_murinus.Mmur_3.0.gene_symbol_to_embedding_ESM2.pt",
    "pig": "Sus_scrofa.Sscrofa11.1.gene_symbol_to_embedding_ESM2.pt",
    "macaca_fascicularis": "Macaca_fascicularis.Macaca_fascicularis_6.0.gene_symbol_to_embedding_ESM2.pt",
    "macaca_mulatta": "Macaca_mulatta.Mmul_10.gene_symbol_to_embedding_ESM2.pt",
}

# Hard-coded in the original (``run_eval`` / ``get_ESM2_embeddings`` / CLI defaults).
_PE_ROWS = 145_469  #: rows of the checkpoint's own ``pe_embedding.weight``
_TOKEN_FILE_ROWS = 143_574  #: rows of the official ``all_tokens.torch``
_N_CHROM_ROWS = 1_895  #: chromosome rows the original appends to the official token file
_DEFAULT_CHROM_TOKEN_OFFSET = 143_574
_DEFAULT_NHEAD = 20
_PAD, _CHROM_RIGHT, _CLS = 0, 2, 3  #: pad_token_idx, chrom_token_right_idx, cls_token_idx
_MODEL_DROPOUT = 0.05

_LAYOUT = ("model_files/ with <model>.torch, all_tokens.torch, protein_embeddings/*.pt, "
           "species_chrom.csv, species_offsets.pkl (optionally uce_args.json)")
_FIX = "download the UCE model_files (github snap-stanford/UCE README) and pass --checkpoint DIR"


# -- the model ---------------------------------------------------------------------------------
class _PositionalEncoding(nn.Module):
    """Sinusoidal positions; ``pe`` (max_len, 1, d_model) is read from the checkpoint."""

    def __init__(self, d_model: int, max_len: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("pe", torch.zeros(max_len, 1, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, L, D) batch-first."""
        return self.dropout(x + self.pe[: x.shape[1], 0].unsqueeze(0))


def _full_block(n_in: int, n_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_out), nn.LayerNorm(n_out), nn.GELU(), nn.Dropout(dropout))


class UCEModel(nn.Module):
    """``uce.model.TransformerModel`` (same parameter names, batch-first, bool key mask).

    Masking differs from the original only for padded sentences: the original passes the
    FLOAT mask ``1 - mask`` as ``src_key_padding_mask``, which PyTorch adds to the logits
    (+1 on pads, pads still attended); here pads are masked out with a bool mask, so a cell's
    embedding does not depend on its batch. Unpadded sentences give the same result (all
    64 reference-fixture sentences have length 1,073, no padding: max abs diff 0.0).
    ``pe_embedding`` is the frozen token table, stored with L2-normalised rows (the original
    normalises after the lookup; same values). ``binary_decoder`` and
    ``gene_embedding_layer`` are loaded (strict) but unused for cell embeddings.
    """

    def __init__(self, *, token_dim: int, d_model: int, nhead: int, d_hid: int, nlayers: int,
                 output_dim: int, max_len: int, n_tokens: int, dropout: float = _MODEL_DROPOUT) -> None:
        super().__init__()
        self.d_model = d_model
        self.pos_encoder = _PositionalEncoding(d_model, max_len, dropout)
        self.encoder = nn.Sequential(nn.Linear(token_dim, d_model), nn.GELU(), nn.LayerNorm(d_model))
        self.transformer_encoder = Encoder(nlayers, d_model, nhead, d_hid, dropout)
        self.decoder = nn.Sequential(_full_block(d_model, 1024, dropout), _full_block(1024, output_dim, dropout),
                                     _full_block(output_dim, output_dim, dropout), nn.Linear(output_dim, output_dim))
        self.binary_decoder = nn.Sequential(_full_block(output_dim + d_model, 2048, dropout),
                                            _full_block(2048, 512, dropout), _full_block(512, 128, dropout),
                                            nn.Linear(128, 1))
        self.gene_embedding_layer = nn.Sequential(nn.Linear(token_dim, d_model), nn.GELU(), nn.LayerNorm(d_model))
        self.pe_embedding = nn.Embedding(n_tokens, token_dim)
        self.pe_embedding.weight.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` (B, L) -> (last hidden (B, L, d_model), L2-normalised CLS output)."""
        x = self.pe_embedding(input_ids)  # rows already L2-normalised
        x = self.encoder(x) * math.sqrt(self.d_model)
        x = self.pos_encoder(x)
        key_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_mask = attention_mask.bool()
        hidden = self.transformer_encoder(x, key_mask)
        cell = F.normalize(self.decoder(hidden[:, 0]), dim=1)  # decoder is per position: CLS only
        return hidden, cell


# -- checkpoint helpers ------------------------------------------------------------------------
def _torch_load(path: Path, *, trust: bool = False) -> Any:
    """A torch file on CPU (``weights_only`` unless ``trust``), memory-mapped where the format allows."""
    return torch_load(path, trust=trust, mmap=True, what="the UCE file")


def _model_files(root: Path) -> Path:
    for d in (root / "model_files", root):
        if (d / "all_tokens.torch").exists() or (d / "protein_embeddings").is_dir():
            return d
    return root / "model_files" if (root / "model_files").is_dir() else root


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise CheckpointError(f"UCE checkpoint is missing {what}: {str(path)!r}", _FIX)
    return path


def _state_key(name: str) -> str:
    """Our parameter name -> the original checkpoint key (the packed q/k/v projection is a
    ``Linear`` called ``self_attn.in_proj`` here, so LoRA can wrap it)."""
    return name.replace("self_attn.in_proj.weight", "self_attn.in_proj_weight").replace(
        "self_attn.in_proj.bias", "self_attn.in_proj_bias")


def _norm_rows(table: torch.Tensor, *, block: int = 16384) -> torch.Tensor:
    """Float32 copy of ``table`` with L2-normalised rows (in blocks, to bound memory)."""
    out = torch.empty(table.shape, dtype=torch.float32)
    for s in range(0, table.shape[0], block):
        out[s:s + block] = F.normalize(table[s:s + block].float(), dim=1)
    return out


class UCEAdapter(Adapter):
    """UCE cell embeddings: CLS decoder output, L2-normalised (``obsm["X_uce"]``).

    Options (keyword): ``species`` ("human"), ``seed`` (0; per-cell sampling seed),
    ``sample_size`` (1024), ``pad_length`` (1536; longest allowed sentence), ``model_file``
    (the ``.torch`` in ``model_files/`` when there are several), ``nhead`` (20) and
    ``chrom_token_offset`` (143574); the last two default to ``uce_args.json`` when the
    checkpoint has one.

    Not reproduced on purpose: the original's ``filter_genes(min_cells=10)`` /
    ``filter_cells(min_genes=25)`` run on the embedded cell set (a cell's embedding would
    depend on the others). Cells with no counts on vocabulary genes get the sentence
    ``[<cls>]`` (the original would fail on them).
    """

    name: ClassVar[str] = "uce"
    #: the paper's: ``out_proj``, a real ``nn.Linear`` call here (stock ``nn.MultiheadAttention`` would bypass it)
    lora_targets: ClassVar[tuple[str, ...]] = ("self_attn.out_proj",)
    version: ClassVar[str] = "1"
    description: ClassVar[str] = "UCE (Universal Cell Embeddings): CLS output, L2-normalised"
    checkpoint_layout: ClassVar[str | None] = _LAYOUT
    needs_counts: ClassVar[bool] = True
    sequence_keys: ClassVar[tuple[str, ...]] = ("input_ids",)
    pad_values: ClassVar[dict[str, int]] = {"input_ids": _PAD}
    batch_invariant: ClassVar[bool] = True
    default_batch_size: ClassVar[int] = 32
    options_spec: ClassVar[tuple[Option, ...]] = (
        Option("species", str, "human", "species of the dataset's genes (its protein-embedding file)",
               choices=tuple(_SPECIES_FILES)),
        Option("seed", int, 0, "global seed of the per-cell gene sampling"),
        Option("sample_size", int, 1024, "genes sampled per cell (with replacement, by expression)",
               check=at_least(1)),
        Option("pad_length", int, 1536, "longest allowed sentence in tokens", check=at_least(1)),
        Option("model_file", str, None, "name of the model .torch in model_files/; default: the only one there"),
        Option("nhead", int, None, f"attention heads; default: uce_args.json's, else {_DEFAULT_NHEAD}",
               check=at_least(1)),
        Option("chrom_token_offset", int, None, "first chromosome token row (CHROM_TOKEN_OFFSET); default: "
               f"uce_args.json's, else {_DEFAULT_CHROM_TOKEN_OFFSET}", check=at_least(0)),
    )

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        super().__init__(checkpoint, **options)
        self.species: str = self.options["species"]
        self.seed: int = self.options["seed"]
        self.sample_size: int = self.options["sample_size"]
        self.pad_length: int = self.options["pad_length"]
        self.model: UCEModel | None = None
        self._cfg: dict[str, Any] = {}
        self._dim: int | None = None

    # -- loading --------------------------------------------------------------------------
    def _model_path(self, files: Path) -> Path:
        name = self.options["model_file"]
        if name is not None:
            return _need(files / str(name), "the model file named by model_file")
        cands = sorted(p for p in files.glob("*.torch") if p.name != "all_tokens.torch")
        if len(cands) != 1:
            found = ", ".join(p.name for p in cands) or "none"
            raise CheckpointError(f"UCE needs exactly one model .torch in {str(files)!r} (found: {found})",
                                  "put one model file there or pass model_file=NAME (e.g. 4layer_model.torch)")
        return cands[0]

    def _args_json(self, files: Path) -> dict[str, Any]:
        for p in (self.checkpoint / "uce_args.json", files / "uce_args.json"):
            if p.exists():
                try:
                    return dict(json.loads(p.read_text()))
                except (OSError, ValueError) as err:
                    raise CheckpointError(f"cannot read {str(p)!r}: {err}", "fix or delete uce_args.json") from err
        return {}

    def load(self, *, device: torch.device, dtype: torch.dtype) -> None:
        """Read the model state dict strictly, the token table and the species gene files."""
        files = _model_files(self.checkpoint)
        model_path = self._model_path(files)
        tok_path = _need(files / "all_tokens.torch", "the token file all_tokens.torch")
        pe_path = _need(files / "protein_embeddings" / _SPECIES_FILES[self.species],
                        f"the {self.species} protein-embedding file")
        csv_path = _need(files / "species_chrom.csv", "species_chrom.csv")
        off_path = _need(files / "species_offsets.pkl", "species_offsets.pkl")
        args = self._args_json(files)

        sd = _torch_load(model_path, trust=self.trust_checkpoint)
        if not isinstance(sd, dict):
            raise CheckpointError(f"{str(model_path)!r} is not a state dict", _FIX)
        for key in ("encoder.0.weight", "decoder.3.weight", "pos_encoder.pe", "pe_embedding.weight"):
            if key not in sd:
                raise CheckpointError(f"UCE checkpoint {model_path.name!r} lacks key {key!r}", _FIX)
        d_model, token_dim = sd["encoder.0.weight"].shape
        output_dim = sd["decoder.3.weight"].shape[0]
        nlayers = len({k.split(".")[2] for k in sd if k.startswith("transformer_encoder.layers.")})
        if nlayers == 0 or "transformer_encoder.layers.0.linear1.weight" not in sd:
            raise CheckpointError(f"UCE checkpoint {model_path.name!r} has no transformer layers", _FIX)
        d_hid = sd["transformer_encoder.layers.0.linear1.weight"].shape[0]
        nhead = self.options["nhead"] or int(args.get("nhead", _DEFAULT_NHEAD))
        for k, v in (("token_dim", token_dim), ("d_model", d_model), ("d_hid", d_hid), ("nlayers", nlayers),
                     ("output_dim", output_dim)):
            if k in args and int(args[k]) != int(v):
                raise CheckpointError(f"uce_args.json says {k}={args[k]} but the weights have {k}={v}",
                                      "use the uce_args.json that belongs to this model file")
        if d_model % nhead:
            raise CheckpointError(f"d_model {d_model} is not divisible by nhead {nhead}", "pass the right nhead=")

        # token table, as run_eval: the token file (plus 1,895 chromosome rows when it is the
        # official 143,574-row file) replaces the checkpoint's pe_embedding unless that makes
        # exactly 145,469 rows, in which case the checkpoint's own table is used
        tokens = _torch_load(tok_path, trust=self.trust_checkpoint)
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
            raise CheckpointError(f"{str(tok_path)!r} is not a 2-D token table", _FIX)
        n_rows = tokens.shape[0] + (_N_CHROM_ROWS if tokens.shape[0] == _TOKEN_FILE_ROWS else 0)
        ckpt_pe = sd["pe_embedding.weight"]
        if n_rows == _PE_ROWS:
            table, table_source = ckpt_pe, "checkpoint pe_embedding.weight"
        else:
            table, table_source = tokens, "all_tokens.torch"
        if table.ndim != 2 or table.shape[1] != token_dim:
            raise CheckpointError(f"token table ({table_source}) has shape {tuple(table.shape)}, "
                                  f"expected (*, {token_dim})", _FIX)

        model = UCEModel(token_dim=token_dim, d_model=d_model, nhead=nhead, d_hid=d_hid, nlayers=nlayers,
                         output_dim=output_dim, max_len=sd["pos_encoder.pe"].shape[0], n_tokens=1)
        # pe_embedding: the token table chosen above replaces it (on both sides, not loaded here)
        load_strict(model, sd, ignore=("pe_embedding.",), checkpoint_key=_state_key,
                    what=f"UCE checkpoint {str(model_path)!r} does not match a {nlayers}-layer TransformerModel",
                    fix=_FIX)
        model.pe_embedding = nn.Embedding.from_pretrained(_norm_rows(table), freeze=True)

        # species gene files
        pe = _torch_load(pe_path, trust=self.trust_checkpoint)
        if not isinstance(pe, dict) or not pe:
            raise CheckpointError(f"{str(pe_path)!r} is not a {{symbol: embedding}} dict", _FIX)
        offsets = read_pickle(off_path, trust=self.trust_checkpoint, what="the UCE species offsets")
        if not isinstance(offsets, dict):
            raise CheckpointError(f"{str(off_path)!r} is not a {{species: offset}} dict "
                                  f"(it holds a {type(offsets).__name__})", _FIX)
        if self.species not in offsets:
            raise CheckpointError(f"species_offsets.pkl has no offset for {self.species!r}", _FIX)
        chrom = pd.read_csv(csv_path, dtype={"chromosome": str})
        need_cols = {"species", "gene_symbol", "chromosome", "start"}
        if not need_cols <= set(chrom.columns):
            raise CheckpointError(f"species_chrom.csv lacks columns {sorted(need_cols - set(chrom.columns))}", _FIX)
        spec_chrom = pd.Categorical(chrom["species"] + "_" + chrom["chromosome"])
        chrom_offset = self.options["chrom_token_offset"]
        if chrom_offset is None:
            chrom_offset = int(args.get("CHROM_TOKEN_OFFSET", _DEFAULT_CHROM_TOKEN_OFFSET))
        if chrom_offset + len(spec_chrom.categories) > table.shape[0]:
            raise CheckpointError(
                f"chromosome tokens {chrom_offset}..{chrom_offset + len(spec_chrom.categories) - 1} lie beyond "
                f"the {table.shape[0]}-row token table", "pass chrom_token_offset= (CHROM_TOKEN_OFFSET) of these files")

        # gene symbol -> token row: position among the upper-cased keys (first occurrence wins,
        # as in the original's dict comprehension) + the species offset
        vocab: dict[str, int] = {}
        for k in pe:
            vocab.setdefault(str(k).upper(), len(vocab))
        try:
            offset = int(offsets[self.species])
        except (TypeError, ValueError):
            raise CheckpointError(f"{str(off_path)!r}: the {self.species} offset {offsets[self.species]!r} "
                                  "is not an integer", _FIX) from None
        if offset + len(vocab) > table.shape[0]:
            raise CheckpointError(f"{self.species} genes (offset {offset}, {len(vocab)} genes) exceed the "
                                  f"{table.shape[0]}-row token table", _FIX)
        sel = (chrom["species"] == self.species).to_numpy() & chrom["chromosome"].notna().to_numpy() \
            & chrom["start"].notna().to_numpy()
        sym = chrom["gene_symbol"].astype(str).str.upper().to_numpy()[sel]
        codes = np.asarray(spec_chrom.codes)[sel]
        starts = chrom["start"].to_numpy(dtype=np.float64)[sel]
        _, first = np.unique(sym, return_index=True)  # duplicated symbols: first row
        first.sort()
        self._gene_info = {s: (vocab[s] + offset, int(c), float(st))
                           for s, c, st in zip(sym[first], codes[first], starts[first], strict=True) if s in vocab}

        self.model = model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype
        self._cfg = {"model_file": model_path.name, "token_table": table_source, "n_token_rows": int(table.shape[0]),
                     "token_dim": int(token_dim), "d_model": int(d_model), "nhead": nhead, "d_hid": int(d_hid),
                     "nlayers": nlayers, "output_dim": int(output_dim), "chrom_token_offset": chrom_offset,
                     "species_offset": offset, "max_len": int(sd["pos_encoder.pe"].shape[0])}
        self._dim = int(output_dim)

    # -- genes ----------------------------------------------------------------------------
    def prepare(self, genes: GeneTable) -> GenePlan:
        """Map the dataset's OWN genes to token rows, chromosome codes and genomic starts.

        ``columns``/``vocab_ids``: the used dataset columns and their token rows; ``plan["start"]``
        their genomic starts, ``plan["chrom"]`` dense chromosome ids and ``plan["chrom_tok"]``
        the token of each dense chromosome."""
        self.require_loaded("prepare")
        symbols = np.array([str(s).upper() for s in genes.symbols], dtype=object)
        info = self._gene_info
        cols = np.array([i for i, s in enumerate(symbols) if s in info], dtype=np.int64)
        if cols.size == 0:
            raise InputError(f"none of the dataset's {len(genes)} gene symbols has a UCE {self.species} "
                             "protein embedding", "pass gene symbols (var_names or --gene-key) and the right species=")
        rows = [info[s] for s in symbols[cols]]
        tok = np.array([r[0] for r in rows], dtype=np.int64)
        codes = np.array([r[1] for r in rows], dtype=np.int64)
        start = np.array([r[2] for r in rows], dtype=np.float64)
        uniq, chrom = np.unique(codes, return_inverse=True)  # dense chromosome ids
        longest = 1 + self.sample_size + 2 * min(len(uniq), self.sample_size)
        limit = min(self.pad_length, self._cfg["max_len"])
        if longest > limit:
            raise InputError(f"UCE sentences could reach {longest} tokens (> {limit}: pad_length / positions)",
                             "use a smaller sample_size=")
        overlap = GeneOverlap(n_vocab=len(info), n_vocab_in_data=len(set(symbols[cols])),
                              n_data=len(genes), n_data_used=int(cols.size))
        return GenePlan(overlap=overlap, columns=cols, vocab_ids=tok,
                        data={"start": start, "chrom": chrom.astype(np.int64),
                              "chrom_tok": (uniq + self._cfg["chrom_token_offset"]).astype(np.int64)})

    # -- tokens ---------------------------------------------------------------------------
    def tokenize(self, chunk: CellChunk, plan: GenePlan) -> list[dict[str, np.ndarray]]:
        """Per-cell sentences ``<cls> (chrom genes-by-start 2)*`` (not padded)."""
        if plan.overlap.n_data != chunk.X.shape[1]:
            raise InputError(f"uce: the chunk has {chunk.X.shape[1]} genes but the gene plan was made for "
                             f"{plan.overlap.n_data}", "tokenize with the plan prepare() made for these genes")
        tok, start, chrom, chrom_tok = plan.vocab_ids, plan["start"], plan["chrom"], plan["chrom_tok"]
        X = sp.csr_matrix(chunk.X)[:, plan.columns]
        X.sum_duplicates()
        n, s = X.shape[0], self.sample_size
        # the original stores counts as int64 (truncating); weights = log1p(counts)
        val = np.trunc(X.data.astype(np.float64))
        row = np.repeat(np.arange(n), np.diff(X.indptr))
        keep = val > 0
        row, col, w = row[keep], X.indices[keep].astype(np.int64), np.log1p(val[keep])
        counts = np.bincount(row, minlength=n)
        ends = np.cumsum(counts)
        begins = ends - counts
        # per-row cumulative weights, scaled to (0, 1], plus the row number: one searchsorted
        cum = np.concatenate([[0.0], np.cumsum(w)])  # cum[k] = sum of the first k weights
        total = np.where(counts > 0, cum[ends] - cum[begins], 1.0)
        frac = (cum[1:] - np.repeat(cum[begins], counts)) / np.repeat(total, counts)
        frac[ends[counts > 0] - 1] = 1.0  # exact row end
        keys = row + frac
        n_chrom = len(chrom_tok)
        u = np.empty((n, s))
        rank = np.empty((n, n_chrom), dtype=np.int64)
        for i, cid in enumerate(chunk.cell_ids):
            rng = np.random.default_rng(cell_seed(str(cid), self.seed))
            u[i] = rng.random(s)
            rank[i] = rng.permutation(n_chrom)  # random order of the chromosomes
        live = np.flatnonzero(counts > 0)
        pick = np.searchsorted(keys, live[:, None] + u[live], side="right")
        pick = np.clip(pick, begins[live, None], ends[live, None] - 1)
        g = col[pick]  # (n_live, s) used-gene indices
        r = np.broadcast_to(np.arange(len(live))[:, None], g.shape)
        crank = rank[live[:, None], chrom[g]]
        order = np.lexsort((g.ravel(), start[g].ravel(), crank.ravel(), r.ravel())).reshape(g.shape)
        order -= (np.arange(len(live)) * s)[:, None]
        g = np.take_along_axis(g, order, 1)
        crank = np.take_along_axis(crank, order, 1)
        new = np.ones_like(g, dtype=bool)
        new[:, 1:] = crank[:, 1:] != crank[:, :-1]
        last = np.ones_like(new)
        last[:, :-1] = new[:, 1:]
        grp = np.cumsum(new, 1) - 1
        lengths = 1 + s + 2 * (grp[:, -1] + 1) if len(live) else np.zeros(0, np.int64)
        width = int(lengths.max()) if len(live) else 1
        sent = np.full((len(live), width), _PAD, dtype=np.int64)
        sent[:, 0] = _CLS
        j = np.arange(s)[None, :] + 1 + 2 * grp  # position of each gene's chromosome-open slot
        ri = np.broadcast_to(np.arange(len(live))[:, None], g.shape)
        sent[ri, j + 1] = tok[g]
        sent[ri[new], j[new]] = chrom_tok[chrom[g[new]]]
        sent[ri[last], j[last] + 2] = _CHROM_RIGHT
        out: list[dict[str, np.ndarray]] = [{"input_ids": np.array([_CLS], dtype=np.int64)} for _ in range(n)]
        for k, i in enumerate(live):
            out[i] = {"input_ids": sent[k, : lengths[k]].copy()}
        return out

    # -- model ----------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.require_loaded("forward")
        hidden, cell = self.model(batch["input_ids"], batch.get("attention_mask"))
        return {"hidden": hidden, "cell": cell}

    def pool(self, output: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The decoder output at ``<cls>``, L2-normalised (``obsm["X_uce"]``)."""
        return output["cell"].float()

    def settings(self) -> dict[str, Any]:
        return {
            "species": self.species, "seed": self.seed, "sample_size": self.sample_size,
            "pad_length": self.pad_length, "sampling": "with replacement, p ~ log1p(counts), per-cell seed",
            "order": "<cls>, chromosomes shuffled per cell, genes by genomic start",
            "special_tokens": {"pad": _PAD, "chrom_right": _CHROM_RIGHT, "cls": _CLS},
            "pooling": "cls decoder output, L2-normalised", "padding_mask": "bool (original: float +1 quirk)",
            "cell_gene_filters": "none (original: filter_genes min_cells=10, filter_cells min_genes=25)",
            **self._cfg,
        }
