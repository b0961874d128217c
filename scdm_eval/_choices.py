"""The evaluation's choices, declared once: split schemes and the ``by`` columns.

Kept apart from :mod:`._splits` so that the CLI can build its options without importing
scikit-learn; :mod:`._splits` and :mod:`.cli` both read these.
"""

from __future__ import annotations

from enum import Enum


class Scheme(str, Enum):
    """``pooled``: k-fold inside each category; ``cross``: leave one study out; ``transfer``: fit on
    the ``--train`` cells, predict each ``--test`` dataset."""

    pooled = "pooled"
    cross = "cross"
    transfer = "transfer"


class By(str, Enum):
    """``all``: one pooled category; else one evaluation per value of this metadata column."""

    all = "all"
    tissue = "tissue"
    cancer_type = "cancer_type"
    drug = "drug"
    drug_type = "drug_type"
    regimen = "regimen"
    study = "study"
    dataset = "dataset"


class Protocol(str, Enum):
    """``scdm``: defaults with early stopping; ``scdrugmap``: the released scDrugMap code's schedule."""

    scdm = "scdm"
    scdrugmap = "scdrugmap"


class Correction(str, Enum):
    """Batch correction of the embeddings before classification (``harmony``: harmonypy, transductive)."""

    none = "none"
    harmony = "harmony"


class LoraHead(str, Enum):
    """The LoRA stage's head: ``mlp`` (the paper's d-512-512-2) or ``linear`` (d-2)."""

    mlp = "mlp"
    linear = "linear"


class Structured(str, Enum):
    """The LLM stage's structured output: ``auto`` probes ``json_schema``, ``json_object``, then ``text``."""

    auto = "auto"
    json_schema = "json_schema"
    json_object = "json_object"
    text = "text"


class Unparsed(str, Enum):
    """How the LLM stage scores an unparsed answer: ``wrong`` (worst case) or ``neutral`` (P = 0.5)."""

    wrong = "wrong"
    neutral = "neutral"


SCHEMES: tuple[str, ...] = tuple(s.value for s in Scheme)
#: Values of ``by``: one pooled category, or one evaluation per value of a metadata column.
BY_CHOICES: tuple[str, ...] = tuple(b.value for b in By)

__all__ = ["BY_CHOICES", "SCHEMES", "By", "Correction", "LoraHead", "Protocol", "Scheme", "Structured", "Unparsed"]
