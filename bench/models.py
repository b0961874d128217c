"""How to build each model's adapter from the reference-fixture checkpoints (bench + demo use)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _common import FIXTURES, SHARED

VOCAB = SHARED / "vocab"

#: model -> (checkpoint, options) using ../shared/reference_fixtures (random weights, official layout)
FIXTURE_MODELS: dict[str, tuple[Path, dict[str, Any]]] = {
    "geneformer": (FIXTURES / "geneformer" / "checkpoint", {
        "token_dictionary": str(VOCAB / "geneformer" / "gc30M" / "token_dictionary_gc30M.pkl"),
        "gene_median_dictionary": str(VOCAB / "geneformer" / "gc30M" / "gene_median_dictionary_gc30M.pkl")}),
    "tgpt": (FIXTURES / "tgpt" / "checkpoint", {}),
    "scgpt": (FIXTURES / "scgpt" / "checkpoint", {}),
    "scfoundation": (FIXTURES / "scfoundation" / "checkpoint", {
        "gene_index": str(VOCAB / "scfoundation" / "OS_scRNA_gene_index.19264.tsv")}),
    "uce": (FIXTURES / "uce" / "checkpoint", {}),
    "cellplm": (FIXTURES / "cellplm" / "checkpoint", {}),
}
