"""Shared test fixtures: paths into ../shared (real cells, vocabularies, reference fixtures)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SCDM_SHARED", ROOT.parent / "shared")).resolve()
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
