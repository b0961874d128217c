"""The evaluation grid measured against the machine, not against thread contention: one process, one table.

Synthetic stores (n cells x 512 float32, 2 studies x 10 samples, labels constant within a sample,
a label signal in a low-rank subspace) are written with ``EmbeddingStore``; everything runs
through the public API (``scdm_eval.run_evaluation``, ``make_classifier``, ``load_splits``).

- peak: this machine's fp32 GEMM rate (torch, every core), at the MLP's shape (128 x 512 x 512)
  and at 2048^3, measured in this run; ``% peak`` below is against the larger of the two.
- (a) MLP grid with the scDrugMap schedule (d-512-512-2, 10 epochs, batch 128): its FLOPs
  (6 x weights per training cell per epoch + 2 x weights per test cell) over the grid's wall, and
  over the sum of its fits timed one by one (same folds, same settings, ``make_classifier``);
  ``grid/fits`` is the grid's overhead (target <= 1.3), ``% peak`` during fits (target >= 60%).
  The grid runs its MLP fits one per core at once (``concurrent_fits``); the same grid with each
  fit on every core, one at a time, runs next to it (``mlp.threads=<cores>``) for the ratio.
  A virtual machine's sustained GEMM rate drifts (here 100-165 GFLOP/s over 40 s), so each fit is
  also set against the 2048^3 rate measured right before and after it (median, min, max).
- (b) a plain per-fold scDrugMap-style torch loop (reload the matrix, DataLoader, same network,
  schedule, folds and thread count, one fit at a time) vs that grid, and vs the default grid.
- (c) XGBoost seconds per fit and AUROC: today's defaults vs the 0.2.0 settings (200 rounds,
  depth 6, 256 bins, no subsampling, no early stopping).
- (e) end to end: mlp + xgboost + logreg as one default grid vs the scDrugMap-style way of the
  same three (the loop of (b), XGBoost with the 0.2.0 settings of (c), logistic regression).
- (d) wall and peak RSS (sampled in-process, above the run's start) of pooled 10-fold and cross
  (leave-one-study-out) for each classifier alone, at 20k and 100k cells (500k with ``--full``).
  XGBoost fits stream their rows from the store; at the first size the pooled XGBoost grid also
  runs on the slice held in memory (``stream=False``), the way it ran before, for the ratio.
  The classifiers' libraries are imported and warmed by one tiny fit first, and the run's own
  code (store, cell tables, splits) by a tiny grid on a 400-cell store (a row of its own): code
  pages, module objects and thread pools are a fixed cost, not the grid's memory. With two sizes or more,
  a line through each scheme x classifier's peaks: ``fixed`` MB (work buffers whatever the
  cells) + ``slope`` x the slice (the part that grows with cells; <= 2 is the target at scale).

``GFLOP/cpu-s`` (FLOPs per CPU second of this process) is the steadier figure on a busy machine.
``--quick``: small sizes and 3 folds (under ~2 minutes). Benches never assert.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

DIM = 512
HIDDEN = (512, 512)
SCDRUGMAP_MLP = {"hidden": "512,512", "lr": 1e-4, "weight_decay": 0.01, "batch_size": 128, "max_epochs": 10,
                 "early_stopping": False, "keep": "last", "scale": False, "loss": "bce"}
XGB_020 = {"n_estimators": 200, "max_depth": 6, "max_bin": 256, "subsample": 1.0, "colsample_bytree": 1.0,
           "early_stopping": False, "sketch_rows": 0}
COLS = ("measure", "cells", "fits", "wall s", "fits s", "grid/fits", "GFLOP", "GFLOP/s", "% peak", "GFLOP/cpu-s",
        "AUROC", "peak RSS MB", "RSS/slice")
WIDTHS = (44, 7, 4, 7, 7, 9, 7, 7, 6, 11, 6, 11, 9)
PAGE = os.sysconf("SC_PAGE_SIZE")


def row(*vals: object) -> None:
    """Print one table row at once (partial tables survive an interrupted run)."""
    vals = vals + ("",) * (len(COLS) - len(vals))
    print("  ".join(str(v).ljust(w) for v, w in zip(vals, WIDTHS, strict=True)), flush=True)


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


@contextmanager
def measured() -> Iterator[dict[str, float]]:
    """Wall, CPU seconds and peak RSS above the start (a 5 ms sampling thread) of the block.

    The start is taken after a garbage collection and a trim of the C heap, so that what an
    earlier row left in the heap neither inflates nor hides this row's memory.
    """
    import gc

    from scdm_eval._classifiers import release_heap

    gc.collect()
    release_heap()
    out: dict[str, float] = {}
    start, peak, stop = _rss(), [_rss()], threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], _rss())

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t, c = time.perf_counter(), time.process_time()
    try:
        yield out
    finally:
        out["wall"], out["cpu"] = time.perf_counter() - t, time.process_time() - c
        stop.set()
        th.join()
        out["peak_mb"] = (max(peak[0], _rss()) - start) / 1e6


def gemm_rate(threads: int, shape: tuple[int, int, int] = (2048, 2048, 2048), reps: int = 1, tries: int = 3) -> float:
    """fp32 GEMM GFLOP/s of an ``m x k @ k x n`` product on ``threads`` torch threads: best of ``tries`` runs of ``reps``."""
    import torch

    torch.set_num_threads(threads)
    m, k, n = shape
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    best = float("inf")
    for _ in range(tries):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n * reps / best / 1e9


def gemm_peak(threads: int) -> dict[str, float]:
    """fp32 GEMM GFLOP/s with ``threads`` torch threads, best of 3, at the MLP's shape and at 2048^3."""
    return {"128x512x512": gemm_rate(threads, (128, 512, 512), reps=400),
            "2048^3": gemm_rate(threads, (2048, 2048, 2048), reps=4)}


