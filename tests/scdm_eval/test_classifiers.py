"""Classifiers: one interface, seeded determinism, better than chance on separable data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from scdm_embed.errors import ScdmError
from scdm_eval import CLASSIFIERS, Classifier, make_classifier
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
