"""Scale-out bench: peak memory of `extract` flat in the number of cells, and the evaluation grid on
2 local Dask workers vs in-process.

1. Synthetic sparse counts (20,000 real gene symbols, ~300 non-zeros per cell), written to .h5ad
   chunk by chunk (never whole in memory), at a small and a 10x larger size. Each
   ``scdm-embed extract`` (pca, and the tGPT transformer fixture) runs in a fresh process; its
   peak RSS comes from ``os.wait4`` (that child only). The engine reads the backed .h5ad in row
   chunks, so the large/small ratio should stay <= 1.3.
2. One model's pooled + cross grid on synthetic 512-d embeddings: in-process (all cores, one fit at
   a time) vs ``dask_workers=2``; prints both, the per-task cost and the projected time on a
   10-node cluster (2 workers per node) from that measured cost.

    python bench/bench_scale.py            # 50k / 500k cells (pca), 5k / 50k (tgpt); grid at 20k cells
    python bench/bench_scale.py --quick    # 10k / 100k (pca; the pca fit uses at most 10k cells), 2k / 20k (tgpt); grid at 5k cells
    python bench/bench_scale.py --full     # grid at 500k cells x 512-d too
    python bench/bench_scale.py --sizes tgpt=50000,500000 --skip-grid   # the transformer at 50k / 500k
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PC9, table  # noqa: E402

N_GENES = 20_000
NNZ_PER_CELL = 300
WRITE_CHUNK = 10_000
CLI = str(Path(sys.executable).with_name("scdm-embed"))


def write_synthetic_h5ad(path: Path, n_cells: int, *, seed: int = 0) -> Path:
    """``n_cells`` x 20k sparse counts with labels and 4 studies, written chunk by chunk."""
    with h5py.File(PC9, "r") as f:
        genes = ad.io.read_elem(f["var"]).index[:N_GENES]
    var = pd.DataFrame(index=pd.Index(genes.astype(str), name="gene"))
    ids = pd.Index([f"c{i}" for i in range(n_cells)], name="cell")
    obs = pd.DataFrame({"response": np.where(np.arange(n_cells) % 2 == 0, "sensitive", "resistant"),
                        "study": [f"s{i % 4}" for i in range(n_cells)]}, index=ids)
    rng = np.random.default_rng(seed)
    gene_p = rng.dirichlet(np.full(N_GENES, 0.3))  # a skewed, realistic-looking gene frequency
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        ad.io.write_elem(f, "obs", obs)
        ad.io.write_elem(f, "var", var)
        X = None
        for s in range(0, n_cells, WRITE_CHUNK):
            n = min(WRITE_CHUNK, n_cells - s)
            cols = rng.choice(N_GENES, size=(n, NNZ_PER_CELL), p=gene_p)
            block = sp.csr_matrix((rng.integers(1, 6, size=n * NNZ_PER_CELL).astype(np.float32),
                                   cols.ravel(), np.arange(0, n * NNZ_PER_CELL + 1, NNZ_PER_CELL)),
                                  shape=(n, N_GENES))
            block.sum_duplicates()
            if X is None:
                ad.io.write_elem(f, "X", block)
                X = ad.io.sparse_dataset(f["X"])
            else:
                X.append(block)
    return path


def peak_rss_of(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of one child process (``os.wait4``: that child's own rusage)."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    _, status, usage = os.wait4(p.pid, 0)
    err = p.stderr.read().decode() if p.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t


def bench_memory(tmp: Path, sizes: dict[str, tuple[int, int]]) -> list[tuple]:
    from scdm_embed.testing import fixture_models

    rows = []
    files: dict[int, Path] = {}
    for model, (small, large) in sizes.items():
        extra: list[str] = []
        if model != "pca":
            ckpt, opts = fixture_models()[model]
            extra = ["--checkpoint", str(ckpt), *sum((["--option", f"{k}={v}"] for k, v in opts.items()), [])]
        peaks = {}
        for n in (small, large):
            if n not in files:
                t = time.perf_counter()
                files[n] = write_synthetic_h5ad(tmp / f"synthetic_{n}.h5ad", n)
                print(f"wrote {n:,} cells x {N_GENES:,} genes ({files[n].stat().st_size / 2**20:.0f} MB) in "
                      f"{time.perf_counter() - t:.0f}s", flush=True)
            store = tmp / f"{model}_{n}.zarr"
            peaks[n] = peak_rss_of([CLI, "extract", str(files[n]), "--model", model, "--store", str(store), "-q",
                                    "--device", "cpu", *extra])
            print(f"{model} {n:,} cells: peak {peaks[n][0]:.0f} MB, {peaks[n][1]:.0f}s", flush=True)
        rows.append((model, f"{small:,}", f"{peaks[small][0]:.0f}", f"{large:,}", f"{peaks[large][0]:.0f}",
                     f"{peaks[large][0] / peaks[small][0]:.2f}x", f"{peaks[large][1]:.0f}"))
    return rows


def synthetic_embedding_store(path: Path, n_cells: int, dim: int = 512, *, seed: int = 0) -> Path:
    """A store with one model of ``n_cells`` x ``dim`` embeddings: 2 datasets x 2 studies x 10 samples."""
    from scdm_embed.store import EmbeddingStore

    rng = np.random.default_rng(seed)
    st = EmbeddingStore(path, mode="a")
    half = n_cells // 2
    for d, n in enumerate((half, n_cells - half)):
        label = (np.arange(n) % 2).astype(np.int8)
        cells = pd.DataFrame({"label": label, "response": np.where(label == 1, "sensitive", "resistant"),
                              "study": [f"study{2 * d + (i % 2)}" for i in range(n)],
                              "sample": [f"d{d}-p{(i // 2) % 10}" for i in range(n)]},
                             index=pd.Index([f"c{i}" for i in range(n)], name="cell_id"))
        st.put_dataset(f"ds{d}", cells, input_hash=f"synthetic-{d}-{n}")
        X = rng.standard_normal((n, dim), dtype=np.float32)
        X[:, :8] += 0.5 * label[:, None]  # a weak signal
        st.put_embedding("emb", f"ds{d}", X)
    return path


def bench_grid(tmp: Path, n_cells: int, classifiers: tuple[str, ...]) -> list[tuple]:
    """In-process vs a running 2-worker LocalCluster (its start-up, timed once, is printed apart)."""
    import logging

    from distributed import LocalCluster

    from scdm_eval import run_evaluation

    store = synthetic_embedding_store(tmp / f"grid_{n_cells}.zarr", n_cells)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    t = time.perf_counter()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster:
        print(f"2-worker LocalCluster started in {time.perf_counter() - t:.1f}s", flush=True)
        rows = []
        for scheme in ("pooled", "cross"):
            times = {}
            n_tasks = 0
            for how, kw in (("in-process", {}), ("dask", {"scheduler": cluster.scheduler_address})):
                t = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = run_evaluation(store, models=["emb"], scheme=scheme, classifiers=classifiers, folds=5,
                                         group_key="sample" if scheme == "pooled" else None, **kw)
                times[how] = time.perf_counter() - t
                n_tasks = len(res)
            per_task = times["in-process"] / max(n_tasks, 1)
            # 10 nodes x 2 workers: the tasks in waves of 20, each at the measured in-process cost
            rows.append((scheme, f"{n_cells:,}", str(n_tasks), f"{times['in-process']:.1f}", f"{times['dask']:.1f}",
                         f"{per_task:.2f}", f"{np.ceil(n_tasks / 20) * per_task:.2f}"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (minutes on a laptop)")
    ap.add_argument("--full", action="store_true", help="also the grid at 500k cells")
    ap.add_argument("--classifiers", default="logreg", help="comma-separated grid classifiers [logreg]")
    ap.add_argument("--grid-cells", type=int, default=None, help="cells of the grid bench (overrides the size)")
    ap.add_argument("--sizes", action="append", default=None, metavar="MODEL=SMALL,LARGE",
                    help="memory bench sizes of one model (repeatable; e.g. tgpt=50000,500000); only these run")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-grid", action="store_true")
    args = ap.parse_args()
    sizes = {"pca": (10_000, 100_000), "tgpt": (2_000, 20_000)} if args.quick else \
        {"pca": (50_000, 500_000), "tgpt": (5_000, 50_000)}
    if args.sizes:
        sizes = {m: tuple(int(v) for v in spec.split(",")) for m, _, spec in (a.partition("=") for a in args.sizes)}
    grid_cells = args.grid_cells or (500_000 if args.full else 5_000 if args.quick else 20_000)
    with tempfile.TemporaryDirectory(prefix="scdm-bench-scale-") as tmp:
        tmp = Path(tmp)
        if not args.skip_memory:
            table("peak RSS of `scdm-embed extract` (fresh process each; target ratio <= 1.3)",
                  bench_memory(tmp, sizes), ("model", "cells", "peak MB", "cells", "peak MB", "ratio", "large s"))
        if not args.skip_grid:
            table("one model's grid: in-process vs 2 local Dask workers (seconds); projection: 10 nodes x 2 workers",
                  bench_grid(tmp, grid_cells, tuple(args.classifiers.split(","))),
                  ("scheme", "cells", "tasks", "in-process s", "dask-2 s", "s/task", "10x2 projected s"))


if __name__ == "__main__":
    main()
