"""Bad input through `scdm-embed extract`: damaged files, single-class datasets, wrong checkpoint
shapes, and operating-system errors: `error:` + `fix:`, exit status 2, no traceback, store untouched."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from scdm_embed.cli import app
from scdm_embed.cli_support import friendly_errors
from tests._cli import assert_refused
from tests.conftest import store_snapshot

runner = CliRunner()


def _refused(r, *words: str) -> str:
    return assert_refused(r, *words)


@pytest.fixture(scope="module")
def pc9(pc9_small) -> ad.AnnData:
    return ad.read_h5ad(pc9_small)


def _cells(pc9: ad.AnnData, n_sensitive: int, n_resistant: int, start: int = 0) -> ad.AnnData:
    r = pc9.obs["response"].to_numpy()
    idx = np.concatenate([np.flatnonzero(r == "sensitive")[start:start + n_sensitive],
                          np.flatnonzero(r == "resistant")[start:start + n_resistant]])
    return pc9[idx].copy()


def _extract(path: Path, store: Path, *extra: str):
    return runner.invoke(app, ["extract", str(path), "--model", "pca", "--store", str(store), "-q", *extra])


# -- a file that opens but is damaged inside -------------------------------------------------------
_READ_ERRORS = (OSError, RuntimeError, KeyError, ValueError)  # what h5py / anndata raise on damaged data


#: each part of an .h5ad, read with h5py / anndata directly
_PARTS = {
    "var": lambda f: ad.io.read_elem(f["var"]),
    "obs": lambda f: ad.io.read_elem(f["obs"]),
    "X/structure": lambda f: (f["X"]["indices"][:], f["X"]["indptr"][:], f["X"]["data"].shape),
    "X/data": lambda f: f["X"]["data"][:],  # the values: read chunk by chunk during validation
}


def _fails_reading(path: Path, part: str) -> bool:
    """Whether h5py opens ``path`` and reads every other part, but cannot read ``part``."""
    try:
        f = h5py.File(path, "r")
    except OSError:
        return False
    with f:
        try:
            for other, read in _PARTS.items():
                if other != part:
                    read(f)
        except _READ_ERRORS:
            return False
        try:
            _PARTS[part](f)
        except _READ_ERRORS:
            return True
        return False


def _damage(good: Path, out: Path, element: str) -> Path:
    """Overwrite the signature of one HDF5 B-tree node ("TREE") so that reading ``element`` fails
    ("wrong B-tree signature") while the file still opens. Deterministic: the first node, in file
    order, whose damage has that effect."""
    data = good.read_bytes()
    for m in re.finditer(b"TREE", data):
        bad = bytearray(data)
        bad[m.start():m.start() + 4] = b"XXXX"
        out.write_bytes(bytes(bad))
        if _fails_reading(out, element):
            return out
    pytest.fail(f"no B-tree node of {good} damages {element} alone")


@pytest.mark.parametrize("element", ["obs", "X/data"])
def test_damaged_h5ad_is_an_input_error_naming_the_file(pc9, tmp_path, element):
    good = tmp_path / "good.h5ad"
    _cells(pc9, 8, 8).write_h5ad(good)
    bad = _damage(good, tmp_path / "damaged.h5ad", element)
    store = tmp_path / "s.zarr"
    out = _refused(_extract(bad, store), "damaged.h5ad", "damaged", "adata.write_h5ad")
    assert "B-tree" in out or "signature" in out  # HDF5's own reason is kept
    assert not store.exists(), "a refused extraction creates no store"
    assert _extract(good, store).exit_code == 0  # the undamaged file goes through


# -- single-class datasets -------------------------------------------------------------------------
def test_single_class_dataset_is_refused_unless_allowed(pc9, tmp_path):
    sens, res = tmp_path / "sens.h5ad", tmp_path / "res.h5ad"
    _cells(pc9, 24, 0).write_h5ad(sens)
    _cells(pc9, 0, 24).write_h5ad(res)
    store = tmp_path / "s.zarr"
    opts = ("--option", "n_comps=8")
    assert _extract(_write_both(pc9, tmp_path), store, "--dataset", "both", *opts).exit_code == 0
    before = store_snapshot(store)
    out = _refused(_extract(sens, store, "--dataset", "sens", *opts), "sens.h5ad", "sensitive",
                   "--response-key", "--allow-single-class")
    assert "all 24 cells" in out
    assert store_snapshot(store) == before, "a refused extraction leaves the store as it was"

    # pooled with the other class: allowed, and the pooled store can be evaluated
    from scdm_eval.cli import app as eval_app

    fresh = tmp_path / "pooled.zarr"
    for path, name in ((sens, "sens"), (res, "res")):
        r = _extract(path, fresh, "--dataset", name, "--allow-single-class", *opts)
        assert r.exit_code == 0, r.output
    r = runner.invoke(eval_app, ["run", "--store", str(fresh), "--folds", "3", "-c", "logreg", "--n-jobs", "1",
                                 "--out", str(tmp_path / "res"), "-q"])
    assert r.exit_code == 0, r.output


def _write_both(pc9: ad.AnnData, tmp_path: Path) -> Path:
    p = tmp_path / "both.h5ad"
    _cells(pc9, 12, 12, start=40).write_h5ad(p)
    return p


# -- a checkpoint whose tensors do not fit its config ----------------------------------------------
def test_wrong_tensor_shapes_are_named_in_the_message(pc9, fixtures_dir, tmp_path):
    """tGPT weights with n_positions 64 under a config that says 128: the message itself names
    the tensor and both shapes (it used to point at a load report that was never printed)."""
    ckpt = tmp_path / "tgpt"
    shutil.copytree(fixtures_dir / "tgpt" / "checkpoint", ckpt)
    (ckpt / "config.json").chmod(0o644)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["n_positions"] == 64
    cfg["n_positions"] = 128
    (ckpt / "config.json").write_text(json.dumps(cfg))
    cells = tmp_path / "cells.h5ad"
    _cells(pc9, 4, 4).write_h5ad(cells)
    store = tmp_path / "s.zarr"
    r = runner.invoke(app, ["extract", str(cells), "--model", "tgpt", "--checkpoint", str(ckpt), "--store", str(store),
                            "--device", "cpu", "-q"])
    out = _refused(r, "wpe.weight", "(64, 64)", "(128, 64)", "shape-mismatched")
    assert "report" not in out
    assert not store.exists()


# -- operating-system errors: the last line of defence ---------------------------------------------
def _cli(action):
    """A one-command typer app running ``action`` under :func:`friendly_errors`, as both CLIs do."""
    cli = typer.Typer()

    @cli.command()
    @friendly_errors
    def go() -> None:
        action()

    @cli.command()
    def other() -> None:  # a second command keeps typer from collapsing `go` into the app
        pass

    return cli


def _write_to(path: str) -> None:
    with open(path, "wb") as fh:
        fh.write(b"\0" * 65536)
        fh.flush()


@pytest.mark.parametrize(("path", "code", "words"), [
    # the kernel's always-full device: a real ENOSPC (a failed write names no file, only open does)
    ("/dev/full", errno.ENOSPC, ("free some disk space",)),
    ("/nonexistent-dir/x.bin", errno.ENOENT, ("(/nonexistent-dir/x.bin)", "check that the path")),
])
def test_os_errors_print_strerror_filename_and_a_fix(path, code, words):
    r = runner.invoke(_cli(lambda: _write_to(path)), ["go"])
    _refused(r, f"error: {os.strerror(code)}", *words)


def test_other_exceptions_keep_their_traceback():
    """A real bug is not dressed up as a user error."""
    def bug() -> None:
        raise ZeroDivisionError("a bug")

    r = runner.invoke(_cli(bug), ["go"])
    assert r.exit_code == 1 and isinstance(r.exception, ZeroDivisionError)
