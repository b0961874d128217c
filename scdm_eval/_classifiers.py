"""Fast classifiers over cached embeddings, behind one small seeded interface.

Every classifier is built as ``cls(seed=..., **settings)`` (settings declared once in its
``options_spec``: typed, checked, listed by :func:`valid_settings`) and offers
``fit(X, y, *, rows=None, groups=None)`` (``y`` 1 = sensitive, 0 = resistant; with ``rows``,
``X`` is a larger matrix, e.g. a read-only memmap, and only those rows are read, batch by
batch, never copied whole) and ``predict_proba(X)`` -> ``(n, 2)`` (columns resistant,
sensitive). ``threads=0`` means "the cores given to this fit" (the grid sets them, so that
workers x threads never exceed the cores). A classifier whose ``streams_rows`` is true also
takes a :class:`RowSource` as ``X`` (e.g. the store's :class:`~scdm_embed.store.EmbeddingRows`)
and reads it a block of rows at a time; the others read a source whole first.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from scdm_embed.models.options import Option, at_least, greater_than

from ._metrics import compute_metrics
from ._mlp_step import StackStep

#: rows read (gathered from ``X[rows]``) per chunk when a fit streams its training cells
_CHUNK = 8192


@runtime_checkable
class Classifier(Protocol):
    """What :func:`~scdm_eval.run_evaluation` needs from a classifier."""

    def fit(self, X: np.ndarray, y: np.ndarray) -> Classifier: ...

    def predict_proba(self, X: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class RowSource(Protocol):
    """A float32 matrix read a block of rows at a time, not held whole (:class:`scdm_embed.store.EmbeddingRows`)."""

    shape: tuple[int, int]

    def read(self, at: np.ndarray | None = None) -> np.ndarray: ...


def is_source(X: Any) -> bool:
    """Whether ``X`` is a :class:`RowSource` rather than an array."""
    return not isinstance(X, np.ndarray) and isinstance(X, RowSource)


def streams_rows(classifier: str) -> bool:
    """Whether ``classifier``'s fits read a :class:`RowSource` block by block (see the module doc)."""
    return bool(getattr(CLASSIFIERS[classifier], "streams_rows", False))


def available_cores() -> int:
    """CPU cores this process may run on (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _threads(n: int) -> int:
    return n if n > 0 else available_cores()


def _check_xy(X: np.ndarray | RowSource, y: np.ndarray, rows: np.ndarray | None = None, *,
              stream: bool = False) -> tuple[Any, np.ndarray, np.ndarray]:
    """``X`` (not copied when already float32; a :class:`RowSource` kept as it is with ``stream``,
    else read whole), ``y`` as int64 and the training rows of ``X``."""
    if is_source(X):
        X = X if stream else X.read()
    elif not (isinstance(X, np.ndarray) and X.dtype == np.float32):
        X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y).astype(np.int64).ravel()
    ndim = len(X.shape)
    rows = np.arange(X.shape[0] if ndim else 0) if rows is None else np.asarray(rows, dtype=np.int64).ravel()
    if ndim != 2 or rows.shape[0] != y.shape[0]:
        raise ValueError(f"X {X.shape} and y {y.shape} do not match")
    if len(rows) and (rows.min() < 0 or rows.max() >= X.shape[0]):
        raise ValueError(f"rows must lie in 0..{X.shape[0] - 1} (got {rows.min()}..{rows.max()})")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y must hold 0 (resistant) / 1 (sensitive)")
    if np.unique(y).size < 2:
        raise ValueError("the training cells hold a single class; a classifier needs both")
    return X, y, rows


def _gather(X: np.ndarray | RowSource, rows: np.ndarray) -> np.ndarray:
    """``X[rows]`` as float32 (one chunk: callers keep ``rows`` short); a source reads just those rows."""
    if is_source(X):
        return X.read(np.asarray(rows, dtype=np.int64))
    if len(rows) and rows[0] == 0 and rows[-1] == len(rows) - 1 and len(rows) == X.shape[0]:
        return np.ascontiguousarray(X, dtype=np.float32)
    return np.ascontiguousarray(X[rows], dtype=np.float32)


def _moments(X: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and s.d. (float32; s.d. 0 -> 1) of ``X[rows]``, accumulated in float64 chunk by chunk."""
    s = np.zeros(X.shape[1], np.float64)
    s2 = np.zeros(X.shape[1], np.float64)
    step = _CHUNK // 16  # float64 chunks of 512 rows: 2 MB, whatever the matrix
    for a in range(0, len(rows), step):
        c = _gather(X, rows[a:a + step]).astype(np.float64)
        s += c.sum(axis=0)
        s2 += np.einsum("ij,ij->j", c, c)  # no squared copy
    n = max(len(rows), 1)
    mean = s / n
    sd = np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))
    return mean.astype(np.float32), np.where(sd > 1e-12, sd, 1.0).astype(np.float32)


