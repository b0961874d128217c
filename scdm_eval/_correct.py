"""Batch correction of embeddings before classification (Harmony), and a batch-mixing score.

Harmony (``harmonypy``) is applied per model to the embeddings of every evaluated cell at once,
with the batch column (``study`` by default) and never the labels. It is *transductive*: the test
cells' embeddings (not their labels) shape the correction the training cells get, as in the paper's
Supplementary Note 2, and the results rows say so (``correction``, ``transductive``).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pandas as pd

from scdm_embed.errors import ScdmError

#: ``--correct`` values.
CORRECTIONS: tuple[str, ...] = ("none", "harmony")


def check_correction(correct: str, batch_key: str, columns: pd.Index | list[str]) -> None:
    """Refuse an unknown correction, or a batch column the cell table lacks."""
    if correct not in CORRECTIONS:
        raise ScdmError(f"unknown correction {correct!r}", f"use one of {', '.join(CORRECTIONS)}")
    if correct != "none" and batch_key not in columns:
        have = [c for c in columns if c not in ("row", "label", "response")]
        raise ScdmError(f"--batch-key {batch_key!r} is not a column of the cell table (it has: {', '.join(have)})",
                        "pass --batch-key with the column naming each cell's batch (usually study)")


def harmony(X: np.ndarray, batch: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Harmony-corrected copy of ``X`` (cells x dims) for the batch of each cell; float32.

    One batch only: returned unchanged (there is nothing to mix).
    """
    import harmonypy

    batch = np.asarray(batch).astype(str)
    if np.unique(batch).size < 2:
        return np.asarray(X, dtype=np.float32)
    Xd = np.asarray(X, dtype=np.float64)
    with contextlib.redirect_stdout(io.StringIO()):
        h = harmonypy.run_harmony(Xd, pd.DataFrame({"batch": batch}), "batch", verbose=False, random_state=seed)
    Z = np.asarray(h.Z_corr, dtype=np.float64)
    if Z.shape != Xd.shape:
        Z = Z.T
    if not np.isfinite(Z).all():
        raise ScdmError("Harmony produced non-finite embeddings", "run without --correct, or check the batch column")
    return Z.astype(np.float32)


def correct_embeddings(X: np.ndarray, batch: np.ndarray, rows: np.ndarray, *, method: str, seed: int = 0) -> np.ndarray:
    """``X`` with rows ``rows`` (the evaluated cells) corrected by ``method``; other rows unchanged."""
    if method == "none":
        return X
    out = np.array(X, dtype=np.float32, copy=True)
    out[rows] = harmony(X[rows], batch[rows], seed=seed)
    return out


def batch_entropy(X: np.ndarray, batch: np.ndarray, *, k: int = 30) -> float:
    """Mean over cells of the entropy of the batches among each cell's ``k`` nearest neighbours,
    divided by log(number of batches): 0 = neighbours all from the cell's own batch, 1 = fully mixed."""
    from sklearn.neighbors import NearestNeighbors

    batch = np.asarray(batch).astype(str)
    levels, codes = np.unique(batch, return_inverse=True)
    if levels.size < 2:
        return 1.0
    k = min(k, len(batch) - 1)
    nn = NearestNeighbors(n_neighbors=k + 1).fit(X)
    idx = nn.kneighbors(X, return_distance=False)[:, 1:]
    counts = np.stack([np.bincount(r, minlength=levels.size) for r in codes[idx]]) / k
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(counts > 0, counts * np.log(counts), 0.0), axis=1)
    return float(ent.mean() / np.log(levels.size))


__all__ = ["CORRECTIONS", "batch_entropy", "check_correction", "correct_embeddings", "harmony"]
