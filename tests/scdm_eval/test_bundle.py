"""Saved classifiers: fit -> bundle (no pickle) -> predict, provenance checks, refusals."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

import scdm_eval
from scdm_embed.errors import ScdmError
from scdm_embed.store import EmbeddingStore
from scdm_embed.testing import synthetic_cohort
from scdm_eval import make_classifier
from scdm_eval._bundle import FILES
from scdm_eval.cli import app
from tests._cli import assert_refused
from tests.scdm_eval.conftest import FAST

#: a reloaded bundle runs the same arrays through the same code: probabilities agree to 1e-9
#: (in practice bit for bit; the tolerance only allows for a different BLAS kernel choice)
TOL = 1e-9
runner = CliRunner()


def _memory_proba(store: Path, model: str, classifier: str, settings: dict) -> tuple[np.ndarray, pd.DataFrame]:
    """The classifier fitted in memory on every cell of the store, its P(sensitive) of every cell."""
    X, cells = EmbeddingStore(store).load(model)
    clf = make_classifier(classifier, seed=0, **settings)
    clf.fit(X, cells["label"].to_numpy(), groups=cells["sample"].astype(str).to_numpy())
    return clf.predict_proba(X)[:, 1], cells


@pytest.mark.parametrize("classifier", ["logreg", "xgboost", "mlp", "majority"])
def test_fit_then_predict_reproduces_the_in_memory_model(cohort_store, tmp_path, classifier):
    settings = FAST.get(classifier, {})
    sets = [f"--set={k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in settings.items()]
    bundle = tmp_path / "b"
    r = runner.invoke(app, ["fit", "--store", str(cohort_store), "--model", "pca", "--classifier", classifier,
                            "--out", str(bundle), *sets])
    assert r.exit_code == 0, r.output
    want, cells = _memory_proba(cohort_store, "pca", classifier, settings)
    for ds in ("cohortA", "cohortB"):
        out = tmp_path / f"{ds}.parquet"
        r = runner.invoke(app, ["predict", "--bundle", str(bundle), "--store", str(cohort_store), "--dataset", ds,
                                "--out", str(out)])
        assert r.exit_code == 0, r.output
        got = pd.read_parquet(out)
        mine = cells[cells["dataset"] == ds]
        assert list(got["cell_id"]) == [k.split("/", 1)[1] for k in mine.index]
        assert (got["y_true"].to_numpy() == mine["label"].to_numpy()).all()
        assert (got["sample"].astype(str).to_numpy() == mine["sample"].to_numpy()).all()
        np.testing.assert_allclose(got["p_sensitive"].to_numpy(), want[(cells["dataset"] == ds).to_numpy()],
                                   rtol=0, atol=TOL)
        assert ((got["predicted"] == "sensitive") == (got["p_sensitive"] >= 0.5)).all()
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["classifier"] == classifier and meta["provenance"]["model"] == "pca"
    assert meta["provenance"]["dim"] == 12 and meta["training"]["n_cells"] == 720
    assert set(meta["provenance"]["datasets"]) == {"cohortA", "cohortB"}


def test_a_bundle_holds_no_pickle(cohort_store, tmp_path):
    for c in ("mlp", "logreg", "xgboost"):
        b = scdm_eval.fit_classifier(cohort_store, model="pca", classifier=c, out=tmp_path / c,
                                     settings=FAST.get(c, {}))
        names = sorted(p.name for p in b.path.iterdir())
        assert set(names) <= set(FILES) and "bundle.json" in names, names
        expected = {"mlp": {"weights.safetensors", "scaler.safetensors"},
                    "logreg": {"weights.safetensors", "scaler.safetensors"}, "xgboost": {"model.ubj"}}[c]
        assert set(names) - {"bundle.json"} == expected
        for p in b.path.iterdir():
            head = p.read_bytes()[:4]
            assert head[:1] != b"\x80", f"{p.name} starts with a pickle protocol opcode"
            assert head != b"PK\x03\x04", f"{p.name} is a zip (torch.save) archive"
            if p.suffix == ".safetensors":
                assert load_file(p)  # plain tensors, readable without code
            elif p.suffix == ".json":
                json.loads(p.read_text())
        if c == "logreg":
            w = load_file(b.path / "weights.safetensors")
            assert w["coef"].shape == (1, 12) and w["intercept"].shape == (1,)


def test_tampered_provenance_or_another_embedding_is_refused(cohort_store, tmp_path):
    bundle = tmp_path / "b"
    scdm_eval.fit_classifier(cohort_store, model="pca", classifier="logreg", out=bundle)
    args = ["predict", "--bundle", str(bundle), "--store", str(cohort_store), "--dataset", "cohortA",
            "--out", str(tmp_path / "p.parquet")]
    assert runner.invoke(app, args).exit_code == 0
    # another embedding under the bundle's model name: other width and settings
    st = EmbeddingStore(cohort_store, mode="a")
    X, cells = st.load("sig", datasets=["cohortA"])
    st.put_dataset("other", cells.drop(columns=["dataset", "row"]).set_axis(
        [k.split("/", 1)[1] for k in cells.index]).rename_axis("cell_id"), input_hash="synthetic-other")
    st.put_embedding("pca", "other", X, settings={"pooling": "cls"})
    r = runner.invoke(app, [*args[:-4], "--dataset", "other", "--out", str(tmp_path / "o.parquet")])
    assert_refused(r, "settings", "dim", "not computed like")
    assert not (tmp_path / "o.parquet").exists()
    # a bundle whose recorded provenance was edited (another checkpoint)
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["provenance"]["checkpoint_hash"] = "sha256:" + "0" * 64
    (bundle / "bundle.json").write_text(json.dumps(meta))
    assert_refused(runner.invoke(app, args), "checkpoint_hash")
    # the API twin refuses with the same ScdmError
    with pytest.raises(ScdmError, match="checkpoint_hash"):
        scdm_eval.predict(bundle, cohort_store, dataset="cohortA")


def test_changed_weights_or_foreign_files_are_refused(cohort_store, tmp_path):
    bundle = tmp_path / "b"
    scdm_eval.fit_classifier(cohort_store, model="pca", classifier="logreg", out=bundle)
    args = ["predict", "--bundle", str(bundle), "--store", str(cohort_store), "--dataset", "cohortA",
            "--out", str(tmp_path / "p.parquet")]
    (bundle / "extra.pkl").write_bytes(b"\x80\x04N.")
    assert_refused(runner.invoke(app, args), "extra.pkl")
    (bundle / "extra.pkl").unlink()
    w = dict(load_file(bundle / "weights.safetensors"))
    w["coef"] = w["coef"] * 2
    from safetensors.numpy import save_file

    save_file(w, str(bundle / "weights.safetensors"))
    assert_refused(runner.invoke(app, args), "weights.safetensors", "changed")


def test_bad_arguments_exit_2(cohort_store, tmp_path):
    s = str(cohort_store)
    fit = ["fit", "--store", s, "--model", "pca", "--out"]
    assert_refused(runner.invoke(app, [*fit, str(tmp_path / "a"), "--category", "lung"]), "--by")
    assert_refused(runner.invoke(app, [*fit, str(tmp_path / "a"), "--by", "tissue"]), "--category", "lung")
    assert_refused(runner.invoke(app, [*fit, str(tmp_path / "a"), "--by", "tissue", "--category", "liver"]), "liver")
    assert_refused(runner.invoke(app, [*fit, str(tmp_path / "a"), "--classifier", "svm"]), "svm")
    assert_refused(runner.invoke(app, [*fit, str(tmp_path / "a"), "--set", "depth=3"]), "depth")
    assert_refused(runner.invoke(app, [*fit, str(tmp_path / "a"), "--set", "mlp.lr=1e-4"]), "mlp")
    assert_refused(runner.invoke(app, [*fit, str(tmp_path / "a"), "--classifier", "xgboost",
                                       "--set", "xgboost.sketch_rows=-5"]), "sketch_rows")
    assert_refused(runner.invoke(app, ["fit", "--store", s, "--model", "scgpt", "--out", str(tmp_path / "a")]), "scgpt")
    assert_refused(runner.invoke(app, [*fit, str(tmp_path / "a"), "--dataset", "nope"]), "nope")
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    assert_refused(runner.invoke(app, [*fit, str(afile)]), "is a file")
    assert not (tmp_path / "a").exists()
    # one category of one class only cannot train a classifier
    ok = runner.invoke(app, [*fit, str(tmp_path / "lung"), "--by", "tissue", "--category", "lung"])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "lung" / "bundle.json").read_text())["training"]["n_cells"] == 360
    assert_refused(runner.invoke(app, [*fit, str(tmp_path / "lung"), "--by", "tissue", "--category", "lung"]),
                   "--overwrite")
    pred = ["predict", "--bundle", str(tmp_path / "lung"), "--out", str(tmp_path / "p.parquet")]
    assert_refused(runner.invoke(app, pred), "--dataset")
    assert_refused(runner.invoke(app, [*pred, "--store", s, "--dataset", "zzz"]), "zzz")
    assert_refused(runner.invoke(app, [*pred[:-2], "--out", str(tmp_path / "p.txt"), "--store", s, "--dataset",
                                       "cohortA"]), ".parquet")
    assert_refused(runner.invoke(app, ["predict", "--bundle", str(tmp_path), "--store", s, "--dataset", "cohortA",
                                       "--out", str(tmp_path / "p.parquet")]), "bundle.json")
    assert_refused(runner.invoke(app, [*pred, "--input", str(tmp_path / "missing.h5ad")]), "missing.h5ad")
    assert not (tmp_path / "p.parquet").exists()


@pytest.fixture(scope="module")
def pca_store(tmp_path_factory):
    """A real `scdm-embed extract` of a small cohort with pca, plus an unlabelled copy of its cells."""
    import scdm_embed as se

    root = tmp_path_factory.mktemp("real")
    a = synthetic_cohort(n_studies=2, samples_per_study=6, cells_per_sample=15, n_genes=200, seed=1)
    a.write_h5ad(root / "train.h5ad")
    new = a.copy()
    del new.obs["response"]
    new.write_h5ad(root / "new.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        se.extract(root / "train.h5ad", model="pca", store=root / "s.zarr",
                   meta_keys={"study": "study", "sample": "sample"}, progress=False, model_options={"n_comps": 10})
    return root


def test_predict_input_embeds_first_and_checks_the_fit(pca_store, tmp_path):
    import shutil

    root = tmp_path / "r"
    shutil.copytree(pca_store, root)
    store, bundle = root / "s.zarr", root / "b"
    b = scdm_eval.fit_classifier(store, model="pca", classifier="logreg", out=bundle)
    assert b.meta["provenance"]["checkpoint_hash"].startswith("sha256:")  # the store's pca fit
    assert b.meta["provenance"]["options"]["n_comps"] == 10
    ref = scdm_eval.predict(bundle, store, dataset="train")
    r = runner.invoke(app, ["predict", "--bundle", str(bundle), "--input", str(root / "new.h5ad"), "--store", str(store),
                            "--out", str(root / "new.parquet")])
    assert r.exit_code == 0, r.output
    got = pd.read_parquet(root / "new.parquet")
    assert (got["y_true"] == -1).all() and list(got["cell_id"]) == list(ref["cell_id"])
    np.testing.assert_allclose(got["p_sensitive"], ref["p_sensitive"], rtol=0, atol=1e-6)  # same cells, same fit
    # without the training store, pca fits new coordinates: another provenance, refused
    r = runner.invoke(app, ["predict", "--bundle", str(bundle), "--input", str(root / "new.h5ad"),
                            "--out", str(root / "tmp.parquet")])
    assert_refused(r, "not computed like", "settings.reference.fitted_on", "--store")
    assert not (root / "tmp.parquet").exists()
