"""Significance of a results table: paired tests between models / classifiers, label-permutation nulls.

- :func:`paired_tests`: per category and metric, every pair of models (same classifier) and every
  pair of classifiers (same model) is compared over the folds both were scored on: Student's paired
  t-test (``scipy.stats.ttest_rel``, as the paper), the Wilcoxon signed-rank test, an effect size
  (mean of the differences / their s.d., Cohen's d_z), and Holm's correction across the comparisons
  of one family (scheme x category x metric x what is compared).
- :func:`permutation_null` / :func:`permutation_pvalues`: the same folds refitted on labels shuffled
  within the split's groups (whole samples keep one label when the folds are grouped); the p-value of
  a metric's fold mean is ``(1 + k) / (1 + N)``, ``k`` of ``N`` permutations doing at least as well.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scdm_embed.errors import ScdmError

from ._metrics import LOWER_IS_BETTER, METRICS

#: Significance level of the ``significant`` column (Holm-adjusted paired t-test p-value).
ALPHA = 0.05
#: Columns of :func:`paired_tests`.
STATS_COLUMNS: tuple[str, ...] = (
    "scheme", "by", "category", "metric", "compared", "fixed", "a", "b", "n_folds", "mean_a", "mean_b",
    "mean_diff", "sd_diff", "effect_size", "t", "p_ttest", "p_wilcoxon", "p_ttest_holm", "p_wilcoxon_holm",
    "significant", "better",
)
#: Columns of :func:`permutation_pvalues`.
PERMUTATION_COLUMNS: tuple[str, ...] = ("model", "scheme", "by", "category", "classifier", "metric", "observed",
                                        "null_mean", "null_sd", "n_permutations", "k", "p_value")
_FAMILY = ["scheme", "by", "category", "metric", "compared"]
STATS_NOTE = ("paired over the folds (held-out studies / test datasets) both rows were scored on: Student's paired "
              "t-test and Wilcoxon signed-rank, Holm-corrected within each category x metric x comparison kind; "
              "effect size = mean difference / s.d. of the differences (d_z); significant = Holm-adjusted t-test "
              f"p < {ALPHA}")


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaNs stay NaN and do not count as comparisons)."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if not ok.size:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    m = ok.size
    adj = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    out[order] = adj
    return out


def paired_test(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Paired t-test and Wilcoxon signed-rank test of ``a - b`` (NaN pairs dropped), and d_z.

    Identical pairs give p = 1; fewer than 2 pairs, or differences that are constant but not
    zero (no variance to test against), give NaN p-values.
    """
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = ~(np.isnan(a) | np.isnan(b))
    d = a[ok] - b[ok]
    n = int(d.size)
    res = {"n_folds": n, "mean_a": float(a[ok].mean()) if n else math.nan, "mean_b": float(b[ok].mean()) if n else math.nan,
           "mean_diff": float(d.mean()) if n else math.nan, "sd_diff": math.nan, "effect_size": math.nan,
           "t": math.nan, "p_ttest": math.nan, "p_wilcoxon": math.nan}
    if n < 2:
        return res
    sd = float(d.std(ddof=1))
    res["sd_diff"] = sd
    if np.all(d == 0):
        res.update(t=0.0, p_ttest=1.0, p_wilcoxon=1.0, effect_size=0.0)
        return res
    if sd == 0:
        return res
    t = stats.ttest_rel(a[ok], b[ok])
    res.update(t=float(t.statistic), p_ttest=float(t.pvalue), effect_size=float(d.mean() / sd),
               p_wilcoxon=float(stats.wilcoxon(d).pvalue))
    return res


