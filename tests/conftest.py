"""Shared test fixtures: paths into ../shared (real cells, vocabularies, reference fixtures)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from scdm_embed.locations import shared_dir as _shared_dir

ROOT = Path(__file__).resolve().parents[1]
SHARED = _shared_dir()
PC9 = SHARED / "data" / "gse149214_pc9_erlotinib" / "pc9_d11_erlotinib_qc200.h5ad"
FIXTURES = SHARED / "reference_fixtures"
VOCAB = SHARED / "vocab"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: tests need ../shared beside the checkout (or SCDM_SHARED=...)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def pc9_path() -> Path:
    """The real default dataset (2,121 PC9 cells, raw counts, response sensitive/resistant)."""
    return _need(PC9)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """``../shared/reference_fixtures`` (per-model checkpoints + original-code embeddings)."""
    return _need(FIXTURES)


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    return _need(VOCAB)


@pytest.fixture(scope="session")
def fixture_models(fixtures_dir, vocab_dir) -> dict[str, tuple[Path, dict[str, Any]]]:
    """model -> (checkpoint, options) of every reference fixture (:func:`scdm_embed.testing.fixture_models`)."""
    from scdm_embed.testing import fixture_models as table  # imports torch: only when asked for

    return table(SHARED)


@pytest.fixture(scope="session")
def pc9_small(tmp_path_factory, pc9_path) -> Path:
    """240 real PC9 cells (120 sensitive, 120 resistant) as a small .h5ad, for fast tests."""
    import anndata as ad
    import numpy as np

    a = ad.read_h5ad(pc9_path)
    sens = np.flatnonzero(a.obs["response"].to_numpy() == "sensitive")[:120]
    res = np.flatnonzero(a.obs["response"].to_numpy() == "resistant")[:120]
    sub = a[np.concatenate([sens, res])].copy()
    path = tmp_path_factory.mktemp("pc9") / "pc9_small.h5ad"
    sub.write_h5ad(path)
    return path


def store_snapshot(path: Path) -> dict[str, bytes]:
    """Every file of a store (relative path -> bytes), to prove a failed command changed nothing."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
