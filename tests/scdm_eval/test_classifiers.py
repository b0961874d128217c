"""Classifiers: one interface, seeded determinism, better than chance on separable data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from scdm_embed.errors import ScdmError
from scdm_eval import CLASSIFIERS, Classifier, make_classifier
from scdm_eval._classifiers import row_runs
from tests.scdm_eval.conftest import FAST


@pytest.fixture(scope="module")
def data():
    """Two overlapping Gaussian classes in 20 dims (signal in 3 of them); train and test."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    X = rng.normal(size=(400, 20)).astype(np.float32)
    X[:, :3] += 1.6 * y[:, None]
    return X[:300], y[:300], X[300:], y[300:]


def test_registry():
    assert {"mlp", "xgboost", "logreg", "majority"} <= set(CLASSIFIERS)


@pytest.mark.parametrize("name", ["mlp", "xgboost", "logreg", "majority"])
def test_interface_determinism_and_skill(name, data):
    Xtr, ytr, Xte, yte = data
    a = make_classifier(name, seed=3, **FAST.get(name, {}))
    assert isinstance(a, Classifier)
    pa = a.fit(Xtr, ytr).predict_proba(Xte)
    pb = make_classifier(name, seed=3, **FAST.get(name, {})).fit(Xtr, ytr).predict_proba(Xte)
    assert pa.shape == (len(Xte), 2)
    np.testing.assert_allclose(pa.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(pa, pb)  # same seed, same numbers
    auroc = roc_auc_score(yte, pa[:, 1])
    if name == "majority":
        assert auroc == 0.5 and np.allclose(pa[:, 1], ytr.mean())
    else:
        assert auroc > 0.85, auroc


def test_mlp_architecture_early_stopping_and_seed(data):
    Xtr, ytr, Xte, _ = data
    threads = torch.get_num_threads()
    state = torch.random.get_rng_state()
    m = make_classifier("mlp", seed=0, max_epochs=200, patience=3).fit(Xtr, ytr)
    shapes = [tuple(p.shape) for n, p in m.net_.named_parameters() if n.endswith("weight")]
    assert shapes == [(512, 20), (512, 512), (2, 512)]  # the paper's d -> 512 -> 512 -> 2
    assert m.n_epochs_ < 200 and 1 <= m.best_epoch_ <= m.n_epochs_  # stopped early on validation loss
    assert torch.get_num_threads() == threads  # thread setting restored
    assert torch.equal(torch.random.get_rng_state(), state)  # the global torch RNG is untouched
    other = make_classifier("mlp", seed=1, **FAST["mlp"]).fit(Xtr, ytr).predict_proba(Xte)
    same = make_classifier("mlp", seed=0, **FAST["mlp"]).fit(Xtr, ytr).predict_proba(Xte)
    assert not np.array_equal(other, same)


def test_mlp_without_room_for_a_validation_split_trains_all_epochs():
    X = np.array([[0.0], [1.0], [0.1], [0.9]], dtype=np.float32)
    m = make_classifier("mlp", seed=0, max_epochs=3, hidden=(4,)).fit(X, np.array([0, 1, 0, 1]))
    assert m.n_epochs_ == 3 and m.best_epoch_ is None


@pytest.mark.parametrize("name", ["mlp", "xgboost", "logreg", "majority"])
def test_single_class_training_is_refused(name):
    with pytest.raises(ValueError, match="single class"):
        make_classifier(name, **FAST.get(name, {})).fit(np.zeros((5, 2)), np.ones(5))


def test_bad_names_and_options():
    with pytest.raises(ScdmError, match="unknown classifier 'svm'") as e:
        make_classifier("svm")
    assert "mlp" in e.value.fix
    with pytest.raises(ScdmError, match="bad options for classifier 'logreg'"):
        make_classifier("logreg", n_layers=3)


# -- settings, presets, early stopping (E1) ---------------------------------------------------
from scdm_eval._classifiers import PROTOCOLS, parse_settings, resolve_settings, validation_split  # noqa: E402


def test_scdrugmap_preset_builds_the_released_mlp(data):
    Xtr, ytr, Xte, _ = data
    m = make_classifier("mlp", seed=0, **PROTOCOLS["scdrugmap"]["mlp"]).fit(Xtr, ytr)
    shapes = [tuple(p.shape) for n, p in m.net_.named_parameters() if n.endswith("weight")]
    assert shapes == [(512, 20), (512, 512), (2, 512)]
    assert m.n_epochs_ == 10 and m.best_epoch_ is None and m.n_val_ == 0  # 10 fixed epochs, every cell trains
    assert type(m.optimizer_).__name__ == "AdamW"
    group = m.optimizer_.param_groups[0]
    assert group["lr"] == 1e-4 and group["weight_decay"] == 0.01
    assert m.batch_size == 128 and m.keep == "last" and m.loss == "bce"
    assert not m.mean_.any() and (m.scale_ == 1).all()  # no input scaling
    with torch.no_grad():
        z = m.net_(torch.from_numpy(Xte))
    np.testing.assert_allclose(m.predict_proba(Xte)[:, 1], torch.sigmoid(z[:, 1]).double().numpy(), rtol=0, atol=1e-12)


def test_settings_are_typed_and_refused_when_wrong():
    s = resolve_settings("mlp", {"lr": "1e-4", "hidden": (64, 32), "early_stopping": "false"})
    assert s["lr"] == 1e-4 and isinstance(s["lr"], float) and s["hidden"] == "64,32" and s["early_stopping"] is False
    assert s["max_epochs"] == 100  # every setting, defaults filled in
    assert make_classifier("mlp", hidden="64,32").layers == (64, 32)
    assert resolve_settings("xgboost", {"max_depth": "4"})["max_depth"] == 4
    with pytest.raises(ScdmError, match="bad options for classifier 'mlp'.*'epochs'") as e:
        resolve_settings("mlp", {"epochs": 3})
    assert "max_epochs (int, default 100)" in e.value.fix and "--set mlp.KEY=VALUE" in e.value.fix
    for bad in ({"lr": "fast"}, {"lr": -1}, {"batch_size": 0}, {"keep": "middle"}, {"hidden": "512,x"}):
        with pytest.raises(ScdmError, match="bad options for classifier 'mlp'"):
            resolve_settings("mlp", bad)
    assert parse_settings(["mlp.lr=1e-4", "xgboost.max_depth = 4"]) == {"mlp": {"lr": "1e-4"}, "xgboost": {"max_depth": "4"}}
    for bad in ("mlp.lr", "lr=1", "svm.C=1"):
        with pytest.raises(ScdmError, match="--set"):
            parse_settings([bad])


def test_grouped_validation_split_holds_out_whole_groups():
    rng = np.random.default_rng(0)
    groups = np.repeat([f"s{i}" for i in range(10)], 20)
    y = np.repeat(np.arange(10) % 2, 20)
    tr, va = validation_split(y, groups, 0.2, seed=rng.integers(100))
    assert len(va) and not set(groups[tr]) & set(groups[va]) and len(tr) + len(va) == len(y)
    tr, va = validation_split(y, groups, 0.2, seed=0, cap=7)
    assert len(va) == 7 and not set(groups[tr]) & set(groups[va])  # capped, the held-out groups still not trained on


@pytest.mark.parametrize("name", ["mlp", "xgboost"])
def test_early_stopping_never_reads_test_cells(name, data):
    """A fit on rows ``train`` of a matrix whose other rows are garbage equals the fit on ``X[train]`` alone."""
    Xtr, ytr, Xte, _ = data
    groups = np.repeat(np.arange(30), 10)
    opts = {"mlp": {"max_epochs": 60, "hidden": (64, 64), "lr": 1e-2, "patience": 2, "val_fraction": 0.2},
            "xgboost": {"n_estimators": 200, "max_depth": 3, "early_stopping": True, "early_stopping_rounds": 3,
                        "val_fraction": 0.2}}[name]
    full = np.concatenate([np.full((50, Xtr.shape[1]), 1e6, np.float32), Xtr, np.full((50, Xtr.shape[1]), -1e6, np.float32)])
    rows = np.arange(50, 350)
    a = make_classifier(name, seed=1, **opts).fit(full, ytr, rows=rows, groups=groups)
    b = make_classifier(name, seed=1, **opts).fit(Xtr, ytr, groups=groups)
    np.testing.assert_array_equal(a.predict_proba(Xte), b.predict_proba(Xte))
    assert a.n_val_ > 0 and a.n_train_ + a.n_val_ <= 300
    if name == "xgboost":
        assert a.best_round_ < a.n_rounds_ <= 200  # stopped early, predicts with the best round
    else:
        assert a.n_epochs_ < 60 and a.best_epoch_ is not None


@pytest.mark.parametrize("share", [0.4, 0.8, 1.0, "blocks"])
def test_logreg_fitted_in_place_equals_sklearn_on_a_standardised_copy(share):
    """The in-place fit (rows read from X, standardisation folded into the weights) = sklearn's lbfgs on a copy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(4)
    X = (rng.normal(size=(600, 30)) * rng.uniform(0.2, 5, 30) + rng.normal(size=30) * 3).astype(np.float32)
    z = X[:, :4] @ rng.normal(size=4) + rng.normal(size=600)
    y = (z > np.median(z)).astype(int)
    if share == "blocks":  # two studies' worth of consecutive rows: read as views
        rows = np.r_[0:280, 320:600]
        assert row_runs(rows) == [(0, 280), (320, 600)]
    else:  # scattered: gathered once (0.4) or passes over all of X (0.8, 1.0 is one block)
        rows = np.sort(rng.choice(600, int(share * 600), replace=False))
    mine = make_classifier("logreg", C=0.5).fit(X, y[rows], rows=rows)
    sc = StandardScaler().fit(X[rows])
    ref = LogisticRegression(C=0.5, max_iter=2000).fit(sc.transform(X[rows]), y[rows])
    np.testing.assert_allclose(mine.model_[-1].coef_, ref.coef_, atol=2e-4)  # both stop at gtol 1e-4
    np.testing.assert_allclose(mine.predict_proba(X)[:, 1], ref.predict_proba(sc.transform(X))[:, 1], atol=2e-4)


def test_row_runs_finds_consecutive_blocks_and_refuses_short_or_unordered_ones():
    assert row_runs(np.arange(10, 20), min_run=5) == [(10, 20)]
    assert row_runs(np.r_[0:6, 9:15, 20:26], min_run=5) == [(0, 6), (9, 15), (20, 26)]
    assert row_runs(np.r_[0:6, 9:15, 20:26], min_run=7) is None  # blocks of 6 rows: too short
    assert row_runs(np.r_[9:15, 0:6], min_run=5) is None  # not increasing
    assert row_runs(np.array([3, 3, 4, 5]), min_run=1) is None  # repeated
    assert row_runs(np.array([], dtype=np.int64)) == []


def test_min_delta_counts_tiny_improvements_as_none(data):
    """Early stopping: a validation loss must drop by more than min_delta to count as better."""
    Xtr, ytr, _, _ = data
    opts = {"max_epochs": 40, "hidden": (32,), "patience": 2}
    strict = make_classifier("mlp", seed=0, min_delta=10.0, **opts).fit(Xtr, ytr)
    assert strict.n_epochs_ == 1 + 2 and strict.best_epoch_ == 1  # nothing after epoch 1 counts
    loose = make_classifier("mlp", seed=0, min_delta=0.0, **opts).fit(Xtr, ytr)
    assert loose.n_epochs_ > strict.n_epochs_


def test_xgboost_default_boosts_every_round_on_all_training_cells(data):
    Xtr, ytr, _, _ = data
    m = make_classifier("xgboost", seed=0, n_estimators=7).fit(Xtr, ytr)
    assert m.n_rounds_ == m.best_round_ == 7 and m.n_val_ == 0 and m.n_train_ == len(ytr)


def test_xgboost_small_histogram_cache_grows_the_same_trees(data):
    """``max_cached_hist_node`` trades time for memory only: the predictions stay the same."""
    Xtr, ytr, Xte, _ = data
    full = make_classifier("xgboost", seed=0, n_estimators=15).fit(Xtr, ytr).predict_proba(Xte)
    small = make_classifier("xgboost", seed=0, n_estimators=15, max_cached_hist_node=2).fit(Xtr, ytr).predict_proba(Xte)
    np.testing.assert_array_equal(small, full)


def test_xgboost_splits_at_the_quantiles_of_its_training_cells(data):
    """Default bins: the j/32 quantiles of each feature over the training cells (all 300 of them
    here, fewer than the 4,096 sampled), so every split of every tree sits on one of them."""
    Xtr, ytr, _, _ = data
    m = make_classifier("xgboost", seed=0, n_estimators=20).fit(Xtr, ytr)
    edges = np.quantile(Xtr.astype(np.float64), np.arange(32) / 32, axis=0)
    trees = m.model_.trees_to_dataframe()
    splits = trees[trees["Feature"] != "Leaf"]
    assert len(splits) > 20
    for feature, value in zip(splits["Feature"], splits["Split"], strict=True):
        assert np.isclose(edges[1:, int(feature[1:])], value, rtol=1e-6, atol=0).any(), (feature, value)


def test_xgboost_bin_edges_from_a_sample_of_the_training_cells(data):
    Xtr, ytr, Xte, yte = data

    def proba(**kw):
        return make_classifier("xgboost", seed=0, n_estimators=20, **kw).fit(Xtr, ytr).predict_proba(Xte)[:, 1]

    every = proba(sketch_rows=0)  # xgboost's own sketch of every training cell
    assert roc_auc_score(yte, proba()) > 0.85
    sampled = proba(sketch_rows=64)
    assert not np.array_equal(sampled, every)  # other bin edges, other trees
    np.testing.assert_array_equal(proba(sketch_rows=64), sampled)  # the sample is seeded
    assert roc_auc_score(yte, sampled) > 0.85


@pytest.mark.parametrize("name", ["mlp", "xgboost", "logreg"])
def test_chunked_prediction_of_rows_equals_one_call(name, data):
    from scdm_eval._classifiers import predict_rows

    Xtr, ytr, Xte, _ = data
    m = make_classifier(name, seed=0, **FAST.get(name, {})).fit(Xtr, ytr)
    rows = np.array([5, 3, 99, 0, 42, 17, 64])
    np.testing.assert_allclose(predict_rows(m, Xte, rows, chunk=3), m.predict_proba(Xte[rows])[:, 1], rtol=0, atol=1e-6)


def test_mlp_device_auto_uses_a_gpu_when_present_and_cuda_without_one_is_refused(data):
    Xtr, ytr, Xte, _ = data
    auto = make_classifier("mlp", seed=0, **FAST["mlp"]).fit(Xtr, ytr)
    assert auto.torch_device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():  # the same weights at start; GPU GEMMs round differently
        cpu = make_classifier("mlp", seed=0, device="cpu", **FAST["mlp"]).fit(Xtr, ytr)
        np.testing.assert_allclose(auto.predict_proba(Xte), cpu.predict_proba(Xte), atol=1e-2)
    else:
        with pytest.raises(ScdmError, match="CUDA"):
            make_classifier("mlp", device="cuda")


def test_mlp_training_leaves_denormals_as_they_were(data):
    """Training flushes denormals to zero for speed; afterwards torch computes with them again."""
    Xtr, ytr, _, _ = data
    make_classifier("mlp", seed=0, **FAST["mlp"]).fit(Xtr, ytr)
    tiny = torch.tensor([1e-39], dtype=torch.float32)
    assert float((tiny * 1.0).item()) != 0.0


def test_concurrent_mlp_fits_equal_the_same_fits_one_at_a_time(data):
    """Fits in threads of one process (the grid's MLP default) give each task's own result, bit for bit."""
    from scdm_eval._classifiers import concurrent_fits, fit_score, fit_score_concurrently

    Xtr, ytr, Xte, yte = data
    X, y = np.concatenate([Xtr, Xte]), np.concatenate([ytr, yte])
    opts = {**FAST["mlp"], "threads": 1}
    tasks = [((X, y, np.setdiff1d(np.arange(400), t), t, "mlp", opts, seed), {"groups": None})
             for seed, t in enumerate(np.array_split(np.arange(400), 4))]
    alone = [fit_score(*args, threads=1, **kw) for args, kw in tasks]
    together = fit_score_concurrently(tasks, fits=4, threads=1)
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_array_equal(a["proba"], b["proba"])
    assert concurrent_fits("mlp", {"threads": 0, "device": "cpu"}, cores=4, n_tasks=10) == 4
    assert concurrent_fits("mlp", {"threads": 0, "device": "cpu"}, cores=4, n_tasks=3) == 3
    assert concurrent_fits("mlp", {"threads": 2, "device": "cpu"}, cores=4, n_tasks=10) == 1  # the user's choice
    for one_at_a_time in ("xgboost", "logreg", "majority"):
        assert concurrent_fits(one_at_a_time, {"threads": 0}, cores=4, n_tasks=10) == 1
    assert concurrent_fits("mlp", {"threads": 0, "device": "auto"}, cores=4, n_tasks=10) == (
        1 if torch.cuda.is_available() else 4)  # a GPU runs its fits one at a time
    assert concurrent_fits("mlp", {"threads": 0, "device": "cpu"}, cores=1, n_tasks=10) == 1


@pytest.mark.parametrize("loss", ["ce", "bce"])
@pytest.mark.parametrize("hidden", ["64,32", "8"])
def test_buffered_training_step_gives_autograds_logits_and_gradients(loss, hidden):
    """The MLP's step (buffers made once, no autograd) against autograd on the same network and cells."""
    from scdm_eval._mlp_step import StackStep

    clf = make_classifier("mlp", seed=0, hidden=hidden, loss=loss)
    torch.manual_seed(0)
    net = clf._net(20)
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 20)).astype(np.float32), torch.from_numpy(rng.integers(0, 2, 60))
    rows = rng.permutation(60)[:37]  # fewer cells than the buffers hold, in no order
    mean, scale = torch.from_numpy(X.mean(0)), torch.from_numpy(X.std(0) + 0.5)
    step = StackStep(net, 40, loss, torch.device("cpu"))
    with torch.no_grad():
        n = step.load(X, rows, mean, scale)
        z = step.forward(n).clone()
        step.backward(n, y[rows])
    mine = [p.grad.clone() for p in net.parameters()]
    for p in net.parameters():
        p.grad = None
    logits = net((torch.from_numpy(X[rows]) - mean) / scale)
    clf._loss(logits, y[rows]).backward()
    np.testing.assert_allclose(z.numpy(), logits.detach().numpy(), rtol=0, atol=1e-6)
    for a, p in zip(mine, net.parameters(), strict=True):
        np.testing.assert_allclose(a.numpy(), p.grad.numpy(), rtol=1e-5, atol=1e-7 * float(p.grad.abs().max()))


@pytest.mark.parametrize("name", ["mlp", "xgboost", "logreg"])
def test_training_rows_outside_the_matrix_are_refused(name, data):
    Xtr, ytr, _, _ = data
    with pytest.raises(ValueError, match="rows must lie in"):
        make_classifier(name, **FAST.get(name, {})).fit(Xtr, ytr[:10], rows=np.r_[np.arange(9), len(Xtr)])