def mlp_gflop(d: int, n_train: int, n_test: int, epochs: int) -> float:
    """Multiply-adds x 2 of a d-512-512-2 MLP: forward + backward (3x forward) per training cell per epoch, forward per test cell."""
    w = d * HIDDEN[0] + HIDDEN[0] * HIDDEN[1] + HIDDEN[1] * 2
    return (6 * w * n_train * epochs + 2 * w * n_test) / 1e9


def make_store(path: Path, n: int, seed: int = 0) -> None:
    """n cells x 512 in 2 studies x 10 samples; each sample one label; signal in a rank-16 subspace plus sample effects."""
    from scdm_embed.store import EmbeddingStore

    rng = np.random.default_rng(seed)
    st = EmbeddingStore(path, mode="a")
    basis = rng.standard_normal((16, DIM)).astype(np.float32) / 4
    direction = rng.standard_normal(DIM).astype(np.float32)
    direction /= np.linalg.norm(direction)
    for s in range(2):
        m = n // 2
        sample = np.repeat(np.arange(10), -(-m // 10))[:m]
        label = (sample % 2).astype(np.int8)
        cells = pd.DataFrame({"label": label, "response": np.where(label == 1, "sensitive", "resistant"),
                              "study": f"study{s}", "sample": [f"s{s}-{i}" for i in sample]},
                             index=pd.Index([f"c{i}" for i in range(m)], name="cell_id"))
        st.put_dataset(f"study{s}", cells, input_hash=f"h{s}-{n}")
        effect = rng.standard_normal((10, DIM)).astype(np.float32) * 0.3
        X = (rng.standard_normal((m, 16)).astype(np.float32) @ basis + effect[sample]
             + 0.8 * (label[:, None] - 0.5) * direction + 0.5 * rng.standard_normal((m, DIM)).astype(np.float32))
        st.put_embedding("synth", f"study{s}", X.astype(np.float32), chunk_rows=1024)


def scdrugmap_loop(npy: Path, y: np.ndarray, parts, threads: int) -> float:
    """scDrugMap-style: per fold reload the matrix, DataLoader, d-512-512-2, 10 epochs, batch 128, AdamW 1e-4, BCE."""
    import torch
    from sklearn.metrics import roc_auc_score
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(threads)
    aucs = []
    for part in parts:
        X = np.load(npy)  # each per-fold script run reloads the embeddings
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(X.shape[1], 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 2))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.01)
        yt = torch.tensor(y[part.train])
        dl = DataLoader(TensorDataset(torch.from_numpy(X[part.train]), yt), batch_size=128, shuffle=True)
        for _ in range(10):
            for xb, yb in dl:
                opt.zero_grad()
                nn.functional.binary_cross_entropy_with_logits(net(xb), nn.functional.one_hot(yb, 2).float()).backward()
                opt.step()
        with torch.no_grad():
            p = torch.sigmoid(net(torch.from_numpy(X[part.test]))[:, 1]).numpy()
        aucs.append(roc_auc_score(y[part.test], p) if len(np.unique(y[part.test])) == 2 else np.nan)
    return float(np.nanmean(aucs))


