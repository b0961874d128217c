"""Extraction throughput: the engine (length-bucketed batches) vs the original-style paths.

On real PC9 cells with the reference-fixture checkpoints (small random models in the official
layouts, so absolute cells/s are far above the real models'; the RATIOS are what this shows):
- bucketed: the engine's default, cells sorted by token count inside a chunk, masks, at most
            B cells and the device's default token budget (4,096 padded tokens on CPU) per batch;
- padded:   the same batches in file order, every batch padded to the model's maximum length
            (scDrugMap / scGPT-style collation);
- per-cell: one cell per forward (scFoundation's get_embedding loop).
PC9 cells are deep, so most saturate Geneformer's 2,048 and tGPT's 64 tokens; a second set
binomially thins the same real cells to 5-100% depth, as shallower protocols give.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PC9, table  # noqa: E402
from models import FIXTURE_MODELS  # noqa: E402

from scdm_embed import get_adapter, read_input  # noqa: E402
from scdm_embed._batching import default_token_budget, embed_cells  # noqa: E402
from scdm_embed.models import CellChunk  # noqa: E402

N_CELLS = 256
BATCH = 32
MODELS = ("geneformer", "tgpt", "scgpt", "scfoundation", "uce")
#: the original code's collation: pad every batch to this length (None: one cell per forward)
ORIGINAL = {"geneformer": ("padded to 2,048", 2048), "tgpt": ("padded to 64", 64), "scgpt": ("padded to 1,200", 1200),
            "scfoundation": ("one cell per forward", None), "uce": ("padded to 1,536", 1536),
            "scbert": ("one cell per forward", None)}


def _thin(X: sp.csr_matrix, rng: np.random.Generator) -> sp.csr_matrix:
    X = X.copy()
    depth = rng.uniform(0.05, 1.0, X.shape[0])
    for i in range(X.shape[0]):
        s, e = X.indptr[i], X.indptr[i + 1]
        X.data[s:e] = rng.binomial(X.data[s:e].astype(np.int64), depth[i])
    X.eliminate_zeros()
    keep = np.asarray(X.sum(1)).ravel() > 0
    return X[keep]


def _rate(adapter, cells, **kw) -> float:
    embed_cells(adapter, cells[:8], **kw)  # warm-up
    t = time.perf_counter()
    embed_cells(adapter, cells, **kw)
    return len(cells) / (time.perf_counter() - t)


def main() -> None:
    data = read_input(PC9)
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(data.n_cells, N_CELLS, replace=False))
    X = sp.vstack([data.read_rows(i, i + 1) for i in idx]).tocsr()
    ids = data.cells.index.to_numpy()[idx]
    sets = {"PC9 as sequenced": X, "PC9 thinned 5-100%": _thin(X, rng)}
    rows, orig_rows = [], []
    for name in MODELS:
        ckpt, opts = FIXTURE_MODELS[name]
        a = get_adapter(name)(ckpt, **opts)
        a.load(device=a.device, dtype=a.dtype)
        a.prepare(data.genes)
        for label, M in sets.items():
            cells = a.tokenize(CellChunk(X=M, cell_ids=ids[: M.shape[0]], genes=data.genes))
            lens = np.array([len(c[a.sequence_keys[0]]) for c in cells])
            bucketed = _rate(a, cells, batch_size=BATCH, token_budget=default_token_budget(a.device))
            padded = _rate(a, cells, batch_size=BATCH, bucket=False, pad_to=ORIGINAL[name][1] or int(lens.max()))
            per_cell = _rate(a, cells, batch_size=1)
            rows.append((name, label, f"{lens.mean():.0f} [{lens.min()}-{lens.max()}]", f"{bucketed:.0f}", f"{padded:.0f}",
                         f"{per_cell:.0f}", f"{bucketed / padded:.2f}x", f"{bucketed / per_cell:.2f}x"))
            if label == "PC9 as sequenced":
                orig = per_cell if ORIGINAL[name][1] is None else padded
                orig_rows.append((name, f"{bucketed:.1f}", ORIGINAL[name][0], f"{orig:.1f}", f"{bucketed / orig:.2f}x"))
    table(f"extraction cells/s, {N_CELLS} real cells, batch {BATCH}, CPU, fixture-size models",
          rows, ("model", "cells", "tokens mean [min-max]", "bucketed", "padded-to-max", "one-per-forward",
                 "bucketed/padded", "bucketed/one-per-forward"))
    sb = _scbert(data, ids[:32], X[:32])
    if sb is not None:
        orig_rows.append(sb)
    table("engine vs the original code's collation (PC9 as sequenced)", orig_rows,
          ("model", "engine cells/s", "original-style path", "original cells/s", "speed-up"))


def _scbert(data, ids, X):
    """scBERT (fixed 16,907-token input, no padding): batched vs one cell per forward (predict.py)."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from _common import SHARED

    from tests.scdm_embed.models._performer_ckpt import scgpt_symbols, write_scbert_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ck = write_scbert_checkpoint(Path(tmp) / "scbert", scgpt_symbols(SHARED / "vocab", 16906))
        a = get_adapter("scbert")(ck)
        a.load(device=a.device, dtype=a.dtype)
        a.prepare(data.genes)
        cells = a.tokenize(CellChunk(X=X, cell_ids=ids, genes=data.genes))
        batched = _rate(a, cells, batch_size=8, token_budget=default_token_budget(a.device))
        per_cell = _rate(a, cells, batch_size=1)
    return ("scbert (dim 16)", f"{batched:.1f}", ORIGINAL["scbert"][0], f"{per_cell:.1f}", f"{batched / per_cell:.2f}x")

if __name__ == "__main__":
    main()
