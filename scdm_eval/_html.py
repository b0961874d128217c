"""The self-contained HTML report of a results folder: figures inline as SVG, tables, provenance.

``write_html_report(results_dir, store=..., out=...)`` writes ``report.html`` (opens offline: CSS
inline, no script, no external reference) and a PNG + SVG copy of every figure. The tables
(:func:`compute_table`, :func:`recommend`, :func:`provenance`) are reused by the web app.
"""

from __future__ import annotations

import html
import math
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scdm_embed.errors import ScdmError

from ._figures import (
    UMAP_MAX_CELLS,
    category_bars,
    finite,
    label,
    radar,
    save_figure,
    svg_text,
    umap_coordinates,
    umap_figure,
)
from ._report import summarize

#: result files of a results folder, read and stacked in this order (``scdm-eval run``, ``lora``, prompting)
RESULT_FILES: tuple[str, ...] = ("results.parquet", "lora_results.parquet", "llm_results.parquet")
#: significance level of the recommendation table's paired t-test over folds
ALPHA = 0.05
#: columns of :func:`compute_table`
COMPUTE_COLUMNS: tuple[str, ...] = ("model", "dataset", "parameters", "dim", "cells", "cells_per_s", "peak_rss_mb",
                                    "peak_gpu_mb", "device", "wall_s", "batch_size")
#: columns of :func:`recommend`
RECOMMEND_COLUMNS: tuple[str, ...] = ("scheme", "by", "category", "metric", "best_model", "best_classifier", "best",
                                      "runner_up_model", "runner_up_classifier", "runner_up", "margin", "n_folds",
                                      "p_ttest", "significant")