def main() -> None:  # noqa: C901 - one linear script
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, 3 folds (under ~2 minutes)")
    ap.add_argument("--full", action="store_true", help="add the 500k-cell stores (and the 500k MLP grid)")
    ap.add_argument("--parts", default="abced", help="which measures to run, e.g. 'a' or 'd' (default abced; a-c-e share a store, e needs b and c's runs)")
    ap.add_argument("--sizes", default=None, help="cells of the (d) stores, comma-separated (default 20000,100000)")
    ap.add_argument("--classifiers", default="mlp,xgboost,logreg", help="(d): these classifiers, comma-separated")
    ap.add_argument("--mlp-grid-sizes", default=None,
                    help="(d): sizes at which the pooled 10-fold scdrugmap-schedule MLP grid also runs (default: 500000)")
    args = ap.parse_args()
    import warnings

    import scdm_eval

    # (a)-(c) use cell-level folds on purpose (the paper's); the warning is the report's business
    warnings.simplefilter("ignore", scdm_eval.LeakageWarning)

    cores = os.cpu_count() or 1
    folds = 3 if args.quick else 10
    n_grid = 4_000 if args.quick else 20_000
    sizes = [10_000] if args.quick else [20_000, 100_000] + ([500_000] if args.full else [])
    if args.sizes:
        sizes = [int(v) for v in args.sizes.split(",") if v.strip()]
    big = {int(v) for v in (args.mlp_grid_sizes or "500000").split(",") if v.strip()}
    d_classifiers = [c.strip() for c in args.classifiers.split(",") if c.strip()]
    load = os.getloadavg()[0]
    print(f"\n## evaluation engine: {cores} cores (load average {load:.1f} at start), {folds} folds; "
          f"synthetic stores x {DIM}-d float32", flush=True)
    row(*COLS)
    row(*("-" * w for w in WIDTHS))
    with measured() as m:
        peak = gemm_peak(cores)
    # once per process, torch imports torch._dynamo when the first optimizer is made (~1.6 s here):
    # made now, so that neither the grid nor its fits timed one by one pay it
    import torch

    torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)
    top = max(peak.values())
    for name, g in peak.items():
        row(f"peak: fp32 GEMM {name}, {cores} threads", "", "", f"{m['wall']:.1f}", "", "", "", f"{g:.0f}")

    def pct(gflop: float, secs: float) -> str:
        return f"{100 * gflop / secs / top:.0f}%"

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if set(args.parts) & set("abce"):
            measure_grid(tmp, n_grid, folds, cores, top, pct, args.parts)
        if "d" in args.parts:
            measure_sizes(tmp, sizes, folds, top, pct, d_classifiers, big)
    print(f"(load average {os.getloadavg()[0]:.1f} at the end; RSS/slice = peak RSS above the run's start / the "
          "embedding slice it evaluates)", flush=True)


