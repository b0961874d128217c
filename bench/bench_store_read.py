"""Store read throughput for a model x category slice vs the same bytes from a plain .npy.

A synthetic 8-study cohort of embeddings (n x 512 float32) is written to an scdm store (one
array per study) and to .npy files. The slice is "tissue = lung": 3 of the 8 studies, plus
every other cell of a 4th. Reported: GB/s of useful bytes for the store (only the chunks
holding the slice are read), for a .npy holding exactly the slice, and for the scDrugMap-style
path (load every study's whole matrix, then select).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import best_of, table  # noqa: E402

from scdm_embed import EmbeddingStore  # noqa: E402

N_STUDY, CELLS, DIM = 8, 12_000, 512


def main() -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        st = EmbeddingStore(tmp / "s.zarr", mode="a")
        mats = {}
        for s in range(N_STUDY):
            name = f"study{s}"
            cells = pd.DataFrame({"label": rng.integers(0, 2, CELLS).astype("int8"),
                                  "tissue": "lung" if s < 3 else "breast"},
                                 index=pd.Index([f"c{i}" for i in range(CELLS)], name="cell_id"))
            st.put_dataset(name, cells, input_hash=f"h{s}")
            X = rng.standard_normal((CELLS, DIM), dtype=np.float32)
            st.put_embedding("model", name, X, chunk_rows=1024)
            np.save(tmp / f"{name}.npy", X)
            mats[name] = X
        st = EmbeddingStore(tmp / "s.zarr")
        all_cells = st.cells()
        sel = all_cells[(all_cells["tissue"] == "lung") | ((all_cells["dataset"] == "study3") & (all_cells["row"] % 2 == 0))]
        want = sel.index
        datasets = sorted(sel["dataset"].unique())
        expected = np.concatenate([mats[d][sel.loc[sel["dataset"] == d, "row"].to_numpy()] for d in datasets])
        np.save(tmp / "slice.npy", expected)
        nbytes = expected.nbytes

        def from_store():
            X, _ = st.load("model", datasets=datasets, cells=want)
            assert X.shape == expected.shape
            return X

        def from_npy_slice():
            return np.load(tmp / "slice.npy")

        def scdrugmap_style():
            # reload every study's whole matrix, then select the category's rows
            whole = {d: np.load(tmp / f"{d}.npy") for d in sorted(all_cells["dataset"].unique())}
            return np.concatenate([whole[d][sel.loc[sel["dataset"] == d, "row"].to_numpy()] for d in datasets])

        np.testing.assert_array_equal(from_store(), expected)
        t_store, t_npy, t_naive = best_of(from_store), best_of(from_npy_slice), best_of(scdrugmap_style)
        gb = nbytes / 1e9
        on_disk = sum(p.stat().st_size for p in (tmp / "s.zarr").rglob("*") if p.is_file()) / 1e9
        table(f"store read: {len(sel):,} of {len(all_cells):,} cells x {DIM} ({gb:.2f} GB useful; store on disk {on_disk:.2f} GB)",
              [("scdm store (chunks of the slice only)", f"{t_store*1e3:.0f}", f"{gb/t_store:.2f}", "1.00"),
               (".npy holding exactly the slice", f"{t_npy*1e3:.0f}", f"{gb/t_npy:.2f}", f"{t_store/t_npy:.2f}"),
               ("whole per-study .npy, then select", f"{t_naive*1e3:.0f}", f"{gb/t_naive:.2f}", f"{t_store/t_naive:.2f}")],
              ("path", "ms", "GB/s", "store time / path time"))


if __name__ == "__main__":
    main()
