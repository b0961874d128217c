"""Fixtures shared by the scdm_embed tests: a working checkpoint for EVERY registered model
(reference fixtures in the official layouts, small random official-layout checkpoints where no
fixture exists) and 8 real fixture cells (4 sensitive, 4 resistant)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from .models._performer_ckpt import (
    CELLLM_GENES,
    SCBERT_GENES,
    scgpt_symbols,
    write_celllm_checkpoint,
    write_scbert_checkpoint,
)
from .models._shared import read_cells


@pytest.fixture(scope="session")
def cells8(tmp_path_factory, fixtures_dir: Path) -> Path:
    """8 real fixture cells (rows 0-3 sensitive, 4-7 resistant) as a small .h5ad."""
    a = read_cells(fixtures_dir / "scgpt" / "cells.h5ad", rows=np.r_[0:4, 32:36])
    path = tmp_path_factory.mktemp("cells") / "cells8.h5ad"
    a.write_h5ad(path)
    return path


@pytest.fixture(scope="session")
def model_checkpoints(tmp_path_factory, fixtures_dir: Path, vocab_dir: Path) -> dict[str, str | None]:
    """``--checkpoint`` per model, each loadable by its adapter with default options.

    Folders are assembled in the official layouts: Geneformer's fixture weights with the gc30M
    dictionaries beside them; scFoundation's ``models.ckpt`` with the official gene index; the
    bundled MiniLM for ``lm``; random Performer checkpoints for scBERT/CellLM; none for pca/hvg.
    """
    tmp = tmp_path_factory.mktemp("ckpts")
    out: dict[str, str | None] = {m: str(fixtures_dir / m / "checkpoint") for m in ("tgpt", "scgpt", "uce", "cellplm")}
    gf = tmp / "geneformer"
    shutil.copytree(fixtures_dir / "geneformer" / "checkpoint", gf)
    for f in (vocab_dir / "geneformer" / "gc30M").glob("*.pkl"):
        shutil.copy(f, gf / f.name)
    out["geneformer"] = str(gf)
    sf = tmp / "scfoundation"
    shutil.copytree(fixtures_dir / "scfoundation" / "checkpoint", sf)
    shutil.copy(vocab_dir / "scfoundation" / "OS_scRNA_gene_index.19264.tsv", sf)
    out["scfoundation"] = str(sf)
    out["scbert"] = str(write_scbert_checkpoint(tmp / "scbert", scgpt_symbols(vocab_dir, SCBERT_GENES)))
    out["celllm"] = str(write_celllm_checkpoint(tmp / "celllm", scgpt_symbols(vocab_dir, CELLLM_GENES)))
    out["lm"] = "minilm"
    out["pca"] = out["hvg"] = None
    return out
