"""Peak memory while extracting 2,000 vs 20,000 cells (tiled from the real PC9 set).

Each run is a fresh process (peak RSS is per process). The engine streams row chunks from a
backed AnnData and writes each chunk to the store, so memory should stay flat as the input
grows tenfold. Geneformer runs with max_length=256 to keep the bench short.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PC9, table  # noqa: E402

CHILD = r"""
import json, sys
from scdm_embed import extract
from scdm_embed.testing import fixture_models
name = sys.argv[3]
ckpt, opts = fixture_models().get(name, (None, {}))
if name == "geneformer":
    opts = {**opts, "max_length": 256}
r = extract(sys.argv[1], model=name, store=sys.argv[2], checkpoint=ckpt, model_options=opts, progress=False)
# VmHWM is this address space's peak; ru_maxrss would carry the parent's peak across exec
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"peak_rss_mb": hwm / 1024, "cells_per_s": r.cells_per_s}))
"""


def _tile(n: int, out: Path) -> Path:
    a = ad.read_h5ad(PC9)
    reps = -(-n // a.n_obs)
    X = sp.vstack([a.X] * reps).tocsr()[:n]
    obs = a.obs.iloc[np.arange(n) % a.n_obs].copy()
    obs.index = [f"{c}-{i // a.n_obs}" for i, c in enumerate(obs.index)]
    ad.AnnData(X=X, obs=obs, var=a.var).write_h5ad(out)
    return out


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {n: _tile(n, tmp / f"tiled_{n}.h5ad") for n in (2_000, 20_000)}
        for model in ("pca", "tgpt", "geneformer"):
            peaks = {}
            for n, f in files.items():
                out = subprocess.run([sys.executable, "-c", CHILD, str(f), str(tmp / f"{model}_{n}.zarr"), model],
                                     capture_output=True, text=True, check=True)
                peaks[n] = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((model, f"{peaks[2_000]['peak_rss_mb']:.0f}", f"{peaks[20_000]['peak_rss_mb']:.0f}",
                         f"{peaks[20_000]['peak_rss_mb'] / peaks[2_000]['peak_rss_mb']:.2f}x",
                         f"{peaks[20_000]['cells_per_s']:.0f}"))
    table("peak RSS (MB) of one extraction process, 2,000 vs 20,000 cells (10x the input)", rows,
          ("model", "2,000 cells", "20,000 cells", "ratio (flat = 1.0)", "cells/s at 20k"))


if __name__ == "__main__":
    main()
