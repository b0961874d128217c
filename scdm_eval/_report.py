"""Summaries of a results table: aggregate table, markdown, rich table and a CI plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._metrics import METRICS, mean_ci

_KEYS = ["model", "scheme", "by", "category", "classifier"]
_LABELS = {"f1": "F1", "auroc": "AUROC", "auprc": "AUPRC", "accuracy": "Accuracy", "precision": "Precision",
           "recall": "Recall", "brier": "Brier", "ece": "ECE"}
LEAK_NOTE = ("rows marked leak_prone use cell-level folds on cells whose labels are constant within a sample "
             "(or another metadata column): cells of one sample sit in training and test, so the scores can reflect "
             "recognising the sample rather than drug response and are optimistic. Honest alternatives: the default "
             "grouped folds (--group-key sample) or --scheme cross")
CI_NOTE = ("mean ± s.d. over folds (held-out studies for the cross scheme); 95% CI = two-sided Student-t "
           "interval of the mean over the folds where the metric is defined (t with n-1 d.f.), clipped to [0, 1]")


def summarize(results: pd.DataFrame, *, level: float = 0.95) -> pd.DataFrame:
    """Per model x scheme x category x classifier: fold count and, per metric, mean, s.d.,
    Student-t ``level`` CI over folds, clipped to [0, 1] (``<metric>_ci_low``/``_ci_high``),
    and ``<metric>_n``, the folds where it is defined; ``leak_prone`` when any of its folds is."""
    rows = []
    for key, g in results.groupby(_KEYS, sort=False, dropna=False):
        row: dict[str, Any] = dict(zip(_KEYS, key, strict=True))
        row["n_folds"] = len(g)
        row["n_cells"] = int(g["n_test"].sum())
        row["leak_prone"] = bool(g["leak_prone"].any()) if "leak_prone" in g else False
        for m in METRICS:
            # a table written before a metric existed (brier, ece) summarises it as NaN
            mean, sd, lo, hi, n = mean_ci(g[m].to_numpy() if m in g else np.empty(0), level=level)
            lo, hi = (max(lo, 0.0), min(hi, 1.0)) if n > 1 else (lo, hi)  # every metric lives in [0, 1]
            row.update({f"{m}_mean": mean, f"{m}_sd": sd, f"{m}_ci_low": lo, f"{m}_ci_high": hi, f"{m}_n": n})
        rows.append(row)
    cols = _KEYS + ["n_folds", "n_cells", "leak_prone"] + [f"{m}_{s}" for m in METRICS for s in ("mean", "sd", "ci_low", "ci_high", "n")]
    return pd.DataFrame(rows, columns=cols)


def _fmt(mean: float, sd: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if math.isnan(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _fmt_ci(lo: float, hi: float) -> str:
    return "" if math.isnan(lo) else f" [{lo:.3f}, {hi:.3f}]"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines)


def to_markdown(results: pd.DataFrame, summary: pd.DataFrame | None = None) -> str:
    """A markdown report: parameters, per-category summary tables, undefined metrics, skips, warnings."""
    summary = summarize(results) if summary is None else summary
    p = results.attrs.get("params", {})
    out = ["# scdm-eval results", ""]
    if p:
        out += [f"- store: `{p.get('store')}`", f"- scheme: {p.get('scheme')} (by {p.get('by')})",
                (f"- folds: {p.get('folds')}, group key: {p.get('group_key') or 'none (cell-level folds)'}, seed: {p.get('seed')}"
                 if p.get("scheme") == "pooled" else f"- leave-one-study-out over `{p.get('study_key')}`"),
                f"- split: `{results.attrs.get('split')}` ({p.get('n_cells')} cells; datasets {', '.join(p.get('datasets', []))})",
                f"- models: {', '.join(p.get('models', []))}; classifiers: {', '.join(p.get('classifiers', []))}"]
        if p.get("settings"):  # every classifier setting that ran (protocol preset + --set)
            at_once = "".join(f"; {c}: {k} fits at once" for c, k in (p.get("concurrent_fits") or {}).items())
            out += [f"- protocol: {p.get('protocol')}; workers x threads per fit: {p.get('workers')} x "
                    f"{p.get('threads_per_fit')}{at_once}"]
            out += [f"- {c} settings: " + ", ".join(f"{k}={v}" for k, v in kv.items()) for c, kv in p["settings"].items() if kv]
    out += [f"- {CI_NOTE}; sensitive is the positive class", ""]
    if summary["leak_prone"].any():
        out += [f"> **leak_prone**: {LEAK_NOTE}", ""]
    for cat, g in summary.groupby("category", sort=False):
        out += [f"## {g['by'].iloc[0]}: {cat}" if g["by"].iloc[0] != "all" else "## all cells", ""]
        header = ["model", "classifier", "studies" if g["scheme"].iloc[0] == "cross" else "folds"]
        header += [_LABELS[m] for m in METRICS]
        rows = []
        for r in g.itertuples(index=False):
            d = r._asdict()
            cells = []
            for m in METRICS:
                s = _fmt(d[f"{m}_mean"], d[f"{m}_sd"]) + _fmt_ci(d[f"{m}_ci_low"], d[f"{m}_ci_high"])
                if 0 < d[f"{m}_n"] < d["n_folds"]:
                    s += f" (n={d[f'{m}_n']})"
                cells.append(s)
            rows.append([d["model"] + (" (leak_prone)" if d["leak_prone"] else ""), d["classifier"], str(d["n_folds"]),
                         *cells])
        out += [_md_table(header, rows), ""]
    undefined = results[results["reason"] != ""]
    if len(undefined):
        out += ["## Undefined metrics", "", "NaN (never 0) on these folds; the mean and CI use the other folds.", ""]
        agg = undefined.groupby(["category", "partition", "reason"], sort=False).size().reset_index(name="fits")
        out += [_md_table(["category", "partition", "reason", "fits"], agg.astype(str).to_numpy().tolist()), ""]
    skipped = results.attrs.get("skipped", [])
    if skipped:
        out += ["## Skipped", ""]
        out += [_md_table(["category", "partition", "reason"],
                          [[str(s["category"]), str(s["name"]) or "(all)", str(s["skipped"])] for s in skipped]), ""]
    notes = results.attrs.get("warnings", [])
    if notes:
        out += ["## Warnings", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


def rich_table(summary: pd.DataFrame, *, metrics: Sequence[str] = ("f1", "auroc", "auprc", "accuracy")):
    """A :class:`rich.table.Table` of the summary (mean±s.d. over folds per metric)."""
    from rich.table import Table

    several = summary["category"].nunique() > 1
    t = Table(title="mean±s.d. over folds (all metrics with 95% CIs: summary.md)")
    for c in (["category"] if several else []) + ["model", "classifier", "folds"]:
        t.add_column(c, justify="left" if c != "folds" else "right")
    for m in metrics:
        t.add_column(_LABELS[m], justify="right")
    order = summary.assign(_c=pd.Categorical(summary["category"], list(dict.fromkeys(summary["category"]))))
    for r in order.sort_values("_c", kind="stable").to_dict("records"):
        model = str(r["model"]) + (" (leak_prone)" if r.get("leak_prone") else "")
        t.add_row(*([str(r["category"])] if several else []), model, str(r["classifier"]), str(r["n_folds"]),
                  *[_fmt(r[f"{m}_mean"], r[f"{m}_sd"]).replace(" ± ", "±") for m in metrics])
    return t


def plot_summary(summary: pd.DataFrame, *, metric: str = "auroc", path: str | Path | None = None):
    """Per-model ``metric`` (mean and 95% t-CI over folds) per classifier, one panel per category.

    Returns the matplotlib ``Figure``; saves it (PNG) when ``path`` is given.
    """
    from matplotlib.figure import Figure

    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}")
    cats = list(dict.fromkeys(summary["category"]))
    models = list(dict.fromkeys(summary["model"]))
    clfs = list(dict.fromkeys(summary["classifier"]))
    ncol = min(3, len(cats))
    nrow = -(-len(cats) // ncol)
    panel_w = max(3.5, 0.35 * len(models) * len(clfs) + 1.5)
    fig = Figure(figsize=(panel_w * ncol, 3.4 * nrow + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False)).ravel()
    width = 0.8 / max(1, len(clfs))
    for ax, cat in zip(axes, cats, strict=False):
        g = summary[summary["category"] == cat]
        for j, c in enumerate(clfs):
            h = g[g["classifier"] == c].set_index("model").reindex(models)
            x = np.arange(len(models)) + (j - (len(clfs) - 1) / 2) * width
            mean = h[f"{metric}_mean"].to_numpy(dtype=float)
            lo = mean - h[f"{metric}_ci_low"].to_numpy(dtype=float)
            hi = h[f"{metric}_ci_high"].to_numpy(dtype=float) - mean
            ax.errorbar(x, mean, yerr=np.nan_to_num(np.vstack([lo, hi])), fmt="o", capsize=3, label=c)
        if metric in ("auroc",):
            ax.axhline(0.5, color="0.6", lw=0.8, ls="--")
        ax.set_xticks(np.arange(len(models)), models, rotation=30 if len(models) > 3 else 0, ha="right" if len(models) > 3 else "center")
        ax.set_xlim(-0.6, len(models) - 0.4)
        ax.set_ylim(0.0, 1.02)
        ax.set_ylabel(_LABELS[metric])
        ax.set_title("all cells" if g["by"].iloc[0] == "all" else f"{g['by'].iloc[0]}: {cat}", fontsize=10)
    for ax in axes[len(cats):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8, loc="lower right")
    over = "held-out studies" if set(summary["scheme"]) == {"cross"} else "folds"
    fig.suptitle(f"{_LABELS[metric]}: mean and 95% t-CI over {over}", fontsize=11)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def write_report(results: pd.DataFrame, out: str | Path, *, metric: str = "auroc",
                 predictions: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write ``results.parquet/.csv``, ``summary.csv/.md/.png`` and ``skipped.csv`` into ``out``.

    With ``predictions`` (per-cell test probabilities, columns ``PREDICTION_COLUMNS``), also
    ``predictions.parquet``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    paths = {k: out / f for k, f in (("results", "results.parquet"), ("results_csv", "results.csv"),
                                     ("summary_csv", "summary.csv"), ("summary_md", "summary.md"),
                                     ("plot", "summary.png"), ("skipped", "skipped.csv"))}
    plain = results.copy()
    plain.attrs = {}
    plain.to_parquet(paths["results"], index=False)
    plain.to_csv(paths["results_csv"], index=False)
    summary.to_csv(paths["summary_csv"], index=False)
    paths["summary_md"].write_text(to_markdown(results, summary), encoding="utf-8")
    plot_summary(summary, metric=metric, path=paths["plot"])
    if predictions is not None:
        paths["predictions"] = out / "predictions.parquet"
        predictions.to_parquet(paths["predictions"], index=False)
    pd.DataFrame(results.attrs.get("skipped", []),
                 columns=["category", "fold", "name", "n_train", "n_test", "train_sensitive", "train_resistant",
                          "test_sensitive", "test_resistant", "skipped"]).to_csv(paths["skipped"], index=False)
    return paths


def write_stage_tables(results: pd.DataFrame, out: str | Path, prefix: str, *, extra_md: str = "",
                       predictions: pd.DataFrame | None = None) -> tuple[dict[str, Path], pd.DataFrame]:
    """A stage's tables in ``out``: ``<prefix>_results.parquet/.csv``, ``<prefix>_summary.csv/.md`` (the
    summary's Markdown followed by ``extra_md``) and, with ``predictions``, ``<prefix>_predictions.parquet``.

    Returns the paths (keys ``results``, ``results_csv``, ``summary_csv``, ``summary_md``,
    ``predictions``) and the results without their attrs, as written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / f"{prefix}_results.parquet", "results_csv": out / f"{prefix}_results.csv",
             "summary_csv": out / f"{prefix}_summary.csv", "summary_md": out / f"{prefix}_summary.md"}
    plain = results.copy()
    plain.attrs = {}
    plain.to_parquet(paths["results"], index=False)
    plain.to_csv(paths["results_csv"], index=False)
    summary = summarize(results)
    summary.to_csv(paths["summary_csv"], index=False)
    paths["summary_md"].write_text(to_markdown(results, summary) + extra_md, encoding="utf-8")
    if predictions is not None:
        paths["predictions"] = out / f"{prefix}_predictions.parquet"
        predictions.to_parquet(paths["predictions"], index=False)
    return paths, plain
