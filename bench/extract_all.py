"""Every model on the real PC9 cells, into one store, scored in one table (`make demo-all`).

Checkpoints: the reference fixtures (random weights in each model's official layout, verified
against the original code), real all-MiniLM-L6-v2 weights for ``lm``, and small official-layout
scBERT / CellLM checkpoints written here (their gene lists are not public: a stand-in axis from
the scGPT vocabulary). The numbers therefore test the pipeline, not the pretrained models.
Prints per-model extraction speed and gene overlap, then the pooled 5-fold results.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PC9, SHARED, table  # noqa: E402

from scdm_embed.testing import (  # noqa: E402
    fixture_models,
    scgpt_symbols,
    write_celllm_checkpoint,
    write_scbert_checkpoint,
)

STORE = Path(os.environ.get("STORE", "store/all.zarr"))
OUT = Path(os.environ.get("OUT", "results/all"))


def main() -> None:
    import scdm_eval
    from scdm_embed import extract

    ckdir = STORE.parent / "_checkpoints"
    plan: dict[str, tuple[Path | str | None, dict]] = {"pca": (None, {}), "hvg": (None, {}),
                                                       "lm": ("minilm", {"n_genes": 48})}
    plan |= fixture_models(SHARED)
    plan["scbert"] = (write_scbert_checkpoint(ckdir / "scbert", scgpt_symbols(SHARED / "vocab", 16906)), {})
    plan["celllm"] = (write_celllm_checkpoint(ckdir / "celllm", scgpt_symbols(SHARED / "vocab", 19379, skip=500)), {})
    rows = []
    for model, (ckpt, opts) in plan.items():
        t = time.perf_counter()
        r = extract(PC9, model=model, store=STORE, dataset="pc9", checkpoint=ckpt, model_options=opts, progress=False)
        ov = r.overlap
        rows.append((model, r.status, r.dim, f"{r.cells_per_s:.1f}" if r.chunks_computed else "-",
                     f"{ov['n_data_used']}/{ov['n_data']}", f"{ov['n_vocab_in_data']}/{ov['n_vocab']}",
                     f"{time.perf_counter() - t:.0f}"))
        print(*rows[-1], flush=True)
    table(f"extraction of {r.n_cells} real PC9 cells (CPU)", rows,
          ("model", "status", "dim", "cells/s", "dataset genes used", "vocabulary genes present", "seconds"))
    res = scdm_eval.run_evaluation(STORE, scheme="pooled", by="all", folds=5, seed=0,
                                   classifiers=("logreg", "xgboost", "mlp"), out=OUT)
    print(scdm_eval.to_markdown(res))


if __name__ == "__main__":
    main()