def measure_grid(tmp: Path, n_grid: int, folds: int, cores: int, top: float, pct, which: str = "abce") -> None:  # noqa: C901
    """(a), (b), (c), (e) on one n_grid-cell store ((a) always; (e) needs the loop of (b) and the 0.2.0 XGBoost of (c))."""
    import scdm_eval
    from scdm_embed.errors import ScdmError
    from scdm_embed.store import EmbeddingStore

    # -- (a) + (b): the MLP grid with the scDrugMap schedule, its fits one by one, the plain loop
    store = tmp / "grid.zarr"
    make_store(store, n_grid)
    with measured() as m:
        res = scdm_eval.run_evaluation(store, models=["synth"], classifiers=("mlp",), folds=folds, seed=0,
                                       protocol="scdrugmap")
    splits = scdm_eval.load_splits(store, res.attrs["split"])
    parts = list(splits)
    y = splits.table["label"].to_numpy().astype(np.int64)
    gflop = sum(mlp_gflop(DIM, len(p.train), len(p.test), 10) for p in parts)
    X, _ = EmbeddingStore(store).load("synth", cells=splits.table.index)
    slice_mb = X.nbytes / 1e6
    t_fits, c_fits, adjacent = 0.0, 0.0, []
    for p in parts:
        clf = scdm_eval.make_classifier("mlp", seed=0, **{**SCDRUGMAP_MLP, "threads": cores})
        before = gemm_rate(cores)
        t, c = time.perf_counter(), time.process_time()
        clf.fit(X, y[p.train], rows=p.train)
        clf.predict_proba(X[p.test])
        dt = time.perf_counter() - t
        t_fits, c_fits = t_fits + dt, c_fits + time.process_time() - c
        # this VM's sustained GEMM rate drifts (100-165 GFLOP/s over 40 s of 2048^3): each fit
        # is also set against the peak measured right before and after it
        g = mlp_gflop(DIM, len(p.train), len(p.test), 10)
        adjacent.append((g / dt / max(before, gemm_rate(cores)), before))
    t_grid = m["wall"]
    k = res.attrs["params"]["concurrent_fits"].get("mlp", 1)
    row(f"(a) MLP grid, scdrugmap schedule ({k} fit{'s' if k > 1 else ''} at once)", f"{n_grid:,}", len(res),
        f"{t_grid:.1f}", f"{t_fits:.1f}", f"{t_grid / t_fits:.2f}", f"{gflop:.0f}", f"{gflop / t_grid:.0f}",
        pct(gflop, t_grid), f"{gflop / m['cpu']:.0f}", f"{res['auroc'].mean():.3f}", f"{m['peak_mb']:.0f}",
        f"{m['peak_mb'] / slice_mb:.2f}")
    if k > 1:  # the same grid with each fit on every core, one at a time (what the grid did before)
        with measured() as m1:
            res1 = scdm_eval.run_evaluation(store, models=["synth"], classifiers=("mlp",), folds=folds, seed=0,
                                            protocol="scdrugmap", classifier_options={"mlp": {"threads": cores}})
        row(f"(a)   the same grid, one fit at a time x {cores} threads", f"{n_grid:,}", len(res1),
            f"{m1['wall']:.1f}", f"{t_fits:.1f}", f"{m1['wall'] / t_fits:.2f}", f"{gflop:.0f}",
            f"{gflop / m1['wall']:.0f}", pct(gflop, m1["wall"]), f"{gflop / m1['cpu']:.0f}",
            f"{res1['auroc'].mean():.3f}", f"{m1['peak_mb']:.0f}", f"{m1['peak_mb'] / slice_mb:.2f}")
        row(f"(a)   {k} fits at once vs one at a time", "", "", "", "", f"{m1['wall'] / t_grid:.2f}x faster")
    row(f"(a)   its fits one by one x {cores} threads (make_classifier)", f"{n_grid:,}", len(parts), f"{t_fits:.1f}", f"{t_fits:.1f}",
        "1.00", f"{gflop:.0f}", f"{gflop / t_fits:.0f}", pct(gflop, t_fits), f"{gflop / c_fits:.0f}")
    share = np.array([a for a, _ in adjacent])
    near = np.array([b for _, b in adjacent])
    row(f"(a)   each fit vs the 2048^3 peak next to it ({near.min():.0f}-{near.max():.0f})", f"{n_grid:,}", len(parts),
        "", "", "", "", "", f"{100 * np.median(share):.0f}%", f"min {100 * share.min():.0f}%, max {100 * share.max():.0f}%")
    if not set(which) & set("bce"):
        return
    np.save(tmp / "X.npy", X)
    with measured() as m:
        auc_loop = scdrugmap_loop(tmp / "X.npy", y, parts, cores)
    row("(b) scDrugMap-style torch loop, same folds", f"{n_grid:,}", len(parts), f"{m['wall']:.1f}", "",
        f"{m['wall'] / t_grid:.2f}x", f"{gflop:.0f}", f"{gflop / m['wall']:.0f}", pct(gflop, m["wall"]),
        f"{gflop / m['cpu']:.0f}", f"{auc_loop:.3f}", f"{m['peak_mb']:.0f}", f"{m['peak_mb'] / slice_mb:.2f}")
    t_loop = m["wall"]
    if "b" in which:
        with measured() as m:
            res = scdm_eval.run_evaluation(store, models=["synth"], classifiers=("mlp",), folds=folds, seed=0,
                                           group_key="none")
        row("(b) MLP grid, scdm defaults (early stopping)", f"{n_grid:,}", len(res), f"{m['wall']:.1f}", "",
            f"{t_loop / m['wall']:.2f}x faster", "", "", "", "", f"{res['auroc'].mean():.3f}", f"{m['peak_mb']:.0f}",
            f"{m['peak_mb'] / slice_mb:.2f}")
    # -- (c) XGBoost per fit, today's defaults vs the 0.2.0 settings
    xgb_wall: dict[str, float] = {}
    xgb_runs = ((("(c) XGBoost, defaults", {}),) if "c" in which else ()) + (
        (("(c) XGBoost, 0.2.0 settings", XGB_020),) if set(which) & set("ce") else ())
    for label, opts in xgb_runs:
        try:
            with measured() as m:
                res = scdm_eval.run_evaluation(store, models=["synth"], classifiers=("xgboost",), folds=folds,
                                               seed=0, group_key="none",
                                               classifier_options={"xgboost": opts} if opts else None)
        except ScdmError as e:  # settings this version does not know
            row(label, f"{n_grid:,}", "", f"n/a: {e.problem}")
            continue
        row(label, f"{n_grid:,}", len(res), f"{m['wall']:.1f}", f"{m['wall'] / len(res):.2f}/fit", "", "", "", "",
            "", f"{res['auroc'].mean():.3f}", f"{m['peak_mb']:.0f}", f"{m['peak_mb'] / slice_mb:.2f}")
        xgb_wall[label] = m["wall"]
    if "e" not in which:
        return
    # -- (e) end to end, the three classifiers: the default grid in one call vs the scDrugMap-style
    #    way (the per-fold torch loop of (b), XGBoost with the 0.2.0 settings of (c), then logreg)
    with measured() as m:
        res = scdm_eval.run_evaluation(store, models=["synth"], classifiers=("mlp", "xgboost", "logreg"),
                                       folds=folds, seed=0, group_key="none")
    t_all, peak_all = m["wall"], m["peak_mb"]
    with measured() as m:
        scdm_eval.run_evaluation(store, models=["synth"], classifiers=("logreg",), folds=folds, seed=0,
                                 group_key="none")
    t_old = t_loop + xgb_wall.get("(c) XGBoost, 0.2.0 settings", float("nan")) + m["wall"]
    row("(e) mlp+xgboost+logreg grid, scdm defaults", f"{n_grid:,}", len(res), f"{t_all:.1f}", "",
        f"{t_old / t_all:.2f}x faster", "", "", "", "", f"{res['auroc'].mean():.3f}", f"{peak_all:.0f}",
        f"{peak_all / slice_mb:.2f}")
    row("(e)   scDrugMap-style: (b) loop + (c) 0.2.0 XGBoost + logreg", f"{n_grid:,}", "", f"{t_old:.1f}")
    del X
    shutil.rmtree(store, ignore_errors=True)