def validation_split(y: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int,
                     cap: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Positions (train, validation) carved from the training cells ``y`` for early stopping.

    Grouped (whole groups held out, e.g. samples) when ``groups`` is given, else stratified by
    class. ``cap`` > 0 scores at most that many validation cells (a random subset; the held-out
    groups' other cells are not trained on). Empty validation when there is no room for one
    (fewer than 2 cells of a class, or fewer than 2 groups, or a side left with one class).
    """
    n = len(y)
    everything, none = np.arange(n), np.empty(0, dtype=np.int64)
    if fraction <= 0 or np.bincount(y, minlength=2).min() < 2 or n < 4:
        return everything, none
    if groups is not None:
        from sklearn.model_selection import StratifiedGroupKFold

        n_groups = len(np.unique(groups))
        k = min(max(2, round(1 / fraction)), n_groups)
        if n_groups < 2:
            return everything, none
        tr, va = next(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(everything, y, groups))
        if np.unique(y[tr]).size < 2:
            return everything, none
    else:
        from sklearn.model_selection import StratifiedShuffleSplit

        n_val = int(np.ceil(fraction * n))
        if cap > 0:
            n_val = min(n_val, cap)
        if n_val < 2 or n - n_val < 2:
            return everything, none
        tr, va = next(StratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=seed).split(everything, y))
    if cap > 0 and len(va) > cap:
        va = np.sort(np.random.default_rng(seed).choice(va, cap, replace=False))
    return np.sort(tr), np.sort(va)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    if before == n:  # concurrent fits (:func:`fit_score_concurrently`) set it once for all of them
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: torch's global RNG seeds a network's initial weights: one network is built at a time
_INIT_LOCK = threading.Lock()
_FTZ_LOCK, _FTZ_DEPTH = threading.Lock(), [0]


@contextlib.contextmanager
def _flush_denormals() -> Iterator[None]:
    """Denormal floats flushed to zero while training (CPU: FTZ/DAZ), then torch's default again.

    On well-separated data the MLP's gradients and Adam moments shrink into the denormal range,
    where CPU arithmetic is many times slower: 6.0-6.6 s -> 5.5-5.7 s per scdrugmap-schedule fit
    of 18k x 512 cells (bench data), with the same predictions.
    """
    import torch

    with _FTZ_LOCK:  # counted: the last of concurrent fits to finish restores the default
        _FTZ_DEPTH[0] += 1
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        with _FTZ_LOCK:
            _FTZ_DEPTH[0] -= 1
            if not _FTZ_DEPTH[0]:
                torch.set_flush_denormal(False)


def _hidden(v: str) -> str | None:
    try:
        sizes = [int(s) for s in v.split(",") if s.strip()]
    except ValueError:
        return "must be comma-separated layer widths, e.g. 512,512"
    return None if sizes and min(sizes) >= 1 else "must be comma-separated positive layer widths, e.g. 512,512"


def _fraction(v: float) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _at_least_0(v: int) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _cuda_present(v: str) -> str | None:
    if v != "cuda":
        return None
    import torch

    return None if torch.cuda.is_available() else "asks for a CUDA GPU and torch sees none: use auto or cpu"


_THREADS = Option("threads", int, 0, "CPU threads for this fit (0: the cores the grid gives it)", check=_at_least_0)


class _Settings:
    """Classifiers whose settings are declared in ``options_spec`` and set as attributes."""

    name: ClassVar[str]
    options_spec: ClassVar[tuple[Option, ...]] = ()

    @classmethod
    def fits_at_once(cls, settings: Mapping[str, Any]) -> bool:
        """Whether fits with these settings gain from running one per core at once (default: no;
        classifiers that scale over threads, or hold large per-fit buffers, run one at a time)."""
        return False

    def __init__(self, *, seed: int = 0, **settings: Any) -> None:
        self.seed = int(seed)
        self.settings = resolve_settings(self.name, settings)
        for k, v in self.settings.items():
            setattr(self, k, v)


class MLPClassifier(_Settings):
    """The scDrugMap MLP: ``d -> 512 -> 512 -> 2`` with ReLU and AdamW (torch; a CUDA GPU when present).

    Defaults (``--protocol scdm``): inputs standardised with the training mean/s.d.,
    cross-entropy, early stopping on the loss of a validation split carved from the TRAINING
    cells (grouped when ``groups`` are given; at most ``val_max`` cells scored, once per
    epoch), ``patience`` epochs, the best epoch's weights kept. ``early_stopping=false``,
    ``keep=last``, ``scale=false``, ``loss=bce`` give the released scDrugMap code's schedule
    (``--protocol scdrugmap``). Minibatches are gathered from ``X[rows]`` batch by batch (no
    copy of the training matrix); deterministic for a given ``seed`` and thread count.
    """

    name: ClassVar[str] = "mlp"
    options_spec: ClassVar[tuple[Option, ...]] = (
        Option("hidden", str, "512,512", "hidden layer widths, comma-separated", check=_hidden),
        Option("lr", float, 1e-3, "AdamW learning rate", check=greater_than(0)),
        Option("weight_decay", float, 1e-2, "AdamW weight decay", check=at_least(0)),
        Option("batch_size", int, 256, "cells per minibatch", check=at_least(1)),
        Option("max_epochs", int, 100, "most training epochs", check=at_least(1)),
        Option("early_stopping", bool, True, "stop on the validation loss (false: train max_epochs)"),
        Option("patience", int, 2, "epochs without a better validation loss before stopping", check=at_least(1)),
        Option("min_delta", float, 1e-4, "a validation loss counts as better only when it drops by more than this",
               check=at_least(0)),
        Option("val_fraction", float, 0.1, "share of the training cells held out for early stopping", check=_fraction),
        Option("val_max", int, 2048, "most validation cells scored per epoch (0: all)", check=_at_least_0),
        Option("keep", str, "best", "weights kept: the best validation epoch or the last", choices=("best", "last")),
        Option("loss", str, "ce", "ce: softmax cross-entropy; bce: BCE-with-logits on one-hot targets",
               choices=("ce", "bce")),
        Option("scale", bool, True, "standardise inputs with the training mean/s.d."),
        Option("device", str, "auto", "where the network runs: auto (a CUDA GPU when present, else the CPU), cpu, cuda",
               choices=("auto", "cpu", "cuda"), check=_cuda_present),
        _THREADS,
    )

    @classmethod
    def fits_at_once(cls, settings: Mapping[str, Any]) -> bool:
        """On the CPU, with ``threads`` left to the grid: a d-512-512-2 step at batch 128-256 is
        small GEMMs plus a fixed cost per op, so one fit per core beats every core on one fit
        (scdrugmap schedule, 18k x 512, 2 cores: 96-127 GFLOP/s for two 1-thread fits at once
        against 76-99 one at a time on 2 threads; bench/bench_eval.py)."""
        if settings.get("threads", 0):
            return False
        device = settings.get("device", "auto")
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        return device == "cpu"

    @property
    def torch_device(self):
        """The torch device of ``device`` (``auto``: CUDA when present)."""
        import torch

        want = self.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(want)

    @property
    def layers(self) -> tuple[int, ...]:
        """Hidden layer widths."""
        return tuple(int(s) for s in self.hidden.split(",") if s.strip())

    def _net(self, d: int):
        from torch import nn

        layers: list[nn.Module] = []
        for h in self.layers:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        layers.append(nn.Linear(d, 2))
        return nn.Sequential(*layers)

    def _loss(self, logits, target, reduction: str = "mean"):
        import torch.nn.functional as F

        if self.loss == "bce":
            return F.binary_cross_entropy_with_logits(logits, F.one_hot(target, 2).to(logits.dtype), reduction=reduction)
        return F.cross_entropy(logits, target, reduction=reduction)

    def _val_loss(self, step, X: np.ndarray, rows: np.ndarray, y) -> float:
        """The loss on rows ``rows`` of ``X`` (labels ``y``), forwarded a batch at a time in ``step``'s buffers.

        Gathered each epoch rather than held scaled: no copy of the validation set, and no
        activations beyond the training step's.
        """
        import torch

        total, size = 0.0, len(step.x)
        with torch.no_grad():
            for a in range(0, len(rows), size):
                n = step.load(X, rows[a:a + size], *self._scaling())
                total += float(self._loss(step.forward(n), y[a:a + n], reduction="sum"))
        return total / (len(rows) * (2 if self.loss == "bce" else 1))  # the mean over every loss term

    def _scaling(self):
        """(mean, s.d.) tensors that standardise inputs, or (None, None) with ``scale=false``."""
        return (self._mean_t, self._scale_t) if self.scale else (None, None)

    def _place(self) -> None:
        """Device and scaling tensors for fitting or predicting."""
        import torch

        self._dev = self.torch_device
        self._mean_t = torch.from_numpy(self.mean_).to(self._dev)
        self._scale_t = torch.from_numpy(self.scale_).to(self._dev)

    def fit(self, X: np.ndarray, y: np.ndarray, *, rows: np.ndarray | None = None,
            groups: np.ndarray | None = None) -> MLPClassifier:
        """Train on ``X[rows]`` (all rows by default) with labels ``y`` (and ``groups``) of those rows."""
        import torch

        X, y, rows = _check_xy(X, y, rows)
        frac = self.val_fraction if self.early_stopping else 0.0
        tr, va = validation_split(y, None if groups is None else np.asarray(groups)[: len(y)], frac, self.seed,
                                  self.val_max)
        self.n_train_, self.n_val_ = len(tr), len(va)
        if self.scale:
            self.mean_, self.scale_ = _moments(X, rows[tr])
        else:
            self.mean_, self.scale_ = np.zeros(X.shape[1], np.float32), np.ones(X.shape[1], np.float32)
        self._place()
        rng = np.random.default_rng(self.seed)
        tr_rows, ytr = rows[tr], torch.from_numpy(y[tr]).to(self._dev)
        with _INIT_LOCK, torch.random.fork_rng(devices=[]):  # the only draws from torch's RNG
            torch.manual_seed(self.seed)
            net = self._net(X.shape[1]).to(self._dev)  # initialised on the CPU: the same weights on any device
        with _torch_threads(_threads(self.threads)), _flush_denormals(), torch.no_grad():
            # every activation, gradient and batch in buffers made once (StackStep): autograd's
            # per-step tensors fragmented the C heap to ~2x what a fit holds (bench/bench_eval.py)
            step = StackStep(net, min(self.batch_size, max(len(tr_rows), len(va), 1)), self.loss, self._dev)
            # fused AdamW: one kernel per step instead of ~12 per parameter tensor (the per-tensor
            # loop took a third of a d-512-512-2 fit on CPU; bench/bench_eval.py)
            opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay, fused=True)
            va_rows, yv = rows[va], torch.from_numpy(y[va]).to(self._dev)
            best, bad = np.inf, 0
            kept = [p.detach().clone() for p in net.parameters()] if len(va) and self.keep == "best" else None
            self.n_epochs_, self.best_epoch_, self.val_losses_ = 0, None, []
            for epoch in range(self.max_epochs):
                perm = rng.permutation(len(tr_rows))
                for b in range(0, len(perm), self.batch_size):
                    idx = perm[b:b + self.batch_size]
                    n = step.load(X, tr_rows[idx], *self._scaling())
                    step.forward(n)
                    step.backward(n, ytr[idx])  # written over the gradients: nothing to zero
                    opt.step()
                self.n_epochs_ = epoch + 1
                if len(va):
                    val_loss = self._val_loss(step, X, va_rows, yv)
                    self.val_losses_.append(val_loss)
                    if val_loss < best - self.min_delta:
                        best, bad, self.best_epoch_ = val_loss, 0, epoch + 1
                        if kept is not None:  # the best epoch's weights, copied into buffers made once
                            for k, p in zip(kept, net.parameters(), strict=True):
                                k.copy_(p)
                    else:
                        bad += 1
                        if bad >= self.patience:
                            break
            if kept is not None and self.best_epoch_ is not None:
                for k, p in zip(kept, net.parameters(), strict=True):
                    p.copy_(k)
            del step
            for p in net.parameters():  # the last step's gradients: not needed to predict
                p.grad = None
        net.eval()
        self.net_, self.optimizer_ = net, opt
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        import torch

        X = X if isinstance(X, np.ndarray) else np.asarray(X, dtype=np.float32)
        self._place()
        self.net_.to(self._dev)
        out = np.empty((len(X), 2))
        with _torch_threads(_threads(self.threads)), torch.no_grad():
            # 256 rows at a time in buffers made once: each layer's activations 0.5 MB, whatever the test set
            step = StackStep(self.net_, min(256, max(len(X), 1)), self.loss, self._dev, train=False)
            for b in range(0, len(X), len(step.x)):
                z = step.forward(step.load(X, np.arange(b, min(b + len(step.x), len(X))), *self._scaling()))
                if self.loss == "bce":
                    out[b:b + len(z), 1] = torch.sigmoid(z[:, 1]).double().cpu().numpy()
                    out[b:b + len(z), 0] = 1.0 - out[b:b + len(z), 1]
                else:
                    out[b:b + len(z)] = torch.softmax(z, dim=1).double().cpu().numpy()
        return out


def bin_edges(X: np.ndarray, rows: np.ndarray, bins: int) -> np.ndarray:
    """The ``j / bins`` quantiles (j = 0 .. bins-1; numpy's ``linear`` method) of each column of
    ``X[rows]``: a ``(bins, d)`` float32 matrix whose xgboost sketch cuts at exactly these values.

    Columns are sorted a block at a time (at most 64 columns and ~16 MB, whatever ``d`` and the
    rows), each block's values gathered straight from ``X``.
    """
    n, d = len(rows), X.shape[1]
    pos = np.arange(bins) * (n - 1) / bins
    lo = np.floor(pos).astype(np.int64)
    hi, frac = np.minimum(lo + 1, n - 1), (pos - lo)[:, None]
    out, width = np.empty((bins, d), np.float32), max(1, min(64, (1 << 24) // (4 * max(n, 1))))
    for c in range(0, d, width):
        block = np.empty((min(width, d - c), n), np.float32)  # columns x rows: each column's cells contiguous
        for a in range(0, n, _CHUNK):
            block[:, a:a + _CHUNK] = X[rows[a:a + _CHUNK], c:c + width].T
        block.sort(axis=1)
        b_lo, b_hi = block[:, lo].T.astype(np.float64), block[:, hi].T.astype(np.float64)
        out[:, c:c + width] = b_lo + frac * (b_hi - b_lo)
    return out


def _rows_iter(X: np.ndarray, rows: np.ndarray, y: np.ndarray, chunk: int):
    """An ``xgboost.DataIter`` over ``X[rows]`` in chunks (the training matrix is never copied whole)."""
    import xgboost as xgb

    class RowsIter(xgb.DataIter):
        def __init__(self) -> None:
            self._at = 0
            super().__init__(release_data=True)

        def next(self, input_data) -> bool:
            if self._at >= len(rows):
                return False
            a, b = self._at, min(self._at + chunk, len(rows))
            input_data(data=_gather(X, rows[a:b]), label=y[a:b].astype(np.float32))
            self._at = b
            return True

        def reset(self) -> None:
            self._at = 0

    return RowsIter()


class XGBoostClassifier(_Settings):
    """Gradient-boosted trees (``xgboost``, ``tree_method="hist"``, float32 ``QuantileDMatrix``).

    The training matrix is quantised once per fit, streamed from ``X[rows]`` in chunks.
    Defaults chosen by measurement (``bench/bench_eval.py``; 20k cells x 512-d): 200 rounds at
    eta 0.3, depth 5, 32 bins, 80% of the cells and 30% of the features per tree: about 4x less
    CPU per fit than 200 rounds of depth 6 on 256 bins without subsampling, at an equal AUROC on
    cell-level folds and a better one on sample-grouped folds (depth 6 / 64 bins: 1.4x slower, same AUROC).
    The bin edges are the ``j / max_bin`` quantiles of each feature over ``sketch_rows`` sampled
    training cells (:func:`bin_edges`, handed to xgboost as a reference matrix): xgboost's sketch
    of every cell peaked at ~2.5x the slice it quantised at 18k cells, and its sketch of 4,096
    cells still at ~50 MB of work buffers, ~25 MB of which stayed in its threads' heaps between
    fits. Same AUROC as xgboost's sketch of every cell (``sketch_rows=0``): 20k synthetic cells,
    sample-grouped folds, 3 seeds 0.5977 vs 0.5961, cell-level 0.9988 vs 0.9986; real PC9 cells
    (all 1,908 training cells), 3 seeds, hvg 0.9011 vs 0.9018, pca 0.8761 vs 0.8744. Early
    stopping is off by default: under sample-grouped folds its validation split holds a few
    samples, stopped boosting after 1-20 rounds and cost ~0.2 AUROC there. With
    ``early_stopping=true`` boosting stops after ``early_stopping_rounds`` rounds without a
    log-loss better by ``min_delta`` on a validation split carved from the TRAINING cells
    (grouped when ``groups`` are given) and predictions use the best round. ``threads=0``: the
    fit's cores.
    """

    name: ClassVar[str] = "xgboost"
    #: a fit reads its training cells once, in chunks, into its quantised matrix, then its test cells
    streams_rows: ClassVar[bool] = True
    options_spec: ClassVar[tuple[Option, ...]] = (
        Option("n_estimators", int, 200, "boosting rounds (the most, with early stopping)", check=at_least(1)),
        Option("max_depth", int, 5, "tree depth", check=at_least(1)),
        Option("learning_rate", float, 0.3, "shrinkage per round", check=greater_than(0)),
        Option("max_bin", int, 32, "histogram bins per feature", check=at_least(2)),
        Option("sketch_rows", int, 4096, "training cells (a seeded random subset) whose quantiles are the bin edges; "
               "0: xgboost's own sketch of every training cell", check=at_least(0)),
        Option("subsample", float, 0.8, "share of training cells per tree", check=lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
        Option("colsample_bytree", float, 0.3, "share of features per tree", check=lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
        Option("min_child_weight", float, 1.0, "minimum hessian per leaf", check=at_least(0)),
        Option("reg_lambda", float, 1.0, "L2 penalty on leaf weights", check=at_least(0)),
        Option("early_stopping", bool, False, "stop on the log-loss of a validation split (false: n_estimators rounds)"),
        Option("early_stopping_rounds", int, 10, "rounds without a better validation log-loss before stopping",
               check=at_least(1)),
        Option("min_delta", float, 1e-4, "a validation log-loss counts as better only when it drops by more than this",
               check=at_least(0)),
        Option("val_fraction", float, 0.1, "share of the training cells held out for early stopping", check=_fraction),
        Option("max_cached_hist_node", int, 1 << 16, "histograms xgboost keeps per tree (its default); fewer save "
               "memory at the same trees, but below 2^depth - 1 they are rebuilt (16 at depth 5: -6 MB, +25% wall "
               "at 18k x 512)", check=at_least(1)),
        _THREADS,
    )

    def fit(self, X: np.ndarray, y: np.ndarray, *, rows: np.ndarray | None = None,
            groups: np.ndarray | None = None) -> XGBoostClassifier:
        """Train on ``X[rows]`` (all rows by default) with labels ``y`` (and ``groups``) of those rows."""
        import xgboost as xgb

        X, y, rows = _check_xy(X, y, rows, stream=True)
        frac = self.val_fraction if self.early_stopping else 0.0
        tr, va = validation_split(y, None if groups is None else np.asarray(groups), frac, self.seed)
        self.n_train_, self.n_val_ = len(tr), len(va)
        nthread = _threads(self.threads)
        ref = None
        if self.sketch_rows:
            pick = tr
            if self.sketch_rows < len(tr):
                pick = tr[np.sort(np.random.default_rng(self.seed).choice(len(tr), self.sketch_rows, replace=False))]
            # the bins come from our quantiles of the sampled cells, handed over as a max_bin-row
            # reference matrix (xgboost cuts at each of its distinct values): xgboost's own sketch
            # of 4,096 x 512 cells peaked at ~50 MB of work buffers and kept ~25 MB of them in its
            # threads' heaps between fits (bench/bench_eval.py)
            sample = (_gather(X, rows[pick]), np.arange(len(pick))) if is_source(X) else (X, rows[pick])
            ref = xgb.QuantileDMatrix(bin_edges(*sample, self.max_bin), max_bin=self.max_bin, nthread=nthread)
            del sample
        dtrain = xgb.QuantileDMatrix(_rows_iter(X, rows[tr], y[tr], _CHUNK // 4), max_bin=self.max_bin, nthread=nthread,
                                     ref=ref)
        del ref
        release_heap()  # the quantiser's freed work buffers, before boosting allocates its histograms
        params = {"tree_method": "hist", "objective": "binary:logistic", "eval_metric": "logloss", "seed": self.seed,
                  "nthread": nthread, "max_bin": self.max_bin, "max_depth": self.max_depth, "eta": self.learning_rate,
                  "subsample": self.subsample, "colsample_bytree": self.colsample_bytree,
                  "min_child_weight": self.min_child_weight, "lambda": self.reg_lambda,
                  "max_cached_hist_node": self.max_cached_hist_node, "verbosity": 0}
        evals, callbacks = [], []
        if len(va):
            dval = xgb.QuantileDMatrix(_gather(X, rows[va]), label=y[va].astype(np.float32), ref=dtrain,
                                      max_bin=self.max_bin, nthread=nthread)
            evals = [(dval, "val")]
            callbacks = [xgb.callback.EarlyStopping(rounds=self.early_stopping_rounds, metric_name="logloss",
                                                    data_name="val", min_delta=self.min_delta)]
        self.model_ = xgb.train(params, dtrain, num_boost_round=self.n_estimators, evals=evals, callbacks=callbacks,
                                verbose_eval=False)
        self.n_rounds_ = self.model_.num_boosted_rounds()
        self.best_round_ = int(self.model_.best_iteration) + 1 if callbacks else self.n_rounds_
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        X = X if isinstance(X, np.ndarray) and X.dtype == np.float32 else np.asarray(X, dtype=np.float32)
        self.model_.set_param({"nthread": _threads(self.threads)})
        out = [np.asarray(self.model_.inplace_predict(_gather(X, np.arange(b, min(b + 4 * _CHUNK, len(X)))),
                                                      iteration_range=(0, self.best_round_)), dtype=np.float64)
               for b in range(0, len(X), 4 * _CHUNK)]
        p = np.concatenate(out) if out else np.empty(0)
        return np.column_stack([1.0 - p, p])


def logreg_pipeline(mean: np.ndarray, scale: np.ndarray, n_seen: Any, coef: np.ndarray, intercept: np.ndarray,
                    n_iter: np.ndarray, *, C: float, max_iter: int, seed: int):
    """A fitted sklearn ``StandardScaler`` + ``LogisticRegression`` pipeline from its arrays (fits and bundles)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    d = len(mean)
    scaler = StandardScaler()
    scaler.mean_, scaler.scale_, scaler.var_ = mean, scale, np.asarray(scale, np.float64) ** 2
    scaler.n_samples_seen_, scaler.n_features_in_ = n_seen, d
    lr = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    lr.coef_, lr.intercept_ = np.asarray(coef, np.float64).reshape(1, d), np.asarray(intercept, np.float64).reshape(1)
    lr.classes_, lr.n_iter_, lr.n_features_in_ = np.array([0, 1]), np.asarray(n_iter).reshape(1), d
    return make_pipeline(scaler, lr)


def row_runs(rows: np.ndarray, min_run: int = 256) -> list[tuple[int, int]] | None:
    """``rows`` as ``[(start, stop), ...]`` blocks of consecutive rows, or None when they are not increasing
    or their blocks average under ``min_run`` rows (too short for a view's GEMV to pay).

    Study and sample blocks are consecutive in a store, so most partitions' rows are a few blocks.
    """
    rows = np.asarray(rows)
    if len(rows) == 0:
        return []
    step = np.diff(rows)
    if (step <= 0).any():
        return None
    cut = np.flatnonzero(step != 1) + 1
    if len(rows) < min_run * (len(cut) + 1):
        return None
    starts, stops = rows[np.r_[0, cut]], rows[np.r_[cut - 1, len(rows) - 1]] + 1
    return [(int(a), int(e)) for a, e in zip(starts, stops, strict=True)]


def _logistic_lbfgs(X: np.ndarray, rows: np.ndarray, y: np.ndarray, mean: np.ndarray, scale: np.ndarray, C: float,
                    max_iter: int) -> tuple[np.ndarray, float, int]:
    """L2 logistic regression on the standardised rows ``X[rows]``, read in place: (coef, intercept, iterations).

    Minimises sklearn's objective (``C`` x summed log-loss + half the squared coefficients, the
    intercept unpenalised; here divided by the cell count) with scipy's L-BFGS-B and sklearn's
    tolerances. The standardisation is folded into the weights (``X @ (w / scale) - mean . (w /
    scale)``), so no standardised copy exists. Rows in long consecutive blocks (a study, a
    sample: :func:`row_runs`) are read as views, block by block; scattered rows that are most of
    ``X`` make each pass a GEMV over all of ``X`` (the other rows' residuals zero); scattered
    rows that are few are gathered once.
    """
    from scipy.optimize import minimize
    from scipy.special import expit

    runs = row_runs(rows)
    if runs is None and len(rows) < 0.6 * X.shape[0]:  # scattered, a small share of X: one gathered copy
        X, rows = _gather(X, rows), np.arange(len(rows))  # is cheaper than passes over all of it
        runs = [(0, len(rows))]
    n, d = X.shape
    inv = (1.0 / scale.astype(np.float64))
    shift = mean.astype(np.float64) * inv
    yf = y.astype(np.float64)
    r_all = np.zeros(n, np.float32) if runs is None else None
    m = len(rows)

    def f(p: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = p[:d], p[d]
        v = (w * inv).astype(np.float32)
        # blocks: views of X's rows, no copy, no pass over the other rows
        z32 = (X @ v)[rows] if runs is None else np.concatenate([X[a:e] @ v for a, e in runs])
        z = z32.astype(np.float64) + (b - shift @ w)
        loss = np.logaddexp(0.0, z).sum() - yf @ z
        r = expit(z) - yf
        if runs is None:
            r_all[rows] = r
            g = X.T @ r_all
        else:
            r32, at, g = r.astype(np.float32), 0, np.zeros(d, np.float32)
            for a, e in runs:
                g += X[a:e].T @ r32[at:at + e - a]
                at += e - a
        gw = (g.astype(np.float64) * inv - shift * r.sum()) / m + w / (C * m)
        return loss / m + 0.5 * (w @ w) / (C * m), np.append(gw, r.sum() / m)

    res = minimize(f, np.zeros(d + 1), jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iter, "maxls": 50, "gtol": 1e-4, "ftol": 64 * np.finfo(float).eps})
    return res.x[:d], float(res.x[d]), int(res.nit)


class LogisticClassifier(_Settings):
    """L2 logistic regression on standardised features, fitted in place (no copy of the training rows).

    The objective and tolerances of sklearn's ``LogisticRegression(solver="lbfgs")``; the fitted
    model is a sklearn ``StandardScaler`` + ``LogisticRegression`` pipeline.
    """

    name: ClassVar[str] = "logreg"
    options_spec: ClassVar[tuple[Option, ...]] = (
        Option("C", float, 1.0, "inverse L2 strength", check=greater_than(0)),
        Option("max_iter", int, 2000, "most lbfgs iterations", check=at_least(1)),
    )

    def fit(self, X: np.ndarray, y: np.ndarray, *, rows: np.ndarray | None = None,
            groups: np.ndarray | None = None) -> LogisticClassifier:  # noqa: ARG002
        X, y, rows = _check_xy(X, y, rows)
        mean, scale = _moments(X, rows)
        coef, intercept, n_iter = _logistic_lbfgs(X, rows, y, mean, scale, self.C, self.max_iter)
        self.model_ = logreg_pipeline(mean, scale, len(rows), coef, np.array([intercept]), np.array([n_iter]),
                                      C=self.C, max_iter=self.max_iter, seed=self.seed)
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.model_.predict_proba(np.asarray(X, dtype=np.float32)), dtype=np.float64)


class MajorityClassifier(_Settings):
    """Baseline: every cell gets the training fraction of sensitive cells as its probability."""

    name: ClassVar[str] = "majority"
    streams_rows: ClassVar[bool] = True  # reads no cell at all

    def fit(self, X: np.ndarray, y: np.ndarray, *, rows: np.ndarray | None = None,
            groups: np.ndarray | None = None) -> MajorityClassifier:  # noqa: ARG002
        _, y, _ = _check_xy(X, y, rows, stream=True)
        self.p_ = float(y.mean())
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        n = np.asarray(X).shape[0]
        return np.column_stack([np.full(n, 1.0 - self.p_), np.full(n, self.p_)])


#: Classifier name -> class (``cls(seed=..., **settings)``).
CLASSIFIERS: dict[str, type] = {c.name: c for c in (MLPClassifier, XGBoostClassifier, LogisticClassifier, MajorityClassifier)}

#: ``--protocol`` presets: classifier settings laid over the defaults (``scdm``: the defaults).
#: ``scdrugmap`` is the released scDrugMap code's MLP: d-512-512-2, AdamW lr 1e-4, weight decay
#: 0.01, batch 128, 10 fixed epochs, the last epoch kept, no input scaling, BCE-with-logits;
#: its folds are random cell-level folds (set by :func:`~scdm_eval.run_evaluation`).
PROTOCOLS: dict[str, dict[str, dict[str, Any]]] = {
    "scdm": {},
    "scdrugmap": {"mlp": {"hidden": "512,512", "lr": 1e-4, "weight_decay": 0.01, "batch_size": 128, "max_epochs": 10,
                          "early_stopping": False, "keep": "last", "scale": False, "loss": "bce"}},
}


def valid_settings(name: str) -> str:
    """The fix text listing classifier ``name``'s settings (``--set NAME.KEY=VALUE``)."""
    specs = CLASSIFIERS[name].options_spec
    if not specs:
        return f"{name} takes no settings: drop --set {name}.*"
    return f"valid {name} settings (--set {name}.KEY=VALUE): " + "; ".join(s.describe() for s in specs)


def resolve_settings(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting of classifier ``name``, typed, from ``given`` (strings or values) and the defaults."""
    from scdm_embed.errors import ScdmError
    from scdm_embed.models.options import resolve_options

    given = {k: (",".join(map(str, v)) if isinstance(v, (tuple, list)) else v) for k, v in given.items()}
    try:
        return resolve_options(name, CLASSIFIERS[name].options_spec, given)
    except ScdmError as e:
        raise ScdmError(f"bad options for classifier {name!r}: {e.problem}", valid_settings(name)) from None


def parse_settings(items: list[str] | tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``["mlp.lr=1e-4", "xgboost.max_depth=4"]`` -> ``{"mlp": {"lr": "1e-4"}, "xgboost": {"max_depth": "4"}}``."""
    from scdm_embed.errors import ScdmError

    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        clf, dot, setting = key.strip().partition(".")
        if not eq or not dot or not setting:
            raise ScdmError(f"--set {item!r} is not CLASSIFIER.KEY=VALUE", "write it as e.g. --set mlp.lr=1e-4")
        if clf not in CLASSIFIERS:
            raise ScdmError(f"--set {item!r}: unknown classifier {clf!r}", f"pick from {', '.join(CLASSIFIERS)}")
        out.setdefault(clf, {})[setting.strip()] = value.strip()
    return out


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
    """Build classifier ``name`` of :data:`CLASSIFIERS` with ``seed`` and settings (typed and checked)."""
    if name not in CLASSIFIERS:
        check_classifiers([name])
    return CLASSIFIERS[name](seed=seed, **options)


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
              options: dict[str, Any], seed: int, warm_torch: bool = False, *, threads: int = 1,
              groups: np.ndarray | None = None) -> dict[str, float | str]:
    """Fit ``classifier`` on rows ``train`` of ``X`` (read in place, not copied), score rows ``test``.

    One grid task on ``threads`` cores (BLAS/OpenMP pools limited to them; a ``threads=0``
    setting becomes ``threads``). ``groups``: every row's group (as ``y``), for a grouped
    early-stopping split; the training rows' are taken here, one task at a time.
    """
    import warnings

    from threadpoolctl import threadpool_limits

    steady_heap()
    if warm_torch:
        _warm_torch()
    with threadpool_limits(limits=threads), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. lbfgs convergence notes inside workers
        return _fit_score(X, y, train, test, classifier, options, seed, threads=threads, groups=groups)


def _fit_score(X: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, classifier: str,
               options: dict[str, Any], seed: int, *, threads: int, groups: np.ndarray | None) -> dict[str, Any]:
    """:func:`fit_score` without touching process-wide state (thread limits, warning filters)."""
    options = dict(options)
    if "threads" in options and not options["threads"]:
        options["threads"] = threads
    clf = make_classifier(classifier, seed=seed, **options)
    clf.fit(X, y[train], rows=train, groups=None if groups is None else groups[train])
    proba = predict_rows(clf, X, test)
    del clf
    release_heap()
    return {**compute_metrics(y[test], proba), "proba": proba}  # proba: P(sensitive) of the test rows, in order


def concurrent_fits(classifier: str, options: Mapping[str, Any], cores: int, n_tasks: int) -> int:
    """How many fits of ``classifier`` :func:`fit_score_concurrently` runs at once on ``cores`` (1: one at a time),
    as its class's ``fits_at_once(options)`` says."""
    at_once = getattr(CLASSIFIERS[classifier], "fits_at_once", None)  # a registered class may lack it
    if cores < 2 or n_tasks < 2 or at_once is None or not at_once(options):
        return 1
    return min(cores, n_tasks)


def fit_score_concurrently(tasks: list[tuple[tuple, dict[str, Any]]], fits: int, threads: int,
                           advance=lambda: None) -> list[dict[str, Any]]:
    """:func:`fit_score` of each ``(args, kwargs)`` task, ``fits`` at a time in threads of this process.

    Each fit runs on ``threads`` cores (its classifier's ``threads`` setting); the process-wide
    state (BLAS/OpenMP and torch thread counts, warning filters) is set once for all of them,
    and networks are initialised one at a time from their seeds, so every result equals the same
    task's :func:`fit_score` on ``threads`` cores. Results in task order.
    """
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    def one(task: tuple[tuple, dict[str, Any]]) -> dict[str, Any]:
        (X, y, train, test, classifier, options, seed, *_), kw = task
        return _fit_score(X, y, train, test, classifier, options, seed, threads=threads, **kw)

    steady_heap()
    out = []
    with threadpool_limits(limits=threads), _torch_threads(threads), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with ThreadPoolExecutor(max_workers=fits, thread_name_prefix="scdm-fit") as pool:
            for r in pool.map(one, tasks):
                out.append(r)
                advance()
    return out


def predict_rows(clf: Classifier, X: np.ndarray, rows: np.ndarray, chunk: int = _CHUNK // 8) -> np.ndarray:
    """P(sensitive) of rows ``rows`` of ``X``, gathered ``chunk`` rows at a time (``X[rows]`` is never copied whole)."""
    rows = np.asarray(rows, dtype=np.int64)
    out = [clf.predict_proba(_gather(X, rows[a:a + chunk]))[:, 1] for a in range(0, len(rows), chunk)]
    return np.concatenate(out) if out else np.empty(0)


def _libc() -> Any:
    """glibc, for its allocator's controls (None elsewhere: musl, macOS, Windows)."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


def release_heap() -> None:
    """Give the C heap's freed pages back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    Between grid tasks: glibc's adaptive mmap threshold keeps the freed buffers of a fit (batches,
    prediction chunks) in the heap, and the grid's resident memory would creep up fit by fit.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


#: glibc's mmap threshold while a grid runs (``mallopt(M_MMAP_THRESHOLD)``, see :func:`steady_heap`)
MMAP_THRESHOLD = 1 << 20


def steady_heap() -> None:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` for this process (once; a no-op elsewhere).

    glibc raises the threshold after each large block freed (up to 32 MB; the trim threshold
    follows at twice that), and from then on serves blocks that size from its heaps, whose freed
    tops it keeps: a worker thread's arena (xgboost's OpenMP threads, the store's readers) is
    never trimmed, not even by ``malloc_trim``. A grid's quantised matrices, histograms and
    batches are such blocks, so its peak RSS grew by a few MB per fit thread. With the thresholds
    fixed, blocks of 1 MiB or more are mapped and unmapped on their own, and heap tops over 2 MiB
    are trimmed. Set ``SCDM_MALLOC_TUNING=0`` to leave the allocator as it is.
    """
    global _STEADY
    if _STEADY or os.environ.get("SCDM_MALLOC_TUNING", "1") == "0":
        return
    libc = _libc()
    if libc is not None:  # malloc.h: M_MMAP_THRESHOLD -3, M_TRIM_THRESHOLD -1 (each fixed stops its adapting)
        libc.mallopt(-3, MMAP_THRESHOLD)
        libc.mallopt(-1, 2 * MMAP_THRESHOLD)  # glibc's own ratio; an earlier 16 MB block had raised it to 32 MB
    _STEADY = True


_LIBC: Any = None
_STEADY = False
