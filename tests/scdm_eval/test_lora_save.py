"""Saved LoRA fits: bundles per fold (and --final), `scdm-eval predict` with them, resume after a kill.

tGPT (tiny fixture checkpoint) on 60 real PC9 cells, 3 folds, driven through the CLI as a user types it.
"""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from scdm_embed.models.base import hash_path
from scdm_eval import run_lora
from scdm_eval._bundle import PREDICT_COLUMNS
from scdm_eval.cli import app
from tests._cli import assert_refused
from tests.scdm_eval.test_lora_stage import DS, _subset, make_lora_store

pytestmark = [pytest.mark.filterwarnings("ignore::scdm_eval.LeakageWarning"),
              pytest.mark.filterwarnings("ignore:fan_in_fan_out:UserWarning")]
runner = CliRunner()
LORA = ["--model", "tgpt", "--folds", "3", "--epochs", "1", "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def tgpt_ckpt(fixtures_dir):
    return fixtures_dir / "tgpt" / "checkpoint"


@pytest.fixture(scope="module")
def cells_h5ad(tmp_path_factory, pc9_path):
    return _subset(pc9_path, tmp_path_factory.mktemp("lora") / f"{DS}.h5ad", 0)


@pytest.fixture(scope="module")
def lora_store(tmp_path_factory, cells_h5ad, tgpt_ckpt):
    return make_lora_store(tmp_path_factory.mktemp("lora_store") / "s.zarr", cells_h5ad, tgpt_ckpt)


def _lora(store, out, *extra):
    return runner.invoke(app, ["lora", "--store", str(store), "--out", str(out), *LORA, *extra])


@pytest.fixture(scope="module")
def trained(lora_store, tmp_path_factory):
    """One LoRA run over the 3 folds, with --final, into a fresh --out."""
    out = tmp_path_factory.mktemp("lora_out")
    r = _lora(lora_store, out, "--final")
    assert r.exit_code == 0, r.output
    return out


def _fold(out, k="fold-0"):
    return out / "lora" / "tgpt" / "lora-r8" / "all" / k


def test_every_fit_is_saved_with_its_manifest(trained, tgpt_ckpt):
    for k in ("fold-0", "fold-1", "fold-2", "final"):
        folder = _fold(trained, k)
        names = {p.name for p in folder.iterdir()}
        want = {"bundle.json", "adapter_config.json", "adapter_model.safetensors", "head.safetensors"}
        assert want <= names and (("test_proba.safetensors" in names) == (k != "final")), (k, names)
        meta = json.loads((folder / "bundle.json").read_text())
        assert meta["format"] == "scdm-lora-bundle" and meta["model"] == "tgpt" and meta["classifier"] == "lora-r8"
        assert meta["checkpoint_hash"] == hash_path(tgpt_ckpt)
        assert meta["lora"] == {"r": 8, "alpha": 8.0, "dropout": 0.05, "targets": ["c_attn"]}
        assert meta["head"] == {"kind": "mlp", "layers": [64, 512, 512, 2]}
        assert meta["model_options"] == {"max_len": None, "tokenizer": None}
        assert set(meta["gene_plans"]) == {DS} and len(meta["gene_plans"][DS]["sha256"]) == 64
        assert meta["training"]["epochs"] == 1 and meta["training"]["run_seed"] == 0
        assert isinstance(meta["training"]["seed"], int)
        assert meta["telemetry"]["cells_per_s"] > 0 and meta["telemetry"]["device"] == "cpu"
        cfg = json.loads((folder / "adapter_config.json").read_text())  # the PEFT adapter layout
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["target_modules"] == ["c_attn"]
    final = json.loads((_fold(trained, "final") / "bundle.json").read_text())["partition"]
    assert final["fold"] is None and final["n_train"] == 60 and final["n_test"] == 0


def test_save_load_predict_gives_identical_probabilities(trained, cells_h5ad, tgpt_ckpt, tmp_path):
    preds = pd.read_parquet(trained / "lora_predictions.parquet")
    for k in (0, 1):
        out = tmp_path / f"p{k}.parquet"
        r = runner.invoke(app, ["predict", "--bundle", str(_fold(trained, f"fold-{k}")), "--input", str(cells_h5ad),
                                "--checkpoint", str(tgpt_ckpt), "--out", str(out)])
        assert r.exit_code == 0, r.output
        res = pd.read_parquet(out)
        assert list(res.columns) == list(PREDICT_COLUMNS) and len(res) == 60
        assert set(res["classifier"]) == {"lora-r8"} and set(res["model"]) == {"tgpt"}
        fold = preds[preds["fold"] == k].set_index("cell_id")
        got = res.set_index("cell_id").loc[fold.index]
        np.testing.assert_allclose(got["p_sensitive"].to_numpy(), fold["p_sensitive"].to_numpy(), rtol=0, atol=1e-6)
        assert (got["y_true"].to_numpy() == fold["y_true"].to_numpy()).all()
    # the checkpoint defaults to the recorded one; the final fit predicts too
    r = runner.invoke(app, ["predict", "--bundle", str(_fold(trained, "final")), "--input", str(cells_h5ad),
                            "--out", str(tmp_path / "final.csv")])
    assert r.exit_code == 0, r.output
    p = pd.read_csv(tmp_path / "final.csv")["p_sensitive"]
    assert len(p) == 60 and p.between(0, 1).all()


def test_predict_a_store_dataset_from_its_recorded_input(trained, lora_store, cells_h5ad, tmp_path):
    """`--store S --dataset D`: the raw file the store records for D, with the store's ids and labels."""
    from scdm_embed.store import EmbeddingStore

    preds = pd.read_parquet(trained / "lora_predictions.parquet")
    fold = preds[preds["fold"] == 1].set_index("cell_id")
    cells = EmbeddingStore(lora_store, mode="r").cells([DS])
    moved = tmp_path / "moved.h5ad"  # the same file elsewhere: --input says where it is now
    shutil.copyfile(cells_h5ad, moved)
    for extra in ([], ["--input", str(moved)]):
        out = tmp_path / f"store{len(extra)}.parquet"
        r = runner.invoke(app, ["predict", "--bundle", str(_fold(trained, "fold-1")), "--store", str(lora_store),
                                "--dataset", DS, *extra, "--out", str(out)])
        assert r.exit_code == 0, r.output
        res = pd.read_parquet(out)
        assert list(res.columns) == list(PREDICT_COLUMNS) and len(res) == 60 and set(res["dataset"]) == {DS}
        assert (res["cell_id"].to_numpy() == [c.split("/", 1)[1] for c in cells.index]).all()
        assert (res["y_true"].to_numpy() == cells["label"].to_numpy()).all()
        got = res.set_index("cell_id").loc[fold.index]
        np.testing.assert_allclose(got["p_sensitive"].to_numpy(), fold["p_sensitive"].to_numpy(), rtol=0, atol=1e-6)


def test_predict_refuses_another_base_checkpoint(trained, cells_h5ad, tgpt_ckpt, tmp_path):
    other = tmp_path / "other_ckpt"
    shutil.copytree(tgpt_ckpt, other)
    cfg = other / "generation_config.json"
    cfg.write_text(cfg.read_text() + "\n")  # one byte more: another checkpoint
    out = tmp_path / "p.parquet"
    r = runner.invoke(app, ["predict", "--bundle", str(_fold(trained)), "--input", str(cells_h5ad),
                            "--checkpoint", str(other), "--out", str(out)])
    assert_refused(r, "hash")
    assert "--checkpoint" in r.output and not out.exists()


def test_predict_refusals(trained, cells_h5ad, lora_store, tmp_path):
    bundle = str(_fold(trained))
    out = str(tmp_path / "p.parquet")
    assert_refused(runner.invoke(app, ["predict", "--bundle", bundle, "--out", out]), "--input")
    assert_refused(runner.invoke(app, ["predict", "--bundle", bundle, "--store", str(lora_store), "--out", out]),
                   "--dataset")
    assert_refused(runner.invoke(app, ["predict", "--bundle", bundle, "--store", str(lora_store), "--dataset", "nope",
                                       "--out", out]), "nope")
    other = tmp_path / "other.h5ad"  # other cells than the dataset was extracted from
    ad.read_h5ad(cells_h5ad)[:50].copy().write_h5ad(other)
    assert_refused(runner.invoke(app, ["predict", "--bundle", bundle, "--store", str(lora_store), "--dataset", DS,
                                       "--input", str(other), "--out", out]), "hash")
    assert_refused(runner.invoke(app, ["predict", "--bundle", bundle, "--input", str(cells_h5ad),
                                       "--out", str(tmp_path / "p.txt")]), "parquet")
    tampered = tmp_path / "tampered"
    shutil.copytree(_fold(trained), tampered)
    head = tampered / "head.safetensors"
    data = bytearray(head.read_bytes())
    data[-1] ^= 0xFF
    head.write_bytes(bytes(data))
    assert_refused(runner.invoke(app, ["predict", "--bundle", str(tampered), "--input", str(cells_h5ad),
                                       "--out", out]), "sha256")
    (tampered / "extra.pkl").write_bytes(b"x")
    assert_refused(runner.invoke(app, ["predict", "--bundle", str(tampered), "--input", str(cells_h5ad),
                                       "--out", out]), "extra.pkl")
    assert not (tmp_path / "p.parquet").exists()


def test_a_killed_run_resumes_at_the_next_unfinished_fold(lora_store, tmp_path):
    out = tmp_path / "o"
    r = _lora(lora_store, out, "--max-partitions", "1")  # a run that stopped after its first fold ...
    assert r.exit_code == 0, r.output
    first = pd.read_parquet(out / "lora_results.parquet")
    done = _fold(out) / "bundle.json"
    stamp = (done.stat().st_mtime_ns, done.read_bytes())
    partial = _fold(out).parent / ".tmp-fold-1-killed"  # ... while it was writing the second
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"half")
    res = run_lora(lora_store, model="tgpt", folds=3, epochs=1, device="cpu", out=out)
    info = res.attrs["lora"]
    assert info["resumed"] == 1 and [f["resumed"] for f in info["fits"]] == [True, False, False]
    assert (done.stat().st_mtime_ns, done.read_bytes()) == stamp, "a finished fold was trained again"
    assert not partial.exists() and (_fold(out, "fold-2") / "bundle.json").exists()
    assert len(res) == 3 and len(pd.read_parquet(out / "lora_results.parquet")) == 3
    pd.testing.assert_frame_equal(res.iloc[:1].reset_index(drop=True), first, check_dtype=False)
    # the resumed run's rows equal an uninterrupted run's
    whole = run_lora(lora_store, model="tgpt", folds=3, epochs=1, device="cpu")
    cols = ["fold", "n_test", "auroc", "f1", "accuracy"]
    pd.testing.assert_frame_equal(res[cols], whole[cols])
    # everything finished: nothing is trained again
    again = run_lora(lora_store, model="tgpt", folds=3, epochs=1, device="cpu", out=out)
    assert again.attrs["lora"]["resumed"] == 3


