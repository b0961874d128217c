"""The LoRA stage: tGPT (tiny fixture checkpoint) fine-tuned on 60 real PC9 cells under the saved splits.

Checks: one row per partition in the results schema, the very partitions ``scdm-eval run`` uses,
only LoRA + head weights train (and they move), seeded reruns are identical, training goes
through the Runner's token budget (micro-batches, same rows), moved / foreign inputs, refusals
(a store without recorded options included), the CLI, and one summary table with the
frozen-embedding classifiers.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import scdm_embed as se
from scdm_embed import ScdmError, StoreError
from scdm_embed.models.lora import apply_lora, lora_modules
from scdm_eval import (
    METRICS,
    RESULT_COLUMNS,
    load_splits,
    make_splits,
    run_evaluation,
    run_lora,
    summarize,
)
from scdm_eval._finetune import TELEMETRY_COLUMNS, _fit_partition, _prepare_context
from scdm_eval.cli import app

pytestmark = [pytest.mark.filterwarnings("ignore::scdm_eval.LeakageWarning"),
              pytest.mark.filterwarnings("ignore:fan_in_fan_out:UserWarning")]

DS = "pc9_60"
QUICK = {"folds": 3, "epochs": 2, "batch_size": 16, "device": "cpu"}
runner = CliRunner()


def _subset(pc9_path, path, start):
    a = ad.read_h5ad(pc9_path)
    r = a.obs["response"].to_numpy()
    idx = np.concatenate([np.flatnonzero(r == "sensitive")[start:start + 30],
                          np.flatnonzero(r == "resistant")[start:start + 30]])
    a[idx].copy().write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def tgpt_ckpt(fixtures_dir):
    return fixtures_dir / "tgpt" / "checkpoint"


@pytest.fixture(scope="module")
def cells_h5ad(tmp_path_factory, pc9_path):
    return _subset(pc9_path, tmp_path_factory.mktemp("lora") / f"{DS}.h5ad", 0)


def make_lora_store(path, cells_h5ad, tgpt_ckpt):
    """``cells_h5ad`` embedded with the tiny tGPT fixture into a store at ``path``."""
    se.extract(cells_h5ad, model="tgpt", checkpoint=tgpt_ckpt, store=path, device="cpu", progress=False)
    return path


@pytest.fixture(scope="module")
def lora_store(tmp_path_factory, cells_h5ad, tgpt_ckpt):
    """60 real PC9 cells (30 sensitive, 30 resistant) embedded with the tiny tGPT fixture."""
    return make_lora_store(tmp_path_factory.mktemp("lora_store") / "s.zarr", cells_h5ad, tgpt_ckpt)


@pytest.fixture
def store_copy(lora_store, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(lora_store, path)
    return path


def test_rows_follow_the_saved_splits(lora_store):
    res = run_lora(lora_store, model="tgpt", **QUICK)
    assert list(res.columns) == [*RESULT_COLUMNS, *TELEMETRY_COLUMNS]
    assert (res["wall_s"] > 0).all() and (res["cells_per_s"] > 0).all() and (res["peak_rss_mb"] > 50).all()
    assert set(res["device"]) == {"cpu"} and res["peak_gpu_mb"].isna().all()  # GPU memory: CUDA only
    assert len(res) == 3 and set(res["classifier"]) == {"lora-r8"} and set(res["model"]) == {"tgpt"}
    for m in ("f1", "auroc", "auprc", "accuracy", "recall"):
        assert np.isfinite(res[m]).all() and res[m].between(0, 1).all(), m
    assert res["precision"].notna().all() or res["reason"].str.contains("precision").any()
    # the very partitions `scdm-eval run` uses with the same parameters
    splits = load_splits(lora_store, folds=3, seed=0)
    assert splits is not None and res.attrs["split"] == splits.name and set(res["split"]) == {splits.name}
    parts = list(splits)
    assert [p.name for p in parts] == res["partition"].tolist()
    for p, row in zip(parts, res.itertuples(), strict=True):
        assert row.n_test == len(p.test) and row.n_train == len(p.train)
        test_cells = splits.table.index[p.test]
        assert all(c.startswith(f"{DS}/") for c in test_cells)
        assert row.test_sensitive == int(splits.table["label"].to_numpy()[p.test].sum())
    assert sorted(np.concatenate([p.test for p in parts]).tolist()) == list(range(60))
    info = res.attrs["lora"]
    assert info["ranks"] == [8] and info["alpha"] == 8 and info["dropout"] == 0.05 and info["settings_diff"] == {}
    assert info["targets"] == ["c_attn"] and info["head"] == "mlp" and info["head_layers"] == [64, 512, 512, 2]
    assert info["grad_accum"] == 1 and info["seed"] == 0 and info["epochs"] == 2
    assert all(len(f["train_loss"]) == 2 and all(map(math.isfinite, f["train_loss"])) for f in info["fits"])


def test_only_lora_and_head_weights_train(lora_store, tgpt_ckpt):
    from scdm_embed.store import EmbeddingStore

    st = EmbeddingStore(lora_store)
    splits = make_splits(st, folds=3, seed=0)
    ctx = _prepare_context(st, splits.table.index, model="tgpt", checkpoint=None, input=None, model_options=None,
                           device=torch.device("cpu"))
    assert ctx.checkpoint == tgpt_ckpt and len(ctx.tokens) == 60
    base = {k: v.clone() for k, v in ctx.base.state_dict().items()}
    part = next(iter(splits))
    y = splits.table["label"].to_numpy().astype(np.int64)
    # the initial LoRA weights: same seed, same injection order as _fit_partition
    torch.manual_seed(7)
    ctx.adapter.model = copy.deepcopy(ctx.base)
    init = {k: v.detach().clone() for k, v in apply_lora(ctx.adapter).named_parameters() if "lora_" in k}
    fit = _fit_partition(ctx, y, part.train, part.test, seed=7, epochs=2, lr=1e-3, batch_size=16)

    assert fit.proba.shape == (len(part.test),) and np.all((fit.proba >= 0) & (fit.proba <= 1))
    assert lora_modules(fit.net), "no module was wrapped"
    trained = dict(fit.net.named_parameters())
    lora = {k: p for k, p in trained.items() if "lora_" in k}
    assert lora and all(p.requires_grad for p in lora.values())
    for name, p in trained.items():  # every base weight is untouched
        if "lora_" in name:
            continue
        assert not p.requires_grad, name
        assert torch.equal(p.detach(), base[name.replace(".base_layer", "")]), name
    for name, p in lora.items():  # ... and every LoRA weight moved (lora_B starts at zero)
        assert not torch.equal(p.detach(), init[name]), name
        if "lora_B" in name:
            assert p.abs().sum() > 0, name
    assert all(p.requires_grad for p in fit.head.parameters())
    assert all(torch.equal(v, base[k]) for k, v in ctx.base.state_dict().items()), "the template changed"


def test_same_seed_same_rows(lora_store):
    a = run_lora(lora_store, model="tgpt", max_partitions=1, **{**QUICK, "epochs": 1})
    b = run_lora(lora_store, model="tgpt", max_partitions=1, **{**QUICK, "epochs": 1})
    assert len(a) == 1 and a.attrs["lora"]["partitions_total"] == 3
    same = list(RESULT_COLUMNS)  # the telemetry (wall_s, cells_per_s, ...) is a measurement
    pd.testing.assert_frame_equal(a[same], b[same])


def _padded_tokens_per_forward(module: torch.nn.Module) -> list[int]:
    """Record batch x length of every forward through the first LoRA target (``c_attn``) of ``module``.

    A forward hook on the pristine template: ``deepcopy`` carries it into each partition's copy,
    and LoRA keeps the original layer (as ``base_layer``), so the real forward passes are seen.
    """
    seen: list[int] = []
    target = next(m for n, m in module.named_modules() if n.endswith("c_attn"))
    target.register_forward_pre_hook(lambda _m, args: seen.append(int(args[0].shape[0] * args[0].shape[1])))
    return seen


def test_training_goes_through_the_token_budget(lora_store):
    from scdm_embed.runner import token_lengths
    from scdm_embed.store import EmbeddingStore

    st = EmbeddingStore(lora_store)
    splits = make_splits(st, folds=3, seed=0)
    ctx = _prepare_context(st, splits.table.index, model="tgpt", checkpoint=None, input=None, model_options=None,
                           device=torch.device("cpu"))
    seen = _padded_tokens_per_forward(ctx.base)
    lengths = token_lengths(ctx.tokens, ctx.adapter.sequence_keys)
    budget = int(lengths.max())  # room for the longest cell, so most forwards hold one cell
    part = next(iter(splits))
    y = splits.table["label"].to_numpy().astype(np.int64)
    kw = {"seed": 3, "epochs": 2, "lr": 1e-3, "batch_size": 16, "dropout": 0.0}  # no dropout: splitting is exact
    whole = _fit_partition(ctx, y, part.train, part.test, token_budget=0, **kw)
    n_whole, big = len(seen), max(seen)
    seen.clear()
    micro = _fit_partition(ctx, y, part.train, part.test, token_budget=budget, **kw)
    assert max(seen) <= budget < big, "a forward went over the token budget"
    assert len(seen) > n_whole  # the 16-cell steps ran as micro-batches
    # the micro-batch gradients add up to the whole step's: the same training, up to float32 summation order
    np.testing.assert_allclose(micro.losses, whole.losses, rtol=1e-5)
    np.testing.assert_allclose(micro.proba, whole.proba, atol=1e-5)
    assert not np.allclose(micro.losses[0], micro.losses[1], rtol=1e-7), "it did not train"


def test_a_tiny_token_budget_gives_the_same_rows(lora_store):
    kw = {**QUICK, "epochs": 1, "max_partitions": 1, "dropout": 0.0}
    tiny = run_lora(lora_store, model="tgpt", token_budget=1, **kw)  # one cell per forward
    whole = run_lora(lora_store, model="tgpt", token_budget=0, **kw)  # no cap: one forward per step
    assert tiny.attrs["lora"]["token_budget"] == 1 and whole.attrs["lora"]["token_budget"] is None
    metrics = [m for m in METRICS if m != "precision"]
    np.testing.assert_allclose(tiny[metrics].to_numpy(float), whole[metrics].to_numpy(float), atol=1e-6)
    np.testing.assert_allclose(tiny.attrs["lora"]["fits"][0]["train_loss"], whole.attrs["lora"]["fits"][0]["train_loss"],
                               rtol=1e-5)
    with pytest.raises(ScdmError, match="token_budget must be"):
        run_lora(lora_store, model="tgpt", token_budget=-1, **kw)


def _tree_digest(path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_a_store_without_recorded_options_is_refused(store_copy):
    from scdm_embed.store import EmbeddingStore

    g = EmbeddingStore(store_copy, mode="a").embedding_group("tgpt", DS)
    assert g.attrs["options"] == {"max_len": None, "tokenizer": None}  # extraction records every option
    del g.attrs["options"]  # as a store written before the options were recorded
    before = _tree_digest(store_copy)
    r = runner.invoke(app, ["lora", "--store", str(store_copy), "--model", "tgpt", "--folds", "3", "--epochs", "1",
                            "--device", "cpu", "--out", str(store_copy.parent / "o"), "-q"])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and "error:" in r.output and "fix:" in r.output
    assert "does not record the tgpt options" in r.output and "--option" in r.output
    assert _tree_digest(store_copy) == before, "a refused run changed the store"
    # the fix works: options given (here the defaults) are used as they are
    res = run_lora(store_copy, model="tgpt", model_options={}, max_partitions=1, **{**QUICK, "epochs": 1})
    assert len(res) == 1 and res.attrs["lora"]["model_options"] == {}


def test_moved_and_foreign_inputs(store_copy, cells_h5ad, pc9_path, tmp_path):
    from scdm_embed.store import EmbeddingStore

    st = EmbeddingStore(store_copy, mode="a")
    st.root["datasets"][DS].attrs["source"] = str(tmp_path / "gone" / f"{DS}.h5ad")
    with pytest.raises(ScdmError, match="no longer at") as e:
        run_lora(store_copy, model="tgpt", **QUICK)
    assert "input=" in e.value.fix
    moved = tmp_path / "moved.h5ad"
    shutil.copy(cells_h5ad, moved)
    for given in (moved, {DS: moved}):
        res = run_lora(store_copy, model="tgpt", input=given, max_partitions=1, **{**QUICK, "epochs": 1})
        assert len(res) == 1 and res["auroc"].notna().all()
    other = _subset(pc9_path, tmp_path / "other.h5ad", 30)  # 60 other cells
    with pytest.raises(ScdmError, match="is not the input dataset 'pc9_60' was extracted from") as e:
        run_lora(store_copy, model="tgpt", input=other, **QUICK)
    assert "original file" in e.value.fix
    with pytest.raises(ScdmError, match="not in the store"):
        run_lora(store_copy, model="tgpt", input={"nope": moved}, **QUICK)


def test_refusals(store_copy, tgpt_ckpt):
    with pytest.raises(ScdmError, match="no neural network") as e:
        run_lora(store_copy, model="pca", **QUICK)
    assert "scdm-eval run" in e.value.fix
    with pytest.raises(ScdmError, match="epochs must be"):
        run_lora(store_copy, model="tgpt", **{**QUICK, "epochs": 0})
    from scdm_embed.store import EmbeddingStore

    EmbeddingStore(store_copy, mode="a").delete_embedding("tgpt", DS)
    with pytest.raises(StoreError, match="records no tgpt extraction") as e:
        run_lora(store_copy, model="tgpt", **QUICK)
    assert "--checkpoint" in e.value.fix
    res = run_lora(store_copy, model="tgpt", checkpoint=tgpt_ckpt, max_partitions=1, **{**QUICK, "epochs": 1})
    assert len(res) == 1


def test_one_summary_with_the_frozen_classifiers(lora_store):
    frozen = run_evaluation(lora_store, models=["tgpt"], classifiers=("logreg",), folds=3, n_jobs=1)
    tuned = run_lora(lora_store, model="tgpt", **QUICK)
    assert set(frozen["split"]) == set(tuned["split"])
    both = pd.concat([frozen, tuned], ignore_index=True)
    s = summarize(both)
    assert set(s["classifier"]) == {"logreg", "lora-r8"} and set(s["model"]) == {"tgpt"}
    assert (s["n_folds"] == 3).all() and (s["n_cells"] == 60).all()
    assert all(s[f"{m}_mean"].notna().all() for m in METRICS if m != "precision")


def test_cli(lora_store, tmp_path):
    out = tmp_path / "res"
    r = runner.invoke(app, ["run", "--store", str(lora_store), "-c", "logreg", "--folds", "3", "--n-jobs", "1",
                            "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["lora", "--store", str(lora_store), "--model", "tgpt", "--folds", "3", "--epochs", "1",
                            "--device", "cpu", "--option", "max_len=64", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output and "lora" in r.output and "AUROC" in r.output
    for f in ("lora_results.csv", "lora_results.parquet", "lora_summary.md", "combined_summary.md"):
        assert (out / f).exists(), f
    assert len(pd.read_csv(out / "lora_results.csv")) == 3
    # per-cell LoRA predictions: every stored AUROC recomputes exactly from them
    from scdm_eval import compute_metrics

    pred, lres = pd.read_parquet(out / "lora_predictions.parquet"), pd.read_parquet(out / "lora_results.parquet")
    assert set(pred["classifier"]) == {"lora-r8"} and len(pred) == int(lres["n_test"].sum())
    for row in lres.itertuples(index=False):
        g = pred[(pred["fold"] == row.fold) & (pred["category"] == row.category)]
        assert compute_metrics(g["y_true"].to_numpy(), g["p_sensitive"].to_numpy())["auroc"] == row.auroc
    combined = (out / "combined_summary.md").read_text()
    assert "logreg" in combined and "lora-r8" in combined
    r = runner.invoke(app, ["lora", "--store", str(lora_store), "--model", "pca", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "error:" in r.output and "fix:" in r.output and "no neural network" in r.output
    assert "Traceback" not in r.output


def test_rank_ablation_in_one_command(lora_store, tmp_path):
    out = tmp_path / "abl"
    r = runner.invoke(app, ["lora", "--store", str(lora_store), "--model", "tgpt", "--folds", "3", "--epochs", "1",
                            "--max-partitions", "1", "--rank", "4", "--rank", "8", "--device", "cpu",
                            "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    res = pd.read_parquet(out / "lora_results.parquet")
    assert res["classifier"].tolist() == ["lora-r4", "lora-r8"]
    # the same partition: same fold, same cells, same seed
    for col in ("split", "category", "fold", "partition", "n_train", "n_test", "test_sensitive", "seed"):
        assert res[col].nunique() == 1, col
    pred = pd.read_parquet(out / "lora_predictions.parquet")
    by = {c: g.sort_values("cell_id")["cell_id"].tolist() for c, g in pred.groupby("classifier")}
    assert set(by) == {"lora-r4", "lora-r8"} and by["lora-r4"] == by["lora-r8"]
    assert len(by["lora-r4"]) == int(res["n_test"].iloc[0])


def _tgpt_context(lora_store):
    """The tGPT LoRA context of the store, its labels and the first partition of a 3-fold split."""
    from scdm_embed.store import EmbeddingStore

    st = EmbeddingStore(lora_store)
    splits = make_splits(st, folds=3, seed=0)
    ctx = _prepare_context(st, splits.table.index, model="tgpt", checkpoint=None, input=None, model_options=None,
                           device=torch.device("cpu"))
    return ctx, splits.table["label"].to_numpy().astype(np.int64), next(iter(splits))


def test_rank_sets_the_adapter_shape(lora_store):
    ctx, y, part = _tgpt_context(lora_store)
    kw = {"seed": 1, "epochs": 1, "lr": 1e-3, "batch_size": 16}
    for r in (4, 16):
        fit = _fit_partition(ctx, y, part.train, part.test, r=r, **kw)
        shapes = {layer.lora_A["default"].weight.shape[0] for layer in lora_modules(fit.net).values()}
        assert shapes == {r}


def test_the_mlp_and_linear_heads(lora_store):
    ctx, y, part = _tgpt_context(lora_store)
    kw = {"seed": 1, "epochs": 1, "lr": 1e-3, "batch_size": 16}
    mlp = _fit_partition(ctx, y, part.train, part.test, head="mlp", **kw)
    linears = [m for m in mlp.head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 512), (512, 512), (512, 2)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in mlp.head.modules()) == 2
    lin = _fit_partition(ctx, y, part.train, part.test, head="linear", **kw)
    assert isinstance(lin.head, torch.nn.Linear) and (lin.head.in_features, lin.head.out_features) == (64, 2)
    assert not np.allclose(mlp.proba, lin.proba)
    res = run_lora(lora_store, model="tgpt", head="linear", max_partitions=1, **{**QUICK, "epochs": 1})
    assert res.attrs["lora"]["head"] == "linear" and res.attrs["lora"]["head_layers"] == [64, 2]


def test_options_are_recorded(lora_store):
    res = run_lora(lora_store, model="tgpt", rank=[4], alpha=16, dropout=0.1, targets=["c_attn", "c_proj"],
                   grad_accum=2, lr=5e-4, max_partitions=1, seed=3, folds=3, epochs=1, batch_size=8, device="cpu")
    info = res.attrs["lora"]
    assert (info["ranks"], info["alpha"], info["dropout"], info["targets"]) == ([4], 16, 0.1, ["c_attn", "c_proj"])
    assert (info["grad_accum"], info["lr"], info["batch_size"], info["seed"]) == (2, 5e-4, 8, 3)
    assert res["classifier"].tolist() == ["lora-r4"] and set(res["seed"]) == {3}
    assert all(map(math.isfinite, info["fits"][0]["train_loss"]))


@pytest.mark.parametrize(("args", "message"), [
    (["--rank", "0"], "rank must be an integer >= 1"),
    (["--rank", "8", "--rank", "-2"], "rank must be an integer >= 1"),
    (["--dropout", "1.5"], "dropout must be a number in [0, 1)"),
    (["--alpha", "0"], "alpha must be a positive number"),
    (["--grad-accum", "0"], "grad_accum must be an integer >= 1"),
    (["--targets", "no_such_layer"], "name no linear layer"),
    (["--targets", "c_attn", "--targets", "h"], "name no linear layer"),
])
def test_bad_lora_options_exit_2(store_copy, args, message):
    before = _tree_digest(store_copy)
    r = runner.invoke(app, ["lora", "--store", str(store_copy), "--model", "tgpt", "--folds", "3", "--epochs", "1",
                            "--device", "cpu", "--out", str(store_copy.parent / "o"), "-q", *args])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and "error:" in r.output and "fix:" in r.output
    assert message in r.output
    assert _tree_digest(store_copy) == before, "a refused run changed the store"
    assert not (store_copy.parent / "o").exists()


def test_bad_head_exits_2(store_copy):
    r = runner.invoke(app, ["lora", "--store", str(store_copy), "--model", "tgpt", "--head", "deep",
                            "--out", str(store_copy.parent / "o")])
    assert r.exit_code == 2 and "Traceback" not in r.output and "mlp" in r.output


def _dtype_of_forwards(module: torch.nn.Module) -> list[torch.dtype]:
    """The output dtype of every forward through the first ``c_attn`` (hook on the template, as above)."""
    seen: list[torch.dtype] = []
    target = next(m for n, m in module.named_modules() if n.endswith("c_attn"))
    target.register_forward_hook(lambda _m, _a, out: seen.append(out.dtype))
    return seen


def test_bf16_autocast_and_gradient_checkpointing(lora_store):
    ctx, y, part = _tgpt_context(lora_store)
    dtypes = _dtype_of_forwards(ctx.base)
    kw = {"seed": 2, "epochs": 2, "lr": 1e-3, "batch_size": 16, "dropout": 0.0}
    plain = _fit_partition(ctx, y, part.train, part.test, **kw)
    assert set(dtypes) == {torch.float32}
    n_plain = len(dtypes)
    dtypes.clear()
    half = _fit_partition(ctx, y, part.train, part.test, bf16=True, **kw)
    assert set(dtypes) == {torch.bfloat16}, "the forward did not run under bf16 autocast"
    assert all(map(math.isfinite, half.losses)) and np.all((half.proba >= 0) & (half.proba <= 1))
    np.testing.assert_allclose(half.losses, plain.losses, rtol=0.05)  # bf16 rounding, same training
    dtypes.clear()
    ckpt = _fit_partition(ctx, y, part.train, part.test, gradient_checkpointing=True, **kw)
    assert len(dtypes) > n_plain, "no layer was recomputed in the backward pass"
    np.testing.assert_allclose(ckpt.losses, plain.losses, rtol=1e-5)  # the same gradients
    np.testing.assert_allclose(ckpt.proba, plain.proba, atol=1e-5)


def test_bf16_and_checkpointing_from_the_cli(lora_store, tmp_path):
    out = tmp_path / "o"
    r = runner.invoke(app, ["lora", "--store", str(lora_store), "--model", "tgpt", "--folds", "3", "--epochs", "1",
                            "--max-partitions", "1", "--device", "cpu", "--bf16", "--gradient-checkpointing",
                            "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "lora" / "tgpt" / "lora-r8" / "all" / "fold-0" / "bundle.json").read_text())
    assert meta["training"]["bf16"] is True
    res = pd.read_parquet(out / "lora_results.parquet")
    assert len(res) == 1 and np.isfinite(res["auroc"]).all()
    with pytest.raises(ScdmError, match="bf16 must be"):
        run_lora(lora_store, model="tgpt", bf16="yes", **QUICK)
    with pytest.raises(ScdmError, match="gradient_checkpointing must be"):
        run_lora(lora_store, model="tgpt", gradient_checkpointing=1, **QUICK)
    with pytest.raises(ScdmError, match="no out= folder"):
        run_lora(lora_store, model="tgpt", final=True, **QUICK)


def test_gradient_checkpointing_is_refused_where_unsupported():
    from scdm_embed.models.lora import enable_gradient_checkpointing

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())  # no repeated encoder blocks
    with pytest.raises(ScdmError, match="not supported") as e:
        enable_gradient_checkpointing(net, name="toy")
    assert "--gradient-checkpointing" in e.value.fix


@pytest.fixture(scope="module")
def planted_store(tmp_path_factory, tgpt_ckpt):
    """A learnable synthetic task for the tiny tGPT: 120 cells of 1,000 genes (symbols of its vocabulary),
    the class planted in two genes (one up, one down 6 log-units: in or out of a cell's 62 top-ranked
    genes), no batch or sample effects. The frozen random-weight embedding is close to a random
    64-d projection of the cell's gene set, where two genes are drowned by the other 60."""
    from scdm_embed.testing import synthetic_cohort

    vocab = json.loads((tgpt_ckpt / "tokenizer.json").read_text())["model"]["vocab"]
    symbols = [g for g in vocab if not g.startswith("<")][:5000]
    genes = list(np.random.default_rng(0).choice(symbols, 1000, replace=False))
    a = synthetic_cohort(n_studies=2, samples_per_study=4, cells_per_sample=15, n_genes=1000, n_signal_genes=2,
                         signal=6.0, batch_shift=0.0, sample_sd=0.0, gene_names=genes, seed=1)
    d = tmp_path_factory.mktemp("planted")
    a.write_h5ad(d / "planted.h5ad")
    se.extract(d / "planted.h5ad", model="tgpt", checkpoint=tgpt_ckpt, store=d / "s.zarr", device="cpu",
               progress=False)
    return d / "s.zarr"


def test_adapters_learn_a_planted_signal_the_frozen_embedding_misses(planted_store):
    """LoRA (r 8, MLP head) reaches AUROC > 0.9 on held-out cells; the frozen-embedding classifiers,
    on the same fold, stay clearly lower: the adapters learn, not only the head."""
    tuned = run_lora(planted_store, model="tgpt", folds=3, epochs=10, lr=5e-3, device="cpu", max_partitions=1)
    frozen = run_evaluation(planted_store, models=["tgpt"], classifiers=("logreg", "mlp"), folds=3, n_jobs=1)
    frozen = frozen[frozen["fold"] == 0]
    lora_auroc = float(tuned["auroc"].iloc[0])
    assert tuned["fold"].iloc[0] == 0 and len(frozen) == 2 and set(frozen["split"]) == set(tuned["split"])
    assert lora_auroc > 0.9, lora_auroc
    assert frozen["auroc"].max() < lora_auroc - 0.05, (frozen[["classifier", "auroc"]], lora_auroc)