def paired_tests(results: pd.DataFrame, *, metrics: Sequence[str] = METRICS, alpha: float = ALPHA) -> pd.DataFrame:
    """Every pair of models (per classifier) and of classifiers (per model), per category and metric.

    Pairs are matched on ``(fold, partition)``. Returns one row per comparison (columns
    :data:`STATS_COLUMNS`); ``better`` names the row with the better mean (lower for Brier / ECE)
    when the difference is significant, else ``""``.
    """
    metrics = [m for m in metrics if m in results.columns]  # a table from before brier / ece: the others
    missing = [c for c in ("model", "scheme", "by", "category", "classifier", "fold", "partition")
               if c not in results.columns] or ([] if metrics else ["a metric"])
    if missing:
        raise ScdmError(f"the results table lacks column(s) {missing}",
                        "pass a results.parquet written by `scdm-eval run` (or re-run it with this version)")
    rows: list[dict[str, Any]] = []
    for (scheme, by, cat), g in results.groupby(["scheme", "by", "category"], sort=False, dropna=False):
        for compared, fixed_col in (("model", "classifier"), ("classifier", "model")):
            for fixed, h in g.groupby(fixed_col, sort=False):
                names = list(dict.fromkeys(h[compared]))
                wide = {n: h[h[compared] == n].set_index(["fold", "partition"]) for n in names}
                for a, b in itertools.combinations(names, 2):
                    keys = wide[a].index.intersection(wide[b].index)
                    for m in metrics:
                        r = paired_test(wide[a].loc[keys, m].to_numpy(), wide[b].loc[keys, m].to_numpy())
                        rows.append({"scheme": scheme, "by": by, "category": cat, "metric": m, "compared": compared,
                                     "fixed": fixed, "a": a, "b": b, **r})
    df = pd.DataFrame(rows, columns=[c for c in STATS_COLUMNS if c not in ("p_ttest_holm", "p_wilcoxon_holm",
                                                                             "significant", "better")])
    df["p_ttest_holm"] = np.nan
    df["p_wilcoxon_holm"] = np.nan
    for _, idx in df.groupby(_FAMILY, sort=False).groups.items():
        df.loc[idx, "p_ttest_holm"] = holm(df.loc[idx, "p_ttest"].to_numpy())
        df.loc[idx, "p_wilcoxon_holm"] = holm(df.loc[idx, "p_wilcoxon"].to_numpy())
    df["significant"] = (df["p_ttest_holm"] < alpha).fillna(False).astype(bool)
    low = df["metric"].isin(list(LOWER_IS_BETTER)).to_numpy()
    a_better = np.where(low, df["mean_diff"] < 0, df["mean_diff"] > 0)
    df["better"] = np.where(df["significant"], np.where(a_better, df["a"], df["b"]), "")
    return df[list(STATS_COLUMNS)]


# -- label-permutation null ---------------------------------------------------------------------
def permute_labels(y: np.ndarray, category: np.ndarray, groups: np.ndarray | None,
                   rng: np.random.Generator) -> np.ndarray:
    """``y`` shuffled within each category; with ``groups`` whose cells share a label, the groups'
    labels are shuffled among the category's groups (a sample stays one class), else the cells'."""
    out = y.copy()
    for cat in pd.unique(category):
        idx = np.flatnonzero(category == cat)
        if groups is not None:
            g = pd.Series(y[idx]).groupby(groups[idx])
            if int(g.nunique().max()) == 1:
                first = g.first()
                shuffled = pd.Series(rng.permutation(first.to_numpy()), index=first.index)
                out[idx] = shuffled.reindex(groups[idx]).to_numpy()
                continue
        out[idx] = rng.permutation(y[idx])
    return out


def _trainable(y: np.ndarray, parts: Sequence[Any]) -> bool:
    return all(np.unique(y[p.train]).size == 2 for p in parts)


