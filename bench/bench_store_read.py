"""Store read throughput by codec x chunk rows, against the same bytes from plain .npy files.

A synthetic cohort of 8 studies (200,000 x 512 float32 in all; ``--quick``: 48,000) with realistic
values (rank-32 signal + noise, which compresses about as much as real embeddings: barely) is
written once per codec x chunk-rows variant into an scdm store (one array per study), and once
as per-study .npy files. Read paths, all through the public ``EmbeddingStore.load``:

- whole: every cell of the model (``load(model)``);
- contiguous: one category made of whole studies (3 of 8; ``load(model, datasets=...)``);
- category: 3 studies plus every other cell of a 4th (``load(model, cells=...)``: scattered rows).

Baselines: ``.npy`` holding exactly the selection, and the scDrugMap-style path (load each study's
whole ``.npy`` that holds selected cells, then select). ``0.2.0 read`` re-times the category path
with the read code of scdm 0.2.0 (span slice + gather + copy) on the 0.2.0 default layout.
GB/s counts the useful bytes (the selection) per wall second; GB/cpu-s per CPU second of this
process (steadier on a busy machine). One process; rows print as they finish. Benches never assert:
a wrong result prints ``MISMATCH`` in the ``exact`` column.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scdm_embed.store import EmbeddingStore  # noqa: E402

N_STUDY, DIM, RANK = 8, 512, 32
CODECS: dict[str, tuple] = {
    "lz4+shuffle": (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()),  # 0.2.0 default
    "none": (Crc32cCodec(),),  # the default now (EMBEDDING_CODECS)
    "zstd-3": (ZstdCodec(level=3), Crc32cCodec()),
}
CHUNKS = (1024, 4096, 16384)
HEADER = ("codec", "chunk", "path", "ms", "GB/s", "GB/cpu-s", "vs npy whole+select", "vs npy slice", "disk/raw", "exact")


def timed(fn: Callable[[], np.ndarray], repeat: int) -> tuple[float, float, np.ndarray]:
    """Best wall and CPU seconds of ``repeat`` calls, and the last result."""
    wall = cpu = float("inf")
    out = None
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return wall, cpu, out


class Printer:
    """A fixed-width table printed row by row (widths from the header and a guess)."""

    def __init__(self, title: str) -> None:
        self.w = [max(len(h), n) for h, n in zip(HEADER, (12, 5, 22, 6, 5, 8, 19, 12, 8, 8), strict=True)]
        print(f"\n## {title}", flush=True)
        self.row(HEADER)
        self.row(tuple("-" * w for w in self.w))

    def row(self, r: tuple) -> None:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, self.w, strict=True)), flush=True)


def synthetic(n: int, seed: int = 0) -> np.ndarray:
    """Rank-32 signal plus noise, float32, scaled like foundation-model embeddings."""
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((n, RANK), dtype=np.float32)
    V = rng.standard_normal((RANK, DIM), dtype=np.float32) / np.sqrt(RANK)
    return (U @ V + 0.3 * rng.standard_normal((n, DIM), dtype=np.float32)).astype(np.float32)


def legacy_category_load(st: EmbeddingStore, model: str, datasets: list[str], cells: pd.Index) -> np.ndarray:
    """The 0.2.0 read of ``load(model, datasets, cells=...)``: slice the span, gather, copy into the output."""
    table = st.cells(datasets).loc[cells]
    ds_col, row_col = table["dataset"].to_numpy(), table["row"].to_numpy()
    X = np.empty((len(table), DIM), np.float32)
    for ds in datasets:
        x = st.embedding_group(model, ds)["X"]
        where = np.flatnonzero(ds_col == ds)
        rows = row_col[where]
        lo, hi = int(rows.min()), int(rows.max()) + 1
        block = x[lo:hi]
        got = block if hi - lo == len(rows) and np.all(np.diff(rows) == 1) else block[rows - lo]
        if where[-1] - where[0] + 1 == len(where):
            X[where[0]:where[-1] + 1] = got
        else:
            X[where] = got
    return X


def zarr_pipeline_load(root: Path, rows: dict[str, np.ndarray]) -> np.ndarray:
    """The same category read through Zarr's generic decode pipeline (no direct chunk reader)."""
    parts = [zarr.open_array(root / "embeddings" / "m" / s / "X", mode="r").get_orthogonal_selection((r, slice(None)))
             for s, r in rows.items()]
    return np.concatenate(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="48,000 cells, best of 2 (under a minute)")
    ap.add_argument("--cells", type=int, default=None, help="total cells (default 200,000; --quick 48,000)")
    ap.add_argument("--codec", action="append", choices=list(CODECS), default=None,
                    help="only these codecs (repeatable; default all); 'none' (the default layout) is always kept")
    ap.add_argument("--chunk", action="append", type=int, default=None, help="only these chunk rows (repeatable)")
    args = ap.parse_args()
    n = args.cells or (48_000 if args.quick else 200_000)
    repeat = 2 if args.quick else 3
    per = n // N_STUDY
    studies = [f"study{s}" for s in range(N_STUDY)]
    mats = {s: synthetic(per, seed=i) for i, s in enumerate(studies)}
    raw_gb = N_STUDY * per * DIM * 4 / 1e9
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for s in studies:
            np.save(tmp / f"{s}.npy", mats[s])
        cell_tables = {s: pd.DataFrame({"label": np.random.default_rng(i).integers(0, 2, per).astype("int8"),
                                        "tissue": "lung" if i < 3 else "breast"},
                                       index=pd.Index([f"c{j}" for j in range(per)], name="cell_id"))
                       for i, s in enumerate(studies)}
        # the selections, as global cell keys, and their expected matrices
        contiguous_ds = studies[:3]
        cat_rows = {**{s: np.arange(per) for s in studies[:3]}, studies[3]: np.arange(0, per, 2)}
        cat_keys = pd.Index([f"{s}/c{r}" for s, rows in cat_rows.items() for r in rows])
        expect = {"whole": np.concatenate([mats[s] for s in studies]),
                  "contiguous": np.concatenate([mats[s] for s in contiguous_ds]),
                  "category": np.concatenate([mats[s][r] for s, r in cat_rows.items()])}
        for name, X in expect.items():
            np.save(tmp / f"slice-{name}.npy", X)
        holding = {"whole": studies, "contiguous": contiguous_ds, "category": list(cat_rows)}
        picks = {"whole": {s: slice(None) for s in studies}, "contiguous": {s: slice(None) for s in contiguous_ds},
                 "category": cat_rows}

        def npy_whole_select(path: str) -> np.ndarray:
            whole = {s: np.load(tmp / f"{s}.npy") for s in holding[path]}
            return np.concatenate([whole[s][picks[path][s]] for s in holding[path]])

        pr = Printer(f"store read: {n:,} cells x {DIM} float32 ({raw_gb:.2f} GB) in {N_STUDY} studies; "
                     f"category = {len(cat_keys):,} cells; {os.cpu_count()} cores, zarr {zarr.__version__}, "
                     f"async.concurrency {zarr.config.get('async.concurrency')}")
        base: dict[str, tuple[float, float]] = {}
        for path, X in expect.items():
            gb = X.nbytes / 1e9
            w_sel, c_sel, got = timed(lambda p=path: npy_whole_select(p), repeat)
            w_npy, c_npy, got2 = timed(lambda p=path: np.load(tmp / f"slice-{p}.npy"), repeat)
            base[path] = (w_sel, w_npy)
            for label, w, c, g in (("npy whole+select", w_sel, c_sel, got), ("npy of the slice", w_npy, c_npy, got2)):
                pr.row(("-", "-", f"{path}: {label}", f"{w * 1e3:.0f}", f"{gb / w:.2f}", f"{gb / c:.2f}",
                        f"{w_sel / w:.2f}x", f"{w_npy / w:.2f}x", "1.000", "ok" if np.array_equal(g, X) else "MISMATCH"))

        results: dict[tuple[str, int, str], float] = {}
        codecs = {c: v for c, v in CODECS.items() if args.codec is None or c in args.codec or c == "none"}
        chunks = tuple(args.chunk) if args.chunk else CHUNKS
        for codec, compressors in codecs.items():
            for chunk in sorted(set(chunks) | ({1024} if codec == "none" else set())):
                root = tmp / f"{codec}-{chunk}.zarr"
                st = EmbeddingStore(root, mode="a")
                for s in studies:
                    st.put_dataset(s, cell_tables[s], input_hash=f"h-{s}")
                    st.put_embedding("m", s, mats[s], chunk_rows=chunk, compressors=compressors)
                disk = sum(p.stat().st_size for p in (root / "embeddings").rglob("c/*/*") if p.is_file()) / 1e9
                st = EmbeddingStore(root)
                loads = {"whole": lambda st=st: st.load("m")[0],
                         "contiguous": lambda st=st: st.load("m", datasets=contiguous_ds)[0],
                         "category": lambda st=st: st.load("m", datasets=list(cat_rows), cells=cat_keys)[0]}
                if codec == "lz4+shuffle" and chunk == 1024:
                    loads["category (0.2.0 read)"] = lambda st=st: legacy_category_load(st, "m", list(cat_rows), cat_keys)
                for path, fn in loads.items():
                    X = expect[path.split(" ")[0]]
                    gb = X.nbytes / 1e9
                    w, c, got = timed(fn, repeat)
                    results[(codec, chunk, path)] = gb / w
                    w_sel, w_npy = base[path.split(" ")[0]]
                    pr.row((codec, chunk, path, f"{w * 1e3:.0f}", f"{gb / w:.2f}", f"{gb / c:.2f}", f"{w_sel / w:.2f}x",
                            f"{w_npy / w:.2f}x", f"{disk / raw_gb:.3f}", "ok" if np.array_equal(got, X) else "MISMATCH"))
                if (codec, chunk) != ("none", 1024):
                    shutil.rmtree(root)  # keep the page cache for the next variant

        # the direct chunk reader against Zarr's own pipeline on the same default-layout arrays
        st = EmbeddingStore(tmp / "none-1024.zarr")
        gb = expect["category"].nbytes / 1e9
        w_fast, c_fast, got_fast = timed(lambda: st.load("m", datasets=list(cat_rows), cells=cat_keys)[0], repeat)
        w_zarr, c_zarr, got_zarr = timed(lambda: zarr_pipeline_load(tmp / "none-1024.zarr", cat_rows), repeat)
        print("\n## category path on the default layout: direct chunk reader vs Zarr's pipeline", flush=True)
        print(f"direct reader {gb / w_fast:5.2f} GB/s {gb / c_fast:5.2f} GB/cpu-s | zarr pipeline {gb / w_zarr:5.2f} GB/s "
              f"{gb / c_zarr:5.2f} GB/cpu-s | {w_zarr / w_fast:.2f}x "
              f"{'ok' if np.array_equal(got_fast, got_zarr) else 'MISMATCH'}", flush=True)

    old = results.get(("lz4+shuffle", 1024, "category (0.2.0 read)"), float("nan"))
    new = results[("none", 1024, "category")]
    print(f"\ncategory slice: {old:.2f} GB/s (0.2.0: lz4+shuffle, 1024 rows, old read) -> {new:.2f} GB/s "
          f"(now: no compressor + crc32c, 1024 rows, decoded into the output) = {new / old:.2f}x; "
          f"npy whole+select {expect['category'].nbytes / 1e9 / base['category'][0]:.2f} GB/s", flush=True)


if __name__ == "__main__":
    main()
