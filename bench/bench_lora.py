"""LoRA training speed per model: training cells/s of `scdm-eval lora` at fixture size.

Per model of the reference fixtures (random weights, official layouts), on real PC9 cells
(64 by default, half sensitive): the cells are extracted into a temporary store, then
:func:`scdm_eval.run_lora` (the command's Python API, its defaults: r 8, the paper's MLP head,
batch 16) trains one partition of a 2-fold split for ``--epochs`` epochs. Columns come from the
telemetry of the results rows:

- ``train cells/s`` training cells x epochs / training seconds (forward + backward + step);
- ``fit s``         the whole fit (LoRA copy, training, scoring the test cells);
- ``peak RSS MB``   the process's peak resident memory so far;
- ``bf16``          whether the forward ran under bf16 autocast (``--bf16``; default: on CUDA only).

``--quick``: tGPT only, 32 cells, a smoke run. Rows are printed as each model finishes.
Benches print numbers; they never assert.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PC9, table  # noqa: E402

import scdm_embed as se  # noqa: E402
from scdm_embed.testing import FIXTURE_MODELS, fixture_models  # noqa: E402
from scdm_eval import run_lora  # noqa: E402

HEADER = ("model", "cells", "dim", "train cells/s", "fit s", "peak RSS MB", "device", "bf16", "targets")


def _cells(path: Path, n: int) -> Path:
    a = ad.read_h5ad(PC9)
    r = a.obs["response"].to_numpy()
    idx = np.concatenate([np.flatnonzero(r == "sensitive")[: n // 2], np.flatnonzero(r == "resistant")[: n - n // 2]])
    a[idx].copy().write_h5ad(path)
    return path


def bench_model(model: str, cells: Path, tmp: Path, *, epochs: int, device: str, bf16: bool | None) -> tuple:
    ckpt, opts = fixture_models()[model]
    store = tmp / f"{model}.zarr"
    se.extract(cells, model=model, checkpoint=ckpt, store=store, device=device, model_options=opts, progress=False)
    res = run_lora(store, model=model, folds=2, epochs=epochs, max_partitions=1, device=device, bf16=bf16)
    row, info = res.iloc[0], res.attrs["lora"]
    return (model, int(row["n_train"]), info["head_layers"][0], f"{row['cells_per_s']:,.1f}", f"{row['wall_s']:.2f}",
            f"{row['peak_rss_mb']:,.0f}", row["device"], info["bf16"], " ".join(info["targets"]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tGPT only, 32 cells")
    ap.add_argument("--models", nargs="*", default=None, help=f"default: {' '.join(FIXTURE_MODELS)}")
    ap.add_argument("--cells", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    args = ap.parse_args(argv)
    models = ["tgpt"] if args.quick else (args.models or list(FIXTURE_MODELS))
    n = 32 if args.quick else args.cells
    warnings.simplefilter("ignore")
    rows: list[tuple] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as d:
        tmp = Path(d)
        cells = _cells(tmp / "cells.h5ad", n)
        for m in models:
            rows.append(bench_model(m, cells, tmp, epochs=args.epochs, device=args.device, bf16=args.bf16))
            print(f"{m}: {rows[-1][3]} training cells/s", flush=True)
    table(f"LoRA training at fixture size ({n} PC9 cells, 2-fold, 1 partition, {args.epochs} epochs, "
          f"{time.perf_counter() - t0:.0f} s)", rows, HEADER)


if __name__ == "__main__":
    main()
