"""The adapter contract: every model in ``available_models()`` passes the same checks, so a new
adapter gets them for free by registering itself (and adding its checkpoint to
``tests/scdm_embed/conftest.py:model_checkpoints``).

Checked per model: the official checkpoint layout loads with default options; options are
declared and typed (an unknown key is refused); ``prepare`` returns an immutable gene plan and
leaves no per-dataset state behind; embeddings do not depend on the batch (batch-invariant
models) or are deterministic for the same batch (models whose cells attend to each other);
an interrupted extraction resumes through the CLI to the same array.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from scdm_embed.cli import app
from scdm_embed.errors import ScdmError
from scdm_embed.genes import GeneTable
from scdm_embed.inputs import read_input
from scdm_embed.models import GenePlan, available_models, get_adapter
from scdm_embed.models.options import resolve_options
from scdm_embed.runner import Runner
from scdm_embed.store import EmbeddingStore

MODELS = available_models()
CPU = torch.device("cpu")
#: float32 round-off between batches of other sizes or padding widths: GEMM kernels block and
#: sum in another order (pca's 2,000-gene projection reaches ~5e-6 relative on values ~10-30)
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def data(cells8: Path):
    d = read_input(cells8)
    yield d
    d.close()


def _loaded(model: str, checkpoints: dict[str, str | None], data, **options):
    a = get_adapter(model)(checkpoints[model], **options)
    a.load(device=CPU, dtype=torch.float32)
    if a.requires_reference:
        a.set_reference(*a.fit_reference(data))
    return a


def _tokens(a, data, plan: GenePlan) -> list[dict[str, np.ndarray]]:
    return a.tokenize(data.cell_chunk(0, data.n_cells), plan)


def _same_tokens(x: list[dict[str, np.ndarray]], y: list[dict[str, np.ndarray]]) -> None:
    assert len(x) == len(y)
    for cx, cy in zip(x, y, strict=True):
        assert cx.keys() == cy.keys()
        for k in cx:
            np.testing.assert_array_equal(cx[k], cy[k])  # same process, same inputs: bit-exact


def test_every_model_is_covered(model_checkpoints: dict[str, str | None]) -> None:
    missing = sorted(set(MODELS) - set(model_checkpoints))
    assert not missing, f"add a checkpoint for {missing} to tests/scdm_embed/conftest.py:model_checkpoints"


@pytest.mark.parametrize("model", MODELS)
def test_loads_the_official_layout(model: str, model_checkpoints, data) -> None:
    a = _loaded(model, model_checkpoints, data)
    assert a.dim > 0
    json.dumps(a.settings())  # provenance must be JSON
    if model_checkpoints[model] is not None:  # the checkpoint's content is part of the provenance
        assert a.checkpoint_hash().startswith("sha256:")


@pytest.mark.parametrize("model", MODELS)
def test_options_are_declared_and_typed(model: str, model_checkpoints) -> None:
    cls = get_adapter(model)
    defaults = resolve_options(model, cls.options_spec, {})
    assert set(defaults) == {o.name for o in cls.options_spec}
    with pytest.raises(ScdmError, match="not_an_option"):
        cls(model_checkpoints[model], not_an_option=1)


@pytest.mark.parametrize("model", MODELS)
def test_gene_plan_is_immutable_and_stateless(model: str, model_checkpoints, data) -> None:
    a = _loaded(model, model_checkpoints, data)
    plan = a.prepare(data.genes)
    assert isinstance(plan, GenePlan)
    before = _tokens(a, data, plan)
    # another dataset's genes: every other gene, in reverse order
    keep = np.arange(len(data.genes))[::-2]
    other = GeneTable(symbols=data.genes.symbols[keep], ensembl=data.genes.ensembl[keep])
    state = {k: id(v) for k, v in vars(a).items()}
    a.prepare(other)
    assert {k: id(v) for k, v in vars(a).items()} == state, "prepare() changed the adapter"
    _same_tokens(before, _tokens(a, data, plan))  # the first plan still tokenizes the same
    if plan.columns.size:
        with pytest.raises(ValueError):
            plan.columns[0] = 0
    for v in plan.data.values():
        if isinstance(v, np.ndarray) and v.size:
            with pytest.raises(ValueError):
                v.flat[0] = v.flat[0]
    with pytest.raises(TypeError):
        plan.data["new"] = 1  # type: ignore[index]
    again = pickle.loads(pickle.dumps(plan))
    _same_tokens(before, _tokens(a, data, again))


@pytest.mark.parametrize("model", MODELS)
def test_batches_do_not_change_embeddings(model: str, model_checkpoints, data) -> None:
    a = _loaded(model, model_checkpoints, data)
    cells = _tokens(a, data, a.prepare(data.genes))
    whole = Runner(a, batch_size=8, token_budget=0).embed(cells)
    assert whole.shape == (8, a.dim) and np.isfinite(whole).all()
    again = Runner(a, batch_size=8, token_budget=0).embed(cells)
    np.testing.assert_array_equal(whole, again)  # same process, same batches: deterministic
    if a.batch_invariant:
        alone = Runner(a, batch_size=1, token_budget=0).embed(cells)
        np.testing.assert_allclose(alone, whole, **TOL)
        budget = Runner(a, batch_size=8, token_budget=1).embed(cells)  # 1 token: one cell per batch
        np.testing.assert_allclose(budget, whole, **TOL)


@pytest.mark.parametrize("model", MODELS)
def test_interrupted_extraction_resumes(model: str, model_checkpoints, cells8: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    args = ["extract", str(cells8), "--model", model, "--store", str(store), "--chunk-size", "4", "-q"]
    if model_checkpoints[model] is not None:
        args += ["--checkpoint", model_checkpoints[model]]
    runner = CliRunner()
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    first, _ = EmbeddingStore(store).load(model)
    # as if killed after the first chunk: the second chunk's flag is down, the array incomplete
    group = zarr.open_group(str(store / "embeddings" / model / "cells8"), mode="a")
    group["done"][1] = False
    group.attrs["complete"] = False
    with pytest.raises(ScdmError, match="incomplete"):
        EmbeddingStore(store).load(model)
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "resumed" in r.output
    resumed, _ = EmbeddingStore(store).load(model)
    np.testing.assert_array_equal(resumed[:4], first[:4])  # the finished chunk was kept, not recomputed
    np.testing.assert_allclose(resumed, first, **TOL)  # recomputed: float32 round-off at most
