"""The report's figures (matplotlib, no pyplot state): grouped CI bars, radars, UMAPs.

Every function returns a :class:`matplotlib.figure.Figure`; :func:`svg_text` and
:func:`save_figure` turn one into inline SVG / PNG + SVG files. The web app reuses them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: cells above which a UMAP is fitted on a random subsample (said on the figure)
UMAP_MAX_CELLS = 50_000
_KIND_HATCH = {"frozen": "", "lora": "//", "prompt": ".."}


def label(metric: str) -> str:
    """Display name of a metric."""
    from ._report import _LABELS

    return _LABELS.get(metric, metric)


def kind_of(classifier: str) -> str:
    """``frozen`` (a classifier on frozen embeddings), ``lora`` (lora-rN) or ``prompt`` (prompt-*)."""
    c = str(classifier)
    return "lora" if c.startswith("lora") else "prompt" if c.startswith("prompt") else "frozen"


def _order_classifiers(classifiers: Sequence[str]) -> list[str]:
    rank = {"frozen": 0, "lora": 1, "prompt": 2}
    return sorted(dict.fromkeys(classifiers), key=lambda c: (rank[kind_of(c)], str(c)))


def _title(by: str, cat: str) -> str:
    return "all cells" if by == "all" else f"{by}: {cat}"


def category_bars(summary: pd.DataFrame, *, metrics: Sequence[str] = ("f1", "auroc")):
    """Per category (rows) x metric (columns): bars of each model, one per classifier, with 95% CI.

    Frozen-embedding classifiers, LoRA rows (``lora-rN``) and prompting rows (``prompt-*``)
    stand side by side; LoRA bars are hatched ``//`` and prompting bars ``..``.
    """
    from matplotlib.figure import Figure

    cats = list(dict.fromkeys(summary["category"]))
    models = list(dict.fromkeys(summary["model"]))
    clfs = _order_classifiers(summary["classifier"].astype(str))
    colours = {c: f"C{i % 10}" for i, c in enumerate(clfs)}
    width = 0.8 / max(1, len(clfs))
    panel_w = max(3.6, 0.28 * len(models) * len(clfs) + 1.6)
    fig = Figure(figsize=(panel_w * len(metrics), 2.9 * len(cats) + 0.6), layout="constrained")
    axes = np.asarray(fig.subplots(len(cats), len(metrics), squeeze=False))
    for i, cat in enumerate(cats):
        g = summary[summary["category"] == cat]
        for j, metric in enumerate(metrics):
            ax = axes[i, j]
            for k, c in enumerate(clfs):
                h = g[g["classifier"].astype(str) == c].set_index("model").reindex(models)
                x = np.arange(len(models)) + (k - (len(clfs) - 1) / 2) * width
                mean = h[f"{metric}_mean"].to_numpy(dtype=float)
                lo = np.nan_to_num(mean - h[f"{metric}_ci_low"].to_numpy(dtype=float))
                hi = np.nan_to_num(h[f"{metric}_ci_high"].to_numpy(dtype=float) - mean)
                ax.bar(x, np.nan_to_num(mean), width * 0.92, color=colours[c], hatch=_KIND_HATCH[kind_of(c)],
                       edgecolor="white" if kind_of(c) == "frozen" else "0.2", linewidth=0.5,
                       label=c if (i, j) == (0, 0) else None)
                ax.errorbar(x, np.nan_to_num(mean), yerr=np.vstack([lo, hi]), fmt="none", ecolor="0.15",
                            capsize=2.5, lw=0.8)
            if metric == "auroc":
                ax.axhline(0.5, color="0.5", lw=0.8, ls="--")
            ax.set_xticks(np.arange(len(models)), models, rotation=30 if len(models) > 3 else 0,
                          ha="right" if len(models) > 3 else "center")
            ax.set_xlim(-0.6, len(models) - 0.4)
            ax.set_ylim(0.0, 1.05)
            ax.set_ylabel(label(metric))
            ax.set_title(f"{_title(str(g['by'].iloc[0]), str(cat))} - {label(metric)}", fontsize=9)
    fig.legend(loc="outside lower center", ncol=min(6, len(clfs)), fontsize=8, frameon=False)
    fig.suptitle("mean and 95% t-CI over folds; hatched: LoRA (//), prompting (..)", fontsize=10)
    return fig


def radar(summary: pd.DataFrame, *, metric: str = "auroc"):
    """One polar panel per model: ``metric`` (mean over folds) per category, a line per classifier."""
    from matplotlib.figure import Figure

    cats = list(dict.fromkeys(summary["category"].astype(str)))
    models = list(dict.fromkeys(summary["model"]))
    clfs = _order_classifiers(summary["classifier"].astype(str))
    ncol = min(3, len(models))
    nrow = -(-len(models) // ncol)
    fig = Figure(figsize=(3.4 * ncol, 3.4 * nrow + 0.5), layout="constrained")
    theta = np.linspace(0, 2 * np.pi, len(cats), endpoint=False)
    for i, model in enumerate(models):
        ax = fig.add_subplot(nrow, ncol, i + 1, projection="polar")
        g = summary[summary["model"] == model]
        for k, c in enumerate(clfs):
            h = g[g["classifier"].astype(str) == c].assign(_c=lambda d: d["category"].astype(str))
            v = h.set_index("_c").reindex(cats)[f"{metric}_mean"].to_numpy(dtype=float)
            if np.isnan(v).all():
                continue
            ls = "--" if kind_of(c) == "lora" else ":" if kind_of(c) == "prompt" else "-"
            ax.plot(np.append(theta, theta[:1]), np.nan_to_num(np.append(v, v[:1])), ls, color=f"C{k % 10}",
                    lw=1.3, marker="o", ms=3, label=c)
        ax.set_xticks(theta, [c if len(c) <= 14 else c[:13] + "…" for c in cats], fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_yticks([0.25, 0.5, 0.75], ["", "0.5", ""], fontsize=6)
        ax.set_title(str(model), fontsize=10)
        if i == 0:
            ax.legend(fontsize=6, loc="upper right", bbox_to_anchor=(1.35, 1.12))
    note = "" if len(cats) >= 3 else f" ({len(cats)} categor{'y' if len(cats) == 1 else 'ies'}: a radar needs 3+)"
    fig.suptitle(f"{label(metric)} per category (mean over folds){note}", fontsize=10)
    return fig


# -- UMAP ---------------------------------------------------------------------------------------
def _umap_key(model: str, cells: pd.Index, input_hashes: Sequence[str], max_cells: int, seed: int) -> str:
    h = hashlib.sha256()
    for part in (model, str(max_cells), str(seed), *input_hashes):
        h.update(part.encode() + b"\0")
    h.update("\n".join(map(str, cells)).encode())
    return "sha256:" + h.hexdigest()


def umap_reference_name(model: str) -> str:
    """The store reference a model's cached UMAP coordinates live in."""
    return f"umap-{model}"