def test_fits_saved_with_other_settings_are_refused_or_overwritten(lora_store, tmp_path):
    out = tmp_path / "o"
    assert _lora(lora_store, out, "--max-partitions", "1").exit_code == 0
    done = _fold(out) / "bundle.json"
    before = done.read_bytes()
    r = _lora(lora_store, out, "--max-partitions", "1", "--lr", "5e-4")
    assert_refused(r, "other settings")
    assert "--overwrite" in r.output and done.read_bytes() == before
    r = _lora(lora_store, out, "--max-partitions", "1", "--lr", "5e-4", "--overwrite")
    assert r.exit_code == 0, r.output
    assert json.loads(done.read_text())["training"]["lr"] == 5e-4


def test_a_run_killed_mid_fold_resumes(lora_store, tmp_path):
    """SIGKILL `scdm-eval lora` as soon as its first fold is saved; the same command then trains
    only the other folds."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "o"
    args = ["lora", "--store", str(lora_store), "--out", str(out), "--model", "tgpt", "--folds", "3",
            "--epochs", "8", "--device", "cpu", "-q"]
    exe = os.path.join(os.path.dirname(sys.executable), "scdm-eval")
    proc = subprocess.Popen([exe, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    done = _fold(out) / "bundle.json"
    try:
        deadline = time.monotonic() + 240
        while not done.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    assert done.exists(), "the first fold was never saved"
    assert not (_fold(out, "fold-2") / "bundle.json").exists(), "the run finished before it was killed"
    assert not (out / "lora_results.parquet").exists()
    saved = done.read_bytes()
    res = run_lora(lora_store, model="tgpt", folds=3, epochs=8, device="cpu", out=out)
    assert res.attrs["lora"]["resumed"] >= 1 and [f["resumed"] for f in res.attrs["lora"]["fits"]][-1] is False
    assert done.read_bytes() == saved and len(res) == 3
    assert not list(_fold(out).parent.glob(".tmp-*"))


@pytest.fixture(scope="module")
def pickled_scgpt(tmp_path_factory, fixtures_dir):
    """The scGPT fixture with best_model.pt re-saved as a ``collections.UserDict`` of its tensors: benign,
    but a global ``torch.load(weights_only=True)`` refuses, as in checkpoints saved with custom classes."""
    import collections
    import stat

    import torch

    ckpt = tmp_path_factory.mktemp("pickled") / "scgpt"
    shutil.copytree(fixtures_dir / "scgpt" / "checkpoint", ckpt, copy_function=shutil.copyfile)
    ckpt.chmod(ckpt.stat().st_mode | stat.S_IWUSR)
    state = torch.load(ckpt / "best_model.pt", map_location="cpu", weights_only=True)
    (ckpt / "best_model.pt").unlink()
    torch.save(collections.UserDict(state), ckpt / "best_model.pt")
    return ckpt


def test_predict_trust_checkpoint_loads_a_pickled_base(pickled_scgpt, cells_h5ad, tmp_path):
    import scdm_embed as se

    store, out = tmp_path / "s.zarr", tmp_path / "o"
    se.extract(cells_h5ad, model="scgpt", checkpoint=pickled_scgpt, store=store, device="cpu", progress=False,
               trust_checkpoint=True)
    r = runner.invoke(app, ["lora", "--store", str(store), "--out", str(out), "--model", "scgpt", "--folds", "3",
                            "--epochs", "1", "--device", "cpu", "--max-partitions", "1", "-q", "--trust-checkpoint"])
    assert r.exit_code == 0, r.output
    bundle = out / "lora" / "scgpt" / "lora-r8" / "all" / "fold-0"
    preds = tmp_path / "p.parquet"
    base = ["predict", "--bundle", str(bundle), "--store", str(store), "--dataset", DS, "--out", str(preds)]
    assert_refused(runner.invoke(app, base), "--trust-checkpoint")
    assert not preds.exists()
    r = runner.invoke(app, [*base, "--trust-checkpoint"])
    assert r.exit_code == 0, r.output
    fold = pd.read_parquet(out / "lora_predictions.parquet").set_index("cell_id")
    got = pd.read_parquet(preds).set_index("cell_id").loc[fold.index]
    np.testing.assert_allclose(got["p_sensitive"].to_numpy(), fold["p_sensitive"].to_numpy(), rtol=0, atol=1e-6)


def test_trust_checkpoint_without_a_model_to_load_is_refused(lora_store, tmp_path):
    bundle, out = tmp_path / "b", tmp_path / "p.parquet"
    r = runner.invoke(app, ["fit", "--store", str(lora_store), "--model", "tgpt", "--out", str(bundle)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["predict", "--bundle", str(bundle), "--store", str(lora_store), "--dataset", DS,
                            "--out", str(out), "--trust-checkpoint"])
    assert_refused(r, "--trust-checkpoint")
    assert not out.exists()
