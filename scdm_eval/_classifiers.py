"""Fast classifiers over cached embeddings, behind one small seeded interface.

Every classifier is built as ``cls(seed=..., **options)`` and offers ``fit(X, y)`` (``y`` 1 =
sensitive, 0 = resistant) and ``predict_proba(X)`` -> ``(n, 2)`` (columns resistant,
sensitive). Each runs single-threaded by default so that grid workers do not oversubscribe
the machine and results do not depend on thread counts.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from ._metrics import compute_metrics


@runtime_checkable
class Classifier(Protocol):
    """What :func:`~scdm_eval.run_evaluation` needs from a classifier."""

    def fit(self, X: np.ndarray, y: np.ndarray) -> Classifier: ...

    def predict_proba(self, X: np.ndarray) -> np.ndarray: ...


def _check_xy(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y).astype(np.int64).ravel()
    if X.ndim != 2 or X.shape[0] != y.shape[0]:
        raise ValueError(f"X {X.shape} and y {y.shape} do not match")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y must hold 0 (resistant) / 1 (sensitive)")
    if np.unique(y).size < 2:
        raise ValueError("the training cells hold a single class; a classifier needs both")
    return X, y


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class MLPClassifier:
    """The scDrugMap MLP: ``d -> 512 -> 512 -> 2`` with ReLU, AdamW and cross-entropy (torch, CPU).

    Inputs are standardised with the training mean/s.d. A stratified ``val_fraction`` of the
    training cells is held out for early stopping on validation loss (``patience`` epochs;
    the best epoch's weights are kept); without enough cells of each class for that, it
    trains ``max_epochs``. Minibatches of ``batch_size``; deterministic for a given ``seed``.
    """

    name: ClassVar[str] = "mlp"

    def __init__(
        self,
        *,
        seed: int = 0,
        hidden: tuple[int, ...] = (512, 512),
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        batch_size: int = 256,
        max_epochs: int = 100,
        patience: int = 10,
        val_fraction: float = 0.1,
        threads: int = 1,
    ) -> None:
        self.seed, self.hidden, self.lr, self.weight_decay = seed, tuple(hidden), lr, weight_decay
        self.batch_size, self.max_epochs, self.patience = batch_size, max_epochs, patience
        self.val_fraction, self.threads = val_fraction, threads

    def _net(self, d: int):
        from torch import nn

        layers: list[nn.Module] = []
        for h in self.hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        layers.append(nn.Linear(d, 2))
        return nn.Sequential(*layers)

    def fit(self, X: np.ndarray, y: np.ndarray) -> MLPClassifier:
        import torch
        import torch.nn.functional as F
        from sklearn.model_selection import StratifiedShuffleSplit

        X, y = _check_xy(X, y)
        self.mean_ = X.mean(axis=0)
        sd = X.std(axis=0)
        self.scale_ = np.where(sd > 0, sd, 1.0).astype(np.float32)
        Xs = (X - self.mean_) / self.scale_
        tr, va = np.arange(len(y)), np.empty(0, dtype=np.int64)
        n_val = int(np.ceil(self.val_fraction * len(y)))
        if self.val_fraction > 0 and np.bincount(y).min() >= 2 and n_val >= 2 and len(y) - n_val >= 2:
            sss = StratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=self.seed)
            tr, va = next(sss.split(Xs, y))
        rng = np.random.default_rng(self.seed)
        with torch.random.fork_rng(devices=[]), _torch_threads(self.threads):
            torch.manual_seed(self.seed)
            net = self._net(X.shape[1])
            opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            Xt, yt = torch.from_numpy(np.ascontiguousarray(Xs[tr])), torch.from_numpy(y[tr])
            Xv, yv = torch.from_numpy(np.ascontiguousarray(Xs[va])), torch.from_numpy(y[va])
            best, best_state, bad = np.inf, None, 0
            self.n_epochs_, self.best_epoch_ = 0, None
            for epoch in range(self.max_epochs):
                net.train()
                perm = torch.from_numpy(rng.permutation(len(tr)))
                for b in range(0, len(tr), self.batch_size):
                    idx = perm[b:b + self.batch_size]
                    loss = F.cross_entropy(net(Xt[idx]), yt[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                self.n_epochs_ = epoch + 1
                if len(va):
                    net.eval()
                    with torch.no_grad():
                        val_loss = float(F.cross_entropy(net(Xv), yv))
                    if val_loss < best - 1e-6:
                        best, best_state, bad, self.best_epoch_ = val_loss, copy.deepcopy(net.state_dict()), 0, epoch + 1
                    else:
                        bad += 1
                        if bad >= self.patience:
                            break
            if best_state is not None:
                net.load_state_dict(best_state)
        net.eval()
        self.net_ = net
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        import torch

        Xs = ((np.asarray(X, dtype=np.float32) - self.mean_) / self.scale_).astype(np.float32)
        out = []
        with _torch_threads(self.threads), torch.no_grad():
            for b in range(0, len(Xs), 8192):
                out.append(torch.softmax(self.net_(torch.from_numpy(np.ascontiguousarray(Xs[b:b + 8192]))), dim=1).numpy())
        return np.concatenate(out).astype(np.float64) if out else np.empty((0, 2))


class _FittedModel:
    """Shared by classifiers wrapping an sklearn-style ``model_``: float32 in, float64 probabilities out."""

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.model_.predict_proba(np.asarray(X, dtype=np.float32)), dtype=np.float64)


class XGBoostClassifier(_FittedModel):
    """Gradient-boosted trees (``xgboost``, ``tree_method="hist"``, one thread by default)."""

    name: ClassVar[str] = "xgboost"

    def __init__(self, *, seed: int = 0, n_estimators: int = 200, max_depth: int = 6, learning_rate: float = 0.1,
                 n_jobs: int = 1, **params: Any) -> None:
        self.seed = seed
        self.params = {"n_estimators": n_estimators, "max_depth": max_depth, "learning_rate": learning_rate,
                       "n_jobs": n_jobs, **params}

    def fit(self, X: np.ndarray, y: np.ndarray) -> XGBoostClassifier:
        from xgboost import XGBClassifier

        X, y = _check_xy(X, y)
        self.model_ = XGBClassifier(tree_method="hist", objective="binary:logistic", eval_metric="logloss",
                                    random_state=self.seed, **self.params)
        self.model_.fit(X, y)
        return self



class LogisticClassifier(_FittedModel):
    """L2 logistic regression on standardised features (sklearn pipeline, lbfgs)."""

    name: ClassVar[str] = "logreg"

    def __init__(self, *, seed: int = 0, C: float = 1.0, max_iter: int = 2000) -> None:
        self.seed, self.C, self.max_iter = seed, C, max_iter

    def fit(self, X: np.ndarray, y: np.ndarray) -> LogisticClassifier:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        X, y = _check_xy(X, y)
        self.model_ = make_pipeline(StandardScaler(), LogisticRegression(C=self.C, max_iter=self.max_iter,
                                                                         random_state=self.seed))
        self.model_.fit(X, y)
        return self



class MajorityClassifier:
    """Baseline: every cell gets the training fraction of sensitive cells as its probability."""

    name: ClassVar[str] = "majority"

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed

    def fit(self, X: np.ndarray, y: np.ndarray) -> MajorityClassifier:
        _, y = _check_xy(X, y)
        self.p_ = float(y.mean())
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        n = np.asarray(X).shape[0]
        return np.column_stack([np.full(n, 1.0 - self.p_), np.full(n, self.p_)])


#: Classifier name -> class (``cls(seed=..., **options)``).
CLASSIFIERS: dict[str, type] = {c.name: c for c in (MLPClassifier, XGBoostClassifier, LogisticClassifier, MajorityClassifier)}


def check_classifiers(names) -> tuple[str, ...]:
    """Validated classifier names (a tuple); an :class:`~scdm_embed.ScdmError` names the bad ones."""
    from scdm_embed.errors import ScdmError  # imported lazily: grid workers import this module

    names = (names,) if isinstance(names, str) else tuple(names)
    if not names:
        raise ScdmError("no classifier was given", f"pick one or more of {', '.join(CLASSIFIERS)}")
    bad = [n for n in names if n not in CLASSIFIERS]
    if bad:
        raise ScdmError(f"unknown classifier {', '.join(map(repr, bad))}", f"pick from {', '.join(CLASSIFIERS)}")
    if len(set(names)) != len(names):
        raise ScdmError(f"classifier listed twice: {list(names)}", "list each classifier once")
    return names


def make_classifier(name: str, *, seed: int = 0, **options: Any) -> Classifier:
    """Build classifier ``name`` of :data:`CLASSIFIERS` with ``seed`` and options."""
    if name not in CLASSIFIERS:
        check_classifiers([name])
    try:
        return CLASSIFIERS[name](seed=seed, **options)
    except TypeError as e:
        from scdm_embed.errors import ScdmError

        raise ScdmError(f"bad options for classifier {name!r}: {e}", "check the option names in its docstring") from e


_TORCH_WARM = False


def _warm_torch() -> None:
    """Import torch and its optimizer machinery (which pulls in torch._dynamo) once per process.

    Done on a worker's first task, so loky's memory baseline (taken after the first task)
    already includes torch and a later MLP task is not mistaken for a memory leak.
    """
    global _TORCH_WARM
    if not _TORCH_WARM:
        import torch

        torch.optim.AdamW(torch.nn.Linear(1, 1).parameters())
        _TORCH_WARM = True


def fit_score(X: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, classifier: str,
              options: dict[str, Any], seed: int, warm_torch: bool = False) -> dict[str, float | str]:
    """Fit ``classifier`` on rows ``train``, score rows ``test`` (one grid task, single-threaded)."""
    import warnings

    from threadpoolctl import threadpool_limits

    if warm_torch:
        _warm_torch()
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. lbfgs convergence notes inside workers
        clf = make_classifier(classifier, seed=seed, **options)
        clf.fit(X[train], y[train])
        proba = clf.predict_proba(X[test])[:, 1]
    return compute_metrics(y[test], proba)