def umap_coordinates(store: Any, model: str, *, max_cells: int = UMAP_MAX_CELLS, seed: int = 0,
                     cache: bool = True) -> tuple[np.ndarray, pd.DataFrame, int]:
    """2-D UMAP of every cell of ``model`` in the store (a random ``max_cells`` subsample above that).

    Returns ``(coords, cells, n_total)``. The coordinates are fitted once and cached in the
    store as reference ``umap-<model>`` (keyed by the cells, their inputs and the settings); a
    store this process cannot write is read, not cached into.
    """
    from scdm_embed.store import EmbeddingStore
    from scdm_embed.store._core import store_lock, store_writable

    st = store if isinstance(store, EmbeddingStore) else EmbeddingStore(store)
    dsets = sorted(e.dataset for e in st.entries() if e.model == model and e.complete and not e.stale)
    cells = st.cells(dsets)
    n_total = len(cells)
    if n_total > max_cells:
        keep = np.sort(np.random.default_rng(seed).choice(n_total, max_cells, replace=False))
        cells = cells.iloc[keep]
    hashes = [str(st.dataset_attrs(d).get("input_hash")) for d in dsets]
    key = _umap_key(model, cells.index, hashes, max_cells, seed)
    held = st.get_reference(umap_reference_name(model))
    if held is not None and held[1].get("key") == key:
        return np.asarray(held[0]["coords"], dtype=np.float32), cells, n_total
    X, _ = st.load(model, datasets=dsets, cells=cells.index)
    coords = _fit_umap(X, seed=seed)
    if cache and store_writable(st.path):
        from scdm_embed.errors import StoreError

        with store_lock(st.path) as lk, contextlib.suppress(StoreError):  # an older store format: not cached
            EmbeddingStore(st.path, mode="a").put_reference(
                umap_reference_name(model), {"coords": coords}, key=key, model=model, n_cells=len(cells),
                n_total=n_total, seed=seed, method="umap-learn (n_neighbors 15, min_dist 0.1, euclidean)")
            lk.keep()
    return coords, cells, n_total