def load_results(results: str | Path | pd.DataFrame) -> pd.DataFrame:
    """The results rows of a folder (``results.parquet``, ``lora_results.parquet``, ... stacked)."""
    if isinstance(results, pd.DataFrame):
        return results
    folder = Path(results)
    if not folder.is_dir():
        raise ScdmError(f"--results {str(folder)!r} is not a folder",
                        "pass the --out folder of `scdm-eval run` (it holds results.parquet)")
    frames = []
    for name in RESULT_FILES:
        p = folder / name
        if p.is_file():
            try:
                frames.append(pd.read_parquet(p))
            except (OSError, ValueError) as e:
                raise ScdmError(f"{str(p)!r} cannot be read as a results table ({type(e).__name__})",
                                "re-run `scdm-eval run --out FOLDER` to rewrite it") from None
    if not frames:
        raise ScdmError(f"--results {str(folder)!r} holds no {' / '.join(RESULT_FILES)}",
                        "pass the --out folder of `scdm-eval run` or `scdm-eval lora`")
    df = pd.concat(frames, ignore_index=True)
    need = ["model", "scheme", "by", "category", "classifier", "fold", "partition", "n_test", "f1", "auroc"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ScdmError(f"the results in {str(folder)!r} lack column(s) {missing}",
                        "re-run `scdm-eval run` with this version of scdm")
    for c in ("reason",):
        if c not in df.columns:
            df[c] = ""
    df["reason"] = df["reason"].fillna("").astype(str)
    if "leak_prone" not in df.columns:
        df["leak_prone"] = False
    return df


def compute_table(store: Any) -> pd.DataFrame:
    """Per model x dataset of the store: parameters, width, cells, cells/s, peak memory, device, wall time."""
    from scdm_embed.store import EmbeddingStore

    st = store if isinstance(store, EmbeddingStore) else EmbeddingStore(store)
    rows = []
    for e in st.entries():
        a = e.attrs
        t = a.get("telemetry") or {}
        params = t.get("n_params", a.get("n_params", a.get("parameters")))  # telemetry; None for pca/hvg
        rows.append({"model": e.model, "dataset": e.dataset, "parameters": params, "dim": e.dim, "cells": e.n_cells,
                     "cells_per_s": t.get("cells_per_s"), "peak_rss_mb": t.get("peak_rss_mb"),
                     "peak_gpu_mb": t.get("peak_gpu_mb"), "device": a.get("device"), "wall_s": t.get("seconds"),
                     "batch_size": t.get("batch_size")})
    out = pd.DataFrame(rows, columns=list(COMPUTE_COLUMNS))
    # ints (or None), not floats with NaN: shown as 22,713,216 / n/a
    out["parameters"] = pd.Series([None if r["parameters"] is None else int(r["parameters"]) for r in rows],
                                  index=out.index, dtype=object)
    return out


def recommend(results: pd.DataFrame, *, metric: str = "auroc", alpha: float = ALPHA) -> pd.DataFrame:
    """Best model (+ classifier) per scheme x category by mean ``metric`` over folds, the margin over the
    best row of another model, and a paired t-test over the folds both were scored on."""
    from ._metrics import LOWER_IS_BETTER
    from ._stats import paired_test

    low = metric in LOWER_IS_BETTER
    rows = []
    for (scheme, by, cat), g in results.groupby(["scheme", "by", "category"], sort=False, dropna=False):
        means = g.groupby(["model", "classifier"], sort=False)[metric].mean().dropna()
        if means.empty:
            continue
        order = means.sort_values(ascending=low, kind="stable")
        (bm, bc), best = order.index[0], float(order.iloc[0])
        others = order[[m != bm for m, _ in order.index]]
        row: dict[str, Any] = {"scheme": scheme, "by": by, "category": cat, "metric": metric, "best_model": bm,
                               "best_classifier": bc, "best": best, "runner_up_model": "", "runner_up_classifier": "",
                               "runner_up": math.nan, "margin": math.nan, "n_folds": 0, "p_ttest": math.nan,
                               "significant": False}
        if len(others):
            (rm, rc), ru = others.index[0], float(others.iloc[0])
            a = g[(g["model"] == bm) & (g["classifier"] == bc)].set_index(["fold", "partition"])[metric]
            b = g[(g["model"] == rm) & (g["classifier"] == rc)].set_index(["fold", "partition"])[metric]
            keys = a.index.intersection(b.index)
            t = paired_test(a.loc[keys].to_numpy(), b.loc[keys].to_numpy())
            p = t["p_ttest"]
            row.update(runner_up_model=rm, runner_up_classifier=rc, runner_up=ru, margin=abs(best - ru),
                       n_folds=t["n_folds"], p_ttest=p, significant=bool(finite(p) and p < alpha))
        rows.append(row)
    return pd.DataFrame(rows, columns=list(RECOMMEND_COLUMNS))


def provenance(results: pd.DataFrame, store: Any | None = None, *, results_dir: str | Path | None = None) -> dict[str, Any]:
    """What the report was made from: results folder, store, splits and their parameters, seeds, versions."""
    import importlib.metadata as md

    out: dict[str, Any] = {}
    if results_dir is not None:
        out["results"] = str(Path(results_dir).resolve())
    splits = sorted(results["split"].dropna().astype(str).unique()) if "split" in results else []
    out["splits"] = ", ".join(splits) or "n/a"
    if "seed" in results:
        out["seeds"] = ", ".join(str(s) for s in sorted(results["seed"].dropna().unique()))
    out["schemes"] = ", ".join(dict.fromkeys(results["scheme"].astype(str)))
    out["models"] = ", ".join(dict.fromkeys(results["model"].astype(str)))
    out["classifiers"] = ", ".join(dict.fromkeys(results["classifier"].astype(str)))
    if store is not None:
        from scdm_embed.store import EmbeddingStore

        st = store if isinstance(store, EmbeddingStore) else EmbeddingStore(store)
        out["store"] = str(st.path.resolve())
        rec = st.record
        out["store created"] = f"{rec.created} by scdm {rec.scdm_version}"
        out["datasets"] = ", ".join(f"{d} ({st.dataset_attrs(d).get('n_cells')} cells, input "
                                    f"{str(st.dataset_attrs(d).get('input_hash'))[:12]})" for d in st.datasets())
        for name in splits:
            got = st.get_splits(name)
            if got is not None:
                out[f"split {name}"] = ", ".join(f"{k}={v}" for k, v in got[1].params().items()
                                                 if k not in ("datasets",) and v is not None)
        for e in st.entries():
            out[f"embedding {e.model}/{e.dataset}"] = (f"checkpoint {e.attrs.get('checkpoint') or '-'} "
                                                      f"({str(e.attrs.get('checkpoint_hash'))[:19]}), model version "
                                                      f"{e.attrs.get('model_version')}, device {e.attrs.get('device')}")
    vers = []
    for pkg in ("scdm", "numpy", "pandas", "scikit-learn", "xgboost", "torch", "zarr", "anndata", "umap-learn",
                "matplotlib"):
        try:
            vers.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            continue
    out["versions"] = f"Python {platform.python_version()}; " + ", ".join(vers)
    return out


# -- HTML --------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:1rem 2rem;
color:#1b1b1b;line-height:1.4}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.25rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
h3{font-size:1.05rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0 1rem}th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left}
th{background:#f3f5f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1rem 0}figure svg{max-width:100%;height:auto}figcaption{font-size:.85rem;color:#555}
.note{font-size:.85rem;color:#555}.yes{color:#116611;font-weight:600}.muted{color:#888}
nav a{margin-right:1rem}code{background:#f3f5f7;padding:0 .2rem}
"""


def esc(x: Any) -> str:
    """HTML-escaped text of ``x``."""
    return html.escape(str(x), quote=True)


def fmt(x: Any, digits: int = 3) -> str:
    """A number to ``digits`` decimals, ``n/a`` for NaN/None, anything else as text."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if isinstance(x, (float, np.floating)):
        return f"{float(x):.{digits}g}" if abs(float(x)) >= 1000 else f"{float(x):.{digits}f}"
    return str(x)


def html_table(df: pd.DataFrame, *, columns: Sequence[str] | None = None, digits: int = 3,
               headers: dict[str, str] | None = None) -> str:
    """A plain ``<table>`` of ``df`` (escaped; numbers right-aligned)."""
    cols = list(columns or df.columns)
    heads = "".join(f"<th>{esc((headers or {}).get(c, c))}</th>" for c in cols)
    body = []
    for r in df[cols].itertuples(index=False):
        cells = []
        for v in r:
            num = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
            cells.append(f"<td class=\"num\">{esc(fmt(v, digits))}</td>" if num else f"<td>{esc(fmt(v, digits))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{heads}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def summary_table(summary: pd.DataFrame, *, metrics: Sequence[str] = ("f1", "auroc", "auprc", "accuracy")) -> pd.DataFrame:
    """The summary as display strings: mean ± s.d. [95% CI] per metric."""
    out = summary[["scheme", "category", "model", "classifier", "n_folds"]].copy()
    for m in metrics:
        if f"{m}_mean" not in summary:
            continue
        vals = []
        for r in summary.itertuples(index=False):
            d = r._asdict()
            mean, sd, lo, hi = (d[f"{m}_{s}"] for s in ("mean", "sd", "ci_low", "ci_high"))
            s = "n/a" if not finite(mean) else f"{mean:.3f}" + ("" if not finite(sd) else f" ± {sd:.3f}")
            if finite(lo):
                s += f" [{lo:.3f}, {hi:.3f}]"
            vals.append(s)
        out[label(m)] = vals
    return out


def _figure_html(fig, stem: Path, caption: str, paths: dict[str, Path], key: str) -> str:
    files = save_figure(fig, stem)
    paths[f"{key}_png"], paths[f"{key}_svg"] = files["png"], files["svg"]
    return (f"<figure id=\"fig-{esc(key)}\">{svg_text(fig)}<figcaption>{esc(caption)} "
            f"(files: {esc(files['png'].name)}, {esc(files['svg'].name)})</figcaption></figure>")


def write_html_report(
    results: str | Path | pd.DataFrame,
    *,
    out: str | Path,
    store: str | Path | None = None,
    metric: str = "auroc",
    umap: bool = True,
    max_umap_cells: int = UMAP_MAX_CELLS,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Path]:
    """Write ``report.html`` (self-contained) and ``fig-*.png/.svg`` into ``out``.

    ``results``: a results folder (``scdm-eval run`` / ``lora`` output) or table. With ``store``:
    UMAPs of each model (fitted once, cached in the store; a random ``max_umap_cells`` subsample
    above that), the compute table from the store's telemetry and the store's provenance.
    ``metric`` ranks models in the recommendation table and the radar charts.
    """
    from scdm_embed.cli_support import make_console

    results_dir = None if isinstance(results, pd.DataFrame) else results
    res = load_results(results)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ScdmError(f"--out {str(out)!r} is a file", "pass a folder for the report (it is created)")
    if store is not None:
        from scdm_embed.store import EmbeddingStore

        EmbeddingStore(store)  # refuse a path that is no store before writing anything
    out.mkdir(parents=True, exist_ok=True)
    console = make_console() if progress else None
    summary = summarize(res)
    paths: dict[str, Path] = {}
    parts = [f"<h1>scdm benchmark report</h1><p class=\"note\">{len(res)} fits; "
             f"{res['model'].nunique()} model(s) x {res['classifier'].nunique()} classifier(s) x "
             f"{res['category'].nunique()} categor{'y' if res['category'].nunique() == 1 else 'ies'}; "
             "sensitive is the positive class; 95% CI = Student-t interval of the mean over folds.</p>",
             "<nav><a href=\"#results\">results</a><a href=\"#figures\">figures</a><a href=\"#umap\">UMAP</a>"
             "<a href=\"#compute\">compute</a><a href=\"#recommend\">recommendations</a>"
             "<a href=\"#provenance\">provenance</a></nav>"]
    parts.append("<h2 id=\"results\">Results per category</h2>")
    parts.append(html_table(summary_table(summary)))
    if summary["leak_prone"].any():
        from ._report import LEAK_NOTE

        parts.append(f"<p class=\"note\"><b>leak_prone</b>: {esc(LEAK_NOTE)}</p>")
    parts.append("<h2 id=\"figures\">Figures</h2>")
    for scheme, s in summary.groupby("scheme", sort=False):
        tag = str(scheme)
        parts.append(f"<h3>{esc(scheme)} scheme</h3>")
        parts.append(_figure_html(category_bars(s), out / f"fig-bars-{tag}", "F1 and AUROC per model and category, "
                                  "frozen vs LoRA vs prompting side by side, 95% CI error bars", paths, f"bars-{tag}"))
        parts.append(_figure_html(radar(s, metric=metric), out / f"fig-radar-{tag}",
                                  f"{label(metric)} per category, one radar per model", paths, f"radar-{tag}"))
    parts.append("<h2 id=\"umap\">UMAP of the embeddings</h2>")
    if store is None or not umap:
        parts.append("<p class=\"muted\">no store given (--store): no UMAPs</p>" if store is None
                     else "<p class=\"muted\">UMAPs turned off</p>")
    else:
        from scdm_embed.store import EmbeddingStore

        st = EmbeddingStore(store)
        for model in [m for m in dict.fromkeys(res["model"].astype(str)) if m in st.models()]:
            if console is not None:
                console.print(f"UMAP of {model} ...")
            coords, cells, n_total = umap_coordinates(st, model, max_cells=max_umap_cells, seed=seed)
            note = (f"subsample of {len(cells):,} of {n_total:,} cells" if n_total > len(cells)
                    else f"all {n_total:,} cells")
            parts.append(_figure_html(umap_figure(coords, cells, model=model, n_total=n_total),
                                      out / f"fig-umap-{model}", f"UMAP of {model} ({note}), by response and by study; "
                                      "coordinates cached in the store", paths, f"umap-{model}"))
    parts.append("<h2 id=\"compute\">Compute</h2>")
    if store is None:
        parts.append("<p class=\"muted\">no store given (--store): no telemetry</p>")
    else:
        ct = compute_table(store)
        parts.append(html_table(ct, headers={"cells_per_s": "cells/s", "peak_rss_mb": "peak RSS (MB)",
                                             "peak_gpu_mb": "peak GPU (MB)", "wall_s": "wall (s)"}))
    parts.append("<h2 id=\"recommend\">Model recommendation</h2>")
    rec = recommend(res, metric=metric)
    parts.append(html_table(rec))
    parts.append(f"<p class=\"note\">best = highest mean {esc(label(metric))} over folds; margin over the best row of "
                 f"another model; significant = paired t-test over the folds both were scored on, p &lt; {ALPHA} "
                 "(uncorrected).</p>")
    parts.append("<h2 id=\"provenance\">Provenance</h2>")
    prov = provenance(res, store, results_dir=results_dir)
    parts.append("<table><tbody>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in prov.items())
                 + "</tbody></table>")
    doc = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>scdm report</title>"
           f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>{CSS}</style></head>"
           f"<body>{''.join(parts)}</body></html>")
    paths["html"] = out / "report.html"
    paths["html"].write_text(doc, encoding="utf-8")
    summary.to_csv(out / "summary.csv", index=False)
    rec.to_csv(out / "recommendations.csv", index=False)
    paths["summary_csv"], paths["recommendations"] = out / "summary.csv", out / "recommendations.csv"
    return paths


__all__ = ["COMPUTE_COLUMNS", "RECOMMEND_COLUMNS", "RESULT_FILES", "compute_table", "html_table", "load_results",
           "provenance", "recommend", "summary_table", "write_html_report"]
