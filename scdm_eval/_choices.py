"""The evaluation's choices, declared once: split schemes and the ``by`` columns.

Kept apart from :mod:`._splits` so that the CLI can build its options without importing
scikit-learn; :mod:`._splits` and :mod:`.cli` both read these.
"""

from __future__ import annotations

from enum import Enum


class Scheme(str, Enum):
    """``pooled``: k-fold inside each category; ``cross``: leave one study out."""

    pooled = "pooled"
    cross = "cross"


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


class LoraHead(str, Enum):
    """The LoRA stage's head: ``mlp`` (the paper's d-512-512-2) or ``linear`` (d-2)."""

    mlp = "mlp"
    linear = "linear"


SCHEMES: tuple[str, ...] = tuple(s.value for s in Scheme)
#: Values of ``by``: one pooled category, or one evaluation per value of a metadata column.
BY_CHOICES: tuple[str, ...] = tuple(b.value for b in By)

__all__ = ["BY_CHOICES", "SCHEMES", "By", "LoraHead", "Protocol", "Scheme"]