def measure_sizes(tmp: Path, sizes: list[int], folds: int, top: float, pct, classifiers: list[str], big: set[int]) -> None:
    """(d): pooled and cross, each classifier alone, by size (and the scdrugmap MLP grid at the ``big`` sizes)."""
    import scdm_eval

    # library code is not the grid's memory: import and warm each classifier once (its thread
    # pools, allocator arenas) and the run's own path once (store and cell-table reads, splits:
    # a tiny grid on a store of its own) before the rows below, and print what that cost
    rng = np.random.default_rng(0)
    Xw = rng.standard_normal((512, DIM)).astype(np.float32)
    yw = np.arange(512) % 2
    with measured() as m:
        for clf in classifiers:
            c = scdm_eval.make_classifier(clf, seed=0, **({"max_epochs": 1} if clf == "mlp" else {}))
            c.fit(Xw, yw)
            c.predict_proba(Xw)
        make_store(tmp / "warm.zarr", 400, seed=2)
        scdm_eval.run_evaluation(tmp / "warm.zarr", models=["synth"], classifiers=("majority",), folds=2, seed=0,
                                 group_key="sample")
        shutil.rmtree(tmp / "warm.zarr", ignore_errors=True)
    row(f"(d) imports + one tiny fit of {'/'.join(classifiers)} + a tiny grid", "512", len(classifiers),
        f"{m['wall']:.1f}", "", "", "", "", "", "", "", f"{m['peak_mb']:.0f}", "(fixed)")
    seen: dict[tuple[str, str], list[tuple[float, float]]] = {}  # (scheme, classifier) -> (slice MB, peak MB)
    for n in sizes:
        store = tmp / f"s{n}.zarr"
        make_store(store, n, seed=1)
        slice_mb = n * DIM * 4 / 1e6
        for scheme in ("pooled", "cross"):
            for clf in classifiers:
                with measured() as m:
                    res = scdm_eval.run_evaluation(store, models=["synth"], scheme=scheme, classifiers=(clf,),
                                                   folds=folds, seed=0, group_key="sample")
                row(f"(d) {scheme} {folds if scheme == 'pooled' else 'LOSO'}, {clf}", f"{n:,}", len(res),
                    f"{m['wall']:.1f}", "", "", "", "", "", "", f"{res['auroc'].mean():.3f}", f"{m['peak_mb']:.0f}",
                    f"{m['peak_mb'] / slice_mb:.2f}")
                seen.setdefault((scheme, clf), []).append((slice_mb, m["peak_mb"]))
                if clf == "xgboost" and scheme == "pooled" and n == sizes[0]:  # the same grid on the slice in memory
                    wall = m["wall"]
                    with measured() as m:
                        held = scdm_eval.run_evaluation(store, models=["synth"], scheme=scheme, classifiers=(clf,),
                                                        folds=folds, seed=0, group_key="sample", stream=False)
                    same = "same" if held["auroc"].tolist() == res["auroc"].tolist() else "OTHER"
                    row(f"(d) {scheme} {folds}, {clf}, slice in memory (--no-stream; streamed wall "
                        f"{wall / m['wall']:.2f}x, {same} AUROC)", f"{n:,}", len(held), f"{m['wall']:.1f}", "", "", "",
                        "", "", "", f"{held['auroc'].mean():.3f}", f"{m['peak_mb']:.0f}", f"{m['peak_mb'] / slice_mb:.2f}")
        if n in big:
            with measured() as m:
                res = scdm_eval.run_evaluation(store, models=["synth"], classifiers=("mlp",), folds=10, seed=0,
                                               protocol="scdrugmap")
            g = sum(mlp_gflop(DIM, int(r.n_train), int(r.n_test), 10) for r in res.itertuples())
            row("(d) pooled 10, MLP scdrugmap schedule", f"{n:,}", len(res), f"{m['wall']:.1f}", "",
                f"{m['wall'] / (g / top):.2f}x FLOP time", f"{g:.0f}", f"{g / m['wall']:.0f}", pct(g, m["wall"]),
                f"{g / m['cpu']:.0f}", f"{res['auroc'].mean():.3f}", f"{m['peak_mb']:.0f}", f"{m['peak_mb'] / slice_mb:.2f}")
        shutil.rmtree(store, ignore_errors=True)
    # a line through the sizes: what a grid holds whatever the cells (work buffers, the library's
    # own) and what it holds per MB of slice; "linear in cells" and the <= 2x target at scale
    for (scheme, clf), pts in seen.items():
        if len(pts) > 1:
            slope, fixed = np.polyfit(*np.array(pts).T, 1)
            row(f"(d) {scheme}, {clf}: peak RSS ~ fixed + slope x slice", "", "", "", "", "", "", "", "", "", "",
                f"{fixed:.0f} fixed", f"{slope:.2f} slope")


if __name__ == "__main__":
    main()
