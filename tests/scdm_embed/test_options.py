"""Typed, declared model options: every model declares its options once; unknown keys and
mistyped values are refused (exit 2, the key named, the valid options listed, no traceback,
no store created); values from the CLI are typed by the declaration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from scdm_embed.cli import app
from scdm_embed.errors import ScdmError
from scdm_embed.models import available_models, get_adapter
from scdm_embed.models.options import OPTION_TYPES
from scdm_embed.store import EmbeddingStore

runner = CliRunner()
MODELS = available_models()
#: a value each option type cannot take
BAD_VALUE = {bool: "maybe", int: "abc", float: "abc"}


@pytest.fixture(scope="module")
def cells(cells8: Path) -> Path:
    return cells8


@pytest.fixture(scope="module")
def checkpoints(model_checkpoints: dict[str, str | None]) -> dict[str, list[str]]:
    """``--checkpoint`` arguments per model (``tests/scdm_embed/conftest.py``)."""
    return {m: [] if c is None else ["--checkpoint", c] for m, c in model_checkpoints.items()}


def _extract(cells: Path, model: str, ckpt: list[str], store: Path, *options: str):
    opts = [x for o in options for x in ("-o", o)]
    return runner.invoke(app, ["extract", str(cells), "--model", model, *ckpt, "--store", str(store), "-q", *opts])


def _assert_refused(r, model: str, key: str, store: Path) -> str:
    out = r.output.replace("\n", " ")
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit), r.output
    assert "error:" in out and "fix:" in out, r.output
    assert key in out.split("fix:")[0], "the problem must name the key"
    for o in get_adapter(model).options_spec:  # the fix lists every valid option
        assert o.name in out.split("fix:")[1], (o.name, r.output)
    assert not store.exists(), "a refused command must not create the store"
    return out


@pytest.mark.parametrize("model", MODELS)
def test_every_option_is_declared_with_type_default_help(model: str) -> None:
    spec = get_adapter(model).options_spec
    names = [o.name for o in spec]
    assert len(names) == len(set(names)), f"{model}: duplicated option names"
    for o in spec:
        assert o.name.isidentifier() and o.type in OPTION_TYPES and o.help.strip(), o
        if o.default is not None:  # a declared default is a valid value of its own option
            assert o.coerce(o.default) == o.default, o


@pytest.mark.parametrize("model", MODELS)
def test_unknown_option_is_refused_by_the_cli(model: str, cells: Path, checkpoints, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    out = _assert_refused(_extract(cells, model, checkpoints[model], store, "max_lenght=256"), model, "max_lenght", store)
    if any(o.name == "max_length" for o in get_adapter(model).options_spec):
        assert "did you mean 'max_length'" in out, out


@pytest.mark.parametrize("model", MODELS)
def test_mistyped_value_is_refused_by_the_cli(model: str, cells: Path, checkpoints, tmp_path: Path) -> None:
    spec = get_adapter(model).options_spec
    opt = next(o for o in spec if o.type in BAD_VALUE or o.choices)  # every model has a typed option
    bad = BAD_VALUE.get(opt.type, "no_such_choice")
    store = tmp_path / "s.zarr"
    _assert_refused(_extract(cells, model, checkpoints[model], store, f"{opt.name}={bad}"), model, opt.name, store)


@pytest.mark.parametrize("option", ["n_genes=abc", "n_genes=0", "n_genes=2.5", "n_genes=true", "n_gene=16"])
def test_lm_bad_n_genes_is_refused(option: str, cells: Path, tmp_path: Path) -> None:
    """``n_gene=16`` used to run silently with the default 1,024 genes."""
    store = tmp_path / "s.zarr"
    key = option.split("=")[0]
    out = _assert_refused(_extract(cells, "lm", ["--checkpoint", "minilm"], store, option), "lm", key, store)
    if key == "n_gene":
        assert "did you mean 'n_genes'" in out, out


def test_list_models_options_lists_every_option() -> None:
    r = runner.invoke(app, ["list-models", "--options"])
    assert r.exit_code == 0, r.output
    for model in MODELS:
        assert model in r.output
        for o in get_adapter(model).options_spec:
            assert o.name in r.output, (model, o.name)
    plain = runner.invoke(app, ["list-models"])
    assert plain.exit_code == 0 and "n_top_genes" not in plain.output


def test_cli_values_are_typed_and_recorded(cells: Path, checkpoints, tmp_path: Path) -> None:
    """``normalize=false`` from the CLI is False (the <cls> vector is not L2-normalised) and
    provenance records every declared option, defaults filled in."""
    store = tmp_path / "s.zarr"
    r = _extract(cells, "scgpt", checkpoints["scgpt"], store, "normalize=false", "max_length=64")
    assert r.exit_code == 0, r.output
    X, _ = EmbeddingStore(store).load("scgpt")
    # random-weight model: un-normalised <cls> norms are far from 1 (float32 round-off is ~1e-6)
    assert np.abs(np.linalg.norm(X, axis=1) - 1.0).max() > 1e-2
    opts = dict(EmbeddingStore(store).embedding_group("scgpt", "cells8").attrs)["options"]
    assert opts == {"max_length": 64, "seed": 0, "normalize": False}


@pytest.mark.parametrize(("value", "expected"), [("false", False), ("FALSE", False), ("no", False), ("0", False),
                                                 (False, False), ("Yes", True), ("1", True), (True, True)])
def test_bool_values(value, expected, fixtures_dir: Path) -> None:
    a = get_adapter("scgpt")(fixtures_dir / "scgpt" / "checkpoint", normalize=value)
    assert a.options["normalize"] is expected and a.normalize is expected


@pytest.mark.parametrize("value", ["maybe", "", 2, "on"])
def test_bool_rejects_other_values(value, fixtures_dir: Path) -> None:
    with pytest.raises(ScdmError, match="normalize"):
        get_adapter("scgpt")(fixtures_dir / "scgpt" / "checkpoint", normalize=value)


@pytest.mark.parametrize(("value", "expected"), [("20", 20), (20, 20), (20.0, 20), (np.int64(20), 20), (" 20 ", 20)])
def test_int_values(value, expected) -> None:
    a = get_adapter("pca")(n_comps=value)
    assert a.options["n_comps"] == expected and type(a.options["n_comps"]) is int


@pytest.mark.parametrize("value", [True, "true", 2.5, "2.5", "abc", None, 0, "0"])
def test_int_rejects_bools_fractions_and_range(value) -> None:
    with pytest.raises(ScdmError, match="n_comps"):
        get_adapter("pca")(n_comps=value)


def test_choices_none_and_aliases(fixtures_dir: Path, checkpoints) -> None:
    gf = fixtures_dir / "geneformer" / "checkpoint"
    g = get_adapter("geneformer")(gf, generation="V2", max_length="none")
    assert g.options["generation"] == "v2" and g.options["max_length"] is None
    assert g.options["map_symbols"] is False and g.options["pooling"] == "mean"  # defaults filled in
    with pytest.raises(ScdmError, match="pooling"):
        get_adapter("geneformer")(gf, pooling="max")
    ckpt = checkpoints["scbert"][1]
    assert get_adapter("scbert")(ckpt, log_base="e").log_base is None  # natural log
    assert get_adapter("scbert")(ckpt, log_base="10").log_base == 10.0
    with pytest.raises(ScdmError, match="log_base"):
        get_adapter("scbert")(ckpt, log_base="1")  # must be > 1