def _fit_umap(X: np.ndarray, *, seed: int) -> np.ndarray:
    import warnings

    n = len(X)
    if n < 4:
        return np.zeros((n, 2), np.float32)
    import umap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        red = umap.UMAP(n_neighbors=min(15, n - 1), min_dist=0.1, random_state=seed, n_jobs=1,
                        init="spectral" if n > 16 else "random")
        return np.asarray(red.fit_transform(np.asarray(X, dtype=np.float32)), dtype=np.float32)


def umap_figure(coords: np.ndarray, cells: pd.DataFrame, *, model: str, n_total: int | None = None):
    """Two panels of a model's UMAP: coloured by response and by study."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 4.0), layout="constrained")
    axes = fig.subplots(1, 2)
    size = max(1.0, min(8.0, 3000 / max(1, len(cells))))
    for ax, col in zip(axes, ("response", "study"), strict=True):
        raw = cells[col] if col in cells.columns else pd.Series([None] * len(cells))
        values = raw.astype(object).where(raw.notna(), "unlabelled" if col == "response" else "n/a").astype(str)
        for i, v in enumerate(sorted(values.unique())):
            m = (values == v).to_numpy()
            colour = {"sensitive": "#1f77b4", "resistant": "#d62728"}.get(v, f"C{(i + 2) % 10}") if col == "response" \
                else f"C{i % 10}"
            ax.scatter(coords[m, 0], coords[m, 1], s=size, c=colour, label=f"{v} ({int(m.sum())})", linewidths=0,
                       rasterized=False)
        ax.set_title(f"{model}: by {col}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=7, markerscale=max(1.0, 4 / size), loc="best")
    sub = (f"subsample of {len(cells):,} of {n_total:,} cells" if n_total and n_total > len(cells)
           else f"{len(cells):,} cells")
    fig.suptitle(f"UMAP of {model} embeddings ({sub})", fontsize=10)
    return fig


# -- output -------------------------------------------------------------------------------------
def svg_text(fig) -> str:
    """The figure as an inline ``<svg>`` element (no XML prolog, no external references)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def save_figure(fig, stem: str | Path, *, dpi: int = 120) -> dict[str, Path]:
    """Write ``<stem>.png`` and ``<stem>.svg``; returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = {"png": stem.with_suffix(".png"), "svg": stem.with_suffix(".svg")}
    fig.savefig(out["png"], dpi=dpi)
    fig.savefig(out["svg"], format="svg", metadata={"Date": None})
    return out


def finite(x: Any) -> bool:
    """Whether ``x`` is a finite number."""
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


__all__ = ["UMAP_MAX_CELLS", "category_bars", "finite", "kind_of", "label", "radar", "save_figure", "svg_text",
           "umap_coordinates", "umap_figure", "umap_reference_name"]
