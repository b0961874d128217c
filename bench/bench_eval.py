"""The evaluation grid from the store vs a scDrugMap-style loop, same embeddings, same splits.

Real PC9 cells embedded with ``pca`` and ``hvg``; pooled 10-fold splits made once in the store.
- scdm: ``run_evaluation`` (embeddings read once per model from the store, tasks in parallel
  over the cores, one thread each), MLP with the scDrugMap schedule (batch 128, 10 epochs,
  no early stopping) so both sides do the same optimisation work;
- scDrugMap-style: per model and fold, reload the model's pickled embedding matrix, build a
  torch DataLoader, train the same MLP for 10 fixed epochs at batch 128, score the fold.
The AUROCs of both are printed to show they solve the same problem.
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PC9, table  # noqa: E402

MODELS = ("pca", "hvg")


def scdrugmap_style(tmp: Path, splits, labels: np.ndarray) -> tuple[float, dict[str, float]]:
    import torch
    from sklearn.metrics import roc_auc_score
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    aucs: dict[str, list[float]] = {m: [] for m in MODELS}
    t = time.perf_counter()
    for m in MODELS:
        for part in splits:
            with open(tmp / f"{m}.pkl", "rb") as fh:  # each script run reloads the pickle
                X = pickle.load(fh)
            torch.manual_seed(0)
            net = nn.Sequential(nn.Linear(X.shape[1], 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 2))
            opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
            mu, sd = X[part.train].mean(0), X[part.train].std(0) + 1e-8
            dl = DataLoader(TensorDataset(torch.tensor((X[part.train] - mu) / sd, dtype=torch.float32),
                                          torch.tensor(labels[part.train])), batch_size=128, shuffle=True)
            for _ in range(10):
                for xb, yb in dl:
                    opt.zero_grad()
                    nn.functional.cross_entropy(net(xb), yb).backward()
                    opt.step()
            with torch.no_grad():
                p = torch.softmax(net(torch.tensor((X[part.test] - mu) / sd, dtype=torch.float32)), 1)[:, 1].numpy()
            aucs[m].append(roc_auc_score(labels[part.test], p))
    return time.perf_counter() - t, {m: float(np.mean(v)) for m, v in aucs.items()}


def main() -> None:
    import scdm_eval
    from scdm_embed import EmbeddingStore, extract

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = tmp / "s.zarr"
        for m in MODELS:
            extract(PC9, model=m, store=store, dataset="pc9", progress=False)
        st = EmbeddingStore(store)
        for m in MODELS:
            with open(tmp / f"{m}.pkl", "wb") as fh:
                pickle.dump(st.load(m)[0], fh)
        splits = scdm_eval.make_splits(store, scheme="pooled", by="all", folds=10, seed=0)
        labels = st.cells()["label"].to_numpy().astype(np.int64)
        opts = {"mlp": {"batch_size": 128, "max_epochs": 10, "val_fraction": 0.0}}

        t = time.perf_counter()
        res = scdm_eval.run_evaluation(store, models=MODELS, classifiers=("mlp",), folds=10, seed=0,
                                       classifier_options=opts, n_jobs=-1)
        t_scdm = time.perf_counter() - t
        t_naive, naive_auc = scdrugmap_style(tmp, splits, labels)
        t = time.perf_counter()
        full = scdm_eval.run_evaluation(store, models=MODELS, folds=10, seed=0, n_jobs=-1)
        t_full = time.perf_counter() - t

    auc = res.groupby("model")["auroc"].mean()
    n_fits = len(res)
    table(f"evaluation grid: {len(MODELS)} models x 10 folds, MLP (batch 128, 10 epochs), {os.cpu_count()} cores",
          [("scdm run_evaluation", f"{t_scdm:.1f}", f"{n_fits / t_scdm:.2f}", " ".join(f"{m}={auc[m]:.3f}" for m in MODELS), "1.00"),
           ("scDrugMap-style loop", f"{t_naive:.1f}", f"{n_fits / t_naive:.2f}", " ".join(f"{m}={naive_auc[m]:.3f}" for m in MODELS),
            f"{t_naive / t_scdm:.2f}x slower")],
          ("path", "seconds", "fits/s", "mean AUROC", "ratio"))
    print(f"\nfull default grid (mlp with early stopping + xgboost + logreg, {len(full)} fits): {t_full:.1f}s")


if __name__ == "__main__":
    main()