def permutation_null(X: np.ndarray, y: np.ndarray, parts: Sequence[Any], category: np.ndarray,
                     groups: np.ndarray | None, *, n: int, seed: int,
                     fit: Callable[[np.ndarray, Any, int], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """``n`` label permutations scored on the same partitions: one row per permutation x partition x fit.

    ``fit(y_perm, partition, permutation)`` fits every classifier on the partition and returns their
    rows (``classifier`` + metrics). The permutations depend only on ``seed`` (every model sees the
    same ones); a draw that leaves a training fold with one class is redrawn.
    """
    rows = []
    for i in range(n):
        rng = np.random.default_rng([int(seed), 0x5CD, i])
        for _ in range(100):
            yp = permute_labels(y, category, groups, rng)
            if _trainable(yp, parts):
                break
        else:
            raise ScdmError("label permutations keep leaving a training fold with one class",
                            "use more groups per class (a coarser --by or --group-key none), or drop --permutations")
        for part in parts:
            for r in fit(yp, part, i):
                rows.append({"category": part.category, "fold": part.fold, "partition": part.name, "permutation": i, **r})
    return rows


def model_null(X: np.ndarray, y: np.ndarray, parts: Sequence[Any], splits: Any, model: str,
               classifiers: Sequence[str], settings: dict[str, Any], *, seed: int, n: int,
               groups: np.ndarray | None = None, threads: int = 1,
               advance: Callable[[], None] = lambda: None) -> list[dict[str, Any]]:
    """The null rows of one model in a run (:func:`permutation_null` with the run's classifiers,
    settings and per-partition seeds); ``groups``: the split's group of every cell, or None."""
    from ._classifiers import fit_score
    from ._run import _task_seed

    p = splits.params
    category = splits.table["category"].to_numpy()

    def fit(yp: np.ndarray, part: Any, _i: int) -> list[dict[str, Any]]:
        out = []
        for c in classifiers:
            r = fit_score(X, yp, part.train, part.test, c, settings[c], _task_seed(seed, part.category, part.fold),
                          threads=threads, groups=groups)
            out.append({"model": model, "scheme": p["scheme"], "by": p["by"], "classifier": c,
                        **{m: r[m] for m in METRICS}})
            advance()
        return out

    return permutation_null(X, y, parts, category, groups, n=n, seed=seed, fit=fit)


def permutation_pvalues(results: pd.DataFrame, null: pd.DataFrame, *, metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Per model x category x classifier and metric: observed fold mean vs the permutation fold means.

    ``p_value = (1 + k) / (1 + N)``, ``k`` of the ``N`` permutations whose fold mean is at least
    as good (>= the observed; <= for Brier / ECE); permutations where the metric is undefined on
    every fold are left out of ``N``. Columns :data:`PERMUTATION_COLUMNS`.
    """
    keys = ["model", "scheme", "by", "category", "classifier"]
    rows = []
    nullmean = null.groupby([*keys, "permutation"], sort=False)[list(metrics)].mean()
    for key, g in results.groupby(keys, sort=False):
        try:
            nm = nullmean.xs(key, level=keys, drop_level=True)
        except KeyError:
            continue
        for m in metrics:
            obs = float(np.nanmean(g[m].to_numpy(dtype=float))) if g[m].notna().any() else math.nan
            v = nm[m].to_numpy(dtype=float)
            v = v[~np.isnan(v)]
            k = int((v <= obs).sum() if m in LOWER_IS_BETTER else (v >= obs).sum())
            p = (1 + k) / (1 + v.size) if v.size and not math.isnan(obs) else math.nan
            rows.append({**dict(zip(keys, key, strict=True)), "metric": m, "observed": obs,
                         "null_mean": float(v.mean()) if v.size else math.nan,
                         "null_sd": float(v.std(ddof=1)) if v.size > 1 else math.nan,
                         "n_permutations": int(v.size), "k": k, "p_value": p})
    return pd.DataFrame(rows, columns=list(PERMUTATION_COLUMNS))


# -- report -------------------------------------------------------------------------------------
def stats_markdown(stats: pd.DataFrame, perm: pd.DataFrame | None = None, *,
                   metrics: Sequence[str] = ("auroc", "f1")) -> str:
    """A markdown section: the paired comparisons of ``metrics`` (significant ones in bold) and the nulls."""
    out = ["## Statistics", "", f"- {STATS_NOTE}", ""]
    s = stats[stats["metric"].isin(list(metrics))]
    if not len(s):
        out += ["No paired comparison (one model and one classifier).", ""]
    for (cat, m), g in s.groupby(["category", "metric"], sort=False):
        out += [f"### {cat}: {m}", "", "| compared | within | a | b | folds | mean a - b | d_z | p (t, Holm) | "
                "p (Wilcoxon, Holm) | better |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in g.itertuples(index=False):
            star = "**" if r.significant else ""
            out.append(f"| {r.compared} | {r.fixed} | {r.a} | {r.b} | {r.n_folds} | {star}{r.mean_diff:+.3f}{star} | "
                       f"{r.effect_size:.2f} | {star}{r.p_ttest_holm:.3g}{star} | {r.p_wilcoxon_holm:.3g} | "
                       f"{r.better or '-'} |")
        out.append("")
    if perm is not None and len(perm):
        n = int(perm["n_permutations"].max())
        out += ["### Label-permutation null", "",
                f"Labels shuffled within the split's groups, same folds, {n} permutations; p = (1 + k) / (1 + N).", "",
                "| model | category | classifier | metric | observed | null mean ± s.d. | p |", "|---|---|---|---|---|---|---|"]
        for r in perm[perm["metric"].isin(list(metrics))].itertuples(index=False):
            out.append(f"| {r.model} | {r.category} | {r.classifier} | {r.metric} | {r.observed:.3f} | "
                       f"{r.null_mean:.3f} ± {r.null_sd:.3f} | {r.p_value:.3g} |")
        out.append("")
    return "\n".join(out)


def stats_table(stats: pd.DataFrame, *, metrics: Sequence[str] = ("auroc", "f1")):
    """A :class:`rich.table.Table` of the paired comparisons of ``metrics`` (significant ones bold)."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title="paired tests over folds (Holm-adjusted; bold: p < 0.05)")
    for c in ("category", "metric", "a", "b", "folds", "mean a-b", "d_z", "p t", "p Wilcoxon", "better"):
        t.add_column(c, justify="right" if c in ("folds", "mean a-b", "d_z", "p t", "p Wilcoxon") else "left")
    for r in stats[stats["metric"].isin(list(metrics))].itertuples(index=False):
        a, b = (f"{r.a} ({r.fixed})", f"{r.b}") if r.compared == "model" else (f"{r.fixed}: {r.a}", f"{r.b}")
        style = "bold" if r.significant else None
        t.add_row(escape(str(r.category)), r.metric, escape(a), escape(b), str(r.n_folds), f"{r.mean_diff:+.3f}",
                  f"{r.effect_size:.2f}", f"{r.p_ttest_holm:.3g}", f"{r.p_wilcoxon_holm:.3g}", escape(r.better or "-"),
                  style=style)
    return t


def permutation_table(perm: pd.DataFrame | list[dict[str, Any]], *, metrics: Sequence[str] = ("auroc", "f1")):
    """A :class:`rich.table.Table` of the label-permutation p-values of ``metrics``."""
    from rich.markup import escape
    from rich.table import Table

    perm = pd.DataFrame(perm)
    n = int(perm["n_permutations"].max()) if len(perm) else 0
    t = Table(title=f"label-permutation null ({n} permutations, same folds; p = (1+k)/(1+N))")
    for c in ("model", "category", "classifier", "metric", "observed", "null mean", "p"):
        t.add_column(c, justify="right" if c in ("observed", "null mean", "p") else "left")
    for r in perm[perm["metric"].isin(list(metrics))].itertuples(index=False):
        t.add_row(escape(str(r.model)), escape(str(r.category)), r.classifier, r.metric, f"{r.observed:.3f}",
                  f"{r.null_mean:.3f}", f"{r.p_value:.3g}")
    return t


def write_stats(results: pd.DataFrame, out: str | Path, *, permutation: pd.DataFrame | None = None) -> pd.DataFrame:
    """Write ``stats.parquet`` / ``stats.csv`` (and ``permutation.csv``) into ``out`` and append the
    statistics section to its ``summary.md``; returns the paired-test table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats = paired_tests(results)
    stats.to_parquet(out / "stats.parquet", index=False)
    stats.to_csv(out / "stats.csv", index=False)
    if permutation is not None:
        permutation.to_csv(out / "permutation.csv", index=False)
    md = out / "summary.md"
    text = md.read_text(encoding="utf-8") if md.exists() else "# scdm-eval results\n"
    head, sep, _ = text.partition("\n## Statistics\n")  # compare re-run: replace the section
    md.write_text((head if sep else text).rstrip("\n") + "\n\n" + stats_markdown(stats, permutation) + "\n",
                  encoding="utf-8")
    return stats


def compare_results(folder: str | Path, *, out: str | Path | None = None) -> pd.DataFrame:
    """Paired tests of the ``results.parquet`` in ``folder`` (``scdm-eval compare``), written beside it."""
    folder = Path(folder)
    path = folder / "results.parquet" if folder.is_dir() else folder
    if not path.is_file():
        raise ScdmError(f"no results table at {str(path)!r}",
                        "pass --results with the --out folder of `scdm-eval run` (it holds results.parquet)")
    try:
        results = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
        raise ScdmError(f"cannot read {str(path)!r} as a results table ({e})", "re-run `scdm-eval run --out DIR`") from e
    perm_path = path.parent / "permutation.csv"
    perm = pd.read_csv(perm_path) if perm_path.is_file() else None
    return write_stats(results, out if out is not None else path.parent, permutation=perm)


__all__ = ["ALPHA", "PERMUTATION_COLUMNS", "STATS_COLUMNS", "compare_results", "holm", "model_null", "paired_test",
           "paired_tests", "permutation_null", "permutation_pvalues", "permutation_table", "permute_labels",
           "stats_markdown", "stats_table", "write_stats"]
